"""`moeify analyze` and `moeify report`: per-layer MoE analysis of a converted checkpoint, and one HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .app import _environment, _write_json, app, check_output_dir, check_output_file, check_positive, console


def _ints(text: Optional[str], what: str) -> list[int] | None:
    from ..errors import InputError

    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, e.g. 0,15,29; got {text!r}.") from None


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
    from ..core.files import prepare_output

    # every input is checked before the checkpoint's weights are loaded and before anything is written
    for value, what, least in ((heldout_tokens, "--heldout-tokens", 1), (calib_tokens, "--calib-tokens", 1), (seq_len, "--seq-len", 16),
                               (distill_steps, "--distill-steps", 1)):
        check_positive(value, what, minimum=least)
    settings = AnalysisSettings(heldout=heldout, heldout_tokens=heldout_tokens, calib=calib, calib_tokens=calib_tokens, seq_len=seq_len,
                                seed=seed, layers=_ints(layers, "--layers"), ranks=tuple(_ints(ranks, "--ranks") or ()),
                                gaussian=gaussian, stability=stability, distill=distill, distill_layer=distill_layer,
                                distill_steps=distill_steps)
    if out is not None:
        check_output_dir(out, "--out", overwrite=overwrite)
    if json_out is None and out is not None:
        json_out = out / "analysis.json"
    else:
        check_output_file(json_out, "--json", overwrite=overwrite)
    path, calib_source = _check_checkpoint(checkpoint, settings)
    _check_texts(path, settings, calib_source)
    if out is not None:
        prepare_output(out, overwrite)
    result = run(checkpoint, settings)
    result["environment"] = _environment()
    if out is not None:
        from ..analysis.plots import analysis_figures

        result["figures"] = analysis_figures(result, out)
    _print_analysis(result)
    _write_json(json_out, result)
    if out is not None:
        console.print(f"figures in [bold]{out}[/bold]: {', '.join(result['figures'])}")


def _check_checkpoint(checkpoint: str, settings) -> tuple[str, str]:
    """(path, calibration source) of a moeify checkpoint, from its config alone; --layers checked against its converted layers."""
    from ..errors import InputError
    from ..models.checkpoint import check_model_source

    cfg_file = Path(checkpoint) / "config.json"
    try:
        raw = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise InputError(f"CHECKPOINT {checkpoint}: cannot read {cfg_file} ({e}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("moeify"), dict):
        raise InputError(f"CHECKPOINT {checkpoint} is not a moeify checkpoint (no config.json with a 'moeify' block); convert a model with `moeify convert` first.")
    path, cfg = check_model_source(checkpoint, what="CHECKPOINT")
    mo = getattr(cfg, "moeify", None) or raw["moeify"]
    converted = [i for i, plan in enumerate(mo.get("layers") or []) if plan is not None]
    for what, wanted in (("--layers", settings.layers or []), ("--distill-layer", [settings.distill_layer] if settings.distill and settings.distill_layer is not None else [])):
        bad = [i for i in wanted if i not in converted]
        if converted and bad:
            raise InputError(f"{what} {','.join(map(str, bad))}: not converted MoE layers of {checkpoint}; choose among {_ranges(converted)}.")
    recorded = ((mo.get("summary") or {}).get("calibration") or {}).get("source")
    source = settings.calib or recorded or "austen"
    return path, ("austen" if source == "<windows>" else source)


def _ranges(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2 else ",".join(map(str, ids))


def _check_texts(path: str, settings, calib_source: str) -> None:
    """The held-out and calibration texts exist and are long enough, with the checkpoint's tokenizer (not its weights)."""
    import math

    from ..data.texts import check_text_source
    from ..errors import InputError
    from ..models.checkpoint import load_tokenizer

    needs_calib = settings.stability or bool(settings.ranks) or settings.distill
    calib_what = "--calib" if settings.calib else "calibration source recorded in the checkpoint (--calib to change it)"
    check_text_source(settings.heldout, "heldout", what="--heldout")
    if needs_calib:
        check_text_source(calib_source, "calibration", what=calib_what)
    tok = load_tokenizer(path, what="CHECKPOINT")
    L = min(settings.seq_len, settings.heldout_tokens)
    check_text_source(settings.heldout, "heldout", tokenizer=tok, min_tokens=L, what="--heldout")
    if needs_calib:
        Lc = min(settings.seq_len, settings.calib_tokens)
        n = math.ceil(settings.calib_tokens / Lc)
        have = check_text_source(calib_source, "calibration", tokenizer=tok, what=calib_what)
        if have < 2 * n * Lc:
            raise InputError(f"{calib_what} {calib_source}: {have} tokens, too few for two disjoint subsets of {n} x {Lc} tokens "
                             f"(at least {2 * n * Lc}); lower --calib-tokens or give more text.")


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
    from ..report import build_report, load_inputs

    check_output_file(output, "--output", overwrite=overwrite)
    inputs = load_inputs(checkpoint, list(evals or []), analysis)
    res = build_report(inputs, output, overwrite=overwrite)
    console.print(f"report written to [bold]{res['html']}[/bold]: {len(res['tables'])} tables ({', '.join(res['tables'])}), "
                  f"{len(res['figures'])} figures beside it")
