"""`moeify pull | convert | eval | methods`."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..data.assets import model_label, model_provenance
from .app import _environment, _fail, _write_json, app, console


def _ppl_protocol(source: str, quick: bool, windows: int) -> str:
    if source == "austen":
        return f"austen-v1 {'quick' if quick else 'full'}"
    return f"{source} ({windows} windows of 2048)"


def _compare_ppl(model, baseline, tokenizer, sources: list[str], quick: bool, dtype: str) -> dict[str, Any]:
    from ..eval.perplexity import compare_perplexity
    from ..data.texts import perplexity_windows

    results = {}
    for src in sources:
        windows = perplexity_windows(tokenizer, source=src, quick=quick)
        r = compare_perplexity(model, baseline, windows)
        r["protocol"] = _ppl_protocol(src, quick, int(r["windows"]))
        r["dtype"] = dtype
        results[src] = r
    return results


@app.command()
def pull(force: bool = typer.Option(False, help="Fetch again even if cached.")) -> None:
    """Fetch and cache the default model (SmolLM2-135M-Instruct), the Austen corpus and the zero-shot task data."""
    from ..data.assets import moeify_home, pull_all
    from ..errors import MoeifyError

    try:
        where = pull_all(force=force)
    except MoeifyError as e:
        _fail(e)
    t = Table(title=f"moeify assets (MOEIFY_HOME={moeify_home()})")
    t.add_column("asset")
    t.add_column("cached at")
    for k, v in where.items():
        t.add_row(k, str(v))
    console.print(t)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Method options: every setting of the method's config is an option, e.g. --layout S3A3E8 for cmoe, "
                    "--branches 8 for mlpmoe; `moeify methods NAME` lists them with their defaults.")
def convert(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Hub id, local folder or .gguf file; default: SmolLM2-135M-Instruct."),
    method: str = typer.Option("mlpmoe", "--method", "-m", help="Conversion method (see `moeify methods`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the converted checkpoint to."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", help="Any method setting as key=value (repeatable), e.g. --opt router_neurons=24."),
    dense_feed: bool = typer.Option(False, "--dense-feed", help="Profile each layer on the dense model's hidden states instead of the converted layers' (the paper's setting)."),
    calib: str = typer.Option("austen", help="Calibration text source: austen | wikitext2 | c4 | FILE | DIR | FILE.jsonl[:field] | hf:NAME[:CONFIG]:SPLIT:COLUMN."),
    samples: int = typer.Option(8, help="Calibration windows."),
    seq_len: int = typer.Option(2048, help="Calibration window length in tokens."),
    seed: int = typer.Option(0, help="Seed for window sampling and any randomness."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Score dense vs converted perplexity in the same run."),
    ppl: str = typer.Option("austen", help="Perplexity text source for --eval."),
    quick: bool = typer.Option(True, "--quick/--full", help="austen-v1 quick (16 windows) or full."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own code from the hub (off by default)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write machine-readable results here."),
) -> None:
    """Convert a dense model's MLPs into MoE blocks, compare with the dense model, and save."""
    import torch

    from ..models.checkpoint import save
    from ..pipeline.convert import config_intermediate_sizes, convert as run_convert, count_parameters
    from ..core.method import method_class
    from .options import parse_method_args
    from ..errors import MoeifyError
    from ..models.checkpoint import load_config, load_model, resolve_model_path
    from ..core.files import prepare_output

    try:
        prepare_output(output, overwrite)
        cls = method_class(method)
        settings = parse_method_args(cls, list(ctx.args), opt)
        if "seed" in {f.name for f in dataclasses.fields(cls)}:
            settings.setdefault("seed", seed)  # --seed seeds the method's own randomness too
        cfg = cls(**settings)
        calibration = None
        if cfg.needs_calibration:
            from ..data.calibration import Calibration

            calibration = Calibration(source=calib, samples=samples, seq_len=seq_len, seed=seed, sequential=not dense_feed)
        torch.manual_seed(seed)
        path = resolve_model_path(model)
        mcfg = load_config(path, trust_remote_code=trust_remote_code)
        cfg.check(config_intermediate_sizes(mcfg))
        t_load = time.perf_counter()
        dense, tok = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
        load_s = time.perf_counter() - t_load
        if calibration is not None:
            calibration.validate(tok)
        baseline = copy.deepcopy(dense) if evaluate else None
        dense_params = count_parameters(dense)
        converted = run_convert(dense, cfg, calibration=calibration, tokenizer=tok)
        summary = converted.config.moeify["summary"]
        result: dict[str, Any] = {
            "method": cfg.method,
            "config": cfg.to_dict()["_data"],
            "model": model_label(model),
            "model_provenance": model_provenance(model),
            "active_mlp_fraction": summary["active_mlp_fraction"],
            "mlp_params_removed_fraction": summary["mlp_params_removed_fraction"],
            "seconds": summary["seconds"],
            "load_seconds": load_s,
            "parameters": {"dense": dense_params, "converted": count_parameters(converted)},
            "summary": summary,
        }
        if "router_fidelity" in summary:
            result["router_fidelity"] = {
                "mean": summary["router_fidelity"],
                "per_layer": [lay.get("router_fidelity", {}).get("overlap") for lay in summary.get("per_layer", [])],
                "heldout_tokens": summary.get("calibration", {}).get("heldout_tokens"),
            }
        if evaluate:
            ppl_res = _compare_ppl(converted, baseline, tok, [ppl], quick, dtype)
            converted.config.moeify["metrics"] = {"ppl": ppl_res}
            result["ppl"] = ppl_res
            del baseline
        out = save(converted, output, tokenizer=tok, overwrite=overwrite)
        result["output"] = str(out)
        result["environment"] = _environment()
    except MoeifyError as e:
        _fail(e)
    _print_convert(result)
    _write_json(json_out, result)


def _print_convert(r: dict[str, Any]) -> None:
    t = Table(title=f"{r['model']}: dense vs {r['method']} {r['config']}")
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column(r["method"], justify="right")
    t.add_row("parameters", f"{r['parameters']['dense']:,}", f"{r['parameters']['converted']:,}")
    t.add_row("active MLP fraction", "1.000", f"{r['active_mlp_fraction']:.3f}")
    t.add_row("MLP parameters removed", "0.000", f"{r['mlp_params_removed_fraction']:.3f}")
    for name, p in (r.get("ppl") or {}).items():
        t.add_row(f"perplexity ({p['protocol']}, {p['dtype']})", f"{p['baseline']:.4f}", f"{p['model']:.4f}")
        t.add_row("perplexity ratio (converted / dense)", "1.00000", f"{p['ratio']:.5f}  ({(p['ratio'] - 1) * 100:+.3f} %)")
    for k in ("router_fidelity", "calibration_error"):
        if k in r["summary"]:
            t.add_row(k.replace("_", " "), "", f"{r['summary'][k]:.3f}")
    t.add_row("conversion time (excl. loading)", "", f"{r['seconds']:.2f} s")
    console.print(t)
    console.print(f"saved to [bold]{r['output']}[/bold]")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Converted directory, hub id, local folder or .gguf."),
    ppl: Optional[list[str]] = typer.Option(None, "--ppl", help="Perplexity text source(s): austen | wikitext2 | c4 | FILE | ... (repeatable)."),
    quick: bool = typer.Option(True, "--quick/--full", help="austen-v1 quick (16 windows) or full."),
    baseline: Optional[str] = typer.Option(None, help="Dense baseline; default: the base model recorded in a converted checkpoint."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Score the model alone."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Zero-shot lm-eval tasks, e.g. arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq."),
    limit: Optional[str] = typer.Option(None, "--limit", help="Zero-shot documents per task: N, or TASK=N,... (others full)."),
    batch_size: str = typer.Option("16", "--batch-size", help="Zero-shot batch size, or 'auto'."),
    task_data: str = typer.Option("auto", "--task-data", help="auto (offline copy of the dev suite, lm-eval download for others) | local | hub."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write machine-readable results here."),
) -> None:
    """Perplexity and/or zero-shot accuracy of a model, with its dense baseline scored in the same run on
    the same windows / documents."""
    from ..errors import InputError, MoeifyError
    from ..models.checkpoint import load_model

    try:
        sources = ppl or ([] if tasks else ["austen"])
        task_list: list[str] = []
        if tasks:
            from ..eval.zero_shot import build_tasks, parse_limits, parse_tasks

            task_list = parse_tasks(tasks)
            limits = parse_limits(limit, task_list)
            bs: int | str = batch_size if batch_size == "auto" else int(batch_size) if batch_size.isdigit() and int(batch_size) > 0 else None
            if bs is None:
                raise InputError(f"--batch-size {batch_size!r}: a positive integer or 'auto'")
            build_tasks(task_list, data=task_data)  # unknown tasks / missing data fail before loading models
        m, tok = load_model(model, dtype=dtype)
        base_name = baseline
        if base_name is None and not no_baseline:
            mo = getattr(m.config, "moeify", None)
            if mo is None:
                raise InputError(f"{model} is not a moeify checkpoint: pass --baseline MODEL or --no-baseline.")
            base_name = (mo.get("provenance") or {}).get("base_model")
            if not base_name:
                raise InputError(f"{model} does not record its base model: pass --baseline MODEL.")
        base = load_model(base_name, dtype=dtype, with_tokenizer=False)[0] if base_name else None
        result: dict[str, Any] = {"model": model, "baseline": base_name, "ppl": {},
                                  "baseline_provenance": model_provenance(base_name) if base_name else None}
        if base is not None:
            result["ppl"] = _compare_ppl(m, base, tok, sources, quick, dtype)
        else:
            from ..eval.perplexity import perplexity
            from ..data.texts import perplexity_windows

            for src in sources:
                w = perplexity_windows(tok, source=src, quick=quick)
                r = perplexity(m, w)
                result["ppl"][src] = {"model": r["ppl"], "windows": r["windows"], "tokens": r["tokens"], "protocol": _ppl_protocol(src, quick, r["windows"]), "dtype": dtype}
        if task_list:
            from ..eval.zero_shot import compare_zero_shot

            def _partial(zs: dict[str, Any]) -> None:
                _write_json(json_out, {**result, **zs, "model": model, "baseline": base_name, "dtype": dtype, "environment": _environment()})

            zs = compare_zero_shot(m, base, tok, task_list, limits=limits, batch_size=bs, data=task_data, on_task=_partial)
            result.update(zs)
        result["environment"] = _environment()
        result["dtype"] = dtype
    except MoeifyError as e:
        _fail(e)
    if task_list:
        _print_zero_shot(result, model, base_name)
    if not result["ppl"]:
        _write_json(json_out, result)
        return
    t = Table(title=f"{model}" + (f" vs {base_name}" if base_name else ""))
    for c in ("text", "protocol", "windows", "tokens", "baseline ppl", "model ppl", "ratio"):
        t.add_column(c, justify="right")
    for src, r in result["ppl"].items():
        t.add_row(
            src, r["protocol"], str(r["windows"]), str(r["tokens"]),
            f"{r['baseline']:.4f}" if "baseline" in r else "-", f"{r['model']:.4f}", f"{r['ratio']:.5f}" if "ratio" in r else "-",
        )
    console.print(t)
    _write_json(json_out, result)


def _print_zero_shot(result: dict[str, Any], model: str, base_name: str | None) -> None:
    t = Table(title=f"zero-shot ({result['protocol']}, lm-eval {result['lm_eval']}): {model}" + (f" vs {base_name}" if base_name else ""))
    for c in ("task", "limit", "docs", "metric", "dense", "model", "recovery"):
        t.add_column(c, justify="right")

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for task, e in result["tasks"].items():
        for metric, r in e["metrics"].items():
            t.add_row(task, str(e["limit"] or "full"), str(e["n"]), metric, pct(r.get("dense")), pct(r["model"]), pct(r.get("recovery")))
    for metric, a in result.get("average", {}).items():
        t.add_row("average", "", f"{a['tasks']} tasks", metric, pct(a.get("dense")), pct(a["model"]), pct(a.get("recovery")))
    console.print(t)


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="A method: list its options with their defaults and help.")) -> None:
    """List the conversion methods, or one method's options (the flags `moeify convert --method NAME` takes)."""
    from ..core.method import METHODS, method_class
    from ..errors import MoeifyError
    from .options import method_options

    if name is None:
        t = Table(title="moeify methods (`moeify methods NAME` for one method's options)")
        t.add_column("method")
        t.add_column("calibration")
        t.add_column("options (defaults)")
        for n, cls in sorted(METHODS.items()):
            t.add_row(n, "yes" if cls.needs_calibration else "no", ", ".join(f"{o.flag}={o.default!r}" for o in method_options(cls)))
        console.print(t)
        return
    try:
        cls = method_class(name)
    except MoeifyError as e:
        _fail(e)
    t = Table(title=f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
    for c in ("option", "type", "default", "help"):
        t.add_column(c)
    for o in method_options(cls):
        t.add_row(o.flag, o.kind.__name__, repr(o.default), o.help)
    console.print(t)


