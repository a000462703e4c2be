"""The typer app every command module adds its command to, and what they share: console, errors, JSON, environment.

Library code logs; only the cli package prints (rich tables).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dense LLM MLPs into Mixture-of-Experts layers, without training.")
console = Console()
err = Console(stderr=True, soft_wrap=True)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    logging.getLogger("moeify").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


def _write_json(path: Optional[Path], data: dict[str, Any]) -> None:
    from ..core.files import write_json

    if path is None:
        return
    write_json(path, data)
    console.print(f"results written to [bold]{path}[/bold]")


def _environment() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    from .._version import __version__

    return {
        "moeify": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git": _git_hash(),
    }


def _git_hash() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/bold red] {e}")
    raise typer.Exit(2)


