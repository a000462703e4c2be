"""Conversion time against its attainable limit: a calibrated method vs the same pipeline's forward alone.

A calibrated conversion runs the layer-sequential calibration forward (pipeline/sequential.py)
and plans every MLP on it. Its attainable limit is that forward with the least planning any
calibrated method does: the `prune` run at the same active fraction (h(x) of every calibration
token, the dense output, a ranking of the neurons, the same held-out report; docs/protocol.md
"Speed"). Both are timed here as `moeify convert` runs them (streamed from disk to a temporary
folder that is deleted after), interleaved in one process, and reported as
`ratio` = method / prune (1.0 = the limit) with `of_limit` = prune / method, next to each run's
per-stage times, the calibration forward's share of it and the minor page faults of each run.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..core.method import MethodConfig
from ..core.process import minor_page_faults
from ..errors import InputError
from .stats import summarize


def forward_baseline(config: MethodConfig) -> MethodConfig:
    """The prune run that stands for `config`'s calibration forward alone: the same active fraction (its layout when it has one)."""
    from ..methods.prune import PruneConfig

    if not config.needs_calibration:
        raise InputError(f"{config.method} needs no calibration: its conversion has no calibration forward to compare with; "
                         "benchmark a calibrated method (e.g. --conversion cmoe).")
    lay = getattr(config, "lay", None)
    opts = {"k_act": config.k_act} if hasattr(config, "k_act") else {}
    return PruneConfig(fraction=lay.active_fraction, **opts) if lay is not None else PruneConfig(**opts)


def _stages(moeify_cfg: dict[str, Any]) -> dict[str, float]:
    s = moeify_cfg["summary"]
    return {**s.get("stage_seconds", {}), **(s.get("streaming") or {}).get("stage_seconds", {})}


def compare_conversions(
    model: str | None,
    config: MethodConfig,
    calibration,
    *,
    repeats: int = 1,
    dtype: str = "float32",
    tokenizer=None,
    refit: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time `config`'s streamed conversion of `model` against its forward baseline (`forward_baseline`), interleaved.

    refit: the method's conversion with the closed-form refit (pipeline/refit.py); the baseline never refits.

    Repetition r runs the baseline first when r is even, the method first when odd. Returns
    per-run seconds and stage times of both, the median ratio method / baseline, the ratio of
    each pair, and `of_limit` (baseline / method: the share of the attainable limit reached).
    """
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}.")
    base_cfg = forward_baseline(config)
    log = logging.getLogger("moeify")
    level = log.level
    log.setLevel(logging.WARNING)  # no per-layer lines from the conversions themselves
    try:
        runs = _interleave(model, {"baseline": base_cfg, "method": config}, calibration, repeats, dtype, tokenizer, refit, device, progress)
    finally:
        log.setLevel(level)
    secs = {k: [x["seconds"] for x in v] for k, v in runs.items()}
    ratio = statistics.median(secs["method"]) / statistics.median(secs["baseline"])
    return {
        "method": config.method,
        "method_settings": config.to_dict()["_data"],
        "refit": refit,
        "baseline_method": f"{base_cfg.method} ({base_cfg.describe()})",
        "calibration": {"source": calibration.source, "samples": calibration.samples, "seq_len": calibration.seq_len,
                        "seed": calibration.seed, "heldout_tokens": calibration.heldout_tokens},
        "repeats": repeats,
        "seconds": {k: summarize(v) for k, v in secs.items()},
        "ratio": ratio,
        "ratio_pairs": summarize([m / b for m, b in zip(secs["method"], secs["baseline"])]),
        "limit": 1.0,
        "limit_kind": "the calibration forward alone (the prune run at the same active fraction)",
        "of_limit": 1.0 / ratio,
        "stage_seconds": {k: _median_dict(v, "stages") for k, v in runs.items()},
        "forward_share": {k: statistics.median(x["forward_share"] for x in v) for k, v in runs.items()},
        "minor_page_faults": {k: statistics.median(x["minor_page_faults"] for x in v) for k, v in runs.items()},
        "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE"),  # torch's switch as this process started (moeify sets "1" by default)
        "plan_stages": {k: _median_dict(v, "plan_stages") for k, v in runs.items() if v[0]["plan_stages"]},
        "runs": runs,
    }


def _median_dict(runs: list[dict[str, Any]], field: str) -> dict[str, float]:
    """Per key of runs[i][field] (a dict of seconds), the median over the runs."""
    return {k: statistics.median(r[field].get(k, 0.0) for r in runs) for k in runs[0][field]}


def _interleave(model, configs: dict[str, MethodConfig], calibration, repeats: int, dtype: str, tokenizer, refit: bool, device: str,
                progress: Callable[[str], None] | None) -> dict[str, list[dict[str, Any]]]:
    """Each configuration's streamed conversion `repeats` times, alternating which runs first; seconds and stages per run
    (refit: for "method" only)."""
    from ..pipeline.streaming import convert_streaming

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for r in range(repeats):
        for name in list(configs) if r % 2 == 0 else list(configs)[::-1]:
            with tempfile.TemporaryDirectory(prefix="moeify-bench-") as tmp:
                faults = minor_page_faults()
                t = time.perf_counter()
                _, mo = convert_streaming(model, configs[name], Path(tmp) / "out", calibration=calibration, tokenizer=tokenizer,
                                          dtype=dtype, device=device, refit=refit and name == "method", progress=False)
                seconds = time.perf_counter() - t
                faults = minor_page_faults() - faults
            stages = _stages(mo)
            runs[name].append({"seconds": seconds, "stages": stages, "forward_share": stages.get("forward", 0.0) / seconds,
                               "refit_layers": (mo.get("refit") or {}).get("layers", 0), "minor_page_faults": faults,
                               "plan_stages": mo["summary"].get("plan_stages") or {}})
            if progress is not None:
                progress(f"{name} ({configs[name].method}) run {r + 1}/{repeats}: {seconds:.1f} s "
                         f"(calibration forward {stages.get('forward', 0.0):.1f} s)")
    return runs
