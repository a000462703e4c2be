"""Fast expert execution (moeify.kernels) against MoEMLP.forward_reference.

The torch backend (CPU decode/prefill paths) and the Triton kernels (run by the
Triton interpreter on the CPU: conftest.py sets TRITON_INTERPRET=1) must compute the block's
definition for every router kind, gate kind, compensation, unequal expert sizes,
static scales and selection biases. Only the Triton tests need Triton (an optional
dependency); the others run without it.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moeify
from moeify import kernels
from moeify.blocks.moe import MoEMLP
from moeify.core.dense import GatedWeights
from moeify.core.plan import LayerPlan
from moeify.errors import InputError
from moeify.kernels import common, native, torch_backend

from .conftest import tiny_model
from .integer_blocks import assert_sums_need_float32, integer_block, integer_inputs

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="Triton is in the dev extra: pip install -e '.[dev]'")

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
    dict(sizes=(3, 4, 5, 6) * 4, top_k=8, gate="cmoe", compensate=True),  # 16 experts, half selected: a masked reference
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("T", [1, 2, 8, 37])
def test_torch_backend_equals_reference(case, T):
    block = _block(**case)
    ref = _check(block, torch_backend.moe_forward, T)
    assert ref.abs().max() > 0.1  # a real output, not zeros on both sides


@pytest.mark.parametrize("case", [dict(router="analytical", compensate=True, top_k=1), dict(router="linear", gate="cmoe", scales=True, top_k=3),
                                  dict(router="analytical", compensate=True, top_k=3), dict(router="static", scales=True, top_k=2)])
@pytest.mark.parametrize("T", [1, 6, 23])
def test_torch_backend_equals_reference_in_bfloat16(case, T):
    block = _block(**case)
    _check(block, torch_backend.moe_forward, T, dtype=torch.bfloat16, atol=2e-2)


# Blocks whose expert outputs are exact small integers (tests/integer_blocks.py): float32 sums of
# them are exact, bfloat16 sums are not. Weighted gates only: with unit gates, a few tokens take the
# masked path, which sums the routed experts inside one matmul whose output is bfloat16.
INTEGER_BLOCKS = {
    "all-active-cmoe-gate": dict(),
    "top40-scales": dict(top_k=40, gate="unit", scales=True),
    "top40-cmoe-gate": dict(top_k=40, gate="cmoe"),
}


@pytest.fixture(params=["native", "emulated"])
def bf16_layout(request, monkeypatch):
    """Both bf16 code paths of kernels.common on any machine: the layouts for native bf16 (AVX512-BF16/AMX) and for
    AVX2's emulated bf16 (matrix-vector kernel on the transposed down rows, a transposed copy for several rows)."""
    monkeypatch.setattr(common, "native_bf16", lambda: request.param == "native")
    return request.param


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    """Both batch-1 decode steps of an equal-size, static-gate block: the compiled one (kernels/native.py, the default
    wherever a C compiler is) and the torch one it falls back to (`MOEIFY_NATIVE=0`)."""
    if request.param == "torch":
        monkeypatch.setenv("MOEIFY_NATIVE", "0")
    else:
        assert native.enabled(), "the compiled decode step did not build here (see the log): CI machines have a C compiler"
    return request.param


def _decode_state(block, x, path):
    """The decode state the step left in the block's prepared state, checking the expected path ran."""
    p = common.prepared(block, x)
    if path == "native":
        assert p.native and p.decode is None
        return p.native
    assert p.native is False and p.decode is not None
    return p.decode


def test_native_bf16_follows_the_code_path_aten_chose(monkeypatch):
    common.native_bf16.cache_clear()
    try:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert common.native_bf16() is False  # e.g. ATEN_CPU_CAPABILITY=avx2 on an AMX machine
        common.native_bf16.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        assert common.native_bf16() is False  # AVX-512 without bf16 units
        common.native_bf16.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        assert common.native_bf16() is True
    finally:
        common.native_bf16.cache_clear()


@pytest.mark.parametrize("name", INTEGER_BLOCKS)
@pytest.mark.parametrize("T", [1, 5, 37])  # decode (one token), the grouped path for a few and for many tokens
def test_torch_backend_accumulates_half_precision_in_float32(name, T, bf16_layout):
    _, block = integer_block(**INTEGER_BLOCKS[name])
    x = integer_inputs(T)
    exact = assert_sums_need_float32(block, x)  # a bfloat16 accumulator misses this sum by several units
    with torch.no_grad():
        out = torch_backend.moe_forward(block, x)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), exact), (out.double() - exact).abs().max()


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
        p = common.prepared(block, x)
        idx, w = common.route(block, x, p)
        out = common.new_accumulator(block, x, p, p.bias_total if p.bias is not None else None)
        getattr(torch_backend, "_" + path)(block, x, p, out, idx, w)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_masked_path_is_chosen_only_when_the_tokens_cover_the_experts(monkeypatch):
    block = _block(top_k=2)  # 5 experts
    used = []
    monkeypatch.setattr(torch_backend, "_masked", lambda *a: used.append("masked") or torch_backend._grouped(*a))
    with torch.no_grad():
        for T in (2, 3, 16, 17):
            used.clear()
            torch_backend.moe_forward(block, _x(T))
            assert (used == ["masked"]) == (3 <= T <= torch_backend.MASKED_MAX_TOKENS), T


def _grouped_reference(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """forward_reference with the routed experts always grouped by expert."""
    out = block._shared(x) if block.shared_size else torch.zeros(x.shape[0], H)
    _, idx, w = block.route(x)
    block._grouped_routed(x, idx, w, out)
    block._compensate(out, idx)
    return out


@pytest.mark.parametrize("case", [dict(top_k=8, gate="cmoe", compensate=True, selection_bias=True),
                                  dict(top_k=11, router="linear", scales=True, act="gelu_pytorch_tanh")],
                         ids=["half,cmoe-gate,compensated", "11-of-16,scales"])
def test_reference_masks_many_experts_with_grouped_values_and_gradients(case):
    """16 experts, each token selecting at least half (MoEfication's shape): forward_reference runs them as one masked
    matmul pair; output and every gradient (input, gate u, packed weights, router) equal the grouped path's."""
    block = _block(sizes=tuple(3 + i % 4 for i in range(16)), **case).train()
    x = _x(37)
    assert block.masks_experts(x)
    params = [p for p in block.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    grads = []
    for f in (MoEMLP.forward_reference, _grouped_reference):
        xi = x.clone().requires_grad_(True)
        out = f(block, xi)
        gs = torch.autograd.grad(out.square().sum(), [xi, *params], allow_unused=True)
        grads.append((out.detach(), gs))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert sum(g is not None for g in ga) >= 5  # x, gate_up, down, gate u or scales, the router
    for g1, g2 in zip(ga, gb):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_reference_groups_few_experts_fewer_selected_and_half_precision():
    x = _x(9)
    assert not _block(top_k=3).masks_experts(x)  # 5 experts, 3 selected: grouping is as fast
    assert not _block(sizes=(3,) * 16, top_k=7).masks_experts(x)  # fewer than half selected
    assert _block(sizes=(3,) * 16, top_k=8).masks_experts(x)
    assert not _block(sizes=(3,) * 16, top_k=8).to(torch.bfloat16).masks_experts(x.bfloat16())  # weights in float32


def test_one_token_path_merges_neighbouring_experts_exactly(monkeypatch):
    monkeypatch.setenv("MOEIFY_NATIVE", "0")  # the torch step (the compiled one has no runs: tested below)
    block = _block(sizes=(10,) * 6, shared=7, top_k=3, router="analytical", compensate=True)
    runs = 0
    with torch.no_grad():
        for t in range(30):
            x = _x(1, seed=100 + t)
            ids = sorted(block.route(x)[1][0].tolist())
            runs += any(b == a + 1 for a, b in zip(ids, ids[1:]))
            torch.testing.assert_close(torch_backend.moe_forward(block, x), block.forward_reference(x), atol=2e-5, rtol=1e-5)
    assert runs >= 5  # neighbouring selections really happened
    assert any(n > 1 for _, n in common.prepared(block, _x(1)).runs)


# Equal expert sizes and static gates (every CMoE, MoEfication and LLaMA-MoE-split layer): one token takes
# torch_backend._decode, its fixed buffers and its inline router
EQUAL_CASES = [
    dict(sizes=(10,) * 6, shared=7, top_k=3, compensate=True),
    dict(sizes=(10,) * 6, shared=0, top_k=3),
    dict(sizes=(10,) * 6, shared=0, top_k=2, compensate=True),
    dict(sizes=(10,) * 6, shared=7, top_k=2, scales=True, selection_bias=True),
    dict(sizes=(10,) * 6, shared=7, top_k=3, router="analytical-signed-normalized", compensate=True, scales=True),
    dict(sizes=(10,) * 6, shared=7, top_k=2, router="analytical-rank"),
    dict(sizes=(10,) * 6, shared=7, top_k=1, router="mlp"),
    dict(sizes=(10,) * 6, shared=7, top_k=4, router="linear", act="gelu_pytorch_tanh"),
]


@pytest.mark.parametrize("case", EQUAL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k != "sizes"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_reference(case, dtype, bf16_layout, decode_path):
    block = _block(**case).to(dtype)
    atol, rtol = (2e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1e-3)
    outs = []
    with torch.no_grad():
        for t in range(12):
            x = _x(1, seed=200 + t, dtype=dtype)
            out = torch_backend.moe_forward(block, x)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, block.forward_reference(x), atol=atol, rtol=rtol)
            outs.append((x, out))
        _decode_state(block, _x(1, dtype=dtype), decode_path)  # the batch-1 step ran, not the general one-token path
        for x, out in outs:  # each call returned its own tensor: later tokens did not overwrite earlier outputs
            torch.testing.assert_close(out, block.forward_reference(x), atol=atol, rtol=rtol)


@pytest.mark.parametrize("chosen", [(0, 1, 2), (3, 4, 5), (0, 2, 4), (1, 2, 5)])
@pytest.mark.parametrize("scales", [False, True])
def test_decode_step_runs_of_neighbouring_experts(chosen, scales, decode_path):
    """A selection forced by the balancing bias: a run of three, of two plus one, three single experts;
    with per-expert scales a run is split into one matmul per expert."""
    block = _block(sizes=(10,) * 6, shared=7, top_k=3, compensate=True, scales=scales)
    with torch.no_grad():
        block.selection_bias.zero_()
        block.selection_bias[list(chosen)] = 1e4
        for t in range(4):
            x = _x(1, seed=300 + t)
            assert sorted(block.route(x)[1][0].tolist()) == list(chosen)
            torch.testing.assert_close(torch_backend.moe_forward(block, x), block.forward_reference(x), atol=2e-5, rtol=1e-5)


def test_decode_step_from_several_threads(decode_path):
    """Concurrent decoding in several threads gives each token its own result (the torch step: per-thread buffers;
    the compiled step: nothing shared but the weights)."""
    from concurrent.futures import ThreadPoolExecutor

    import threading

    block = _block(sizes=(10,) * 6, shared=7, top_k=3, compensate=True)
    xs = [_x(1, seed=400 + t) for t in range(64)]
    both = threading.Barrier(2)  # the first two tokens wait for each other: two threads surely decode
    with torch.no_grad():
        refs = [block.forward_reference(x) for x in xs]
        torch_backend.moe_forward(block, xs[0])  # the block's prepared state made here, not raced for by the threads

        def one(i):
            if i < 2:
                both.wait(timeout=60)
            with torch.no_grad():
                return torch_backend.moe_forward(block, xs[i])

        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(one, range(len(xs))))
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    state = _decode_state(block, xs[0], decode_path)
    if decode_path == "torch":
        assert len(state._bufs) >= 3  # this thread's and at least two of the pool's


# Blocks with enough active neurons (shared 64 + 3 x 64) for the compiled step to split them among threads
WIDE = dict(sizes=(64,) * 6, shared=64, top_k=3, compensate=True)


@pytest.mark.parametrize("case", [WIDE, dict(WIDE, router="mlp", scales=True), dict(WIDE, shared=0, selection_bias=True),
                                  dict(WIDE, gate="cmoe", scales=True, selection_bias=True), dict(WIDE, router="mlp", gate="cmoe"),
                                  dict(WIDE, router="linear", gate="softmax")],
                         ids=["analytical", "mlp-router-scales", "no-shared", "cmoe-gate", "mlp-router-cmoe-gate", "softmax-gate"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_decode_splits_neurons_among_threads(case, threads, decode_path):
    """The compiled step gives the block's output whatever the thread count: router, shared and selected neurons are
    each split among the threads, whose float32 accumulators are summed. Learned gates (CMoE's fine-tuned
    1 + softmax(s)·u, softmax) run in it too; the torch fallback for them is the general one-token path."""
    block = _block(**case)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for t in range(6):
                x = _x(1, seed=500 + t)
                torch.testing.assert_close(torch_backend.moe_forward(block, x), block.forward_reference(x), atol=2e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)
    if block.gate_u is None and block.gate_mode == "unit":
        _decode_state(block, _x(1), decode_path)
    else:
        assert bool(common.prepared(block, _x(1)).native) == (decode_path == "native")


@pytest.mark.parametrize("case", [WIDE, dict(WIDE, router="linear", top_k=2, scales=True), dict(WIDE, act="gelu_pytorch_tanh"),
                                  dict(WIDE, act="relu", top_k=1), dict(WIDE, act="gelu", top_k=4)],
                         ids=["silu-analytical", "linear-scales", "gelu-tanh", "relu", "gelu"])
def test_native_decode_in_bfloat16_is_float32_exact(case, decode_path):
    """bfloat16 weights and input, widened exactly and accumulated in float32 throughout: the compiled step matches
    the block's definition computed in float64 on the same bfloat16 values to float32 rounding, where the torch step
    (bfloat16 matmul outputs and products) is ~100x further off."""
    block = _block(**case).to(torch.bfloat16)
    exact_block = copy.deepcopy(block).double()
    errs = []
    with torch.no_grad():
        for t in range(8):
            x = _x(1, seed=600 + t, dtype=torch.bfloat16)
            exact = exact_block.forward_reference(x.double())
            out = torch_backend.moe_forward(block, x)
            errs.append(((out.double() - exact).abs().max() / exact.abs().max()).item())
    worst = max(errs)
    if decode_path == "native":
        assert worst < 2e-6, errs
    else:
        assert worst > 1e-4, errs  # the torch step's bfloat16 roundings: the bound above is not vacuous


def test_native_decode_selects_the_routers_top_k():
    """The analytical router inside the compiled step picks the same experts as common.route, including with a
    selection bias that overrides the scores."""
    block = _block(**dict(WIDE, selection_bias=True))
    seen = set()
    with torch.no_grad():
        for t in range(40):
            x = _x(1, seed=700 + t)
            p = common.prepared(block, x)
            ids = sorted(common.route(block, x, p)[0][0].tolist())
            seen.add(tuple(ids))
            # another selection would give another output (other experts' rows, other compensation)
            torch.testing.assert_close(torch_backend.moe_forward(block, x), block.forward_reference(x), atol=2e-5, rtol=1e-5)
    assert p.native and p.native.inline  # routed inside the C step
    assert len(seen) >= 4  # different tokens chose different experts


def test_native_library_is_cached_and_falls_back_without_a_compiler(tmp_path, monkeypatch):
    """Compiled once into MOEIFY_HOME/kernels and reused; a cache that cannot be written compiles into a private
    temporary folder; without a compiler the torch step runs and gives the same result."""
    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "home"))
    cc = os.environ.get("CC", "cc")
    first = native._build(cc)
    assert first.parent == tmp_path / "home" / "kernels" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native._build(cc) == first and first.stat().st_mtime_ns == stamp  # no second compile
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "file"))
    elsewhere = native._build(cc)
    assert elsewhere.is_file() and tmp_path not in elsewhere.parents
    block = _block(**WIDE)
    x = _x(1)
    with torch.no_grad():
        compiled = torch_backend.moe_forward(block, x)
        assert common.prepared(block, x).native
        native.library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        try:
            assert not native.enabled()
            fresh = _block(**WIDE)
            fallback = torch_backend.moe_forward(fresh, x)
            assert common.prepared(fresh, x).native is False and common.prepared(fresh, x).decode is not None
        finally:
            native.library.cache_clear()
    torch.testing.assert_close(fallback, compiled, atol=2e-5, rtol=1e-5)


def _logits(model, ids: torch.Tensor, backend: str) -> torch.Tensor:
    """The model's logits on ids with every MoE block on `backend`."""
    kernels.use(model, backend)
    with torch.no_grad():
        return model(ids).logits


def test_model_decode_takes_the_step_it_reports(decode_path):
    """A converted model's single-token forward (every layer's block at T = 1) matches the reference kernel, and
    kernels.decode_steps / native.describe (what `moeify bench` records) name the step that really ran."""
    conv = _cmoe(tiny_model("llama"), "S1A2E6")
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(3))
    ref = _logits(conv, ids, "reference")
    torch.testing.assert_close(_logits(conv, ids, "auto"), ref, atol=1e-5, rtol=1e-5)
    n = kernels.use(conv, "auto")
    assert kernels.decode_steps(conv) == {"compiled" if decode_path == "native" else "torch": n}
    info = native.describe()
    assert info["compiled_decode"] == (decode_path == "native")
    if decode_path == "torch":
        assert info["why"] == "MOEIFY_NATIVE=0"
    else:
        assert Path(info["library"]).is_file() and info["compiler"]


def test_one_token_path_runs_on_views_of_the_packed_weights():
    block = _block()
    p = common.prepared(block, _x(1))
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
        before = torch_backend.moe_forward(block, x).clone()
        block.expert_scale.mul_(2.0)  # in place: the cached scales must not be reused
        block.dropped_bias.add_(1.0)
        after = torch_backend.moe_forward(block, x)
        torch.testing.assert_close(after, block.forward_reference(x), atol=2e-5, rtol=1e-5)
    assert (after - before).abs().max() > 0.5


def test_functional_activations_match_transformers_modules():
    from transformers.activations import ACT2FN

    x = torch.randn(1000) * 4
    for name, fn in common.FUNCTIONAL_ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), atol=0, rtol=0)


def test_model_forward_uses_the_fast_path_and_matches_reference(probe_ids):
    dense = tiny_model("llama")
    conv = _cmoe(dense, "S1A2E6")
    calls = []
    original = torch_backend.moe_forward

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


def test_moeify_runs_without_triton_and_imports_it_only_for_the_triton_backend():
    """Triton is optional: with it absent (None in sys.modules: every import of it fails, as when it is not
    installed) moeify imports and runs the torch backend; with it present moeify's own Triton module loads
    only when the Triton backend is first used."""
    code = """if True:
        import sys
        absent = sys.argv[1] == "absent"
        if absent:
            sys.modules["triton"] = None
        import torch, moeify
        from moeify import kernels
        from moeify.blocks.moe import MoEMLP
        assert "moeify.kernels.triton_moe" not in sys.modules
        lc = {"shared": 2, "experts": [3, 3, 3], "top_k": 1, "router": {"type": "linear"}}
        block = MoEMLP(8, lc, "silu").eval()
        with torch.no_grad():
            out = kernels.get("torch")(block, torch.randn(2, 8))
        assert out.shape == (2, 8) and "moeify.kernels.triton_moe" not in sys.modules
        assert kernels.triton_available() is not absent
        if absent:
            try:
                kernels.get("triton")
            except moeify.InputError as e:
                assert "needs Triton" in str(e)
            else:
                raise AssertionError("the triton backend was handed out without Triton")
        print("ok")
    """
    for triton_state in ("absent", "present") if importlib.util.find_spec("triton") else ("absent",):
        r = subprocess.run([sys.executable, "-c", code, triton_state], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (triton_state, r.stderr[-3000:])


def test_kernels_import_nothing_from_the_layers_above():
    """moeify.kernels sits below the blocks it runs: it imports only torch, moeify.errors and moeify.core."""
    pkg = Path(kernels.__file__).parent
    files = sorted(pkg.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "common.py", "torch_backend.py", "triton_moe.py"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert (node.module or "").split(".")[0] in ("errors", "core"), f"{f.name}: from {'.' * node.level}{node.module}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moeify"):
                assert (node.module.split(".") + [""])[1] in ("errors", "core", "kernels"), f"{f.name}: from {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("moeify.") and a.name.split(".")[1] not in ("errors", "core", "kernels") for a in node.names), f.name


# --------------------------------------------------------------------------- Triton (interpreted on CPU)


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


@requires_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("T", [1, 40])
def test_triton_kernels_equal_reference(case, T):
    _check(_block(**case), _triton_forward(), T, atol=5e-5)


@requires_triton
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


@requires_triton
def test_triton_backend_in_a_converted_model(probe_ids):
    conv = _cmoe(tiny_model("llama"), "S1A2E6")
    ids = probe_ids[:, :5]
    out = _logits(conv, ids, "triton")
    torch.testing.assert_close(out, _logits(conv, ids, "reference"), atol=1e-4, rtol=1e-4)


@requires_triton
class _LaunchSpy:
    """Stands in for a Triton kernel: records the UPCAST each launch gets, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.upcast: list[bool] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.upcast.append(kwargs["UPCAST"])
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spy_kernels(monkeypatch) -> list[_LaunchSpy]:
    from moeify.kernels import triton_moe

    spies = [_LaunchSpy(triton_moe._gate_up_kernel), _LaunchSpy(triton_moe._down_kernel)]
    monkeypatch.setattr(triton_moe, "_gate_up_kernel", spies[0])
    monkeypatch.setattr(triton_moe, "_down_kernel", spies[1])
    return spies


def _expected_upcast(dtype: torch.dtype) -> bool:
    # Under TRITON_INTERPRET=1 bfloat16 cannot run as compiled: Triton's interpreter (3.9) keeps bf16
    # tensors as their uint16 bit patterns and its tl.dot is np.matmul on those integers (garbage of
    # order 1e10), so triton_moe widens bf16 operands to float32 there, which gives the same products.
    # float16 is a numpy type: it runs the half-precision kernels exactly as compiled for a GPU
    # (UPCAST=False), so the float16 cases below are the half-precision kernel path under test.
    # On a GPU neither dtype is widened.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_precision_equals_reference(dtype, monkeypatch):
    spies = _spy_kernels(monkeypatch)
    _check(_block(sizes=(20, 25, 18), shared=6, top_k=2, router="linear", compensate=True), _triton_forward(), 9, dtype=dtype, atol=3e-2)
    assert all(s.upcast == [_expected_upcast(dtype)] for s in spies)  # one launch each, with the real kernel for fp16


@requires_triton
@pytest.mark.parametrize("name", ["all-active-cmoe-gate", "top40-scales"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_precision_accumulates_in_float32(name, dtype, monkeypatch):
    spies = _spy_kernels(monkeypatch)
    _, block = integer_block(**INTEGER_BLOCKS[name], dtype=dtype)
    x = integer_inputs(9, dtype=dtype)
    exact = assert_sums_need_float32(block, x)  # a bfloat16 accumulator misses this sum by several units
    with torch.no_grad():
        out = _triton_forward()(block, x)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), exact), (out.double() - exact).abs().max()
    assert all(s.upcast == [_expected_upcast(dtype)] for s in spies)


@requires_triton
def test_triton_refuses_an_activation_it_has_no_fused_form_for():
    block = _block(router="linear", act="silu")
    block.act = "quick_gelu"
    with pytest.raises(InputError, match="no fused 'quick_gelu' activation"):
        _triton_forward()(block, _x(2))


@requires_triton
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
