"""What every benchmark JSON records about the run that wrote it: the command, the git commit, versions, model provenance.

Imported by the scripts in this folder (``python benchmarks/NAME.py`` puts the folder on ``sys.path``).
The README's numbers are checked against these JSONs by tests/test_readme_numbers.py.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip("\n")  # keep leading spaces: `git status --porcelain` lines start with a status column


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", None)


def _cpu() -> dict:
    """The CPU's name and the vector extensions that change which GEMM kernels run (and so the last digits)."""
    info = {"cpus": os.cpu_count(), "processor": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["isa"] = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"))
            break
    return info


def _weights_sha256(model) -> str | None:
    """sha256 of the default model's cached safetensors (the dequantised GGUF), so a re-pull that differs is visible."""
    from moeify.data.assets import default_model_dir, is_default_model

    if not is_default_model(model):
        return None
    files = sorted(default_model_dir().glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def run_info(model=None, **settings) -> dict:
    """The facts a result JSON carries next to its numbers (``settings``: the script's own options)."""
    import torch

    from moeify.data.assets import model_provenance

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "settings": settings,
        "git_commit": (_git("rev-parse", "HEAD") or "").strip() or None,
        # uncommitted changes to tracked files when the run started (other work in the tree); the commit that
        # adds this JSON is the one to check the numbers against
        "git_dirty_files": sorted(line[3:] for line in status.splitlines() if line.strip()) if status else [],
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {m: _version(m) for m in ("moeify", "torch", "transformers", "numpy", "scipy")}
        | {"python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "machine": {**_cpu(), "system": platform.system()},
        "model_provenance": model_provenance(model),
        "model_weights_sha256": _weights_sha256(model),
    }
