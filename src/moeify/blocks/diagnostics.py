"""Router diagnostics shared by conversion reports and `moeify analyze`.

The oracle for a routed MoE block picks, per token, the k routed experts with
the largest true output norm ||E_j(x)||; a router is faithful when its top-k
matches the oracle's. Everything here is vectorised over tokens.
"""

from __future__ import annotations

import torch

from .moe import MoEMLP


def topk_overlap(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-token |a ∩ b| / k for two [T, k] index sets."""
    ma = torch.zeros(a.shape[0], num_experts, dtype=torch.bool, device=a.device).scatter_(1, a, True)
    mb = torch.zeros(b.shape[0], num_experts, dtype=torch.bool, device=b.device).scatter_(1, b, True)
    return (ma & mb).sum(-1).float() / a.shape[1]


@torch.no_grad()
def router_fidelity(block: MoEMLP, x: torch.Tensor, dense_out: torch.Tensor | None = None, chunk: int = 1024) -> dict[str, float]:
    """Router vs oracle on tokens x: top-k overlap, and relative MLP error with each.

    dense_out: F(x) of the dense MLP; if given, rel_error_router / rel_error_oracle are
    ||F - F_moe|| / ||F|| with the router's and the oracle's selection (unit gate weights
    times the expert scales, plus the block's dropped-expert compensation where it has one,
    as in its forward). Each expert runs once per token chunk; selections are masks over
    those outputs, so neither the oracle nor the errors need a second expert pass.
    """
    x = x.reshape(-1, block.hidden_size)
    if block.num_experts == 0 or block.all_active():
        return {"overlap": 1.0, "tokens": int(x.shape[0])}
    k, N = block.top_k, block.num_experts
    scale = block.expert_scale.float()
    bias = block.dropped_bias.float() if block.dropped_bias is not None else None
    overlap = 0.0
    sq = {"router": 0.0, "oracle": 0.0}
    ref = 0.0
    for t0 in range(0, x.shape[0], chunk):
        xc = x[t0 : t0 + chunk]
        outs = torch.stack([block.expert_forward(xc, e).float() for e in range(N)], 1)  # [t, N, H]
        oracle = outs.norm(dim=-1).topk(k, dim=-1).indices
        _, idx, _ = block.route(xc)
        overlap += float(topk_overlap(idx, oracle, N).sum())
        if dense_out is None:
            continue
        F = dense_out.reshape(-1, block.hidden_size)[t0 : t0 + chunk].float()
        ref += float((F * F).sum())
        shared = block._shared(xc).float() if block.shared_size else torch.zeros_like(F)
        for name, sel in (("router", idx), ("oracle", oracle)):
            keep = torch.zeros(sel.shape[0], N, device=x.device).scatter_(1, sel, 1.0)
            y = shared + torch.einsum("tn,tnh->th", keep * scale, outs)
            if bias is not None:
                y = y + (1.0 - keep) @ bias
            sq[name] += float(((F - y) ** 2).sum())
    res = {"overlap": overlap / x.shape[0], "tokens": int(x.shape[0])}
    if dense_out is not None:
        denom = max(ref, 1e-60) ** 0.5
        for name in sq:
            res[f"rel_error_{name}"] = sq[name] ** 0.5 / denom
    return res
