"""Hierarchical conversion of MoE models (Mixtral, Qwen2-MoE/Qwen3-MoE, OLMoE) and of
moeify's own converted blocks.

The model's own router stays as it is; its fused experts module (called as
experts(x, top_k_index, top_k_weights)) is replaced by `HierarchicalExperts`, in
which every expert is a moeify MoE block: a shared part plus routed sub-experts
with a sub-router, planned from the calibration tokens the top-level router sends
to that expert. With every sub-expert active the model is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.dense import GatedWeights, accumulation_dtype
from .moe import MoEMLP


class HierarchicalExperts(nn.Module):
    """Drop-in for a fused experts module: expert e is an MoEMLP."""

    def __init__(self, hidden_size: int, expert_configs: list[dict[str, Any]], act: str):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = len(expert_configs)
        self.blocks = nn.ModuleList(MoEMLP(hidden_size, c, act) for c in expert_configs)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)
        acc = accumulation_dtype(x.dtype)
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


class HierarchicalMoEMLP(MoEMLP):
    """A moeify block whose routed experts are themselves MoE blocks.

    The outer block keeps its shared expert, router, scales and compensation; its routed
    weights live in `sub` (a HierarchicalExperts), which runs expert e's sub-MoE on the
    tokens the outer router sent to e.
    """

    def __init__(self, hidden_size: int, layer_config: dict[str, Any], act: str):
        outer = dict(layer_config["outer"])
        sizes = outer["experts"]
        super().__init__(hidden_size, {**outer, "experts": [0] * len(sizes)}, act)
        self.expert_sizes = list(sizes)
        self.sub = HierarchicalExperts(hidden_size, layer_config["experts"], act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        acc = accumulation_dtype(x.dtype)
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=acc, device=x.device)
        if self.shared_size:
            out += self._shared(x).to(acc)
        if self.all_active() and self.gate_u is None:
            idx = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
            w = self.expert_scale.float().expand(x.shape[0], -1)
        else:
            _, idx, w = self.route(x)
        out += self.sub(x, idx, w).to(acc)
        if not self.all_active():
            self._compensate(out, idx)
        return out.to(hidden_states.dtype).reshape(shape)


def moeify_expert_weights(block: MoEMLP) -> list[GatedWeights]:
    """Views of each routed expert of a moeify block as a dense gated MLP."""
    out = []
    for e in range(block.num_experts):
        o0, o1 = block.offsets[e], block.offsets[e + 1]
        m = o1 - o0
        gu = block.gate_up.detach()[2 * o0 : 2 * o1]
        out.append(GatedWeights(gate=gu[:m], up=gu[m:], down=block.down.detach()[o0:o1].T, act=block.act))
    return out
