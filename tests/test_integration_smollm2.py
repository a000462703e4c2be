"""The real SmolLM2-135M-Instruct and the real Austen corpus (fetched by `moeify pull`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    model, tok = moeify.load_model()
    return model, tok


@pytest.fixture(scope="module")
def probe(smollm2):
    _, tok = smollm2
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
             "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"]
    return tok(texts, return_tensors="pt", padding=True).input_ids


def test_default_model_is_the_protocol_model(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert c.tie_word_embeddings
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6


def test_mlpmoe_on_smollm2_is_exact_saves_and_reloads(smollm2, probe, tmp_path):
    import copy

    dense, tok = smollm2
    with torch.no_grad():
        ref = dense(probe).logits
    conv = moeify.convert(copy.deepcopy(dense), moeify.MLPMoEConfig(branches=8), tokenizer=tok, progress=False)
    assert conv.config.moeify["summary"]["seconds"] < 60
    with torch.no_grad():
        out = conv(probe).logits
    assert (out - ref).abs().max().item() <= 1e-4
    path = conv.save_pretrained(tmp_path / "smollm2-b8")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["moeify"]["provenance"]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    re = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(re(probe).logits, out)
    assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()


def test_austen_perplexity_of_exact_conversion_matches_dense(smollm2):
    """Two austen-v1 held-out windows: the exact transform must not move perplexity."""
    import copy

    from moeify.eval.perplexity import compare_perplexity
    from moeify.texts import perplexity_windows

    dense, tok = smollm2
    windows = perplexity_windows(tok, source="austen", quick=True)[:2, :512]
    conv = moeify.convert(copy.deepcopy(dense), moeify.MLPMoEConfig(branches=8), progress=False)
    r = compare_perplexity(conv, dense, windows)
    assert 10 < r["baseline"] < 80  # real English prose, not noise
    assert abs(r["ratio"] - 1) < 5e-4
