"""`moeify bench`: converted model vs its dense baseline, or one MoE layer vs its MLP."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .app import _environment, _fail, _write_json, app, console, err


def _parse_tokens(text: str) -> list[int]:
    from ..errors import InputError

    try:
        tokens = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--tokens must be comma-separated integers, e.g. 1,16,256,4096; got {text!r}.") from None
    if not tokens or any(t < 1 for t in tokens):
        raise InputError(f"--tokens must be positive integers, e.g. 1,16,256,4096; got {text!r}.")
    return tokens


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="Converted checkpoint (directory) to benchmark; not with --layer."),
    baseline: Optional[str] = typer.Option(None, help="Dense baseline; default: the base model recorded in the checkpoint."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 (both models)."),
    workloads: str = typer.Option("decode,prefill-1x2048,prefill-8x512", help="Comma-separated: decode, prefill-1x2048, prefill-8x512."),
    repeats: int = typer.Option(5, help="Interleaved repetitions per workload (medians are reported)."),
    warmup: int = typer.Option(1, help="Untimed runs per model and workload first."),
    new_tokens: int = typer.Option(128, help="Decode: new tokens per generation (greedy, batch 1)."),
    threads: Optional[int] = typer.Option(None, help="torch threads for both models (default: torch's)."),
    kernel: str = typer.Option("auto", help="MoE execution: auto | torch | triton | reference."),
    attainable: bool = typer.Option(True, "--attainable/--no-attainable",
                                    help="Decode: also time the dense model with its MLPs skipped, for the attainable (Amdahl) limit."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Also measure each model's peak memory (in a child process on CPU)."),
    text: str = typer.Option("austen", help="Input tokens: austen (held-out text, protocol.md) | random (seeded ids)."),
    layer: bool = typer.Option(False, "--layer", help="Benchmark one MLP vs MoE layer with random weights instead of a model."),
    conversion: Optional[str] = typer.Option(None, "--conversion", help="Time this calibrated method's conversion of MODEL (a dense model; "
                                             "default SmolLM2) against the calibration forward alone (the prune run at the same active fraction)."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", help="--conversion: a method setting as key=value (repeatable), e.g. --opt layout=S3A3E8."),
    calib: str = typer.Option("austen", help="--conversion: calibration text source (as for `moeify convert --calib`)."),
    refit: bool = typer.Option(False, "--refit", help="--conversion: the method's conversion with --refit (the prune baseline never refits)."),
    samples: int = typer.Option(8, help="--conversion: calibration windows."),
    seq_len: int = typer.Option(2048, help="--conversion: calibration window length in tokens."),
    hidden: Optional[int] = typer.Option(None, help="--layer: hidden size."),
    intermediate: Optional[int] = typer.Option(None, help="--layer: MLP intermediate size."),
    layout: str = typer.Option("S3A3E8", help="--layer: SxAyEz layout of the MoE."),
    tokens: str = typer.Option("1,16,256,4096", help="--layer: comma-separated token counts."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    router_neurons: int = typer.Option(8, help="--layer: router neurons per expert (CMoE's analytical router)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="--layer on CUDA: replay both layers from CUDA graphs (no launch overhead)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write machine-readable results here."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
) -> None:
    """Speed, protocol.md: dense vs converted in one process, interleaved; medians, spread, speedups and physical limits."""
    from ..errors import InputError, MoeifyError

    try:
        if json_out is not None and json_out.exists() and not overwrite:
            raise InputError(f"{json_out} exists; pass --overwrite to replace it or choose another --json path.")
        if repeats < 1 or warmup < 0:
            raise InputError("--repeats must be >= 1 and --warmup >= 0.")
        from .. import kernels

        if kernel not in kernels.BACKENDS:
            raise InputError(f"unknown --kernel {kernel!r}; use one of {', '.join(kernels.BACKENDS)}.")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise InputError(f"unknown --device {device!r}; use cpu or cuda.")
        import os

        if kernel == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError("--kernel triton runs on a CUDA GPU (--device cuda); on a CPU only under TRITON_INTERPRET=1, for testing.")
        import torch

        if threads is not None:
            if threads < 1:
                raise InputError(f"--threads must be >= 1, got {threads}.")
            torch.set_num_threads(threads)
        if conversion is not None:
            if layer:
                raise InputError("--conversion and --layer are two different benchmarks; give one.")
            result = _bench_conversion(model, conversion, opt, calib, samples, seq_len, dtype, repeats, refit, device)
        elif layer:
            result = _bench_layer(model, hidden, intermediate, layout, _parse_tokens(tokens), dtype, device, repeats, kernel, router_neurons, cuda_graphs)
        else:
            result = _bench_model(model, baseline, dtype, [w for w in workloads.split(",") if w], repeats, warmup, new_tokens, kernel, device, memory, text, attainable)
        result["environment"] = {**_environment(), "device_name": _device_name(device)}
        if not layer:  # what the dense baseline's weights are (the default model is the dequantised 4-bit GGUF)
            from ..data.assets import model_provenance

            result["model_provenance"] = model_provenance(result.get("baseline") if conversion is None else model)
        if kernel in ("auto", "triton"):
            result["environment"]["triton"] = _triton_version()
    except MoeifyError as e:
        _fail(e)
    if conversion is not None:
        _print_conversion(result)
    elif layer:
        _print_layer(result)
    else:
        _print_model(result)
    _write_json(json_out, result)


def _device_name(device: str) -> str:
    from ..bench import device_name

    return device_name(device)


def _triton_version() -> str | None:
    from ..kernels import triton_available

    if not triton_available():
        return None
    import triton

    return triton.__version__


def _bench_layer(model, hidden, intermediate, layout, tokens, dtype, device, repeats, kernel, router_neurons, cuda_graphs) -> dict[str, Any]:
    from ..errors import InputError
    from ..bench import compare_layer
    from ..models.checkpoint import parse_dtype
    from ..core.layout import parse_layout

    if model is not None:
        raise InputError("--layer benchmarks random weights of the given shape; drop the MODEL argument (or drop --layer).")
    if hidden is None or intermediate is None:
        raise InputError("--layer needs --hidden and --intermediate, e.g. --hidden 4096 --intermediate 14336.")
    parse_layout(layout)
    parse_dtype(dtype)
    return {"kind": "layer", **compare_layer(hidden, intermediate, layout, tokens, dtype=dtype, device=device, repeats=repeats, kernel=kernel,
                                             router_neurons=router_neurons, cuda_graphs=cuda_graphs, progress=lambda m: err.print(m))}


def _bench_conversion(model, method, opt, calib, samples, seq_len, dtype, repeats, refit=False, device="cpu") -> dict[str, Any]:
    from ..bench.conversion import compare_conversions, forward_baseline
    from ..core.method import method_class
    from ..data.calibration import Calibration
    from ..errors import InputError
    from ..models.checkpoint import parse_dtype
    from ..pipeline.convert import check_request
    from ..pipeline.streaming import resolve_device
    from .commands import checked_model
    from .options import parse_method_args

    cls = method_class(method)
    cfg = cls(**parse_method_args(cls, [], opt))
    forward_baseline(cfg)
    check_request(cfg, refit)
    parse_dtype(dtype)
    resolve_device(device)
    calibration = Calibration(source=calib, samples=samples, seq_len=seq_len)
    path, mcfg, tok = checked_model(model, cfg, calibration)
    if getattr(mcfg, "moeify", None) is not None:
        raise InputError(f"{model} is already a moeify checkpoint; --conversion times the conversion of a dense model.")
    res = compare_conversions(path, cfg, calibration, repeats=repeats, dtype=dtype, tokenizer=tok, refit=refit, device=device,
                              progress=lambda m: err.print(m))
    return {"kind": "conversion", "model": model, "dtype": dtype, "device": device, **res}


def _print_conversion(r: dict[str, Any]) -> None:
    t = Table(title=f"{r['method']}{' --refit' if r['refit'] else ''} conversion of {r['model'] or 'the default model'} vs {r['baseline_method']} "
                    f"(calibration {r['calibration']['samples']} x {r['calibration']['seq_len']}, median (min–max) of {r['repeats']} interleaved runs)")
    for c in ("run", "seconds", "calibration forward", "forward share"):
        t.add_column(c, justify="right")
    for name in ("baseline", "method"):
        st = r["stage_seconds"][name]
        t.add_row(name, _fmt_stat(r["seconds"][name]), f"{st.get('forward', 0.0):.1f}", f"{r['forward_share'][name]:.2f}")
    console.print(t)
    console.print(f"conversion / forward alone: {r['ratio']:.3f}× (per pair {_fmt_stat(r['ratio_pairs'], 3)}); "
                  f"share of the attainable limit reached: {r['of_limit']:.2f}")
    for name, st in r.get("plan_stages", {}).items():
        console.print(f"{name} plan stages (s, all layers): " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))


def _bench_model(model, baseline, dtype, workloads, repeats, warmup, new_tokens, kernel, device, memory, text, attainable=True) -> dict[str, Any]:
    import torch

    from .. import kernels
    from ..errors import InputError
    from ..bench import check_workloads, compare_models, peak_memory_child, weight_bytes
    from ..models.checkpoint import load_config, load_model, parse_dtype, resolve_model_path

    if model is None:
        raise InputError("give the converted checkpoint to benchmark (moeify bench out/my-moe), or --layer for a single layer.")
    check_workloads(workloads)
    parse_dtype(dtype)
    if text not in ("austen", "random"):
        raise InputError(f"--text must be austen or random, got {text!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda but torch sees no CUDA GPU; use --device cpu.")
    path = resolve_model_path(model)
    cfg = load_config(path)
    base_name = baseline
    if base_name is None:
        mo = getattr(cfg, "moeify", None)
        if mo is None:
            raise InputError(f"{model} is not a moeify checkpoint: pass --baseline MODEL.")
        base_name = (mo.get("provenance") or {}).get("base_model")
        if not base_name:
            raise InputError(f"{model} does not record its base model: pass --baseline MODEL.")
    base_path = resolve_model_path(base_name)
    load_config(base_path)
    m, tok = load_model(path, dtype=dtype)
    b = load_model(base_path, dtype=dtype, with_tokenizer=False)[0]
    m.to(device)
    b.to(device)
    kernels.use(m, kernel)
    res = compare_models(m, b, tok, workloads=workloads, repeats=repeats, warmup=warmup, new_tokens=new_tokens, text=text, attainable=attainable,
                         progress=lambda s: err.print(s))
    res["settings"]["kernel"] = kernel
    out: dict[str, Any] = {"kind": "model", "model": str(model), "baseline": str(base_name), **res}
    out["memory"] = {"weights_mb": {"baseline": weight_bytes(b) / 2**20, "model": weight_bytes(m) / 2**20}}
    if memory:
        del m, b
        import gc

        gc.collect()
        err.print("peak memory: one fresh process per model ...")
        out["memory"]["peak"] = {
            "baseline": peak_memory_child(base_path, dtype, workloads, new_tokens, "auto", device, text),
            "model": peak_memory_child(path, dtype, workloads, new_tokens, kernel, device, text),
        }
    return out


def _fmt_stat(s: dict[str, Any], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _print_model(r: dict[str, Any]) -> None:
    st = r["settings"]
    t = Table(title=f"{r['model']} vs {r['baseline']} ({st['dtype']}, {st['device']}, {st['threads']} threads, "
                    f"median (min–max) of {st['repeats']} interleaved runs)")
    for c in ("workload", "dense tok/s", "converted tok/s", "speedup", "physical limit", "of limit"):
        t.add_column(c, justify="right")
    for wl, w in r["workloads"].items():
        t.add_row(wl, _fmt_stat(w["baseline"]), _fmt_stat(w["model"]), f"{w['speedup']:.3f}×", f"{w['limit']:.3f}× ({w['limit_kind'].split(' (')[0]})",
                  f"{w['of_limit']:.2f}")
    console.print(t)
    if "decode" in r["workloads"]:
        d = r["workloads"]["decode"]
        console.print(f"greedy decode: converted == dense for the first {d['greedy_tokens_identical_prefix']} of {st['new_tokens']} new tokens")
        a = d.get("attainable")
        if a:
            console.print(f"decode, attainable limit {a['limit']:.3f}× (of it: {a['of_limit']:.2f}): dense {a['dense_ms_per_token']:.1f} ms/token, "
                          f"{a['no_mlp_ms_per_token']:.1f} of it outside the MLPs (measured with the MLPs skipped); "
                          f"the converted MLPs read {a['mlp_fraction']:.1%} of the dense MLP weights")
    mem = r.get("memory") or {}
    if mem:
        wm = mem["weights_mb"]
        line = f"weights: dense {wm['baseline']:.1f} MB, converted {wm['model']:.1f} MB"
        if "peak" in mem:
            p = mem["peak"]
            line += (f"; peak memory loading + running (process RSS over before loading): dense "
                     f"{p['baseline']['peak_mb_over_before_load']:.0f} MB, converted {p['model']['peak_mb_over_before_load']:.0f} MB")
        console.print(line)


def _print_layer(r: dict[str, Any]) -> None:
    sh, st = r["shape"], r["settings"]
    t = Table(title=f"MLP vs MoE layer: hidden {sh['hidden']}, intermediate {sh['intermediate']}, {sh['layout']} "
                    f"({st['dtype']}, {st['device']}, kernel {st['kernel']}, median (min–max) of {st['repeats']})")
    for c in ("tokens", "dense ms", "MoE ms", "speedup", "FLOP limit", "of limit", "bytes limit", "experts touched"):
        t.add_column(c, justify="right")
    for row in r["rows"]:
        t.add_row(str(row["tokens"]), _fmt_stat(row["dense_ms"], 3), _fmt_stat(row["moe_ms"], 3), f"{row['speedup']:.3f}×", f"{row['limit']:.3f}×",
                  f"{row['of_limit']:.2f}", f"{row['bytes_limit']:.3f}×", str(row["experts_touched"] if row["experts_touched"] is not None else "all"))
    console.print(t)
