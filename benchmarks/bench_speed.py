"""Speed of CMoE-converted SmolLM2 against the dense model, and of single MoE layers (protocol.md "Speed").

Every run is `moeify bench` in its own process (dense and converted interleaved inside
it), so the numbers here are exactly what a user gets from the command line. Results:
benchmarks/results/speed_*.json. Reproduce on a quiet machine (nothing else running):

    python benchmarks/bench_speed.py                 # CPU: models fp32 + bf16, SmolLM2-shaped layers
    python benchmarks/bench_speed.py --gpu           # + Llama-3-8B-shaped layers on CUDA (bf16, Triton)

The converted checkpoints are made first when missing (CMoE, default variant, seed 0):
out/smollm2-cmoe-s1a1e8 and out/smollm2-cmoe-s3a3e8.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MOEIFY = [sys.executable, "-c", "from moeify.cli import main; main()"]  # the console script, from this interpreter
LAYOUTS = ("S1A1E8", "S3A3E8")
GPU_TOKENS = ",".join(str(2**i) for i in range(14))  # 1 ... 8192


def run(args: list[str], dry: bool) -> None:
    print("+ moeify " + " ".join(shlex.quote(a) for a in args), flush=True)
    if not dry:
        subprocess.run(MOEIFY + args, check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out", help="where the converted checkpoints are (or are made)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repetitions, fp32")
    ap.add_argument("--bf16-repeats", type=int, default=3, help="interleaved repetitions, bf16 (slow on CPUs without bf16 units)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, recorded in the JSON)")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="also the Llama-3-8B-shaped layer benchmark on CUDA")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args()
    threads = ["--threads", str(a.threads)] if a.threads else []
    RESULTS.mkdir(parents=True, exist_ok=True)

    if not a.skip_models:
        for layout in LAYOUTS:
            ckpt = a.out / f"smollm2-cmoe-{layout.lower()}"
            if not (ckpt / "config.json").is_file():
                run(["convert", "--method", "cmoe", "--layout", layout, "-o", str(ckpt), "--no-eval"], a.dry_run)
        for dtype, repeats in (("float32", a.repeats), ("bfloat16", a.bf16_repeats)):
            if dtype == "bfloat16" and a.skip_bf16:
                continue
            for layout in LAYOUTS:
                ckpt = a.out / f"smollm2-cmoe-{layout.lower()}"
                js = RESULTS / f"speed_smollm2_{layout.lower()}_{dtype}.json"
                run(["bench", str(ckpt), "--dtype", dtype, "--repeats", str(repeats), *threads, "--json", str(js), "--overwrite"], a.dry_run)

    for layout in LAYOUTS:  # SmolLM2's MLP shape on this CPU
        js = RESULTS / f"speed_layer_cpu_576x1536_{layout.lower()}.json"
        run(["bench", "--layer", "--hidden", "576", "--intermediate", "1536", "--layout", layout, "--tokens", "1,16,256,2048",
             *threads, "--json", str(js), "--overwrite"], a.dry_run)

    if a.gpu:  # Llama-3-8B's MLP shape; S1A5E8 has the 75 % active fraction of CMoE's compute-bound 1.17x claim
        for layout in ("S3A3E8", "S1A1E8", "S1A5E8"):
            js = RESULTS / f"speed_layer_cuda_4096x14336_{layout.lower()}.json"
            run(["bench", "--layer", "--hidden", "4096", "--intermediate", "14336", "--layout", layout, "--tokens", GPU_TOKENS,
                 "--device", "cuda", "--dtype", "bfloat16", "--cuda-graphs", "--json", str(js), "--overwrite"], a.dry_run)


if __name__ == "__main__":
    main()
