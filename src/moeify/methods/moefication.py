"""MoEfication (Zhang et al. 2022): experts from clustered W_gate rows, a similarity or a small learned router.

Per layer (../shared/docs/methods.md §5):

1. Experts: balanced k-means on the unit-normalised rows of W_gate into E groups of
   exactly d_h / E neurons (sizes differ by one neuron when E does not divide d_h).
   The equal-size assignment is the exact linear assignment of
   `cmoe.balanced_assignment`; the E initial centroids are rows drawn with the seed.
   No calibration data is needed for the split.
2. Router, top-k of E, unit weights (so the block is the dense MLP with every expert on):
   * "centroid": s_j(x) = x . c_j with c_j the mean of expert j's normalised gate rows
     (training-free);
   * "mlp" (default): Linear(H, 4E) - Tanh - Linear(4E, E), trained with BCE on the
     calibration hidden states to predict, per token, which experts are among the top-k
     by activation mass m_j(x) = sum_{i in j} |h_i(x)|. MoEfication's ReLU models use the
     positive activations; for gated MLPs |h| is the analogue, since a negative h_i
     contributes to the output as much as a positive one. Inputs are standardised for
     training and the standardisation is folded into the first layer, so the saved
     router reads raw hidden states. Adam, seeded init and batch order: deterministic.

The helpers here (`resolve_active`, `train_mlp_router`, `finish_plan`) are shared by
the LLaMA-MoE splits and ExpertWeaver.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch

from ..calibration.profile import CalibratedPlan, check_finite_output, hidden_activations
from ..config import MethodConfig
from ..errors import InputError
from ..moe import ROUTERS as ROUTER_MODULES
from ..moe import GatedWeights
from ..plan import LayerPlan
from .cmoe import balanced_kmeans
from .layout import Layout

log = logging.getLogger("moeify")

ROUTERS = ("mlp", "centroid")


# --------------------------------------------------------------------------- shared helpers


def resolve_active(experts: int, active: int | None, fraction: float | None, method: str, default_fraction: float = 0.5,
                   unit: str = "experts", min_active: int = 1, why: str = "") -> int:
    """Active experts per token from an explicit count or an active fraction that must be a multiple of 1/experts.

    min_active: the fewest active experts the method can build (why: the reason, for the error message).
    """
    if int(experts) != experts or experts < 1:
        raise InputError(f"{method}: experts must be a positive integer, got {experts}.")
    if active is not None and fraction is not None:
        if abs(float(fraction) * experts - active) > 1e-6:  # both are stored in a saved config, so consistent pairs are fine
            raise InputError(f"{method}: active={active} and fraction={fraction} disagree ({active}/{experts} = {active / experts:g}); "
                             "give only one of them.")
        fraction = None
    if active is None:
        f = default_fraction if fraction is None else float(fraction)
        if not 0.0 < f <= 1.0:
            raise InputError(f"{method}: the active fraction must be in (0, 1]; got {f}.")
        k = f * experts
        if abs(k - round(k)) > 1e-6 or round(k) < min_active:
            lo, hi = max(min_active, math.floor(k)), min(experts, max(min_active, math.ceil(k)))
            near = min((lo, hi), key=lambda j: (abs(j / experts - f), -j))
            reason = (f"{f:g} x {experts} = {k:g} is not a whole number of {unit}" if abs(k - round(k)) > 1e-6
                      else f"at least {min_active} of {experts} must be active{why}")
            raise InputError(
                f"{method}: an active fraction of {f:g} is not reachable with {experts} {unit} ({reason}); the nearest "
                f"reachable fraction is {near / experts:g} ({near} of {experts}); reachable fractions are multiples of 1/{experts}"
                + (f" from {min_active / experts:g}" if min_active > 1 else "") + "."
            )
        active = int(round(k))
    if int(active) != active or not min_active <= active <= experts:
        raise InputError(f"{method}: active {unit} must be between {min_active} and {experts}{why}, got {active}.")
    return int(active)


def check_experts_fit(experts: int, intermediate_sizes: list[int], method: str) -> None:
    for i, d_h in enumerate(intermediate_sizes):
        if d_h and experts > d_h:
            raise InputError(f"{method}: layer {i} has an intermediate size of {d_h}, fewer neurons than the {experts} experts "
                             f"asked for; use at most {d_h} experts.")


def seeded_init(n: int, k: int, seed: int, layer: int) -> np.ndarray:
    """k distinct item indices for initial centroids, reproducible per (seed, layer)."""
    return np.random.default_rng([seed, layer]).choice(n, size=k, replace=False)


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


@torch.no_grad()
def finish_plan(w: GatedWeights, x: torch.Tensor, h: torch.Tensor, plan: LayerPlan, router_state: dict | None,
                info: dict[str, Any], layer: int) -> CalibratedPlan:
    """F_moe on the calibration tokens (the next layer's input) and its error, from h: no second gate/up pass.

    F_moe(x) = W_down (h(x) * g(x)) with g_i(x) = 1 for shared neurons and the gate weight of neuron i's expert
    when the router selects it (0 otherwise): the block's definition with the neuron sums regrouped.
    """
    plan.validate(w.intermediate_size, layer=layer)
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
    return CalibratedPlan(plan, router_state, y, dense_y, info)


# --------------------------------------------------------------------------- the method


@dataclasses.dataclass
class EqualExpertsConfig(MethodConfig):
    """Settings shared by MoEfication and the LLaMA-MoE splits: E equal-size experts, top-`active`
    (or `fraction` of E) per token, balanced k-means iterations, the seed and the MLP router's training."""

    routers = ("mlp", "centroid")  # the router kinds this method accepts (a class attribute, not a field)

    experts: int = 32
    active: int | None = None
    fraction: float | None = None
    router: str = "mlp"
    max_iters: int = 10
    seed: int = 0
    router_hidden: int | None = None
    router_steps: int = 200
    router_batch: int = 512
    router_lr: float = 5e-3

    def __post_init__(self) -> None:
        self.active = resolve_active(self.experts, self.active, self.fraction, self.method)
        self.fraction = self.active / self.experts
        if self.router not in self.routers:
            raise InputError(f"{self.method} router must be one of {', '.join(self.routers)}; got {self.router!r}.")
        if int(self.max_iters) != self.max_iters or self.max_iters < 1:
            raise InputError(f"max_iters must be >= 1, got {self.max_iters}.")
        for name in ("router_steps", "router_batch"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v}.")
        if not self.router_lr > 0:
            raise InputError(f"router_lr must be positive, got {self.router_lr}.")
        if self.router_hidden is not None and (int(self.router_hidden) != self.router_hidden or self.router_hidden < 1):
            raise InputError(f"router_hidden must be a positive integer, got {self.router_hidden}.")

    def check(self, intermediate_sizes: list[int]) -> None:
        check_experts_fit(self.experts, intermediate_sizes, self.method)


@dataclasses.dataclass
class MoEficationConfig(EqualExpertsConfig):
    """E experts from balanced k-means on normalised W_gate rows; top-`active` (or `fraction` of E) per token."""

    method = "moefication"
    needs_calibration = True
    routers = ROUTERS

    def plan_from_activations(self, w: GatedWeights, x: torch.Tensor, layer: int) -> CalibratedPlan:
        return plan_moefication(w, x, self, layer)


def cluster_rows(rows: torch.Tensor, experts: int, seed: int, layer: int, max_iters: int) -> tuple[list[np.ndarray], int]:
    """Balanced k-means of neuron feature rows into `experts` groups of equal size (+-1); neuron ids per group."""
    n = rows.shape[0]
    _, sizes = Layout(0, 1, experts).sizes(n)
    assign, _, iters = balanced_kmeans(rows, sizes, seeded_init(n, experts, seed, layer), max_iters)
    return [np.flatnonzero(assign == j) for j in range(experts)], iters


def plan_moefication(w: GatedWeights, x: torch.Tensor, cfg: MoEficationConfig, layer: int) -> CalibratedPlan:
    x = x.reshape(-1, w.hidden_size)
    if x.shape[0] < 1:
        raise InputError(f"layer {layer}: no calibration tokens reached this MLP.")
    rows = torch.nn.functional.normalize(w.gate.float(), dim=-1)
    experts, iters = cluster_rows(rows, cfg.experts, cfg.seed, layer, cfg.max_iters)
    h = hidden_activations(w, x)
    if cfg.router == "mlp" and cfg.active < cfg.experts:
        router, state = mlp_router_for(x, h, experts, cfg.active, cfg, layer)
    else:
        router, state = centroid_router_for(w, experts)
    plan = LayerPlan(shared=np.zeros(0, dtype=np.int64), experts=experts, top_k=cfg.active, router=router)
    info = {"tokens": int(x.shape[0]), "cluster_iterations": iters}
    return finish_plan(w, x, h, plan, state, info, layer)
