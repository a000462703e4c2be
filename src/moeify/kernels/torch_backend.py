"""The torch backend: only the selected experts run, straight from views of the packed weights.

Written for the CPU, where a host sync is free and, at batch 1, the time of a decode
step is the bytes of weights read plus the Python/dispatch cost of every small op.
So: the selected expert ids are read on the host, each selected expert is two
matmuls on contiguous slices of the packed weights (no weight copy, no gather of
weights), and everything that does not depend on the input (moeify.kernels.common:
per-expert weight views, compensation sums, whether gates are all 1) is prepared
once per block and reused until a parameter changes. It runs on any device; on CUDA
the Triton backend avoids the host sync.

Numerics follow MoEMLP.forward_reference: bf16/fp16 inputs are accumulated in
float32, router scores are float32; results agree with the reference to float
rounding (the summation order of the scatter differs).
"""

from __future__ import annotations

import torch

from .common import (
    Prepared,
    add_matmul_down,
    all_experts,
    matmul_down,
    new_accumulator,
    prepared,
    route,
)


def _one_token(block, x: torch.Tensor, p: Prepared, out: torch.Tensor, ids: list[int], w: torch.Tensor | None) -> None:
    """Decode: the selected experts' weight slices, nothing else (the compensation is already in `out`).

    With unit gates and equal expert sizes, selected experts that are neighbours in the
    packing (e, e+1, ...) are one contiguous block of rows, run as one matmul pair.
    """
    if w is None and p.equal:
        ids.sort()
        m = p.experts[0][2]
        i = 0
        while i < len(ids):
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1:
                j += 1
            if j - i == 1:
                gu_t, down, _ = p.experts[ids[i]]
                gu = torch.mm(x, gu_t)
                h = p.act(gu[:, :m]).mul_(gu[:, m:])
            else:
                gu_t, down = p.run(block, ids[i], j - i)
                g = torch.mm(x, gu_t).view(1, j - i, 2, m)
                h = p.act(g[:, :, 0]).mul_(g[:, :, 1]).view(1, -1)
            add_matmul_down(out, h, down)
            i = j
    else:
        if w is None:
            weights = [1.0] * len(ids)
        elif p.static_gates:
            weights = [p.scales[e] for e in ids]
        else:
            weights = w[0].tolist()
        for e, g in zip(ids, weights):
            gu_t, down_e, m = p.experts[e]
            gu = torch.mm(x, gu_t)
            h = p.act(gu[:, :m]).mul_(gu[:, m:])
            add_matmul_down(out, h, down_e, g)


# A few tokens (batched decode, speculative verification, short prompts): up to this many
# tokens, when the tokens' selections are expected to cover every expert (T * k >= N),
# the masked path below runs instead of grouping
MASKED_MAX_TOKENS = 16


def _use_masked(block, x: torch.Tensor, p: Prepared, w: torch.Tensor | None) -> bool:
    T = x.shape[0]
    # bf16/fp16 with non-unit gate weights keep the grouped path, which weights in float32
    return 1 < T <= MASKED_MAX_TOKENS and T * block.top_k >= block.num_experts and (w is None or x.dtype == p.acc)


def _masked(block, x: torch.Tensor, p: Prepared, out: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None) -> None:
    """A few tokens: all routed experts as one packed matmul pair, each token's unselected experts zeroed.

    When a handful of tokens together select (nearly) every expert, the layer reads (nearly)
    all routed weights either way and is bound by those bytes; one matmul pair then costs far
    less than a sort, a matmul pair per expert and a scatter. Same result as the grouped path:
    the activations of unselected experts are multiplied by 0, selected ones by their gate weight.
    """
    T, N = x.shape[0], block.num_experts
    sel = torch.zeros(T, N, dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0)
    gate = sel if w is None else torch.zeros(T, N, dtype=x.dtype, device=x.device).scatter_(1, idx, w.to(x.dtype))
    gu = torch.mm(x, p.gate_up_t)
    if p.equal:
        g = gu.view(T, N, 2, p.experts[0][2])
        h = p.act(g[:, :, 0]).mul_(g[:, :, 1]).mul_(gate[:, :, None]).view(T, block.routed_size)
    else:
        h = p.act(gu[:, p.gate_cols]).mul_(gu[:, p.up_cols]).mul_(gate[:, p.neuron_expert])
    add_matmul_down(out, h, p.down)
    if p.bias is not None:  # `out` holds every expert's compensation; the selected experts' come off
        out.sub_(torch.mm(sel.to(p.acc), p.bias))


def _grouped(block, x: torch.Tensor, p: Prepared, out: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None) -> None:
    """Prefill: tokens sorted by expert, one matmul pair per expert with tokens, one scatter."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=block.num_experts).tolist()  # the one host sync
    token = order // k if k > 1 else order
    xs = x.index_select(0, token)
    ys = torch.empty(T * k, block.hidden_size, dtype=x.dtype, device=x.device)
    pos = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        gu_t, down_e, m = p.experts[e]
        gu = torch.mm(xs[pos : pos + c], gu_t)
        h = p.act(gu[:, :m]).mul_(gu[:, m:])
        matmul_down(h, down_e, out=ys[pos : pos + c])
        pos += c
    ys = ys.to(p.acc)
    if w is not None:
        ys.mul_(w.reshape(-1)[order].to(p.acc)[:, None])
    if p.bias is not None:
        # compensation = sum of all dropped-expert biases (already in `out`) minus the selected
        # ones', taken off each expert's rows while they are hot instead of a [T, k, H] gather
        pos = 0
        for e, c in enumerate(counts):
            if c:
                ys[pos : pos + c].sub_(p.bias_rows[e])
                pos += c
    out.index_add_(0, token, ys)


def moe_forward(block, x: torch.Tensor) -> torch.Tensor:
    """MoEMLP on x [T, H] -> [T, H] in the accumulation dtype (float32 for half inputs).

    In-place updates: only for inference (moeify.kernels.select sends autograd to the reference).
    """
    p = prepared(block, x)
    T = x.shape[0]
    if T == 0:
        return x.new_zeros(0, block.hidden_size, dtype=p.acc)
    if not block.num_experts or block.runs_all_experts():
        out = new_accumulator(block, x, p)
        if block.num_experts:
            all_experts(block, x, p, out)
        return out
    idx, w = route(block, x, p)
    if T == 1:
        ids = idx.tolist()[0]  # the one host sync (free on a CPU)
        out = new_accumulator(block, x, p, p.bias_for(ids) if p.bias is not None else None)
        _one_token(block, x, p, out, ids, w)
    else:
        out = new_accumulator(block, x, p, p.bias_total if p.bias is not None else None)
        (_masked if _use_masked(block, x, p, w) else _grouped)(block, x, p, out, idx, w)
    return out
