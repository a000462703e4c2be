"""`moeify report`: one self-contained HTML page for a converted checkpoint.

Reads what moeify already wrote: DIR/config.json's "moeify" block (conversion settings,
per-layer plan summary, perplexity recorded at conversion), `moeify convert --json` and
`moeify eval --json` files (perplexity and/or zero-shot, dense vs converted) and a
`moeify analyze` JSON. Figures are PNG files written beside the page and embedded in it
as base64, so the page can be mailed on its own.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
from pathlib import Path
from typing import Any

from .core.files import atomic_write, write_text
from .errors import InputError

log = logging.getLogger("moeify")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}.note{color:#555;font-size:.9em}code{background:#f5f5f5;padding:0 .2em}
"""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise InputError(f"{what} {path} does not exist; pass a JSON file written by moeify.")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON ({e}); pass a file written by moeify.") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is not a moeify results object.")
    return data


def load_inputs(checkpoint: Path, evals: list[Path], analysis: Path | None) -> dict[str, Any]:
    """Read and check every input before any figure is drawn."""
    cfg_path = Path(checkpoint) / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{checkpoint} has no config.json; point at a folder written by `moeify convert`.")
    mo = json.loads(cfg_path.read_text()).get("moeify")
    if not isinstance(mo, dict):
        raise InputError(f"{checkpoint} is not a moeify checkpoint (no 'moeify' block in config.json).")
    ev = []
    for p in evals:
        d = _read_json(p, "eval file")
        if "ppl" not in d and "tasks" not in d and "summary" not in d:
            raise InputError(f"{p} has neither perplexity ('ppl') nor zero-shot ('tasks') results nor a conversion summary; pass `moeify eval --json` or `moeify convert --json` output.")
        ev.append((Path(p).name, d))
    an = None
    if analysis is not None:
        an = _read_json(analysis, "analysis file")
        if an.get("protocol") != "analysis-v1" or "layers" not in an:
            raise InputError(f"{analysis} is not a `moeify analyze --json` file (protocol analysis-v1).")
    return {"checkpoint": str(checkpoint), "moeify": mo, "evals": ev, "analysis": an}


# --------------------------------------------------------------------------- tables


def _table(tid: str, caption: str, header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag, i, v):
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<table id="{tid}"><caption class="note">{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>'


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def settings_rows(mo: dict[str, Any]) -> list[list[Any]]:
    s, prov = mo.get("summary") or {}, mo.get("provenance") or {}
    layers = [lay for lay in mo.get("layers") or [] if lay]
    rows = [["method", mo.get("method")], ["base model", prov.get("base_model")]]
    rows += [[f"config: {k}", v] for k, v in sorted(((mo.get("config") or {}).get("_data") or {}).items())]
    if layers and "experts" in layers[0]:
        lay = layers[0]
        rows.append(["converted layers", f"{len(layers)} of {len(mo.get('layers') or [])}"])
        rows.append(["layer 0 plan", f"shared {lay.get('shared')} neurons, {len(lay['experts'])} routed experts of {sorted(set(lay['experts']))}, top-{lay.get('top_k')}, router {lay.get('router', {}).get('type')}"])
    for k in ("active_mlp_fraction", "mlp_params_removed_fraction", "calibration_error", "router_fidelity", "heldout_rel_error_router",
              "heldout_rel_error_oracle", "seconds"):
        if k in s:
            rows.append([k.replace("_", " "), _num(s[k])])
    if "calibration" in s:
        rows.append(["calibration", ", ".join(f"{k}={v}" for k, v in s["calibration"].items())])
    rows += [["moeify / transformers / torch", f"{prov.get('moeify_version')} / {prov.get('transformers_version')} / {prov.get('torch_version')}"],
             ["created", prov.get("created")]]
    return rows


def ppl_rows(inputs: dict[str, Any]) -> list[list[Any]]:
    rows = []
    sources = [("config.json (at conversion)", (inputs["moeify"].get("metrics") or {}))] + inputs["evals"]
    for name, d in sources:
        for text, r in (d.get("ppl") or {}).items():
            rows.append([name, text, r.get("protocol", ""), r.get("dtype", ""), r.get("windows", ""), r.get("tokens", ""),
                         _num(r.get("baseline")), _num(r.get("model")), _num(r.get("ratio"), ".5f")])
    return rows


def zero_shot_rows(inputs: dict[str, Any]) -> tuple[list[list[Any]], list[dict]]:
    rows, runs = [], []
    for name, d in inputs["evals"]:
        if "tasks" not in d:
            continue
        runs.append(d)
        for task, e in d["tasks"].items():
            for metric, r in (e.get("metrics") or {}).items():
                rows.append([name, task, e.get("limit") or "full", e.get("n", ""), metric,
                             f"{_pct(r.get('dense'))} ± {_pct(r.get('dense_stderr'))}" if r.get("dense_stderr") is not None else _pct(r.get("dense")),
                             f"{_pct(r.get('model'))} ± {_pct(r.get('model_stderr'))}" if r.get("model_stderr") is not None else _pct(r.get("model")),
                             _pct(r.get("recovery"))])
        for metric, a in (d.get("average") or {}).items():
            rows.append([name, "average", "", f"{a.get('tasks', '')} tasks" if "tasks" in a else "", metric, _pct(a.get("dense")), _pct(a.get("model")),
                         _pct(a.get("recovery"))])
    return rows, runs


def analysis_rows(a: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for lay in a["layers"]:
        fid, st, sm = lay.get("fidelity", {}), lay.get("stability", {}).get("a_vs_b", {}), lay["secret_moe"]
        k = sm["block_k"]

        def at(dist):
            v = sm.get(dist, {}).get("oracle")
            return None if v is None else v[k]

        real, gauss = at("real"), at("gaussian")
        rows.append([lay["layer"], _num(fid.get("overlap"), ".3f"), _num(fid.get("rel_error_router"), ".3f"), _num(fid.get("rel_error_oracle"), ".3f"),
                     _num(lay.get("block_fvu"), ".3f"), len(lay.get("load", {}).get("dead", [])), _num(lay.get("load", {}).get("entropy_normalized"), ".3f"),
                     _num(st.get("shared_jaccard"), ".3f"), _num(st.get("routed_ari"), ".3f"), _num(real, ".3f"), _num(gauss, ".3f"),
                     _num(at("gaussian_refit"), ".3f"), "-" if gauss is None else ("yes" if real < gauss else "no")])
    return rows


# --------------------------------------------------------------------------- figures


def fig_zero_shot(runs: list[dict]):
    from .analysis.plots import _plt

    if not runs:
        return None
    plt = _plt()
    d = runs[-1]
    tasks = list(d["tasks"])
    metric = "acc_norm" if all("acc_norm" in d["tasks"][t]["metrics"] for t in tasks if t != "boolq" and t != "winogrande") else "acc"

    def val(t, who):
        m = d["tasks"][t]["metrics"]
        r = m.get(metric) or m.get("acc") or next(iter(m.values()))
        return r.get(who)

    import numpy as np

    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 3.8))
    dense = [val(t, "dense") for t in tasks]
    model = [val(t, "model") for t in tasks]
    ax.bar(x - 0.2, [100 * (v or 0) for v in dense], 0.4, label="dense", color="gray")
    ax.bar(x + 0.2, [100 * (v or 0) for v in model], 0.4, label="converted", color="tab:blue")
    ax.set_xticks(x, [f"{t}\n(limit {d['tasks'][t].get('limit') or 'full'})" for t in tasks], fontsize=8)
    ax.set_ylabel(f"accuracy (%), {metric} where the task has it")
    ax.set_title("zero-shot accuracy: dense vs converted (lm-eval, 0-shot)")
    ax.legend()
    fig.tight_layout()
    return fig


def build_report(inputs: dict[str, Any], out_html: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the HTML page and its PNGs; returns {"html", "figures", "tables"}."""
    out_html = Path(out_html)
    if out_html.exists() and not overwrite:
        raise InputError(f"output {out_html} already exists; choose another path or pass --overwrite to replace it.")
    out_dir = out_html.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_html.stem
    from .analysis.plots import CAPTIONS, FIGURES, _plt

    mo = inputs["moeify"]
    tables: list[tuple[str, str, str]] = []  # (id, title, html)
    tables.append(("settings", "Conversion settings", _table("settings", "from config.json['moeify']", ["setting", "value"], settings_rows(mo), left=2)))
    pr = ppl_rows(inputs)
    if pr:
        tables.append(("perplexity", "Perplexity: dense vs converted", _table("perplexity", "same windows, dense scored in the same run",
                       ["from", "text", "protocol", "dtype", "windows", "tokens", "dense ppl", "converted ppl", "ratio"], pr, left=4)))
    zr, runs = zero_shot_rows(inputs)
    if zr:
        tables.append(("zero_shot", "Zero-shot accuracy: dense vs converted (%)", _table("zero_shot", "lm-eval, 0-shot; recovery = converted / dense",
                       ["from", "task", "limit", "docs", "metric", "dense", "converted", "recovery"], zr, left=3)))
    a = inputs["analysis"]
    if a:
        tables.append(("analysis_layers", "Per-layer analysis", _table(
            "analysis_layers", f"{a['settings']['tokens']['heldout']} held-out tokens ({a['settings']['heldout']}); stability from two disjoint "
            f"calibration subsets of {a['settings']['tokens'].get('calib_a', '-')} tokens; FVU at the block's k",
            ["layer", "overlap", "err router", "err oracle", "block FVU", "dead", "load entropy", "Jaccard", "ARI", "FVU real",
             "FVU Gaussian", "FVU Gaussian re-fit", "real < Gaussian"], analysis_rows(a))))
        lr = (a.get("summary") or {}).get("lowrank")
        if lr:
            tables.append(("lowrank", "Low-rank routers (mean over layers)", _table(
                "lowrank", "routers re-fitted on calibration subset A, scored on held-out tokens", ["rank", "overlap", "MLP error", "FVU"],
                [[r, _num(v["overlap"], ".3f"), _num(v["rel_error_router"], ".3f"), _num(v["fvu"], ".3f")] for r, v in lr.items()])))
        if a.get("distill"):
            d = a["distill"]
            names = list(next(iter(d["fvu"].values())))
            tables.append(("distill", "Distilled students (held-out FVU)", _table(
                "distill", f"layer {d['layer']}, {d['active_neurons']} active neurons, {d['experts']} single-neuron experts, {d['steps']} steps",
                ["inputs", *names], [[ds, *(_num(row[n]) for n in names)] for ds, row in d["fvu"].items()])))
    plt = _plt()
    figures: list[tuple[str, str, str]] = []  # (id, file, caption)
    makers = [("zero_shot", lambda: fig_zero_shot(runs), "Zero-shot accuracy per task, dense vs converted.")]
    if a:
        makers += [(name, (lambda f=f: f(a)), CAPTIONS[name]) for name, f in FIGURES.items()]
    for name, make, caption in makers:
        fig = make()
        if fig is None:
            continue
        path = out_dir / f"{stem}-{name}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        figures.append((f"fig-{name}", path.name, caption))
    verdict = ""
    sm = ((a or {}).get("summary") or {}).get("secret_moe")
    if sm:
        verdict = (f"<p id=\"verdict\"><b>Secret-MoE test</b> (oracle k-of-N FVU at the block's k; real inputs vs Gaussian inputs with the same mean "
                   f"and covariance): real &lt; Gaussian in <b>{sm['holds_layers']} of {sm['layers']}</b> layers with the checkpoint's partition and in "
                   f"<b>{sm['holds_refit_layers']} of {sm['layers']}</b> against a partition re-fitted on Gaussian inputs. Mean FVU: real "
                   f"{sm['fvu_real']:.3f}, Gaussian {sm['fvu_gaussian']:.3f}, Gaussian re-fitted {_num(sm['fvu_gaussian_refit'], '.3f')}.</p>")
    toc = "".join(f'<li><a href="#{tid}">table: {html.escape(title)}</a></li>' for tid, title, _ in tables)
    toc += "".join(f'<li><a href="#{fid}">figure: {html.escape(cap)}</a></li>' for fid, _, cap in figures)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>moeify report: {html.escape(inputs['checkpoint'])}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>moeify report: <code>{html.escape(inputs['checkpoint'])}</code></h1>",
             f"<p class=\"note\">{html.escape(mo.get('method', ''))} conversion of {html.escape(str((mo.get('provenance') or {}).get('base_model')))}; "
             f"generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}.</p>",
             f"<h2>Contents</h2><ul id=\"contents\">{toc}</ul>"]
    for tid, title, body in tables:
        parts.append(f"<h2>{html.escape(title)}</h2>{body}")
        if tid == "analysis_layers":
            parts.append(verdict)
    if figures:
        parts.append("<h2>Figures</h2>")
    for fid, fname, caption in figures:
        data = base64.b64encode((out_dir / fname).read_bytes()).decode("ascii")
        parts.append(f'<figure id="{fid}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(caption)} (<code>{html.escape(fname)}</code>)</figcaption></figure>")
    parts.append("</body></html>")
    write_text(out_html, "\n".join(parts))
    log.info("report written to %s with %d tables and %d figures", out_html, len(tables), len(figures))
    return {"html": str(out_html), "figures": [f for _, f, _ in figures], "tables": [t for t, _, _ in tables]}
