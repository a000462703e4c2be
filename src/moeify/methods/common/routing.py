"""Routers the methods fit, and the selections they make on calibration tokens.

* `analytical_router_for`: CMoE's router, the MLP restricted to a few neurons per
  expert, weighted by ||W_down[:, i]|| (LLaMA-MoE's analytical split router);
* `mlp_router_for` / `train_mlp_router`: MoEfication's Linear-Tanh-Linear router
  trained with BCE on the top-k experts by activation mass;
* `centroid_router_for`: s_j(x) = x . c_j, c_j = mean normalised gate row of expert j;
* `topk_mask`, `expert_mass`: per-token selections and expert activation mass;
* `finish_plan`: F_moe on the calibration tokens for a plan + router, from h (no second
  gate/up pass), and its calibration error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...blocks.routers import ROUTERS as ROUTER_MODULES
from ...core.dense import GatedWeights, check_finite_output
from ...core.method import LayerResult
from ...core.plan import LayerPlan
from .clustering import order_desc


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores).scatter_(1, idx, 1.0)


def expert_mass(h: torch.Tensor, experts: list[np.ndarray]) -> torch.Tensor:
    """m_j(x) = sum_{i in expert j} |h_i(x)|: [T, E], one scatter-add over neurons."""
    owner = torch.empty(h.shape[1], dtype=torch.long)
    for j, e in enumerate(experts):
        owner[torch.as_tensor(e)] = j
    routed = torch.as_tensor(np.concatenate(experts))
    out = torch.zeros(h.shape[0], len(experts))
    return out.index_add_(1, owner[routed], h[:, routed].abs())


def train_mlp_router(x: torch.Tensor, labels: torch.Tensor, hidden: int, *, steps: int, batch: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
    """Linear-Tanh-Linear router trained with BCE on (x [T, H], labels [T, E] in {0, 1}); MLPRouter state."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    T, H = x.shape
    E = labels.shape[1]
    mu = x.mean(0)
    sd = x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w1 = (torch.randn(hidden, H, generator=g) / math.sqrt(H)).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(E, hidden, generator=g) / math.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros(E, requires_grad=True)
    params = [w1, b1, w2, b2]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    bs = min(batch, T)
    threads = torch.get_num_threads()
    # these small matmuls are dominated by thread synchronisation (one thread is several times faster on a
    # busy machine), and a fixed thread count keeps the trained router identical whatever the caller's setting
    torch.set_num_threads(1)
    try:
        _adam_steps(xs, labels, params, opt, sched, steps, bs, g)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        w1f = w1 / sd  # fold the standardisation into the first layer: w1 ((x - mu) / sd) = (w1 / sd) x - (w1 / sd) mu
        b1f = b1 - w1f @ mu
    return {"w1": w1f.detach(), "b1": b1f.detach(), "w2": w2.detach(), "b2": b2.detach()}


def _adam_steps(xs, labels, params, opt, sched, steps, bs, g) -> None:
    w1, b1, w2, b2 = params
    T = xs.shape[0]
    with torch.enable_grad():  # the calibration pipeline runs under no_grad
        for _ in range(steps):
            idx = torch.randint(0, T, (bs,), generator=g)
            logits = torch.tanh(xs[idx] @ w1.T + b1) @ w2.T + b2
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def mlp_router_for(x: torch.Tensor, h: torch.Tensor, experts: list[np.ndarray], top_k: int, cfg, layer: int) -> tuple[dict, dict]:
    """(router spec, router state) of a trained Linear-Tanh-Linear router (MoEfication's)."""
    width = int(cfg.router_hidden or 4 * len(experts))
    labels = topk_mask(expert_mass(h, experts), top_k)
    state = train_mlp_router(x, labels, width, steps=cfg.router_steps, batch=cfg.router_batch, lr=cfg.router_lr,
                             seed=int(cfg.seed) * 1000 + layer)
    return {"type": "mlp", "hidden": width}, state


def centroid_router_for(w: GatedWeights, experts: list[np.ndarray]) -> tuple[dict, dict]:
    rows = torch.nn.functional.normalize(w.gate.float(), dim=-1)
    weight = torch.stack([rows[torch.as_tensor(e)].mean(0) for e in experts])
    return {"type": "linear"}, {"weight": weight}


def analytical_router_for(w: GatedWeights, h: torch.Tensor, experts: list[np.ndarray], neurons: int) -> tuple[dict, dict]:
    down_norm = w.down.float().norm(dim=0)
    mean_contrib = (h.abs().mean(0) * down_norm).double().numpy()
    reps = [e[order_desc(mean_contrib[e])[: min(neurons, e.size)]] for e in experts]
    rep = torch.as_tensor(np.concatenate(reps))
    owner = torch.as_tensor(np.repeat(np.arange(len(experts)), [r.size for r in reps]))
    combine = torch.zeros(len(experts), rep.numel())
    combine[owner, torch.arange(rep.numel())] = down_norm[rep]
    state = {"gate_up": torch.cat([w.gate[rep], w.up[rep]]).float(), "combine": combine}
    return {"type": "analytical", "neurons": int(rep.numel()), "absolute": True, "normalize": False}, state


@torch.no_grad()
def finish_plan(w: GatedWeights, x: torch.Tensor, h: torch.Tensor, plan: LayerPlan, router_state: dict | None,
                info: dict[str, Any], layer: int) -> LayerResult:
    """F_moe on the calibration tokens (the next layer's input) and its error, from h: no second gate/up pass.

    F_moe(x) = W_down (h(x) * g(x)) with g_i(x) = 1 for shared neurons and the gate weight of neuron i's expert
    when the router selects it (0 otherwise): the block's definition with the neuron sums regrouped.
    """
    down = w.down.float()
    dense_y = h @ down.T
    check_finite_output(dense_y, layer)
    N = plan.num_experts
    if N and plan.top_k < N:
        router = ROUTER_MODULES[plan.router["type"]](N, w.hidden_size, plan.router, w.act)
        router.load_state_dict({k: v.float() for k, v in router_state.items()}, strict=False)
        scores = router.float()(x.float())
        idx = scores.topk(plan.top_k, dim=-1, sorted=False).indices
        gates = scores.softmax(-1).gather(-1, idx) if plan.gate == "softmax" else torch.ones(idx.shape)
        expert_gate = torch.zeros_like(scores).scatter_(1, idx, gates)  # [T, N]
        owner = torch.empty(w.intermediate_size, dtype=torch.long)
        for j, e in enumerate(plan.experts):
            owner[torch.as_tensor(e)] = j
        routed = torch.as_tensor(plan.routed_index)
        g = torch.zeros_like(h)
        g[:, routed] = expert_gate[:, owner[routed]]
        if plan.shared.size:
            g[:, torch.as_tensor(plan.shared)] = 1.0
        y = (h * g) @ down.T
    else:
        y = dense_y.clone()
    info["calibration_error"] = float((dense_y - y).norm() / dense_y.norm().clamp_min(1e-30))
    return LayerResult(plan, router_state, y, dense_y, info)
