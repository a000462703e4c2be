"""Seconds per fine-tuning step of a converted checkpoint, its MoE blocks' routed experts grouped vs masked.

Under autograd the MoE blocks run MoEMLP.forward_reference: tokens grouped by expert (one matmul pair, a gather
and a scatter per expert), or, for blocks of 16 or more experts of which every token selects at least half
(MoEMLP.masks_experts; MoEfication at 50 %), all routed experts as one masked matmul pair. This script times the
same distillation steps (`moeify finetune` settings: 4 windows x 512 tokens per step, LoRA, u, b, distill 1, the
dense teacher run beside) with the grouped path forced on every block, then with the default choice, in one
process on the same windows; the time between the starts of steps 2 to N (the first is a warm-up).

    python benchmarks/finetune_step.py out/recovery/moefication-0.5-refit --json benchmarks/results/finetune_step_moefication.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import moeify
from moeify.blocks.moe import MoEMLP
from runinfo import run_info


def _seconds_per_step(checkpoint: str, steps: int) -> tuple[float, float]:
    """(mean seconds of steps 2..steps-1, seconds of the first step) of a distillation run of `steps` steps: the
    time between the starts of consecutive steps (forward passes, backward, optimizer, bias rule)."""
    starts = []
    orig = moeify.finetuning._step_loss

    def timed(*a, **k):
        starts.append(time.perf_counter())
        return orig(*a, **k)

    moeify.finetuning._step_loss = timed
    try:
        moeify.finetune(checkpoint, moeify.FinetuneConfig(samples=4 * steps, steps=steps, distill=1.0, evaluate=False),
                        progress=False)
    finally:
        moeify.finetuning._step_loss = orig
    return (starts[-1] - starts[1]) / (len(starts) - 2), starts[1] - starts[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=6, help="steps per path (the first and the last are not counted)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    info = run_info(None, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    default = MoEMLP.masks_experts
    model, _ = moeify.load(args.checkpoint)
    blocks = [m for m in model.modules() if isinstance(m, MoEMLP)]
    x = torch.zeros(1, blocks[0].hidden_size)
    masked_blocks = sum(b.masks_experts(x) for b in blocks)
    del model
    result = {**info, "checkpoint": args.checkpoint, "blocks": len(blocks), "masked_blocks": masked_blocks,
              "tokens_per_step": (c := moeify.FinetuneConfig()).batch_size * c.seq_len, "paths": {}}
    MoEMLP.masks_experts = lambda self, x: False
    try:
        grouped = _seconds_per_step(args.checkpoint, args.steps)
    finally:
        MoEMLP.masks_experts = default
    result["paths"]["grouped"] = {"seconds_per_step": grouped[0], "first_step_seconds": grouped[1]}
    masked = _seconds_per_step(args.checkpoint, args.steps)
    result["paths"]["default"] = {"seconds_per_step": masked[0], "first_step_seconds": masked[1]}
    result["speedup"] = grouped[0] / masked[0]
    print(json.dumps(result["paths"]), f"speed-up {result['speedup']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
