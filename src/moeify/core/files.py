"""Writes that never leave a half-written output: a temporary path renamed into place.

Every file or folder moeify writes (checkpoints, JSON results, plots, reports, cached
assets) goes through here; an existing output is replaced only when the caller says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError


def prepare_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Check the output path up front, before any expensive work."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"output {out} already exists; choose another path or pass --overwrite (overwrite=True) to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_file) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_dir(out: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run write(tmp_dir), then rename tmp_dir into place; a failure leaves `out` untouched."""
    out = prepare_output(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["atomic_dir", "atomic_write", "prepare_output", "write_json", "write_text"]
