"""Hierarchical conversion of MoE models (Mixtral, Qwen2-MoE/Qwen3-MoE, OLMoE) and of
moeify's own converted blocks.

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
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
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


@torch.no_grad()
def convert_moeify_block(block: MoEMLP, x: torch.Tensor, config, layer: int):
    """Turn every routed expert of a moeify block into a sub-MoE planned on its own tokens."""
    if isinstance(block, HierarchicalMoEMLP):
        raise InputError(f"layer {layer}: this block is already hierarchical; convert the original model instead.")
    if block.num_experts == 0:
        raise InputError(f"layer {layer}: this moeify block has no routed experts to split further.")
    if block.all_active() and block.gate_u is None:
        idx = torch.arange(block.num_experts).expand(x.shape[0], -1)
        w = block.expert_scale.float().expand(x.shape[0], -1)
    else:
        _, idx, w = block.route(x)
    hier, hplan, stats = convert_moe_block(None, moeify_expert_weights(block), [(x, idx, w)], config, layer)
    outer = dict(block.layer_config)
    outer.pop("kind", None)
    new = HierarchicalMoEMLP(block.hidden_size, {"outer": outer, "experts": [p.to_config() for p in hplan.experts]}, block.act)
    state = {k: v for k, v in block.state_dict().items() if not k.startswith(("gate_up", "down", "routed_index"))}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("sub.") and k not in ("gate_up", "down", "routed_index") for k in missing):
        raise InputError(f"layer {layer}: could not carry the block's parameters over ({unexpected or missing}).")
    new.sub = hier
    new.to(device=x.device, dtype=block.shared_gate_up.dtype)
    return new, HierarchicalPlan(hplan.experts, outer), stats


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
    for i, (w, res) in enumerate(blocks):
        hier.blocks[i] = MoEMLP.from_dense(w, res.plan, res.router_state, res.block_state)
    hier.to(dtype=weights[0].gate.dtype)
    stats = {"kind": "hierarchical", "experts_converted": len(plans), "tokens_per_expert": routed_tokens,
             "shared": int(plans[0].shared.size), "experts": plans[0].expert_sizes, "top_k": plans[0].top_k}
    if errs:
        stats["calibration_error"] = float(sum(errs) / len(errs))
    return hier, HierarchicalPlan(plans), stats
