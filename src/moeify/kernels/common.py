"""What the torch and Triton backends share: a block's prepared state, routing, the float accumulator.

Everything about a block that does not depend on the input (per-expert weight views,
the inlined router, compensation sums, whether gates are all 1) is prepared once per
block, device and dtype (`prepared`) and reused until a parameter changes. On top of
it, both backends route the same way (`route`), start from the same accumulator (the
shared expert's output plus any compensation, `new_accumulator`) and run a block whose
every expert is active as one dense matmul pair (`all_experts`); they differ only in
how the selected experts run (moeify.kernels.torch_backend, moeify.kernels.triton_moe).

Numerics follow MoEMLP.forward_reference: bf16/fp16 inputs are accumulated in float32
(core.dense.accumulation_dtype), router scores are float32.

Like the rest of moeify.kernels this reads blocks only through their attributes and
`Router.fused_form()`; it imports nothing from moeify.blocks.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from ..core.dense import accumulation_dtype

# Functional forms of transformers' activation modules: calling an nn.Module costs
# more dispatch than the op itself at batch 1 (checked equal in tests/test_kernels.py).
FUNCTIONAL_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def activation_fn(block):
    return FUNCTIONAL_ACTIVATIONS.get(block.act, block.act_fn)


# Router spec keys the inlined computation below covers (a router with other settings is called as a module).
_INLINE_ROUTER_KEYS = {"type", "neurons", "absolute", "normalize", "rank"}


def _fused_router(block) -> tuple | None:
    """The router's inline form (see blocks/routers.py Router.fused_form), or None to call the router module."""
    spec = block.layer_config.get("router") or {}
    return block.router.fused_form() if set(spec) <= _INLINE_ROUTER_KEYS else None


def _state_key(block, x: torch.Tensor) -> tuple:
    """Identity and in-place version of every tensor Prepared reads: any update makes a new entry.
    (Built in one expression: it runs on every call of every block, ~10 us per decode step of a layer.)"""
    sb = block.selection_bias
    return (x.device, x.dtype, block.router, sb.data_ptr(), sb._version,
            *[None if t is None else (t.data_ptr(), t._version) for t in block._parameters.values()],
            *[None if t is None else (t.data_ptr(), t._version) for t in block.router._parameters.values()])


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
        # the plain analytical router (no normalisation, no projection): the decode steps compute it inline
        self.plain_router = self.router is not None and not self.router[1] and self.router[3] is None
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
        self.decode = None  # the torch backend's batch-1 state (torch_backend.Decode), made on first use
        self.native = None  # the compiled batch-1 step (native.NativeDecode), False where it does not apply; made on first use

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
    """The block's Prepared state for x's device and dtype, rebuilt after any in-place parameter update."""
    key = _state_key(block, x)
    cache = _PREPARED.get(block)
    if cache is None:
        cache = _PREPARED[block] = {}
    p = cache.get(key)
    if p is None:
        cache.clear()  # parameters changed (or new device/dtype): older entries are stale
        p = cache[key] = Prepared(block, x)
    return p


def forget(module) -> None:
    """Drop the prepared state of every block inside `module` (it holds views of their weights: after the
    weights are moved or freed, e.g. a streamed layer emptied to the meta device, it would keep them alive)."""
    for m in module.modules():
        _PREPARED.pop(m, None)


def new_accumulator(block, x: torch.Tensor, p: Prepared, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The shared expert's output (+ bias [H]) as the float accumulator (zeros without a shared expert)."""
    T = x.shape[0]
    if not block.shared_size:
        out = x.new_zeros(T, block.hidden_size, dtype=p.acc)
        return out if bias is None else out.add_(bias)
    s = block.shared_size
    gu = matmul_up(x, p.shared_gu_t)
    h = p.act(gu[:, :s]).mul_(gu[:, s:])
    if bias is not None and h.dtype == p.acc:
        return torch.addmm(bias, h, p.shared_down)  # the bias rides along in the GEMM's output pass
    out = matmul_down(h, p.shared_down)
    out = out if out.dtype == p.acc else out.to(p.acc)
    return out if bias is None else out.add_(bias)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU's matmuls run bf16 natively (AVX512-BF16 / AMX in the code path ATen chose) rather than
    emulated on AVX2. The fastest batch-1 layouts differ between the two (docs/protocol.md "Speed")."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and torch.cpu._is_avx512_bf16_supported()


def matmul_up(x: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w_t for w_t the transposed view of a row-major [n, H] weight (the packed gate|up layout).

    One bf16 row on a CPU with native bf16 (batch-1 decode): the matrix-vector product on the
    row-major weight, which oneDNN runs ~15 % faster than mm on the transposed view (measured in a
    SmolLM2 bf16 decode on AVX512-BF16/AMX); otherwise mm. `out`, when given, is a [1, n] or [T, n] buffer.
    """
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and native_bf16():
        if out is None:
            return torch.mv(w_t.t(), x[0]).unsqueeze(0)
        torch.mv(w_t.t(), x[0], out=out[0])
        return out
    return torch.mm(x, w_t, out=out) if out is not None else torch.mm(x, w_t)


def matmul_down(h: torch.Tensor, down: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h @ down for down stored [m, H] (the packed layout).

    CPU half precision without native bf16 (AVX2: emulated GEMMs, fp32 accumulation): one row goes
    through the matrix-vector kernel, ~3x faster than mm on this layout; several rows through mm on a
    transposed copy of the (small) expert slice, the layout x @ W^T that dense Linear layers use,
    ~3x faster than mm on [m, H] (the copy costs ~1 %). With native bf16 (AVX512-BF16/AMX) plain mm
    on [m, H] is the fastest for any number of rows (1.4x the matrix-vector kernel at one row,
    1.4-3.7x the transposed copy), as in float32.
    """
    if h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float16) and not (h.dtype == torch.bfloat16 and native_bf16()):
        if h.shape[0] == 1 and out is None:
            return torch.mv(down.t(), h[0]).unsqueeze(0)
        down = down.t().contiguous().t()
    return torch.mm(h, down, out=out) if out is not None else torch.mm(h, down)


def add_matmul_down(out: torch.Tensor, h: torch.Tensor, down: torch.Tensor, alpha: float = 1.0) -> None:
    """out += alpha * h @ down, in out's (float) precision."""
    if h.dtype == out.dtype:
        out.addmm_(h, down, alpha=alpha)
    else:
        out.add_(matmul_down(h, down), alpha=alpha)


def all_experts(block, x: torch.Tensor, p: Prepared, out: torch.Tensor) -> None:
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
    add_matmul_down(out, h, p.down)


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


