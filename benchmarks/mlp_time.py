"""Where batch-1 decode time goes: each decoder layer's MLP timed inside `generate`, dense against converted.

A wall-clock timer around every layer's MLP module (dense: LlamaMLP; converted: the MoE block) while the
model decodes greedily; the prompt's forward is timed in a run of its own and subtracted, so the numbers
are per decoded token: the whole step, the 30 MLPs together, and the rest (attention, norms, LM head,
sampling). The converted model runs with the compiled decode step and with the torch step
(`MOEIFY_NATIVE=0`, the blocks' prepared states dropped in between), all in one process, interleaved,
`--repeats` times; medians. Timers cost ~1 us per layer on both sides.

    python benchmarks/mlp_time.py out/smollm2-cmoe-s3a3e8 --json benchmarks/results/mlp_time_s3a3e8_float32.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import moeify
from moeify import kernels
from moeify.kernels.common import forget
from runinfo import run_info


def _timed(model) -> list[float]:
    """Wrap every decoder layer's MLP with a timer; returns the list the wrappers add seconds to."""
    spent = [0.0]
    for layer in model.model.layers:
        inner = layer.mlp.forward

        def forward(*a, _inner=inner, **kw):
            t = time.perf_counter()
            out = _inner(*a, **kw)
            spent[0] += time.perf_counter() - t
            return out

        layer.mlp.forward = forward
    return spent


def _per_token(model, spent, ids, tokens: int) -> dict[str, float]:
    def run(n):
        spent[0] = 0.0
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, spent[0]

    t1, m1 = run(1)  # the prompt's forward (and the first token)
    tn, mn = run(tokens + 1)
    step, mlp = (tn - t1) / tokens * 1e3, (mn - m1) / tokens * 1e3
    return {"step_ms": step, "mlp_ms": mlp, "rest_ms": step - mlp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    info = run_info(None, **{k: str(v) for k, v in vars(args).items()})
    dense, _ = moeify.load_model(None, dtype=args.dtype)
    conv, _ = moeify.load(args.checkpoint, dtype=args.dtype)
    spent = {"dense": _timed(dense), "converted": _timed(conv)}
    ids = torch.randint(100, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    runs: dict[str, list[dict]] = {"dense": [], "compiled step": [], "torch step": []}
    steps = {}
    with torch.no_grad():
        for name, model in (("dense", dense), ("converted", conv)):
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(args.repeats):
            runs["dense"].append(_per_token(dense, spent["dense"], ids, args.tokens))
            for step, native in (("compiled step", "1"), ("torch step", "0")):
                os.environ["MOEIFY_NATIVE"] = native
                forget(conv)
                conv.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                steps[step] = kernels.decode_steps(conv)
                runs[step].append(_per_token(conv, spent["converted"], ids, args.tokens))
    os.environ.pop("MOEIFY_NATIVE", None)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("step_ms", "mlp_ms", "rest_ms")} for k, v in runs.items()}
    result = {**info, "per_token_median": med, "runs": runs, "decode_steps": steps, "native": kernels.native.describe(),
              "mlp_ratio_to_dense": {k: med[k]["mlp_ms"] / med["dense"]["mlp_ms"] for k in ("compiled step", "torch step")}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in med.items():
        print(f"{k:14s} step {v['step_ms']:6.2f} ms/token, MLPs {v['mlp_ms']:6.2f}, rest {v['rest_ms']:6.2f}")


if __name__ == "__main__":
    main()
