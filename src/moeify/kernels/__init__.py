"""Fast execution of moeify's MoE blocks.

Backends (the `kernel` of a MoEMLP; `None` picks one per call):

* ``"torch"`` (default on CPU, and on GPU without Triton): route, then run only the
  selected experts from views of the packed weights. One token (decode): the
  selected experts' slices directly, no sort, on fixed per-thread buffers so that
  a step runs only the matmuls, one activation and one product per group
  (torch_backend.Decode: at batch 1 each extra op costs about as much as the
  bytes an expert saves). Several tokens (prefill): tokens
  grouped by expert with one sort, one matmul pair per expert, one scatter.
* ``"triton"`` (default on CUDA when Triton is installed): grouped GEMM over
  expert-sorted tokens with the activation and the gate weight fused, fp32
  accumulation, no host synchronisation.
* ``"reference"``: MoEMLP.forward_reference, the readable definition the others
  are tested against (tokens grouped by expert; with 16 or more experts of which
  every token selects at least half, one masked matmul pair: MoEMLP.masks_experts).

While autograd records (training, fine-tuning the gates) the reference path runs:
the fast paths use in-place updates that autograd cannot differentiate through.

On the CPU one token (decode) through a block with equal expert sizes takes the compiled
step (`native`, moe_decode.c: router, shared and selected experts in one call) wherever a C
compiler is, else torch_backend.Decode; `MOEIFY_NATIVE=0` turns the compiled step off.

Modules: `common` (per-block prepared state, routing, accumulator: what both fast
backends share), `torch_backend`, `native` (the compiled decode step), `triton_moe`. This package imports only torch,
moeify.errors and moeify.core (it sits below the blocks it runs, which it reads through
their attributes and `Router.fused_form()`); Triton is imported when the Triton backend
is first used.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from . import native, torch_backend

BACKENDS = ("auto", "torch", "triton", "reference")

Kernel = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _reference(block, x: torch.Tensor) -> torch.Tensor:
    return block.forward_reference(x)


_torch = torch_backend.moe_forward


def _triton(block, x: torch.Tensor) -> torch.Tensor:
    from .triton_moe import moe_forward

    return moe_forward(block, x)


_KERNELS: dict[str, Kernel] = {"reference": _reference, "torch": _torch, "triton": _triton}
_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """Triton importable (it is an optional dependency: `pip install moeify[dev]` or `pip install triton`)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


def _needs_autograd(block, x: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in block.parameters())


def select(block, x: torch.Tensor) -> Kernel:
    """The kernel `block` runs on `x` when its `kernel` is None (auto). Runs on every call: cheapest checks first."""
    if _needs_autograd(block, x):
        return _reference
    forced = os.environ.get("MOEIFY_KERNEL")
    if forced and forced != "auto":
        return get(forced)
    if x.is_cuda and triton_available():
        return _triton
    return _torch


def get(name: str) -> Kernel:
    if name not in _KERNELS:
        raise InputError(f"unknown kernel backend {name!r}; use one of {', '.join(BACKENDS)}.")
    if name == "triton" and not triton_available():
        raise InputError("the triton backend needs Triton: `pip install triton` (a CUDA GPU, or TRITON_INTERPRET=1 on CPU for testing).")
    return _KERNELS[name]


def use(model: nn.Module, backend: str = "auto") -> int:
    """Set the expert-execution backend of every MoE block in `model` (every module with a
    `forward_reference`, the interface kernels run); returns how many blocks."""
    if backend not in BACKENDS:
        raise InputError(f"unknown kernel backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    kernel = None if backend == "auto" else get(backend)
    n = 0
    for m in model.modules():
        if callable(getattr(m, "forward_reference", None)):
            m.kernel = kernel
            n += 1
    return n


def decode_steps(model: nn.Module) -> dict[str, int]:
    """How many MoE blocks of `model` decoded one token with which step, from their prepared states (after a
    decode): "compiled" (native.NativeDecode), "torch" (torch_backend.Decode), "general" (the one-token path,
    another backend, or no single-token call yet)."""
    from .common import _PREPARED

    out: dict[str, int] = {}
    for m in model.modules():
        if callable(getattr(m, "forward_reference", None)):
            states = list(_PREPARED.get(m, {}).values())
            k = "compiled" if any(p.native for p in states) else "torch" if any(p.decode for p in states) else "general"
            out[k] = out.get(k, 0) + 1
    return out


__all__ = ["BACKENDS", "decode_steps", "get", "select", "triton_available", "use"]
