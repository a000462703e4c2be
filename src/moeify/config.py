"""Method configs: one dataclass per method; the config type is the registry key.

Configs validate their own fields in __post_init__ (what can be checked without
a model) and against a model's shapes in `check(intermediate_sizes)` (before
any weights are touched). They serialise as {"_type", "_version", "_data"}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from .errors import InputError

METHODS: dict[str, type["MethodConfig"]] = {}


def method_names() -> list[str]:
    return sorted(METHODS)


@dataclasses.dataclass
class MethodConfig:
    """Base of all method configs."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.method:
            METHODS[cls.method] = cls

    def check(self, intermediate_sizes: list[int]) -> None:
        """Raise InputError if this config cannot be applied to MLPs of these sizes."""

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


def config_for(method: str, **kwargs) -> MethodConfig:
    """Build a method's config from its name and keyword options (None values are left at defaults)."""
    from . import methods  # noqa: F401  (registers the methods)

    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(method_names())}")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = {k for k, v in kwargs.items() if v is not None and k not in names}
    if unknown:
        raise InputError(f"method {method!r} has no option(s) {sorted(unknown)}; its options: {sorted(names)}")
    return cls(**{k: v for k, v in kwargs.items() if v is not None})
