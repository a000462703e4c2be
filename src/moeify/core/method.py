"""The method protocol: one dataclass per method, keyed by its type (docs/architecture.md).

A method is a dataclass of settings that subclasses `MethodConfig` and so registers
itself under its `method` name. It declares

* `needs_calibration`: whether it plans from activations (then the pipeline runs the
  layer-sequential calibration and passes each MLP's inputs) or from weights alone;
* `drops_neurons`: whether a plan may leave neurons of the dense MLP out;
* `check(intermediate_sizes)`: refuse settings that cannot fit the model, before any
  weight is read (fields are checked in `__post_init__`);
* `prepare(calibration, tokenizer)`: an optional hook that may extend the calibration
  windows and returns the run state `plan` receives (never stored on the config);
* `plan(weights, x, layer, state)`: the method itself, for one MLP: weights of the dense
  MLP, its calibration inputs x [T, H] (None for data-free methods), the layer index;
  returns a `LayerResult`;
* `for_fraction(fraction, **opts)` and `describe()`: the configuration `moeify compare`
  runs at an active MLP fraction, and a short label for its tables; `variants` names
  fixed option sets `compare` can run side by side (e.g. a random and a clustering split).

Configs serialise as {"_type", "_version", "_data"}; the CLI builds its options from the
dataclass fields (help text from each field's `metadata["help"]`).
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..errors import InputError
from .plan import LayerPlan

METHODS: dict[str, type["MethodConfig"]] = {}


def method_names() -> list[str]:
    return sorted(METHODS)


def option(default: Any = None, help: str = "", **kw) -> Any:
    """A method setting with the help text its CLI option shows."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class LayerResult:
    """What a method returns for one MLP.

    plan:          which neurons form the shared expert and each routed expert, top-k, router kind.
    router_state:  the router's tensors (None for static routing).
    block_state:   further block parameters (e.g. dropped_bias for compensation).
    output:        F_moe(x) on the calibration tokens, when the method computed it anyway
                   (the pipeline's next-layer input; saves a forward).
    dense_output:  F(x) of the dense MLP on the same tokens (the dense-feed input).
    info:          numbers for the per-layer report (calibration_error, cluster_iterations, ...;
                   "plan_seconds": the method's own stages, see `Laps`).
    heldout:       optional x -> (F_moe(x), fidelity dict), cheaper than the generic router-fidelity path.
    """

    plan: LayerPlan
    router_state: dict[str, torch.Tensor] | None = None
    output: torch.Tensor | None = None
    dense_output: torch.Tensor | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    heldout: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]] | None = None
    block_state: dict[str, torch.Tensor] | None = None


class Laps:
    """Seconds per stage of a method's plan, for info["plan_seconds"] (summed over layers in the convert JSON)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, stage: str) -> None:
        """Close `stage`: the time since the previous call (or since creation) is added to it."""
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now


@dataclasses.dataclass
class MethodConfig(abc.ABC):
    """Base of all methods (see the module docstring for the protocol)."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = False
    variants: ClassVar[dict[str, dict[str, Any]]] = {}  # compare name -> fixed options

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.method:
            METHODS[cls.method] = cls

    # ------------------------------------------------------------------ the protocol

    @property
    def drops_neurons(self) -> bool:
        """True when a plan may leave neurons of the dense MLP out (pruning)."""
        return False

    def check(self, intermediate_sizes: list[int]) -> None:
        """Raise InputError if this config cannot be applied to MLPs of these sizes."""

    def prepare(self, calibration: Any, tokenizer: Any) -> tuple[Any, Any]:
        """(calibration to run, run state for `plan`); the default runs the calibration as given, no state."""
        return calibration, None

    @abc.abstractmethod
    def plan(self, weights, x: torch.Tensor | None, layer: int, state: Any = None) -> LayerResult:
        """The method itself, for one dense MLP (every method defines it; the base class cannot be instantiated)."""

    @classmethod
    def for_fraction(cls, fraction: float, **opts) -> "MethodConfig":
        """The configuration that computes `fraction` of each MLP per token (used by `moeify compare`).

        The default serves methods with a `fraction` setting (its own checks name the nearest reachable
        fraction when this one is not); others override it.
        """
        if "fraction" in {f.name for f in dataclasses.fields(cls)}:
            return cls(fraction=fraction, **opts)
        raise InputError(f"method {cls.method!r} cannot be set to an active fraction; give its options explicitly.")

    def describe(self) -> str:
        """A short label of the configuration for tables (e.g. 'S3A3E8')."""
        return self.method

    # ------------------------------------------------------------------ what compare shows besides perplexity

    def compare_details(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """Per-run details for `moeify compare` from the conversion summary (stored under the method's name)."""
        return None

    @classmethod
    def compare_markdown(cls, rows: list[dict[str, Any]]) -> list[str]:
        """Markdown lines for compare.md about this method's runs (rows that carry its details)."""
        return []

    @classmethod
    def compare_figures(cls, rows: list[dict[str, Any]], out: Any) -> dict[str, Any]:
        """Figures for the compare folder `out`: {name: path}."""
        return {}

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        data = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            data[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        return {"_type": type(self).__name__, "_version": self.version, "_data": data}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "MethodConfig":
        by_type = {c.__name__: c for c in METHODS.values()}
        cls = by_type.get(d.get("_type", ""))
        if cls is None:
            raise InputError(f"unknown method config type {d.get('_type')!r}; known: {sorted(by_type)}")
        return cls(**d.get("_data", {}))


def method_class(method: str) -> type[MethodConfig]:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(method_names())}")
    return METHODS[method]


def config_for(method: str, **kwargs) -> MethodConfig:
    """Build a method's config from its name and keyword options (None values are left at defaults)."""
    cls = method_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = {k for k, v in kwargs.items() if v is not None and k not in names}
    if unknown:
        raise InputError(f"method {method!r} has no option(s) {sorted(unknown)}; its options: {sorted(names)}")
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def positive_int(name: str, value: Any, *, what: str = "") -> int:
    """value as an int if it is a positive integer, else an InputError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)) or int(value) != value or value < 1:
        raise InputError(f"{name}{f' ({what})' if what else ''} must be a positive integer, got {value!r}.")
    return int(value)


def multiple_of(method: str, fraction: float, n: int, what: str) -> int:
    """k with k / n == fraction (an active fraction reachable with n units), else an error naming the nearest one."""
    k = float(fraction) * n
    if abs(k - round(k)) > 1e-6 or round(k) < 1:
        near = min(max(1, round(k)), n)
        raise InputError(f"{method}: active fraction {fraction:g} is not reachable with {what}; the nearest reachable fraction "
                         f"is {near / n:g} ({near}/{n}); use multiples of 1/{n}.")
    return int(round(k))


__all__ = ["LayerResult", "METHODS", "MethodConfig", "config_for", "method_class", "method_names", "multiple_of", "option",
           "positive_int"]
