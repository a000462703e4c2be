"""Expert counts and settings shared by the equal-size-expert methods (MoEfication, LLaMA-MoE, ExpertWeaver)."""

from __future__ import annotations

import dataclasses
import math

from ...core.method import MethodConfig, option, positive_int
from ...errors import InputError


def resolve_active(experts: int, active: int | None, fraction: float | None, method: str, default_fraction: float = 0.5,
                   unit: str = "experts", min_active: int = 1, why: str = "") -> int:
    """Active experts per token from an explicit count or an active fraction that must be a multiple of 1/experts.

    min_active: the fewest active experts the method can build (why: the reason, for the error message).
    """
    positive_int(f"{method}: experts", experts)
    if active is not None and fraction is not None:
        if abs(float(fraction) * experts - active) > 1e-6:  # both are stored in a saved config, so consistent pairs are fine
            raise InputError(f"{method}: active={active} and fraction={fraction} disagree ({active}/{experts} = {active / experts:g}); "
                             "give only one of them.")
        fraction = None
    if active is None:
        f = default_fraction if fraction is None else float(fraction)
        if not 0.0 < f <= 1.0:
            raise InputError(f"{method}: the active fraction must be in (0, 1]; got {f}.")
        k = f * experts
        if abs(k - round(k)) > 1e-6 or round(k) < min_active:
            lo, hi = max(min_active, math.floor(k)), min(experts, max(min_active, math.ceil(k)))
            near = min((lo, hi), key=lambda j: (abs(j / experts - f), -j))
            reason = (f"{f:g} x {experts} = {k:g} is not a whole number of {unit}" if abs(k - round(k)) > 1e-6
                      else f"at least {min_active} of {experts} must be active{why}")
            raise InputError(
                f"{method}: an active fraction of {f:g} is not reachable with {experts} {unit} ({reason}); the nearest "
                f"reachable fraction is {near / experts:g} ({near} of {experts}); reachable fractions are multiples of 1/{experts}"
                + (f" from {min_active / experts:g}" if min_active > 1 else "") + "."
            )
        active = int(round(k))
    if int(active) != active or not min_active <= active <= experts:
        raise InputError(f"{method}: active {unit} must be between {min_active} and {experts}{why}, got {active}.")
    return int(active)


def check_experts_fit(experts: int, intermediate_sizes: list[int], method: str) -> None:
    for i, d_h in enumerate(intermediate_sizes):
        if d_h and experts > d_h:
            raise InputError(f"{method}: layer {i} has an intermediate size of {d_h}, fewer neurons than the {experts} experts "
                             f"asked for; use at most {d_h} experts.")


@dataclasses.dataclass
class EqualExpertsConfig(MethodConfig):
    """Settings shared by MoEfication and the LLaMA-MoE splits: E equal-size experts, top-`active`
    (or `fraction` of E) per token, balanced k-means iterations, the seed and the MLP router's training."""

    routers = ("mlp", "centroid")  # the router kinds this method accepts (a class attribute, not a field)

    experts: int = option(32, 'experts E per layer')
    active: int | None = option(None, 'experts active per token (instead of --fraction)')
    fraction: float | None = option(None, 'active fraction of the E experts')
    router: str = option("mlp", 'router kind')
    max_iters: int = option(10, 'balanced k-means iterations cap')
    seed: int = option(0, 'seed of the split / k-means initialisation / router training')
    router_hidden: int | None = option(None, 'MLP router width (default 4 E)')
    router_steps: int = option(200, 'MLP router training steps')
    router_batch: int = option(512, 'MLP router batch size')
    router_lr: float = option(5e-3, 'MLP router learning rate')

    def __post_init__(self) -> None:
        self.active = resolve_active(self.experts, self.active, self.fraction, self.method)
        self.fraction = self.active / self.experts
        if self.router not in self.routers:
            raise InputError(f"{self.method} router must be one of {', '.join(self.routers)}; got {self.router!r}.")
        for name in ("max_iters", "router_steps", "router_batch"):
            positive_int(name, getattr(self, name))
        if not self.router_lr > 0:
            raise InputError(f"router_lr must be positive, got {self.router_lr}.")
        if self.router_hidden is not None:
            positive_int("router_hidden", self.router_hidden)

    def check(self, intermediate_sizes: list[int]) -> None:
        check_experts_fit(self.experts, intermediate_sizes, self.method)


@dataclasses.dataclass
class LayoutConfig(MethodConfig):
    """Settings of the methods sized by an SxAyEz layout (CMoE; static pruning at a layout's active fraction)
    and K_a, the neurons marked per token when activation rates are profiled."""

    layout: str | None = option(None, "SxAyEz layout, e.g. S3A3E8 (3 shared + 3 of 5 routed experts active, 8 in all)")
    shared: int | None = option(None, "shared experts (instead of --layout)")
    active: int | None = option(None, "routed experts active per token (instead of --layout)")
    experts: int | None = option(None, "experts in total (instead of --layout)")
    k_act: int = option(10, "K_a, neurons marked per token")
