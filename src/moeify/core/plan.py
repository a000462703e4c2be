"""The expert plan: which dense neurons go to which expert, layer by layer.

This is the one place where a conversion's decisions live. Methods produce a
plan; the MoE block, the checkpoint config, the report and the analysis all
read it. Indices refer to neurons of the dense MLP (rows of W_gate / W_up,
columns of W_down).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError


def _as_index(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).reshape(-1)


@dataclass
class LayerPlan:
    """Plan for one MLP: an always-on shared expert plus routed experts.

    shared:   neuron ids of the consolidated shared expert (may be empty).
    experts:  neuron ids of each routed expert (sizes may differ).
    top_k:    routed experts active per token (== len(experts) means all).
    router:   router description, e.g. {"type": "static"} or
              {"type": "analytical", "representatives": 4}; the tensors are
              built by the method, this dict is what goes into config.json.
    gate:     "unit" (weights exactly 1, the training-free default) or
              "cmoe" (g_j = 1 + softmax(s)_j * u_j with u initialised to 0).
    scales:   per routed expert scalar alpha (MLPMoE branch scales);
              None means all ones.
    """

    shared: np.ndarray
    experts: list[np.ndarray]
    top_k: int
    router: dict[str, Any] = field(default_factory=lambda: {"type": "static"})
    gate: str = "unit"
    scales: np.ndarray | None = None
    compensate: bool = False  # add the calibration mean of each unselected expert's output

    def __post_init__(self) -> None:
        self.shared = _as_index(self.shared)
        self.experts = [_as_index(e) for e in self.experts]
        if self.scales is not None:
            self.scales = np.asarray(self.scales, dtype=np.float64).reshape(-1)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_sizes(self) -> list[int]:
        return [int(e.size) for e in self.experts]

    @property
    def routed_index(self) -> np.ndarray:
        if not self.experts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self.experts)

    @property
    def num_neurons(self) -> int:
        return int(self.shared.size + sum(self.expert_sizes))

    def active_neurons_per_token(self) -> float:
        """Neurons computed per token if every token picks experts of mean size."""
        sizes = self.expert_sizes
        if not sizes:
            return float(self.shared.size)
        if self.top_k >= len(sizes):
            return float(self.shared.size + sum(sizes))
        return float(self.shared.size + self.top_k * float(np.mean(sizes)))

    def validate(self, intermediate_size: int, *, layer: int | None = None, allow_missing: bool = False) -> None:
        where = f"layer {layer}: " if layer is not None else ""
        all_ids = np.concatenate([self.shared, self.routed_index])
        if all_ids.size and (all_ids.min() < 0 or all_ids.max() >= intermediate_size):
            raise InputError(f"{where}neuron ids must lie in [0, {intermediate_size}); got {all_ids.min()}..{all_ids.max()}.")
        if np.unique(all_ids).size != all_ids.size:
            raise InputError(f"{where}a neuron is assigned to more than one expert; every neuron must be used at most once.")
        if not allow_missing and all_ids.size != intermediate_size:
            raise InputError(
                f"{where}the plan covers {all_ids.size} of {intermediate_size} neurons; a lossless conversion must use every neuron exactly once."
            )
        if any(s == 0 for s in self.expert_sizes):
            raise InputError(f"{where}a routed expert is empty; use fewer experts.")
        if self.experts and not 1 <= self.top_k <= len(self.experts):
            raise InputError(f"{where}top_k={self.top_k} must be between 1 and the number of routed experts ({len(self.experts)}).")
        if self.gate not in ("unit", "cmoe", "softmax"):
            raise InputError(f"{where}gate must be 'unit', 'cmoe' or 'softmax', got {self.gate!r}.")
        if self.gate == "softmax" and self.experts and self.top_k >= len(self.experts):
            raise InputError(f"{where}softmax gates need top_k below the number of routed experts ({len(self.experts)}).")
        if self.scales is not None and self.scales.size != len(self.experts):
            raise InputError(f"{where}{self.scales.size} scales for {len(self.experts)} experts.")

    def to_config(self) -> dict[str, Any]:
        """The part of the plan config.json needs to rebuild the block's shapes."""
        return {
            "shared": int(self.shared.size),
            "experts": self.expert_sizes,
            "top_k": int(self.top_k),
            "router": dict(self.router),
            "gate": self.gate,
            **({"compensate": True} if self.compensate else {}),
        }


def plan_summary(plans: list[LayerPlan | None], intermediate_sizes: list[int]) -> dict[str, float]:
    """Active MLP fraction and fraction of MLP parameters removed, over converted and dense layers."""
    active = 0.0
    kept = 0.0
    total = 0.0
    for plan, d_h in zip(plans, intermediate_sizes):
        total += d_h
        if plan is None:
            active += d_h
            kept += d_h
        else:
            active += plan.active_neurons_per_token()
            kept += plan.num_neurons
    return {
        "active_mlp_fraction": active / total if total else 1.0,
        "mlp_params_removed_fraction": 1.0 - kept / total if total else 0.0,
    }


@dataclass
class HierarchicalPlan:
    """One LayerPlan per expert of an MoE block.

    For a model's own MoE block the counts are per selected expert (relative to one
    expert's size). For a moeify block (`outer` set) they include its shared expert and
    its top-k routed experts, relative to the whole MLP.
    """

    experts: list[LayerPlan]
    outer: dict[str, Any] | None = None  # the moeify block's own layer config

    def to_config(self) -> dict[str, Any]:
        cfg = {"kind": "hierarchical", "experts": [p.to_config() for p in self.experts]}
        if self.outer is not None:
            cfg["outer"] = dict(self.outer)
        return cfg

    def _per_token(self, values: list[float]) -> float:
        mean = sum(values) / len(values)
        if self.outer is None:
            return float(mean)
        return float(self.outer["shared"] + self.outer["top_k"] * mean)

    def active_neurons_per_token(self) -> float:
        return self._per_token([p.active_neurons_per_token() for p in self.experts])

    @property
    def num_neurons(self) -> float:
        if self.outer is None:
            return float(sum(p.num_neurons for p in self.experts) / len(self.experts))
        return float(self.outer["shared"] + sum(p.num_neurons for p in self.experts))
