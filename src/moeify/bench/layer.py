"""One MoE layer against the dense MLP it came from, on random weights of a given shape.

`compare_layer` times the dense gated MLP (the framework's matmuls: MKL / cuBLAS) and its
MoE block on the same inputs, interleaved, for several token counts, next to the FLOP
limit (shared + top-k experts + router) and the bytes limit (the experts the tokens
actually touch). Random routers route uniformly, which flatters an MoE; `SkewedRouter`
draws the selection from the expert loads measured on a real converted model.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from .. import kernels
from ..blocks.moe import MoEMLP
from ..blocks.routers import Router
from ..core.dense import GatedWeights
from ..core.layout import check_layout_fits, parse_layout
from ..core.plan import LayerPlan
from ..errors import InputError
from ..models.checkpoint import parse_dtype
from .stats import speedup, summarize
from .timing import sync

log = logging.getLogger("moeify")


class SkewedRouter(Router):
    """The CMoE analytical router's computation, with the selection drawn from a skewed distribution.

    Random weights route uniformly, which flatters an MoE (perfect load balance). Expert
    popularity here is p_j proportional to exp(-beta j); each token draws its k experts
    without replacement (Gumbel top-k, i.e. Plackett-Luce), and the draw is added to the
    router's scores with a weight that makes it decide. beta = 0.43 reproduces the sorted
    expert loads measured on SmolLM2 converted by CMoE at S1A1E8 (held-out Austen text:
    2.84, 1.56, 0.94, 0.66, 0.46, 0.33, 0.21 x the mean load).
    """

    def __init__(self, inner: nn.Module, num_experts: int, beta: float, seed: int):
        super().__init__()
        self.inner = inner
        self.num_experts = num_experts
        self.beta = beta
        self.seed = seed
        self.draw: torch.Tensor | None = None

    def prepare(self, tokens: int, device) -> None:
        g = torch.Generator().manual_seed(self.seed)
        logp = -self.beta * torch.arange(self.num_experts, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(torch.rand(tokens, self.num_experts, generator=g).clamp_(1e-10, 1 - 1e-7)))
        self.draw = ((logp + gumbel) * 1e4).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.draw[: x.shape[0]]


SKEW_BETA = 0.43


def build_layer(hidden: int, intermediate: int, layout: str, *, act: str = "silu", router_neurons: int = 8, beta: float = SKEW_BETA,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """(dense MLP as GatedWeights, MoEMLP) with random weights; the MoE's router is CMoE's, its routing skewed."""
    lay = parse_layout(layout)
    check_layout_fits(lay, [intermediate])
    if hidden < 1 or intermediate < 1:
        raise InputError(f"hidden and intermediate sizes must be positive, got {hidden} and {intermediate}.")
    g = torch.Generator().manual_seed(seed)
    w = GatedWeights(
        gate=torch.randn(intermediate, hidden, generator=g) / math.sqrt(hidden),
        up=torch.randn(intermediate, hidden, generator=g) / math.sqrt(hidden),
        down=torch.randn(hidden, intermediate, generator=g) / math.sqrt(intermediate),
        act=act,
    )
    shared, sizes = lay.sizes(intermediate)
    bounds = [shared]
    for m in sizes:
        bounds.append(bounds[-1] + m)
    experts = [list(range(bounds[j], bounds[j + 1])) for j in range(len(sizes))]
    n_rep = min(router_neurons, min(sizes)) if sizes else 0
    router = {"type": "analytical", "neurons": n_rep * len(sizes), "absolute": True} if sizes else {"type": "static"}
    plan = LayerPlan(shared=list(range(shared)), experts=experts, top_k=lay.active if sizes else 0, router=router)
    state = None
    if sizes:
        rep = torch.tensor([e[i] for e in experts for i in range(n_rep)])
        combine = torch.zeros(len(sizes), n_rep * len(sizes))
        for j in range(len(sizes)):
            combine[j, j * n_rep : (j + 1) * n_rep] = w.down[:, rep[j * n_rep : (j + 1) * n_rep]].norm(dim=0)
        state = {"gate_up": torch.cat([w.gate[rep], w.up[rep]]), "combine": combine}
    block = MoEMLP.from_dense(w, plan, state)
    if sizes and lay.active < len(sizes):
        block.router = SkewedRouter(block.router, len(sizes), beta, seed)
    w = GatedWeights(gate=w.gate.to(device, dtype), up=w.up.to(device, dtype), down=w.down.to(device, dtype), act=act)
    block = block.to(device=device, dtype=dtype)
    block.expert_scale.data = block.expert_scale.data.float()
    return w, block, lay


def _time_call(fn: Callable[[], Any], device: torch.device, min_seconds: float) -> tuple[float, int]:
    """Seconds per call, calling fn enough times to fill min_seconds (so small shapes are timed well)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    n = max(1, min(1000, int(min_seconds / max(once, 1e-7))))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n, n


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """fn captured in a CUDA graph (launch overhead out of the way); fn itself if capture fails."""
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as e:  # some op could not be captured: time it eagerly, and say so
        log.warning("CUDA graph capture failed (%s); timing eagerly", e)
        return fn


@torch.no_grad()
def compare_layer(
    hidden: int,
    intermediate: int,
    layout: str,
    tokens: list[int],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 7,
    act: str = "silu",
    router_neurons: int = 8,
    beta: float = SKEW_BETA,
    kernel: str = "auto",
    cuda_graphs: bool = False,
    min_seconds: float = 0.05,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One dense gated MLP (the framework's matmuls: MKL / cuBLAS) vs its MoE block, on random weights."""
    dt = parse_dtype(dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but torch sees no CUDA GPU; use --device cpu.")
    if not tokens or any(t < 1 for t in tokens):
        raise InputError(f"tokens must be positive integers, got {tokens}.")
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}.")
    w, block, lay = build_layer(hidden, intermediate, layout, act=act, router_neurons=router_neurons, beta=beta, dtype=dt, device=dev, seed=seed)
    kernels.use(block, kernel)
    act_fn = block.act_fn
    gate_w, up_w, down_w = w.gate, w.up, w.down

    def dense(x):
        return torch.nn.functional.linear(act_fn(torch.nn.functional.linear(x, gate_w)) * torch.nn.functional.linear(x, up_w), down_w)

    H, I = hidden, intermediate
    shared, sizes = lay.sizes(I)
    router_params = sum(p.numel() for p in block.router.parameters())
    k = block.top_k if sizes else 0
    dense_flops = 2.0 * 3 * H * I
    moe_flops = 2.0 * (3 * H * (shared + (sum(sizes) if block.all_active() else k * sum(sizes) / max(len(sizes), 1))) + router_params)
    rows = []
    g = torch.Generator().manual_seed(seed + 1)
    for T in tokens:
        x = torch.randn(T, H, generator=g).to(dev, dt)
        if isinstance(block.router, SkewedRouter):
            block.router.prepare(T, dev)
        touched = load = None
        if sizes and not block.all_active():
            idx = (block.router(x) + block.selection_bias.float()).topk(k, dim=-1).indices
            counts = torch.bincount(idx.reshape(-1).cpu(), minlength=len(sizes)).double()
            touched = int((counts > 0).sum())
            load = sorted((counts / counts.mean()).tolist(), reverse=True)
        n_experts_read = len(sizes) if block.all_active() else (touched or 0)
        moe_bytes_params = 3 * H * (shared + (sum(sizes) / max(len(sizes), 1)) * n_experts_read) + router_params
        fd, fm = (lambda: dense(x)), (lambda: block(x))
        if cuda_graphs and dev.type == "cuda":
            fd, fm = _graphed(fd, dev), _graphed(fm, dev)
        for _ in range(2):
            fd(), fm()
        td, tm = [], []
        for r in range(repeats):
            for name in (("dense", "moe") if r % 2 == 0 else ("moe", "dense")):
                if name == "dense":
                    td.append(_time_call(fd, dev, min_seconds)[0])
                else:
                    tm.append(_time_call(fm, dev, min_seconds)[0])
        flop_limit = dense_flops / moe_flops
        row = {
            "tokens": T,
            "dense_ms": summarize([t * 1e3 for t in td]),
            "moe_ms": summarize([t * 1e3 for t in tm]),
            **speedup(td, tm, False, flop_limit, "active FLOPs (shared + top-k experts + router)"),
            "bytes_limit": (3 * H * I) / moe_bytes_params,
            "experts_touched": touched,
            "expert_load_sorted": load,
        }
        rows.append(row)
        if progress:
            progress(f"T={T}: dense {row['dense_ms']['median']:.3f} ms, moe {row['moe_ms']['median']:.3f} ms, "
                     f"speedup {row['speedup']:.2f} (FLOP limit {flop_limit:.2f})")
    return {
        "shape": {"hidden": H, "intermediate": I, "layout": str(lay), "shared_neurons": shared, "expert_sizes": sizes, "top_k": k,
                  "router": block.layer_config.get("router"), "router_params": router_params, "act": act},
        "routing": {"distribution": f"Plackett-Luce, p_j ~ exp(-{beta} j) (SmolLM2 CMoE-S1A1E8 loads)", "beta": beta} if sizes and not block.all_active() else None,
        "settings": {"dtype": dtype, "device": str(dev), "repeats": repeats, "kernel": kernel, "cuda_graphs": cuda_graphs and dev.type == "cuda",
                     "threads": torch.get_num_threads(), "min_seconds_per_measurement": min_seconds, "seed": seed,
                     "interleaved": "dense/moe order alternates every repetition"},
        "rows": rows,
    }
