"""Bad input gets a clear error before any heavy work."""

from __future__ import annotations

import json
import pickle

import pytest
import moeify
from moeify.errors import InputError
from moeify.models.checkpoint import check_weights, load_model

from .conftest import tiny_model


def test_unknown_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(InputError) as e:
        moeify.convert(gpt2, moeify.MLPMoEConfig(), progress=False)
    msg = str(e.value)
    assert "gpt2" in msg and "llama" in msg and "phi3" in msg and "register" in msg


def test_llama_like_unknown_type_is_auto_detected(probe_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moeify.models.arch import spec_for

    class MyConfig(LlamaConfig):
        model_type = "my_llama_clone"

    m = LlamaForCausalLM(MyConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=128))
    assert spec_for(m).model_type == "my_llama_clone"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(branches=0), "positive integer"),
        (dict(prune=1.0), r"\[0, 1\)"),
        (dict(prune=-0.1), r"\[0, 1\)"),
        (dict(prune_mode="magic"), "fractal-fade"),
        (dict(branches=4, prune=0.8), "at most 0.750"),
    ],
)
def test_impossible_mlpmoe_configs(kwargs, match):
    with pytest.raises(InputError, match=match):
        moeify.MLPMoEConfig(**kwargs)


def test_more_branches_than_neurons_is_refused_before_conversion():
    model = tiny_model("llama", intermediate=40)
    before = model.model.layers[0].mlp
    with pytest.raises(InputError, match="at most 40 branches"):
        moeify.convert(model, moeify.MLPMoEConfig(branches=41), progress=False)
    assert model.model.layers[0].mlp is before  # nothing was touched


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="no weights"):
        check_weights(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        check_weights(empty)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": 1}, f)
    with pytest.raises(InputError, match="never unpickles"):
        load_model(str(tmp_path))


def test_corrupt_and_truncated_safetensors(tiny_dir):
    st = tiny_dir / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|corrupt"):
        load_model(str(tiny_dir))
    st.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt|not a readable"):
        load_model(str(tiny_dir))


def test_missing_shard(tiny_dir):
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError, match="missing weight shard"):
        check_weights(tiny_dir)


def test_nonexistent_model_path_gives_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="could not find model|does not exist"):
        load_model(str(tmp_path / "does" / "not" / "exist.gguf"))


def test_wrong_config_type():
    with pytest.raises(InputError, match="method config"):
        moeify.convert(tiny_model("llama"), {"branches": 2})


def test_unknown_method_and_option():
    with pytest.raises(InputError, match="unknown method"):
        moeify.config_for("nope")
    with pytest.raises(InputError, match="no option"):
        moeify.config_for("mlpmoe", layout="S1A1E8")


def test_mlp_bias_is_refused():
    from transformers import LlamaConfig

    from moeify.models.arch import check_config_supported

    with pytest.raises(InputError, match="mlp_bias"):
        check_config_supported(LlamaConfig(mlp_bias=True))


def test_plan_validation_catches_lost_and_duplicate_neurons():
    from moeify.core.plan import LayerPlan

    with pytest.raises(InputError, match="covers 9 of 10"):
        LayerPlan(shared=[0], experts=[[1, 2, 3], [4, 5, 6, 7, 8]], top_k=1).validate(10)
    with pytest.raises(InputError, match="more than one expert"):
        LayerPlan(shared=[0, 1], experts=[[1, 2, 3, 4, 5, 6, 7, 8, 9]], top_k=1).validate(11, allow_missing=True)
    with pytest.raises(InputError, match="top_k"):
        LayerPlan(shared=[], experts=[[0], [1]], top_k=3).validate(2)
    ok = LayerPlan(shared=[0], experts=[[1, 2], [3]], top_k=2)
    ok.validate(4)  # a valid plan passes
    assert ok.num_neurons == 4 and ok.expert_sizes == [2, 1]


def test_check_model_source_before_any_weight_is_read(tmp_path, monkeypatch):
    import moeify.data.texts as texts
    from moeify.models.checkpoint import check_model_source

    monkeypatch.setattr(texts, "_HUB_STATUS", {"https://huggingface.co": "unreachable (test)"})
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match=r"^MODEL .*missing: no such model folder"):
        check_model_source(str(tmp_path / "missing"))
    with pytest.raises(InputError, match=r"^--baseline .*file.txt: .* is a file"):
        check_model_source(str(tmp_path / "file.txt"), what="--baseline")
    with pytest.raises(InputError, match=r"GGUF file .* does not exist"):
        check_model_source(str(tmp_path / "m.gguf"))
    with pytest.raises(InputError, match=r"^MODEL org/model: 'org/model' is not a local folder, and the Hugging Face hub is not reachable"):
        check_model_source("org/model")


def test_check_model_source_returns_the_config(tiny_dir):
    from moeify.models.checkpoint import check_model_source, load_tokenizer, recorded_base_model

    path, cfg = check_model_source(str(tiny_dir))
    assert path == str(tiny_dir) and cfg.intermediate_size == 96 and recorded_base_model(cfg) is None
    assert len(load_tokenizer(path)) == 128
    with pytest.raises(InputError, match="could not load its tokenizer"):
        (tiny_dir / "tokenizer.json").unlink()
        (tiny_dir / "tokenizer_config.json").unlink()
        load_tokenizer(str(tiny_dir))
