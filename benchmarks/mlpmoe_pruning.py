"""MLPMoE with a fraction of MLP parameters removed: Fractal Fade vs Compensated vs uniform.

Protocol austen-v1 (quick by default), fp32, dense scored in the same run on the
same windows. Reproduce:

    python benchmarks/mlpmoe_pruning.py --json benchmarks/results/mlpmoe_pruning.json
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
from runinfo import run_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--prune", type=float, default=0.2)
    ap.add_argument("--branches", type=int, default=10, help="10 so that compensated pruning can drop exactly 20%% (2 branches)")
    ap.add_argument("--modes", default="fractal-fade,compensated,uniform")
    ap.add_argument("--full", action="store_true", help="all held-out windows instead of quick")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info = run_info(args.model, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "model"})

    torch.manual_seed(0)
    dense, tok = moeify.load_model(args.model)
    windows = perplexity_windows(tok, source="austen", quick=not args.full)
    base = perplexity(dense, windows)
    rows = []
    for mode in args.modes.split(","):
        cfg = moeify.MLPMoEConfig(branches=args.branches, prune=args.prune, prune_mode=mode)
        t0 = time.perf_counter()
        conv = moeify.convert(copy.deepcopy(dense), cfg, progress=False)
        seconds = time.perf_counter() - t0
        r = perplexity(conv, windows)
        s = conv.config.moeify["summary"]
        rows.append({
            "mode": mode, "branches": args.branches, "prune": args.prune,
            "mlp_params_removed_fraction": s["mlp_params_removed_fraction"],
            "ppl": r["ppl"], "dense_ppl": base["ppl"], "ratio": r["ppl"] / base["ppl"], "convert_seconds": seconds,
        })
        print(f"{mode:14s} removed {s['mlp_params_removed_fraction']:.3f}  ppl {r['ppl']:.3f}  dense {base['ppl']:.3f}  ratio {r['ppl'] / base['ppl']:.4f}", flush=True)
        del conv
    result = {
        "protocol": f"austen-v1 {'full' if args.full else 'quick'}", "dtype": "float32",
        "windows": base["windows"], "tokens": base["tokens"], "model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dense_ppl": base["ppl"], "rows": rows, "moeify": moeify.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), **info,
    }
    print("\n| pruning (20 % of MLP params) | MLP params removed | austen-v1 ppl | dense ppl | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['mlp_params_removed_fraction']:.3f} | {r['ppl']:.2f} | {r['dense_ppl']:.2f} | {r['ratio']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
