"""Every conversion method at every active fraction, on the same tokens: `moeify compare`.

For one model: each (method, active fraction) is converted from a fresh copy of the
dense model with the same calibration windows and scored on the same perplexity
windows as the dense model, whose perplexity is computed in the same run. Results go
to DIR/runs/ one JSON file per run as soon as it exists, named by a hash of
everything that determines it (model, dtype, the calibration and evaluation token
windows, method and full config), so a re-run reuses finished work and a method
added later is the only one computed. The aggregate is DIR/compare.json,
DIR/compare.md (tables) and DIR/compare.png (perplexity ratio vs active MLP fraction,
log y axis); with ExpertWeaver also DIR/expertweaver_shares.png (alpha_l across depth).

Active fraction -> configuration, per method (an unreachable fraction is an error that
names the nearest reachable one):

=====================  ==================================================================
cmoe                   E = 8: 0.75 -> S3A3E8, 0.5 -> S1A3E8, 0.25 -> S1A1E8 (issue 4's
                       layouts); other k/8 -> S1A(k-1)E8, 1/8 -> S0A1E8
expertweaver           N_e = 64, k = f x 64 experts active in total per layer (f = j/64,
                       k above the alpha_min share: f >= 14/64)
moefication            E = 32 experts, top-(f x 32), trained MLP router (f = j/32)
llama-moe-random       E = 16 experts, random split, top-(f x 16), analytical router
llama-moe-cluster      E = 16 experts, gate-row clustering split, as above
prune                  keep round(f x d_h) neurons with the highest activation rate (any f)
mlpmoe                 B = 8 branches, compensated pruning drops (1 - f) x 8 whole branches
                       and rescales the rest (f = j/8; data-free)
=====================  ==================================================================
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import MethodConfig
from .errors import InputError

log = logging.getLogger("moeify")

METHODS = ("cmoe", "expertweaver", "moefication", "llama-moe-random", "llama-moe-cluster", "prune", "mlpmoe")
DEFAULT_METHODS = ("cmoe", "expertweaver", "moefication", "llama-moe-random", "prune", "mlpmoe")
DEFAULT_ACTIVE = (0.75, 0.5, 0.25)
CMOE_LAYOUTS = {0.75: "S3A3E8", 0.5: "S1A3E8", 0.25: "S1A1E8"}
FORMAT = 1


def _multiple(method: str, f: float, n: int, what: str) -> int:
    k = f * n
    if abs(k - round(k)) > 1e-6 or round(k) < 1:
        near = min(max(1, round(k)), n)
        raise InputError(f"{method}: active fraction {f:g} is not reachable with {what}; the nearest reachable fraction is "
                         f"{near / n:g} ({near}/{n}); use multiples of 1/{n}.")
    return int(round(k))


def method_config(name: str, fraction: float, opts: dict[str, Any] | None = None) -> MethodConfig:
    """The configuration `compare` uses for method `name` at active MLP fraction `fraction` (see the module table)."""
    from . import methods as m

    opts = dict(opts or {})
    f = float(fraction)
    if not 0.0 < f <= 1.0:
        raise InputError(f"active fractions must be in (0, 1]; got {f:g}.")
    if name == "cmoe":
        if "layout" in opts:
            raise InputError("compare picks the CMoE layout from the active fraction; pass other CMoE options only.")
        layout = next((lay for k, lay in CMOE_LAYOUTS.items() if abs(k - f) < 1e-9), None)
        if layout is None:
            k = _multiple(name, f, 8, "8 experts of d_h / 8 neurons")
            layout = "S8A0E8" if k == 8 else (f"S1A{k - 1}E8" if k >= 2 else "S0A1E8")
        return m.CMoEConfig(layout=layout, **opts)
    if name == "expertweaver":
        return m.ExpertWeaverConfig(fraction=f, **opts)
    if name == "moefication":
        return m.MoEficationConfig(fraction=f, **opts)
    if name in ("llama-moe-random", "llama-moe-cluster"):
        return m.LlamaMoEConfig(fraction=f, split=name.rsplit("-", 1)[1], **opts)
    if name == "prune":
        return m.PruneConfig(fraction=f, **opts)
    if name == "mlpmoe":
        b = int(opts.pop("branches", 8))
        k = _multiple(name, f, b, f"{b} branches dropped whole")
        return m.MLPMoEConfig(branches=b, prune=1.0 - k / b, prune_mode=opts.pop("prune_mode", "compensated"), **opts)
    raise InputError(f"unknown method {name!r} for compare; available: {', '.join(METHODS)}.")


def parse_methods(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise InputError(f"give at least one method, e.g. --methods {','.join(DEFAULT_METHODS)}.")
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise InputError(f"unknown method(s) {bad} for compare; available: {', '.join(METHODS)}.")
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


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n"))


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
    from . import api
    from .calibration import Calibration
    from .eval.perplexity import perplexity
    from .io import load_config, load_model, resolve_model_path
    from .texts import perplexity_windows

    names = parse_methods(methods)
    fractions = parse_fractions(active)
    method_opts = dict(method_opts or {})
    unknown = set(method_opts) - set(names)
    if unknown:
        raise InputError(f"method options given for {sorted(unknown)}, which are not among the compared methods {names}.")
    if eval_windows is not None and eval_windows < 1:
        raise InputError(f"eval_windows must be >= 1, got {eval_windows}.")
    calibration = calibration if calibration is not None else Calibration()
    # every configuration is built (and checked against the model's shapes) before any weight is loaded
    # fraction-major order: an interrupted run leaves every method compared at the first fractions
    configs = {(n, f): method_config(n, f, method_opts.get(n)) for f in fractions for n in names}
    path = resolve_model_path(model)
    sizes = api._config_intermediate_sizes(load_config(path))
    for cfg in configs.values():
        cfg.check(sizes)
    out = Path(out_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    dense, tok = load_model(path, dtype=dtype)
    dense.eval()
    calibration.validate(tok)
    cal_ids, held_ids = calibration.windows(tok)
    windows = perplexity_windows(tok, source=ppl_source, quick=quick, seq_len=eval_seq_len)
    if eval_windows is not None:
        windows = windows[:eval_windows]
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
        _write_json(dense_file, dense_res)
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
                row = _run_one(dense, tok, name, f, cfg, calibration, windows, dense_res["ppl"], progress, perplexity, api.convert)
            except Exception as e:  # noqa: BLE001
                # an hour-long comparison goes on with the other runs; the failure (with its traceback in the log) is
                # reported in the results, not cached, so a re-run retries exactly the failed runs
                log.exception("%s at %g failed: %s: %s", name, f, type(e).__name__, e)
                rows.append({"method": name, "active_target": f, "setting": _describe(cfg), "error": f"{type(e).__name__}: {e}"})
                if on_result is not None:
                    on_result(rows[-1])
                continue
            row["key"] = key
            _write_json(file, row)
            row["reused"] = False
        rows.append(row)
        if on_result is not None:
            on_result(row)
    result = {
        "format": FORMAT,
        "model": str(model or "HuggingFaceTB/SmolLM2-135M-Instruct"),
        "protocol": protocol,
        "dtype": dtype,
        "windows": dense_res["windows"],
        "tokens": dense_res["tokens"],
        "dense_ppl": dense_res["ppl"],
        "calibration": {k: v for k, v in cal_key.items()},
        "methods": names,
        "active": fractions,
        "fraction_map": {n: {f"{f:g}": _describe(configs[(n, f)]) for f in fractions} for n in names},
        "runs": rows,
    }
    write_reports(result, out)
    return result


def _describe(cfg: MethodConfig) -> str:
    d = cfg.to_dict()["_data"]
    if cfg.method == "cmoe":
        return d["layout"]
    if cfg.method == "mlpmoe":
        return f"B={d['branches']}, prune {d['prune']:g} ({d['prune_mode']})"
    if cfg.method == "prune":
        return f"keep {d['fraction']:g} of neurons (by {d['score']})"
    if cfg.method == "expertweaver":
        return f"N_e={d['experts']}, {d['active']} active in total"
    if cfg.method == "llama-moe":
        return f"{d['split']} split, E={d['experts']}, top-{d['active']}, {d['router']} router"
    return f"E={d['experts']}, top-{d['active']}, {d['router']} router"


def _run_one(dense, tok, name, f, cfg, calibration, windows, dense_ppl, progress, perplexity, convert) -> dict[str, Any]:
    log.info("%s at active fraction %g: converting (%s)", name, f, _describe(cfg))
    t0 = time.perf_counter()
    conv = convert(copy.deepcopy(dense), cfg, calibration=calibration if cfg.needs_calibration else None, tokenizer=tok, progress=progress)
    seconds = time.perf_counter() - t0
    s = conv.config.moeify["summary"]
    r = perplexity(conv, windows, progress=progress)
    per_layer = s.get("per_layer", [])
    row: dict[str, Any] = {
        "method": name,
        "active_target": f,
        "setting": _describe(cfg),
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
    if per_layer and "alpha" in per_layer[0]:
        row["expertweaver"] = {k: [lay.get(k) for lay in per_layer] for k in
                               ("alpha", "alpha_effective", "specialisation_ratio", "shared_experts", "routed_top_k", "total_active_experts")}
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
    ew = [r for r in rows if "expertweaver" in r]
    if ew:
        lines += ["", "ExpertWeaver shared share per layer (alpha_l from the specialisation ratio; effective = built):", ""]
        for r in ew:
            a = r["expertweaver"]
            lines.append(f"- {r['active_target']:.0%} active: alpha_l {min(a['alpha']):.3f}..{max(a['alpha']):.3f}, "
                         f"effective {min(a['alpha_effective']):.3f}..{max(a['alpha_effective']):.3f}, routed top-k "
                         f"{min(a['routed_top_k'])}..{max(a['routed_top_k'])}, total active experts {sorted(set(a['total_active_experts']))}")
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
    _atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def plot_shares(result: dict[str, Any], path: Path) -> bool:
    ew = [r for r in result["runs"] if "expertweaver" in r]
    if not ew:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in ew:
        a = r["expertweaver"]
        line, = ax.plot(range(len(a["alpha"])), a["alpha"], marker=".", label=f"alpha_l ({r['active_target']:.0%} active)")
        ax.plot(range(len(a["alpha"])), a["alpha_effective"], linestyle=":", color=line.get_color(),
                label=f"built share ({r['active_target']:.0%} active)")
    cfg = ew[0]["config"]
    for v in (cfg["alpha_min"], cfg["alpha_max"]):
        ax.axhline(v, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("shared share of the MLP neurons")
    ax.set_title("ExpertWeaver layer-adaptive shared share")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return True


def write_reports(result: dict[str, Any], out: Path) -> dict[str, str]:
    files = {"json": out / "compare.json", "markdown": out / "compare.md", "plot": out / "compare.png"}
    _atomic_write(files["markdown"], lambda p: p.write_text(markdown(result)))
    plot(result, files["plot"])
    if plot_shares(result, out / "expertweaver_shares.png"):
        files["shares_plot"] = out / "expertweaver_shares.png"
    result["files"] = {k: str(v) for k, v in files.items()}
    _write_json(files["json"], result)
    return result["files"]


__all__ = ["compare", "method_config", "markdown", "plot", "METHODS", "DEFAULT_METHODS", "CMOE_LAYOUTS"]
