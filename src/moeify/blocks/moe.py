"""The MoE block that replaces a dense gated MLP (routers: routers.py).

Weight layout (the checkpoint format, version 1):

    shared_gate_up  [2*S, H]   rows 0..S-1 = W_gate of the shared neurons, S..2S-1 = W_up
    shared_down     [S, H]     W_down columns of the shared neurons, neuron-major
    gate_up         [2*R, H]   routed neurons packed expert after expert; expert e occupies
                               rows 2*o_e .. 2*o_e+m_e-1 (gate) and 2*o_e+m_e .. 2*o_{e+1}-1 (up)
    down            [R, H]     rows o_e .. o_{e+1}-1 belong to expert e
    expert_scale    [N]        alpha_e, 1 at conversion
    gate_u          [N]        only for gate="cmoe": g_e = 1 + softmax(s)_e * u_e, u = 0 at conversion
    selection_bias  [N]        added to router scores for selection only (aux-loss-free balancing)
    shared_index, routed_index the dense neuron ids (provenance and analysis)

Expert e's slices are contiguous, so running one expert is a matmul on views
of the packed weights, and one matmul over all rows is the whole MLP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import kernels as _kernels
from ..core.dense import GatedWeights, accumulation_dtype, activation
from ..core.plan import LayerPlan
from ..errors import InputError
from .routers import ROUTERS

FORMAT_VERSION = 1
# forward_reference runs the routed experts masked (one matmul pair) from this many experts on, when every token
# selects at least half of them (MoEMLP.masks_experts)
MASKED_MIN_EXPERTS = 16


# --------------------------------------------------------------------------- the block


class MoEMLP(nn.Module):
    """Shared expert + routed experts, built from a dense gated MLP and a LayerPlan.

    Unit gate weights by default, so with every expert active the block equals
    the dense MLP up to float summation order. Low-precision inputs are
    accumulated in float32.
    """

    def __init__(self, hidden_size: int, layer_config: dict[str, Any], act: str):
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_config = dict(layer_config)
        self.act = act
        self.act_fn = activation(act)
        sizes = [int(m) for m in layer_config["experts"]]
        shared = int(layer_config["shared"])
        self.num_experts = len(sizes)
        self.top_k = int(layer_config["top_k"]) if sizes else 0
        self.shared_size = shared
        offsets = [0]
        for m in sizes:
            offsets.append(offsets[-1] + m)
        self.expert_sizes = sizes
        self.offsets = offsets
        routed = offsets[-1]
        self.routed_size = routed
        self.shared_gate_up = nn.Parameter(torch.zeros(2 * shared, hidden_size))
        self.shared_down = nn.Parameter(torch.zeros(shared, hidden_size))
        self.gate_up = nn.Parameter(torch.zeros(2 * routed, hidden_size))
        self.down = nn.Parameter(torch.zeros(routed, hidden_size))
        self.expert_scale = nn.Parameter(torch.ones(self.num_experts))
        self.gate_mode = layer_config.get("gate", "unit")
        self.gate_u = nn.Parameter(torch.zeros(self.num_experts)) if self.gate_mode == "cmoe" else None
        # mean output of each expert on the calibration tokens that did not select it; added for unselected experts
        self.dropped_bias = nn.Parameter(torch.zeros(self.num_experts, hidden_size)) if layer_config.get("compensate") else None
        self.register_buffer("selection_bias", torch.zeros(self.num_experts))
        self.register_buffer("shared_index", torch.zeros(shared, dtype=torch.long))
        self.register_buffer("routed_index", torch.zeros(routed, dtype=torch.long))
        router_spec = dict(layer_config.get("router", {"type": "static"}))
        rtype = router_spec.get("type", "static")
        if rtype not in ROUTERS:
            raise InputError(f"unknown router type {rtype!r}; known: {sorted(ROUTERS)}")
        self.router_type = rtype
        self.router = ROUTERS[rtype](self.num_experts, hidden_size, router_spec, act)
        # Column maps that turn the packed [T, 2R] projection into gate and up halves. Built
        # lazily per device: models are instantiated on the meta device when loaded.
        gate_cols, up_cols = [], []
        for e, m in enumerate(sizes):
            base = 2 * offsets[e]
            gate_cols.extend(range(base, base + m))
            up_cols.extend(range(base + m, base + 2 * m))
        self._col_lists = (gate_cols, up_cols, [e for e, m in enumerate(sizes) for _ in range(m)])
        self._col_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self.kernel = None  # None: moeify.kernels picks per call; or a backend from moeify.kernels.get / use

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(cls, weights: GatedWeights, plan: LayerPlan, router_state: dict[str, torch.Tensor] | None = None,
                   block_state: dict[str, torch.Tensor] | None = None) -> "MoEMLP":
        block = cls(weights.hidden_size, plan.to_config(), weights.act)
        block.load_plan(weights, plan, router_state)
        for name, value in (block_state or {}).items():
            param = getattr(block, name, None)
            if not isinstance(param, nn.Parameter) or param.shape != value.shape:
                raise InputError(f"block has no parameter {name!r} of shape {tuple(value.shape)}")
            param.data = value.to(device=weights.gate.device, dtype=weights.gate.dtype)
        return block

    @torch.no_grad()
    def load_plan(self, weights: GatedWeights, plan: LayerPlan, router_state: dict[str, torch.Tensor] | None = None) -> None:
        dtype = weights.gate.dtype
        dev = weights.gate.device
        self.to(device=dev)
        sh = torch.as_tensor(plan.shared, device=dev)
        self.shared_gate_up.data = torch.cat([weights.gate[sh], weights.up[sh]]).to(dtype)
        self.shared_down.data = weights.down[:, sh].T.contiguous().to(dtype)
        parts = []
        for idx in plan.experts:
            i = torch.as_tensor(idx, device=dev)
            parts.append(weights.gate[i])
            parts.append(weights.up[i])
        self.gate_up.data = (torch.cat(parts) if parts else weights.gate.new_zeros(0, self.hidden_size)).to(dtype)
        ri = torch.as_tensor(plan.routed_index, device=dev)
        self.down.data = weights.down[:, ri].T.contiguous().to(dtype)
        self.shared_index.copy_(sh)
        self.routed_index.copy_(ri)
        if plan.scales is not None:
            self.expert_scale.data = torch.as_tensor(plan.scales, dtype=torch.float32, device=dev)
        else:
            self.expert_scale.data = torch.ones(self.num_experts, device=dev)
        if router_state:
            missing = set(dict(self.router.named_parameters())) - set(router_state)
            if missing:
                raise InputError(f"router state lacks {sorted(missing)}")
            self.router.load_state_dict({k: v.to(dev) for k, v in router_state.items()}, strict=False)

    # ------------------------------------------------------------------ forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router scores [T, N], selected experts [T, k] and their gate weights [T, k] (float32)."""
        scores = self.router(x)
        sel_scores = scores + self.selection_bias.float()
        idx = sel_scores.topk(self.top_k, dim=-1, sorted=False).indices
        w = self.expert_scale.float()[idx]
        if self.gate_u is not None:
            w = w * (1.0 + scores.softmax(-1).gather(-1, idx) * self.gate_u.float()[idx])
        elif self.gate_mode == "softmax":  # downcycled init (ExpertWeaver): Qwen2-MoE-style softmax over all routed experts
            w = w * scores.softmax(-1).gather(-1, idx)
        return scores, idx, w

    def all_active(self) -> bool:
        return self.router_type == "static" or self.top_k >= self.num_experts

    def runs_all_experts(self) -> bool:
        """Every expert on every token with its static scale: one matmul over all packed rows, no router."""
        return self.all_active() and self.gate_u is None

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        gu = x @ self.shared_gate_up.T
        s = self.shared_size
        return (self.act_fn(gu[:, :s]) * gu[:, s:]) @ self.shared_down

    def _cols(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(gate columns, up columns, expert of each routed neuron) as index tensors on `device`."""
        if device not in self._col_cache:
            self._col_cache[device] = tuple(torch.tensor(c, dtype=torch.long, device=device) for c in self._col_lists)
        return self._col_cache[device]

    def _dense_routed(self, x: torch.Tensor, neuron_scale: torch.Tensor | None) -> torch.Tensor:
        """Every routed neuron on every token, its activation times neuron_scale ([R], or [T, R] per token)."""
        gate_cols, up_cols, _ = self._cols(x.device)
        gu = x @ self.gate_up.T
        h = self.act_fn(gu[:, gate_cols]) * gu[:, up_cols]
        if neuron_scale is not None:
            h = h * neuron_scale.to(h.dtype)
        return h @ self.down

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e alone on x [T, H] (no gate weight), from views of the packed weights."""
        o0, o1 = self.offsets[e], self.offsets[e + 1]
        m = o1 - o0
        gu = x @ self.gate_up[2 * o0 : 2 * o1].T
        return (self.act_fn(gu[:, :m]) * gu[:, m:]) @ self.down[o0:o1]

    def _grouped_routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        """Tokens grouped by expert (one sort), one matmul pair per expert with tokens."""
        T, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        xs = x[token]
        ws = w.reshape(-1)[order]
        pos = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            ye = self.expert_forward(xs[pos : pos + c], e)
            out.index_add_(0, token[pos : pos + c], ye.to(out.dtype) * ws[pos : pos + c, None])
            pos += c

    def masks_experts(self, x: torch.Tensor) -> bool:
        """Run the routed experts as one masked matmul pair (`_masked_routed`) instead of grouping tokens by expert.

        When every token selects at least half of many experts (MoEfication's 16 of 32), grouping saves at most
        half of the multiply-adds and pays one matmul pair, a gather and a scatter per expert, twice under autograd
        (fine-tuning): a distillation step of MoEfication 50 % on SmolLM2 takes half the time masked
        (benchmarks/finetune_step.py). With few experts grouping is as fast (CMoE S3A3E8, 3 of 5 routed) or faster
        (S1A3E8, S1A1E8: one block's forward + backward ~2x faster grouped) and stays. float32 only: half-precision
        grouping weights in float32.
        """
        return (self.num_experts >= MASKED_MIN_EXPERTS and 2 * self.top_k >= self.num_experts
                and x.dtype == accumulation_dtype(x.dtype))

    def _masked_routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Every routed expert on every token as one packed matmul pair, each neuron's activation times its
        expert's gate weight (0 where the token did not select the expert): the grouped path's result."""
        weight = torch.zeros(x.shape[0], self.num_experts, dtype=w.dtype, device=x.device).scatter(1, idx, w)
        return self._dense_routed(x, weight[:, self._cols(x.device)[2]])

    def _compensate(self, out: torch.Tensor, idx: torch.Tensor) -> None:
        """Add each unselected expert's calibration-mean output (compensate=True blocks only)."""
        if self.dropped_bias is not None:
            b = self.dropped_bias.to(out.dtype)
            out += b.sum(0) - b[idx].sum(1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        kernel = self.kernel or _kernels.select(self, x)  # moeify.kernels: torch (CPU), triton (CUDA), reference
        out = kernel(self, x)
        return (out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)).view(shape)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The block's definition on x [T, H], in float32 for half inputs; the fast kernels are tested against it."""
        acc_dtype = accumulation_dtype(x.dtype)
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=acc_dtype, device=x.device)
        if self.shared_size:
            out += self._shared(x).to(acc_dtype)
        if self.num_experts:
            if self.runs_all_experts():
                scale = self.expert_scale[self._cols(x.device)[2]]
                out += self._dense_routed(x, scale).to(acc_dtype)
            else:
                _, idx, w = self.route(x)
                if self.masks_experts(x):
                    out += self._masked_routed(x, idx, w)
                else:
                    self._grouped_routed(x, idx, w, out)
                self._compensate(out, idx)
        return out

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, shared={self.shared_size}, experts={self.num_experts} "
            f"(sizes {min(self.expert_sizes, default=0)}..{max(self.expert_sizes, default=0)}), top_k={self.top_k}, "
            f"router={self.router_type}, gate={self.gate_mode}"
        )
