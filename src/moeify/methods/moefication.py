"""MoEfication (Zhang et al. 2022): experts from clustered W_gate rows, a similarity or a small learned router.

Per layer (docs/methods.md §5):

1. Experts: balanced k-means on the unit-normalised rows of W_gate into E groups of
   exactly d_h / E neurons (sizes differ by one neuron when E does not divide d_h).
   The equal-size assignment is the exact linear assignment of
   `common.balanced_assignment`; the E initial centroids are rows drawn with the seed.
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

The router training, clustering and expert-count helpers live in methods/common/,
shared with the LLaMA-MoE splits and ExpertWeaver.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..core.dense import GatedWeights
from ..core.method import LayerResult
from ..core.plan import LayerPlan
from ..errors import InputError
from .common import EqualExpertsConfig, centroid_router_for, cluster_rows, finish_plan, mlp_router_for

ROUTERS = ("mlp", "centroid")


@dataclasses.dataclass
class MoEficationConfig(EqualExpertsConfig):
    """E experts from balanced k-means on normalised W_gate rows; top-`active` (or `fraction` of E) per token."""

    method = "moefication"
    needs_calibration = True
    routers = ROUTERS

    def plan(self, weights: GatedWeights, x: torch.Tensor, layer: int, state=None) -> LayerResult:
        return plan_moefication(weights, x, self, layer)

    def describe(self) -> str:
        return f"E={self.experts}, top-{self.active}, {self.router} router"


def plan_moefication(w: GatedWeights, x: torch.Tensor, cfg: MoEficationConfig, layer: int) -> LayerResult:
    x = x.reshape(-1, w.hidden_size)
    if x.shape[0] < 1:
        raise InputError(f"layer {layer}: no calibration tokens reached this MLP.")
    rows = torch.nn.functional.normalize(w.gate.float(), dim=-1)
    experts, iters = cluster_rows(rows, cfg.experts, cfg.seed, layer, cfg.max_iters)
    h = w.hidden(x)
    if cfg.router == "mlp" and cfg.active < cfg.experts:
        router, state = mlp_router_for(x, h, experts, cfg.active, cfg, layer)
    else:
        router, state = centroid_router_for(w, experts)
    plan = LayerPlan(shared=np.zeros(0, dtype=np.int64), experts=experts, top_k=cfg.active, router=router)
    info = {"tokens": int(x.shape[0]), "cluster_iterations": iters}
    return finish_plan(w, x, h, plan, state, info, layer)
