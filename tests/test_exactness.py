"""The backbone invariant: every expert active with unit weights == the dense MLP."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeify
from moeify.models.arch import dense_weights, mlp_sites, spec_for
from moeify.core.dense import GatedWeights
from moeify.blocks.moe import MoEMLP
from moeify.core.plan import LayerPlan

from .conftest import DENSE_ARCHS, tiny_model
from .integer_blocks import assert_sums_need_float32, integer_block, integer_inputs


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_mlpmoe_is_exact_for_every_architecture(arch, probe_ids):
    model = tiny_model(arch)
    with torch.no_grad():
        ref = model(probe_ids).logits
    conv = moeify.convert(copy.deepcopy(model), moeify.MLPMoEConfig(branches=5), progress=False)
    assert type(conv).__name__.startswith("Moeify")
    assert all(isinstance(s.module, MoEMLP) for s in mlp_sites(conv))
    with torch.no_grad():
        out = conv(probe_ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_adapter_reads_the_real_mlp(arch):
    """dense_weights must reproduce the architecture's own MLP forward (act, gate/up order, fused Phi-3)."""
    model = tiny_model(arch)
    spec = spec_for(model)
    site = next(mlp_sites(model, spec))
    act = moeify.models.arch.activation_name(model.config, spec)
    w = dense_weights(site.module, spec, act)
    x = torch.randn(7, model.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(w(x), site.module(x), atol=1e-6)


def _random_weights(h: int, d: int, act: str, seed: int) -> GatedWeights:
    g = torch.Generator().manual_seed(seed)
    return GatedWeights(
        gate=torch.randn(d, h, generator=g) / h**0.5,
        up=torch.randn(d, h, generator=g) / h**0.5,
        down=torch.randn(h, d, generator=g) / d**0.5,
        act=act,
    )


@st.composite
def partitions(draw):
    h = draw(st.integers(4, 24))
    d = draw(st.integers(2, 60))
    seed = draw(st.integers(0, 2**16))
    perm = np.random.default_rng(seed).permutation(d)
    n_shared = draw(st.integers(0, d - 1))
    rest = perm[n_shared:]
    n_exp = draw(st.integers(1, len(rest)))
    cuts = sorted(draw(st.lists(st.integers(1, len(rest) - 1), min_size=n_exp - 1, max_size=n_exp - 1, unique=True))) if n_exp > 1 else []
    experts = np.split(rest, cuts)
    return h, d, seed, perm[:n_shared], experts


@settings(max_examples=60, deadline=None)
@given(partitions(), st.sampled_from(["silu", "gelu_pytorch_tanh"]), st.sampled_from(["static", "linear", "analytical"]))
def test_any_partition_all_active_is_exact(part, act, router):
    h, d, seed, shared, experts = part
    w = _random_weights(h, d, act, seed)
    plan = LayerPlan(shared=shared, experts=experts, top_k=len(experts), router={"type": router})
    plan.validate(d)
    block = MoEMLP.from_dense(w, plan)
    x = torch.randn(9, h, generator=torch.Generator().manual_seed(seed + 1))
    ref = w(x)
    with torch.no_grad():
        out = block(x)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        # the routed (grouped) path with every expert selected must agree too
        if experts:
            grouped = torch.zeros_like(ref)
            if block.shared_size:
                grouped += block._shared(x)
            idx = torch.arange(len(experts)).expand(x.shape[0], -1)
            block._grouped_routed(x, idx, torch.ones(idx.shape), grouped)
            assert torch.allclose(grouped, ref, atol=1e-5), (grouped - ref).abs().max()


@pytest.mark.parametrize("T", [1, 37])  # decode (one expert after the other into the accumulator) and the grouped path
def test_bf16_accumulates_in_fp32(T):
    """Every expert active with unit gate weights, in bf16: the dense MLP summed in fp32 and rounded once.

    tests/integer_blocks.py: integer weights and inputs make each expert's output exact in bf16 and
    the sum over 64 experts exact in fp32 but not in bf16 (checked: a bf16 accumulator misses it by
    several units). A CMoE gate at u = 0 (weights exactly 1) makes the block add its experts one by
    one, where the accumulator's precision shows, rather than in one matmul over all of them.
    """
    w, block = integer_block()
    assert block.all_active() and not block.runs_all_experts()
    x = integer_inputs(T)
    x64 = x.double()
    dense = (torch.relu(x64 @ w.gate.double().T) * (x64 @ w.up.double().T)) @ w.down.double().T
    assert torch.equal(assert_sums_need_float32(block, x), dense)  # all experts, unit weights: the dense MLP
    with torch.no_grad():
        out = block(x)
        # the only rounding is the last one, to the block's bf16 output
        assert out.dtype == torch.bfloat16 and torch.equal(out, dense.bfloat16()), (out.double() - dense).abs().max()
        ref = block.forward_reference(x)
        assert ref.dtype == torch.float32 and torch.equal(ref.double(), dense), (ref.double() - dense).abs().max()


def test_topk_selects_highest_scores_and_skips_unselected():
    """With a linear router and top-1, only the selected expert's output is added."""
    w = _random_weights(8, 12, "silu", 3)
    plan = LayerPlan(shared=[], experts=[np.arange(0, 4), np.arange(4, 8), np.arange(8, 12)], top_k=1, router={"type": "linear"})
    block = MoEMLP.from_dense(w, plan)
    x = torch.randn(6, 8)
    with torch.no_grad():
        block.router.weight.copy_(torch.randn(3, 8))
        scores = x @ block.router.weight.T
        out = block(x)
        for t in range(6):
            e = int(scores[t].argmax())
            idx = plan.experts[e]
            exp = (torch.nn.functional.silu(x[t] @ w.gate[idx].T) * (x[t] @ w.up[idx].T)) @ w.down[:, idx].T
            assert torch.allclose(out[t], exp, atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "relu", "gelu_pytorch_tanh"])
def test_hidden_in_reused_blocks_equals_the_mlp_formula(act):
    """h(x) = act(W_gate x) * (W_up x), computed in token blocks through reused buffers (a partial last block too)."""
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(0)
    w = GatedWeights(torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(16, 24, generator=g), act)
    x = torch.randn(37, 16, generator=g)
    want = ACT2FN[act](x @ w.gate.T) * (x @ w.up.T)
    for chunk in (5, 16, 64):
        torch.testing.assert_close(w.hidden(x, chunk=chunk), want, atol=1e-5, rtol=1e-6)
    # a stale block would show: the second block's rows must not be the first block's
    h = w.hidden(x, chunk=16)
    assert not torch.equal(h[16:32], h[:16])


def test_in_place_activations_match_transformers_modules():
    from transformers.activations import ACT2FN

    from moeify.core.dense import IN_PLACE_ACTIVATIONS

    x = torch.randn(1000) * 4
    for name, fn in IN_PLACE_ACTIVATIONS.items():
        y = x.clone()
        out = fn(y)
        torch.testing.assert_close(out, ACT2FN[name](x), atol=0, rtol=0)
        assert out.data_ptr() == y.data_ptr()  # in place: no new block of memory


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_mlp_output_is_refused_wherever_it_is(bad):
    from moeify.core.dense import check_finite_output
    from moeify.errors import InputError

    y = torch.randn(64, 8)
    check_finite_output(y, 3)  # finite: accepted
    check_finite_output(y[:0], 3)  # no tokens: nothing to refuse
    for pos in [(0, 0), (37, 5), (63, 7)]:
        z = y.clone()
        z[pos] = bad
        with pytest.raises(InputError, match="layer 3: the MLP activations contain NaN or inf"):
            check_finite_output(z, 3)
