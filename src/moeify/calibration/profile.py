"""What calibrated methods share: the MLP's hidden activations and the per-layer result type."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import InputError
from ..moe import GatedWeights, activation
from ..plan import LayerPlan


@dataclasses.dataclass
class CalibratedPlan:
    """What a calibrated method returns for one MLP."""

    plan: LayerPlan
    router_state: dict[str, torch.Tensor] | None
    output: torch.Tensor | None = None  # F_moe(X) on the calibration tokens (saves a forward)
    dense_output: torch.Tensor | None = None  # F(X)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    heldout: Any = None  # optional callable x -> (F_moe(x), fidelity dict), cheaper than the generic path
    block_state: dict[str, torch.Tensor] | None = None  # extra block parameters (e.g. dropped_bias)


def hidden_activations(w: GatedWeights, x: torch.Tensor) -> torch.Tensor:
    """h [T, d_h] float32 with one fused gate/up matmul and in-place activation."""
    d_h = w.intermediate_size
    gu = x.float() @ torch.cat([w.gate, w.up]).float().T
    h = activation(w.act)(gu[:, :d_h])
    return h.mul_(gu[:, d_h:])


def check_finite_output(y: torch.Tensor, layer: int) -> None:
    if not torch.isfinite(y).all():
        raise InputError(f"layer {layer}: the MLP activations on the calibration tokens contain NaN or inf; "
                         "check the model's weights and dtype (try --dtype float32).")
