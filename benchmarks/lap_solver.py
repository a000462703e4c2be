"""The balanced assignment of CMoE's clustering: moeify's solver vs scipy's n x n linear_sum_assignment.

One assignment step at SmolLM2's routed sizes (intermediate 1536 split into 8 or 16 experts of equal size):
S3A3E8 960 neurons into 5 experts, S1A3E8 1344 into 7, S2A6E16 1344 into 14. The costs are squared L2
distances from random Gaussian feature rows (256 dims) to N of them (synthetic; the solver's work depends on
n and N, not on where the features come from). moeify's solver ("paths") is timed from nothing (a greedy
start, as in k-means' first iteration) and warm (started from the optimum of the same costs before a 2 %
perturbation, as k-means' later iterations start from the previous one). Every run must reach the same
optimal total cost as scipy; the time is the best of --repeats (wall clock, this machine). Reproduce:

    python benchmarks/lap_solver.py --json benchmarks/results/lap_solver.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from moeify.methods.common.clustering import balanced_assignment
from runinfo import run_info

CASES = {"S3A3E8": (960, 5), "S1A3E8": (1344, 7), "S2A6E16": (1344, 14)}


def _cost(n: int, N: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, 256))
    cent = feats[rng.choice(n, N, replace=False)]
    return ((feats[:, None, :] - cent[None, :, :]) ** 2).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info = run_info(None, repeats=args.repeats, seed=args.seed, features="Gaussian, 256 dims")
    rows = []
    for layout, (n, N) in CASES.items():
        cost = _cost(n, N, args.seed)
        sizes = [n // N] * N
        row = {"layout": layout, "neurons": n, "experts": N, "expert_size": n // N}
        before = cost * (1.0 + 0.02 * np.random.default_rng(args.seed + 1).standard_normal(cost.shape))
        start = balanced_assignment(before, sizes, "paths")
        for name, solver, warm in (("paths", "paths", None), ("paths_warm", "paths", start), ("scipy", "scipy", None)):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                assign = balanced_assignment(cost, sizes, solver, start=warm)
                times.append(time.perf_counter() - t0)
            assert np.bincount(assign, minlength=N).tolist() == sizes
            row[f"{name}_seconds"] = min(times)
            row[f"{name}_total_cost"] = float(cost[np.arange(n), assign].sum())
        row["moved_by_perturbation"] = int((start != balanced_assignment(cost, sizes, "paths")).sum())
        row["same_optimum"] = bool(all(np.isclose(row[f"{k}_total_cost"], row["scipy_total_cost"], rtol=1e-12, atol=1e-9)
                                       for k in ("paths", "paths_warm")))
        row["speedup"] = row["scipy_seconds"] / row["paths_seconds"]
        row["speedup_warm"] = row["scipy_seconds"] / row["paths_warm_seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"what": "one balanced assignment step (CMoE clustering)", "rows": rows, **info}, indent=2) + "\n")


if __name__ == "__main__":
    main()
