"""Serve moeify checkpoints in vLLM: a vLLM plugin (entry point `vllm.general_plugins`: moeify = moeify.vllm:register).

With moeify installed next to vLLM, `vllm serve DIR` and `vllm.LLM(DIR)` load a converted
checkpoint with no extra flags: vLLM calls `register()` in every process it starts, which
registers moeify's configs with transformers (vLLM reads config.json through AutoConfig) and
one vLLM model class per architecture (`Moeify<Base>ForCausalLM`, config.json's
"architectures"). Each class is vLLM's own model code for the base architecture with the MLP
of every converted layer replaced by `moeify.vllm.block.MoeifyMoE`: the shared expert as a
vLLM MLP, the routed experts through vLLM's fused MoE layer, the router computed by moeify's
own router modules and `MoEMLP.route`. A checkpoint that cannot be served exactly is refused
when the model is built (`moeify.vllm.plan`).

Importing this package imports nothing from vLLM; `import moeify` never imports it.
"""

from __future__ import annotations

# vLLM module and CausalLM class of each base architecture moeify serves; moeify's class is "Moeify" + the base's name
_BASE_MODELS = [
    ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
    ("gemma", "GemmaForCausalLM"), ("gemma2", "Gemma2ForCausalLM"), ("gemma3", "Gemma3ForCausalLM"), ("phi3", "Phi3ForCausalLM"),
    # MoE base models: served as long as no layer holds a (hierarchical) moeify block, refused otherwise
    ("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM"), ("olmoe", "OlmoeForCausalLM"),
]
# moeify's architecture name (config.json "architectures") -> (vLLM module, vLLM class) of the base model
BASES: dict[str, tuple[str, str]] = {f"Moeify{cls}": (f"vllm.model_executor.models.{module}", cls) for module, cls in _BASE_MODELS}


def register() -> None:
    """vLLM plugin entry point: moeify's configs for AutoConfig, its model classes for vLLM's registry.

    vLLM pickles the config into the processes it spawns; moeify.models.modeling keeps its
    dynamically created classes as module attributes, so they unpickle there by name.
    """
    from ..models import modeling
    from vllm import ModelRegistry

    modeling.register_all()

    for arch in BASES:
        ModelRegistry.register_model(arch, f"moeify.vllm.models:{arch}")


__all__ = ["BASES", "register"]
