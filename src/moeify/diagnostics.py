"""Router diagnostics shared by conversion reports and `moeify analyze`.

The oracle for a routed MoE block picks, per token, the k routed experts with
the largest true output norm ||E_j(x)||; a router is faithful when its top-k
matches the oracle's. Everything here is vectorised over tokens.
"""

from __future__ import annotations

import torch

from .moe import MoEMLP


@torch.no_grad()
def expert_output_norms(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """||E_j(x)|| for every routed expert: [T, N] float32 (one matmul pair per expert)."""
    x = x.reshape(-1, block.hidden_size)
    norms = [block.expert_forward(x, e).float().norm(dim=-1) for e in range(block.num_experts)]
    return torch.stack(norms, dim=-1) if norms else x.new_zeros(x.shape[0], 0, dtype=torch.float32)


def topk_overlap(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-token |a ∩ b| / k for two [T, k] index sets."""
    ma = torch.zeros(a.shape[0], num_experts, dtype=torch.bool, device=a.device).scatter_(1, a, True)
    mb = torch.zeros(b.shape[0], num_experts, dtype=torch.bool, device=b.device).scatter_(1, b, True)
    return (ma & mb).sum(-1).float() / a.shape[1]


@torch.no_grad()
def router_fidelity(block: MoEMLP, x: torch.Tensor, dense_out: torch.Tensor | None = None) -> dict[str, float]:
    """Router vs oracle on tokens x: top-k overlap, and relative MLP error with each.

    dense_out: F(x) of the dense MLP; if given, rel_error_router / rel_error_oracle are
    ||F - F_moe|| / ||F|| with the router's and the oracle's selection (unit gate weights).
    """
    x = x.reshape(-1, block.hidden_size)
    if block.num_experts == 0 or block.all_active():
        return {"overlap": 1.0, "tokens": int(x.shape[0])}
    k = block.top_k
    norms = expert_output_norms(block, x)
    oracle = norms.topk(k, dim=-1).indices
    _, idx, _ = block.route(x)
    res = {"overlap": float(topk_overlap(idx, oracle, block.num_experts).mean()), "tokens": int(x.shape[0])}
    if dense_out is not None:
        F = dense_out.reshape(-1, block.hidden_size).float()
        denom = F.norm().clamp_min(1e-30)
        shared = block._shared(x).float() if block.shared_size else torch.zeros_like(F)
        for name, sel in (("router", idx), ("oracle", oracle)):
            y = shared.clone()
            ones = torch.ones(sel.shape, dtype=torch.float32, device=x.device)
            block._grouped_routed(x, sel, ones * block.expert_scale.float()[sel], y)
            res[f"rel_error_{name}"] = float((F - y).norm() / denom)
    return res
