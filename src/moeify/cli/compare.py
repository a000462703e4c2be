"""`moeify compare`: every method at every active fraction, same calibration and evaluation windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import EXIT_INTERNAL, _environment, _write_json, app, check_dtype, check_output_dir, check_output_file, check_positive, console, err


@app.command()
def compare(
    model: Optional[str] = typer.Argument(None, help="Hub id, local folder or .gguf file; default: SmolLM2-135M-Instruct."),
    methods: str = typer.Option("cmoe,expertweaver,moefication,llama-moe-random,prune,mlpmoe", help="Comma list of: cmoe, expertweaver, moefication, llama-moe-random, llama-moe-cluster, prune, mlpmoe."),
    active: str = typer.Option("0.75,0.5,0.25", help="Active MLP fractions to compare (each method maps them to its own configuration)."),
    out: Path = typer.Option(Path("out/compare"), "--out", help="Directory for per-run results (reused on re-run), compare.json/.md/.png."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the aggregate JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file outside --out."),
    quick: bool = typer.Option(True, "--quick/--full", help="austen-v1 quick (16 windows) or full."),
    eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help="Score only the first N evaluation windows (smoke tests)."),
    ppl: str = typer.Option("austen", help="Perplexity text source."),
    calib: str = typer.Option("austen", help="Calibration text source (see `moeify convert --help`)."),
    samples: int = typer.Option(8, help="Calibration windows."),
    seq_len: int = typer.Option(2048, help="Calibration window length in tokens."),
    seed: int = typer.Option(0, help="Seed for window sampling and any randomness."),
    method_opts: Optional[str] = typer.Option(None, "--method-opts", help='Extra options per method as JSON, e.g. \'{"cmoe": {"router_neurons": 24}}\'.'),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
) -> None:
    """Convert with each method at each active fraction and compare perplexity with the dense model (resumable).

    Exits 1 (after writing every finished run and the reports) when a run failed, naming the failed runs."""
    import torch

    from ..compare import compare as run_compare, method_entry, parse_fractions, parse_methods
    from ..data.calibration import Calibration
    from ..data.texts import check_text_source
    from ..errors import InputError

    # options and outputs first (nothing is written until every input has been checked)
    names = parse_methods(methods)
    parse_fractions(active)
    check_dtype(dtype)
    check_positive(eval_windows, "--eval-windows")
    check_positive(samples, "--samples")
    check_positive(seq_len, "--seq-len", minimum=16)
    try:
        opts = json.loads(method_opts) if method_opts else None
    except json.JSONDecodeError as e:
        raise InputError(f"--method-opts is not valid JSON ({e.msg}); write e.g. '{{\"cmoe\": {{\"router_neurons\": 24}}}}'.") from e
    if opts is not None and not (isinstance(opts, dict) and all(isinstance(v, dict) for v in opts.values())):
        raise InputError('--method-opts must map method names to option objects, e.g. \'{"cmoe": {"router_neurons": 24}}\'.')
    cal = Calibration(source=calib, samples=samples, seq_len=seq_len, seed=seed)
    check_output_dir(out, "--out", overwrite=True)  # an existing --out is reused (resume)
    inside = json_out is not None and out.resolve() in json_out.resolve().parents
    check_output_file(json_out, "--json", overwrite=True if inside else overwrite)
    if any(method_entry(n)[0].needs_calibration for n in names):
        check_text_source(calib, "calibration", what="--calib")
    check_text_source(ppl, "heldout", what="--ppl")
    torch.manual_seed(seed)

    def show(r: dict[str, Any]) -> None:
        if "error" in r:
            err.print(f"[red]{r['method']:>18} @ {r['active_target']:<5g} failed: {escape(r['error'])}[/red]")
            return
        how = "reused" if r.get("reused") else f"convert {r['convert_seconds']:.0f} s"
        err.print(f"{r['method']:>18} @ {r['active_target']:<5g} ppl {r['ppl']:10.3f}  ratio {r['ratio']:9.3f}  ({how})")

    result = run_compare(model, methods, active, out_dir=out, calibration=cal, ppl_source=ppl, quick=quick,
                         eval_windows=eval_windows, dtype=dtype, method_opts=opts, on_result=show)
    result["environment"] = _environment()
    t = Table(title=f"{result['model']}: perplexity ratio to dense ({result['protocol']}, {result['dtype']}, dense ppl {result['dense_ppl']:.3f})")
    t.add_column("method")
    for f in result["active"]:
        t.add_column(f"{f:.0%} active", justify="right")
    for n in result["methods"]:
        cells = []
        for f in result["active"]:
            r = next((x for x in result["runs"] if x["method"] == n and x["active_target"] == f), None)
            cells.append("-" if r is None else "failed" if "error" in r else f"{r['ratio']:.3f}")
        t.add_row(n, *cells)
    console.print(t)
    for k, v in result["files"].items():
        console.print(f"{k}: [bold]{escape(str(v))}[/bold]")
    _write_json(Path(result["files"]["json"]), result)
    _write_json(json_out, result)
    failed = [r for r in result["runs"] if "error" in r]
    if failed:
        trace = _failed_traces(failed)
        err.print(f"[bold red]error:[/bold red] {len(failed)} of {len(result['runs'])} runs failed: "
                  + escape("; ".join(f"{r['method']} @ {r['active_target']:g} ({r['error'][:200]})" for r in failed))
                  + (escape(f"; traces in {trace}") if trace else "") + " (finished runs are saved; a re-run retries only the failed ones)")
        raise typer.Exit(EXIT_INTERNAL)


def _failed_traces(failed: list[dict[str, Any]]) -> Path | None:
    """The failed runs' tracebacks in one file (MOEIFY_HOME/logs); its path."""
    import datetime
    import os

    from ..data.assets import moeify_home

    text = "\n\n".join(f"{r['method']} @ {r['active_target']:g}: {r['error']}\n{r.get('traceback', '')}" for r in failed)
    path = moeify_home() / "logs" / f"moeify-compare-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError:
        return None
    return path
