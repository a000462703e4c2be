"""`moeify analyze` and `moeify report`: per-layer MoE analysis of a converted checkpoint, and one HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .app import _environment, _fail, _write_json, app, console


def _ints(text: Optional[str], what: str) -> list[int] | None:
    from ..errors import InputError

    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, e.g. 0,15,29; got {text!r}.") from None


def _refuse_existing(path: Optional[Path], overwrite: bool) -> None:
    from ..errors import InputError

    if path is not None and path.exists() and not overwrite:
        raise InputError(f"output {path} already exists; choose another path or pass --overwrite to replace it.")


@app.command()
def analyze(
    checkpoint: str = typer.Argument(..., help="A moeify-converted checkpoint folder."),
    calib: Optional[str] = typer.Option(None, help="Calibration text source for the two disjoint subsets (default: the checkpoint's own)."),
    heldout: str = typer.Option("austen", help="Text source whose held-out split gives the evaluation tokens."),
    heldout_tokens: int = typer.Option(4096, help="Held-out tokens (from the start of the held-out text)."),
    calib_tokens: int = typer.Option(4096, help="Tokens in each of the two disjoint calibration subsets."),
    seq_len: int = typer.Option(2048, help="Window length in tokens."),
    seed: int = typer.Option(0, help="Seed for the calibration subsets and the Gaussian samples."),
    layers: Optional[str] = typer.Option(None, help="Only these layers, e.g. 0,15,29 (default: every converted layer)."),
    ranks: str = typer.Option("16,64", help="Low-rank router ranks to re-fit and compare ('' for none; CMoE only)."),
    gaussian: bool = typer.Option(True, "--gaussian/--no-gaussian", help="The real-vs-Gaussian 'secret MoE' comparison."),
    stability: bool = typer.Option(True, "--stability/--no-stability", help="Re-plan each layer from two calibration subsets."),
    distill: bool = typer.Option(False, "--distill", help="Also distil a small MoE student and a dense student of one layer (minutes on CPU)."),
    distill_layer: Optional[int] = typer.Option(None, help="Layer for --distill (default: the middle converted layer)."),
    distill_steps: int = typer.Option(600, help="Optimiser steps per student for --distill."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the analysis JSON here (default with --out: OUT/analysis.json)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the analysis JSON and its figures (PNG)."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs."),
) -> None:
    """Per-layer analysis of a converted checkpoint: activation rates, expert load, router fidelity,
    partition stability, the real-vs-Gaussian 'secret MoE' test and low-rank routers."""
    from ..analysis import AnalysisSettings, analyze as run
    from ..errors import InputError, MoeifyError
    from ..core.files import prepare_output

    try:
        if not (Path(checkpoint) / "config.json").is_file() or "moeify" not in json.loads((Path(checkpoint) / "config.json").read_text()):
            raise InputError(f"{checkpoint} is not a moeify checkpoint (no config.json with a 'moeify' block); convert a model with `moeify convert` first.")
        if out is not None:
            prepare_output(out, overwrite)
        if json_out is None and out is not None:
            json_out = out / "analysis.json"
        else:
            _refuse_existing(json_out, overwrite)
        settings = AnalysisSettings(heldout=heldout, heldout_tokens=heldout_tokens, calib=calib, calib_tokens=calib_tokens, seq_len=seq_len,
                                    seed=seed, layers=_ints(layers, "--layers"), ranks=tuple(_ints(ranks, "--ranks") or ()),
                                    gaussian=gaussian, stability=stability, distill=distill, distill_layer=distill_layer,
                                    distill_steps=distill_steps)
        result = run(checkpoint, settings)
        result["environment"] = _environment()
        if out is not None:
            from ..analysis.plots import analysis_figures

            result["figures"] = analysis_figures(result, out)
    except MoeifyError as e:
        _fail(e)
    _print_analysis(result)
    _write_json(json_out, result)
    if out is not None:
        console.print(f"figures in [bold]{out}[/bold]: {', '.join(result['figures'])}")


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _print_analysis(r: dict[str, Any]) -> None:
    t = Table(title=f"{r['checkpoint']}: {r['method']} analysis ({r['settings']['tokens']['heldout']} held-out tokens)")
    for c in ("layer", "overlap", "err router", "err oracle", "dead", "load H", "Jaccard", "ARI", "FVU@k real", "FVU@k gauss", "gauss refit"):
        t.add_column(c, justify="right")
    for lay in r["layers"]:
        fid, st, sm = lay.get("fidelity", {}), lay.get("stability", {}).get("a_vs_b", {}), lay["secret_moe"]
        k = sm["block_k"]
        t.add_row(str(lay["layer"]), _f(fid.get("overlap")), _f(fid.get("rel_error_router")), _f(fid.get("rel_error_oracle")),
                  str(len(lay.get("load", {}).get("dead", []))), _f(lay.get("load", {}).get("entropy_normalized")),
                  _f(st.get("shared_jaccard")), _f(st.get("routed_ari")), _f(sm["real"]["oracle"][k]),
                  _f(sm.get("gaussian", {}).get("oracle", [None] * (k + 1))[k]), _f(sm.get("gaussian_refit", {}).get("oracle", [None] * (k + 1))[k]))
    console.print(t)
    s = r["summary"].get("secret_moe")
    if s:
        console.print(f"secret-MoE test (oracle k-of-N FVU at the block's k, real < matched Gaussian): holds in {s['holds_layers']} of "
                      f"{s['layers']} layers with the checkpoint's partition, {s['holds_refit_layers']} of {s['layers']} against a "
                      f"partition re-fitted on Gaussian inputs; mean FVU real {s['fvu_real']:.3f}, Gaussian {s['fvu_gaussian']:.3f}, "
                      f"Gaussian re-fitted {_f(s['fvu_gaussian_refit'])}")
    for rank, v in (r["summary"].get("lowrank") or {}).items():
        console.print(f"router rank {rank}: overlap {_f(v['overlap'])}, MLP error {_f(v['rel_error_router'])}, FVU {_f(v['fvu'])} (mean over layers)")
    if "distill" in r:
        d = r["distill"]
        console.print("distillation (layer %d, %d active neurons): " % (d["layer"], d["active_neurons"]) + ", ".join(
            f"{data}/{name} FVU {v:.3f}" for data, row in d["fvu"].items() for name, v in row.items()))


@app.command()
def report(
    checkpoint: Path = typer.Argument(..., help="A moeify-converted checkpoint folder."),
    evals: Optional[list[Path]] = typer.Option(None, "--eval", help="`moeify eval --json` / `moeify convert --json` files (repeatable)."),
    analysis: Optional[Path] = typer.Option(None, "--analysis", help="A `moeify analyze --json` file."),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="The HTML page to write; its PNG figures go beside it."),
    overwrite: bool = typer.Option(False, help="Replace an existing page."),
) -> None:
    """One self-contained HTML page: conversion settings, perplexity and zero-shot tables, analysis figures."""
    from ..errors import MoeifyError
    from ..report import build_report, load_inputs

    try:
        if output.exists() and not overwrite:
            from ..errors import InputError

            raise InputError(f"output {output} already exists; choose another path or pass --overwrite to replace it.")
        inputs = load_inputs(checkpoint, list(evals or []), analysis)
        res = build_report(inputs, output, overwrite=overwrite)
    except MoeifyError as e:
        _fail(e)
    console.print(f"report written to [bold]{res['html']}[/bold]: {len(res['tables'])} tables ({', '.join(res['tables'])}), "
                  f"{len(res['figures'])} figures beside it")
