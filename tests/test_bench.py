"""`moeify bench` and moeify.bench: structure, interleaving, physical limits (no timed asserts).

Where a result depends on timings, the runs execute but their tokens/s are scripted
(`_scripted`), so medians, speedups and limits are checked against values computed here,
and limits against weights counted here from the models' tensors.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify import bench
from moeify.bench import timing
from moeify.blocks.moe import MoEMLP
from moeify.cli.app import app

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


def _unread_experts(module) -> float:
    """Routed-expert weights of the MoE blocks in `module` that one token does not read ((1 - top_k / N) of them)."""
    return sum((1 - m.top_k / m.num_experts) * (m.gate_up.numel() + m.down.numel())
               for m in module.modules() if isinstance(m, MoEMLP) and not m.all_active())


def _decode_params(model) -> float:
    """Weights read per decoded token, counted from the model's tensors: every parameter once (tied ones are
    one Parameter), an untied input embedding not at all (one row per token), routed experts at top_k / N."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return float(sum(p.numel() for p in model.parameters() if p is head or p is not emb)) - _unread_experts(model)


def _mlp_fraction(conv, dense) -> float:
    """MLP weights read per token, converted over dense, counted from the layers' MLP tensors."""
    def read(model):
        return sum(sum(p.numel() for p in layer.mlp.parameters()) - _unread_experts(layer.mlp) for layer in model.model.layers)

    return read(conv) / read(dense)


def _scripted(monkeypatch, models: dict[str, object], rates: dict[str, list[float]]) -> list[tuple[str, dict]]:
    """Run every workload for real, but report the next of `rates[name]` as its tokens/s.

    name: "model", "baseline", or "no_mlp" for the baseline while its MLPs are skipped.
    Returns the (name, result) of every run, in order.
    """
    real = timing.run_workload
    left = {k: list(v) for k, v in rates.items()}
    seen: list[tuple[str, dict]] = []

    def spy(model, workload, inputs, new_tokens):
        name = next(n for n, m in models.items() if m is model)
        if name == "baseline" and any(m.forward is timing.skipped_mlp_forward for m in bench.mlp_modules(model)):
            name = "no_mlp"
        res = dict(real(model, workload, inputs, new_tokens), tokens_per_s=left[name].pop(0))
        seen.append((name, res))
        return res

    monkeypatch.setattr(timing, "run_workload", spy)
    return seen


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_decode_limit_matches_protocol_counts_for_smollm2():
    dense_model, moe_model = _smollm2_shaped(), _smollm2_shaped(layout_shared=1)
    dense = bench.token_cost(dense_model)
    # protocol.md: attention 26.5M, MLP 79.6M, tied embedding/LM head 28.3M (+ 61 RMSNorm vectors)
    attention = 30 * (576 * 576 * 2 + 2 * 576 * 192)
    mlp = 30 * 3 * 576 * 1536
    assert dense.read_params == attention + mlp + 49152 * 576 + 61 * 576
    assert dense.mlp_active_params == mlp
    moe = bench.token_cost(moe_model)
    router = 30 * (2 * 56 * 576 + 7 * 56)
    small = 30 * (7 + 7 * 576)  # expert scales and the dropped-expert biases
    assert moe.read_params == pytest.approx(attention + 49152 * 576 + 61 * 576 + 0.25 * mlp + router + small)
    # the bytes limit from the models' own tensors: 4 bytes per weight in fp32, 2 in bf16
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        assert dense.decode_bytes(dtype) == size * _decode_params(dense_model)
        assert moe.decode_bytes(dtype) == pytest.approx(size * _decode_params(moe_model))
    limit = dense.decode_bytes(torch.float32) / moe.decode_bytes(torch.float32)
    assert limit == pytest.approx(_decode_params(dense_model) / _decode_params(moe_model))
    # protocol.md's 1.80x counts no router and no biases; with them the limit is lower
    assert limit < (attention + mlp + 49152 * 576) / (attention + 0.25 * mlp + 49152 * 576) == pytest.approx(1.80, abs=0.01)


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
    base_rates, model_rates = [1.0, 10.0, 12.0, 11.0], [1.0, 15.0, 20.0, 13.0]  # the first of each: the warmup run
    seen = _scripted(monkeypatch, {"model": conv, "baseline": dense}, {"baseline": base_rates, "model": model_rates})
    r = bench.compare_models(conv, dense, None, workloads=["decode"], repeats=3, warmup=1, new_tokens=4, prompt_tokens=16, text="random",
                             attainable=False)
    assert [n for n, _ in seen] == ["baseline", "model", "baseline", "model", "model", "baseline", "baseline", "model"]
    d = r["workloads"]["decode"]
    assert d["baseline"]["runs"] == base_rates[1:] and d["model"]["runs"] == model_rates[1:]
    assert d["baseline"]["median"] == 11.0 and d["model"]["median"] == 15.0
    assert d["speedup"] == pytest.approx(15.0 / 11.0)
    assert d["speedup_pairs"]["runs"] == pytest.approx([15 / 10, 20 / 12, 13 / 11])
    limit = _decode_params(dense) / _decode_params(conv)
    assert d["limit"] == pytest.approx(limit) and d["of_limit"] == pytest.approx(15.0 / 11.0 / limit)
    # the greedy tokens of the last timed run of each model, compared here
    last = {n: res["tokens"] for n, res in seen}
    assert d["greedy_tokens_identical_prefix"] == _common_prefix(last["baseline"], last["model"])
    assert r["settings"]["threads"] == torch.get_num_threads() and r["kernels"] == {"auto": 2}


@pytest.mark.parametrize("t_dense,t_no_mlp,f", [(0.100, 0.040, 0.25), (0.100, 0.040, 1.0), (0.100, 0.0, 0.25), (0.030, 0.021, 0.4)])
def test_attainable_limit_is_amdahl_over_measured_non_mlp_time(t_dense, t_no_mlp, f):
    assert bench.attainable_limit(t_dense, t_no_mlp, f) == pytest.approx(t_dense / (t_no_mlp + f * (t_dense - t_no_mlp)))
    # 100 ms dense, 40 ms outside the MLPs, MLPs read a quarter: 100 / (40 + 15)
    assert bench.attainable_limit(0.100, 0.040, 0.25) == pytest.approx(100 / 55)


def test_decode_attainable_limit_times_the_baseline_without_its_mlps(monkeypatch):
    dense = tiny_model("llama")
    conv = moeify.convert(copy.deepcopy(dense), moeify.CMoEConfig(layout="S1A1E4"), calibration=_cal(), progress=False)
    mlps = bench.mlp_modules(dense)
    states = []
    real = timing.run_workload

    def record(model, workload, inputs, new_tokens):
        states.append([m.forward is timing.skipped_mlp_forward for m in mlps] if model is dense else None)
        return real(model, workload, inputs, new_tokens)

    monkeypatch.setattr(timing, "run_workload", record)
    # scripted: dense 10 tok/s (100 ms/token), 25 tok/s (40 ms) without its MLPs, converted 12.5 tok/s
    seen = _scripted(monkeypatch, {"model": conv, "baseline": dense}, {"baseline": [10.0] * 2, "no_mlp": [25.0] * 2, "model": [12.5] * 2})
    r = bench.compare_models(conv, dense, None, workloads=["decode"], repeats=2, warmup=0, new_tokens=4, prompt_tokens=16, text="random")
    # per repetition: baseline, model, baseline without MLPs (then reversed); MLPs skipped only in that third run
    assert [n for n, _ in seen] == ["baseline", "model", "no_mlp", "no_mlp", "model", "baseline"]
    assert [None if s is None else "all" if all(s) else "some" if any(s) else "none" for s in states] == [
        "none", None, "all", "all", None, "none"]
    assert all("forward" not in m.__dict__ for m in mlps)  # restored
    a = r["workloads"]["decode"]["attainable"]
    f = _mlp_fraction(conv, dense)
    assert 0.25 < f < 1 and a["mlp_fraction"] == pytest.approx(f)
    assert a["dense_ms_per_token"] == pytest.approx(100.0) and a["no_mlp_ms_per_token"] == pytest.approx(40.0)
    expected = 0.100 / (0.040 + f * (0.100 - 0.040))
    assert a["limit"] == pytest.approx(expected)
    assert r["workloads"]["decode"]["speedup"] == pytest.approx(1.25) and a["of_limit"] == pytest.approx(1.25 / expected)
    assert set(r["workloads"]["decode"]) >= {"baseline", "model", "limit"} and "no_mlp" not in r["workloads"]["decode"]


def test_skip_mlps_outputs_zero_mlp_contribution():
    dense = tiny_model("llama")
    ids = torch.randint(0, dense.config.vocab_size, (1, 8))
    with torch.no_grad():
        ref = dense(ids).logits
        with bench.SkipMLPs(dense):
            skipped = dense(ids).logits
            for m in bench.mlp_modules(dense):
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


def _router_params(hidden: int, intermediate: int, layout: str) -> int:
    return sum(p.numel() for p in bench.build_layer(hidden, intermediate, layout)[1].router.parameters())


def test_layer_benchmark_limits_and_skewed_routing():
    r = bench.compare_layer(32, 96, "S1A1E8", [1, 4096], repeats=1, min_seconds=0.001)
    H, I, m = 32, 96, 12
    router = 2 * 56 * H + 7 * 56
    assert r["shape"]["router_params"] == router == _router_params(H, I, "S1A1E8")
    row1, row2 = r["rows"]
    assert row1["limit"] == pytest.approx(3 * H * I / (3 * H * (m + m) + router))
    # one token reads the shared expert and one routed expert: bytes limit == FLOP limit
    assert row1["experts_touched"] == 1 and row1["bytes_limit"] == pytest.approx(3 * H * I / (3 * H * (m + m) + router))
    # 4096 tokens touch all 7 routed experts: more bytes than the dense MLP (the router on top)
    assert row2["experts_touched"] == 7 and row2["bytes_limit"] == pytest.approx(3 * H * I / (3 * H * (m + 7 * m) + router))
    assert row2["limit"] == pytest.approx(row1["limit"])  # FLOPs per token do not depend on the token count
    # top-1 of 7 experts drawn with p_j ~ exp(-0.43 j): the busiest expert's load / mean load
    p = np.exp(-0.43 * np.arange(7))
    assert row2["expert_load_sorted"][0] == pytest.approx(7 * p[0] / p.sum(), rel=0.1)
    assert row2["expert_load_sorted"][-1] == pytest.approx(7 * p[-1] / p.sum(), rel=0.35)
    assert r["shape"]["expert_sizes"] == [12] * 7 and r["shape"]["shared_neurons"] == 12
    for row in r["rows"]:
        assert row["speedup"] == pytest.approx(row["dense_ms"]["median"] / row["moe_ms"]["median"])
        assert row["of_limit"] == pytest.approx(row["speedup"] / row["limit"])


def test_layer_all_shared_and_all_active_layouts():
    r = bench.compare_layer(16, 64, "S2A6E8", [3], repeats=1, min_seconds=0.001)
    router = _router_params(16, 64, "S2A6E8")
    assert router == 2 * 48 * 16 + 6 * 48  # 8 representative neurons per expert: their W_gate|W_up rows, the combine matrix
    assert r["rows"][0]["limit"] == pytest.approx(3 * 16 * 64 / (3 * 16 * 64 + router))
    assert r["routing"] is None and r["rows"][0]["experts_touched"] is None


def test_cli_layer_bench_writes_json_with_settings(tmp_path):
    js = tmp_path / "layer.json"
    res = runner.invoke(app, ["bench", "--layer", "--hidden", "32", "--intermediate", "96", "--layout", "S1A3E8", "--tokens", "1,8", "--repeats", "1",
                              "--json", str(js)])
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert [row["tokens"] for row in data["rows"]] == [1, 8]
    assert data["shape"]["layout"] == "S1A3E8" and data["settings"]["dtype"] == "float32"
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["device_name"] == bench.device_name("cpu")
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
    assert "model_provenance" in data and data["model_provenance"] is None  # recorded; None: not the default model
    assert set(data["workloads"]) == {"decode", "prefill-8x512"}
    # the limits of the models as loaded here: FLOPs per sequence (attention dominates a hidden-64 model) and bytes per token
    m, _ = moeify.load_model(str(tmp_path / "moe"), dtype="float32")
    b, _ = moeify.load_model(str(tiny_dir), dtype="float32", with_tokenizer=False)
    p = data["workloads"]["prefill-8x512"]
    assert p["limit"] == pytest.approx(bench.token_cost(b).prefill_flops(8, 512) / bench.token_cost(m).prefill_flops(8, 512)) and p["limit"] > 1.0
    assert data["workloads"]["decode"]["limit"] == pytest.approx(_decode_params(b) / _decode_params(m))
    mb = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) / 2**20
    assert data["memory"]["weights_mb"]["model"] == pytest.approx(mb) and "peak" not in data["memory"]
    # the greedy tokens of both models on the benchmark's prompt (seeded random ids), compared here
    prompt = bench.bench_inputs(None, m.config.vocab_size, text="random")["prompt"]
    with torch.no_grad():
        toks = [mod.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0)[0, prompt.shape[1]:].tolist() for mod in (b, m)]
    same = _common_prefix(*toks)
    assert data["workloads"]["decode"]["greedy_tokens_identical_prefix"] == same
    assert f"greedy decode: converted == dense for the first {same} of 4 new tokens" in res.output
    peak = bench.peak_memory_child(str(tmp_path / "moe"), "float32", ["decode"], 4, text="random")
    assert peak["peak_rss_mb"] >= peak["loaded_rss_mb"] > peak["rss_before_load_mb"] > 0 and peak["peak_mb_over_before_load"] > 0


# --------------------------------------------------------------------------- conversion time vs the calibration forward alone


def _calib_words(path, n=3000, seed=0):
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(126)}" for _ in range(n)))
    return path


def test_conversion_baseline_is_prune_at_the_methods_active_fraction():
    from moeify.bench.conversion import forward_baseline

    base = forward_baseline(moeify.CMoEConfig(layout="S3A3E8", k_act=7))
    assert base.method == "prune" and base.fraction == pytest.approx(0.75) and base.k_act == 7
    assert forward_baseline(moeify.CMoEConfig(layout="S1A1E8")).fraction == pytest.approx(0.25)
    with pytest.raises(moeify.InputError, match="needs no calibration"):
        forward_baseline(moeify.MLPMoEConfig(branches=4))


def test_cli_conversion_bench_interleaves_and_reports_the_ratio(tiny_dir, tmp_path, monkeypatch):
    """Both conversions really run (streamed, the temporary outputs removed); the reported ratio, pair ratios,
    share of the limit and forward share are recomputed here from the per-run records."""
    import tempfile

    from moeify.bench import conversion

    order, outputs = [], []
    real = conversion._stages

    def spy(mo):
        order.append(mo["method"])
        return real(mo)

    monkeypatch.setattr(conversion, "_stages", spy)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    calib = _calib_words(tmp_path / "calib.txt")
    js = tmp_path / "conv.json"
    res = runner.invoke(app, ["bench", str(tiny_dir), "--conversion", "cmoe", "--opt", "layout=S1A2E6", "--opt", "router_neurons=3",
                              "--calib", str(calib), "--samples", "2", "--seq-len", "32", "--repeats", "2", "--json", str(js)])
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    assert d["kind"] == "conversion" and d["method"] == "cmoe" and d["method_settings"]["layout"] == "S1A2E6"
    assert d["baseline_method"].startswith("prune") and d["calibration"]["samples"] == 2 and d["calibration"]["seq_len"] == 32
    # run 1: baseline then method; run 2: method then baseline
    assert len(order) == 4 and order[0] == order[3] != order[1] == order[2]
    assert list((tmp_path / "tmp").iterdir()) == []  # the converted checkpoints were temporary
    secs = {k: [r["seconds"] for r in d["runs"][k]] for k in ("baseline", "method")}
    assert all(len(v) == 2 and min(v) > 0 for v in secs.values())
    ratio = float(np.median(secs["method"])) / float(np.median(secs["baseline"]))
    assert d["ratio"] == pytest.approx(ratio) and d["of_limit"] == pytest.approx(1 / ratio) and d["limit"] == 1.0
    assert sorted(d["ratio_pairs"]["runs"]) == pytest.approx(sorted(m / b for m, b in zip(secs["method"], secs["baseline"])))
    for k in ("baseline", "method"):
        run = d["runs"][k][0]
        assert run["forward_share"] == pytest.approx(run["stages"]["forward"] / run["seconds"]) and 0 < run["forward_share"] < 1
        assert {"forward", "plan", "heldout", "read", "write"} <= set(run["stages"])
        assert run["minor_page_faults"] > 0
    import os

    assert d["huge_pages"] == os.environ["THP_MEM_ALLOC_ENABLE"]  # recorded ("1" unless the environment set it before moeify)
    # CMoE reports its own plan stages, and they fit inside the pipeline's plan stage
    stages = d["runs"]["method"][0]["plan_stages"]
    assert {"profile", "features", "clustering", "router", "outputs"} <= set(stages)
    assert 0 < sum(stages.values()) <= d["runs"]["method"][0]["stages"]["plan"] + 1e-3
    assert d["model_provenance"] is None  # not the default model
    assert d["refit"] is False and all(r["refit_layers"] == 0 for v in d["runs"].values() for r in v)


def test_conversion_bench_with_refit_refits_only_the_method(tiny_dir, tmp_path):
    from moeify.bench.conversion import compare_conversions

    cal = moeify.Calibration(source=str(_calib_words(tmp_path / "calib.txt")), samples=2, seq_len=32, heldout_tokens=32)
    d = compare_conversions(str(tiny_dir), moeify.CMoEConfig(layout="S1A2E6"), cal, repeats=1, refit=True)
    layers = moeify.load_model(str(tiny_dir), with_tokenizer=False)[0].config.num_hidden_layers
    assert d["refit"] is True and d["runs"]["method"][0]["refit_layers"] == layers and d["runs"]["baseline"][0]["refit_layers"] == 0


@pytest.mark.parametrize("args,match", [
    (["--conversion", "mlpmoe"], "needs no calibration"),
    (["--conversion", "nosuch"], "unknown method"),
    (["--conversion", "cmoe", "--layer", "--hidden", "8", "--intermediate", "16"], "two different benchmarks"),
    (["--conversion", "cmoe", "--opt", "layout=S9A1E8"], "more shared experts"),
    (["--conversion", "cmoe", "--calib", "/no/such/file.txt"], "--calib"),
    (["out/no-such-model", "--conversion", "cmoe"], "MODEL"),
    pytest.param(["--conversion", "cmoe", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no GPU")),
])
def test_cli_conversion_bench_bad_input_fails_fast(args, match, monkeypatch):
    from moeify.pipeline import streaming

    monkeypatch.setattr(streaming, "convert_streaming", lambda *a, **k: pytest.fail("converted before the input was checked"))
    res = runner.invoke(app, ["bench", *args])
    assert res.exit_code == 2 and match in res.output, res.output


def test_cli_conversion_bench_refuses_a_converted_checkpoint(tiny_dir, tmp_path):
    conv = moeify.convert(str(tiny_dir), moeify.CMoEConfig(layout="S1A2E6"), calibration=_cal(), progress=False)
    conv.save_pretrained(tmp_path / "moe")
    res = runner.invoke(app, ["bench", str(tmp_path / "moe"), "--conversion", "cmoe"])
    assert res.exit_code == 2 and "already a moeify checkpoint" in res.output, res.output


_HUGE_PAGES = """
import os, sys
import moeify, torch
x = torch.ones(64 << 20 >> 2)  # 64 MiB, touched
huge = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


@pytest.mark.parametrize("env,expect", [(None, "1"), ("0", "0")])
def test_importing_moeify_before_torch_puts_large_tensors_on_huge_pages(env, expect):
    """moeify turns on torch's THP_MEM_ALLOC_ENABLE unless the environment says otherwise; where the kernel allows
    transparent huge pages on request (madvise or always), a large tensor then lives on them."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env is not None:
        environ["THP_MEM_ALLOC_ENABLE"] = env
    out = subprocess.run([sys.executable, "-c", _HUGE_PAGES], env=environ, capture_output=True, text=True, timeout=300, check=True)
    value, huge_kib = out.stdout.split()
    assert value == expect
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        mode = ""
    if expect == "1" and ("[madvise]" in mode or "[always]" in mode):
        assert int(huge_kib) >= 32 << 10, out.stdout  # most of the 64 MiB tensor on 2 MiB pages
    if expect == "0" and "[madvise]" in mode:
        assert int(huge_kib) < 8 << 10, out.stdout  # 4 KiB pages without the request
