"""The compiled batch-1 decode step (moe_decode.c): one token through a whole MoE block in one call.

At batch 1 on a CPU every library call costs a fixed ~4 us (float32, MKL) to ~17 us
(bfloat16, oneDNN) on top of the bytes it reads (benchmarks/bf16_call_cost.py), and a block
run op by op (torch_backend.Decode) makes 5-8 of them where the dense MLP makes 3. The C
step routes, runs the shared expert and the selected experts, and adds the compensation in
one call, reading each active neuron's gate, up and down rows once (docs/protocol.md, "Speed").

The source is compiled once per machine with its C compiler (``$CC``, default ``cc``;
``-O3 -march=native -fopenmp``) into ``MOEIFY_HOME/kernels`` (a private temporary folder when
that is not writable), named by a hash of the source, the flags, the compiler and the CPU's
flags, written to a temporary file and renamed into place. Without a compiler, on another OS
or with ``MOEIFY_NATIVE=0`` the torch path runs instead (same results to float rounding).
Threads: torch's intra-op count (torch.get_num_threads()); the library uses the OpenMP runtime
torch has loaded (libgomp, the same soname), so the two share one thread pool.

Covers blocks with equal expert sizes (every CMoE, MoEfication and LLaMA-MoE-split layer) and
every gate rule (static scales, CMoE's fine-tuned 1 + softmax(s)·u, softmax) for float32 and
bfloat16 weights with silu, relu or gelu; the analytical router runs inside when it has no
normalisation or projection, any other router runs in torch and passes its selection in.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..core.files import atomic_write, moeify_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("moe_decode.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
ACTIVATIONS = {"silu": 0, "swish": 0, "relu": 1, "gelu_pytorch_tanh": 2, "gelu": 3}
_P = ctypes.c_void_p


class _Block(ctypes.Structure):
    """moe_decode.c's Block, field for field."""

    _fields_ = [(name, ctypes.c_int32) for name in ("bf16", "H", "act", "N", "k", "m", "S", "n", "absolute", "gate")] + [
        (name, _P) for name in ("shared_gu", "shared_down", "gate_up", "down", "scales", "router_gu", "combine",
                                "selection_bias", "gate_u", "bias", "bias_total")]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return sys.platform


def _build(cc: str) -> Path:
    """The compiled library for this machine: from the cache, or compiled now."""
    version = _compiler_version(cc)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:16]
    name = f"moe_decode-{key}.so"
    for folder in (moeify_home() / "kernels", None):
        if folder is not None and (folder / name).is_file():
            return folder / name
        try:
            folder = folder if folder is not None else Path(tempfile.mkdtemp(prefix="moeify-kernels-"))
            compile_ = lambda out: subprocess.run([cc, *FLAGS, "-o", str(out), str(SOURCE), "-lm"], capture_output=True,  # noqa: E731
                                                  text=True, check=True, timeout=300)
            return atomic_write(folder / name, compile_)
        except OSError as e:  # the cache is not writable: compile into a private temporary folder instead
            log.debug("cannot write the kernel cache %s: %s", folder, e)
    raise OSError("no writable folder for the compiled kernel")


@functools.cache
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded decode library, or None where it cannot be built (no compiler, not Linux; the reason is logged)."""
    cc = os.environ.get("CC", "cc")
    if not sys.platform.startswith("linux") or shutil.which(cc) is None:
        log.info("moeify's compiled decode step needs Linux and a C compiler (%s): using the torch path", cc)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("moeify could not compile its decode step with %s (%s); using the torch path", cc, str(detail)[-2000:])
        return None
    lib.moe_decode.argtypes = [ctypes.POINTER(_Block), _P, _P, _P, _P, ctypes.c_int]
    lib.moe_decode.restype = ctypes.c_int
    return lib


def describe() -> dict:
    """For result files: whether the compiled step is in use, and the compiler and library that made it."""
    cc = os.environ.get("CC", "cc")
    if not enabled():
        return {"compiled_decode": False, "why": "MOEIFY_NATIVE=0" if library() is not None else f"no working C compiler ({cc}) or not Linux"}
    return {"compiled_decode": True, "compiler": _compiler_version(cc).splitlines()[0], "flags": " ".join(FLAGS),
            "library": library()._name}


def enabled() -> bool:
    """Whether decode steps use the compiled library (``MOEIFY_NATIVE=0`` turns it off)."""
    return os.environ.get("MOEIFY_NATIVE", "1") != "0" and library() is not None


class NativeDecode:
    """One block's arguments for moe_decode, made once per prepared state (see common.Prepared).

    Holds the contiguous float32 router tensors it made and the views it points at, so that
    every pointer in the struct stays valid as long as this object lives.
    """

    def __init__(self, block, p, x: torch.Tensor):
        r, inline = p.router, p.plain_router
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        self.keep = [block.shared_gate_up, block.shared_down, block.gate_up, block.down]
        self.inline = inline
        self.H = block.hidden_size
        gate = 1 if block.gate_u is not None else 2 if getattr(block, "gate_mode", "unit") == "softmax" else 0  # as MoEMLP.route
        b = _Block(bf16=int(x.dtype == torch.bfloat16), H=block.hidden_size, act=ACTIVATIONS[block.act], N=block.num_experts,
                   k=block.top_k, m=p.experts[0][2], S=block.shared_size, n=r[0] if inline else 0, absolute=int(bool(inline and r[2])),
                   gate=gate)
        b.shared_gu, b.shared_down = block.shared_gate_up.data_ptr(), block.shared_down.data_ptr()
        b.gate_up, b.down = block.gate_up.data_ptr(), block.down.data_ptr()
        if not p.unit_scale:
            b.scales = self._own(f32(block.expert_scale))
        if inline:
            b.router_gu, b.combine = self._own(f32(r[4].t())), self._own(f32(r[5]))
            if p.has_selection_bias:
                b.selection_bias = self._own(p.selection_bias.contiguous())
            if gate == 1:
                b.gate_u = self._own(f32(block.gate_u))
        if p.bias is not None:
            b.bias, b.bias_total = self._own(f32(p.bias)), self._own(f32(p.bias_total))
        self.struct = b
        self.ref = ctypes.byref(b)
        self.fn = library().moe_decode

    def _own(self, t: torch.Tensor) -> int:
        self.keep.append(t)
        return t.data_ptr()

    @staticmethod
    def covers(block, p, x: torch.Tensor) -> bool:
        """Whether this block and input can take the compiled step (else the torch path runs)."""
        w = (block.shared_gate_up, block.shared_down, block.gate_up, block.down)
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and block.act in ACTIVATIONS
                and all(t.dtype == x.dtype and t.device.type == "cpu" and t.is_contiguous() for t in w) and enabled())

    def __call__(self, x: torch.Tensor, ids: torch.Tensor | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
        """The block's float32 output [1, H] for one token x [1, H]; when the router ran outside, ids: the k selected
        experts (int32, contiguous) and w: their weights (float32, contiguous; None: each expert's scale)."""
        x = x.contiguous()
        out = torch.empty(1, self.H)
        rc = self.fn(self.ref, x.data_ptr(), out.data_ptr(), None if ids is None else ids.data_ptr(),
                     None if w is None else w.data_ptr(), torch.get_num_threads())
        if rc:
            raise MemoryError("moeify's decode step could not allocate its accumulators")
        return out
