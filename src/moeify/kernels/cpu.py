"""The torch backend: only the selected experts run, straight from views of the packed weights.

Written for the CPU, where a host sync is free and, at batch 1, the time of a decode
step is the bytes of weights read plus the Python/dispatch cost of every small op.
So: the selected expert ids are read on the host, each selected expert is two
matmuls on contiguous slices of the packed weights (no weight copy, no gather of
weights), and everything that does not depend on the input (per-expert weight
views, compensation sums, whether gates are all 1) is prepared once per block
and reused until a parameter changes. It runs on any device; on CUDA the Triton
backend avoids the host sync.

Numerics follow MoEMLP.forward_reference: bf16/fp16 inputs are accumulated in
float32, router scores are float32; results agree with the reference to float
rounding (the summation order of the scatter differs).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from ..core.dense import accumulation_dtype

# Functional forms of transformers' activation modules: calling an nn.Module costs
# more dispatch than the op itself at batch 1 (checked equal in tests/test_kernels.py).
_FUNCTIONAL = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def activation_fn(block):
    return _FUNCTIONAL.get(block.act, block.act_fn)


# Router spec keys the inlined computation below covers (a router with other settings is called as a module).
_INLINE_ROUTER_KEYS = {"type", "neurons", "absolute", "normalize", "rank"}


def _fused_router(block) -> tuple | None:
    """The router's inline form (see blocks/routers.py Router.fused_form), or None to call the router module."""
    spec = block.layer_config.get("router") or {}
    return block.router.fused_form() if set(spec) <= _INLINE_ROUTER_KEYS else None


def _state_key(block, x: torch.Tensor) -> tuple:
    """Identity and in-place version of every tensor Prepared reads: any update makes a new entry."""
    key = [x.device, x.dtype, block.router]
    for t in block._parameters.values():
        key.append(None if t is None else (t.data_ptr(), t._version))
    for t in block.router._parameters.values():
        key.append(None if t is None else (t.data_ptr(), t._version))
    key.append((block.selection_bias.data_ptr(), block.selection_bias._version))
    return tuple(key)


class Prepared:
    """Everything about a block that does not depend on the input, for one device and dtype."""

    def __init__(self, block, x: torch.Tensor):
        acc = accumulation_dtype(x.dtype)
        self.acc = acc
        self.act = activation_fn(block)
        gu, down = block.gate_up.detach(), block.down.detach()
        # W_gate and W_up stay one matmul (then two slices): at batch 1 the matrix-vector kernel
        # streams ~12 % faster from 2m rows than from two matrices of m rows (SmolLM2 sizes)
        self.shared_gu_t = block.shared_gate_up.detach().t()
        self.shared_down = block.shared_down.detach()
        self.gate_up_t = gu.t()
        self.down = down
        off = block.offsets
        # (W_gate|W_up of expert e transposed, W_down rows of e, size): views into the packed weights
        self.experts = [(gu[2 * off[e] : 2 * off[e + 1]].t(), down[off[e] : off[e + 1]], off[e + 1] - off[e]) for e in range(block.num_experts)]

        sizes = block.expert_sizes
        self.equal = bool(sizes) and all(m == sizes[0] for m in sizes)
        scale = block.expert_scale.detach().float()
        self.scales = scale.tolist()
        self.unit_scale = bool((scale == 1).all()) if sizes else True
        # gate weight = alpha_e alone; other gate rules (CMoE's g = 1 + softmax*u, softmax gates) come from block.route
        self.static_gates = block.gate_u is None and getattr(block, "gate_mode", "unit") == "unit"
        self.unit = self.unit_scale and self.static_gates
        gate_cols, up_cols, neuron_expert = block._cols(x.device)
        self.gate_cols, self.up_cols, self.neuron_expert = gate_cols, up_cols, neuron_expert
        self.neuron_scale = None if self.unit_scale else scale[neuron_expert].to(x.dtype)
        self.expert_scale_dense = None if self.unit_scale or not self.equal else scale.to(x.dtype)[:, None]
        self.router = None
        if block.num_experts:
            self.router = _fused_router(block)
        self.has_selection_bias = bool(block.selection_bias.any())
        self.selection_bias = block.selection_bias.detach().float()
        self.bias = None
        if block.dropped_bias is not None:
            b = block.dropped_bias.detach().to(acc)
            self.bias = b
            self.bias_rows = list(b.unbind(0))
            self.bias_total = b.sum(0)
            # the whole correction for one token is one vector per set of selected experts
            self.bias_for_set: dict[tuple[int, ...], torch.Tensor] = {}
        self.runs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def run(self, block, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts first .. first+count-1 as one block of packed rows: (W_gate|W_up)^T and W_down views."""
        key = (first, count)
        if key not in self.runs:
            off = block.offsets
            self.runs[key] = (block.gate_up.detach()[2 * off[first] : 2 * off[first + count]].t(), block.down.detach()[off[first] : off[first + count]])
        return self.runs[key]

    def bias_for(self, ids: list[int]) -> torch.Tensor:
        """Sum of the dropped-expert biases of the experts not in `ids`."""
        key = tuple(sorted(ids))
        v = self.bias_for_set.get(key)
        if v is None:
            v = self.bias_total - sum(self.bias_rows[e] for e in key)
            if len(self.bias_for_set) < 512:  # all sets for small N; bounded for large N choose k
                self.bias_for_set[key] = v
        return v


# block -> {state key: Prepared}; weak, so deep copies and deleted models leave nothing behind
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepared(block, x: torch.Tensor) -> Prepared:
    key = _state_key(block, x)
    cache = _PREPARED.get(block)
    if cache is None:
        cache = _PREPARED[block] = {}
    p = cache.get(key)
    if p is None:
        cache.clear()  # parameters changed (or new device/dtype): older entries are stale
        p = cache[key] = Prepared(block, x)
    return p


def _new_accumulator(block, x: torch.Tensor, p: Prepared, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The shared expert's output (+ bias [H]) as the float accumulator (zeros without a shared expert)."""
    T = x.shape[0]
    if not block.shared_size:
        out = x.new_zeros(T, block.hidden_size, dtype=p.acc)
        return out if bias is None else out.add_(bias)
    s = block.shared_size
    gu = torch.mm(x, p.shared_gu_t)
    h = p.act(gu[:, :s]).mul_(gu[:, s:])
    if bias is not None and h.dtype == p.acc:
        return torch.addmm(bias, h, p.shared_down)  # the bias rides along in the GEMM's output pass
    out = _down(h, p.shared_down)
    out = out if out.dtype == p.acc else out.to(p.acc)
    return out if bias is None else out.add_(bias)


def _down(h: torch.Tensor, down: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h @ down for down stored [m, H] (the packed layout).

    CPU half precision (no native bf16 on AVX2 machines: emulated GEMMs, fp32 accumulation):
    one row goes through the matrix-vector kernel, ~3x faster than mm on this layout; several
    rows through mm on a transposed copy of the (small) expert slice, the layout x @ W^T that
    dense Linear layers use, measured ~3x faster than mm on [m, H] (the copy costs ~1 %).
    """
    if h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float16):
        if h.shape[0] == 1 and out is None:
            return torch.mv(down.t(), h[0]).unsqueeze(0)
        down = down.t().contiguous().t()
    return torch.mm(h, down, out=out) if out is not None else torch.mm(h, down)


def _add(out: torch.Tensor, h: torch.Tensor, down: torch.Tensor, alpha: float = 1.0) -> None:
    """out += alpha * h @ down, in out's (float) precision."""
    if h.dtype == out.dtype:
        out.addmm_(h, down, alpha=alpha)
    else:
        out.add_(_down(h, down), alpha=alpha)


def _all_experts(block, x: torch.Tensor, p: Prepared, out: torch.Tensor) -> None:
    """Every routed expert with its static scale: one matmul pair over all packed rows."""
    T = x.shape[0]
    gu = torch.mm(x, p.gate_up_t)
    if p.equal:
        g = gu.view(T, block.num_experts, 2, p.experts[0][2])
        h = p.act(g[:, :, 0]).mul_(g[:, :, 1])
        if p.expert_scale_dense is not None:
            h.mul_(p.expert_scale_dense)
        h = h.view(T, block.routed_size)
    else:
        h = p.act(gu[:, p.gate_cols]).mul_(gu[:, p.up_cols])
        if p.neuron_scale is not None:
            h.mul_(p.neuron_scale)
    _add(out, h, p.down)


def router_scores(block, x: torch.Tensor, p: Prepared) -> torch.Tensor:
    """The router's float32 scores [T, N]; CMoE's analytical router inlined (its module call costs more than its math at batch 1)."""
    if p.router is None:
        return block.router(x)
    n, normalize, absolute, proj_t, gu_t, combine_t = p.router
    if x.dtype != torch.float32:
        x = x.float()
    if normalize:
        x = F.normalize(x, dim=-1)
    if proj_t is not None:
        x = torch.mm(x, proj_t)
    gu = torch.mm(x, gu_t)
    r = p.act(gu[:, :n]).mul_(gu[:, n:])
    if absolute:
        r.abs_()
    return torch.mm(r, combine_t)


def route(block, x: torch.Tensor, p: Prepared) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selected experts [T, k] and their gate weights [T, k] (None when every weight is 1)."""
    if not p.static_gates:
        _, idx, w = block.route(x)
        return idx, w
    scores = router_scores(block, x, p)
    sel = scores + p.selection_bias if p.has_selection_bias else scores
    idx = sel.topk(block.top_k, dim=-1, sorted=False).indices
    return idx, None if p.unit_scale else block.expert_scale.float()[idx]


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
            _add(out, h, down)
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
            _add(out, h, down_e, g)


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
    _add(out, h, p.down)
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
        _down(h, down_e, out=ys[pos : pos + c])
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
        out = _new_accumulator(block, x, p)
        if block.num_experts:
            _all_experts(block, x, p, out)
        return out
    idx, w = route(block, x, p)
    if T == 1:
        ids = idx.tolist()[0]  # the one host sync (free on a CPU)
        out = _new_accumulator(block, x, p, p.bias_for(ids) if p.bias is not None else None)
        _one_token(block, x, p, out, ids, w)
    else:
        out = _new_accumulator(block, x, p, p.bias_total if p.bias is not None else None)
        (_masked if _use_masked(block, x, p, w) else _grouped)(block, x, p, out, idx, w)
    return out
