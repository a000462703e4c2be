"""Peak memory of loading and running a model, measured in a fresh child process.

CPU memory has no allocator statistics, and both models of a speed comparison share the
benchmark's process; a child's peak RSS is the honest number. `peak_memory_child` runs
`python -m moeify.bench --peak PATH ...` (moeify/bench/__main__.py -> `peak_main`), which
prints one JSON line.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import torch

from .. import kernels
from .._version import __version__
from ..core.process import peak_rss_mib, status_mib
from ..errors import InputError
from ..models.checkpoint import load_config, load_model
from .timing import WORKLOADS, bench_inputs, run_workload

# the child: `python -m <CHILD_MODULE> --peak PATH ...`
CHILD_MODULE = "moeify.bench"


def peak_memory_child(path: str, dtype: str, workloads: list[str], new_tokens: int, kernel: str = "auto", device: str = "cpu",
                      text: str = "austen") -> dict[str, Any]:
    """Peak resident memory of a fresh process that loads `path` and runs each workload once.

    The child prepares the inputs first, then restarts the kernel's peak counter (Linux
    clear_refs), so the peak covers loading the model and running it;
    `peak_mb_over_before_load` subtracts what the process held before (interpreter, torch, inputs).
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", CHILD_MODULE, "--peak", path, "--dtype", dtype, "--workloads", ",".join(workloads),
           "--new-tokens", str(new_tokens), "--kernel", kernel, "--device", device, "--text", text]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise InputError(f"the peak-memory run of {path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so earlier phases do not mask the model's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_main(argv: list[str]) -> None:
    """The child process: load the model, run the workloads, print the peak memory as one JSON line."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {CHILD_MODULE}", description="Peak memory of loading and running one model (moeify bench --memory).")
    ap.add_argument("--peak", required=True, metavar="PATH", help="checkpoint directory")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default="austen")
    a = ap.parse_args(argv)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.peak) if a.text == "austen" else None
    except (OSError, ValueError):
        pass
    # the inputs first: tokenizing the corpus has its own peak, which is not the model's
    inputs = bench_inputs(tok, int(load_config(a.peak).vocab_size), text=a.text)
    gc.collect()
    reset = _reset_peak_rss()
    before = status_mib("VmRSS")
    m, _ = load_model(a.peak, dtype=a.dtype, with_tokenizer=False)
    m.to(a.device).eval()
    kernels.use(m, a.kernel)
    loaded = status_mib("VmRSS")
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for wl in a.workloads.split(","):
        run_workload(m, wl, inputs, a.new_tokens)
    peak = status_mib("VmHWM") if reset else peak_rss_mib()
    res = {"peak_rss_mb": peak, "rss_before_load_mb": before, "loaded_rss_mb": loaded, "peak_mb_over_before_load": peak - before,
           "peak_counter_reset": reset, "moeify": __version__}
    if dev.type == "cuda":
        res["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    print(json.dumps(res))
