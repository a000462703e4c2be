"""Routers of moeify's MoE block: scores s(x) [T, N] over the routed experts.

The router kind and its shapes are part of the checkpoint format (config.json's
`router` dict: {"type": ..., ...}); the tensors are the block's `router.*` weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.dense import activation


class Router(nn.Module):
    """Base of the routers: forward(x [T, H]) -> scores [T, N] in float32.

    `fused_form()` tells the fast kernels (moeify.kernels) how to compute the scores inline
    instead of calling the module: None (call the module), or for the MLP-restricted router
    (n, normalize, absolute, proj^T or None, gate_up^T, combine^T) as float32 tensors. The
    kernels read only this, never the router's type.
    """

    def fused_form(self) -> tuple | None:
        return None


class StaticRouter(Router):
    """No router: every routed expert is always active (MLPMoE)."""

    def __init__(self, num_experts: int, hidden_size: int, spec: dict[str, Any], act: str):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.num_experts, dtype=torch.float32)


class LinearRouter(Router):
    """s(x) = W x, or W_up (W_down x) for a low-rank router of rank r."""

    def __init__(self, num_experts: int, hidden_size: int, spec: dict[str, Any], act: str):
        super().__init__()
        rank = spec.get("rank")
        if rank:
            self.proj = nn.Parameter(torch.zeros(int(rank), hidden_size))
            self.weight = nn.Parameter(torch.zeros(num_experts, int(rank)))
        else:
            self.proj = None
            self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.proj is not None:
            x = x @ self.proj.float().T
        return x @ self.weight.float().T


class AnalyticalRouter(Router):
    """CMoE's router: the MLP restricted to representative neurons.

    r(x) = act(G_rep x) * (U_rep x) in R^n; s(x) = C r(x) with C [N, n]. With one
    representative per expert C is the identity (the paper's router); several
    representatives per expert weighted by ||W_down[:, i]|| give a router that
    estimates each expert's output norm from a sample of its neurons.

    spec["rank"] = r: low-rank router; x is first projected to r dims (proj [r, H])
    and the router neurons read the projection (gate_up [2n, r]).
    """

    def __init__(self, num_experts: int, hidden_size: int, spec: dict[str, Any], act: str):
        super().__init__()
        n = int(spec.get("neurons", num_experts))
        rank = spec.get("rank")
        self.proj = nn.Parameter(torch.zeros(int(rank), hidden_size)) if rank else None
        self.gate_up = nn.Parameter(torch.zeros(2 * n, int(rank) if rank else hidden_size))
        self.combine = nn.Parameter(torch.zeros(num_experts, n))
        self.absolute = bool(spec.get("absolute", False))
        self.normalize = bool(spec.get("normalize", False))  # the reference code's unit-normalised input
        self.act_fn = activation(act)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.normalize:
            x = F.normalize(x, dim=-1)
        if self.proj is not None:
            x = x @ self.proj.float().T
        gu = x @ self.gate_up.float().T
        r = self.act_fn(gu[:, : self.n]) * gu[:, self.n :]
        if self.absolute:
            r = r.abs()
        return r @ self.combine.float().T

    def fused_form(self) -> tuple:
        f = lambda t: t.detach().float().t()  # noqa: E731  (a copy only for half-precision router weights, which are small)
        return (self.n, self.normalize, self.absolute, None if self.proj is None else f(self.proj), f(self.gate_up), f(self.combine))


class MLPRouter(Router):
    """MoEfication's learned router: Linear-Tanh-Linear, optionally through a rank-r projection."""

    def __init__(self, num_experts: int, hidden_size: int, spec: dict[str, Any], act: str):
        super().__init__()
        width = int(spec.get("hidden", 4 * num_experts))
        self.w1 = nn.Parameter(torch.zeros(width, hidden_size))
        self.b1 = nn.Parameter(torch.zeros(width))
        self.w2 = nn.Parameter(torch.zeros(num_experts, width))
        self.b2 = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.float() @ self.w1.float().T + self.b1.float()) @ self.w2.float().T + self.b2.float()


ROUTERS: dict[str, type[nn.Module]] = {
    "static": StaticRouter,
    "linear": LinearRouter,
    "analytical": AnalyticalRouter,
    "mlp": MLPRouter,
}
