"""The `moeify` command line: one module per group of commands, all on the app in app.py."""

from __future__ import annotations

import sys

from . import analyze, bench, commands, compare, finetune  # noqa: F401  (each registers its commands on `app`)
from .app import app, err


def main() -> None:
    """Entry point: the app reports every error as one line (app.MoeifyGroup) and exits 0, 1 or 2."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


__all__ = ["app", "main"]
