"""`moeify report`: one self-contained HTML page with every table and figure it lists."""

from __future__ import annotations

import base64
import json
import random
import re

import pytest
from typer.testing import CliRunner

from moeify.cli.app import app

runner = CliRunner()


def _words(path, n, seed):
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(126)}" for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny CMoE checkpoint, its convert JSON and its analysis JSON (built once for the module)."""
    from .conftest import tiny_model

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("report")
    vocab = {f"w{i}": i for i in range(126)} | {"[UNK]": 126, "[EOS]": 127}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_model("llama").save_pretrained(root / "tiny")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(root / "tiny")
    calib, held = _words(root / "calib.txt", 4000, 0), _words(root / "held.txt", 4200, 1)
    out, conv_js, an_js = root / "cmoe", root / "convert.json", root / "analysis.json"
    r = runner.invoke(app, ["convert", str(root / "tiny"), "--method", "cmoe", "--layout", "S1A2E6", "--calib", str(calib), "--samples", "4",
                            "--seq-len", "64", "--router-neurons", "3", "-o", str(out), "--ppl", str(held), "--json", str(conv_js)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["analyze", str(out), "--calib", str(calib), "--heldout", str(held), "--heldout-tokens", "256", "--calib-tokens", "256",
                            "--seq-len", "64", "--ranks", "4", "--json", str(an_js)])
    assert r.exit_code == 0, r.output
    return root, out, conv_js, an_js


def _zero_shot(path):
    data = {"protocol": "zero-shot-v1", "model": "cmoe", "baseline": "tiny", "dtype": "float32", "lm_eval": "0.4.13",
            "tasks": {"arc_easy": {"limit": None, "n": 570, "metrics": {"acc": {"dense": 0.5, "model": 0.45, "dense_stderr": 0.02, "model_stderr": 0.021,
                                                                                   "recovery": 0.9}, "acc_norm": {"dense": 0.48, "model": 0.4, "recovery": 0.8333}}},
                      "boolq": {"limit": 200, "n": 200, "metrics": {"acc": {"dense": 0.6, "model": 0.57, "recovery": 0.95}}}},
            "average": {"acc": {"dense": 0.55, "model": 0.51, "recovery": 0.925}}, "environment": {}}
    path.write_text(json.dumps(data))
    return path


def test_report_contains_every_table_and_figure_it_lists(converted, tmp_path):
    root, out, conv_js, an_js = converted
    zs = _zero_shot(tmp_path / "zs.json")
    html_path = tmp_path / "rep" / "report.html"
    r = runner.invoke(app, ["report", str(out), "--eval", str(conv_js), "--eval", str(zs), "--analysis", str(an_js), "-o", str(html_path)])
    assert r.exit_code == 0, r.output
    page = html_path.read_text()
    contents = re.search(r'<ul id="contents">(.*?)</ul>', page, re.S).group(1)
    listed = re.findall(r'href="#([\w-]+)"', contents)
    tables = [t for t in listed if not t.startswith("fig-")]
    figures = [f for f in listed if f.startswith("fig-")]
    assert set(tables) == {"settings", "perplexity", "zero_shot", "analysis_layers", "lowrank"}
    assert {f"fig-{n}" for n in ("zero_shot", "activation_rates", "expert_load", "router_fidelity", "stability", "secret_moe_layers",
                                 "secret_moe_curves", "lowrank_router")} == set(figures)
    for tid in tables:
        assert f'<table id="{tid}">' in page
    for fid in figures:
        m = re.search(rf'<figure id="{fid}"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
        assert m, fid
        png = base64.b64decode(m.group(1))
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (html_path.parent / f"report-{fid[4:]}.png").read_bytes() == png  # the PNG saved beside the page
    # the numbers of the inputs are in the tables
    a = json.loads(an_js.read_text())
    assert f"{a['layers'][0]['fidelity']['overlap']:.3f}" in page
    assert "90.00" in page and "92.50" in page and "50.00 ± 2.00" in page  # recovery %, average, acc ± stderr
    conv = json.loads(conv_js.read_text())
    assert f"{conv['ppl'][next(iter(conv['ppl']))]['ratio']:.5f}" in page
    assert "S1A2E6" in page and "Secret-MoE test" in page
    assert "<script" not in page and "http" not in page.split("<body>")[1].split("moeify report")[0]  # self-contained


def test_report_refuses_bad_inputs_and_existing_output(converted, tmp_path):
    root, out, conv_js, an_js = converted
    page = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(out), "--analysis", str(conv_js), "-o", str(page)])
    assert r.exit_code == 2 and "not a `moeify analyze --json` file" in r.output
    r = runner.invoke(app, ["report", str(out), "--eval", str(tmp_path / "missing.json"), "-o", str(page)])
    assert r.exit_code == 2 and "does not exist" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    r = runner.invoke(app, ["report", str(out), "--eval", str(bad), "-o", str(page)])
    assert r.exit_code == 2 and "neither perplexity" in r.output
    r = runner.invoke(app, ["report", str(root / "tiny"), "-o", str(page)])
    assert r.exit_code == 2 and "not a moeify checkpoint" in r.output
    assert not page.exists()
    r = runner.invoke(app, ["report", str(out), "-o", str(page)])  # settings only: still a valid page
    assert r.exit_code == 0, r.output
    assert '<table id="settings">' in page.read_text()
    r = runner.invoke(app, ["report", str(out), "-o", str(page)])
    assert r.exit_code == 2 and "--overwrite" in r.output
