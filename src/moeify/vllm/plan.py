"""Which moeify checkpoints the vLLM plugin serves exactly, checked from config.json alone (no vLLM import).

Served: every converted layer that is one `MoEMLP` (shared expert + one level of routed
experts of any sizes) with any router of `moeify.blocks.routers.ROUTERS` (the plugin runs
moeify's own router modules), gate "unit", "cmoe" or "softmax", expert scales, selection
bias and compensation vectors, and an activation vLLM's fused MoE kernels compute
(SiLU, exact GELU, tanh-approximated GELU). Everything else is refused with a message
that says why and what to do instead; nothing is approximated.
"""

from __future__ import annotations

from typing import Any

from ..blocks.moe import FORMAT_VERSION
from ..blocks.routers import ROUTERS
from ..errors import InputError
from ..models.arch import ARCHITECTURES, activation_name, base_model_type

# moeify activation (transformers ACT2FN name) -> vLLM MoEActivation value; the shared expert uses the same function
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}

# the keys of a layer's config.json entry this plugin knows (LayerPlan.to_config); anything else is refused
LAYER_KEYS = {"shared", "experts", "top_k", "router", "gate", "compensate"}
GATES = ("unit", "cmoe", "softmax")

_ELSEWHERE = "serve it with transformers + moeify instead (moeify.load(DIR) or AutoModelForCausalLM after `import moeify`)"


class NotServable(InputError):
    """A moeify checkpoint the vLLM plugin cannot serve exactly."""


def check_layer(i: int, cfg: dict[str, Any], act: str) -> None:
    """Refuse a converted layer's config entry that the vLLM block would not compute exactly as MoEMLP does."""
    where = f"moeify.vllm: layer {i}"
    if cfg.get("kind") == "hierarchical":
        raise NotServable(f"{where} holds a hierarchical MoE block (each expert split again into sub-experts); vLLM's fused "
                          f"MoE layer runs one level of experts, so the plugin cannot serve it exactly - {_ELSEWHERE}.")
    unknown = set(cfg) - LAYER_KEYS
    if unknown:
        raise NotServable(f"{where} has block settings {sorted(unknown)} this version of the vLLM plugin does not know "
                          f"(known: {sorted(LAYER_KEYS)}); upgrade moeify or {_ELSEWHERE}.")
    sizes = cfg.get("experts")
    if not isinstance(sizes, list) or any(not isinstance(m, int) or m <= 0 for m in sizes):
        raise NotServable(f"{where}: 'experts' must be a list of positive expert sizes, got {sizes!r}; the config is corrupt.")
    shared = cfg.get("shared")
    if not isinstance(shared, int) or shared < 0:
        raise NotServable(f"{where}: 'shared' must be a non-negative size, got {shared!r}; the config is corrupt.")
    if sizes and not 1 <= int(cfg.get("top_k", 0)) <= len(sizes):
        raise NotServable(f"{where}: top_k={cfg.get('top_k')!r} must lie in 1..{len(sizes)}; the config is corrupt.")
    rtype = (cfg.get("router") or {"type": "static"}).get("type", "static")
    if rtype not in ROUTERS:
        raise NotServable(f"{where} uses router {rtype!r}, which this moeify does not know (known: {sorted(ROUTERS)}); "
                          "upgrade moeify.")
    gate = cfg.get("gate", "unit")
    if gate not in GATES:
        raise NotServable(f"{where} uses gate {gate!r}; the plugin serves gates {list(GATES)} - {_ELSEWHERE}.")
    if act not in ACTIVATIONS:
        raise NotServable(f"moeify.vllm: the MLP activation {act!r} is not one vLLM's fused MoE kernels compute "
                          f"(served: {sorted(ACTIVATIONS)}) - {_ELSEWHERE}.")


def servable_layers(config) -> tuple[list[dict[str, Any] | None], str]:
    """(per-layer block configs, None for layers left dense; the MLP activation) of a moeify config, or NotServable."""
    mo = getattr(config, "moeify", None)
    if not isinstance(mo, dict):
        raise NotServable("moeify.vllm: config.json has no 'moeify' block; this is not a moeify checkpoint.")
    version = mo.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise NotServable(f"moeify.vllm: checkpoint format version {version!r}, this moeify reads version {FORMAT_VERSION}; "
                          "use the moeify version that wrote it.")
    mt = mo.get("base_model_type") or base_model_type(config)
    spec = ARCHITECTURES.get(mt)
    if spec is None:
        raise NotServable(f"moeify.vllm: base architecture {mt!r} has no vLLM model in the plugin - {_ELSEWHERE}.")
    layers = list(mo.get("layers") or [])
    n = int(config.num_hidden_layers)
    if len(layers) != n:
        raise NotServable(f"moeify.vllm: the checkpoint plan has {len(layers)} layers but the model has {n}; the config is corrupt.")
    act = activation_name(config, spec)
    for i, cfg in enumerate(layers):
        if cfg is None:
            continue
        if spec.experts is not None:
            raise NotServable(f"moeify.vllm: layer {i} of this {mt} checkpoint holds moeify blocks inside the model's own MoE "
                              f"experts (hierarchical); vLLM's fused MoE layer runs one level of experts - {_ELSEWHERE}.")
        check_layer(i, cfg, act)
    return layers, act


__all__ = ["ACTIVATIONS", "GATES", "LAYER_KEYS", "NotServable", "check_layer", "servable_layers"]
