"""Perplexity (moeify.eval.perplexity) against an independent reference on a tiny model."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from moeify.errors import InputError
from moeify.eval import perplexity as ppl_mod
from moeify.eval.perplexity import compare_perplexity, perplexity

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256)


def tiny_llama(seed=0, cls=LlamaForCausalLM):
    torch.manual_seed(seed)
    return cls(LlamaConfig(**CONFIG)).eval()


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, CONFIG["vocab_size"], (5, 37), generator=g)


def reference_ppl(model, windows):
    """exp of the mean per-token NLL, from HF's own loss, one window at a time.
    Every window predicts the same number of tokens (L-1), so the mean of the
    per-window mean losses is the mean over all tokens."""
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.double() for w in windows]
    return math.exp(torch.stack(losses).mean().item())


@pytest.mark.parametrize("batch_size,chunk_tokens", [(1, 512), (2, 7), (5, 1), (3, 16)])
def test_matches_reference(windows, batch_size, chunk_tokens):
    model = tiny_llama()
    got = perplexity(model, windows, batch_size=batch_size, progress=False,
                     chunk_tokens=chunk_tokens)
    assert got["ppl"] == pytest.approx(reference_ppl(model, windows), rel=1e-5)
    assert got["nll"] == pytest.approx(math.log(got["ppl"]), rel=1e-12)
    assert got["windows"] == 5 and got["tokens"] == 5 * 36 and got["seq_len"] == 37


def test_uses_split_path_and_never_full_logits(windows, monkeypatch):
    model = tiny_llama()
    calls = []
    real = ppl_mod._nll_sum
    monkeypatch.setattr(ppl_mod, "_nll_sum", lambda lg, t: calls.append(lg.shape) or real(lg, t))
    perplexity(model, windows, batch_size=2, progress=False, chunk_tokens=8)
    assert calls and max(s[0] * s[1] for s in calls) <= 8  # rows of logits per chunk


class HalvedLogits(LlamaForCausalLM):
    """Post-processes its logits, so lm_head(decoder(x)) is not its output."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        logits = out.logits * 0.5
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_falls_back_when_split_does_not_reproduce_logits(windows):
    model = tiny_llama(cls=HalvedLogits)
    got = perplexity(model, windows, batch_size=2, progress=False, chunk_tokens=10)
    assert got["ppl"] == pytest.approx(reference_ppl(model, windows), rel=1e-5)
    plain = perplexity(tiny_llama(), windows, progress=False)
    assert got["ppl"] != pytest.approx(plain["ppl"], rel=1e-3)


def test_compare_with_itself_gives_ratio_one(windows):
    model = tiny_llama()
    out = compare_perplexity(model, model, windows, progress=False)
    assert set(out) == {"model", "baseline", "ratio", "windows", "tokens"}
    assert out["ratio"] == 1.0
    assert out["windows"] == 5 and out["tokens"] == 180


def test_compare_different_models(windows):
    a, b = tiny_llama(0), tiny_llama(1)
    out = compare_perplexity(a, b, windows, batch_size=2, progress=False)
    assert out["model"] == pytest.approx(reference_ppl(a, windows), rel=1e-5)
    assert out["baseline"] == pytest.approx(reference_ppl(b, windows), rel=1e-5)
    assert out["ratio"] == pytest.approx(out["model"] / out["baseline"])


def test_restores_training_mode_and_bf16_autocast(windows):
    model = tiny_llama().train()
    got = perplexity(model, windows, dtype=torch.bfloat16, progress=False)
    assert model.training
    assert got["ppl"] == pytest.approx(reference_ppl(model.eval(), windows), rel=5e-2)


def test_bad_windows():
    model = tiny_llama()
    with pytest.raises(InputError):
        perplexity(model, torch.arange(10), progress=False)
    with pytest.raises(InputError):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(InputError):
        perplexity(model, torch.zeros(2, 8), progress=False)
