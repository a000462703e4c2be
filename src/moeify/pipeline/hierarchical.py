"""Hierarchical conversion: the experts of an MoE model (Mixtral, Qwen2-MoE/Qwen3-MoE,
OLMoE) or of a moeify block, each split into a sub-MoE planned on the calibration
tokens its router sends it (the blocks are in blocks/hierarchical.py).
"""

from __future__ import annotations

import torch

from ..blocks.hierarchical import HierarchicalExperts, HierarchicalMoEMLP, moeify_expert_weights
from ..blocks.moe import MoEMLP
from ..core.dense import GatedWeights
from ..core.plan import HierarchicalPlan
from ..errors import InputError
from .layer import plan_layer


@torch.no_grad()
def convert_moeify_block(block: MoEMLP, x: torch.Tensor, config, layer: int, state=None):
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
    hier, hplan, stats = convert_moe_block(moeify_expert_weights(block), [(x, idx, w)], config, layer, state)
    outer = dict(block.layer_config)
    outer.pop("kind", None)
    new = HierarchicalMoEMLP(block.hidden_size, {"outer": outer, "experts": [p.to_config() for p in hplan.experts]}, block.act)
    carried = {k: v for k, v in block.state_dict().items() if not k.startswith(("gate_up", "down", "routed_index"))}
    missing, unexpected = new.load_state_dict(carried, strict=False)
    if unexpected or any(not k.startswith("sub.") and k not in ("gate_up", "down", "routed_index") for k in missing):
        raise InputError(f"layer {layer}: could not carry the block's parameters over ({unexpected or missing}).")
    new.sub = hier
    new.to(device=x.device, dtype=block.shared_gate_up.dtype)
    return new, HierarchicalPlan(hplan.experts, outer), stats


def convert_moe_block(weights: list[GatedWeights], captured: list[tuple], config, layer: int, state=None):
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
        res, block = plan_layer(config, w, xe, layer, state)
        plans.append(res.plan)
        blocks.append(block)
        if "calibration_error" in res.info:
            errs.append(res.info["calibration_error"])
    hier = HierarchicalExperts(weights[0].hidden_size, [p.to_config() for p in plans], weights[0].act)
    for i, block in enumerate(blocks):
        hier.blocks[i] = block
    hier.to(dtype=weights[0].gate.dtype)
    stats = {"kind": "hierarchical", "experts_converted": len(plans), "tokens_per_expert": routed_tokens,
             "shared": int(plans[0].shared.size), "experts": plans[0].expert_sizes, "top_k": plans[0].top_k}
    if errs:
        stats["calibration_error"] = float(sum(errs) / len(errs))
    return hier, HierarchicalPlan(plans), stats
