"""The command line on a tiny local model (no downloads)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moeify.cli.app import app

runner = CliRunner()


def test_convert_writes_checkpoint_and_json(tiny_dir, tmp_path):
    out, js = tmp_path / "conv", tmp_path / "r.json"
    r = runner.invoke(app, ["convert", str(tiny_dir), "--method", "mlpmoe", "--branches", "4", "--prune", "0.25", "--prune-mode", "uniform", "-o", str(out), "--no-eval", "--json", str(js)])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert data["method"] == "mlpmoe" and data["output"] == str(out)
    assert abs(data["mlp_params_removed_fraction"] - 0.25) < 1e-9
    assert abs(data["active_mlp_fraction"] - 0.75) < 1e-9
    assert data["seconds"] >= 0 and (out / "config.json").is_file()
    assert "dense" in r.output and "mlpmoe" in r.output


def test_convert_refuses_existing_output_before_loading(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "x").write_text("1")
    # the model path does not even exist: the output check must come first
    r = runner.invoke(app, ["convert", str(tmp_path / "missing-model"), "-o", str(out), "--no-eval"])
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output


def test_convert_rejects_impossible_config(tiny_dir, tmp_path):
    r = runner.invoke(app, ["convert", str(tiny_dir), "--branches", "1000", "-o", str(tmp_path / "o"), "--no-eval"])
    assert r.exit_code == 2 and "branches" in r.output
    assert not (tmp_path / "o").exists()


def test_eval_against_recorded_baseline_on_a_text_file(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 120}" for i in range(3000)))
    out = tmp_path / "conv"
    r = runner.invoke(app, ["convert", str(tiny_dir), "--branches", "3", "-o", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output
    js = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", str(out), "--ppl", str(text), "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())["ppl"][str(text)]
    assert res["windows"] == 1 and res["tokens"] == 2047
    assert abs(res["ratio"] - 1.0) < 1e-4  # exact conversion
    assert res["baseline"] > 1.0


def test_eval_records_the_provenance_of_the_weights_behind_its_numbers(tiny_dir, tmp_path, monkeypatch):
    """A converted checkpoint's numbers rest on its base model's weights: recorded even with --no-baseline."""
    from moeify.cli import commands

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 120}" for i in range(3000)))
    out = tmp_path / "conv"
    assert runner.invoke(app, ["convert", str(tiny_dir), "--branches", "3", "-o", str(out), "--no-eval"]).exit_code == 0
    monkeypatch.setattr(commands, "model_provenance", lambda name: {"of": str(name)})
    js = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", str(out), "--ppl", str(text), "--no-baseline", "--json", str(js)])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    base = json.loads((out / "config.json").read_text())["moeify"]["provenance"]["base_model"]
    assert data["model_provenance"] == {"of": str(base)} and data["baseline_provenance"] is None


def test_methods_lists_mlpmoe():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "mlpmoe" in r.output and "branches" in r.output


def _words(path, n=3000, seed=0):
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(126)}" for _ in range(n)))
    return path


def test_convert_cmoe_from_a_local_text_file(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import moeify  # noqa: F401  (registers the classes)

    text = _words(tmp_path / "calib.txt")
    out, js = tmp_path / "cmoe", tmp_path / "c.json"
    r = runner.invoke(app, ["convert", str(tiny_dir), "--method", "cmoe", "--layout", "S1A2E8", "--calib", str(text), "--samples", "4",
                            "--seq-len", "64", "--router-neurons", "3", "-o", str(out), "--no-eval", "--json", str(js)])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert data["method"] == "cmoe" and data["config"]["layout"] == "S1A2E8" and data["config"]["router_neurons"] == 3
    assert abs(data["active_mlp_fraction"] - 3 / 8) < 1e-9
    fid = data["router_fidelity"]
    assert len(fid["per_layer"]) == 2 and all(0 <= f <= 1 for f in fid["per_layer"])
    assert fid["heldout_tokens"] > 0
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.moeify["summary"]["calibration"]["source"] == str(text)


def test_convert_cmoe_with_too_little_text_fails_before_loading_the_model(tiny_dir, tmp_path):
    text = _words(tmp_path / "short.txt", n=20)
    r = runner.invoke(app, ["convert", str(tiny_dir), "--method", "cmoe", "--calib", str(text), "--samples", "2", "--seq-len", "64",
                            "-o", str(tmp_path / "o"), "--no-eval"])
    assert r.exit_code == 2 and "need at least 65" in r.output
    assert not (tmp_path / "o").exists()


def test_eval_zero_shot_task_beyond_the_dev_suite_offline_with_the_recorded_baseline(tiny_dir, tmp_path):
    out = tmp_path / "conv"
    r = runner.invoke(app, ["convert", str(tiny_dir), "--branches", "3", "-o", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output
    js = tmp_path / "zs.json"
    r = runner.invoke(app, ["eval", str(out), "--tasks", "copa", "--limit", "4", "--batch-size", "2", "--task-data", "local", "--json", str(js)])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    e = data["tasks"]["copa"]
    assert data["baseline"] == str(tiny_dir) and e["n"] == 4 and e["split"] == "validation"
    acc = e["metrics"]["acc"]
    assert acc["model"] == acc["dense"]  # an exact conversion scores what the dense model scores
