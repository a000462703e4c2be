"""Bad input on every command fails fast: one line `error: ...` that names the input, exit code 2, no traceback,
nothing written. Unit rows use tiny local models; rows on the real SmolLM2 (integration) must also fail in
under 5 s (measured in-process: the command's own work, without Python's start-up and `import moeify`).

Each row: (command, id, argv with {placeholders} for the files of the `world` fixture, exit code, regex the one
line must match). An unexpected internal error is one line naming a trace file (exit 1); --debug shows it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeify.cli.app import app

from .conftest import save_tiny_llama

runner = CliRunner()

HUB_DOWN = "https://huggingface.co: [Errno -2] Name or service not known (test)"


def _tiny(path: Path) -> Path:
    """A tiny Llama with a word-level tokenizer (as conftest's tiny_dir), for module-scoped use."""
    return save_tiny_llama(path)


def _words(path: Path, n: int) -> str:
    path.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(n)))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input the rows point at; rows only read it, and the check `nothing written` is a snapshot of it."""
    root = tmp_path_factory.mktemp("world")
    w: dict[str, str] = {"root": str(root)}
    w["dense"] = str(_tiny(root / "dense"))
    r = runner.invoke(app, ["convert", w["dense"], "--branches", "4", "-o", str(root / "ckpt"), "--no-eval"])
    assert r.exit_code == 0, r.output
    w["ckpt"] = str(root / "ckpt")
    w["good"] = _words(root / "good.txt", 3000)
    w["short"] = _words(root / "short.txt", 20)
    (root / "empty.txt").write_text("  \n")
    w["empty"] = str(root / "empty.txt")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02PK\x03\x04" * 100)
    w["binary"] = str(root / "binary.txt")
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 50)
    w["latin1"] = str(root / "latin1.txt")
    (root / "bad.jsonl").write_text('{"text": "w1 w2"}\n{not json}\n')
    w["badjsonl"] = str(root / "bad.jsonl")
    (root / "notxt").mkdir()
    w["notxt"] = str(root / "notxt")
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w["noweights"] = str(root / "noweights")
    (root / "exists").mkdir()
    (root / "exists" / "x").write_text("1")
    w["exists"] = str(root / "exists")
    (root / "result.json").write_text(json.dumps({"ppl": {}}))
    w["json_exists"] = str(root / "result.json")
    (root / "broken.json").write_text("{nope")
    w["broken_json"] = str(root / "broken.json")
    (root / "other.json").write_text(json.dumps({"something": 1}))
    w["other_json"] = str(root / "other.json")
    w["missing"] = str(root / "does-not-exist")
    w["out"] = str(root / "out")  # never created by a failing row
    w["under_file"] = str(root / "good.txt" / "out.json")  # its folder is a file
    w["dir"] = str(root / "notxt")
    return w


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def _logs() -> set[str]:
    from moeify.data.assets import moeify_home

    d = moeify_home() / "logs"
    return set(os.listdir(d)) if d.is_dir() else set()


def _fill(args: list[str], w: dict[str, str]) -> list[str]:
    return [a.format(**w) for a in args]


# (command, id, argv, exit code, regex of the one-line message)
UNIT_ROWS = [
    # --- convert
    ("convert", "model-missing", ["convert", "{missing}", "-o", "{out}", "--no-eval"], 2, r"MODEL .*no such model folder"),
    ("convert", "model-is-a-file", ["convert", "{good}", "-o", "{out}", "--no-eval"], 2, r"MODEL .*is a file"),
    ("convert", "model-without-weights", ["convert", "{noweights}", "-o", "{out}", "--no-eval"], 2, r"MODEL .*no weights"),
    ("convert", "hub-id-offline", ["convert", "some-org/some-model", "-o", "{out}", "--no-eval"], 2, r"MODEL some-org/some-model: .*hub is not reachable"),
    ("convert", "output-exists", ["convert", "{dense}", "-o", "{exists}", "--no-eval"], 2, r"--output .*already exists.*--overwrite"),
    # --- finetune
    ("finetune", "not-a-moeify-checkpoint", ["finetune", "{dense}", "-o", "{out}", "--text", "{good}", "--no-eval"], 2, r"DIR .* is a dense model, not a moeify checkpoint: run `moeify convert"),
    ("finetune", "output-exists", ["finetune", "{ckpt}", "-o", "{exists}", "--text", "{good}", "--no-eval"], 2, r"--output .*already exists.*--overwrite"),
    ("finetune", "bad-what", ["finetune", "{ckpt}", "-o", "{out}", "--what", "gates"], 2, r"--what 'gates' is not something fine-tuning trains"),
    ("finetune", "lr-zero", ["finetune", "{ckpt}", "-o", "{out}", "--lr", "0"], 2, r"--lr must be a positive number"),
    ("finetune", "nothing-to-train", ["finetune", "{ckpt}", "-o", "{out}", "--text", "{good}", "--what", "bias", "--no-eval"], 2, r"--what bias: nothing to train"),
    ("finetune", "text-empty", ["finetune", "{ckpt}", "-o", "{out}", "--text", "{empty}", "--no-eval"], 2, r"--text .*empty"),
    ("finetune", "text-too-short", ["finetune", "{ckpt}", "-o", "{out}", "--text", "{good}", "--no-eval"], 2, r"--text .* has 3000 tokens \(calibration split\); 64 windows of 512 tokens need at least 32769"),
    ("convert", "refit-data-free", ["convert", "{dense}", "-o", "{out}", "--method", "mlpmoe", "--refit", "--no-eval"], 2, r"--refit needs calibration data.*data-free"),
    ("convert", "output-is-a-file", ["convert", "{dense}", "-o", "{good}", "--no-eval"], 2, r"--output .*is a file"),
    ("convert", "bad-max-memory", ["convert", "{dense}", "-o", "{out}", "--no-eval", "--max-memory", "lots"], 2, r"--max-memory 'lots': give a size"),
    ("convert", "max-memory-too-low", ["convert", "{dense}", "-o", "{out}", "--no-eval", "--max-memory", "1MB"], 2, r"--max-memory 1MB: this conversion needs about"),
    ("convert", "unknown-device", ["convert", "{dense}", "-o", "{out}", "--no-eval", "--device", "tpu"], 2, r"unknown device 'tpu'"),
    ("convert", "device-in-memory", ["convert", "{dense}", "-o", "{out}", "--no-eval", "--in-memory", "--device", "cuda"], 2, r"--device and --max-memory apply to streaming"),
    ("convert", "output-missing", ["convert", "{dense}", "--no-eval"], 2, r"Missing option '--output'"),
    ("convert", "json-is-a-folder", ["convert", "{dense}", "-o", "{out}", "--no-eval", "--json", "{dir}"], 2, r"--json .*is a folder"),
    ("convert", "unknown-method", ["convert", "{dense}", "-m", "nope", "-o", "{out}"], 2, r"unknown method 'nope'"),
    ("convert", "unknown-method-option", ["convert", "{dense}", "--layout", "S3A3E8", "-o", "{out}"], 2, r"has no option --layout"),
    ("convert", "bad-option-value", ["convert", "{dense}", "--branches", "x", "-o", "{out}"], 2, r"--branches takes int"),
    ("convert", "impossible-config", ["convert", "{dense}", "--branches", "1000", "-o", "{out}", "--no-eval"], 2, r"branches"),
    ("convert", "two-models", ["convert", "{dense}", "{dense}", "-o", "{out}", "--no-eval"], 2, r"unexpected argument"),
    ("convert", "bad-dtype", ["convert", "{dense}", "-o", "{out}", "--dtype", "float8"], 2, r"--dtype 'float8'"),
    ("convert", "bad-samples", ["convert", "{dense}", "-m", "cmoe", "--samples", "0", "-o", "{out}"], 2, r"--samples must be >= 1, got 0"),
    ("convert", "seq-len-too-short", ["convert", "{dense}", "-m", "cmoe", "--seq-len", "8", "-o", "{out}"], 2, r"--seq-len must be >= 16, got 8"),
    ("convert", "not-an-int", ["convert", "{dense}", "--samples", "many", "-o", "{out}"], 2, r"Invalid value for '--samples'"),
    ("convert", "calib-missing", ["convert", "{dense}", "-m", "cmoe", "--calib", "{missing}", "-o", "{out}", "--no-eval"], 2, r"--calib .*no such file"),
    ("convert", "calib-empty", ["convert", "{dense}", "-m", "cmoe", "--calib", "{empty}", "-o", "{out}", "--no-eval"], 2, r"--calib .*empty"),
    ("convert", "calib-binary", ["convert", "{dense}", "-m", "cmoe", "--calib", "{binary}", "-o", "{out}", "--no-eval"], 2, r"--calib .*binary"),
    ("convert", "calib-not-utf8", ["convert", "{dense}", "-m", "cmoe", "--calib", "{latin1}", "-o", "{out}", "--no-eval"], 2, r"--calib .*not UTF-8"),
    ("convert", "calib-bad-jsonl", ["convert", "{dense}", "-m", "cmoe", "--calib", "{badjsonl}", "-o", "{out}", "--no-eval"], 2, r"--calib .*not valid JSON"),
    ("convert", "calib-folder-without-txt", ["convert", "{dense}", "-m", "cmoe", "--calib", "{notxt}", "-o", "{out}", "--no-eval"], 2, r"--calib .*no \*\.txt"),
    ("convert", "calib-too-short", ["convert", "{dense}", "-m", "cmoe", "--calib", "{short}", "--seq-len", "64", "-o", "{out}", "--no-eval"], 2,
     r"--calib .*need at least 65"),
    ("convert", "calib-hub-offline", ["convert", "{dense}", "-m", "cmoe", "--calib", "wikitext2", "-o", "{out}", "--no-eval"], 2,
     r"--calib wikitext2: .*hub.*not reachable"),
    ("convert", "ppl-missing", ["convert", "{dense}", "--ppl", "{missing}", "-o", "{out}"], 2, r"--ppl .*no such file"),
    ("convert", "ppl-too-short", ["convert", "{dense}", "--ppl", "{short}", "-o", "{out}"], 2, r"--ppl .*fewer than one window"),
    # --- eval
    ("eval", "model-missing-argument", ["eval"], 2, r"give the MODEL"),
    ("eval", "model-missing", ["eval", "{missing}", "--no-baseline"], 2, r"MODEL .*no such model folder"),
    ("eval", "ppl-missing-before-baseline", ["eval", "{dense}", "--ppl", "/nonexistent/file.txt", "--quick"], 2, r"--ppl /nonexistent/file\.txt: .*no such file"),
    ("eval", "dense-without-baseline", ["eval", "{dense}", "--ppl", "{good}"], 2, r"not a moeify checkpoint.*--baseline MODEL or --no-baseline"),
    ("eval", "baseline-and-no-baseline", ["eval", "{ckpt}", "--baseline", "{dense}", "--no-baseline"], 2, r"--baseline and --no-baseline"),
    ("eval", "baseline-missing", ["eval", "{ckpt}", "--baseline", "{missing}", "--ppl", "{good}"], 2, r"--baseline .*no such model folder"),
    ("eval", "ppl-empty", ["eval", "{ckpt}", "--ppl", "{empty}"], 2, r"--ppl .*empty"),
    ("eval", "ppl-too-short", ["eval", "{ckpt}", "--ppl", "{short}"], 2, r"--ppl .*fewer than one window"),
    ("eval", "ppl-hub-offline", ["eval", "{ckpt}", "--ppl", "c4"], 2, r"--ppl c4: .*hub.*not reachable"),
    ("eval", "bad-dtype", ["eval", "{ckpt}", "--dtype", "int4"], 2, r"--dtype 'int4'"),
    ("eval", "limit-without-tasks", ["eval", "{ckpt}", "--limit", "5"], 2, r"--limit .*--tasks"),
    ("eval", "bad-limit", ["eval", "{ckpt}", "--tasks", "arc_easy", "--limit", "x"], 2, r"--limit 'x'"),
    ("eval", "bad-batch-size", ["eval", "{ckpt}", "--tasks", "arc_easy", "--batch-size", "0"], 2, r"--batch-size '0'"),
    ("eval", "unknown-task", ["eval", "{ckpt}", "--tasks", "arc_easyy"], 2, r"unknown lm-eval task 'arc_easyy'; did you mean arc_easy"),
    ("eval", "task-group", ["eval", "{ckpt}", "--tasks", "mmlu"], 2, r"'mmlu' is an lm-eval group"),
    ("eval", "task-data-bogus", ["eval", "{ckpt}", "--tasks", "arc_easy", "--task-data", "cloud"], 2, r"--task-data 'cloud'"),
    ("eval", "task-not-offline-local", ["eval", "{ckpt}", "--tasks", "lambada_openai", "--task-data", "local"], 2, r"no offline copy of lambada_openai"),
    ("eval", "task-not-offline-hub-down", ["eval", "{ckpt}", "--tasks", "arc_easy,lambada_openai", "--limit", "50"], 2,
     r"lambada_openai \(no offline copy\) need the Hugging Face hub.*--tasks list"),
    ("eval", "json-under-a-file", ["eval", "{ckpt}", "--ppl", "{good}", "--json", "{under_file}"], 2, r"--json .*is a file, not a folder"),
    ("eval", "tasks-list-with-model", ["eval", "{ckpt}", "--tasks", "list"], 2, r"--tasks list .*takes no MODEL"),
    # --- compare
    ("compare", "unknown-method", ["compare", "{dense}", "--methods", "cmoe,nope", "--out", "{out}"], 2, r"unknown method\(s\) \['nope'\]"),
    ("compare", "unreachable-fraction", ["compare", "{dense}", "--methods", "cmoe", "--active", "0.3", "--out", "{out}"], 2, r"0\.25"),
    ("compare", "fraction-out-of-range", ["compare", "{dense}", "--active", "1.5", "--out", "{out}"], 2, r"active fractions must be in \(0, 1\]"),
    ("compare", "method-opts-not-json", ["compare", "{dense}", "--method-opts", "{{x", "--out", "{out}"], 2, r"--method-opts is not valid JSON"),
    ("compare", "method-opts-other-method", ["compare", "{dense}", "--methods", "prune", "--method-opts", '{{"cmoe": {{}}}}', "--ppl", "{good}",
                                              "--out", "{out}"], 2, r"not among the compared methods"),
    ("compare", "model-missing", ["compare", "{missing}", "--methods", "prune", "--ppl", "{good}", "--out", "{out}"], 2, r"model .*no such model folder"),
    ("compare", "calib-missing", ["compare", "{dense}", "--methods", "cmoe", "--calib", "{missing}", "--out", "{out}"], 2, r"--calib .*no such file"),
    ("compare", "ppl-missing", ["compare", "{dense}", "--methods", "prune", "--ppl", "{missing}", "--out", "{out}"], 2, r"--ppl .*no such file"),
    ("compare", "ppl-too-short", ["compare", "{dense}", "--methods", "prune", "--ppl", "{short}", "--out", "{out}"], 2,
     r"perplexity source .*fewer than one window"),
    ("compare", "out-is-a-file", ["compare", "{dense}", "--methods", "prune", "--out", "{good}"], 2, r"--out .*is a file"),
    ("compare", "json-exists", ["compare", "{dense}", "--methods", "prune", "--out", "{out}", "--json", "{json_exists}"], 2, r"--json .*--overwrite"),
    ("compare", "bad-eval-windows", ["compare", "{dense}", "--eval-windows", "0", "--out", "{out}"], 2, r"--eval-windows must be >= 1"),
    ("compare", "bad-samples", ["compare", "{dense}", "--samples", "0", "--out", "{out}"], 2, r"--samples must be >= 1, got 0"),
    # --- analyze
    ("analyze", "not-a-checkpoint", ["analyze", "{dense}"], 2, r"CHECKPOINT .*not a moeify checkpoint"),
    ("analyze", "checkpoint-missing", ["analyze", "{missing}"], 2, r"not a moeify checkpoint"),
    ("analyze", "layers-not-converted", ["analyze", "{ckpt}", "--layers", "0,7"], 2, r"--layers 7: not converted MoE layers.*0,1"),
    ("analyze", "layers-not-ints", ["analyze", "{ckpt}", "--layers", "first"], 2, r"--layers must be comma-separated integers"),
    ("analyze", "ranks-zero", ["analyze", "{ckpt}", "--ranks", "0"], 2, r"router ranks must be positive"),
    ("analyze", "seq-len-too-short", ["analyze", "{ckpt}", "--seq-len", "8"], 2, r"--seq-len must be >= 16, got 8"),
    ("analyze", "heldout-missing", ["analyze", "{ckpt}", "--heldout", "{missing}"], 2, r"--heldout .*no such file"),
    ("analyze", "heldout-too-short", ["analyze", "{ckpt}", "--heldout", "{short}", "--no-stability", "--ranks", ""], 2, r"--heldout .*fewer than the 2048"),
    ("analyze", "calib-missing", ["analyze", "{ckpt}", "--heldout", "{good}", "--calib", "{missing}"], 2, r"--calib .*no such file"),
    ("analyze", "calib-too-short", ["analyze", "{ckpt}", "--heldout", "{good}", "--calib", "{good}"], 2, r"--calib .*3000 tokens, too few for two disjoint subsets of 2 x 2048 tokens \(at least 8192\)"),
    ("analyze", "out-exists", ["analyze", "{ckpt}", "--out", "{exists}"], 2, r"--out .*already exists"),
    ("analyze", "json-exists", ["analyze", "{ckpt}", "--json", "{json_exists}"], 2, r"--json .*already exists"),
    # --- report
    ("report", "not-a-checkpoint", ["report", "{dense}", "-o", "{out}"], 2, r"not a moeify checkpoint"),
    ("report", "eval-file-missing", ["report", "{ckpt}", "--eval", "{missing}", "-o", "{out}"], 2, r"eval file .*does not exist"),
    ("report", "eval-file-not-json", ["report", "{ckpt}", "--eval", "{broken_json}", "-o", "{out}"], 2, r"not valid JSON"),
    ("report", "eval-file-not-results", ["report", "{ckpt}", "--eval", "{other_json}", "-o", "{out}"], 2, r"neither perplexity"),
    ("report", "analysis-not-analysis", ["report", "{ckpt}", "--analysis", "{json_exists}", "-o", "{out}"], 2, r"not a `moeify analyze --json` file"),
    ("report", "output-exists", ["report", "{ckpt}", "-o", "{json_exists}"], 2, r"--output .*already exists"),
    ("report", "output-is-a-folder", ["report", "{ckpt}", "-o", "{dir}"], 2, r"--output .*is a folder"),
    # --- bench (cli/bench.py belongs to another module owner; these rows pin its behaviour)
    ("bench", "no-model", ["bench"], 2, r"give the converted checkpoint"),
    ("bench", "model-missing", ["bench", "{missing}"], 2, r"no such model folder"),
    ("bench", "hub-id-offline", ["bench", "some-org/some-model"], 2, r"'some-org/some-model' is not a local folder, and the Hugging Face hub is not reachable"),
    ("bench", "baseline-missing", ["bench", "{ckpt}", "--baseline", "{missing}"], 2, r"no such model folder"),
    ("bench", "unknown-workload", ["bench", "{ckpt}", "--workloads", "bogus"], 2, r"unknown workload\(s\) \['bogus'\]"),
    ("bench", "dense-without-baseline", ["bench", "{dense}"], 2, r"not a moeify checkpoint: pass --baseline"),
    ("bench", "unknown-kernel", ["bench", "{ckpt}", "--kernel", "nope"], 2, r"unknown --kernel 'nope'"),
    ("bench", "unknown-device", ["bench", "{ckpt}", "--device", "tpu"], 2, r"unknown --device 'tpu'"),
    ("bench", "bad-repeats", ["bench", "{ckpt}", "--repeats", "0"], 2, r"--repeats must be >= 1"),
    ("bench", "bad-text", ["bench", "{ckpt}", "--text", "poetry"], 2, r"--text must be austen or random"),
    ("bench", "layer-without-shape", ["bench", "--layer"], 2, r"--layer needs --hidden and --intermediate"),
    ("bench", "layer-with-model", ["bench", "{ckpt}", "--layer", "--hidden", "8", "--intermediate", "16"], 2, r"drop the MODEL"),
    ("bench", "json-exists", ["bench", "{ckpt}", "--json", "{json_exists}"], 2, r"exists; pass --overwrite"),
    # --- pull
    ("pull", "home-is-a-file", ["pull"], 2, r"MOEIFY_HOME=.*is a file"),
    ("pull", "unknown-asset", ["pull", "now"], 2, r"unknown asset\(s\) \['now'\].*qwen2.5-coder-1.5b"),
    ("pull", "unknown-option", ["pull", "--fast"], 2, r"No such option: --fast"),
    # --- methods
    ("methods", "unknown-method", ["methods", "nope"], 2, r"unknown method 'nope'"),
    ("methods", "extra-argument", ["methods", "cmoe", "extra"], 2, r"Got unexpected extra argument"),
    # --- the app
    ("app", "unknown-command", ["nosuch"], 2, r"No such command 'nosuch'"),
]

# rows that need the environment set up: MOEIFY_HOME pointing at a file
ENV = {("pull", "home-is-a-file"): {"MOEIFY_HOME": "{good}"}}


@pytest.fixture
def hub_down(monkeypatch):
    """The Hugging Face hub is unreachable (as on these machines), deterministically and without a network call."""
    import moeify.data.texts as texts

    monkeypatch.setattr(texts, "_HUB_STATUS", {"https://huggingface.co": HUB_DOWN})
    for var in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def task_index_ready():
    # lm-eval's task index is built once per lm-eval version (seconds to a minute) and cached; not part of any row's time
    from moeify.eval.zero_shot import task_index

    task_index()


def _run_row(args, world, env=None):
    before, logs = _snapshot(world["root"]), _logs()
    t0 = time.perf_counter()
    r = runner.invoke(app, _fill(args, world), env={k: v.format(**world) for k, v in (env or {}).items()} or None)
    elapsed = time.perf_counter() - t0
    return r, elapsed, before, logs


def _assert_one_line_failure(r, code, pattern, world, before, logs):
    import re

    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{r.output}"
    assert lines[0].startswith("error: "), r.output
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    assert _snapshot(world["root"]) == before, "a failing command wrote or changed files"
    assert _logs() == logs, "an input error wrote a trace file"


@pytest.mark.parametrize("command,row,args,code,pattern", UNIT_ROWS, ids=[f"{r[0]}-{r[1]}" for r in UNIT_ROWS])
def test_bad_input_fails_in_one_line_and_writes_nothing(command, row, args, code, pattern, world, hub_down, task_index_ready):
    r, _, before, logs = _run_row(args, world, ENV.get((command, row)))
    _assert_one_line_failure(r, code, pattern, world, before, logs)


def test_the_table_covers_every_command():
    from moeify.cli.app import app as the_app
    from typer.main import get_command

    commands = set(get_command(the_app).commands)
    assert commands == {"convert", "eval", "compare", "analyze", "report", "bench", "pull", "methods", "finetune"}
    assert commands <= {r[0] for r in UNIT_ROWS}


def test_internal_error_is_one_line_with_a_trace_file_and_debug_shows_it(monkeypatch, tmp_path):
    import moeify.core.method as method

    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "home"))

    def boom(name):
        raise RuntimeError("boom: a bug, not an input")

    monkeypatch.setattr(method, "method_class", boom)
    r = runner.invoke(app, ["methods", "cmoe"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: internal error: RuntimeError: boom"), r.output
    trace = Path(lines[0].split("full trace in ")[1].split(";")[0])
    assert trace.is_file() and trace.parent == tmp_path / "home" / "logs"
    assert "Traceback" in trace.read_text() and "boom: a bug" in trace.read_text()
    r = runner.invoke(app, ["--debug", "methods", "cmoe"])
    assert r.exit_code == 1 and "Traceback" in r.output and "RuntimeError: boom" in r.output
    assert len(list((tmp_path / "home" / "logs").iterdir())) == 1  # --debug prints, writes no file


def test_hub_check_fails_in_seconds_before_any_model_is_loaded(world, hub_down, task_index_ready, monkeypatch):
    """--task-data auto, a task without an offline copy: one reachability check, no model loaded."""
    import moeify.models.checkpoint as ckpt

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ckpt, "load_model", no_loading)
    r, elapsed, *_ = _run_row(["eval", "{ckpt}", "--tasks", "lambada_openai", "--limit", "50"], world)
    assert r.exit_code == 2 and "moeify eval --tasks list" in r.output and elapsed < 5


def test_compare_exits_nonzero_naming_the_failed_run_after_writing_the_others(tiny_dir, tmp_path, monkeypatch):
    import moeify.compare as cmp

    texts = tmp_path / "ppl.txt"
    _words(texts, 2100)
    real = cmp._run_one

    def flaky(dense, tok, name, *a, **k):
        if name == "mlpmoe":
            raise RuntimeError("simulated failure in one run")
        return real(dense, tok, name, *a, **k)

    monkeypatch.setattr(cmp, "_run_one", flaky)
    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "home"))
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", str(tiny_dir), "--methods", "prune,mlpmoe", "--active", "0.5", "--out", str(out), "--ppl", str(texts)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "1 of 2 runs failed: mlpmoe @ 0.5 (RuntimeError: simulated failure in one run)" in err[0]
    data = json.loads((out / "compare.json").read_text())
    assert data["failed"] == ["mlpmoe@0.5"]
    ok = [x for x in data["runs"] if "error" not in x]
    assert [x["method"] for x in ok] == ["prune"] and (out / "compare.md").is_file()
    trace = Path(err[0].split("traces in ")[1].split(" (")[0])
    assert "simulated failure in one run" in trace.read_text() and "Traceback" in trace.read_text()


def test_convert_takes_method_options_before_the_model(tiny_dir, tmp_path):
    """`moeify convert --method mlpmoe --branches 4 -o OUT MODEL`: click hands MODEL an option name; moeify sorts them out."""
    out = tmp_path / "o"
    r = runner.invoke(app, ["convert", "--method", "mlpmoe", "--branches", "4", "-o", str(out), "--no-eval", str(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["moeify"]["config"]["_data"]["branches"] == 4


# --------------------------------------------------------------------------- the real SmolLM2 (integration)

INTEGRATION_ROWS = [
    ("eval", "ppl-missing-on-a-dense-model", ["eval", "{smol}", "--ppl", "/nonexistent/file.txt", "--quick"], 2, r"--ppl /nonexistent/file\.txt"),
    ("eval", "task-without-offline-copy", ["eval", "{smol}", "--no-baseline", "--tasks", "lambada_openai", "--limit", "50"], 2,
     r"need the Hugging Face hub"),
    ("eval", "unknown-task", ["eval", "{smol}", "--no-baseline", "--tasks", "nope_task"], 2, r"unknown lm-eval task"),
    ("eval", "ppl-too-short", ["eval", "{smol}", "--no-baseline", "--ppl", "{short}"], 2, r"--ppl .*fewer than one window"),
    ("eval", "dense-without-baseline", ["eval", "{smol}"], 2, r"not a moeify checkpoint"),
    ("convert", "calib-too-short", ["convert", "{smol}", "-m", "cmoe", "--calib", "{short}", "-o", "{out}", "--no-eval"], 2, r"--calib .*need at least 2049"),
    ("convert", "calib-binary", ["convert", "{smol}", "-m", "cmoe", "--calib", "{binary}", "-o", "{out}", "--no-eval"], 2, r"--calib .*binary"),
    ("convert", "ppl-missing", ["convert", "{smol}", "--ppl", "{missing}", "-o", "{out}"], 2, r"--ppl .*no such file"),
    ("compare", "unreachable-fraction", ["compare", "{smol}", "--methods", "cmoe", "--active", "0.3", "--out", "{out}"], 2, r"0\.25"),
    ("analyze", "dense-model", ["analyze", "{smol}"], 2, r"not a moeify checkpoint"),
    ("bench", "dense-without-baseline", ["bench", "{smol}"], 2, r"not a moeify checkpoint"),
]


@pytest.mark.integration
@pytest.mark.parametrize("command,row,args,code,pattern", INTEGRATION_ROWS, ids=[f"{r[0]}-{r[1]}" for r in INTEGRATION_ROWS])
def test_bad_input_on_smollm2_fails_fast(command, row, args, code, pattern, world, hub_down, task_index_ready):
    from moeify.data.assets import pull_default_model

    w = {**world, "smol": str(pull_default_model())}
    r, elapsed, before, logs = _run_row(args, w)
    _assert_one_line_failure(r, code, pattern, w, before, logs)
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
