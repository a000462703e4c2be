"""Every conversion method at every active fraction, on the same tokens: `moeify compare`.

For one model: each (method, active fraction) is converted from a fresh copy of the
dense model with the same calibration windows and scored on the same perplexity
windows as the dense model, whose perplexity is computed in the same run. Results go
to DIR/runs/ one JSON file per run as soon as it exists, named by a hash of
everything that determines it (model, dtype, the calibration and evaluation token
windows, method and full config), so a re-run reuses finished work and a method
added later is the only one computed. The aggregate is DIR/compare.json,
DIR/compare.md (tables) and DIR/compare.png (perplexity ratio vs active MLP fraction,
log y axis), plus any figures the methods add.

Which configuration runs at an active fraction is each method's own `for_fraction`
(an unreachable fraction is an error that names the nearest reachable one); the
table labels are its `describe()`; a method may add per-run details, markdown lines
and figures (`compare_details`, `compare_markdown`, `compare_figures`, e.g.
ExpertWeaver's shared share across depth). Names are method names, or a method's
`variants` (llama-moe-random and llama-moe-cluster).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .core.files import atomic_write, write_json
from .data.assets import model_label, model_provenance
from .core.method import METHODS, MethodConfig
from .errors import InputError

log = logging.getLogger("moeify")

DEFAULT_METHODS = ("cmoe", "expertweaver", "moefication", "llama-moe-random", "prune", "mlpmoe")
DEFAULT_ACTIVE = (0.75, 0.5, 0.25)
FORMAT = 1


def method_entry(name: str) -> tuple[type[MethodConfig], dict[str, Any]]:
    """(method class, fixed options) for a compare name: a method's name, or one of its `variants`."""
    for cls in METHODS.values():
        if name == cls.method and not cls.variants:
            return cls, {}
        if name in cls.variants:
            return cls, dict(cls.variants[name])
    raise InputError(f"unknown method {name!r} for compare; available: {', '.join(compare_names())}.")


def compare_names() -> list[str]:
    """Every name compare accepts: methods without variants, and each variant of the others."""
    names = []
    for cls in METHODS.values():
        names += list(cls.variants) if cls.variants else [cls.method]
    return names


def method_config(name: str, fraction: float, opts: dict[str, Any] | None = None) -> MethodConfig:
    """The configuration `compare` uses for method `name` at active MLP fraction `fraction` (the method's for_fraction)."""
    f = float(fraction)
    if not 0.0 < f <= 1.0:
        raise InputError(f"active fractions must be in (0, 1]; got {f:g}.")
    cls, fixed = method_entry(name)
    return cls.for_fraction(f, **{**fixed, **dict(opts or {})})


def parse_methods(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise InputError(f"give at least one method, e.g. --methods {','.join(DEFAULT_METHODS)}.")
    known = compare_names()
    bad = [n for n in names if n not in known]
    if bad:
        raise InputError(f"unknown method(s) {bad} for compare; available: {', '.join(known)}.")
    return list(dict.fromkeys(names))


def parse_fractions(text: str | list[float]) -> list[float]:
    try:
        vals = [float(t) for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    except ValueError as e:
        raise InputError(f"active fractions must be numbers like 0.75,0.5,0.25; got {text!r}.") from e
    if not vals or any(not 0.0 < v <= 1.0 for v in vals):
        raise InputError(f"active fractions must be in (0, 1], e.g. 0.75,0.5,0.25; got {text!r}.")
    return list(dict.fromkeys(vals))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tensor_hash(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _run_file(runs: Path, name: str, fraction: float, key: str) -> Path:
    return runs / f"{name}-{fraction:g}-{key}.json"


def compare(
    model: str | os.PathLike | None = None,
    methods: str | list[str] = DEFAULT_METHODS,
    active: str | list[float] = DEFAULT_ACTIVE,
    *,
    out_dir: str | os.PathLike = "out/compare",
    calibration: Any = None,
    ppl_source: str = "austen",
    quick: bool = True,
    eval_windows: int | None = None,
    eval_seq_len: int = 2048,
    dtype: str = "float32",
    method_opts: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Convert `model` with each method at each active fraction and score all against the dense model.

    Returns the aggregate result (also written to out_dir/compare.json); see the module docstring.
    """
    from .pipeline.convert import config_intermediate_sizes, convert
    from .data.calibration import Calibration
    from .data.texts import check_text_source, perplexity_windows
    from .eval.perplexity import perplexity
    from .models.checkpoint import check_model_source, load_model, load_tokenizer, parse_dtype

    # every input is checked before the model is loaded and before anything is written
    names = parse_methods(methods)
    fractions = parse_fractions(active)
    method_opts = dict(method_opts or {})
    unknown = set(method_opts) - set(names)
    if unknown:
        raise InputError(f"method options given for {sorted(unknown)}, which are not among the compared methods {names}.")
    if eval_windows is not None and eval_windows < 1:
        raise InputError(f"eval_windows must be >= 1, got {eval_windows}.")
    parse_dtype(dtype)
    calibration = calibration if calibration is not None else Calibration()
    # every configuration is built (and checked against the model's shapes) before any weight is loaded
    # fraction-major order: an interrupted run leaves every method compared at the first fractions
    configs = {(n, f): method_config(n, f, method_opts.get(n)) for f in fractions for n in names}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is a file; choose a folder for the comparison.")
    needs_calibration = any(cfg.needs_calibration for cfg in configs.values())
    if needs_calibration and not calibration.pretokenized:
        check_text_source(calibration.source, "calibration", what="calibration source")
    check_text_source(ppl_source, "heldout", what="perplexity source")
    path, model_cfg = check_model_source(model, what="model")
    sizes = config_intermediate_sizes(model_cfg)
    for cfg in configs.values():
        cfg.check(sizes)
    tok = load_tokenizer(path)
    if needs_calibration:
        try:
            calibration.validate(tok)
        except InputError as e:
            raise InputError(f"calibration source {calibration.source}: {e}") from None
    try:
        windows = perplexity_windows(tok, source=ppl_source, quick=quick, seq_len=eval_seq_len)
    except InputError as e:
        raise InputError(f"perplexity source {ppl_source}: {e}") from None
    if eval_windows is not None:
        windows = windows[:eval_windows]
    cal_ids, held_ids = calibration.windows(tok) if needs_calibration or calibration.pretokenized else (None, None)

    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    dense, _ = load_model(path, dtype=dtype, with_tokenizer=False)
    dense.eval()
    protocol = (f"austen-v1 {'quick' if quick else 'full'}" if ppl_source == "austen" and eval_seq_len == 2048
                else f"{ppl_source} ({eval_seq_len}-token windows)")
    if eval_windows is not None:
        protocol += f", first {windows.shape[0]} windows"
    base_key = {"format": FORMAT, "model": str(path), "dtype": dtype, "eval": {"source": ppl_source, "windows": _tensor_hash(windows)}}
    cal_key = {"source": calibration.source, "samples": calibration.samples, "seq_len": calibration.seq_len, "seed": calibration.seed,
               "sequential": calibration.sequential, "windows": _tensor_hash(cal_ids), "heldout": _tensor_hash(held_ids)}

    dense_file = runs / f"dense-{_hash(base_key)}.json"
    if dense_file.is_file():
        dense_res = json.loads(dense_file.read_text())
        log.info("dense perplexity reused from %s", dense_file)
    else:
        r = perplexity(dense, windows, progress=progress)
        dense_res = {"ppl": r["ppl"], "nll": r["nll"], "windows": r["windows"], "tokens": r["tokens"], "seconds": r["seconds"]}
        write_json(dense_file, dense_res)
    log.info("dense perplexity %.4f on %d windows", dense_res["ppl"], dense_res["windows"])

    rows = []
    for (name, f), cfg in configs.items():
        key = _hash({**base_key, "calibration": cal_key if cfg.needs_calibration else None, "method": name, "config": cfg.to_dict()})
        file = _run_file(runs, name, f, key)
        if file.is_file():
            row = json.loads(file.read_text())
            row["reused"] = True
            log.info("%s at %g: reused %s", name, f, file.name)
        else:
            try:
                row = _run_one(dense, tok, name, f, cfg, calibration, windows, dense_res["ppl"], progress, perplexity, convert)
            except Exception as e:  # noqa: BLE001
                # an hour-long comparison goes on with the other runs; the failure (its traceback in the row) is
                # reported in the results, not cached, so a re-run retries exactly the failed runs
                import traceback

                msg = " ".join(f"{type(e).__name__}: {e}".split())
                log.error("%s at %g failed: %s", name, f, msg)
                rows.append({"method": name, "active_target": f, "setting": cfg.describe(), "error": msg,
                             "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))})
                if on_result is not None:
                    on_result(rows[-1])
                continue
            row["key"] = key
            write_json(file, row)
            row["reused"] = False
        rows.append(row)
        if on_result is not None:
            on_result(row)
    result = {
        "format": FORMAT,
        "model": model_label(model),
        "model_provenance": model_provenance(model),
        "protocol": protocol,
        "dtype": dtype,
        "windows": dense_res["windows"],
        "tokens": dense_res["tokens"],
        "dense_ppl": dense_res["ppl"],
        "calibration": {k: v for k, v in cal_key.items()},
        "methods": names,
        "active": fractions,
        "fraction_map": {n: {f"{f:g}": configs[(n, f)].describe() for f in fractions} for n in names},
        "runs": rows,
        "failed": [f"{r['method']}@{r['active_target']:g}" for r in rows if "error" in r],
    }
    write_reports(result, out)
    return result


def _run_one(dense, tok, name, f, cfg, calibration, windows, dense_ppl, progress, perplexity, convert) -> dict[str, Any]:
    log.info("%s at active fraction %g: converting (%s)", name, f, cfg.describe())
    t0 = time.perf_counter()
    conv = convert(copy.deepcopy(dense), cfg, calibration=calibration if cfg.needs_calibration else None, tokenizer=tok, progress=progress)
    seconds = time.perf_counter() - t0
    s = conv.config.moeify["summary"]
    r = perplexity(conv, windows, progress=progress)
    s.get("per_layer", [])
    row: dict[str, Any] = {
        "method": name,
        "active_target": f,
        "setting": cfg.describe(),
        "config": cfg.to_dict()["_data"],
        "active_mlp_fraction": s["active_mlp_fraction"],
        "mlp_params_removed_fraction": s["mlp_params_removed_fraction"],
        "ppl": r["ppl"],
        "dense_ppl": dense_ppl,
        "ratio": r["ppl"] / dense_ppl,
        "convert_seconds": seconds,
        "eval_seconds": r["seconds"],
    }
    for k in ("router_fidelity", "calibration_error", "heldout_rel_error_router", "heldout_rel_error_oracle"):
        if k in s:
            row[k] = s[k]
    extras = cfg.compare_details(s)
    if extras:
        row[cfg.method] = extras
        row["calibration_source"] = s.get("calibration", {}).get("source")
    log.info("%s at %g: ppl %.4f, ratio %.4f (convert %.1f s, eval %.1f s)", name, f, r["ppl"], row["ratio"], seconds, r["seconds"])
    del conv
    return row


# --------------------------------------------------------------------------- reports


def markdown(result: dict[str, Any]) -> str:
    failed = [r for r in result["runs"] if "error" in r]
    rows = [r for r in result["runs"] if "error" not in r]
    fr = result["active"]
    lines = [f"Perplexity (ratio to dense) on {result['protocol']}, {result['dtype']}; dense ppl {result['dense_ppl']:.4f}; "
             f"calibration {result['calibration']['source']} {result['calibration']['samples']} x {result['calibration']['seq_len']}, "
             f"seed {result['calibration']['seed']}.", "",
             "| method | " + " | ".join(f"{f:.0%} active" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    for n in result["methods"]:
        cells = []
        for f in fr:
            r = next((x for x in rows if x["method"] == n and x["active_target"] == f), None)
            cells.append("–" if r is None else f"{r['ppl']:.2f} ({r['ratio']:.3f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| method | target | setting | active MLP | ppl | ratio | router fidelity | convert s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fid = f"{r['router_fidelity']:.3f}" if r.get("router_fidelity") is not None else "–"
        lines.append(f"| {r['method']} | {r['active_target']:g} | {r['setting']} | {r['active_mlp_fraction']:.3f} | {r['ppl']:.2f} | "
                     f"{r['ratio']:.3f} | {fid} | {r['convert_seconds']:.1f} |")
    for r in failed:
        lines.append(f"| {r['method']} | {r['active_target']:g} | {r['setting']} | failed: {r['error']} | | | | |")
    for cls in _classes(result):
        lines += cls.compare_markdown([r for r in rows if cls.method in r])
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in result["methods"]:
        pts = sorted((r["active_mlp_fraction"], r["ratio"]) for r in result["runs"] if r["method"] == n and "error" not in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"dense (ppl {result['dense_ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("active MLP fraction per token")
    ax.set_ylabel("perplexity ratio (converted / dense), log scale")
    ax.set_title(f"{Path(result['model']).name}: {result['protocol']}, {result['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def _classes(result: dict[str, Any]) -> list[type[MethodConfig]]:
    """The method classes of the compared names, each once."""
    out = []
    for n in result["methods"]:
        cls = method_entry(n)[0]
        if cls not in out:
            out.append(cls)
    return out


def write_reports(result: dict[str, Any], out: Path) -> dict[str, str]:
    files = {"json": out / "compare.json", "markdown": out / "compare.md", "plot": out / "compare.png"}
    atomic_write(files["markdown"], lambda p: p.write_text(markdown(result)))
    plot(result, files["plot"])
    for cls in _classes(result):
        files.update(cls.compare_figures([r for r in result["runs"] if cls.method in r and "error" not in r], out))
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json(files["json"], result)
    return result["files"]


__all__ = ["compare", "compare_names", "method_config", "markdown", "plot", "DEFAULT_METHODS"]
