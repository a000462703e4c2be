"""Closed-form refit of a routed block on the tokens it will really see (docs/methods.md, "Refit").

A method plans a block from the dense MLP; the router then sends each token to the shared
expert and k routed experts only. Given those selections, the block's output is linear in its
output-side weights:

    F_moe(x) = h_s(x) D_s + sum_{e selected} g_e(x) h_e(x) D_e + sum_{e not selected} b_e

(h: the gated hidden activations of the shared expert and of expert e, g_e the gate weight,
D the down projections, b_e the compensation vectors of compensate=True blocks). With the
features F(x) = [h_s, g_e h_e masked to the selected experts, 1 - selected] and
W = [D_s; D; b], the routed block's error against the dense MLP's output Y on the calibration
tokens is a ridge least-squares problem in W, shrunk towards the weights the method planned:

    W(lam) = argmin ||F W - Y||^2 + lam ||W - W_0||^2 = (G + lam I)^-1 (F^T Y + lam W_0),  G = F^T F.

One eigendecomposition of G gives W(lam) for every lam on a grid; lam is chosen on held-out
tokens (the router-fidelity tokens; without them, the last eighth of the calibration tokens),
and lam = infinity (no change) competes, so a refit never makes the held-out error worse than
the plan's. The gate/up weights and the router stay as planned, so the selections the refit
assumed are the ones the block makes.
"""

from __future__ import annotations

import torch

from ..blocks.moe import MoEMLP
from ..core.dense import GatedWeights

# ridge strengths relative to the mean diagonal of G; inf = keep the planned weights
LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CHUNK = 4096


def refittable(block: MoEMLP) -> bool:
    """Any block with neurons (a block that lost nothing is its own solution: the refit leaves it as it is)."""
    return block.shared_size + block.routed_size > 0


@torch.no_grad()
def features(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """F(x) [T, S + R (+ N)] float32: shared hidden, routed hidden times gate weight on selected experts, (1 - selected)."""
    xf = x.float()
    parts = []
    if block.shared_size:
        gu = xf @ block.shared_gate_up.float().T
        s = block.shared_size
        parts.append(block.act_fn(gu[:, :s]) * gu[:, s:])
    if block.num_experts:
        gate_cols, up_cols, neuron_expert = block._cols(x.device)
        gu = xf @ block.gate_up.float().T
        if block.runs_all_experts():  # every expert on every token with its static scale
            weight = block.expert_scale.float().expand(x.shape[0], -1)
        else:
            _, idx, w = block.route(x)
            weight = torch.zeros(x.shape[0], block.num_experts, device=x.device).scatter_(1, idx, w.float())
        parts.append(block.act_fn(gu[:, gate_cols]) * gu[:, up_cols] * weight[:, neuron_expert])
        if block.dropped_bias is not None:
            unselected = torch.zeros_like(weight) if block.runs_all_experts() else 1.0 - torch.zeros_like(weight).scatter_(1, idx, 1.0)
            parts.append(unselected)
    return torch.cat(parts, dim=1)


def _weights(block: MoEMLP) -> torch.Tensor:
    """W_0 = [D_s; D; b] [S + R (+ N), H] float64, in the order of `features`."""
    parts = [block.shared_down, block.down] + ([block.dropped_bias] if block.dropped_bias is not None else [])
    return torch.cat([p.detach().double() for p in parts])


def _set_weights(block: MoEMLP, w: torch.Tensor) -> None:
    s, r = block.shared_size, block.routed_size
    block.shared_down.data = w[:s].to(block.shared_down.dtype).contiguous()
    block.down.data = w[s : s + r].to(block.down.dtype).contiguous()
    if block.dropped_bias is not None:
        block.dropped_bias.data = w[s + r :].to(block.dropped_bias.dtype).contiguous()


def _normal_equations(block: MoEMLP, x: torch.Tensor, dense: GatedWeights) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(G = F^T F, F^T Y, ||Y||^2): float32 products over token chunks, summed in float64."""
    d = block.shared_size + block.routed_size + (block.num_experts if block.dropped_bias is not None else 0)
    g = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    b = torch.zeros(d, block.hidden_size, dtype=torch.float64, device=x.device)
    yy = 0.0
    down = dense.down.float().T
    for xc in x.split(CHUNK):
        f = features(block, xc)
        y = dense.hidden(xc) @ down
        g += (f.T @ f).double()
        b += (f.T @ y).double()
        yy += float(y.double().square().sum())
    return g, b, yy


def _error(w: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor, float]) -> float:
    """||F W - Y|| / ||Y|| from the normal equations alone: ||FW - Y||^2 = tr(W^T G W) - 2 tr(W^T F^T Y) + ||Y||^2."""
    g, b, yy = stats
    sq = float(((g @ w) * w).sum() - 2.0 * (w * b).sum()) + yy
    return (max(sq, 0.0) / max(yy, 1e-300)) ** 0.5


def _ridge(stats, w0: torch.Tensor, lambdas) -> list[torch.Tensor]:
    """W(lam) = (G + lam s I)^-1 (F^T Y + lam s W_0) for each lam, s = mean eigenvalue of G; one eigendecomposition."""
    g, b, _ = stats
    evals, q = torch.linalg.eigh(g)
    evals = evals.clamp_min(0.0)
    scale = float(evals.mean()) or 1.0
    p, p0 = q.T @ b, q.T @ w0
    return [q @ ((p + lam * scale * p0) / (evals + lam * scale)[:, None]) for lam in lambdas]


@torch.no_grad()
def refit_block(block: MoEMLP, x: torch.Tensor, dense: GatedWeights, x_heldout: torch.Tensor | None) -> dict:
    """Refit the block's output-side weights in place (see the module docstring); returns what was done.

    x: calibration inputs [T, H]; dense: the MLP the block replaces; x_heldout: held-out inputs that
    choose lam (None: the last eighth of x chooses it, and the refit then uses all of x).
    """
    w0 = _weights(block)
    if x_heldout is None or x_heldout.shape[0] == 0:
        cut = x.shape[0] - max(1, x.shape[0] // 8)
        fit, choose = _normal_equations(block, x[:cut], dense), _normal_equations(block, x[cut:], dense)
        full = tuple(a + b for a, b in zip(fit, choose))
        chooser = "last eighth of the calibration tokens"
    else:
        fit = full = _normal_equations(block, x, dense)
        choose = _normal_equations(block, x_heldout, dense)
        chooser = "held-out tokens"
    cands = _ridge(fit, w0, LAMBDAS)
    errs = [_error(w, choose) for w in [w0, *cands]]
    best = min(range(len(errs)), key=errs.__getitem__)
    lam = None if best == 0 else LAMBDAS[best - 1]
    if lam is None:
        w = w0
    elif full is fit:
        w = cands[best - 1]
    else:  # chosen on a split of the calibration tokens: refit on all of them
        w = _ridge(full, w0, [lam])[0]
    _set_weights(block, w)
    return {"lambda": lam, "chosen_on": chooser, "calibration_error_before": _error(w0, full),
            "calibration_error_after": _error(_weights(block), full),
            "heldout_error_before": errs[0], "heldout_error_after": errs[best],
            "heldout_error_by_lambda": {str(k): e for k, e in zip(LAMBDAS, errs[1:])}}


__all__ = ["refit_block", "refittable", "features", "LAMBDAS"]
