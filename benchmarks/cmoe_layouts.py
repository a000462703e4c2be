"""CMoE on SmolLM2 at the issue's layouts: moeify's CMoE vs the paper formulation vs static pruning.

Protocol austen-v1 (quick by default), fp32, calibration 8 x 2048 austen tokens (seed 0),
K_a = 10, dense scored in the same run on the same windows. Conversion time excludes
model loading. Reproduce:

    python benchmarks/cmoe_layouts.py --json benchmarks/results/cmoe_layouts.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import moeify
from moeify.data.texts import perplexity_windows
from moeify.eval.perplexity import perplexity
from moeify.methods.prune import PruneConfig
from runinfo import run_info

# NOT MEASURED HERE: numbers quoted from the issue that asked for CMoE, whose author ran the public CMoE
# code on this protocol (dense 29.92). No committed command reproduces them; they are written to the JSON
# under a key that says so, only so the README's comparison columns have a file to point at.
QUOTED_REFERENCE = {
    "source": "quoted from the issue (the public CMoE reference code run by the issue's author); not measured by moeify",
    "columns": ["ppl", "ratio", "convert_seconds"],
    "layouts": {"S3A3E8": [60.01, 2.006, 91.5], "S1A3E8": [216.39, 7.23, 86.6], "S2A6E16": [209.89, 7.02, 117.1]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layouts", default="S3A3E8,S1A3E8,S2A6E16")
    ap.add_argument("--runs", default="moeify,prune", help="comma list of: moeify, paper, reference, prune")
    ap.add_argument("--paper-layouts", default="S3A3E8", help="layouts at which the 'paper' run is made (it is slow to evaluate)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--windows", type=int, default=None, help="evaluate on the first N held-out windows only (exploration)")
    ap.add_argument("--cmoe-opts", default="{}", help='extra CMoEConfig options as JSON, e.g. \'{"router_neurons": 24}\'')
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info = run_info(args.model, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "model"})

    dense, tok = moeify.load_model(args.model)
    cal = moeify.Calibration(source="austen", samples=8, seq_len=2048, seed=0)
    cal.validate(tok)
    windows = perplexity_windows(tok, source="austen", quick=not args.full)
    if args.windows:
        windows = windows[: args.windows]
    base = perplexity(dense, windows, progress=False)
    print(f"dense ppl {base['ppl']:.3f} on {base['windows']} windows", flush=True)
    rows = []
    runs = args.runs.split(",")
    for layout in args.layouts.split(","):
        for run in runs:
            if run == "paper" and layout not in args.paper_layouts.split(","):
                continue
            cfg = PruneConfig(layout=layout) if run == "prune" else moeify.CMoEConfig(layout=layout, variant=run, **json.loads(args.cmoe_opts))
            t0 = time.perf_counter()
            conv = moeify.convert(copy.deepcopy(dense), cfg, calibration=cal, tokenizer=tok, progress=False)
            seconds = time.perf_counter() - t0
            r = perplexity(conv, windows, progress=False)
            s = conv.config.moeify["summary"]
            row = {
                "layout": layout, "run": run, "method": cfg.method, "config": cfg.to_dict()["_data"],
                "active_mlp_fraction": s["active_mlp_fraction"], "ppl": r["ppl"], "dense_ppl": base["ppl"],
                "ratio": r["ppl"] / base["ppl"], "convert_seconds": seconds,
                "router_fidelity": s.get("router_fidelity"), "router_fidelity_per_layer": [
                    lay.get("router_fidelity", {}).get("overlap") for lay in s.get("per_layer", [])],
                "calibration_error": s.get("calibration_error"),
                "heldout_rel_error_router": s.get("heldout_rel_error_router"),
                "heldout_rel_error_oracle": s.get("heldout_rel_error_oracle"),
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("config", "router_fidelity_per_layer")}), flush=True)
            del conv
    result = {"protocol": f"austen-v1 {'full' if args.full else 'quick'}" + (f" (first {args.windows} windows)" if args.windows else ""),
              "dtype": "float32", "calibration": "austen 8 x 2048, seed 0, K_a 10", "windows": base["windows"],
              "tokens": base["tokens"], "dense_ppl": base["ppl"], "rows": rows, "quoted_reference_not_measured": QUOTED_REFERENCE,
              "moeify": moeify.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(), **info}
    print("\n| layout | active MLP | run | ppl | ratio | router fidelity | convert s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        fid = f"{r['router_fidelity']:.3f}" if r["router_fidelity"] is not None else "–"
        print(f"| {r['layout']} | {r['active_mlp_fraction']:.0%} | {r['run']} | {r['ppl']:.2f} | {r['ratio']:.3f} | {fid} | {r['convert_seconds']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
