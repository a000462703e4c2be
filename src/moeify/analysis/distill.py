"""Optional short distillation of one MLP into small students (methods.md §4, the paper's protocol, shrunk to CPU minutes).

Students with the same number of active neurons per token:

* dense: a gated MLP of A neurons;
* moe: a shared gated MLP of A/2 neurons + E single-neuron experts, top-(A/2) routed by a
  linear router (full rank, or through a rank-r projection: "moe_lowrank").

Selected experts are added with weight exactly 1 in the forward pass (moeify's unit gates);
the router learns through a straight-through weight 1 + s - stop_grad(s), i.e. the gradient
it would get if the output were scaled by its score. Trained with Adam on the MLP's
outputs for calibration tokens, scored by FVU on held-out tokens; the same students are
trained on Gaussian inputs with the real inputs' mean and covariance. The paper's finding
is that the MoE student wins on real inputs and not on Gaussian ones.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..core.dense import GatedWeights, activation
from .metrics import fvu, matched_gaussian

log = logging.getLogger("moeify")


class DenseStudent(nn.Module):
    def __init__(self, hidden: int, neurons: int, act: str):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * neurons, bias=False)
        self.down = nn.Linear(neurons, hidden)
        self.act = activation(act)
        self.n = neurons

    def forward(self, x):
        gu = self.gate_up(x)
        return self.down(self.act(gu[:, : self.n]) * gu[:, self.n :])


class MoEStudent(nn.Module):
    """Shared gated MLP + E single-neuron experts, top-k by a (low-rank) linear router."""

    def __init__(self, hidden: int, shared: int, experts: int, top_k: int, act: str, rank: int | None = None):
        super().__init__()
        self.shared = DenseStudent(hidden, shared, act)
        self.gate_up = nn.Linear(hidden, 2 * experts, bias=False)
        self.down = nn.Parameter(torch.randn(experts, hidden) / experts**0.5)
        self.router = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, experts)) if rank else nn.Linear(hidden, experts)
        self.act = activation(act)
        self.E, self.k = experts, top_k

    def forward(self, x):
        s = self.router(x)
        sel = s.topk(self.k, dim=-1).indices
        weight = torch.zeros_like(s).scatter(1, sel, 1.0) * (1.0 + s - s.detach())
        gu = self.gate_up(x)  # every expert is one neuron: computing all and weighting by 0/1 is the cheap way on CPU
        h = self.act(gu[:, : self.E]) * gu[:, self.E :]
        return self.shared(x) + (h * weight) @ self.down


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> None:
    threads = torch.get_num_threads()
    # thousands of small steps: on a few shared cores, thread hand-offs cost more than they save
    torch.set_num_threads(1)
    try:
        _steps(model, x, y, steps, batch, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = ((model(x[i]) - y[i]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def distill_layer(w: GatedWeights, xs: dict[str, torch.Tensor], *, block_sizes: dict[str, int] | None = None, active: int = 128,
                  experts: int = 512, rank: int = 64, steps: int = 600, batch: int = 512, lr: float = 3e-3, seed: int = 0,
                  layer: int = 0, progress: bool = True) -> dict:
    """FVU of dense and MoE students of MLP `w` (same active neurons) on real and matched-Gaussian inputs."""
    t0 = time.perf_counter()
    real_train = torch.cat([xs[k] for k in ("calib_a", "calib_b") if k in xs]).float()
    real_val = xs["heldout"].float()
    data = {"real": (real_train, real_val),
            "gaussian": (matched_gaussian(real_train, real_train.shape[0], seed + 7), matched_gaussian(real_train, real_val.shape[0], seed + 8))}
    H = w.hidden_size
    out: dict = {"layer": layer, "active_neurons": active, "experts": experts, "top_k": active // 2, "shared_neurons": active // 2,
                 "router_rank": rank, "steps": steps, "batch": batch, "lr": lr, "train_tokens": int(real_train.shape[0]),
                 "val_tokens": int(real_val.shape[0]), "fvu": {}}
    for name, (xt, xv) in data.items():
        with torch.no_grad():
            yt, yv = w(xt).float(), w(xv).float()
            xscale = xt.pow(2).mean().sqrt()
            ymean, yscale = yt.mean(0), (yt - yt.mean(0)).pow(2).mean().sqrt()
        xt_n, xv_n, yt_n = xt / xscale, xv / xscale, (yt - ymean) / yscale
        students = {
            "dense": DenseStudent(H, active, w.act),
            "moe": MoEStudent(H, active // 2, experts, active // 2, w.act),
            "moe_lowrank": MoEStudent(H, active // 2, experts, active // 2, w.act, rank=rank),
        }
        row = {}
        for sname, student in students.items():
            torch.manual_seed(seed)
            for pname, p in student.named_parameters():  # same init recipe for every student, seeded
                if "down" in pname:  # output projections start at zero: every student starts at FVU 1
                    nn.init.zeros_(p)
                elif p.dim() == 2:
                    nn.init.normal_(p, std=p.shape[1] ** -0.5)
            with torch.enable_grad():
                _train(student, xt_n, yt_n, steps, batch, lr, seed)
            with torch.no_grad():
                row[sname] = fvu(yv, student(xv_n) * yscale + ymean)
            log.info("distill layer %d, %s inputs, %s student: held-out FVU %.4f", layer, name, sname, row[sname])
        out["fvu"][name] = row
    if block_sizes:
        out["converted_block"] = block_sizes
    out["seconds"] = time.perf_counter() - t0
    return out
