"""Expert layouts SxAyEz: x shared experts, y routed experts active per token, z experts in all."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

_LAYOUT = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Layout:
    shared: int
    active: int
    experts: int

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    @property
    def active_fraction(self) -> float:
        return (self.shared + self.active) / self.experts

    def __str__(self) -> str:
        return f"S{self.shared}A{self.active}E{self.experts}"

    def sizes(self, d_h: int) -> tuple[int, list[int]]:
        """(shared neurons, routed expert sizes) for an MLP of d_h neurons.

        Experts have m = d_h // E neurons; the remainder d_h - E*m goes to the shared
        expert (no neuron is lost). With S = 0 the remainder is spread over the first
        routed experts instead (sizes differ by at most one).
        """
        m = d_h // self.experts
        rem = d_h - m * self.experts
        if self.shared > 0:
            return self.shared * m + rem, [m] * self.routed
        return 0, [m + (1 if j < rem else 0) for j in range(self.routed)]


def parse_layout(layout: str | None = None, shared: int | None = None, active: int | None = None, experts: int | None = None,
                 default: str = "S3A3E8") -> Layout:
    """Layout from a string like 'S3A3E8' or from shared/active/experts (which override the string's parts)."""
    if layout is None and shared is None and active is None and experts is None:
        layout = default
    s = a = e = None
    if layout is not None:
        m = _LAYOUT.match(str(layout).strip())
        if not m:
            raise InputError(f"bad layout {layout!r}: write SxAyEz, e.g. S3A3E8 = 3 shared + 3 of 5 routed experts active, 8 experts in all.")
        s, a, e = (int(g) for g in m.groups())
    s = shared if shared is not None else s
    a = active if active is not None else a
    e = experts if experts is not None else e
    if e is None or a is None:
        raise InputError("give a layout (e.g. --layout S3A3E8) or all of --shared, --active and --experts.")
    s = s or 0
    if e < 1 or s < 0 or a < 0:
        raise InputError(f"layout S{s}A{a}E{e}: counts must be non-negative and E >= 1.")
    if s > e:
        raise InputError(f"layout S{s}A{a}E{e}: more shared experts than experts in all.")
    if s < e and not 1 <= a <= e - s:
        raise InputError(f"layout S{s}A{a}E{e}: the active routed experts must be between 1 and the {e - s} routed experts.")
    if s == e:
        a = 0
    return Layout(s, a, e)


def check_layout_fits(lay: Layout, intermediate_sizes: list[int]) -> None:
    for i, d_h in enumerate(intermediate_sizes):
        if d_h and lay.experts > d_h:
            raise InputError(f"layer {i}: {lay.experts} experts do not fit an intermediate size of {d_h}; use at most {d_h} experts.")
