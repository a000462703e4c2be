"""Summaries of repeated timings: medians, spread, and speedups with the limit each is measured against.

Timings are medians over repetitions; `summarize` adds min, max and the interquartile
range so a noisy machine shows as such.
"""

from __future__ import annotations

import statistics
from typing import Any


def summarize(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "iqr": [q[0], q[2]], "runs": list(values)}


def speedup(base: list[float], model: list[float], higher_is_better: bool, limit: float | None, limit_kind: str) -> dict[str, Any]:
    """Speedup of model over base (> 1: the converted model is faster), from medians and per pair.

    higher_is_better: the values are rates (tokens/s), else durations. `of_limit` is the
    speedup as a fraction of `limit`, the physical limit it is measured against.
    """
    if higher_is_better:
        ratio = statistics.median(model) / statistics.median(base)
        pairs = [m / b for m, b in zip(model, base)]
    else:
        ratio = statistics.median(base) / statistics.median(model)
        pairs = [b / m for m, b in zip(model, base)]
    out = {"speedup": ratio, "speedup_pairs": summarize(pairs), "limit": limit, "limit_kind": limit_kind}
    if limit:
        out["of_limit"] = ratio / limit
    return out
