"""Where each architecture keeps its MLPs: a small data table, plus auto-detection.

A dense gated MLP is described by the names of its projections; an MoE block
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) by the name of its fused expert module.
To support a new architecture, register an `ArchSpec`:

    moeify.models.arch.register(ArchSpec(model_type="my_llama", act_key="hidden_act"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..errors import InputError
from ..core.dense import GatedWeights
from ..blocks.moe import MoEMLP


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layers: str = "model.layers"  # attribute path from the CausalLM to the decoder layers
    mlp: str = "mlp"  # attribute of a decoder layer holding the MLP / MoE block
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None  # fused [gate; up] projection (Phi-3)
    down: str = "down_proj"
    act_key: str = "hidden_act"  # config field naming the activation
    experts: str | None = None  # MoE block: attribute of the fused experts module
    shared_expert: str | None = None  # MoE block: attribute of a shared-expert MLP (Qwen2-MoE)
    mlp_post_norm: str | None = None  # decoder-layer norm applied to the MLP output before the residual add (Gemma 2/3)


ARCHITECTURES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.model_type] = spec
    return spec


for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
    register(ArchSpec(model_type=_t))
register(ArchSpec(model_type="gemma2", act_key="hidden_activation", mlp_post_norm="post_feedforward_layernorm"))
register(ArchSpec(model_type="gemma3_text", act_key="hidden_activation", mlp_post_norm="post_feedforward_layernorm"))
register(ArchSpec(model_type="phi3", gate=None, up=None, gate_up="gate_up_proj"))
register(ArchSpec(model_type="mixtral", experts="experts"))
register(ArchSpec(model_type="qwen2_moe", experts="experts", shared_expert="shared_expert"))
register(ArchSpec(model_type="qwen3_moe", experts="experts"))
register(ArchSpec(model_type="olmoe", experts="experts"))

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def base_model_type(config) -> str:
    """The dense architecture's model_type, also for moeify's own `moeify_<type>` configs."""
    mt = getattr(config, "model_type", "")
    return mt[len("moeify_") :] if mt.startswith("moeify_") else mt


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _looks_gated(mlp: nn.Module) -> bool:
    return all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def unsupported_message(model_type: str) -> str:
    return (
        f"architecture {model_type!r} is not supported. Supported dense: {', '.join(DENSE_TYPES)}; "
        f"MoE (hierarchical): {', '.join(MOE_TYPES)}. Llama-like models whose layers have "
        "mlp.gate_proj/up_proj/down_proj are detected automatically. To describe a new one: "
        "moeify.models.arch.register(moeify.models.arch.ArchSpec(model_type=..., layers='model.layers', mlp='mlp', "
        "gate='gate_proj', up='up_proj', down='down_proj', act_key='hidden_act'))."
    )


def spec_for(model) -> ArchSpec:
    """The ArchSpec of a loaded CausalLM; auto-detects Llama-like gated MLPs."""
    config = model.config
    mt = base_model_type(config)
    if mt in ARCHITECTURES:
        return ARCHITECTURES[mt]
    try:
        layers = _get(model, "model.layers")
        first = layers[0].mlp
    except (AttributeError, IndexError, TypeError):
        raise InputError(unsupported_message(mt)) from None
    if _looks_gated(first) and hasattr(config, "hidden_act"):
        return ArchSpec(model_type=mt)
    raise InputError(unsupported_message(mt))


def check_config_supported(config) -> None:
    """Fail fast on a config (before any weights are loaded)."""
    mt = base_model_type(config)
    if mt not in ARCHITECTURES and not hasattr(config, "hidden_act"):
        raise InputError(unsupported_message(mt))
    if getattr(config, "mlp_bias", False):
        raise InputError(f"{mt} with mlp_bias=True is not supported: moeify's MoE block has no MLP biases.")


def decoder_layers(model, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or spec_for(model)
    return _get(model, spec.layers)


def activation_name(config, spec: ArchSpec) -> str:
    name = getattr(config, spec.act_key, None) or getattr(config, "hidden_act", None)
    if name is None:
        raise InputError(f"config has no {spec.act_key!r}; cannot tell the MLP activation.")
    return name


def is_dense_mlp(module: nn.Module, spec: ArchSpec) -> bool:
    if isinstance(module, MoEMLP):
        return False
    if spec.gate_up:
        return isinstance(getattr(module, spec.gate_up, None), nn.Linear)
    return isinstance(getattr(module, spec.gate or "", None), nn.Linear) and isinstance(getattr(module, spec.up or "", None), nn.Linear)


def dense_weights(module: nn.Module, spec: ArchSpec, act: str) -> GatedWeights:
    """The (gate, up, down) weights of a dense gated MLP module (no copies)."""
    for name in (spec.gate_up,) if spec.gate_up else (spec.gate, spec.up):
        lin = getattr(module, name)
        if lin.bias is not None:
            raise InputError("MLPs with biases are not supported by moeify's MoE block.")
    if spec.gate_up:
        gate, up = getattr(module, spec.gate_up).weight.chunk(2, dim=0)
    else:
        gate, up = getattr(module, spec.gate).weight, getattr(module, spec.up).weight
    down = getattr(module, spec.down).weight
    return GatedWeights(gate=gate.detach(), up=up.detach(), down=down.detach(), act=act)


def expert_weights(block: nn.Module, spec: ArchSpec, act: str) -> list[GatedWeights]:
    """Per-expert weights of a fused MoE block (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    experts = getattr(block, spec.experts)
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    out = []
    for e in range(gu.shape[0]):
        g, u = gu[e].chunk(2, dim=0)
        out.append(GatedWeights(gate=g, up=u, down=dn[e], act=act))
    return out


@dataclass
class MLPSite:
    """One place in the model that holds an MLP: dense, already an MoEMLP, or an MoE block."""

    layer: int
    parent: nn.Module
    attr: str
    kind: str  # "dense" | "moeify" | "moe_block" | "other"

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    def replace(self, new: nn.Module) -> None:
        setattr(self.parent, self.attr, new)


def mlp_sites(model, spec: ArchSpec | None = None) -> Iterator[MLPSite]:
    spec = spec or spec_for(model)
    for i, layer in enumerate(decoder_layers(model, spec)):
        mod = getattr(layer, spec.mlp)
        if isinstance(mod, MoEMLP):
            kind = "moeify"
        elif spec.experts and hasattr(mod, spec.experts):
            kind = "moe_block"
        elif is_dense_mlp(mod, spec) or _looks_gated(mod):
            kind = "dense"
        else:
            kind = "other"
        yield MLPSite(layer=i, parent=layer, attr=spec.mlp, kind=kind)


def intermediate_sizes(model, spec: ArchSpec | None = None) -> list[int]:
    spec = spec or spec_for(model)
    sizes = []
    for site in mlp_sites(model, spec):
        m = site.module
        if site.kind == "moeify":
            sizes.append(m.shared_size + m.routed_size)
        elif site.kind == "dense":
            w = dense_weights(m, spec, "silu")
            sizes.append(w.intermediate_size)
        else:
            sizes.append(0)
    return sizes

