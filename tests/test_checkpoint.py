"""Save -> reload with stock transformers; atomic writes; refusal to overwrite."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeify
from moeify.errors import InputError
from moeify.blocks.moe import MoEMLP

from .conftest import DENSE_ARCHS, tiny_model


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_reload_gives_identical_logits(arch, tmp_path, probe_ids):
    conv = moeify.convert(tiny_model(arch), moeify.MLPMoEConfig(branches=3, prune=0.25, prune_mode="fractal-fade"), progress=False)
    with torch.no_grad():
        ref = conv(probe_ids).logits
    out = conv.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == f"moeify_{arch}"
    assert cfg["moeify"]["method"] == "mlpmoe" and cfg["moeify"]["format_version"] == 1
    assert cfg["intermediate_size"] == 96 and cfg["hidden_size"] == 64  # base fields kept
    assert len(cfg["moeify"]["layers"]) == 2 and cfg["moeify"]["layers"][0]["experts"]
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    re = AutoModelForCausalLM.from_pretrained(out)
    assert type(re) is type(conv)
    with torch.no_grad():
        assert torch.equal(re(probe_ids).logits, ref)
    blk = re.model.layers[0].mlp
    assert isinstance(blk, MoEMLP)
    # the neuron ids survive: they say which dense neurons each expert holds
    assert torch.equal(blk.routed_index, conv.model.layers[0].mlp.routed_index)


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    conv = moeify.convert(model, moeify.MLPMoEConfig(branches=4), progress=False)
    out = conv.save_pretrained(tmp_path / "tied")
    re = AutoModelForCausalLM.from_pretrained(out)
    assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        re.model.embed_tokens.weight[0, 0] += 1.0
    assert re.lm_head.weight[0, 0] == re.model.embed_tokens.weight[0, 0]


def test_untied_embeddings_stay_untied(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=False)
    conv = moeify.convert(model, moeify.MLPMoEConfig(branches=4), progress=False)
    re = AutoModelForCausalLM.from_pretrained(conv.save_pretrained(tmp_path / "untied"))
    assert re.lm_head.weight.data_ptr() != re.model.embed_tokens.weight.data_ptr()
    assert torch.equal(re.lm_head.weight, conv.lm_head.weight)


def test_existing_output_is_refused_and_overwrite_replaces(tmp_path, probe_ids):
    conv = moeify.convert(tiny_model("qwen2"), moeify.MLPMoEConfig(branches=2), progress=False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="already exists"):
        conv.save_pretrained(target)
    assert (target / "keep.txt").read_text() == "precious"
    conv.save_pretrained(target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()


def test_interrupted_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    conv = moeify.convert(tiny_model("llama"), moeify.MLPMoEConfig(branches=2), progress=False)
    import moeify.models.modeling as api

    def boom(model):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(api, "model_card", boom)  # fails after the weights were written
    with pytest.raises(KeyboardInterrupt):
        conv.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind either


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch, probe_ids):
    conv = moeify.convert(tiny_model("llama"), moeify.MLPMoEConfig(branches=2), progress=False)
    good = conv.save_pretrained(tmp_path / "ck")
    before = (good / "model.safetensors").read_bytes()
    import moeify.models.modeling as api

    monkeypatch.setattr(api, "model_card", lambda m: (_ for _ in ()).throw(RuntimeError("disk full")))
    other = moeify.convert(tiny_model("llama", seed=5), moeify.MLPMoEConfig(branches=2), progress=False)
    with pytest.raises(RuntimeError):
        other.save_pretrained(good, overwrite=True)
    assert (good / "model.safetensors").read_bytes() == before


def test_model_card_and_config_record_provenance(tmp_path):
    model = tiny_model("gemma3_text")
    conv = moeify.convert(copy.deepcopy(model), moeify.MLPMoEConfig(branches=4, prune=0.2, prune_mode="uniform"), progress=False)
    out = conv.save_pretrained(tmp_path / "g3")
    card = (out / "README.md").read_text()
    assert "mlpmoe" in card and "MLP parameters removed: 0.19" in card
    prov = json.loads((out / "config.json").read_text())["moeify"]["provenance"]
    assert prov["moeify_version"] == moeify.__version__ and prov["transformers_version"]
