"""Hierarchical conversion of MoE models (Mixtral, Qwen2-MoE/Qwen3-MoE, OLMoE).

The model's own router stays as it is; its fused experts module (called as
experts(x, top_k_index, top_k_weights)) is replaced by `HierarchicalExperts`, in
which every expert is a moeify MoE block: a shared part plus routed sub-experts
with a sub-router, planned from the calibration tokens the top-level router sends
to that expert. With every sub-expert active the model is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .moe import GatedWeights, MoEMLP
from .plan import LayerPlan


@dataclass
class HierarchicalPlan:
    """One LayerPlan per expert of an MoE block."""

    experts: list[LayerPlan]

    def to_config(self) -> dict[str, Any]:
        return {"kind": "hierarchical", "experts": [p.to_config() for p in self.experts]}

    def active_neurons_per_token(self) -> float:
        """Per selected top-level expert, averaged over experts."""
        return float(sum(p.active_neurons_per_token() for p in self.experts) / len(self.experts))

    @property
    def num_neurons(self) -> float:
        return float(sum(p.num_neurons for p in self.experts) / len(self.experts))


class HierarchicalExperts(nn.Module):
    """Drop-in for a fused experts module: expert e is an MoEMLP."""

    def __init__(self, hidden_size: int, expert_configs: list[dict[str, Any]], act: str):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = len(expert_configs)
        self.blocks = nn.ModuleList(MoEMLP(hidden_size, c, act) for c in expert_configs)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=acc, device=x.device)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        weight = top_k_weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.num_experts + 1).tolist()  # one host sync
        pos = 0
        for e, c in enumerate(counts):
            if c and e < self.num_experts:
                sl = slice(pos, pos + c)
                y = self.blocks[e](x[token[sl]])
                out.index_add_(0, token[sl], y.to(acc) * weight[sl, None].to(acc))
            pos += c
        return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def convert_moe_block(experts_mod: nn.Module, weights: list[GatedWeights], captured: list[tuple], config, layer: int):
    """Plan and build HierarchicalExperts from captured (x, top_k_index, top_k_weights) calls."""
    x = torch.cat([c[0] for c in captured])
    idx = torch.cat([c[1].reshape(-1, c[1].shape[-1]) for c in captured])
    if not torch.isfinite(x).all():
        raise InputError(f"layer {layer}: the MoE block inputs contain NaN or inf on the calibration tokens.")
    plans, blocks, errs = [], [], []
    routed_tokens = []
    for e, w in enumerate(weights):
        sel = (idx == e).any(-1)
        xe = x[sel]
        routed_tokens.append(int(sel.sum()))
        if xe.shape[0] == 0:
            raise InputError(f"layer {layer}: expert {e} received no calibration tokens from the model's router; "
                             "give more calibration text (more --samples or a longer --seq-len).")
        res = config.plan_from_activations(w, xe, layer)
        res.plan.validate(w.intermediate_size, layer=layer)
        plans.append(res.plan)
        blocks.append((w, res))
        if "calibration_error" in res.info:
            errs.append(res.info["calibration_error"])
    hier = HierarchicalExperts(weights[0].hidden_size, [p.to_config() for p in plans], weights[0].act)
    for blk, (w, res) in zip(hier.blocks, blocks):
        blk.load_plan(w, res.plan, res.router_state)
    hier.to(dtype=weights[0].gate.dtype)
    stats = {"kind": "hierarchical", "experts_converted": len(plans), "tokens_per_expert": routed_tokens,
             "shared": int(plans[0].shared.size), "experts": plans[0].expert_sizes, "top_k": plans[0].top_k}
    if errs:
        stats["calibration_error"] = float(sum(errs) / len(errs))
    return hier, HierarchicalPlan(plans), stats
