"""Fast expert execution (moeify.kernels) against MoEMLP.forward_reference.

The torch backend (CPU decode/prefill paths) and the Triton kernels (run by the
Triton interpreter on the CPU: conftest.py sets TRITON_INTERPRET=1) must compute the block's
definition for every router kind, gate kind, compensation, unequal expert sizes,
static scales and selection biases.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch


import moeify
from moeify import kernels
from moeify.errors import InputError
from moeify.kernels import cpu
from moeify.core.dense import GatedWeights
from moeify.blocks.moe import MoEMLP
from moeify.core.plan import LayerPlan

from .conftest import tiny_model

H = 40


def _cmoe(dense, layout: str):
    """A tiny model converted by CMoE (calibrated on random token windows): routed, compensated blocks."""
    win = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(9))
    cal = moeify.Calibration.from_windows(win, held, batch_size=2)
    return moeify.convert(copy.deepcopy(dense), moeify.CMoEConfig(layout=layout), calibration=cal, progress=False).eval()


def _weights(d_h: int, act: str = "silu", seed: int = 0) -> GatedWeights:
    g = torch.Generator().manual_seed(seed)
    return GatedWeights(
        gate=torch.randn(d_h, H, generator=g) / H**0.5,
        up=torch.randn(d_h, H, generator=g) / H**0.5,
        down=torch.randn(H, d_h, generator=g) / d_h**0.5,
        act=act,
    )


ROUTERS = {
    "static": {"type": "static"},
    "linear": {"type": "linear"},
    "linear-rank": {"type": "linear", "rank": 6},
    "analytical": {"type": "analytical", "neurons": 12, "absolute": True},
    "analytical-signed-normalized": {"type": "analytical", "neurons": 8, "absolute": False, "normalize": True},
    "analytical-rank": {"type": "analytical", "neurons": 10, "absolute": True, "rank": 6},
    "mlp": {"type": "mlp", "hidden": 16},
}


def _block(sizes=(9, 14, 11, 17, 8), shared=13, top_k=2, router="analytical", gate="unit", compensate=False, scales=False,
           selection_bias=False, act="silu", seed=0) -> MoEMLP:
    """A block with every parameter random (router, gates, scales, compensation), so no path can pass by accident."""
    d_h = shared + sum(sizes)
    w = _weights(d_h, act, seed)
    perm = np.random.default_rng(seed).permutation(d_h)
    bounds = np.cumsum([shared, *sizes])
    experts = [perm[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]
    plan = LayerPlan(shared=perm[:shared], experts=experts, top_k=top_k, router=dict(ROUTERS[router]), gate=gate,
                     scales=np.linspace(0.5, 1.5, len(sizes)) if scales else None, compensate=compensate)
    block = MoEMLP.from_dense(w, plan)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in block.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        if block.gate_u is not None:
            block.gate_u.copy_(torch.randn(block.gate_u.shape, generator=g))
        if block.dropped_bias is not None:
            block.dropped_bias.copy_(torch.randn(block.dropped_bias.shape, generator=g) * 0.1)
        if selection_bias:
            block.selection_bias.copy_(torch.randn(block.num_experts, generator=g))
    return block.eval()


def _x(T: int, seed: int = 5, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check(block: MoEMLP, backend, T: int, dtype=torch.float32, atol=2e-5):
    x = _x(T, dtype=dtype)
    b = block.to(dtype)
    with torch.no_grad():
        ref = b.forward_reference(x)
        out = backend(b, x)
    assert out.dtype == ref.dtype and out.shape == (T, H)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-3 if dtype != torch.float32 else 1e-5)
    return ref


CASES = [
    dict(),
    dict(router="static", shared=0),
    dict(router="static", scales=True),
    dict(router="linear", top_k=1),
    dict(router="linear-rank", top_k=3, scales=True),
    dict(router="analytical", compensate=True),
    dict(router="analytical", top_k=1, compensate=True, selection_bias=True),
    dict(router="analytical-signed-normalized", top_k=3, compensate=True, scales=True),
    dict(router="analytical-rank", top_k=2, compensate=True),
    dict(router="mlp", top_k=2, gate="cmoe"),
    dict(router="analytical", top_k=5, gate="cmoe"),  # every expert active but a learned gate: the routed path
    dict(router="analytical", top_k=5),  # every expert active, unit gates: the one-matmul path
    dict(router="analytical", sizes=(12, 12, 12, 12), top_k=4, scales=True),  # equal sizes: the reshaped one-matmul path
    dict(router="linear", gate="softmax", top_k=2),
    dict(router="analytical", act="gelu_pytorch_tanh", compensate=True),
    dict(router="linear", act="relu", top_k=1),
    dict(router="linear", act="gelu", top_k=3),
    dict(sizes=(), shared=20, top_k=0, router="static"),  # a pruned MLP: shared expert only
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("T", [1, 2, 8, 37])
def test_torch_backend_equals_reference(case, T):
    block = _block(**case)
    ref = _check(block, cpu.moe_forward, T)
    assert ref.abs().max() > 0.1  # a real output, not zeros on both sides


@pytest.mark.parametrize("case", [dict(router="analytical", compensate=True, top_k=1), dict(router="linear", gate="cmoe", scales=True, top_k=3),
                                  dict(router="analytical", compensate=True, top_k=3), dict(router="static", scales=True, top_k=2)])
@pytest.mark.parametrize("T", [1, 6, 23])
def test_torch_backend_accumulates_half_precision_in_float32(case, T):
    block = _block(**case)
    _check(block, cpu.moe_forward, T, dtype=torch.bfloat16, atol=2e-2)


# blocks that route (a static router or unit gates with every expert active run all experts, no selection)
ROUTED_CASES = [c for c in CASES if c.get("top_k", 2) and not _block(**c).runs_all_experts()]


@pytest.mark.parametrize("case", ROUTED_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("path", ["masked", "grouped"])
def test_few_token_paths_both_equal_reference(case, path):
    """The masked (all experts, unselected zeroed) and grouped paths each compute the block, whichever the heuristic picks."""
    block = _block(**case)
    assert not block.runs_all_experts()
    x = _x(5)
    with torch.no_grad():
        ref = block.forward_reference(x)
        p = cpu.prepared(block, x)
        idx, w = cpu.route(block, x, p)
        out = cpu._new_accumulator(block, x, p, p.bias_total if p.bias is not None else None)
        getattr(cpu, "_" + path)(block, x, p, out, idx, w)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_masked_path_is_chosen_only_when_the_tokens_cover_the_experts(monkeypatch):
    block = _block(top_k=2)  # 5 experts
    used = []
    monkeypatch.setattr(cpu, "_masked", lambda *a: used.append("masked") or cpu._grouped(*a))
    with torch.no_grad():
        for T in (2, 3, 16, 17):
            used.clear()
            cpu.moe_forward(block, _x(T))
            assert (used == ["masked"]) == (3 <= T <= cpu.MASKED_MAX_TOKENS), T


def test_one_token_path_merges_neighbouring_experts_exactly():
    block = _block(sizes=(10,) * 6, shared=7, top_k=3, router="analytical", compensate=True)
    runs = 0
    with torch.no_grad():
        for t in range(30):
            x = _x(1, seed=100 + t)
            ids = sorted(block.route(x)[1][0].tolist())
            runs += any(b == a + 1 for a, b in zip(ids, ids[1:]))
            torch.testing.assert_close(cpu.moe_forward(block, x), block.forward_reference(x), atol=2e-5, rtol=1e-5)
    assert runs >= 5  # neighbouring selections really happened
    assert any(n > 1 for _, n in cpu.prepared(block, _x(1)).runs)


def test_one_token_path_runs_on_views_of_the_packed_weights():
    block = _block()
    p = cpu.prepared(block, _x(1))
    assert p.router is not None  # CMoE's analytical router is inlined (tested equal above), not called as a module
    gu_store = block.gate_up.untyped_storage().data_ptr()
    down_store = block.down.untyped_storage().data_ptr()
    for e, (gu_t, down_e, m) in enumerate(p.experts):
        assert m == block.expert_sizes[e]
        assert gu_t.untyped_storage().data_ptr() == gu_store and down_e.untyped_storage().data_ptr() == down_store
        assert gu_t.data_ptr() == block.gate_up[2 * block.offsets[e]].data_ptr()


def test_prepared_state_follows_parameter_updates():
    block = _block(router="linear", compensate=True, top_k=1)
    x = _x(1)
    with torch.no_grad():
        before = cpu.moe_forward(block, x).clone()
        block.expert_scale.mul_(2.0)  # in place: the cached scales must not be reused
        block.dropped_bias.add_(1.0)
        after = cpu.moe_forward(block, x)
        torch.testing.assert_close(after, block.forward_reference(x), atol=2e-5, rtol=1e-5)
    assert (after - before).abs().max() > 0.5


def test_functional_activations_match_transformers_modules():
    from transformers.activations import ACT2FN

    x = torch.randn(1000) * 4
    for name, fn in cpu._FUNCTIONAL.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), atol=0, rtol=0)


def test_model_forward_uses_the_fast_path_and_matches_reference(probe_ids):
    dense = tiny_model("llama")
    conv = _cmoe(dense, "S1A2E6")
    calls = []
    original = cpu.moe_forward

    def spy(block, x):
        calls.append(x.shape[0])
        return original(block, x)

    with torch.no_grad():
        kernels.use(conv, "reference")
        ref = conv(probe_ids).logits
        kernels.use(conv, "torch")
        conv.model.layers[0].mlp.kernel = spy
        out = conv(probe_ids).logits
    assert calls == [probe_ids.numel()]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_autograd_takes_the_reference_path():
    block = _block(router="linear", compensate=True)
    x = _x(3).requires_grad_()
    assert kernels.select(block, x) is kernels._reference
    with torch.no_grad():
        assert kernels.select(block, x) is kernels._torch
    block(x).sum().backward()  # the fast path's in-place updates would break this
    assert x.grad is not None and block.gate_up.grad is not None


def test_backend_choice_and_errors(monkeypatch):
    block = _block()
    x = _x(2)
    with torch.no_grad():
        monkeypatch.setenv("MOEIFY_KERNEL", "reference")
        assert kernels.select(block, x) is kernels._reference
        monkeypatch.setenv("MOEIFY_KERNEL", "nonsense")
        with pytest.raises(InputError, match="unknown kernel backend"):
            kernels.select(block, x)
    with pytest.raises(InputError, match="unknown kernel backend 'fast'"):
        kernels.use(block, "fast")
    assert kernels.use(torch.nn.Sequential(block, _block()), "torch") == 2 and block.kernel is kernels._torch


def test_hierarchical_sub_blocks_use_the_fast_path():
    from moeify.blocks.hierarchical import HierarchicalExperts

    cfgs = [_block(sizes=(6, 7, 5), shared=4, top_k=1, router="analytical", compensate=True, seed=s) for s in range(3)]
    hx = HierarchicalExperts(H, [b.layer_config for b in cfgs], "silu")
    for dst, src in zip(hx.blocks, cfgs):
        dst.load_state_dict(src.state_dict())
    x = _x(29)
    idx = torch.randint(0, 3, (29, 2), generator=torch.Generator().manual_seed(0))
    w = torch.rand(29, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kernels.use(hx, "reference")
        ref = hx(x, idx, w)
        kernels.use(hx, "torch")
        out = hx(x, idx, w)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Triton (interpreted on CPU)

triton = pytest.importorskip("triton", reason="Triton is in the dev extra: pip install -e '.[dev]'")


def _triton_forward():
    from moeify.kernels import triton_moe

    return triton_moe.moe_forward


TRITON_CASES = [
    dict(router="analytical", top_k=2),
    dict(router="analytical", top_k=1, compensate=True, selection_bias=True),
    dict(router="linear", top_k=3, scales=True, act="gelu_pytorch_tanh"),
    dict(router="mlp", top_k=2, gate="cmoe", act="relu"),
    dict(router="linear", top_k=2, gate="softmax", act="gelu"),
    dict(router="linear", sizes=(70, 3), shared=0, top_k=1),  # experts wider than one tile and narrower than 16 rows
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("T", [1, 40])
def test_triton_kernels_equal_reference(case, T):
    _check(_block(**case), _triton_forward(), T, atol=5e-5)


def test_triton_tile_schedule_covers_every_row_once_within_one_expert():
    from moeify.kernels.triton_moe import tile_schedule

    counts = torch.tensor([0, 5, 33, 1, 0, 16])
    starts = np.concatenate([[0], np.cumsum(counts.numpy())])
    for bm in (4, 16):
        e, s, t = (a.numpy() for a in tile_schedule(counts, int(counts.sum()), bm))
        covered = np.zeros(int(counts.sum()), dtype=int)
        for ei, si, ti in zip(e, s, t):
            if ti <= si:
                continue
            assert ti - si <= bm
            assert starts[ei] <= si and ti <= starts[ei + 1], "a tile crosses an expert boundary"
            covered[si:ti] += 1
        assert (covered == 1).all()


def test_triton_backend_in_a_converted_model(probe_ids):
    conv = _cmoe(tiny_model("llama"), "S1A2E6")
    ids = probe_ids[:, :5]
    with torch.no_grad():
        kernels.use(conv, "triton")
        out = conv(ids).logits
        kernels.use(conv, "reference")
        ref = conv(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_triton_bfloat16_accumulates_in_float32():
    _check(_block(sizes=(20, 25, 18), shared=6, top_k=2, router="linear", compensate=True), _triton_forward(), 9, dtype=torch.bfloat16, atol=3e-2)


def test_triton_refuses_an_activation_it_has_no_fused_form_for():
    block = _block(router="linear", act="silu")
    block.act = "quick_gelu"
    with pytest.raises(InputError, match="no fused 'quick_gelu' activation"):
        _triton_forward()(block, _x(2))


def test_triton_kernels_compile_for_an_h100():
    """The compiled kernels, not the interpreter's reading of them: PTX for sm_90 without a GPU (Triton bundles ptxas)."""
    import subprocess
    import sys

    code = ("import json; from moeify.kernels.triton_moe import compile_for_gpu as c; "
            "p = c(90, 'bf16'); print(json.dumps({k: ('wgmma' in v, len(v)) for k, v in p.items()}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    ptx = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(ptx) == {"gate_up_bm16", "down_bm16", "gate_up_bm128", "down_bm128"} and all(n > 1000 for _, n in ptx.values())
    assert ptx["gate_up_bm128"][0] and ptx["down_bm128"][0]  # large tiles use Hopper tensor cores (wgmma)
