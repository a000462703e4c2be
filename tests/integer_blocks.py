"""MoE blocks whose sums are exact in float32 and not in bfloat16: tests of half-precision accumulation.

Weights and inputs are small non-negative integers (ReLU experts; W_gate and W_up rows with
two entries of 1, W_down in {0..3}, x in {0, 1}), so the output of every expert is an
integer of at most 96, exact in bfloat16, and every output is >= 0. The sum over many
experts then grows to several hundred, where bfloat16 (8 significant bits) can only hold
even numbers or multiples of 4, while float32 holds every integer below 2^24:

* accumulated in float32, a block's output *is* the float64 sum (up to the one final
  rounding when the block returns bfloat16): exact equality is the tolerance;
* accumulated in bfloat16, every addition past 256 rounds, and the result misses by
  several units (`bf16_accumulated` computes that on purpose, so each test shows that
  its tolerance is one a bfloat16 accumulation exceeds).

Gate weights are exact too: powers of two (static scales) or exactly 1 (a CMoE gate at
its initial u = 0, which makes an all-active block sum its experts one by one instead of
running them as one matmul).
"""

from __future__ import annotations

import numpy as np
import torch

from moeify.blocks.moe import MoEMLP
from moeify.core.dense import GatedWeights
from moeify.core.plan import LayerPlan

HIDDEN = 32
EXPERTS = 64
EXPERT_SIZE = 8
SHARED = 16


def integer_weights(hidden: int = HIDDEN, intermediate: int = SHARED + EXPERTS * EXPERT_SIZE, seed: int = 0) -> GatedWeights:
    g = torch.Generator().manual_seed(seed)

    def two_ones(n: int) -> torch.Tensor:
        w = torch.zeros(n, hidden)
        for r in range(n):
            w[r, torch.randperm(hidden, generator=g)[:2]] = 1.0
        return w

    return GatedWeights(gate=two_ones(intermediate), up=two_ones(intermediate),
                        down=torch.randint(0, 4, (hidden, intermediate), generator=g).float(), act="relu")


def integer_block(top_k: int = EXPERTS, gate: str = "cmoe", scales: bool = False, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[GatedWeights, MoEMLP]:
    """(the dense MLP in float32, its MoE block in `dtype`): 16 shared neurons, 64 routed experts of 8 neurons."""
    w = integer_weights(seed=seed)
    perm = np.random.default_rng(seed).permutation(w.intermediate_size)
    experts = np.split(perm[SHARED:], EXPERTS)
    router = {"type": "linear"} if top_k < EXPERTS else {"type": "static"}
    plan = LayerPlan(shared=perm[:SHARED], experts=experts, top_k=top_k, router=router, gate=gate,
                     scales=2.0 ** np.random.default_rng(seed + 1).integers(-1, 2, EXPERTS) if scales else None)
    block = MoEMLP.from_dense(w, plan)
    with torch.no_grad():
        for p in block.router.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 2)))
    assert block.gate_u is None or not block.gate_u.any()  # u = 0: gate weights exactly 1
    return w, block.eval().to(dtype)


def integer_inputs(tokens: int, seed: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randint(0, 2, (tokens, HIDDEN), generator=torch.Generator().manual_seed(seed)).to(dtype)


def _terms(block: MoEMLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared expert output [T, H], each selected expert's output [T, k, H], its gate weight [T, k]), in float64.

    Computed from the block's own selection (block.route), so the sums below and the
    block add up the same experts.
    """
    with torch.no_grad():
        _, idx, gw = block.route(x)
        b = {n: p.detach().double() for n, p in block.named_parameters()}
        x64 = x.double()
        s = block.shared_size
        gu = x64 @ b["shared_gate_up"].T
        shared = (torch.relu(gu[:, :s]) * gu[:, s:]) @ b["shared_down"]
        per_expert = []
        for e in range(block.num_experts):
            o0, o1 = block.offsets[e], block.offsets[e + 1]
            gu = x64 @ b["gate_up"][2 * o0 : 2 * o1].T
            per_expert.append((torch.relu(gu[:, : o1 - o0]) * gu[:, o1 - o0 :]) @ b["down"][o0:o1])
        y = torch.stack(per_expert, 1)  # [T, N, H]
        selected = y.gather(1, idx[:, :, None].expand(-1, -1, y.shape[-1]))
    return shared, selected, gw.double()


def exact_sum(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """The block's output in float64: shared + sum_j g_j E_j(x) (every term an exact small number)."""
    shared, selected, gw = _terms(block, x)
    return shared + (selected * gw[:, :, None]).sum(1)


def bf16_accumulated(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """The same terms summed in bfloat16, one expert after the other: what a bf16 accumulator gives."""
    shared, selected, gw = _terms(block, x)
    acc = shared.bfloat16()
    for j in range(selected.shape[1]):
        acc = acc + (selected[:, j] * gw[:, j, None]).bfloat16()
    return acc


def assert_sums_need_float32(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """The exact sum, after checking that the terms are exact in bfloat16 and their bfloat16 sum is not."""
    shared, selected, gw = _terms(block, x)
    terms = torch.cat([shared[:, None], selected * gw[:, :, None]], 1)
    assert torch.equal(terms.bfloat16().double(), terms) and terms.min() >= 0  # every term exact in bf16
    exact = exact_sum(block, x)
    assert exact.max() > 512  # past 512 bfloat16 steps by 4
    miss = (bf16_accumulated(block, x).double() - exact).abs()
    assert miss.max() >= 4 and (miss > 0).float().mean() > 0.5, "the test blocks no longer tell bf16 from fp32 accumulation"
    return exact
