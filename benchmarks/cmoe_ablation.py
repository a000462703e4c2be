"""Each CMoE change measured on its own at one layout (default S3A3E8).

Protocol austen-v1 quick, first N held-out windows (default 4, for speed; label it),
fp32, calibration 8 x 2048 Austen tokens, seed 0, K_a = 10, dense in the same run.
Reproduce:

    python benchmarks/cmoe_ablation.py --json benchmarks/results/cmoe_ablation_s3a3e8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import moeify
from moeify.data.texts import perplexity_windows
from moeify.eval.perplexity import perplexity
from runinfo import run_info

RUNS = {
    "paper": {"variant": "paper"},
    "reference": {"variant": "reference"},
    "paper + shared by contribution": {"variant": "paper", "shared_by": "contribution"},
    "paper + contribution clustering": {"variant": "paper", "features": "contribution"},
    "paper + fitted router": {"variant": "paper", "router": "fitted", "absolute": True},
    "paper + compensation": {"variant": "paper", "compensate": True},
    "contribution clustering + fitted router": {"variant": "moeify", "compensate": False},
    "moeify (clustering + fitted router + compensation)": {"variant": "moeify"},
    "moeify with shared by contribution": {"variant": "moeify", "shared_by": "contribution"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="S3A3E8")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma list of run names")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info = run_info(None, layout=args.layout, windows=args.windows, runs=args.runs.split(","))
    dense, tok = moeify.load_model()
    cal = moeify.Calibration(source="austen", samples=8, seq_len=2048, seed=0)
    cal.validate(tok)
    windows = perplexity_windows(tok, "austen", quick=True)[: args.windows]
    dense_eval = perplexity(dense, windows, progress=False)
    base = dense_eval["ppl"]
    print(f"dense ppl {base:.3f} on {len(windows)} windows", flush=True)
    rows = []
    for name in args.runs.split(","):
        cfg = moeify.CMoEConfig(layout=args.layout, **RUNS[name])
        t0 = time.perf_counter()
        conv = moeify.convert(copy.deepcopy(dense), cfg, calibration=cal, tokenizer=tok, progress=False)
        seconds = time.perf_counter() - t0
        s = conv.config.moeify["summary"]
        ppl = perplexity(conv, windows, progress=False)["ppl"]
        row = {"run": name, "config": cfg.to_dict()["_data"], "ppl": ppl, "dense_ppl": base, "ratio": ppl / base,
               "router_fidelity": s.get("router_fidelity"), "calibration_error": s.get("calibration_error"),
               "heldout_rel_error_router": s.get("heldout_rel_error_router"),
               "heldout_rel_error_oracle": s.get("heldout_rel_error_oracle"), "convert_seconds": seconds}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        del conv
        if args.json:  # written after every run, so a long ablation can be read (and resumed by hand) while it runs
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "protocol": f"austen-v1 quick, first {len(windows)} windows", "dtype": "float32",
                "layout": args.layout, "calibration": "austen 8 x 2048, seed 0, K_a 10",
                "windows": dense_eval["windows"], "tokens": dense_eval["tokens"],
                "dense_ppl": base, "rows": rows, "complete": len(rows) == len(args.runs.split(",")), **info,
            }, indent=2) + "\n")


if __name__ == "__main__":
    main()
