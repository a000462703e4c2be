"""`moeify pull | convert | eval | methods`."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..data.assets import model_label, model_provenance
from .app import _environment, _write_json, app, check_dtype, check_output_dir, check_output_file, check_positive, console


def _ppl_protocol(source: str, quick: bool, windows: int) -> str:
    if source == "austen":
        return f"austen-v1 {'quick' if quick else 'full'}"
    return f"{source} ({windows} windows of 2048)"


def _ppl_windows(tokenizer, sources: list[str], quick: bool, what: str = "--ppl") -> dict[str, Any]:
    """The perplexity windows of every source, cut before any model is loaded (too little text fails here)."""
    from ..data.texts import perplexity_windows
    from ..errors import InputError

    out = {}
    for src in sources:
        try:
            out[src] = perplexity_windows(tokenizer, source=src, quick=quick)
        except InputError as e:
            raise InputError(f"{what} {src}: {e}") from None
    return out


def _compare_ppl(model, baseline, windows: dict[str, Any], quick: bool, dtype: str) -> dict[str, Any]:
    from ..eval.perplexity import compare_perplexity

    results = {}
    for src, w in windows.items():
        r = compare_perplexity(model, baseline, w)
        r["protocol"] = _ppl_protocol(src, quick, int(r["windows"]))
        r["dtype"] = dtype
        results[src] = r
    return results


def _check_home() -> None:
    """MOEIFY_HOME must be a folder we can write (or create): checked before anything is fetched."""
    from ..data.assets import moeify_home
    from ..errors import InputError

    home = moeify_home()
    if home.exists() and not home.is_dir():
        raise InputError(f"MOEIFY_HOME={home} is a file; point MOEIFY_HOME at a folder (default ~/.cache/moeify).")
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"MOEIFY_HOME={home}: cannot write in {probe}; point MOEIFY_HOME at a writable folder.")


@app.command()
def pull(
    assets: Optional[list[str]] = typer.Argument(None, help="Extra assets to fetch instead of the defaults: qwen2.5-coder-1.5b (1.1 GB GGUF), wordnet (WordNet 3.0 glosses: the general-English text source 'wordnet')."),
    force: bool = typer.Option(False, help="Fetch again even if cached."),
) -> None:
    """Fetch and cache the default model (SmolLM2-135M-Instruct), the Austen corpus and the zero-shot task data,
    or the named extra assets (e.g. `moeify pull qwen2.5-coder-1.5b`)."""
    from ..data.assets import EXTRA_ASSETS, moeify_home, pull_all
    from ..errors import InputError

    unknown = [a for a in assets or [] if a.lower() not in EXTRA_ASSETS]
    if unknown:
        raise InputError(f"unknown asset(s) {unknown}; `moeify pull` fetches the defaults, or one of: {', '.join(EXTRA_ASSETS)}.")
    _check_home()
    if assets:
        where = {a: EXTRA_ASSETS[a.lower()](force=force) for a in assets}
        t = Table(title=f"moeify assets (MOEIFY_HOME={moeify_home()})")
        t.add_column("asset")
        t.add_column("cached at")
        for k, v in where.items():
            t.add_row(k, str(v))
        console.print(t)
        return
    where = pull_all(force=force)
    offline = _index_offline_tasks()
    t = Table(title=f"moeify assets (MOEIFY_HOME={moeify_home()})")
    t.add_column("asset")
    t.add_column("cached at")
    for k, v in where.items():
        t.add_row(k, str(v))
    if offline is not None:
        t.add_row("zero-shot tasks offline", f"{offline} lm-eval tasks (`moeify eval --tasks list`)")
    console.print(t)


def _index_offline_tasks() -> int | None:
    """Index lm-eval's tasks once (when lm-eval is installed) so later commands check task names in milliseconds."""
    from ..errors import InputError

    try:
        from ..eval.zero_shot import offline_tasks

        return len(offline_tasks())
    except InputError:  # lm-eval not installed: zero-shot is optional
        return None
    except Exception as e:  # noqa: BLE001 - the assets are pulled; the index is rebuilt on first use
        from .app import err, one_line

        err.print(f"warning: could not index lm-eval's tasks now ({type(e).__name__}: {one_line(e)[:200]}); `moeify eval --tasks` will retry.",
                  markup=False)
        return None


def _method_and_model(cls, model: Optional[str], extra: list[str], opt: Optional[list[str]]) -> tuple[Optional[str], dict[str, Any]]:
    """(MODEL, the method's settings) from the command line; options and the optional MODEL come mixed."""
    from ..errors import InputError
    from .options import parse_method_args, split_positionals

    positionals, tokens = split_positionals(cls, ([model] if model is not None else []) + list(extra))
    settings = parse_method_args(cls, tokens, opt)
    if len(positionals) > 1:
        raise InputError(f"unexpected argument(s) {' '.join(positionals[1:])}: give one MODEL (or none for the default model); "
                         f"method options start with -- (`moeify methods {cls.method}`).")
    return (positionals[0] if positionals else None), settings


def checked_model(model: Optional[str], cfg, calibration, *, trust_remote_code: bool = False):
    """(path, config, tokenizer) of the model a conversion reads, after what every conversion command checks before
    loading it: the calibration text (--calib), the model's config and the method's fit to it, enough calibration tokens."""
    from ..data.texts import check_text_source
    from ..errors import InputError
    from ..models.checkpoint import check_model_source, load_tokenizer
    from ..pipeline.convert import config_intermediate_sizes

    if calibration is not None:
        check_text_source(calibration.source, "calibration", what="--calib")
    path, mcfg = check_model_source(model, what="MODEL", trust_remote_code=trust_remote_code)
    cfg.check(config_intermediate_sizes(mcfg))
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if calibration is not None:
        try:
            calibration.validate(tok)
        except InputError as e:
            raise InputError(f"--calib {calibration.source}: {e}") from None
    return path, mcfg, tok


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
    refit: bool = typer.Option(False, "--refit", help="Calibrated methods: solve each block's down projections (and compensation) in closed form on the router's selections, ridge chosen on held-out tokens."),
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
    stream: bool = typer.Option(True, "--stream/--in-memory", help="Convert one decoder layer at a time from disk to disk (memory: one layer + activations), or load the whole model first."),
    device: str = typer.Option("cpu", "--device", help="Where layers compute while streaming: cpu | cuda | auto."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Refuse up front when the streaming conversion's estimated memory exceeds this (e.g. 1.5GB)."),
) -> None:
    """Convert a dense model's MLPs into MoE blocks, compare with the dense model, and save.

    By default the conversion streams: each decoder layer is read from the safetensors
    folder or GGUF file, converted and written before the next one is read.
    """
    import torch

    from ..core.method import method_class
    from ..data.texts import check_text_source
    from ..errors import InputError
    from ..models.checkpoint import load_model, save
    from ..pipeline.convert import check_request, convert as run_convert, count_parameters

    # every input is checked before the model is loaded: options, outputs, texts, the model's config, token counts
    cls = method_class(method)
    model, settings = _method_and_model(cls, model, list(ctx.args), opt)
    if "seed" in {f.name for f in dataclasses.fields(cls)}:
        settings.setdefault("seed", seed)  # --seed seeds the method's own randomness too
    cfg = cls(**settings)
    check_request(cfg, refit)
    check_dtype(dtype)
    check_positive(samples, "--samples")
    check_positive(seq_len, "--seq-len", minimum=16)
    calibration = None
    if cfg.needs_calibration:
        from ..data.calibration import Calibration

        calibration = Calibration(source=calib, samples=samples, seq_len=seq_len, seed=seed, sequential=not dense_feed)
    check_output_dir(output, "--output", overwrite=overwrite)
    check_output_file(json_out, "--json")
    if evaluate:
        check_text_source(ppl, "heldout", what="--ppl")
    path, mcfg, tok = checked_model(model, cfg, calibration, trust_remote_code=trust_remote_code)
    windows = _ppl_windows(tok, [ppl], quick) if evaluate else {}
    if stream and not Path(path).exists():
        stream = False  # a hub id: transformers downloads and loads it (a local folder or .gguf streams)
    if not stream and (device != "cpu" or max_memory is not None):
        raise InputError("--device and --max-memory apply to streaming conversion; drop --in-memory (the model must be a local folder or .gguf).")
    if stream:
        from ..pipeline.streaming import parse_memory, resolve_device

        resolve_device(device)
        parse_memory(max_memory)
        _convert_streaming(path, model, cfg, output, overwrite=overwrite, calibration=calibration, tok=tok, refit=refit, dtype=dtype,
                           device=device, max_memory=max_memory, windows=windows, quick=quick, trust_remote_code=trust_remote_code,
                           json_out=json_out, seed=seed)
        return

    torch.manual_seed(seed)
    t_load = time.perf_counter()
    dense, _ = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, with_tokenizer=False)
    load_s = time.perf_counter() - t_load
    baseline = copy.deepcopy(dense) if evaluate else None
    dense_params = count_parameters(dense)
    converted = run_convert(dense, cfg, calibration=calibration, tokenizer=tok, refit=refit)
    result = _convert_result(cfg, model, refit, converted.config.moeify["summary"],
                             {"dense": dense_params, "converted": count_parameters(converted)}, load_seconds=load_s)
    if evaluate:
        ppl_res = _compare_ppl(converted, baseline, windows, quick, dtype)
        converted.config.moeify["metrics"] = {"ppl": ppl_res}
        result["ppl"] = ppl_res
        del baseline
    out = save(converted, output, tokenizer=tok, overwrite=overwrite)
    result["output"] = str(out)
    result["environment"] = _environment()
    _print_convert(result)
    _write_json(json_out, result)


def _convert_streaming(path, model, cfg, output, *, overwrite, calibration, tok, refit, dtype, device, max_memory, windows, quick,
                       trust_remote_code, json_out, seed) -> None:
    """`moeify convert` through the streaming pipeline; with --eval, dense vs converted perplexity on the staged checkpoint."""
    import torch

    from ..core.process import peak_rss_mib
    from ..models.checkpoint import load_model
    from ..pipeline.convert import count_parameters
    from ..pipeline.streaming import convert_streaming

    scores: dict[str, Any] = {}
    params: dict[str, int] = {}

    def evaluate(tmp: Path, moeify_cfg: dict[str, Any]) -> None:
        converted, _ = load_model(str(tmp), dtype=dtype, with_tokenizer=False)
        params["converted"] = count_parameters(converted)
        if windows:
            dense, _ = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, with_tokenizer=False)
            params["dense"] = count_parameters(dense)
            scores.update(_compare_ppl(converted, dense, windows, quick, dtype))
            moeify_cfg["metrics"] = {"ppl": scores}

    torch.manual_seed(seed)
    out, mo = convert_streaming(path, cfg, output, calibration=calibration, tokenizer=tok, dtype=dtype, device=device,
                                max_memory=max_memory, overwrite=overwrite, refit=refit, trust_remote_code=trust_remote_code,
                                before_rename=evaluate if windows else None)
    st = mo["summary"]["streaming"]
    result = _convert_result(cfg, model, refit, mo["summary"], {"dense": params.get("dense", st["parameters"]["dense"]),
                                                               "converted": params.get("converted", st["parameters"]["converted"])},
                             streaming={k: v for k, v in st.items() if k != "per_layer"}, per_layer_streaming=st["per_layer"],
                             peak_rss_mib=round(peak_rss_mib(), 1))
    if scores:
        result["ppl"] = scores
    result["output"] = str(out)
    result["environment"] = _environment()
    _print_convert(result)
    _write_json(json_out, result)


def _convert_result(cfg, model, refit: bool, summary: dict[str, Any], parameters: dict[str, int], **extra) -> dict[str, Any]:
    """The JSON of `moeify convert` (in memory or streamed)."""
    result: dict[str, Any] = {
        "method": cfg.method,
        "config": cfg.to_dict()["_data"],
        "refit": refit,
        "model": model_label(model),
        "model_provenance": model_provenance(model),
        "active_mlp_fraction": summary["active_mlp_fraction"],
        "mlp_params_removed_fraction": summary["mlp_params_removed_fraction"],
        "seconds": summary["seconds"],
        **extra,
        "parameters": parameters,
        "summary": summary,
    }
    if "router_fidelity" in summary:
        result["router_fidelity"] = {
            "mean": summary["router_fidelity"],
            "per_layer": [lay.get("router_fidelity", {}).get("overlap") for lay in summary.get("per_layer", [])],
            "heldout_tokens": summary.get("calibration", {}).get("heldout_tokens"),
        }
    return result


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
    if "refit" in r["summary"]:
        f = r["summary"]["refit"]
        t.add_row("refit: block error, calibration", "", f"{f['calibration_error_before']:.3f} -> {f['calibration_error_after']:.3f}")
        t.add_row("refit: block error, held-out", "", f"{f['heldout_error_before']:.3f} -> {f['heldout_error_after']:.3f}")
    if "streaming" in r:
        st = r["streaming"]
        t.add_row("conversion time (streamed, incl. reading)", "", f"{r['seconds']:.2f} s")
        t.add_row(f"peak resident memory (conversion, {st['device']})", "", f"{st['peak_rss_mib']:.0f} MiB")
    else:
        t.add_row("conversion time (excl. loading)", "", f"{r['seconds']:.2f} s")
    console.print(t)
    console.print(f"saved to [bold]{r['output']}[/bold]")


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Argument(None, help="Converted directory, hub id, local folder or .gguf."),
    ppl: Optional[list[str]] = typer.Option(None, "--ppl", help="Perplexity text source(s): austen | wikitext2 | c4 | FILE | ... (repeatable)."),
    quick: bool = typer.Option(True, "--quick/--full", help="austen-v1 quick (16 windows) or full."),
    baseline: Optional[str] = typer.Option(None, help="Dense baseline; default: the base model recorded in a converted checkpoint."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Score the model alone."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Zero-shot lm-eval tasks, e.g. arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq; "
                                                               "`--tasks list` shows the tasks available offline."),
    limit: Optional[str] = typer.Option(None, "--limit", help="Zero-shot documents per task: N, or TASK=N,... (others full)."),
    batch_size: str = typer.Option("16", "--batch-size", help="Zero-shot batch size, or 'auto'."),
    task_data: str = typer.Option("auto", "--task-data", help="auto (the offline copy where `moeify pull` caches one, else the hub) | local | hub."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write machine-readable results here."),
) -> None:
    """Perplexity and/or zero-shot accuracy of a model, with its dense baseline scored in the same run on
    the same windows / documents."""
    from ..data.texts import check_text_source
    from ..errors import InputError
    from ..models.checkpoint import check_model_source, load_model, load_tokenizer, recorded_base_model

    if tasks is not None and tasks.strip().lower() == "list":
        if model is not None or ppl:
            raise InputError("--tasks list lists the zero-shot tasks available offline; it takes no MODEL or --ppl.")
        check_output_file(json_out, "--json")
        _list_tasks(json_out)
        return
    # every input is checked before a model is loaded: options, outputs, texts, tasks, models, token counts
    if model is None:
        raise InputError("give the MODEL to evaluate (a converted checkpoint folder, a model folder, a .gguf file or a hub id); "
                         "`moeify eval --tasks list` lists the offline zero-shot tasks.")
    check_dtype(dtype)
    if baseline is not None and no_baseline:
        raise InputError("--baseline and --no-baseline exclude each other; give one.")
    if limit is not None and not tasks:
        raise InputError("--limit sets zero-shot documents per task: use it with --tasks.")
    bs: int | str = batch_size if batch_size == "auto" else int(batch_size) if batch_size.isdigit() and int(batch_size) > 0 else 0
    if not bs:
        raise InputError(f"--batch-size {batch_size!r}: a positive integer or 'auto'.")
    check_output_file(json_out, "--json")
    sources = list(dict.fromkeys(ppl or ([] if tasks else ["austen"])))
    for src in sources:
        check_text_source(src, "heldout", what="--ppl")
    task_list: list[str] = []
    limits: dict[str, int | None] = {}
    if tasks:
        from ..eval.zero_shot import parse_limits, parse_tasks, resolve_tasks

        task_list = parse_tasks(tasks)
        limits = parse_limits(limit, task_list)
        resolve_tasks(task_list, task_data)  # unknown tasks, groups, data that is neither cached nor reachable
    path, mcfg = check_model_source(model, what="MODEL")
    base_name = baseline
    if base_name is None and not no_baseline:
        if getattr(mcfg, "moeify", None) is None:
            raise InputError(f"MODEL {model} is not a moeify checkpoint, so it records no dense baseline: pass --baseline MODEL or --no-baseline.")
        base_name = recorded_base_model(mcfg)
        if not base_name:
            raise InputError(f"MODEL {model} does not record its base model: pass --baseline MODEL or --no-baseline.")
    base_what = "--baseline" if baseline is not None else f"the base model recorded in {model} (--baseline overrides it)"
    base_path = check_model_source(base_name, what=base_what)[0] if base_name else None
    tok = load_tokenizer(path)
    windows = _ppl_windows(tok, sources, quick)

    m, _ = load_model(path, dtype=dtype, with_tokenizer=False)
    base = load_model(base_path, dtype=dtype, with_tokenizer=False)[0] if base_path else None
    # the weights the numbers rest on: the model's own, or for a converted checkpoint its recorded base model's
    recorded = recorded_base_model(mcfg) if getattr(mcfg, "moeify", None) is not None else None
    result: dict[str, Any] = {"model": model, "baseline": base_name, "ppl": {},
                              "baseline_provenance": model_provenance(base_name) if base_name else None,
                              "model_provenance": model_provenance(recorded or model)}
    if base is not None:
        result["ppl"] = _compare_ppl(m, base, windows, quick, dtype)
    else:
        from ..eval.perplexity import perplexity

        for src, w in windows.items():
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


def _list_tasks(json_out: Optional[Path]) -> None:
    """`moeify eval --tasks list`: the lm-eval tasks whose documents `moeify pull` caches, by cached dataset."""
    from collections import defaultdict

    from ..data.assets import zero_shot_dir
    from ..eval.zero_shot import DEV_SUITE, offline_tasks

    off = offline_tasks()
    by_folder: dict[str, list[str]] = defaultdict(list)
    for name, c in off.items():
        by_folder[c.folder].append(name)
    families: dict[str, list[str]] = defaultdict(list)  # e.g. hails/mmlu_no_train -> its 57 subject folders
    for folder in by_folder:
        families[folder.rsplit("/", 1)[0]].append(folder)
    t = Table(title=f"{len(off)} lm-eval tasks run offline here (documents under {zero_shot_dir()}"
                    + ("" if off else "; `moeify pull` caches them") + f"); the dev suite is {', '.join(DEV_SUITE)}; "
                    "any other task needs the hub (--task-data hub)")
    for c in ("cached dataset", "split scored", "tasks", "lm-eval tasks"):
        t.add_column(c)
    for parent, folders in sorted(families.items()):
        if len(folders) >= 5:  # one row for a dataset with many configs (MMLU's subjects)
            configs = sorted(f.rsplit("/", 1)[1] for f in folders)
            templates = sorted({n.replace(f.rsplit("/", 1)[1], "<config>") for f in folders for n in by_folder[f]})
            splits = sorted({off[n].split for f in folders for n in by_folder[f]})
            count = sum(len(by_folder[f]) for f in folders)
            t.add_row(f"{parent}/<config> ({len(configs)} configs: {', '.join(configs[:3])}, ...)", "/".join(splits), str(count), ", ".join(templates))
            continue
        for f in sorted(folders):
            names = sorted(by_folder[f])
            t.add_row(f, "/".join(sorted({off[n].split for n in names})), str(len(names)), ", ".join(names))
    console.print(t)
    if json_out is not None:
        _write_json(json_out, {"zero_shot_dir": str(zero_shot_dir()),
                               "tasks": {n: {"folder": c.folder, "split": c.split} for n, c in sorted(off.items())}})


def _print_zero_shot(result: dict[str, Any], model: str, base_name: str | None) -> None:
    t = Table(title=f"zero-shot ({result['protocol']}, lm-eval {result['lm_eval']}): {model}" + (f" vs {base_name}" if base_name else ""))
    for c in ("task", "limit", "docs", "metric", "dense", "model", "recovery"):
        t.add_column(c, justify="right")

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for task, e in result["tasks"].items():
        label = f"{task} ({e['split']})" if e.get("split") else task
        for metric, r in e["metrics"].items():
            t.add_row(label, str(e["limit"] or "full"), str(e["n"]), metric, pct(r.get("dense")), pct(r["model"]), pct(r.get("recovery")))
    for metric, a in result.get("average", {}).items():
        t.add_row("average", "", f"{a['tasks']} tasks", metric, pct(a.get("dense")), pct(a["model"]), pct(a.get("recovery")))
    console.print(t)


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="A method: list its options with their defaults and help.")) -> None:
    """List the conversion methods, or one method's options (the flags `moeify convert --method NAME` takes)."""
    from ..core.method import METHODS, method_class
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
    cls = method_class(name)
    t = Table(title=f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
    for c in ("option", "type", "default", "help"):
        t.add_column(c)
    for o in method_options(cls):
        t.add_row(o.flag, o.kind.__name__, repr(o.default), o.help)
    console.print(t)


