"""A Llama-like architecture that is in no table here is auto-detected and converts, saves and reloads end to end.

Before the fix, `spec_for` detected such a model, the whole conversion ran, and then building the
`moeify_<type>` classes raised a raw KeyError (transformers' Auto mappings did not know the type).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import moeify
from moeify.models.arch import ARCHITECTURES, spec_for
from moeify.models.checkpoint import load_model

from .conftest import COMMON


class MyLlamaConfig(LlamaConfig):
    model_type = "my_llama"


class MyLlamaForCausalLM(LlamaForCausalLM):
    config_class = MyLlamaConfig


class UnregisteredConfig(LlamaConfig):
    """Known to no Auto class (as a model built from its classes directly, e.g. from user code)."""

    model_type = "my_unregistered_llama"


class UnregisteredForCausalLM(LlamaForCausalLM):
    config_class = UnregisteredConfig


def _tiny(cfg_cls, model_cls, seed=0):
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(intermediate_size=96, **COMMON)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _ids(n=4, L=48, seed=0):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def my_llama_registered():
    AutoConfig.register("my_llama", MyLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(MyLlamaConfig, MyLlamaForCausalLM, exist_ok=True)


@pytest.mark.parametrize("method", ["mlpmoe", "cmoe"])
def test_registered_llama_like_type_converts_saves_and_reloads(method, my_llama_registered, tmp_path, probe_ids):
    dense = _tiny(MyLlamaConfig, MyLlamaForCausalLM)
    assert "my_llama" not in ARCHITECTURES and spec_for(dense).model_type == "my_llama"  # auto-detected, no table row
    if method == "cmoe":
        cal = moeify.Calibration.from_windows(_ids(), _ids(1, seed=9), batch_size=2)
        conv = moeify.convert(dense, moeify.CMoEConfig(layout="S1A2E4"), calibration=cal, progress=False)
    else:
        conv = moeify.convert(dense, moeify.MLPMoEConfig(branches=3), progress=False)
    assert conv.config.model_type == "moeify_my_llama" and isinstance(conv, MyLlamaForCausalLM)
    with torch.no_grad():
        ref = conv(probe_ids).logits
    out = conv.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "moeify_my_llama" and cfg["moeify"]["base_model_type"] == "my_llama"
    re = AutoModelForCausalLM.from_pretrained(out)
    assert type(re) is type(conv) and isinstance(re.model.layers[0].mlp, moeify.MoEMLP)
    with torch.no_grad():
        assert torch.equal(re(probe_ids).logits, ref)
    again, _ = load_model(str(out), with_tokenizer=False)  # moeify's own loader (checks before weights are read)
    with torch.no_grad():
        assert torch.equal(again(probe_ids).logits, ref)


def test_type_unknown_to_the_auto_classes_converts_saves_and_reloads(tmp_path, probe_ids):
    dense = _tiny(UnregisteredConfig, UnregisteredForCausalLM)
    conv = moeify.convert(dense, moeify.MLPMoEConfig(branches=2), progress=False)
    assert conv.config.model_type == "moeify_my_unregistered_llama"
    with torch.no_grad():
        ref = conv(probe_ids).logits
    re = AutoModelForCausalLM.from_pretrained(conv.save_pretrained(tmp_path / "ckpt"))
    assert isinstance(re, UnregisteredForCausalLM) and isinstance(re.model.layers[1].mlp, moeify.MoEMLP)
    with torch.no_grad():
        assert torch.equal(re(probe_ids).logits, ref)


RELOADS = {
    # AutoModelForCausalLM needs moeify_<type>'s classes built first; moeify.load builds them from config.json itself
    "auto_classes": 'from moeify.models.modeling import classes_for\nclasses_for("my_llama")\nmodel = AutoModelForCausalLM.from_pretrained({out!r})',
    "moeify_load": "model, _ = moeify.load_model({out!r}, with_tokenizer=False)",
}


@pytest.mark.parametrize("reload", list(RELOADS))
def test_fresh_process_reloads_after_registering_the_base_type(my_llama_registered, tmp_path, probe_ids, reload):
    conv = moeify.convert(_tiny(MyLlamaConfig, MyLlamaForCausalLM, seed=3), moeify.MLPMoEConfig(branches=2), progress=False)
    with torch.no_grad():
        torch.save({"ids": probe_ids, "logits": conv(probe_ids).logits}, tmp_path / "ref.pt")
    out = conv.save_pretrained(tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        import moeify

        class MyLlamaConfig(LlamaConfig):
            model_type = "my_llama"

        class MyLlamaForCausalLM(LlamaForCausalLM):
            config_class = MyLlamaConfig

        AutoConfig.register("my_llama", MyLlamaConfig)
        AutoModelForCausalLM.register(MyLlamaConfig, MyLlamaForCausalLM)
        ref = torch.load({str(tmp_path / "ref.pt")!r})
    """) + RELOADS[reload].format(out=str(out)) + textwrap.dedent("""
        with torch.no_grad():
            assert torch.equal(model(ref["ids"]).logits, ref["logits"])
        print("reloaded", type(model).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reloaded MoeifyMyLlamaForCausalLM" in r.stdout


def test_fresh_process_without_the_base_type_gets_a_clear_message():
    from moeify.errors import InputError
    from moeify.models.modeling import classes_for

    with pytest.raises(InputError, match=r"register its config.*AutoConfig.register\('never_heard_of_it'"):
        classes_for("never_heard_of_it")
