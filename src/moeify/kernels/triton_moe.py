"""The Triton backend: routed experts as a grouped GEMM over expert-sorted tokens.

Per block call, after routing (torch, small):

1. the (token, expert) pairs are sorted by expert; a tile schedule assigns each
   BLOCK_M-row tile of the sorted rows to one expert, computed on the device
   (searchsorted over the per-expert tile counts), so nothing waits for the host;
2. `_gate_up_kernel`: per tile, h = act(X W_gate[e]^T) * (X W_up[e]^T) with both
   products accumulated in float32 and the activation fused in the epilogue;
3. `_down_kernel`: per tile, y = (h W_down[e]) * g, float32 accumulation, the gate
   weight g (unit or alpha_e or the CMoE gate) fused in the epilogue;
4. y is put back in token order and the k rows of each token are summed
   (deterministic: no atomics), added to the shared expert (a plain dense MLP,
   cuBLAS) and the compensation of unselected experts.

Expert e's weights are the contiguous rows of the packed `gate_up` / `down`
(moeify.blocks.moe), read in place. The block's prepared state, routing, the float32
accumulator (shared expert + compensation) and the every-expert-active case are shared
with the torch backend (moeify.kernels.common). Correctness is tested on the CPU with
TRITON_INTERPRET=1 (tests/test_kernels.py).
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .common import all_experts, new_accumulator, prepared, route

ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2, "relu": 3}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        # tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * z)
    elif ACT == 2:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, offset_ptr, size_ptr,
    K, stride_x, stride_w, stride_h,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    row0 = tl.load(tile_start_ptr + tile)
    row1 = tl.load(tile_end_ptr + tile)
    e = tl.load(tile_expert_ptr + tile)
    m_e = tl.load(size_ptr + e)
    if (row0 >= row1) | (n0 >= m_e):
        return
    gate_row = 2 * tl.load(offset_ptr + e)  # expert e's W_gate rows, then its m_e W_up rows
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    rmask = rows < row1
    cmask = cols < m_e
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    g_ptrs = w_ptr + (gate_row + cols)[None, :].to(tl.int64) * stride_w + ks[:, None]
    u_ptrs = g_ptrs + m_e.to(tl.int64) * stride_w
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        xt = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = cmask[None, :] & kmask[:, None]
        wg = tl.load(g_ptrs, mask=wmask, other=0.0)
        wu = tl.load(u_ptrs, mask=wmask, other=0.0)
        if UPCAST:
            xt, wg, wu = xt.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = _act(acc_g, ACT) * acc_u
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, d_ptr, y_ptr, gate_ptr, dest_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, offset_ptr, size_ptr,
    N, stride_h, stride_d, stride_y,
    HAS_GATE: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    row0 = tl.load(tile_start_ptr + tile)
    row1 = tl.load(tile_end_ptr + tile)
    if row0 >= row1:
        return
    e = tl.load(tile_expert_ptr + tile)
    m_e = tl.load(size_ptr + e)
    o_e = tl.load(offset_ptr + e)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    rmask = rows < row1
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    d_ptrs = d_ptr + (o_e + ks)[:, None].to(tl.int64) * stride_d + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, m_e, BLOCK_K):
        kmask = (k0 + ks) < m_e
        ht = tl.load(h_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        dt = tl.load(d_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            ht, dt = ht.to(tl.float32), dt.to(tl.float32)
        acc = tl.dot(ht, dt, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        d_ptrs += BLOCK_K * stride_d
    if HAS_GATE:
        acc = acc * tl.load(gate_ptr + rows, mask=rmask, other=0.0)[:, None]
    # sorted row -> its (token, slot) row of y: results land in token order, no permutation pass
    dest = tl.load(dest_ptr + rows, mask=rmask, other=0)
    y_ptrs = y_ptr + dest[:, None].to(tl.int64) * stride_y + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if ACCUMULATE:  # one expert per token: add straight into the float32 accumulator (each row once)
        acc += tl.load(y_ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)


def _block_m(rows_per_expert: float) -> int:
    # tl.dot needs >= 16 rows; bigger tiles only pay off when experts have that many tokens
    for bm in (16, 32, 64):
        if rows_per_expert <= bm:
            return bm
    return 128


_META: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _meta(block, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row offset of each expert in `down`, expert sizes) as int32 on `device`, cached."""
    cache = _META.setdefault(block, {})
    if device not in cache:
        cache[device] = (
            torch.tensor(block.offsets[:-1], dtype=torch.int32, device=device),
            torch.tensor(block.expert_sizes, dtype=torch.int32, device=device),
        )
    return cache[device]


def tile_schedule(counts: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert, first row and end row of every BLOCK_M tile of the expert-sorted rows, on the device.

    counts[e] = rows routed to expert e. The number of tiles is bounded on the host
    (cdiv(rows, BLOCK_M) + experts); tiles past the real ones get start == end and return at once.
    """
    n = counts.numel()
    tiles = (counts + block_m - 1) // block_m
    last_tile = torch.cumsum(tiles, 0)
    first_tile = last_tile - tiles
    seg_end = torch.cumsum(counts, 0)
    seg_start = seg_end - counts
    max_tiles = triton.cdiv(rows, block_m) + n
    t = torch.arange(max_tiles, device=counts.device)
    e = torch.searchsorted(last_tile, t, right=True)
    valid = e < n
    e = e.clamp(max=n - 1)
    start = seg_start[e] + (t - first_tile[e]) * block_m
    end = torch.minimum(start + block_m, seg_end[e])
    start = torch.where(valid, start, 0).to(torch.int32)
    end = torch.where(valid, end, 0).to(torch.int32)
    return e.to(torch.int32), start, end


def grouped_experts(block, x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [T, H] (float32) += sum_j g_j E_{idx_j}(x) for every token; x [T, H], idx [T, k]."""
    T, k = idx.shape
    H = block.hidden_size
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(block.num_experts, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))  # bincount would sync
    rows = T * k
    bm = _block_m(rows / block.num_experts)
    tile_e, start, end = tile_schedule(counts, rows, bm)
    offsets, sizes = _meta(block, x.device)
    xs = x.index_select(0, order // k if k > 1 else order)
    max_m = max(block.expert_sizes)
    h = torch.empty(rows, max_m, dtype=x.dtype, device=x.device)
    w, d = block.gate_up.detach(), block.down.detach()
    if w.stride(1) != 1 or d.stride(1) != 1 or x.dtype != w.dtype:
        raise InputError("the triton backend needs row-major packed weights in the activations' dtype.")
    act = ACTIVATIONS[block.act]
    # fp32 activations: full-precision dots unless torch itself allows TF32 matmuls; half: Triton's default
    precision = None
    if x.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # Triton's interpreter (3.9) gets bfloat16 dots wrong: it holds bf16 tensors as their uint16
    # bit patterns and its tl.dot is np.matmul on those integers. There the bf16 operands are
    # widened first, which computes the same products (a bf16 x bf16 product is exact in float32).
    # float16 is a numpy type: the interpreter runs the half-precision kernels as compiled for a GPU.
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    bn = 64
    _gate_up_kernel[(start.numel(), triton.cdiv(max_m, bn))](
        xs, w, h, tile_e, start, end, offsets, sizes, H, xs.stride(0), w.stride(0), h.stride(0),
        ACT=act, PRECISION=precision, UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64,
    )
    # k = 1: each token has one row, added into `out` by the kernel. k > 1: rows of one token
    # come from different tiles, so they go to y in token order and are summed after (no atomics:
    # deterministic).
    y = out if k == 1 else torch.empty(rows, H, dtype=torch.float32, device=x.device)
    if k == 1 and (out.stride(1) != 1 or out.dtype != torch.float32):
        raise InputError("the triton backend accumulates into a row-major float32 output.")
    g = gate.reshape(-1)[order].float().contiguous() if gate is not None else y
    dest = order.to(torch.int32)
    bn_out = 128 if H >= 128 else 64
    _down_kernel[(start.numel(), triton.cdiv(H, bn_out))](
        h, d, y, g, dest, tile_e, start, end, offsets, sizes, H, h.stride(0), d.stride(0), y.stride(0),
        HAS_GATE=gate is not None, ACCUMULATE=k == 1, PRECISION=precision, UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn_out, BLOCK_K=64,
    )
    if k > 1:
        out += y.view(T, k, H).sum(1)


def supported(block) -> bool:
    return block.act in ACTIVATIONS


def moe_forward(block, x: torch.Tensor) -> torch.Tensor:
    """MoEMLP on x [T, H] -> float32 [T, H] with the routed experts in Triton."""
    if not supported(block):
        raise InputError(f"the triton backend has no fused {block.act!r} activation; use the torch backend (moeify.kernels.use(model, 'torch')).")
    p = prepared(block, x)
    if x.shape[0] == 0:
        return x.new_zeros(0, block.hidden_size, dtype=p.acc)
    if not block.num_experts or block.runs_all_experts():
        out = new_accumulator(block, x, p)
        if block.num_experts:
            all_experts(block, x, p, out)  # every expert on every token: one dense matmul pair (cuBLAS)
        return out
    if p.acc != torch.float32:  # float64 blocks: the kernels accumulate in float32
        raise InputError("the triton backend runs float32, bfloat16 and float16 blocks; use the torch backend for float64.")
    out = new_accumulator(block, x, p, p.bias_total if p.bias is not None else None)
    idx, gate = route(block, x, p)
    grouped_experts(block, x, idx, gate, out)
    if p.bias is not None:
        out.sub_(p.bias[idx].sum(1))
    return out


def compile_for_gpu(arch: int = 90, dtype: str = "bf16", tiles: tuple[int, ...] = (16, 128)) -> dict[str, str]:
    """Compile both kernels for a CUDA architecture (90 = H100/H200) without a GPU; returns their PTX.

    Triton ships its own LLVM and ptxas, so CI machines without a GPU check that the
    real kernels (not only the interpreter's reading of them) compile, for small and
    large tiles. Needs TRITON_INTERPRET unset in this process.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise InputError("compile_for_gpu needs TRITON_INTERPRET unset (the interpreter replaces the kernels).")
    target = GPUTarget("cuda", arch, 32)
    ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    precision = "ieee" if dtype == "fp32" else None
    ints = ["tile_expert_ptr", "tile_start_ptr", "tile_end_ptr", "offset_ptr", "size_ptr"]
    int_ptrs = {n: "*i32" for n in ints}
    out = {}
    for bm in tiles:
        sig = {"x_ptr": ptr, "w_ptr": ptr, "h_ptr": ptr, **int_ptrs, "K": "i32", "stride_x": "i32", "stride_w": "i32", "stride_h": "i32"}
        consts = {"ACT": 0, "PRECISION": precision, "UPCAST": False, "BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64}
        sig.update({k: "constexpr" for k in consts})
        out[f"gate_up_bm{bm}"] = triton.compile(ASTSource(fn=_gate_up_kernel, signature=sig, constexprs=consts), target=target).asm["ptx"]
        sig = {"h_ptr": ptr, "d_ptr": ptr, "y_ptr": "*fp32", "gate_ptr": "*fp32", "dest_ptr": "*i32", **int_ptrs, "N": "i32", "stride_h": "i32",
               "stride_d": "i32", "stride_y": "i32"}
        consts = {"HAS_GATE": True, "ACCUMULATE": bm == 16, "PRECISION": precision, "UPCAST": False, "BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64}
        sig.update({k: "constexpr" for k in consts})
        out[f"down_bm{bm}"] = triton.compile(ASTSource(fn=_down_kernel, signature=sig, constexprs=consts), target=target).asm["ptx"]
    return out
