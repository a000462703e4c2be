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

# moeify's architecture name (config.json "architectures") -> (vLLM module, vLLM class) of the base model
BASES: dict[str, tuple[str, str]] = {
    "MoeifyLlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MoeifyMistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "MoeifyQwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "MoeifyQwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
    "MoeifyGemmaForCausalLM": ("vllm.model_executor.models.gemma", "GemmaForCausalLM"),
    "MoeifyGemma2ForCausalLM": ("vllm.model_executor.models.gemma2", "Gemma2ForCausalLM"),
    "MoeifyGemma3ForCausalLM": ("vllm.model_executor.models.gemma3", "Gemma3ForCausalLM"),
    "MoeifyPhi3ForCausalLM": ("vllm.model_executor.models.phi3", "Phi3ForCausalLM"),
    # MoE base models: served as long as no layer holds a (hierarchical) moeify block, refused otherwise
    "MoeifyMixtralForCausalLM": ("vllm.model_executor.models.mixtral", "MixtralForCausalLM"),
    "MoeifyQwen2MoeForCausalLM": ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "MoeifyQwen3MoeForCausalLM": ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "MoeifyOlmoeForCausalLM": ("vllm.model_executor.models.olmoe", "OlmoeForCausalLM"),
}


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
