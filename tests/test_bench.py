"""`moeify bench` and moeify.eval.bench: structure, interleaving, physical limits (no timed asserts)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify.cli.app import app
from moeify.bench import bench
from moeify.blocks.moe import MoEMLP

from .conftest import tiny_model

runner = CliRunner()


def _cal():
    win = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(9))
    return moeify.Calibration.from_windows(win, held, batch_size=2)


def _smollm2_shaped(layout_shared: int | None = None):
    """SmolLM2-135M's architecture on the meta device (no weights), optionally with S?A1E8 MoE blocks in every layer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      vocab_size=49152, tie_word_embeddings=True, hidden_act="silu")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        if layout_shared is not None:
            routed = 8 - layout_shared
            lc = {"shared": 192 * layout_shared, "experts": [192] * routed, "top_k": 1,
                  "router": {"type": "analytical", "neurons": 8 * routed, "absolute": True}, "gate": "unit", "compensate": True}
            for layer in model.model.layers:
                layer.mlp = MoEMLP(576, lc, "silu")
    return model


def test_decode_limit_matches_protocol_counts_for_smollm2():
    dense = bench.token_cost(_smollm2_shaped())
    # protocol.md: attention 26.5M, MLP 79.6M, tied embedding/LM head 28.3M (+ 61 RMSNorm vectors)
    attention = 30 * (576 * 576 * 2 + 2 * 576 * 192)
    mlp = 30 * 3 * 576 * 1536
    assert dense.read_params == attention + mlp + 49152 * 576 + 61 * 576
    assert dense.mlp_active_params == mlp
    moe = bench.token_cost(_smollm2_shaped(layout_shared=1))
    router = 30 * (2 * 56 * 576 + 7 * 56)
    small = 30 * (7 + 7 * 576)  # expert scales and the dropped-expert biases
    assert moe.read_params == pytest.approx(attention + 49152 * 576 + 61 * 576 + 0.25 * mlp + router + small)
    limit = dense.decode_bytes(torch.float32) / moe.decode_bytes(torch.float32)
    assert 134.4 / (54.8 + 79.6 * 0.25) == pytest.approx(1.80, abs=0.01)
    assert limit == pytest.approx(134.4 / (54.8 + 79.6 * 0.25 + (router + small) / 1e6), rel=5e-3)


def test_prefill_flops_count_attention_and_one_lm_head_row():
    model = _smollm2_shaped()
    c = bench.token_cost(model)
    L = 2048
    per_token = 2 * (30 * (576 * 576 * 2 + 2 * 576 * 192) + 30 * 3 * 576 * 1536) + 4 * 576 * 30 * (L + 1) / 2
    assert c.prefill_flops(1, L) == pytest.approx(L * per_token + 2 * 49152 * 576)
    assert c.prefill_flops(8, 512) == pytest.approx(8 * (512 * (per_token - 4 * 576 * 30 * (L - 512) / 2) + 2 * 49152 * 576))


def test_compare_models_interleaves_and_reports_limits(monkeypatch):
    dense = tiny_model("llama")
    conv = moeify.convert(copy.deepcopy(dense), moeify.CMoEConfig(layout="S1A1E4"), calibration=_cal(), progress=False)
    calls = []
    real_run = bench._run

    def spy(model, workload, inputs, new_tokens):
        calls.append(("model" if model is conv else "baseline", workload))
        return real_run(model, workload, inputs, new_tokens)

    monkeypatch.setattr(bench, "_run", spy)
    r = bench.compare_models(conv, dense, None, workloads=["decode"], repeats=3, warmup=1, new_tokens=4, prompt_tokens=16, text="random",
                               attainable=False)
    dec = [c[0] for c in calls if c[1] == "decode"]
    assert dec == ["baseline", "model", "baseline", "model", "model", "baseline", "baseline", "model"]
    d = r["workloads"]["decode"]
    assert len(d["baseline"]["runs"]) == 3 and len(d["model"]["runs"]) == 3
    assert d["speedup"] == pytest.approx(d["model"]["median"] / d["baseline"]["median"])
    assert d["limit"] > 1.2 and d["of_limit"] == pytest.approx(d["speedup"] / d["limit"])
    assert 0 <= d["greedy_tokens_identical_prefix"] <= 4
    assert r["settings"]["threads"] == torch.get_num_threads() and r["kernels"] == {"auto": 2}


def test_attainable_limit_is_amdahl_over_measured_non_mlp_time():
    # 100 ms dense, 40 ms outside the MLPs, MLPs read a quarter: 100 / (40 + 15)
    assert bench.attainable_limit(0.100, 0.040, 0.25) == pytest.approx(100 / 55)
    assert bench.attainable_limit(0.100, 0.040, 1.0) == pytest.approx(1.0)
    assert bench.attainable_limit(0.100, 0.0, 0.25) == pytest.approx(4.0)


def test_decode_attainable_limit_times_the_baseline_without_its_mlps(monkeypatch):
    dense = tiny_model("llama")
    conv = moeify.convert(copy.deepcopy(dense), moeify.CMoEConfig(layout="S1A1E4"), calibration=_cal(), progress=False)
    mlps = bench._mlp_modules(dense)
    seen = []
    real_run = bench._run

    def spy(model, workload, inputs, new_tokens):
        skipped = [m.forward is bench._zeros_like_input for m in mlps] if model is dense else None
        seen.append(("model" if model is conv else "baseline", skipped))
        return real_run(model, workload, inputs, new_tokens)

    monkeypatch.setattr(bench, "_run", spy)
    r = bench.compare_models(conv, dense, None, workloads=["decode"], repeats=2, warmup=0, new_tokens=4, prompt_tokens=16, text="random")
    # per repetition: baseline, model, baseline without MLPs (then reversed); MLPs skipped only in that third run
    assert [(n, None if s is None else all(s)) for n, s in seen] == [
        ("baseline", False), ("model", None), ("baseline", True), ("baseline", True), ("model", None), ("baseline", False)]
    assert all(not any(s) for n, s in seen if n == "baseline" and not all(s))
    assert all("forward" not in m.__dict__ for m in mlps)  # restored
    a = r["workloads"]["decode"]["attainable"]
    f = bench.token_cost(conv).mlp_active_params / bench.token_cost(dense).mlp_active_params
    assert a["mlp_fraction"] == pytest.approx(f) and 0.25 < f < 1
    assert a["limit"] == pytest.approx(bench.attainable_limit(a["dense_ms_per_token"], a["no_mlp_ms_per_token"], f))
    assert a["of_limit"] == pytest.approx(r["workloads"]["decode"]["speedup"] / a["limit"])
    assert set(r["workloads"]["decode"]) >= {"baseline", "model", "limit"} and "no_mlp" not in r["workloads"]["decode"]


def test_skip_mlps_outputs_zero_mlp_contribution():
    dense = tiny_model("llama")
    ids = torch.randint(0, dense.config.vocab_size, (1, 8))
    with torch.no_grad():
        ref = dense(ids).logits
        with bench._SkipMLPs(dense):
            skipped = dense(ids).logits
            for m in bench._mlp_modules(dense):
                assert torch.equal(m(torch.ones(1, 2, dense.config.hidden_size)), torch.zeros(1, 2, dense.config.hidden_size))
        again = dense(ids).logits
    assert not torch.allclose(ref, skipped) and torch.equal(ref, again)


def test_compare_models_refuses_mismatched_dtypes():
    dense = tiny_model("llama")
    conv = moeify.convert(copy.deepcopy(dense), moeify.MLPMoEConfig(branches=2), progress=False).to(torch.bfloat16)
    with pytest.raises(moeify.InputError, match="must share dtype"):
        bench.compare_models(conv, dense, None, workloads=["decode"], repeats=1, text="random")
    with pytest.raises(moeify.InputError, match="unknown workload"):
        bench.compare_models(conv, dense, None, workloads=["decode-fast"], repeats=1, text="random")


def test_layer_benchmark_limits_and_skewed_routing():
    r = bench.compare_layer(32, 96, "S1A1E8", [1, 4096], repeats=1, min_seconds=0.001)
    H, I, m = 32, 96, 12
    router = 2 * 56 * H + 7 * 56
    row1, row2 = r["rows"]
    assert row1["limit"] == pytest.approx(3 * H * I / (3 * H * (m + m) + router))
    assert row1["experts_touched"] == 1 and row1["bytes_limit"] == pytest.approx(row1["limit"])
    assert row2["experts_touched"] == 7 and row2["bytes_limit"] < 1.0
    # top-1 of 7 experts drawn with p_j ~ exp(-0.43 j): the busiest expert's load / mean load
    p = np.exp(-0.43 * np.arange(7))
    assert row2["expert_load_sorted"][0] == pytest.approx(7 * p[0] / p.sum(), rel=0.1)
    assert row2["expert_load_sorted"][-1] == pytest.approx(7 * p[-1] / p.sum(), rel=0.35)
    assert r["shape"]["expert_sizes"] == [12] * 7 and r["shape"]["shared_neurons"] == 12


def test_layer_all_shared_and_all_active_layouts():
    r = bench.compare_layer(16, 64, "S2A6E8", [3], repeats=1, min_seconds=0.001)
    assert r["rows"][0]["limit"] == pytest.approx(3 * 16 * 64 / (3 * 16 * 64 + r["shape"]["router_params"]))
    assert r["routing"] is None and r["rows"][0]["experts_touched"] is None


def test_cli_layer_bench_writes_json_with_settings(tmp_path):
    js = tmp_path / "layer.json"
    res = runner.invoke(app, ["bench", "--layer", "--hidden", "32", "--intermediate", "96", "--layout", "S1A3E8", "--tokens", "1,8", "--repeats", "1",
                              "--json", str(js)])
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert [row["tokens"] for row in data["rows"]] == [1, 8]
    assert data["shape"]["layout"] == "S1A3E8" and data["settings"]["dtype"] == "float32"
    assert data["environment"]["torch"] == torch.__version__ and "device_name" in data["environment"]
    again = runner.invoke(app, ["bench", "--layer", "--hidden", "32", "--intermediate", "96", "--json", str(js)])
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize("args,match", [
    (["--layer", "--hidden", "32", "--intermediate", "96", "--tokens", "1,x"], "comma-separated"),
    (["--layer", "--hidden", "32"], "--intermediate"),
    (["--layer", "--hidden", "32", "--intermediate", "96", "--layout", "S9A1E8"], "more shared experts"),
    (["--layer", "out/some-model", "--hidden", "32", "--intermediate", "96"], "drop the MODEL"),
    (["out/missing", "--workloads", "decode,warp"], "unknown workload"),
    (["out/missing", "--kernel", "fast"], "unknown --kernel"),
    (["out/missing", "--kernel", "triton"], "CUDA GPU"),
    ([], "give the converted checkpoint"),
])
def test_cli_bench_bad_input_fails_fast(args, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    res = runner.invoke(app, ["bench", *args])
    assert res.exit_code == 2 and match in res.output, res.output


def test_cli_model_bench_on_a_tiny_checkpoint(tiny_dir, tmp_path):
    conv = moeify.convert(str(tiny_dir), moeify.CMoEConfig(layout="S1A2E6"), calibration=_cal(), progress=False)
    conv.save_pretrained(tmp_path / "moe")
    js = tmp_path / "b.json"
    res = runner.invoke(app, ["bench", str(tmp_path / "moe"), "--workloads", "decode,prefill-8x512", "--repeats", "1", "--warmup", "0",
                              "--new-tokens", "4", "--text", "random", "--threads", "1", "--no-memory", "--json", str(js)])
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert data["baseline"] == str(tiny_dir) and data["settings"]["threads"] == 1
    assert set(data["workloads"]) == {"decode", "prefill-8x512"}
    p = data["workloads"]["prefill-8x512"]
    assert p["limit"] > 1.0 and p["limit_kind"].startswith("matmul FLOPs")  # attention dominates a hidden-64 model
    assert data["memory"]["weights_mb"]["model"] > 0 and "peak" not in data["memory"]
    assert "greedy decode: converted == dense for the first" in res.output
    peak = bench.peak_memory_child(str(tmp_path / "moe"), "float32", ["decode"], 4, text="random")
    assert peak["peak_rss_mb"] >= peak["loaded_rss_mb"] > peak["rss_before_load_mb"] > 0 and peak["peak_mb_over_before_load"] > 0
