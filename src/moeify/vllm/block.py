"""moeify's MoE block (`moeify.blocks.moe.MoEMLP`) built from vLLM layers.

    shared expert   a vLLM gated MLP (MergedColumnParallelLinear + act-and-mul + RowParallelLinear)
    routed experts  vLLM's fused MoE layer (FusedMoEFactory); experts of unequal sizes are padded
                    with zero neurons to one size (exact: a zero neuron contributes exactly 0)
    router          moeify's own router module, replicated on every tensor-parallel rank; selection
                    and gate weights by `MoEMLP.route` itself (selection bias, expert scales, gate
                    unit / cmoe / softmax), handed to the fused layer unchanged through a routing
                    function that only unpacks them
    compensation    `MoEMLP._compensate` on the reduced output (compensate=True blocks)

A block whose every expert is always active with a constant weight (`MoEMLP.runs_all_experts`:
a static router, or top_k equal to the number of experts, and no "cmoe" gate) is one vLLM MLP
over all its neurons, the expert scales folded into W_down's rows.

Tensor parallelism shards like vLLM's own MoE models: each expert's neurons and the shared
expert's neurons are split across ranks (the fused layer's and the linear layers' own weight
loaders), the router and the gate parameters are replicated; vLLM all-reduces the sum of the
shared and routed outputs once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..blocks.moe import MoEMLP
from ..blocks.routers import ROUTERS
from .plan import ACTIVATIONS, NotServable


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def packed_routing(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's custom routing function: the block passes [gate weights | expert ids] as the 'logits'; unpack them.

    The selection and the weights are MoEMLP.route's (computed in MoeifyMoE.forward); nothing is
    renormalised or rescaled here. Expert ids are small integers, exact in float32.
    """
    return gating_output[:, :topk].contiguous(), gating_output[:, topk:].to(torch.int32).contiguous()


class GatedMLP(nn.Module):
    """act(x W_gate^T) * (x W_up^T) W_down^T on vLLM's tensor-parallel linear layers (the neurons are sharded)."""

    def __init__(self, hidden_size: int, size: int, act: str, *, reduce_results: bool, prefix: str):
        from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.size = size
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [size] * 2, bias=False, quant_config=None, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(size, hidden_size, bias=False, quant_config=None, reduce_results=reduce_results, prefix=f"{prefix}.down_proj")
        kind = ACTIVATIONS[act]
        self.act_fn = SiluAndMul() if kind == "silu" else GeluAndMul(approximate="tanh" if kind == "gelu_tanh" else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out

    @torch.no_grad()
    def load(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Full (unsharded) gate [I, H], up [I, H], down [H, I] with I <= size; zero neurons pad the rest."""
        pad = self.size - gate.shape[0]
        if pad:
            gate = torch.cat([gate, gate.new_zeros(pad, gate.shape[1])])
            up = torch.cat([up, up.new_zeros(pad, up.shape[1])])
            down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
        w = self.gate_up_proj.weight
        w.weight_loader(w, gate.contiguous(), 0)
        w.weight_loader(w, up.contiguous(), 1)
        d = self.down_proj.weight
        d.weight_loader(d, down.contiguous())


class MoeifyMoE(nn.Module):
    """One converted layer's MoEMLP on vLLM layers; loads the checkpoint's `mlp.*` tensors of that layer."""

    # the exact selection and gate weights are MoEMLP's own code
    route = MoEMLP.route

    def __init__(self, hidden_size: int, layer_config: dict[str, Any], act: str, *, prefix: str):
        from vllm.distributed import get_tensor_model_parallel_world_size

        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.hidden_size = hidden_size
        self.layer_config = dict(layer_config)
        self.act = act
        sizes = [int(m) for m in layer_config["experts"]]
        self.expert_sizes = sizes
        self.num_experts = len(sizes)
        self.top_k = int(layer_config["top_k"]) if sizes else 0
        self.shared_size = int(layer_config["shared"])
        self.gate_mode = layer_config.get("gate", "unit")
        router_spec = dict(layer_config.get("router") or {"type": "static"})
        self.router_type = router_spec.get("type", "static")
        self.compensate = bool(layer_config.get("compensate"))
        # MoEMLP.all_active and MoEMLP.runs_all_experts: every expert on every token with its static scale
        # (a static router runs all experts whatever top_k says; only gate "cmoe" makes weights depend on the input)
        all_active = self.router_type == "static" or self.top_k >= self.num_experts
        self.dense = all_active and self.gate_mode != "cmoe"
        self.prefix = prefix
        self._expected = self._expected_names(router_spec)
        self._pending: dict[str, torch.Tensor] = {}
        self.loaded = False

        self.mlp = self.shared = self.experts = self.router = None
        self.gate_u = self.dropped_bias = None
        if self.dense:
            total = self.shared_size + sum(sizes)
            self.mlp = GatedMLP(hidden_size, _round_up(total, tp), act, reduce_results=True, prefix=f"{prefix}.mlp") if total else None
            return

        from vllm.model_executor.layers.fused_moe import FusedMoEFactory

        if self.shared_size:
            self.shared = GatedMLP(hidden_size, _round_up(self.shared_size, tp), act, reduce_results=False, prefix=f"{prefix}.shared")
        self.expert_size = _round_up(max(sizes), tp)
        self.router = ROUTERS[self.router_type](self.num_experts, hidden_size, router_spec, act)
        for p in self.router.parameters():
            p.requires_grad_(False)
        self.expert_scale = nn.Parameter(torch.ones(self.num_experts), requires_grad=False)
        if self.gate_mode == "cmoe":
            self.gate_u = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)
        if self.compensate:
            self.dropped_bias = nn.Parameter(torch.zeros(self.num_experts, hidden_size), requires_grad=False)
        self.register_buffer("selection_bias", torch.zeros(self.num_experts))
        self.experts = FusedMoEFactory(
            num_experts=self.num_experts,
            top_k=self.top_k,
            hidden_size=hidden_size,
            intermediate_size=self.expert_size,
            renormalize=False,
            custom_routing_function=packed_routing,
            shared_experts=self.shared,
            activation=ACTIVATIONS[act],
            quant_config=None,
            prefix=f"{prefix}.experts",
        )

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        if self.dense:
            out = self.mlp(x) if self.mlp is not None else torch.zeros_like(x)
            return out.view(shape)
        _, idx, w = self.route(x)
        packed = torch.cat([w.float(), idx.float()], dim=-1)
        out = self.experts(hidden_states=x, router_logits=packed)
        if self.dropped_bias is not None:  # MoEMLP._compensate, out of place
            b = self.dropped_bias.to(out.dtype)
            out = out + (b.sum(0) - b[idx].sum(1))
        return out.view(shape)

    # ------------------------------------------------------------------ weights

    def _expected_names(self, router_spec: dict[str, Any]) -> tuple[set[str], set[str]]:
        """(required, optional) checkpoint tensor names of this block, relative to the layer's `mlp.`"""
        req = {"shared_gate_up", "shared_down", "gate_up", "down", "expert_scale"}
        with torch.device("meta"):
            router = ROUTERS[self.router_type](self.num_experts, self.hidden_size, router_spec, self.act)
        req |= {f"router.{n}" for n, _ in router.named_parameters()}
        if self.gate_mode == "cmoe":
            req.add("gate_u")
        if self.compensate:
            req.add("dropped_bias")
        # buffers: the selection bias matters when present (0 otherwise), the neuron ids are provenance only
        opt = {"selection_bias", "shared_index", "routed_index"} | {f"router.{n}" for n, _ in router.named_buffers()}
        return req, opt

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Collect one checkpoint tensor; load the block once all are there. True when this call completed it."""
        req, opt = self._expected
        if name not in req | opt:
            raise NotServable(f"moeify.vllm: {self.prefix}.{name} is not a tensor of a moeify block with config "
                              f"{self.layer_config}; the checkpoint does not match its config.json.")
        self._pending[name] = tensor
        if self.loaded or not req <= set(self._pending):
            return False
        self._load(self._pending)
        self.loaded = True
        return True

    def missing(self) -> list[str]:
        req, _ = self._expected
        return sorted(req - set(self._pending))

    @torch.no_grad()
    def _load(self, t: dict[str, torch.Tensor]) -> None:
        H, S = self.hidden_size, self.shared_size
        sizes = self.expert_sizes
        offsets = [0]
        for m in sizes:
            offsets.append(offsets[-1] + m)

        def check(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if tuple(t[name].shape) != shape:
                raise NotServable(f"moeify.vllm: {self.prefix}.{name} has shape {tuple(t[name].shape)}, the config says {shape}; "
                                  "the checkpoint is corrupt.")
            return t[name]

        sgu, sdown = check("shared_gate_up", (2 * S, H)), check("shared_down", (S, H))
        gu, down = check("gate_up", (2 * offsets[-1], H)), check("down", (offsets[-1], H))
        scale = check("expert_scale", (len(sizes),))
        if self.dense:
            if self.mlp is None:
                return
            gates, ups, downs = [sgu[:S]], [sgu[S:]], [sdown]
            for e, m in enumerate(sizes):
                gates.append(gu[2 * offsets[e] : 2 * offsets[e] + m])
                ups.append(gu[2 * offsets[e] + m : 2 * offsets[e + 1]])
                # MoEMLP: h * alpha_e @ W_down; folded: h @ (alpha_e W_down) (bit-identical when alpha_e = 1, the conversion's value)
                d = down[offsets[e] : offsets[e + 1]]
                downs.append(d if float(scale[e]) == 1.0 else (d.float() * scale[e].float()).to(d.dtype))
            self.mlp.load(torch.cat(gates), torch.cat(ups), torch.cat(downs).T)
            return
        if self.shared is not None:
            self.shared.load(sgu[:S], sgu[S:], sdown.T)
        routed = self.experts.routed_experts
        w13, w2 = routed.w13_weight, routed.w2_weight
        M = self.expert_size
        for e, m in enumerate(sizes):
            g = gu[2 * offsets[e] : 2 * offsets[e] + m]
            u = gu[2 * offsets[e] + m : 2 * offsets[e + 1]]
            d = down[offsets[e] : offsets[e + 1]]
            if m < M:  # zero neurons: act(0) * 0 = 0 and a zero W_down column, so exactly no contribution
                g = torch.cat([g, g.new_zeros(M - m, H)])
                u = torch.cat([u, u.new_zeros(M - m, H)])
                d = torch.cat([d, d.new_zeros(M - m, H)])
            w13.weight_loader(w13, g.contiguous(), "w13_weight", shard_id="w1", expert_id=e)
            w13.weight_loader(w13, u.contiguous(), "w13_weight", shard_id="w3", expert_id=e)
            w2.weight_loader(w2, d.T.contiguous(), "w2_weight", shard_id="w2", expert_id=e)
        self.expert_scale.copy_(scale)
        if self.gate_u is not None:
            self.gate_u.copy_(check("gate_u", (len(sizes),)))
        if self.dropped_bias is not None:
            self.dropped_bias.copy_(check("dropped_bias", (len(sizes), H)))
        if "selection_bias" in t:
            self.selection_bias.copy_(check("selection_bias", (len(sizes),)))
        own = dict(self.router.named_parameters()) | dict(self.router.named_buffers())
        for name, value in t.items():
            if name.startswith("router."):
                key = name[len("router.") :]
                if tuple(own[key].shape) != tuple(value.shape):
                    raise NotServable(f"moeify.vllm: {self.prefix}.{name} has shape {tuple(value.shape)}, the router built "
                                      f"from the config has {tuple(own[key].shape)}; the checkpoint is corrupt.")
                own[key].copy_(value)

    def loaded_names(self) -> list[str]:
        """This block's parameter names (relative to it), reported to vLLM as loaded from the checkpoint."""
        return [n for n, _ in self.named_parameters()]

    def extra_repr(self) -> str:
        mode = "one dense MLP (all experts always active)" if self.dense else f"fused MoE, experts padded to {self.expert_size}"
        return (f"shared={self.shared_size}, experts={self.num_experts} (sizes {min(self.expert_sizes, default=0)}.."
                f"{max(self.expert_sizes, default=0)}), top_k={self.top_k}, router={self.router_type}, gate={self.gate_mode}, {mode}")


__all__ = ["GatedMLP", "MoeifyMoE", "packed_routing"]
