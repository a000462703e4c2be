"""The typer app every command module adds its command to, and what they share: console, errors, JSON, environment.

Library code logs; only the cli package prints (rich tables).

Errors: every command checks its inputs before it loads a model. A bad input (``MoeifyError``, or a usage
error such as a missing option) is one line, ``error: ...``, exit code 2. An unexpected error is one line
naming the file that holds its full trace, exit code 1; ``moeify --debug COMMAND`` prints the trace inline.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer >= 0.2x ships its own copy of click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as _cx

_EXIT = tuple({typer.Exit, getattr(_cx, "Exit", typer.Exit)})
_ABORT = tuple({typer.Abort, getattr(_cx, "Abort", typer.Abort)})

console = Console()
err = Console(stderr=True, soft_wrap=True)

EXIT_INPUT = 2  # bad input: what to fix is in the one-line message
EXIT_INTERNAL = 1  # a bug or an environment problem: the trace is in a file (or inline with --debug)

_STATE: dict[str, Any] = {"debug": False}


def one_line(text: Any) -> str:
    """A message on one line: its lines joined, runs of blanks collapsed."""
    return " ".join(str(text).split())


def _error_line(text: str) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(one_line(text))}")


def trace_file(exc: BaseException) -> Path | None:
    """Write the full traceback of ``exc`` to MOEIFY_HOME/logs (or the temp folder); its path, None if nothing could be written."""
    import datetime
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"moeify-error-{stamp}-{os.getpid()}.txt"
    folders = []
    try:
        from ..data.assets import moeify_home

        folders.append(moeify_home() / "logs")
    except Exception:  # noqa: BLE001 - never fail while reporting a failure
        pass
    folders.append(Path(tempfile.gettempdir()))
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"moeify {' '.join(sys.argv[1:])}\n\n{text}", encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def report_exception(exc: BaseException) -> int:
    """Print ``exc`` as the CLI reports errors; returns the exit code."""
    from ..errors import MoeifyError

    if _STATE.get("debug"):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, MoeifyError):
        _error_line(str(exc))
        return EXIT_INPUT
    where = None if _STATE.get("debug") else trace_file(exc)
    msg = f"internal error: {type(exc).__name__}: {one_line(exc)}"[:600]
    if where is not None:
        msg += f" (full trace in {where}; `moeify --debug ...` shows it here)"
    _error_line(msg)
    return EXIT_INTERNAL


class MoeifyGroup(TyperGroup):
    """The app's click group: every error, from option parsing to the last line of a command, ends as one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        _STATE["debug"] = False
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except _cx.NoArgsIsHelpError as e:
            console.print(e.ctx.get_help() if e.ctx is not None else e.format_message(), markup=False, highlight=False)
            code = e.exit_code
        except _EXIT as e:
            code = e.exit_code
        except _cx.ClickException as e:
            where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) is not None else ""
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
            _error_line(f"{where}{e.format_message()}{hint}")
            code = e.exit_code
        except _ABORT:
            err.print("aborted")
            code = 130
        except KeyboardInterrupt:
            err.print("interrupted")
            code = 130
        except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
            code = report_exception(e)
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=MoeifyGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Dense LLM MLPs into Mixture-of-Experts layers, without training.")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    logging.getLogger("moeify").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
          debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the full trace here instead of to a file.")) -> None:
    _STATE["debug"] = debug
    _setup_logging(verbose)


# --------------------------------------------------------------------------- checks shared by the commands


def check_output_file(path: Optional[Path], what: str, *, overwrite: bool | None = None) -> None:
    """Before any work: ``path`` can be written (not a folder, its folder is a folder we may write to), and, when
    ``overwrite`` is False, does not exist yet. Writes nothing."""
    from ..errors import InputError

    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file path.")
    if overwrite is False and path.exists():
        raise InputError(f"{what} {path} already exists; choose another path or pass --overwrite to replace it.")
    _check_writable_parent(path, what)


def check_output_dir(path: Optional[Path], what: str, *, overwrite: bool) -> None:
    """Before any work: a folder output is absent, empty, or ``overwrite`` is set, and its parent can be written. Writes nothing."""
    from ..errors import InputError

    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"{what} {path} already exists; choose another path or pass --overwrite to replace it.")
    _check_writable_parent(path, what)


def _check_writable_parent(path: Path, what: str) -> None:
    from ..errors import InputError

    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: cannot write in {parent} (permission denied).")


def check_positive(value: Optional[int], what: str, *, minimum: int = 1) -> None:
    from ..errors import InputError

    if value is not None and value < minimum:
        raise InputError(f"{what} must be >= {minimum}, got {value}.")


def check_dtype(dtype: str) -> None:
    from ..errors import InputError
    from ..models.checkpoint import DTYPES

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: use one of float32, bfloat16, float16.")


def _write_json(path: Optional[Path], data: dict[str, Any]) -> None:
    from ..core.files import write_json

    if path is None:
        return
    write_json(path, data)
    console.print(f"results written to [bold]{escape(str(path))}[/bold]")


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
    """Report a bad input as one line and exit 2 (kept for commands that catch MoeifyError themselves)."""
    _error_line(str(e))
    raise typer.Exit(EXIT_INPUT)
