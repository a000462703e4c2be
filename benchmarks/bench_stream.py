"""A 1.5B model converted layer by layer on this machine: memory, time, perplexity and zero-shot, dense in the same run.

Model: Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536, intermediate 8960, untied head, 1.78 B
parameters, 7.1 GB in fp32), the Q4_K_M GGUF of `moeify pull qwen2.5-coder-1.5b` (dequantised to fp32 as it
is read). Each conversion runs as its own `moeify convert` process (streaming, --no-eval) under
`/usr/bin/time -v`, whose "Maximum resident set size" is the peak memory reported; the convert JSON gives
the per-stage times (calibration forward, method, held-out report, reading, writing).

Then, in this process: austen-v1 perplexity on the first --windows of the 16 quick windows (2048 tokens each) and
lm-eval zero-shot (ARC-Easy, PIQA; --limit documents each), dense and every converted checkpoint on the same
data. Every finished step is written to the JSON at once; a rerun resumes.

    python benchmarks/bench_stream.py --json benchmarks/results/stream_qwen_coder_1p5b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import moeify
from moeify.core.files import write_json
from moeify.data.texts import perplexity_windows
from moeify.eval.perplexity import perplexity
from runinfo import run_info

MODEL = "qwen2.5-coder-1.5b"
CONVERSIONS = {  # name: moeify convert options
    "cmoe-s3a3e8": ["--method", "cmoe", "--opt", "layout=S3A3E8", "--opt", "router_neurons=24"],
    "cmoe-s1a3e8": ["--method", "cmoe", "--opt", "layout=S1A3E8", "--opt", "router_neurons=24"],
    "moefication-0.5": ["--method", "moefication", "--opt", "experts=32", "--opt", "fraction=0.5"],
}


def _moeify_cli() -> str:
    exe = Path(sys.executable).parent / "moeify"
    return str(exe) if exe.exists() else shutil.which("moeify") or "moeify"


def convert(name: str, opts: list[str], args, out: Path) -> dict:
    report = out / f"{name}.convert.json"
    cmd = ["/usr/bin/time", "-v", _moeify_cli(), "convert", MODEL, *opts, "--samples", str(args.samples), "--seq-len", "2048",
           "-o", str(out / name), "--no-eval", "--overwrite", "--json", str(report)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: moeify convert failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    r = json.loads(report.read_text())
    s = r["summary"]
    stages = {**s.get("stage_seconds", {}), **s["streaming"].get("stage_seconds", {})}
    return {
        "command": "moeify convert " + " ".join([MODEL, *opts, "--samples", str(args.samples), "--seq-len", "2048", "-o", f"out/{name}", "--no-eval"]),
        "peak_rss_bytes": peak_kb * 1024, "peak_rss_gb": round(peak_kb * 1024 / 1e9, 3), "wall_seconds": round(wall, 1),
        "conversion_seconds": round(s["seconds"], 1), "stage_seconds": stages,
        "forward_share": round(stages.get("forward", 0.0) / s["seconds"], 3),
        "active_mlp_fraction": s["active_mlp_fraction"], "parameters": r["parameters"],
        "calibration": s.get("calibration"), "estimate_mib": s["streaming"]["estimate_mib"],
        "weights_fp32_bytes": r["parameters"]["dense"] * 4, "output_bytes": s["streaming"]["output_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversions", default=",".join(CONVERSIONS))
    ap.add_argument("--redo", default="", help="conversions to run again (their checkpoints are deterministic: scores stay valid)")
    ap.add_argument("--samples", type=int, default=2, help="calibration windows of 2048 tokens")
    ap.add_argument("--windows", type=int, default=4, help="austen-v1 quick windows scored")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("out/stream"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/stream_qwen_coder_1p5b.json"))
    args = ap.parse_args()
    names = [n for n in args.conversions.split(",") if n]
    args.out.mkdir(parents=True, exist_ok=True)
    res = json.loads(args.json.read_text()) if args.json.is_file() else {}
    res.setdefault("run", run_info(MODEL, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}))
    res.setdefault("model", {"name": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "weights": "Q4_K_M GGUF (moeify pull qwen2.5-coder-1.5b), dequantised to fp32"})
    res.setdefault("conversions", {})
    res.setdefault("invocations", []).append(run_info(MODEL, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}))
    save = lambda: write_json(args.json, res)  # noqa: E731

    for name in [n for n in args.redo.split(",") if n]:
        res["conversions"].pop(name, None)
    for name in names:
        if name not in res["conversions"]:
            print(f"converting {name} ...", flush=True)
            res["conversions"][name] = convert(name, CONVERSIONS[name], args, args.out)
            save()
        c = res["conversions"][name]
        print(f"{name}: peak {c['peak_rss_gb']} GB, {c['conversion_seconds']} s (forward {c['forward_share']:.0%})", flush=True)

    # quality: dense and each conversion on the same windows and documents (only what is not scored yet is loaded)
    from moeify.models.checkpoint import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(MODEL))
    windows = perplexity_windows(tok, "austen", quick=True)[: args.windows]
    res["ppl_protocol"] = f"austen-v1, first {windows.shape[0]} of the 16 quick windows ({windows.shape[1]} tokens each), fp32"
    tasks = [t for t in args.tasks.split(",") if t]
    res["zero_shot_protocol"] = f"lm-eval 0-shot, {', '.join(tasks)}, first {args.limit} documents each, fp32"
    res.setdefault("ppl", {})
    res.setdefault("zero_shot", {})

    def score(label: str, model) -> None:
        if label not in res["ppl"]:
            res["ppl"][label] = perplexity(model, windows)["ppl"]
            save()
        if label not in res["zero_shot"] and tasks:
            from moeify.eval.zero_shot import compare_zero_shot

            z = compare_zero_shot(model, None, tok, tasks, limits={t: args.limit for t in tasks}, batch_size=16)
            res["zero_shot"][label] = {t: e["metrics"]["acc"]["model"] for t, e in z["tasks"].items()}
            save()
        print(label, "ppl", round(res["ppl"][label], 3), "zero-shot", res["zero_shot"].get(label), flush=True)

    for label in ["dense", *names]:
        if label in res["ppl"] and (label in res["zero_shot"] or not tasks):
            continue
        model, _ = moeify.load_model(MODEL if label == "dense" else str(args.out / label), with_tokenizer=False)
        score(label, model)
        del model
        gc.collect()
    d = res["ppl"]["dense"]
    res["ratios"] = {n: v / d for n, v in res["ppl"].items() if n != "dense"}
    zd = res["zero_shot"].get("dense", {})
    res["zero_shot_recovery"] = {n: {t: z[t] / zd[t] for t in zd} for n, z in res["zero_shot"].items() if n != "dense"}
    save()
    print(json.dumps({"ratios": res["ratios"], "zero_shot_recovery": res["zero_shot_recovery"]}, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
