"""Figures of an analysis JSON (matplotlib, Agg backend, imported only here).

Each figure function takes the analysis dict and returns a matplotlib Figure or None
when the analysis lacks that part; `analysis_figures` writes them as PNG files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write

FIG_DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _pick(layers: list[dict], n: int = 4) -> list[dict]:
    """First, last and evenly spaced layers in between."""
    if len(layers) <= n:
        return layers
    idx = np.unique(np.linspace(0, len(layers) - 1, n).round().astype(int))
    return [layers[i] for i in idx]


def _ids(a: dict) -> list[int]:
    return [lay["layer"] for lay in a["layers"]]


def fig_activation_rates(a: dict):
    plt = _plt()
    picked = _pick(a["layers"])
    fig, axes = plt.subplots(1, len(picked) + 1, figsize=(3.6 * (len(picked) + 1), 3.4))
    for ax, lay in zip(axes, picked):
        ar = lay["activation_rates"]
        bins = np.asarray(ar["bins"])
        width = np.diff(bins)
        ax.bar(bins[:-1], ar["routed"], width=width, align="edge", color="tab:blue", alpha=0.75, label=f"routed ({ar['routed_zero']} never marked)")
        ax.bar(bins[:-1], ar["shared"], width=width, align="edge", bottom=ar["routed"], color="tab:orange", alpha=0.85,
               label=f"shared ({ar['shared_zero']} never marked)")
        ax.set_xscale("log")
        ax.set_title(f"layer {lay['layer']}")
        ax.set_xlabel(f"activation rate (share of tokens, top-{ar['k_act']} marks)")
        ax.set_ylabel("neurons")
        ax.legend(fontsize=7)
    ax = axes[-1]
    ax.plot(_ids(a), [lay["activation_rates"]["marks_in_shared"] for lay in a["layers"]], "o-", color="tab:orange", label="shared expert")
    shares = [lay["shared"] / (lay["shared"] + sum(lay["experts"])) for lay in a["layers"]]
    ax.plot(_ids(a), shares, "--", color="gray", label="its share of neurons")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of top-K_a marks")
    ax.set_title("marks captured by the shared expert")
    ax.legend(fontsize=7)
    fig.suptitle("Activation rates on held-out tokens: shared vs routed neurons")
    fig.tight_layout()
    return fig


def fig_expert_load(a: dict):
    layers = [lay for lay in a["layers"] if "load" in lay]
    if not layers:
        return None
    plt = _plt()
    N = max(len(lay["load"]["share"]) for lay in layers)
    grid = np.full((len(layers), N), np.nan)
    for r, lay in enumerate(layers):
        grid[r, : len(lay["load"]["share"])] = lay["load"]["share"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.18 * len(layers) + 2.6), gridspec_kw={"width_ratios": [1.3, 1]})
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    for r, lay in enumerate(layers):
        for j in lay["load"]["dead"]:
            ax.text(j, r, "x", ha="center", va="center", color="red", fontsize=9)
    ax.set_yticks(range(len(layers)), [str(lay["layer"]) for lay in layers], fontsize=7)
    ax.set_xticks(range(N))
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load: share of held-out router selections\n(uniform = {1 / N:.3f}; x = dead expert)", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of selections")
    ids = [lay["layer"] for lay in layers]
    ax2.plot(ids, [lay["load"]["entropy_normalized"] for lay in layers], "o-", label="router load entropy / log N")
    ax2.plot(ids, [max(lay["load"]["share"]) for lay in layers], "s--",
             label="largest expert share")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("fraction")
    ax2.set_title("load balance")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_router_fidelity(a: dict):
    layers = [lay for lay in a["layers"] if "fidelity" in lay]
    if not layers:
        return None
    plt = _plt()
    ids = [lay["layer"] for lay in layers]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax.plot(ids, [lay["fidelity"]["overlap"] for lay in layers], "o-", color="tab:green")
    k = layers[0]["top_k"]
    N = len(layers[0]["experts"])
    ax.axhline(k / N, color="gray", ls=":", label=f"random router (k/N = {k / N:.2f})")
    _overlap_axes(ax, "router fidelity on held-out tokens")
    ax2.plot(ids, [lay["fidelity"]["rel_error_router"] for lay in layers], "o-", label="router selection")
    ax2.plot(ids, [lay["fidelity"]["rel_error_oracle"] for lay in layers], "s--", label="oracle selection (largest ||E_j(x)||)")
    _error_axes(ax2, "relative MLP output error, held-out tokens")
    fig.tight_layout()
    return fig


def _overlap_axes(ax, title: str) -> None:
    """Per-layer router/oracle top-k overlap axes (0..1)."""
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("top-k overlap with the oracle")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _error_axes(ax, title: str) -> None:
    """Per-layer relative MLP output error axes (from 0)."""
    ax.set_xlabel("layer")
    ax.set_ylabel("||F - F_moe|| / ||F||")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def fig_stability(a: dict):
    layers = [lay for lay in a["layers"] if "a_vs_b" in lay.get("stability", {})]
    if not layers:
        return None
    plt = _plt()
    ids = [lay["layer"] for lay in layers]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    st = [lay["stability"] for lay in layers]
    ax.plot(ids, [s["a_vs_b"]["shared_jaccard"] for s in st], "o-", color="tab:orange", label="shared set Jaccard, subset A vs B")
    ax.plot(ids, [s["a_vs_b"].get("routed_ari", np.nan) for s in st], "s-", color="tab:blue", label="routed experts ARI, A vs B")
    ax.plot(ids, [s["a_vs_checkpoint"]["shared_jaccard"] for s in st], "o:", color="tab:orange", alpha=0.6, label="Jaccard, A vs checkpoint")
    ax.plot(ids, [s["a_vs_checkpoint"].get("routed_ari", np.nan) for s in st], "s:", color="tab:blue", alpha=0.6, label="ARI, A vs checkpoint")
    ax.set_ylim(min(0, np.nanmin([s["a_vs_b"].get("routed_ari", 0) for s in st])) - 0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("agreement (1 = identical)")
    ax.set_title(f"partition stability: two disjoint calibration subsets of {st[0]['tokens_per_subset']} tokens")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def fig_secret_moe_layers(a: dict):
    layers = [lay for lay in a["layers"] if "gaussian" in lay["secret_moe"]]
    if not layers:
        return None
    plt = _plt()
    ids = [lay["layer"] for lay in layers]

    def at_k(lay, dist, key):
        sm = lay["secret_moe"]
        vals = sm.get(dist, {}).get(key)
        return np.nan if vals is None else vals[sm["block_k"]]

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(ids, [at_k(lay, "real", "oracle") for lay in layers], "o-", color="tab:green", label="real inputs: oracle k-of-N")
    ax.plot(ids, [at_k(lay, "gaussian", "oracle") for lay in layers], "o-", color="tab:red", label="matched Gaussian: oracle k-of-N (checkpoint partition)")
    ax.plot(ids, [at_k(lay, "gaussian_refit", "oracle") for lay in layers], "^--", color="tab:red", alpha=0.7,
            label="matched Gaussian: oracle k-of-N (partition re-fitted on Gaussian)")
    ax.plot(ids, [at_k(lay, "real", "router") for lay in layers], "s:", color="tab:green", alpha=0.7, label="real inputs: the router")
    ax.plot(ids, [at_k(lay, "real", "static") for lay in layers], "x:", color="gray", label="real inputs: static MLP, same active neurons")
    ax.plot(ids, [at_k(lay, "gaussian", "static") for lay in layers], "+:", color="tab:brown", label="Gaussian: static MLP, same active neurons")
    lay0 = layers[0]
    frac = lay0["secret_moe"]["active_fraction"][lay0["secret_moe"]["block_k"]]
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of variance unexplained (FVU)")
    ax.set_title(f"'Secret MoE' test at the block's k ({frac:.0%} of neurons active): real vs matched-Gaussian inputs", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def fig_secret_moe_curves(a: dict):
    layers = [lay for lay in a["layers"] if "gaussian" in lay["secret_moe"]]
    if not layers:
        return None
    plt = _plt()
    picked = _pick(layers)
    fig, axes = plt.subplots(1, len(picked), figsize=(3.8 * len(picked), 3.6), squeeze=False)
    for ax, lay in zip(axes[0], picked):
        sm = lay["secret_moe"]
        x = np.asarray(sm["active_fraction"]) * 100
        styles = [("real", "oracle", "o-", "tab:green", "real: oracle"), ("real", "router", "s:", "tab:green", "real: router"),
                  ("real", "static", "x:", "gray", "real: static"), ("gaussian", "oracle", "o-", "tab:red", "Gaussian: oracle"),
                  ("gaussian_refit", "oracle", "^--", "tab:red", "Gaussian: oracle, re-fitted partition"),
                  ("gaussian", "static", "+:", "tab:brown", "Gaussian: static")]
        for dist, key, style, color, label in styles:
            if key in sm.get(dist, {}):
                ax.plot(x, sm[dist][key], style, color=color, label=label)
        ax.axvline(sm["active_fraction"][sm["block_k"]] * 100, color="k", lw=0.6, ls=":")
        ax.set_title(f"layer {lay['layer']}")
        ax.set_xlabel("active MLP neurons (%)")
        ax.set_ylabel("FVU")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("FVU vs active neurons: shared expert + k = 0..N routed experts\n(dotted line: the converted block's k)", fontsize=10)
    fig.tight_layout()
    return fig


def fig_lowrank(a: dict):
    layers = [lay for lay in a["layers"] if lay.get("lowrank")]
    if not layers:
        return None
    plt = _plt()
    ranks = [row["rank"] for row in layers[0]["lowrank"]]
    ids = [lay["layer"] for lay in layers]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, r in enumerate(ranks):
        label = "full rank" if r is None else f"rank {r}"
        ax.plot(ids, [lay["lowrank"][i]["overlap"] for lay in layers], "o-", label=label)
        ax2.plot(ids, [lay["lowrank"][i]["rel_error_router"] for lay in layers], "o-", label=label)
    _overlap_axes(ax, "low-rank routers (re-fitted on subset A): fidelity")
    _error_axes(ax2, "held-out MLP output error")
    fig.tight_layout()
    return fig


def fig_distill(a: dict):
    d = a.get("distill")
    if not d:
        return None
    plt = _plt()
    names = list(next(iter(d["fvu"].values())))
    data = list(d["fvu"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(data)) + i * width, [d["fvu"][ds][n] for ds in data], width, label=n)
    ax.set_xticks(np.arange(len(data)) + width * (len(names) - 1) / 2, [f"{ds} inputs" for ds in data])
    ax.set_ylabel("validation FVU")
    ax.set_title(f"distilled students of layer {d['layer']} ({d['active_neurons']} active neurons each, {d['steps']} steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


FIGURES = {
    "activation_rates": fig_activation_rates,
    "expert_load": fig_expert_load,
    "router_fidelity": fig_router_fidelity,
    "stability": fig_stability,
    "secret_moe_layers": fig_secret_moe_layers,
    "secret_moe_curves": fig_secret_moe_curves,
    "lowrank_router": fig_lowrank,
    "distill": fig_distill,
}

CAPTIONS = {
    "activation_rates": "Activation-rate histograms (held-out tokens) of the shared and routed neurons, and the share of top-K_a marks the shared expert captures per layer.",
    "expert_load": "Share of held-out router selections per expert and layer (dead experts marked x), and the load entropy.",
    "router_fidelity": "Router vs oracle top-k overlap, and the relative MLP output error with the router's and the oracle's selection.",
    "stability": "Agreement of the plans re-fitted on two disjoint calibration subsets: Jaccard of the shared sets, adjusted Rand index of the routed experts.",
    "secret_moe_layers": "FVU at the block's k: oracle k-of-N experts on real inputs vs matched Gaussian inputs, the router, and a static MLP with the same active neurons.",
    "secret_moe_curves": "FVU vs active neurons for a few layers, real vs matched-Gaussian inputs.",
    "lowrank_router": "Low-rank routers re-fitted at a few ranks: fidelity and held-out MLP error per layer.",
    "distill": "Distilled students (dense vs MoE with the same active neurons) on real vs Gaussian inputs.",
}


def analysis_figures(a: dict[str, Any], out: Path, prefix: str = "") -> list[str]:
    """Write every figure the analysis supports as PNG into `out`; returns the file names."""
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name, make in FIGURES.items():
        fig = make(a)
        if fig is None:
            continue
        path = out / f"{prefix}{name}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=FIG_DPI, format="png"))
        plt.close(fig)
        names.append(path.name)
    return names
