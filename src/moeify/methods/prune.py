"""Static structured pruning: keep the most active neurons, no routing.

The "shared expert only" baseline every "X % active" claim must beat: at the same
active MLP fraction, keep the neurons with the highest activation rate (top-K_a
marking on |h|, as CMoE profiles them) or the highest mean contribution
|h_i| * ||W_down[:, i]||, and drop the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..core.dense import GatedWeights, check_finite_output
from ..core.layout import check_layout_fits, parse_layout
from ..core.method import Laps, LayerResult, option, positive_int
from ..core.plan import LayerPlan
from ..errors import InputError
from .common import LayoutConfig, activation_rates


@dataclasses.dataclass
class PruneConfig(LayoutConfig):
    """Keep `fraction` of each MLP's neurons (or the active fraction of a layout such as S1A3E8)."""

    method = "prune"
    needs_calibration = True

    fraction: float | None = option(None, "fraction of MLP neurons to keep (instead of --layout)")
    score: str = option("rate", "rate | contribution: what ranks the neurons")

    def __post_init__(self) -> None:
        if self.fraction is None:
            lay = parse_layout(self.layout, self.shared, self.active, self.experts, default="S1A1E2")
            self.layout, self.fraction = str(lay), lay.active_fraction
        self.fraction = float(self.fraction)
        if not 0.0 < self.fraction <= 1.0:
            raise InputError(f"prune fraction (share of MLP neurons kept) must be in (0, 1]; got {self.fraction}.")
        if self.score not in ("rate", "contribution"):
            raise InputError(f"score must be 'rate' or 'contribution'; got {self.score!r}.")
        positive_int("k_act", self.k_act)

    def check(self, intermediate_sizes: list[int]) -> None:
        if self.layout:
            check_layout_fits(parse_layout(self.layout), intermediate_sizes)
        for i, d_h in enumerate(intermediate_sizes):
            if d_h and round(self.fraction * d_h) < 1:
                raise InputError(f"layer {i}: keeping {self.fraction:.3f} of {d_h} neurons keeps none; raise the fraction.")

    @property
    def drops_neurons(self) -> bool:
        return True

    def describe(self) -> str:
        return f"keep {self.fraction:g} of neurons (by {self.score})"

    def plan(self, w: GatedWeights, x: torch.Tensor, layer: int, state=None) -> LayerResult:
        d_h = w.intermediate_size
        lap = Laps()
        h = w.hidden(x.reshape(-1, w.hidden_size))
        lap("profile")
        down = w.down.float()
        dense_y = h @ down.T
        check_finite_output(dense_y, layer)
        lap("outputs")
        a = h.abs()
        rate = activation_rates(a.topk(min(self.k_act, d_h), dim=-1, sorted=False).indices, d_h).numpy()
        contrib = (a.mul_(down.norm(dim=0))).mean(0).double().numpy()
        key, tie = (rate, contrib) if self.score == "rate" else (contrib, rate)
        n_keep = max(1, int(round(self.fraction * d_h)))
        kept = np.sort(np.lexsort((np.arange(d_h), -tie, -key))[:n_keep])
        kt = torch.as_tensor(kept)
        lap("profile")
        y = h[:, kt] @ down[:, kt].T
        info: dict[str, Any] = {"tokens": int(h.shape[0]), "plan_seconds": lap.seconds,
                                "calibration_error": float((dense_y - y).norm() / dense_y.norm().clamp_min(1e-30))}
        lap("outputs")

        def heldout(xh: torch.Tensor):
            hh = w.hidden(xh)
            F, yh = hh @ down.T, hh[:, kt] @ down[:, kt].T
            return yh, {"rel_error_router": float((F - yh).norm() / F.norm().clamp_min(1e-30)), "tokens": int(xh.shape[0])}

        return LayerResult(LayerPlan(shared=kept, experts=[], top_k=0), None, y, dense_y, info, heldout)
