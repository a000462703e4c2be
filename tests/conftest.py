"""Tiny random models of every supported architecture, built in code (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU-only machines; read when triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


def tiny_config(arch: str, intermediate: int = 96, *, common: dict | None = None, head_dim: int = 16, sliding_window: int = 32, **over):
    """A small config of every supported architecture (tests_vllm builds larger ones from it)."""
    import transformers as tf

    kw = dict(COMMON if common is None else common, intermediate_size=intermediate, **over)
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "mistral":
        return tf.MistralConfig(**kw)
    if arch == "qwen2":
        return tf.Qwen2Config(**kw)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=head_dim, **kw)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=head_dim, **kw)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=head_dim, **kw)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=head_dim, sliding_window=sliding_window, **kw)
    if arch == "phi3":
        return tf.Phi3Config(pad_token_id=0, **kw)
    if arch == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate // 2, shared_expert_intermediate_size=intermediate, **kw)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate // 2, head_dim=head_dim, **kw)
    if arch == "olmoe":
        return tf.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **kw)
    raise KeyError(arch)


DENSE_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def tiny_model(arch: str = "llama", seed: int = 0, intermediate: int = 96, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, intermediate, **over), dtype=torch.float32).eval()
    # Random init leaves some norms at exactly 1 / 0: perturb every parameter so no neuron is trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture
def probe_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)


def save_tiny_llama(path):
    """A tiny Llama saved as a safetensors folder with a small word-level tokenizer (words w0..w125)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(126)}
    vocab["[UNK]"] = 126
    vocab["[EOS]"] = 127
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    tiny_model("llama").save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved as a safetensors folder with a small word-level tokenizer."""
    return save_tiny_llama(tmp_path / "tiny-llama")


def random_gated_weights(d_h: int = 96, H: int = 32, seed: int = 0):
    """A random SiLU-gated MLP (W_down scaled by 1/10), seeded."""
    from moeify.core.dense import GatedWeights

    g = torch.Generator().manual_seed(seed)
    return GatedWeights(torch.randn(d_h, H, generator=g), torch.randn(d_h, H, generator=g), torch.randn(H, d_h, generator=g) / 10, "silu")


def random_hidden(T: int = 256, H: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


def random_ids(n: int, L: int, seed: int) -> torch.Tensor:
    """Token-id windows [n, L] from the tiny models' 128-token vocabulary, seeded."""
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))
