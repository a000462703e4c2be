"""Why batch-1 bf16 decode of a converted model is slower than dense on CPU: the fixed cost of each matmul call.

Two measurements, both at batch 1 on this machine's default kernels (oneDNN for bf16, MKL for fp32):

1. Isolated calls, weights hot in cache: the time of one matmul-vector product of SmolLM2's MLP shapes
   (dense gate/up/down, and CMoE S3A3E8's expert runs of 1-3 experts of 192 neurons and its shared
   expert) in fp32 and in bf16, as the block runs them (up: mv on the row-major gate|up rows; down: mm
   of the activation row with the [m, H] rows).
2. In the model: `torch.profiler` over 32 greedy tokens of the dense model and of a converted checkpoint
   (bf16, prompt 128), the self time of every matmul call grouped by shape, and per decoder layer per
   token the MLP's matmul time (dense: gate, up, down; converted: router, shared expert, selected runs).

    python benchmarks/bf16_call_cost.py --checkpoint out/smollm2-cmoe-s3a3e8 \
        --json benchmarks/results/experiments/bf16_call_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import moeify
from runinfo import run_info

MATMULS = ("aten::mm", "aten::addmv", "aten::mv", "aten::addmm")


def _per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def isolated(hidden: int, sizes: dict[str, tuple[str, int]]) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (kind, n) in sizes.items():
            if kind == "up":  # n rows of [n, H], the activation vector
                w, x = torch.randn(n, hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
                out = torch.empty(n, dtype=dtype)
                us = _per_call_us(lambda: torch.mv(w, x, out=out))
            else:  # down: [1, n] @ [n, H]
                w, x = torch.randn(n, hidden, dtype=dtype), torch.randn(1, n, dtype=dtype)
                out = torch.empty(1, hidden, dtype=dtype)
                us = _per_call_us(lambda: torch.mm(x, w, out=out))
            rows.append({"dtype": str(dtype).replace("torch.", ""), "call": name, "weight_kib": round(w.numel() * w.element_size() / 1024),
                         "us_per_call": round(us, 1)})
    return rows


def in_model(model, tokens: int, prompt: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(100, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    calls = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in MATMULS]
    rows = [{"op": e.key, "shapes": [list(s) for s in e.input_shapes], "calls": e.count,
             "us_per_call": round(e.self_cpu_time_total / e.count, 1), "ms_total": round(e.self_cpu_time_total / 1e3, 1)} for e in calls]
    rows.sort(key=lambda r: -r["ms_total"])
    return {"matmuls": rows, "matmul_ms": round(sum(r["ms_total"] for r in rows), 1),
            "self_ms": round(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="out/smollm2-cmoe-s3a3e8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/experiments/bf16_call_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    info = run_info(None, **{k: str(v) for k, v in vars(args).items()})
    dense, _ = moeify.load_model(None, dtype="bfloat16")
    conv, _ = moeify.load(args.checkpoint, dtype="bfloat16")
    H, I = dense.config.hidden_size, dense.config.intermediate_size
    block = next(m for m in conv.modules() if isinstance(m, moeify.MoEMLP))
    m, S = block.expert_sizes[0], block.shared_size
    sizes = {"dense gate or up": ("up", I), "dense down": ("down", I), "shared gate|up": ("up", 2 * S), "shared down": ("down", S)}
    for r in (1, 2, 3):
        sizes[f"{r}-expert run gate|up"] = ("up", 2 * r * m)
        sizes[f"{r}-expert run down"] = ("down", r * m)
    result = {**info, "isolated": isolated(H, sizes)}
    for name, model in (("dense", dense), ("converted", conv)):
        result[name] = in_model(model, args.tokens, args.prompt)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["isolated"]:
        print(f"{r['dtype']:9s} {r['call']:24s} {r['weight_kib']:6d} KiB {r['us_per_call']:7.1f} us")
    for name in ("dense", "converted"):
        print(name, "matmul ms", result[name]["matmul_ms"], "of", result[name]["self_ms"])


if __name__ == "__main__":
    main()
