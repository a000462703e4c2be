"""The torch backend: only the selected experts run, straight from views of the packed weights.

Written for the CPU, where a host sync is free and, at batch 1, the time of a decode
step is the bytes of weights read plus the Python/dispatch cost of every small op.
So: the selected expert ids are read on the host, each selected expert is two
matmuls on contiguous slices of the packed weights (no weight copy, no gather of
weights), and everything that does not depend on the input (moeify.kernels.common:
per-expert weight views, compensation sums, whether gates are all 1) is prepared
once per block and reused until a parameter changes. It runs on any device; on CUDA
the Triton backend avoids the host sync.

One token through a block with equal expert sizes takes the compiled step first
(native.NativeDecode: the whole block in one C call) wherever it could be built; `Decode`
below is its fallback, `_one_token` the path for unequal experts.

Numerics follow MoEMLP.forward_reference: bf16/fp16 inputs are accumulated in
float32, router scores are float32; results agree with the reference to float
rounding (the summation order of the scatter differs).
"""

from __future__ import annotations

import threading

import torch

from .common import (
    Prepared,
    add_matmul_down,
    all_experts,
    matmul_down,
    matmul_up,
    new_accumulator,
    prepared,
    route,
    router_scores,
)
from .native import NativeDecode


class Decode:
    """Batch-1 state of one block: the operations a decode step needs, on fixed buffers.

    At batch 1 a CPU decode step costs the bytes of weights it reads plus a fixed cost per
    operation and per line of Python (dispatch, a parallel region, caches gone cold while
    attention ran: ~10 us each inside a model, measured with docs/protocol.md's decode), so
    the step runs only what the maths needs: the router's matmul pair, one matmul per block
    of neighbouring selected experts (and per down projection), the activation and the
    product once for the shared expert and once for all selected experts together. The
    matmuls write into buffers whose views are made here, once, not per token; the buffers
    are per thread (a model may decode in several threads), and the block's output is a
    new tensor on every call. Half precision: routing in float32 as everywhere, gate|up and the
    down projections in the layouts common.matmul_up / matmul_down pick for this CPU (they differ
    between emulated and native bf16), the down projections added to the float32 output.

    Applies to blocks with equal expert sizes and static gates (CMoE, MoEfication, the
    LLaMA-MoE splits); other blocks take `_one_token`.
    """

    def __init__(self, block, p: Prepared, x: torch.Tensor):
        self.k, self.S, self.H = block.top_k, block.shared_size, block.hidden_size
        self.m = p.experts[0][2]
        self.half = x.dtype != p.acc
        # the analytical router inline (its matmuls write into the buffers), else the router's own module
        r = p.router
        self.router = r if p.plain_router else None
        self.n = r[0] if self.router is not None else 0
        self.router_t = (r[4], r[5]) if self.router is not None else None
        self.absolute = bool(r[2]) if self.router is not None else False
        self.scales = None if p.unit_scale else p.scales
        self._bufs: dict[int, tuple] = {}

    def buffers(self, x: torch.Tensor) -> tuple:
        """This thread's buffers and their views (see `_decode`)."""
        tid = threading.get_ident()
        b = self._bufs.get(tid)
        if b is None:
            S, k, m, n = self.S, self.k, self.m, self.n
            sgu = x.new_empty(1, 2 * S)
            egu = x.new_empty(1, k, 2, m)
            flat = egu.view(1, 2 * k * m)
            h = x.new_empty(1, k, m)
            hf = h.view(1, k * m)
            rgu = torch.empty(1, 2 * n, device=x.device)  # router: float32
            # run (i, j): the i-th .. (j-1)-th selected experts write gate|up into [2m*i, 2m*j) and
            # their products are [m*i, m*j)
            spans = [(i, j) for i in range(k) for j in range(i + 1, k + 1)]
            gu_run = {r: flat[:, 2 * m * r[0] : 2 * m * r[1]] for r in spans}
            h_run = {r: hf[:, m * r[0] : m * r[1]] for r in spans}
            b = (rgu, rgu[:, :n], rgu[:, n:], sgu, sgu[:, :S], sgu[:, S:], egu[:, :, 0], egu[:, :, 1], h, gu_run, h_run)
            if len(self._bufs) > 64:  # threads come and go (servers): keep the table bounded
                self._bufs.clear()
            self._bufs[tid] = b
        return b


def _decode(block, x: torch.Tensor, p: Prepared, d: Decode) -> torch.Tensor:
    """One token [1, H] through an equal-size, static-gate block -> [1, H] in the accumulation dtype."""
    rgu, rg, ru, sgu, sg, su, eg, eu, h, gu_run, h_run = d.buffers(x)
    # route: float32 scores, top-k on the device, the ids read once (the one host sync, free on a CPU)
    if d.router is not None:
        gu_t, combine_t = d.router_t
        torch.mm(x.float() if d.half else x, gu_t, out=rgu)
        r = p.act(rg).mul_(ru)
        scores = torch.mm(r.abs_() if d.absolute else r, combine_t)
    else:
        scores = router_scores(block, x, p)
    if p.has_selection_bias:
        scores = scores + p.selection_bias
    ids = scores.topk(d.k, dim=-1, sorted=False).indices.tolist()[0]
    ids.sort()
    bias = p.bias_for(ids) if p.bias is not None else None
    # shared expert, and the float output it starts
    if d.S:
        matmul_up(x, p.shared_gu_t, out=sgu)
        hs = p.act(sg).mul_(su)
        if d.half:  # the half-precision product, then the float32 output it starts
            out = matmul_down(hs, p.shared_down).to(p.acc)
            if bias is not None:
                out.add_(bias)
        else:
            out = torch.addmm(bias, hs, p.shared_down) if bias is not None else torch.mm(hs, p.shared_down)
    else:
        out = bias.unsqueeze(0).clone() if bias is not None else x.new_zeros(1, d.H, dtype=p.acc)
    # selected experts: neighbours in the packing (e, e+1, ...) are one block of rows
    runs = []
    k, i = d.k, 0
    while i < k:
        j = i + 1
        while j < k and ids[j] == ids[j - 1] + 1:
            j += 1
        gu_t, down = p.run(block, ids[i], j - i)
        matmul_up(x, gu_t, out=gu_run[(i, j)])
        runs.append((i, j, down))
        i = j
    torch.mul(p.act(eg), eu, out=h)
    for i, j, down in runs:
        if d.scales is None:
            add_matmul_down(out, h_run[(i, j)], down)
        else:  # static per-expert scales: one matmul per expert
            m = d.m
            for e in range(i, j):
                add_matmul_down(out, h_run[(e, e + 1)], down[(e - i) * m : (e - i + 1) * m], d.scales[ids[e]])
    return out


def _one_token(block, x: torch.Tensor, p: Prepared, out: torch.Tensor, ids: list[int], w: torch.Tensor | None) -> None:
    """Decode for blocks `_decode` does not cover (unequal experts, input-dependent gates): expert by expert."""
    if w is None:
        weights = [1.0] * len(ids)
    elif p.static_gates:
        weights = [p.scales[e] for e in ids]
    else:
        weights = w[0].tolist()
    for e, g in zip(ids, weights):
        gu_t, down_e, m = p.experts[e]
        gu = matmul_up(x, gu_t)
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
    if T == 1 and p.equal:
        n = p.native
        if n is None:
            n = p.native = NativeDecode(block, p, x) if NativeDecode.covers(block, p, x) else False
        if n:
            if n.inline:
                return n(x)
            idx, w = route(block, x, p)
            return n(x, idx[0].int(), None if w is None else w[0].float().contiguous())
    if T == 1 and p.equal and p.static_gates:
        d = p.decode
        if d is None:
            d = p.decode = Decode(block, p, x)
        return _decode(block, x, p, d)
    idx, w = route(block, x, p)
    if T == 1:
        ids = idx.tolist()[0]  # the one host sync (free on a CPU)
        out = new_accumulator(block, x, p, p.bias_for(ids) if p.bias is not None else None)
        _one_token(block, x, p, out, ids, w)
    else:
        out = new_accumulator(block, x, p, p.bias_total if p.bias is not None else None)
        (_masked if _use_masked(block, x, p, w) else _grouped)(block, x, p, out, idx, w)
    return out
