"""Streaming conversion (pipeline/streaming.py): one decoder layer at a time from disk, the same checkpoint as in memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import moeify
from moeify import CMoEConfig, MLPMoEConfig
from moeify.errors import InputError
from moeify.pipeline import streaming
from moeify.pipeline.streaming import LayerLoader, ShardWriter, convert_streaming

from .conftest import DENSE_ARCHS, MOE_ARCHS, random_ids, save_tiny_llama, tiny_model


def _cal(batch_size: int = 2):
    return moeify.Calibration.from_windows(random_ids(4, 64, 0), random_ids(2, 64, 9), batch_size=batch_size)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]
    ca, cb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())
    assert ca["moeify"]["layers"] == cb["moeify"]["layers"]
    assert ca["moeify"]["config"] == cb["moeify"]["config"]
    assert {k: v for k, v in ca.items() if k != "moeify"} == {k: v for k, v in cb.items() if k != "moeify"}


def _in_memory(model, cfg, out: Path, **kw) -> Path:
    return moeify.save(moeify.convert(model, cfg, calibration=_cal() if cfg.needs_calibration else None, progress=False, **kw), out)


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_streamed_checkpoint_equals_in_memory_cmoe(arch, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path / "src")
    mem = _in_memory(tiny_model(arch), CMoEConfig(layout="S1A2E6", compensate=True), tmp_path / "mem")
    out, mo = convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6", compensate=True), tmp_path / "st", calibration=_cal(), progress=False)
    assert_same_checkpoint(mem, out)
    st = mo["summary"]["streaming"]
    assert st["source"] == "safetensors" and len(st["per_layer"]) == 2
    assert all(r["peak_rss_mib"] > 0 and r["tokens_per_s"] > 0 for r in st["per_layer"])
    assert mo["summary"]["per_layer"][0]["streaming"]["layer"] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_streamed_checkpoint_equals_in_memory_data_free_and_refit(arch, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path / "src")
    mem = _in_memory(tiny_model(arch), MLPMoEConfig(), tmp_path / "mem")
    out, _ = convert_streaming(tmp_path / "src", MLPMoEConfig(), tmp_path / "st", progress=False)
    assert_same_checkpoint(mem, out)
    mem = _in_memory(tiny_model(arch), CMoEConfig(layout="S1A2E6"), tmp_path / "mem-refit", refit=True)
    out, mo = convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "st-refit", calibration=_cal(), refit=True, progress=False)
    assert mo["refit"]["layers"] == 2
    assert_same_checkpoint(mem, out)


def test_hierarchical_conversion_of_a_moeify_checkpoint_streams(tmp_path):
    first = _in_memory(tiny_model("llama"), MLPMoEConfig(), tmp_path / "first")
    model, _ = moeify.load_model(str(first), with_tokenizer=False)
    mem = _in_memory(model, CMoEConfig(layout="S1A2E6"), tmp_path / "mem")
    out, _ = convert_streaming(first, CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), progress=False)
    assert_same_checkpoint(mem, out)


def test_large_tensors_are_written_block_by_block_and_read_back(tmp_path, monkeypatch):
    """Embedding and LM head above the threshold go through ShardWriter.write_rows (every 2-D tensor, here)."""
    monkeypatch.setattr(streaming, "BIG_TENSOR_BYTES", 0)
    tiny_model("qwen2").save_pretrained(tmp_path / "src")
    mem = _in_memory(tiny_model("qwen2"), CMoEConfig(layout="S1A2E6"), tmp_path / "mem")
    out, _ = convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), progress=False)
    assert_same_checkpoint(mem, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.embed_tokens.weight"] != index["weight_map"]["lm_head.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_rows_round_trip(tmp_path, dtype):
    w = ShardWriter(tmp_path, total=1)
    t = torch.randn(37, 8).to(dtype)
    w.write_rows("x.weight", (37, 8), dtype, iter(t.split(5)))
    w.finish()
    with safe_open(str(tmp_path / "model-00001-of-00001.safetensors"), "pt") as h:
        back = h.get_tensor("x.weight")
        assert h.metadata() == {"format": "pt"}
    assert back.dtype == dtype and torch.equal(back, t)


def test_write_rows_refuses_a_short_tensor(tmp_path):
    w = ShardWriter(tmp_path, total=1)
    with pytest.raises(RuntimeError, match="expected"):
        w.write_rows("x.weight", (4, 8), torch.float32, iter([torch.zeros(3, 8)]))


def test_safetensors_rows_are_the_tables_rows(tmp_path):
    from moeify.models.weights import SafetensorsSource

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src")
    src = SafetensorsSource(tmp_path / "src")
    ids = torch.tensor([5, 0, 127, 5, 64])
    table = model.model.embed_tokens.weight.detach()
    assert torch.equal(src.rows("model.embed_tokens.weight", ids), table[ids])
    assert torch.equal(torch.cat(list(src.row_blocks("model.embed_tokens.weight", 50))), table)


# --------------------------------------------------------------------------- GGUF


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (what transformers' GGUF loader undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path: Path, quant: str = "Q8_0") -> Path:
    """A tiny Llama as a GGUF file: F32 norms, `quant` matrices (q/k rows in llama.cpp's order)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}

    def add(name, t: torch.Tensor):
        a = t.detach().float().numpy()
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", model.model.embed_tokens.weight)
    add("output_norm.weight", model.model.norm.weight)
    add("output.weight", model.lm_head.weight)
    for i, layer in enumerate(model.model.layers):
        for hf, g in names.items():
            t = layer.get_submodule(hf).weight.detach()
            if g == "attn_q":
                t = torch.from_numpy(_permute(t.numpy(), c.num_attention_heads))
            elif g == "attn_k":
                t = torch.from_numpy(_permute(t.numpy(), c.num_key_value_heads))
            add(f"blk.{i}.{g}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_streamed_checkpoint_equals_in_memory(tmp_path):
    """The GGUF path: dequantised tensor by tensor (q/k rows put back in HF order) = transformers' from_pretrained(gguf_file=)."""
    from moeify.models.checkpoint import load_model

    gguf_file = write_tiny_gguf(tiny_model("llama"), tmp_path / "tiny.gguf")
    dense, _ = load_model(str(gguf_file), with_tokenizer=False)
    mem = _in_memory(dense, CMoEConfig(layout="S1A2E6"), tmp_path / "mem")
    out, mo = convert_streaming(gguf_file, CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), progress=False)
    assert mo["summary"]["streaming"]["source"] == "gguf"
    assert_same_checkpoint(mem, out)
    # and the GGUF's q rows really were permuted: streaming without undoing it would differ from the original model
    original = tiny_model("llama").model.layers[0].self_attn.q_proj.weight
    streamed = tensors(out)["model.layers.0.self_attn.q_proj.weight"]
    assert (streamed - original).abs().max() < 0.02 * original.abs().max()  # Q8_0 error, not a row shuffle


def test_gguf_rows_are_the_dequantised_rows(tmp_path):
    from moeify.models.checkpoint import load_config
    from moeify.models.weights import open_source

    model = tiny_model("llama")
    gguf_file = write_tiny_gguf(model, tmp_path / "tiny.gguf")
    skeleton = streaming.skeleton(load_config(str(gguf_file)), torch.float32)
    src = open_source(gguf_file, skeleton)
    full = src.load(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    ids = torch.tensor([3, 3, 100, 0])
    assert torch.equal(src.rows("model.embed_tokens.weight", ids), full[ids])
    assert torch.equal(torch.cat(list(src.row_blocks("model.embed_tokens.weight", 7))), full)


# --------------------------------------------------------------------------- refused before the first layer


@pytest.fixture
def no_layer_runs(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a layer was processed before the input was refused")

    monkeypatch.setattr(LayerLoader, "load", refuse)
    monkeypatch.setattr(LayerLoader, "begin", refuse)


def test_gguf_with_a_type_the_dequantiser_does_not_know_is_refused(tmp_path, monkeypatch, no_layer_runs):
    import gguf.quants

    gguf_file = write_tiny_gguf(tiny_model("llama"), tmp_path / "tiny.gguf", quant="Q8_0")
    monkeypatch.delitem(gguf.quants._type_traits, gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(InputError, match="Q8_0 cannot be dequantised.*upgrade gguf"):
        convert_streaming(gguf_file, CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), progress=False)
    assert not (tmp_path / "st").exists()


def test_output_disk_without_room_is_refused(tmp_path, monkeypatch, no_layer_runs):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InputError, match="needs about .* GiB .* free; free some space"):
        convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), progress=False)


def test_max_memory_below_the_estimate_is_refused(tmp_path, no_layer_runs):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    with pytest.raises(InputError, match="--max-memory 10KB: this conversion needs about .* lower --samples or --seq-len"):
        convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), max_memory="10KB", progress=False)


def test_unsupported_architecture_is_refused(tmp_path, no_layer_runs):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    cfg.pop("hidden_act", None)
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="not supported"):
        convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), progress=False)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_models_stored_per_expert_stream_hierarchically(arch, tmp_path):
    """MoE checkpoints store one tensor per expert (fused by transformers on load): converted layer by layer with
    transformers' own mapping, and written back under the names it saves; the same checkpoint as in memory."""
    tiny_model(arch).save_pretrained(tmp_path / "src")
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as h:
        assert any(".experts.0." in k for k in h.keys())  # the per-expert layout on disk
    mem = _in_memory(tiny_model(arch), CMoEConfig(layout="S1A2E4"), tmp_path / "mem")
    out, mo = convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E4"), tmp_path / "st", calibration=_cal(), progress=False)
    assert all(lay["kind"] == "hierarchical" for lay in mo["layers"])
    assert_same_checkpoint(mem, out)


def test_devices(monkeypatch):
    assert streaming.resolve_device("cpu").type == "cpu"
    assert streaming.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA device"):
        streaming.resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        streaming.resolve_device("gpu0")
    with pytest.raises(InputError, match="cpu or cuda"):
        streaming.resolve_device("meta")


def test_memory_sizes_parse():
    assert streaming.parse_memory("1.5GB") == int(1.5 * (1 << 30))
    assert streaming.parse_memory("800MiB") == 800 << 20
    assert streaming.parse_memory("2g") == 2 << 30
    with pytest.raises(InputError, match="give a size"):
        streaming.parse_memory("lots")


def test_each_layer_is_on_the_device_only_for_its_turn(tmp_path, monkeypatch):
    """Placement: a layer's weights are filled (on the loader's device) when its turn starts, and on meta once written."""
    tiny_model("llama").save_pretrained(tmp_path / "src")
    seen = []
    load, done = LayerLoader.load, LayerLoader.done

    def spy_load(self, i, layer):
        assert all(p.is_meta for p in layer.parameters())
        load(self, i, layer)
        seen.append((i, "load", {p.device.type for p in layer.parameters()}))

    def spy_done(self, i, layer, stats):
        done(self, i, layer, stats)
        seen.append((i, "done", {p.device.type for p in layer.parameters()}))

    monkeypatch.setattr(LayerLoader, "load", spy_load)
    monkeypatch.setattr(LayerLoader, "done", spy_done)
    convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), device="cpu", progress=False)
    assert seen == [(0, "load", {"cpu"}), (0, "done", {"meta"}), (1, "load", {"cpu"}), (1, "done", {"meta"})]


def test_interrupted_streaming_leaves_nothing(tmp_path, monkeypatch):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    done = LayerLoader.done

    def crash(self, i, layer, stats):
        done(self, i, layer, stats)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(LayerLoader, "done", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "out", calibration=_cal(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_output_is_not_replaced(tmp_path, no_layer_runs):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="--overwrite"):
        convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "out", calibration=_cal(), progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


# --------------------------------------------------------------------------- CLI


def test_cli_streams_by_default_and_matches_in_memory(tmp_path):
    from moeify.cli import app

    src = save_tiny_llama(tmp_path / "src")
    (tmp_path / "c.txt").write_text(" ".join(f"w{i % 120}" for i in range(3000)))
    common = ["convert", str(src), "--method", "cmoe", "--opt", "layout=S1A2E6", "--calib", str(tmp_path / "c.txt"), "--samples", "4",
              "--seq-len", "64", "--no-eval"]
    r = CliRunner().invoke(app, common + ["-o", str(tmp_path / "st"), "--json", str(tmp_path / "st.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, common + ["-o", str(tmp_path / "mem"), "--in-memory"])
    assert r.exit_code == 0, r.output
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    res = json.loads((tmp_path / "st.json").read_text())
    assert res["streaming"]["source"] == "safetensors" and res["peak_rss_mib"] > 100
    assert [r["layer"] for r in res["per_layer_streaming"]] == [0, 1]
    again = moeify.load(tmp_path / "st")[0]
    assert again.config.moeify["summary"]["streaming"]["device"] == "cpu"


def test_cli_max_memory_refused_before_loading(tmp_path):
    from moeify.cli import app

    src = save_tiny_llama(tmp_path / "src")
    r = CliRunner().invoke(app, ["convert", str(src), "--method", "mlpmoe", "-o", str(tmp_path / "o"), "--no-eval", "--max-memory", "1KB"])
    assert r.exit_code != 0 and "--max-memory 1KB" in r.output and "raise --max-memory" in r.output
    r = CliRunner().invoke(app, ["convert", str(src), "--method", "mlpmoe", "-o", str(tmp_path / "o"), "--no-eval", "--in-memory", "--max-memory", "1GB"])
    assert r.exit_code != 0 and "drop --in-memory" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_smollm2_streamed_equals_in_memory(tmp_path):
    """The real model (tied embeddings, 30 layers, embedding table written block by block) from its safetensors folder."""
    from moeify.data.assets import pull_default_model

    path = pull_default_model()
    cal = lambda: moeify.Calibration(source="austen", samples=2, seq_len=256)  # noqa: E731
    dense, tok = moeify.load_model()
    mem = moeify.save(moeify.convert(dense, CMoEConfig(layout="S3A3E8"), calibration=cal(), tokenizer=tok, progress=False), tmp_path / "mem")
    out, mo = convert_streaming(path, CMoEConfig(layout="S3A3E8"), tmp_path / "st", calibration=cal(), progress=False)
    assert_same_checkpoint(mem, out)
    assert "lm_head.weight" not in tensors(out)
    assert mo["summary"]["streaming"]["peak_rss_mib"] > 0


def test_cli_streamed_with_eval_scores_and_records_perplexity(tmp_path):
    """--eval on a streamed conversion: dense vs converted perplexity on the staged checkpoint, recorded in its config."""
    from moeify.cli import app

    src = save_tiny_llama(tmp_path / "src")
    (tmp_path / "c.txt").write_text(" ".join(f"w{(i * 7) % 120}" for i in range(6000)))
    r = CliRunner().invoke(app, ["convert", str(src), "--method", "cmoe", "--opt", "layout=S1A2E6", "--calib", str(tmp_path / "c.txt"),
                                 "--samples", "4", "--seq-len", "64", "--ppl", str(tmp_path / "c.txt"), "-o", str(tmp_path / "st"),
                                 "--json", str(tmp_path / "st.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "st.json").read_text())
    ppl = next(iter(res["ppl"].values()))
    assert ppl["baseline"] > 1 and ppl["model"] > 1 and abs(ppl["ratio"] - ppl["model"] / ppl["baseline"]) < 1e-9
    saved = json.loads((tmp_path / "st" / "config.json").read_text())["moeify"]
    assert next(iter(saved["metrics"]["ppl"].values()))["model"] == ppl["model"]
    assert "perplexity" in (tmp_path / "st" / "README.md").read_text().lower()
    again, _ = moeify.load(tmp_path / "st")
    assert res["parameters"]["converted"] == sum(p.numel() for p in again.parameters())


def test_an_emptied_layer_leaves_no_weights_behind(tmp_path):
    """Right after a layer is written, nothing holds its real weights (the kernels' prepared state did, for blocks
    run on the held-out tokens, until the whole conversion ended)."""
    import gc
    import weakref

    from moeify.kernels import common

    tiny_model("llama").save_pretrained(tmp_path / "src")
    alive = []
    done = LayerLoader.done

    def spy(self, i, layer, stats):
        refs = [weakref.ref(t) for m in layer.modules() for t in common._PREPARED.get(m, {}).values()]
        refs += [weakref.ref(p) for p in layer.parameters()]
        done(self, i, layer, stats)
        gc.collect()
        alive.append((len(refs), sum(r() is not None for r in refs)))

    LayerLoader.done = spy
    try:
        convert_streaming(tmp_path / "src", moeify.MoEficationConfig(experts=4, fraction=0.5, router_steps=5), tmp_path / "st",
                          calibration=_cal(), progress=False)
    finally:
        LayerLoader.done = done
    assert len(alive) == 2 and all(n > 0 and still == 0 for n, still in alive), alive


def test_checkpoint_missing_a_tensor_is_refused_before_any_layer(tmp_path, no_layer_runs):
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"no tensor for 1 of the model's parameters \(e.g. model.layers.1.mlp.up_proj.weight\)"):
        convert_streaming(tmp_path / "src", CMoEConfig(layout="S1A2E6"), tmp_path / "st", calibration=_cal(), progress=False)
