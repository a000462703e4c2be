"""The dense gated MLP and its maths: F(x) = W_down (act(W_gate x) * (W_up x)).

Everything that reads a dense MLP (methods, blocks, analysis) computes h(x) here,
so there is one definition of the hidden activations and one accumulation rule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError


def activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise InputError(f"unknown activation {name!r}; known: {sorted(ACT2FN)}")
    return ACT2FN[name]


# In-place forms of the activations (the same kernels as transformers' modules, checked equal in tests/test_exactness.py)
IN_PLACE_ACTIVATIONS = {
    "silu": functools.partial(torch.nn.functional.silu, inplace=True),
    "swish": functools.partial(torch.nn.functional.silu, inplace=True),
    "relu": torch.nn.functional.relu_,
}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (sums of many products lose too much in 8 mantissa bits), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class GatedWeights:
    """A dense gated MLP: F(x) = down @ (act(gate @ x) * (up @ x))."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    act: str

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate.shape[1]

    def gate_and_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(act(W_gate x), h(x)) [T, I] float32 from one fused gate/up matmul."""
        d_h = self.intermediate_size
        gu = x.float() @ torch.cat([self.gate, self.up]).float().T
        g = activation(self.act)(gu[:, :d_h])
        return g, g * gu[:, d_h:]

    def hidden(self, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """h(x) [T, I] float32, over blocks of `chunk` tokens written into one output (no [T, 2I] gate/up
        product of all tokens at once, no transposed copy of the weights). The gate and up blocks go
        through two buffers reused from block to block: fresh ones would be fresh pages every time,
        since the streamed pipeline has blocks this large mapped anew by malloc."""
        gate, up = self.gate.float(), self.up.float()
        x = x.float()
        T = x.shape[0]
        h = x.new_empty(T, self.intermediate_size)
        act = activation(self.act)
        act_ = IN_PLACE_ACTIVATIONS.get(self.act)
        g, u = x.new_empty(2, min(chunk, T), self.intermediate_size)
        for a in range(0, T, chunk):
            xa = x[a : a + chunk]
            n = xa.shape[0]
            torch.mm(xa, gate.t(), out=g[:n])  # what linear(xa, gate) computes
            torch.mm(xa, up.t(), out=u[:n])
            torch.mul(act_(g[:n]) if act_ is not None else act(g[:n]), u[:n], out=h[a : a + n])
        return h

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) in x's dtype, unfused: the plain definition tests compare blocks with."""
        return (activation(self.act)(x @ self.gate.T) * (x @ self.up.T)) @ self.down.T


def check_finite(x: torch.Tensor, layer: int, what: str) -> None:
    """Refuse NaN/inf in calibration activations with a message that says what to try."""
    if not x.numel():
        return
    lo, hi = torch.aminmax(x)  # NaN propagates to both; one pass, no [T, H] mask of fresh pages
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise InputError(f"layer {layer}: the {what} contain NaN or inf on the calibration tokens; the model's weights or "
                         "the chosen dtype overflow (try --dtype float32, or check the checkpoint).")


def check_finite_output(y: torch.Tensor, layer: int) -> None:
    check_finite(y, layer, "MLP activations")
