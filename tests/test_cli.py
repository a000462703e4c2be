"""The command line on a tiny local model (no downloads)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moeify.cli import app

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


def test_methods_lists_mlpmoe():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "mlpmoe" in r.output and "branches" in r.output
