"""LLaMA-MoE splits (Zhu et al. 2024) as training-free floor baselines.

LLaMA-MoE builds experts by splitting the FFN neurons, then trains the router (and
the model) on 200B tokens; training-free it is near random (docs/methods.md §5), which is
what makes it a useful floor. Per layer, E experts of d_h / E neurons (+-1), no
shared expert, top-k of E, unit weights:

* split "random": a seeded random permutation of the neurons cut into E equal parts;
* split "cluster": balanced k-means on the raw (not normalised) W_gate rows, with the
  exact equal-size assignment of `common.balanced_assignment` (MoEfication clusters the
  normalised rows; keeping the norms is our reading of LLaMA-MoE's clustering split).

Routers:

* "analytical" (default): CMoE's analytical router on a few neurons of each expert:
  s_j(x) = sum_{i in R_j} |h_i(x)| ||W_down[:, i]||, R_j = the `router_neurons` members
  of expert j with the largest mean contribution |h_i| ||W_down[:, i]|| on the
  calibration tokens (the MLP restricted to those neurons: an estimate of ||E_j(x)||);
* "mlp": MoEfication's Linear-Tanh-Linear router trained with BCE (moefication.py);
* "centroid": MoEfication's similarity router (mean normalised gate row per expert).

With the default analytical router the only difference from moeify's CMoE routers
is the split, which isolates what activation-based clustering buys.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..core.dense import GatedWeights
from ..core.layout import Layout
from ..core.method import LayerResult, option, positive_int
from ..core.plan import LayerPlan
from ..errors import InputError
from .common import EqualExpertsConfig, analytical_router_for, centroid_router_for, cluster_rows, finish_plan, mlp_router_for

SPLITS = ("random", "cluster")
ROUTERS = ("analytical", "mlp", "centroid")


@dataclasses.dataclass
class LlamaMoEConfig(EqualExpertsConfig):
    """E experts from a random or gate-row-clustering split; top-`active` (or `fraction` of E) per token."""

    method = "llama-moe"
    needs_calibration = True
    routers = ROUTERS
    variants = {"llama-moe-random": {"split": "random"}, "llama-moe-cluster": {"split": "cluster"}}

    experts: int = option(16, 'experts E per layer')
    router: str = option("analytical", 'analytical | mlp | centroid')
    split: str = option("random", 'random | cluster (balanced k-means on W_gate rows)')
    router_neurons: int = option(8, 'neurons per expert the analytical router reads')

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in SPLITS:
            raise InputError(f"llama-moe split must be one of {', '.join(SPLITS)}; got {self.split!r}.")
        positive_int("router_neurons", self.router_neurons)

    def plan(self, weights: GatedWeights, x: torch.Tensor, layer: int, state=None) -> LayerResult:
        return plan_llama_moe(weights, x, self, layer)

    def describe(self) -> str:
        return f"{self.split} split, E={self.experts}, top-{self.active}, {self.router} router"


def split_neurons(w: GatedWeights, cfg: LlamaMoEConfig, layer: int) -> tuple[list[np.ndarray], int]:
    d_h = w.intermediate_size
    if cfg.split == "random":
        perm = np.random.default_rng([cfg.seed, layer]).permutation(d_h)
        _, sizes = Layout(0, 1, cfg.experts).sizes(d_h)
        cuts = np.cumsum(sizes)[:-1]
        return [np.sort(p) for p in np.split(perm, cuts)], 0
    return cluster_rows(w.gate.float(), cfg.experts, cfg.seed, layer, cfg.max_iters)




def plan_llama_moe(w: GatedWeights, x: torch.Tensor, cfg: LlamaMoEConfig, layer: int) -> LayerResult:
    x = x.reshape(-1, w.hidden_size)
    if x.shape[0] < 1:
        raise InputError(f"layer {layer}: no calibration tokens reached this MLP.")
    experts, iters = split_neurons(w, cfg, layer)
    h = w.hidden(x)
    if cfg.router == "analytical":
        router, state = analytical_router_for(w, h, experts, cfg.router_neurons)
    elif cfg.router == "mlp" and cfg.active < cfg.experts:
        router, state = mlp_router_for(x, h, experts, cfg.active, cfg, layer)
    else:
        router, state = centroid_router_for(w, experts)
    plan = LayerPlan(shared=np.zeros(0, dtype=np.int64), experts=experts, top_k=cfg.active, router=router)
    info = {"tokens": int(x.shape[0]), "split": cfg.split, **({"cluster_iterations": iters} if cfg.split == "cluster" else {})}
    return finish_plan(w, x, h, plan, state, info, layer)
