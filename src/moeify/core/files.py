"""Writes that never leave a half-written output: a temporary path renamed into place.

Every file or folder moeify writes (checkpoints, JSON results, plots, reports, cached
assets) goes through here; an existing output is replaced only when the caller says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import InputError


def moeify_home() -> Path:
    """Root of moeify's cache (assets, compiled kernels): ``$MOEIFY_HOME``, default ``~/.cache/moeify``."""
    env = os.environ.get("MOEIFY_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moeify"


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


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, before_rename: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on a clean exit it replaces `target` by rename, on error it is removed.

    os.replace cannot overwrite a non-empty folder, so an existing target is first moved aside:
    it is briefly absent, never partial.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if before_rename is not None:
            before_rename(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_dir(out: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run write(tmp_dir), then rename tmp_dir into place; a failure leaves `out` untouched."""
    out = prepare_output(out, overwrite)
    with staged_dir(out) as tmp:
        write(tmp)
    return out


__all__ = ["atomic_dir", "atomic_write", "prepare_output", "staged_dir", "write_json", "write_text"]
