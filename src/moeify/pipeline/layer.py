"""Plan, check, build: what happens to one dense MLP, whichever path (data-free, calibrated, hierarchical) it is on."""

from __future__ import annotations

from typing import Any

import torch

from ..blocks.moe import MoEMLP
from ..core.dense import GatedWeights
from ..core.method import LayerResult, MethodConfig


def plan_layer(config: MethodConfig, weights: GatedWeights, x: torch.Tensor | None, layer: int, state: Any = None) -> tuple[LayerResult, MoEMLP]:
    """Plan one dense MLP with the method, check the plan, build its MoE block."""
    res = config.plan(weights, x, layer, state)
    res.plan.validate(weights.intermediate_size, layer=layer, allow_missing=config.drops_neurons)
    return res, MoEMLP.from_dense(weights, res.plan, res.router_state, res.block_state)
