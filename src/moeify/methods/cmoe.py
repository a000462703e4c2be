"""CMoE (arXiv 2502.04416): activation-rate profiling, shared experts, balanced
clustering by linear assignment, an analytical router (docs/methods.md §2).

Per layer, on the MLP inputs X of the calibration tokens:

1. h = act(X W_gate^T) * (X W_up^T); per token mark the K_a neurons with the largest
   |h_i| ("real", the paper) or the reference code's cosine surrogate ("cosine").
   Activation rate mu_i = share of tokens that mark neuron i.
2. Shared expert: the S*m (+ remainder) neurons with the highest mu ("rate", the paper)
   or the highest mean contribution |h_i| * ||W_down[:, i]|| ("contribution").
3. Routed experts: balanced clustering of the remaining neurons into groups of exactly
   m. Features: the binary mark columns ("marks", the paper: L2 = Hamming) or the
   unit-normalised contribution columns ("contribution"). Initial centroids: the
   routed neurons with the highest mu; assignment = a linear assignment problem with
   each centroid repeated m times (scipy's Jonker-Volgenant); centroids = cluster
   means; iterated until no assignment changes (max_iters; the reference stops after 1).
4. Router, on the MLP restricted to a few neurons of each expert:
   "representative" (paper): s_j = h_{R_j}(x), R_j = the member closest to the centroid;
   "multi": s_j = sum_{i in R_j} |h_i(x)| ||W_down[:, i]|| over the r members with the
   largest mean contribution (an estimate of ||E_j(x)|| from a sample of its neurons);
   "fitted": the same features with weights fitted in closed form (ridge least squares
   on the calibration tokens) to the true expert output norms ||E_j(x)||.
5. Unit gates (the block is exact when every expert is active); gate="cmoe" adds the
   paper's fine-tuning form g_j = 1 + softmax(s)_j u_j with u = 0.
6. compensate: each unselected expert adds its mean output over the calibration tokens
   that did not select it (the least-squares constant stand-in for a dropped expert);
   nothing changes when every expert is active.

Variants bundle the choices: "paper" (real marking, rate, marks, iterated,
representative router), "reference" (the public code: cosine marking, one
assignment, |s| with unit-normalised rows and input) and "moeify" (the default:
the paper's marking and shared expert + contribution clustering + fitted router +
compensation, each measured separately in the README).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from ..core.dense import GatedWeights, activation, check_finite_output
from ..core.layout import Layout, check_layout_fits, parse_layout
from ..core.method import Laps, LayerResult, multiple_of, option, positive_int
from ..core.plan import LayerPlan
from ..errors import InputError
from .common import LayoutConfig, activation_rates, balanced_kmeans, order_desc, topk_mask

log = logging.getLogger("moeify")

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": dict(marking="real", shared_by="rate", features="marks", max_iters=20, router="representative", absolute=False, normalize=False, compensate=False),
    "reference": dict(marking="cosine", shared_by="rate", features="marks", max_iters=1, router="representative", absolute=True, normalize=True, compensate=False),
    "moeify": dict(marking="real", shared_by="rate", features="contribution", max_iters=20, router="fitted", absolute=True, normalize=False, compensate=True),
}
FRACTION_LAYOUTS = {0.75: "S3A3E8", 0.5: "S1A3E8", 0.25: "S1A1E8"}  # the layouts of the CMoE paper's tables
CHOICES = {
    "marking": ("real", "cosine"),
    "shared_by": ("rate", "contribution"),
    "features": ("marks", "contribution"),
    "router": ("representative", "multi", "fitted"),
    "gate": ("unit", "cmoe"),
    "solver": ("auto", "paths", "scipy"),
}


@dataclasses.dataclass
class CMoEConfig(LayoutConfig):
    """CMoE conversion. layout 'SxAyEz' (or shared/active/experts); variant picks defaults for the rest."""

    method = "cmoe"
    needs_calibration = True

    variant: str = option("moeify", 'moeify (default, measured improvements) | paper | reference')
    marking: str | None = option(None, 'real | cosine (default from the variant)')
    shared_by: str | None = option(None, 'rate | contribution (default from the variant)')
    features: str | None = option(None, 'marks | contribution (default from the variant)')
    max_iters: int | None = option(None, 'balanced-clustering iterations cap (1 = the reference code)')
    router: str | None = option(None, 'representative | multi | fitted')
    router_neurons: int = option(8, 'neurons per expert the multi/fitted router reads')
    router_rank: int | None = option(None, 'low-rank router: read x through a data-aware projection to this many dims (default full rank)')  # low-rank router: read x through a data-aware r-dim projection
    absolute: bool | None = option(None, 'router scores on |r(x)|')
    normalize: bool | None = option(None, "the reference code's unit-normalised router input")
    compensate: bool | None = option(None, "add each unselected expert's calibration-mean output")
    ridge: float = option(1e-3, 'ridge strength of the fitted router')
    gate: str = option("unit", 'unit | cmoe (g = 1 + softmax(s) u, u = 0)')
    solver: str = option("auto", 'balanced assignment: auto | paths | scipy')

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"unknown CMoE variant {self.variant!r}; use one of {', '.join(VARIANTS)}.")
        for k, v in VARIANTS[self.variant].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        for k, allowed in CHOICES.items():
            if getattr(self, k) not in allowed:
                raise InputError(f"{k} must be one of {', '.join(allowed)}; got {getattr(self, k)!r}.")
        lay = parse_layout(self.layout, self.shared, self.active, self.experts)
        self.layout, self.shared, self.active, self.experts = str(lay), lay.shared, lay.active, lay.experts
        positive_int("k_act", self.k_act, what="K_a, neurons marked per token")
        positive_int("max_iters", self.max_iters)
        positive_int("router_neurons", self.router_neurons)
        if self.router_rank is not None:
            positive_int("router_rank", self.router_rank, what="below the hidden size, or omitted for full rank")

    @property
    def lay(self) -> Layout:
        return Layout(self.shared, self.active, self.experts)

    def check(self, intermediate_sizes: list[int]) -> None:
        check_layout_fits(self.lay, intermediate_sizes)
        for i, d_h in enumerate(intermediate_sizes):
            if d_h and self.k_act > d_h:
                raise InputError(f"layer {i}: K_a={self.k_act} marks more neurons than the {d_h} the MLP has.")

    def plan(self, weights: GatedWeights, x: torch.Tensor, layer: int, state=None) -> LayerResult:
        return plan_cmoe(weights, x, self, layer)

    @classmethod
    def for_fraction(cls, fraction: float, **opts) -> "CMoEConfig":
        """E = 8: 0.75 -> S3A3E8, 0.5 -> S1A3E8, 0.25 -> S1A1E8; other k/8 -> S1A(k-1)E8, 1/8 -> S0A1E8."""
        if "layout" in opts:
            raise InputError("compare picks the CMoE layout from the active fraction; pass other CMoE options only.")
        layout = next((lay for f, lay in FRACTION_LAYOUTS.items() if abs(f - fraction) < 1e-9), None)
        if layout is None:
            k = multiple_of(cls.method, fraction, 8, "8 experts of d_h / 8 neurons")
            layout = "S8A0E8" if k == 8 else (f"S1A{k - 1}E8" if k >= 2 else "S0A1E8")
        return cls(layout=layout, **opts)

    def describe(self) -> str:
        return str(self.layout)





# --------------------------------------------------------------------------- profiling


def cosine_scores(w: GatedWeights, x: torch.Tensor) -> torch.Tensor:
    """The reference code's marking surrogate |SiLU(x^ . g^_i) (x^ . u^_i)| with unit-normalised x and rows."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    g = torch.nn.functional.normalize(w.gate.float(), dim=-1)
    u = torch.nn.functional.normalize(w.up.float(), dim=-1)
    return (activation(w.act)(xn @ g.T) * (xn @ u.T)).abs()






# --------------------------------------------------------------------------- balanced clustering








# --------------------------------------------------------------------------- the plan


def lowrank_factors(M: torch.Tensor, x: torch.Tensor, rank: int, jitter: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [r, H], A [m, r]) minimising E_x ||M x - A P x||^2 over the tokens x [T, H].

    With Sigma = E[x x^T] = L L^T, the error is ||(M - A P) L||_F^2, so the optimum is the
    truncated SVD of M L: A = U_r S_r, P = V_r^T L^{-1} (a data-aware low-rank router input).
    """
    x = x.double()
    sigma = x.T @ x / max(x.shape[0], 1)
    sigma += jitter * sigma.diagonal().mean().clamp_min(1e-12) * torch.eye(sigma.shape[0], dtype=sigma.dtype)
    L = torch.linalg.cholesky(sigma)
    U, S, Vh = torch.linalg.svd(M.double() @ L, full_matrices=False)
    A = U[:, :rank] * S[:rank]
    P = torch.linalg.solve_triangular(L.T, Vh[:rank].T, upper=True).T
    return P.float(), A.float()





@dataclasses.dataclass
class _Parts:
    """The MLP's output on tokens, split by expert (computed from h, no second gate/up pass)."""

    shared: torch.Tensor  # [T, H]
    experts: list[torch.Tensor]  # E_j(x), [T, H] each
    norms: torch.Tensor  # ||E_j(x)|| [T, N]

    def dense(self) -> torch.Tensor:
        out = self.shared.clone()
        for e in self.experts:
            out += e
        return out

    def select(self, keep: torch.Tensor, dropped_bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.shared.clone()
        for j, e in enumerate(self.experts):
            out.addcmul_(keep[:, j : j + 1], e)
        if dropped_bias is not None:
            out += (1.0 - keep) @ dropped_bias
        return out

    def dropped_means(self, keep: torch.Tensor) -> torch.Tensor:
        """[N, H]: mean of E_j(x) over the tokens that did not select expert j (0 if every token did)."""
        drop = 1.0 - keep
        sums = torch.stack([drop[:, j] @ e for j, e in enumerate(self.experts)])
        return sums / drop.sum(0).clamp_min(1.0)[:, None]


def _parts(h: torch.Tensor, down: torch.Tensor, shared: np.ndarray, experts: list[np.ndarray]) -> _Parts:
    T = h.shape[0]
    gathered = h.new_empty(T * max([shared.size] + [e.size for e in experts]))  # one buffer for every expert's h columns

    def part(idx):
        i = torch.as_tensor(idx)
        return torch.index_select(h, 1, i, out=gathered[: T * i.numel()].view(T, i.numel())) @ down[:, i].T

    sh = part(shared) if shared.size else h.new_zeros(h.shape[0], down.shape[0])
    ex = [part(e) for e in experts]
    return _Parts(sh, ex, torch.stack([e.norm(dim=-1) for e in ex], dim=-1))




def plan_cmoe(w: GatedWeights, x: torch.Tensor, cfg: CMoEConfig, layer: int) -> LayerResult:
    d_h = w.intermediate_size
    x = x.reshape(-1, w.hidden_size)
    T = x.shape[0]
    if T < 1:
        raise InputError(f"layer {layer}: no calibration tokens reached this MLP.")
    lay = cfg.lay
    n_shared, sizes = lay.sizes(d_h)
    N = len(sizes)
    lap = Laps()
    h = w.hidden(x)
    down = w.down.float()
    down_norm = down.norm(dim=0)  # ||W_down[:, i]||
    k_act = min(cfg.k_act, d_h)
    if cfg.marking == "real":
        contrib = h.abs()
        marks = contrib.topk(k_act, dim=-1, sorted=False).indices
    else:
        marks = cosine_scores(w, x).topk(k_act, dim=-1, sorted=False).indices
        contrib = h.abs()
    contrib.mul_(down_norm)  # |h_i| ||d_i||
    rate = activation_rates(marks, d_h).numpy()
    mean_contrib = contrib.mean(0).double().numpy()
    if not np.isfinite(mean_contrib).all():  # NaN/inf anywhere in h shows up in its column means
        check_finite_output(h.new_full((1,), float("nan")), layer)

    shared_key = rate if cfg.shared_by == "rate" else mean_contrib
    tie = mean_contrib if cfg.shared_by == "rate" else rate
    order = np.lexsort((np.arange(d_h), -tie, -shared_key))
    shared = np.sort(order[:n_shared])
    routed = order[n_shared:]  # by decreasing key: the first N are the initial centroids
    info: dict[str, Any] = {"tokens": T, "plan_seconds": lap.seconds}
    lap("profile")

    if N == 0:
        plan = LayerPlan(shared=shared, experts=[], top_k=0, gate="unit")
        y = h @ down.T
        check_finite_output(y, layer)
        return LayerResult(plan, None, y, y, info)

    routed_t = torch.as_tensor(routed)
    if cfg.features == "marks":
        col = torch.full((d_h,), -1, dtype=torch.long)
        col[routed_t] = torch.arange(routed.size)
        feats = torch.zeros(routed.size, T)
        tok = torch.arange(T)[:, None].expand_as(marks)
        keep = col[marks] >= 0
        feats[col[marks][keep], tok[keep]] = 1.0
    else:  # unit rows of |h_i| ||d_i|| over the tokens (no [T, routed] copy)
        feats = contrib.new_empty(routed.size, T)
        # gathered and transposed 256 tokens at a time (cache-sized blocks: ~2x faster), through one reused block
        # (a fresh 1.2 MB block per step would be fresh pages every time: the streamed pipeline maps such blocks anew)
        block = contrib.new_empty(256, routed.size)
        for a in range(0, T, 256):
            b = block[: min(256, T - a)]
            torch.index_select(contrib[a : a + 256], 1, routed_t, out=b)
            feats[:, a : a + 256].copy_(b.T)
        feats.div_(feats.norm(dim=1, keepdim=True).clamp_min(1e-12))  # = F.normalize(dim=1), without its extra copies
    del contrib
    lap("features")
    assign, cent, iters = balanced_kmeans(feats, sizes, np.arange(N), cfg.max_iters, cfg.solver)
    lap("clustering")
    info["cluster_iterations"] = iters
    experts = [np.sort(routed[assign == j]) for j in range(N)]

    # router neurons
    reps: list[np.ndarray] = []
    if cfg.router == "representative":
        dist = ((feats - cent[torch.as_tensor(assign)]) ** 2).sum(1).numpy()  # distance to own centroid
        for j in range(N):
            members = np.flatnonzero(assign == j)
            best = members[np.lexsort((routed[members], dist[members]))[0]]
            reps.append(np.array([routed[best]]))
    else:
        for e in experts:
            r = min(cfg.router_neurons, e.size)
            reps.append(e[order_desc(mean_contrib[e])[:r]])
    del feats
    rep_idx = np.concatenate(reps)
    n_rep = rep_idx.size
    owner = np.repeat(np.arange(N), [r.size for r in reps])
    rep_t = torch.as_tensor(rep_idx)
    combine = torch.zeros(N, n_rep)
    if cfg.router == "representative":
        combine[torch.arange(N), torch.arange(N)] = 1.0
    else:
        combine[torch.as_tensor(owner), torch.arange(n_rep)] = down_norm[rep_t]

    lap("router")
    parts = _parts(h, down, shared, experts)
    dense_y = parts.dense()
    check_finite_output(dense_y, layer)
    lap("outputs")
    gate_rows, up_rows = w.gate.float()[rep_t], w.up.float()[rep_t]
    if cfg.normalize:
        gate_rows = torch.nn.functional.normalize(gate_rows, dim=-1)
        up_rows = torch.nn.functional.normalize(up_rows, dim=-1)
    proj = None
    if cfg.router_rank:
        if cfg.router_rank >= w.hidden_size:
            raise InputError(f"router_rank={cfg.router_rank} must be below the hidden size {w.hidden_size}; omit it for a full-rank router.")
        xr = torch.nn.functional.normalize(x.float(), dim=-1) if cfg.normalize else x.float()
        proj, low = lowrank_factors(torch.cat([gate_rows, up_rows]), xr, cfg.router_rank)
        gate_rows, up_rows = low[:n_rep], low[n_rep:]

    def router_neurons(h_, x_):
        """act(G_R x) * (U_R x) for the router neurons (from h when the router reads x unchanged)."""
        if not cfg.normalize and proj is None:
            return h_[:, rep_t]
        xr_ = torch.nn.functional.normalize(x_.float(), dim=-1) if cfg.normalize else x_.float()
        if proj is not None:
            xr_ = xr_ @ proj.T
        return activation(w.act)(xr_ @ gate_rows.T) * (xr_ @ up_rows.T)

    if cfg.router == "fitted":
        # closed-form ridge fit of ||E_j(x)|| on |r_i(x)| ||d_i|| of expert j's router neurons
        # features of all router neurons at once; expert j's are the columns bounds[j]:bounds[j+1] (reps are grouped by expert)
        phi = router_neurons(h, x).abs_().mul_(down_norm[rep_t]).double()  # router_neurons returns a new tensor
        bounds = np.concatenate([[0], np.cumsum([r.size for r in reps])])
        for j in range(N):
            cols = torch.arange(int(bounds[j]), int(bounds[j + 1]))
            Phi = phi[:, int(bounds[j]) : int(bounds[j + 1])]
            A = Phi.T @ Phi
            lam = cfg.ridge * A.diagonal().mean().clamp_min(1e-12)
            coef = torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), Phi.T @ parts.norms[:, j].double())
            # the router scores |r| @ combine^T, so weights on |r_i| ||d_i|| become coef_i ||d_i||
            combine[j, cols] = coef.float() * down_norm[rep_t[cols]]
        del phi
    lap("router")

    router_state = {"gate_up": torch.cat([gate_rows, up_rows]).to(w.gate.dtype), "combine": combine}
    router = {"type": "analytical", "neurons": int(n_rep), "absolute": bool(cfg.absolute), "normalize": bool(cfg.normalize)}
    if proj is not None:
        router_state["proj"] = proj.to(w.gate.dtype)
        router["rank"] = int(cfg.router_rank)
    compensate = bool(cfg.compensate) and lay.active < N
    plan = LayerPlan(shared=shared, experts=experts, top_k=lay.active, router=router, gate=cfg.gate, compensate=compensate)

    def scores_of(h_, x_):
        """Router scores (the router is the MLP restricted to rep_idx, optionally through proj)."""
        r = router_neurons(h_, x_)
        return (r.abs() if cfg.absolute else r) @ combine.T

    keep = topk_mask(scores_of(h, x), lay.active)
    bias = parts.dropped_means(keep) if compensate else None
    y = parts.select(keep, bias)
    info["calibration_error"] = float((dense_y - y).norm() / dense_y.norm().clamp_min(1e-30))
    del h, parts
    lap("outputs")

    def heldout(xh: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        hh = w.hidden(xh)
        ph = _parts(hh, down, shared, experts)
        F = ph.dense()
        keep_r = topk_mask(scores_of(hh, xh), lay.active)
        keep_o = topk_mask(ph.norms, lay.active)
        yr, yo = ph.select(keep_r, bias), ph.select(keep_o, bias)
        denom = F.norm().clamp_min(1e-30)
        fid = {"overlap": float((keep_r * keep_o).sum(-1).mean() / lay.active), "tokens": int(xh.shape[0]),
               "rel_error_router": float((F - yr).norm() / denom), "rel_error_oracle": float((F - yo).norm() / denom)}
        return yr, fid

    block_state = {"dropped_bias": bias} if compensate else None
    return LayerResult(plan, router_state, y, dense_y, info, heldout, block_state)
