"""What a token costs a model, and the physical limits of a converted model's speedup.

protocol.md "Speed": next to every measured speedup, the limit it is measured against:

* decode (batch 1, memory-bound): weights read per token, from the actual active
  parameter count (shared + top-k experts + router per MoE layer, attention, norms,
  LM head); limit = dense bytes / converted bytes (TokenCost.decode_bytes);
* prefill (compute-bound): matmul FLOPs per sequence, with the causal attention
  scores and one LM-head row per sequence (the prefill keeps one position's logits);
  limit = dense FLOPs / converted FLOPs (TokenCost.prefill_flops).

Decode also gets an *attainable* limit (Amdahl, `attainable_limit`): the baseline is
timed a third way with its MLPs skipped (moeify.bench.timing.SkipMLPs), which measures
what a token costs outside the MLPs on this machine (attention, LM head, the framework's
per-layer and per-step overhead), a cost that conversion cannot touch. attainable =
t_dense / (t_no_mlp + f (t_dense - t_no_mlp)), f = MLP weights read per token,
converted / dense: the speedup if the MoE MLPs streamed their weights exactly as fast as
the dense MLPs and cost nothing else. Where per-token overhead is large (small models,
slow dispatch) it is well below the bytes limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..blocks.moe import MoEMLP
from ..models.arch import decoder_layers, mlp_sites


def _unique_params(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters())  # tied weights are one Parameter, listed once


def moe_active_params(block) -> float:
    """Parameters a MoEMLP reads for one token: shared expert, router, top-k experts of mean size, scales, biases."""
    if not isinstance(block, MoEMLP):
        return float(sum(p.numel() for p in _unique_params(block)))
    routed = 3 * block.routed_size * block.hidden_size
    fraction = 1.0 if block.all_active() else block.top_k / block.num_experts
    rest = sum(p.numel() for n, p in block.named_parameters() if n not in ("gate_up", "down"))
    return float(rest + fraction * routed)


def mlp_modules(model) -> list[nn.Module]:
    """The MLP (dense or MoE) of every decoder layer."""
    return [s.module for s in mlp_sites(model)]


@dataclass
class TokenCost:
    """Per token: parameters read (decode) and matmul parameters (2 FLOPs each); per layer attention width."""

    read_params: float
    matmul_params: float
    lm_head_params: float
    attention_width: int  # num_heads * head_dim, for the QK^T and PV products
    layers: int
    mlp_active_params: float
    mlp_dense_params: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def decode_bytes(self, dtype: torch.dtype) -> float:
        return self.read_params * torch.empty(0, dtype=dtype).element_size()

    def prefill_flops(self, batch: int, seq: int) -> float:
        per_token = 2.0 * self.matmul_params + 4.0 * self.attention_width * self.layers * (seq + 1) / 2.0
        return batch * (seq * per_token + 2.0 * self.lm_head_params)


def token_cost(model) -> TokenCost:
    """What one token costs `model` (a dense or converted causal LM)."""
    params = _unique_params(model)
    total = float(sum(p.numel() for p in params))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is emb or (not emb.is_meta and emb.data_ptr() == head.data_ptr())
    read = total - (0.0 if tied else emb.numel())  # an untied input embedding is one row per token
    mlp_active = mlp_total = 0.0
    mlps = mlp_modules(model)
    for m in mlps:
        n = float(sum(p.numel() for p in m.parameters()))
        a = moe_active_params(m)
        mlp_total += n
        mlp_active += a
        read += a - n
    linear = 0.0
    mlp_ids = {id(m) for mod in mlps for m in mod.modules()}
    for layer in decoder_layers(model):
        for m in layer.modules():
            if isinstance(m, nn.Linear) and id(m) not in mlp_ids:
                linear += m.weight.numel()
    cfg = model.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", None) or (cfg.hidden_size // max(heads, 1)))
    return TokenCost(
        read_params=read, matmul_params=linear + mlp_active, lm_head_params=float(head.numel()),
        attention_width=heads * head_dim, layers=int(cfg.num_hidden_layers), mlp_active_params=mlp_active, mlp_dense_params=mlp_total,
    )


def cost_summary(c: TokenCost, dtype: torch.dtype) -> dict[str, Any]:
    """The numbers behind the limits, as reported next to them."""
    return {
        "decode_params_read_per_token": c.read_params,
        "decode_bytes_per_token": c.decode_bytes(dtype),
        "mlp_active_params_per_token": c.mlp_active_params,
        "mlp_params": c.mlp_dense_params,
        "prefill_flops_1x2048": c.prefill_flops(1, 2048),
        "prefill_flops_8x512": c.prefill_flops(8, 512),
    }


def attainable_limit(t_dense: float, t_no_mlp: float, mlp_fraction: float) -> float:
    """Amdahl: dense time per token over non-MLP time + the MLP time scaled by the fraction of MLP weights read."""
    return t_dense / (t_no_mlp + mlp_fraction * max(t_dense - t_no_mlp, 0.0))


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (tied ones once) and buffers."""
    return sum(p.numel() * p.element_size() for p in _unique_params(model)) + sum(b.numel() * b.element_size() for b in model.buffers())
