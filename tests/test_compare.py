"""`moeify compare` on a tiny local model: reports written, resume reuses finished runs, fraction mapping."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import moeify
import moeify.pipeline.convert
from moeify.cli.app import app
from moeify.compare import compare, method_config
from moeify.errors import InputError

runner = CliRunner()
OPTS = {"expertweaver": {"tasks": "none", "experts": 16, "sample_len": 16}, "moefication": {"experts": 8, "router_steps": 20},
        "llama-moe-random": {"experts": 8}}


@pytest.fixture
def texts(tmp_path):
    ppl = tmp_path / "ppl.txt"
    ppl.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(600)))
    return ppl


def test_compare_writes_reports_and_resume_reuses_runs(tiny_dir, texts, tmp_path, monkeypatch):
    cal_file = tmp_path / "cal.txt"
    cal_file.write_text(" ".join(f"w{(i * 13) % 126}" for i in range(600)))
    cal = moeify.Calibration(source=str(cal_file), samples=2, seq_len=32, heldout_tokens=32)
    out = tmp_path / "cmp"
    methods = ["cmoe", "expertweaver", "moefication", "llama-moe-random", "prune", "mlpmoe"]
    res = compare(str(tiny_dir), methods, [0.5], out_dir=out, calibration=cal, ppl_source=str(texts), eval_seq_len=256, method_opts=OPTS, progress=False)
    assert [(r["method"], r["active_target"]) for r in res["runs"]] == [(m, 0.5) for m in methods]
    assert not any(r["reused"] for r in res["runs"])
    for r in res["runs"]:
        assert r["active_mlp_fraction"] == pytest.approx(r["active_target"], abs=0.02), r["method"]
        assert r["ratio"] == pytest.approx(r["ppl"] / res["dense_ppl"])
    assert res["runs"][0]["config"]["layout"] == "S1A3E8"
    ew = next(r for r in res["runs"] if r["method"] == "expertweaver")
    assert all(0.2 <= a <= 0.7 for a in ew["expertweaver"]["alpha"])
    assert set(ew["expertweaver"]["total_active_experts"]) == {ew["config"]["active"]}
    data = json.loads((out / "compare.json").read_text())
    assert len(data["runs"]) == 6 and data["dense_ppl"] == pytest.approx(res["dense_ppl"])
    md = (out / "compare.md").read_text()
    assert "| mlpmoe |" in md and "50% active" in md
    for png in ("compare.png", "expertweaver_shares.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "runs").glob("*.json"))) == 7  # 6 runs + dense

    # a second run must not convert anything again; a new fraction converts only its own runs
    calls = []
    real = moeify.pipeline.convert.convert
    monkeypatch.setattr(moeify.pipeline.convert, "convert", lambda *a, **k: calls.append(a[1].method) or real(*a, **k))
    again = compare(str(tiny_dir), methods, [0.5], out_dir=out, calibration=cal, ppl_source=str(texts), eval_seq_len=256, method_opts=OPTS, progress=False)
    assert calls == [] and all(r["reused"] for r in again["runs"])
    assert [r["ppl"] for r in again["runs"]] == [r["ppl"] for r in res["runs"]]
    more = compare(str(tiny_dir), ["prune", "cmoe"], [0.5, 0.25], out_dir=out, calibration=cal, ppl_source=str(texts), eval_seq_len=256, progress=False)
    assert sorted(calls) == ["cmoe", "prune"]
    assert [(r["method"], r["active_target"], r["reused"]) for r in more["runs"]] == [
        ("prune", 0.5, True), ("cmoe", 0.5, True), ("prune", 0.25, False), ("cmoe", 0.25, False)]


@pytest.mark.parametrize("method,fraction,nearest", [
    ("cmoe", 0.3, "0.25"), ("mlpmoe", 0.6, "0.625"), ("moefication", 0.3, "0.3125"), ("llama-moe-random", 0.3, "0.3125"),
    ("expertweaver", 0.1, "0.21875"), ("expertweaver", 0.3, "0.296875"),
])
def test_unreachable_fraction_names_the_nearest(method, fraction, nearest):
    with pytest.raises(InputError, match=nearest):
        method_config(method, fraction)


def test_fraction_mapping():
    assert method_config("cmoe", 0.25).layout == "S1A1E8"
    assert method_config("cmoe", 0.375).layout == "S1A2E8"
    assert method_config("mlpmoe", 0.25).prune == pytest.approx(0.75)
    assert method_config("moefication", 0.5).active == 16
    assert method_config("expertweaver", 0.25).active == 16
    assert method_config("llama-moe-cluster", 0.75).split == "cluster"
    assert method_config("prune", 0.3).fraction == pytest.approx(0.3)


def test_compare_cli_rejects_bad_input_before_loading(tmp_path):
    r = runner.invoke(app, ["compare", str(tmp_path / "missing"), "--methods", "cmoe,nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nope" in r.output
    r = runner.invoke(app, ["compare", str(tmp_path / "missing"), "--active", "0.3", "--methods", "cmoe", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "0.25" in r.output
    assert not (tmp_path / "o").exists()


def test_compare_cli_runs_and_refuses_existing_json(tiny_dir, tmp_path):
    texts = tmp_path / "ppl2048.txt"
    texts.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(2100)))  # the CLI scores 2048-token windows
    cal_file = tmp_path / "cal.txt"
    cal_file.write_text(" ".join(f"w{(i * 13) % 126}" for i in range(600)))
    js = tmp_path / "c.json"
    args = ["compare", str(tiny_dir), "--methods", "prune,mlpmoe", "--active", "0.5", "--out", str(tmp_path / "o"), "--json", str(js),
            "--ppl", str(texts), "--calib", str(cal_file), "--samples", "2", "--seq-len", "32"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert [x["method"] for x in data["runs"]] == ["prune", "mlpmoe"] and "environment" in data
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, args + ["--overwrite"])
    assert r.exit_code == 0 and "reused" in r.output


def test_compare_checks_every_input_before_loading_or_writing(tiny_dir, tmp_path, monkeypatch):
    import moeify.models.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    out = tmp_path / "cmp"
    cal = moeify.Calibration(source=str(short), samples=2, seq_len=32)
    with pytest.raises(InputError, match=r"^perplexity source .*short.txt: .*fewer than one window"):
        compare(str(tiny_dir), ["prune"], [0.5], out_dir=out, ppl_source=str(short), progress=False)
    with pytest.raises(InputError, match=r"^calibration source .*short.txt: .*need at least 33"):
        compare(str(tiny_dir), ["cmoe"], [0.5], out_dir=out, calibration=cal, ppl_source=str(short), progress=False)
    with pytest.raises(InputError, match=r"^calibration source .*missing.txt: .*no such file"):
        compare(str(tiny_dir), ["cmoe"], [0.5], out_dir=out, calibration=moeify.Calibration(source=str(tmp_path / "missing.txt")),
                progress=False)
    assert not out.exists()
