"""MLPMoE (arXiv 2511.21089): static slicing of the MLP into branches that sum to it.

The intermediate dimension is cut into B contiguous slices. Branch b computes
alpha_b * W_down[:, I_b] (act(W_gate[I_b] x) * W_up[I_b] x) and the block
returns the plain sum, so with alpha = 1 the block is the dense MLP
(tensor-parallel algebra: gate/up column-parallel, down row-parallel).

The paper's two pruning mechanisms are named but not specified; the
formulation here is moeify's own (docs/methods.md, section 1):

* neuron score (data-free): s_i = ||W_gate[i]|| * ||W_up[i]|| * ||W_down[:, i]||,
  a bound on neuron i's output for a unit input; branch importance = sum of s_i.
* fractal-fade: branches ranked by importance get level l = floor(log2(rank+1))
  and keep ratio gamma**l; gamma is found by bisection so that the requested
  fraction of MLP parameters is removed; inside a branch the lowest scores go.
* uniform: every branch keeps the same ratio (the baseline for fractal-fade).
* compensated: the least important whole branches are dropped and the
  survivors' alpha is raised so that the expected second moment of the output,
  estimated from the scores (sum of s_i**2, neurons taken as uncorrelated),
  is preserved.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ..core.dense import GatedWeights
from ..core.method import LayerResult, MethodConfig, multiple_of, option, positive_int
from ..core.plan import LayerPlan
from ..errors import InputError

log = logging.getLogger("moeify")

PRUNE_MODES = ("fractal-fade", "uniform", "compensated")


@dataclasses.dataclass
class MLPMoEConfig(MethodConfig):
    """branches: B contiguous slices; prune: fraction of MLP parameters to remove (0 = exact)."""

    method = "mlpmoe"

    branches: int = option(8, 'number of contiguous branches B')
    prune: float = option(0.0, 'fraction of MLP parameters to remove (0 = exact)')
    prune_mode: str = option("fractal-fade", 'fractal-fade | compensated | uniform')

    def __post_init__(self) -> None:
        self.branches = positive_int("branches", self.branches)
        if not 0.0 <= float(self.prune) < 1.0:
            raise InputError(f"prune is the fraction of MLP parameters to remove and must be in [0, 1); got {self.prune}.")
        self.prune = float(self.prune)
        if self.prune_mode not in PRUNE_MODES:
            raise InputError(f"prune_mode must be one of {', '.join(PRUNE_MODES)}; got {self.prune_mode!r}.")
        if self.prune_mode == "compensated" and self.prune > 0 and self.branches < 2:
            raise InputError("compensated pruning drops whole branches: use at least 2 branches.")
        if self.prune_mode == "fractal-fade" and self.prune > 0:
            max_removed = 1.0 - 1.0 / self.branches
            if self.prune > max_removed:
                raise InputError(
                    f"fractal-fade keeps the most important branch whole, so with {self.branches} branches at most "
                    f"{max_removed:.3f} of the MLP can be removed; use more branches or prune <= {max_removed:.3f}."
                )

    def check(self, intermediate_sizes: list[int]) -> None:
        for i, d_h in enumerate(intermediate_sizes):
            if d_h and self.branches > d_h:
                raise InputError(
                    f"layer {i}: {self.branches} branches do not fit an intermediate size of {d_h}; use at most {d_h} branches."
                )
            if self.prune > 0 and self.prune_mode != "compensated" and round((1 - self.prune) * d_h) < self.branches:
                raise InputError(f"layer {i}: pruning {self.prune:.0%} of {d_h} neurons leaves fewer neurons than branches.")

    @property
    def drops_neurons(self) -> bool:
        return self.prune > 0

    def plan(self, weights: GatedWeights, x: None, layer: int, state=None) -> LayerResult:
        return LayerResult(plan_mlpmoe(weights, self))

    @classmethod
    def for_fraction(cls, fraction: float, **opts) -> "MLPMoEConfig":
        """B = 8 branches; compensated pruning drops (1 - f) x B whole branches and rescales the rest (f = j/B)."""
        b = int(opts.pop("branches", 8))
        k = multiple_of(cls.method, fraction, b, f"{b} branches dropped whole")
        return cls(branches=b, prune=1.0 - k / b, prune_mode=opts.pop("prune_mode", "compensated"), **opts)

    def describe(self) -> str:
        return f"B={self.branches}, prune {self.prune:g} ({self.prune_mode})"


def neuron_scores(w: GatedWeights) -> np.ndarray:
    """s_i = ||W_gate[i]|| ||W_up[i]|| ||W_down[:, i]|| (float64)."""
    g = w.gate.double().norm(dim=1)
    u = w.up.double().norm(dim=1)
    d = w.down.double().norm(dim=0)
    return (g * u * d).cpu().numpy()


def branch_slices(d_h: int, branches: int) -> list[np.ndarray]:
    """B contiguous slices of range(d_h), sizes differing by at most one."""
    return [a.astype(np.int64) for a in np.array_split(np.arange(d_h), branches)]


def _apportion(quota: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integers close to `quota` (largest remainders) that sum to `total`, within [lo, hi]."""
    base = np.clip(np.floor(quota).astype(np.int64), lo, hi)
    rest = total - int(base.sum())
    frac = quota - np.floor(quota)
    order = np.argsort(-frac, kind="stable") if rest > 0 else np.argsort(frac, kind="stable")
    step = 1 if rest > 0 else -1
    while rest != 0:
        moved = False
        for j in order:
            if rest == 0:
                break
            if lo[j] <= base[j] + step <= hi[j]:
                base[j] += step
                rest -= step
                moved = True
        if not moved:
            raise InputError("cannot meet the pruning budget with these branch sizes; use fewer branches or a smaller prune.")
    return base


def fractal_fade_keep(sizes: np.ndarray, importance: np.ndarray, keep_total: int) -> np.ndarray:
    """Neurons kept per branch: ratio gamma**level(rank), gamma by bisection to meet keep_total."""
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[np.argsort(-importance, kind="stable")] = np.arange(len(sizes))
    level = np.floor(np.log2(rank + 1)).astype(np.int64)

    def kept(gamma: float) -> float:
        return float(np.sum(sizes * gamma**level))

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if kept(mid) < keep_total:
            lo = mid
        else:
            hi = mid
    gamma = hi
    quota = sizes * gamma**level
    return _apportion(quota, keep_total, np.ones_like(sizes), sizes)


def plan_mlpmoe(w: GatedWeights, cfg: MLPMoEConfig) -> LayerPlan:
    d_h = w.intermediate_size
    slices = branch_slices(d_h, cfg.branches)
    if cfg.prune == 0.0:
        return LayerPlan(shared=[], experts=slices, top_k=len(slices), router={"type": "static"})
    scores = neuron_scores(w)
    sizes = np.array([s.size for s in slices], dtype=np.int64)
    importance = np.array([scores[s].sum() for s in slices])
    if cfg.prune_mode == "compensated":
        n_drop = int(round(cfg.prune * cfg.branches))
        n_drop = min(max(n_drop, 1), cfg.branches - 1)
        order = np.argsort(importance, kind="stable")  # least important first
        dropped = set(order[:n_drop].tolist())
        kept = [s for b, s in enumerate(slices) if b not in dropped]
        kept_idx = np.concatenate(kept)
        alpha = math.sqrt(float(np.sum(scores**2)) / float(np.sum(scores[kept_idx] ** 2)))
        return LayerPlan(
            shared=[], experts=kept, top_k=len(kept), router={"type": "static"}, scales=np.full(len(kept), alpha)
        )
    keep_total = int(round((1.0 - cfg.prune) * d_h))
    if cfg.prune_mode == "fractal-fade":
        keep = fractal_fade_keep(sizes, importance, keep_total)
    else:  # uniform: the same ratio in every branch
        keep = _apportion(sizes * keep_total / d_h, keep_total, np.ones_like(sizes), sizes)
    experts = []
    for s, k in zip(slices, keep):
        best = s[np.argsort(-scores[s], kind="stable")[:k]]
        experts.append(np.sort(best))
    return LayerPlan(shared=[], experts=experts, top_k=len(experts), router={"type": "static"})

