"""vLLM model classes for moeify checkpoints: vLLM's own model of the base architecture with moeify blocks.

`Moeify<Base>ForCausalLM` (the name config.json's "architectures" holds) subclasses vLLM's
`<Base>ForCausalLM`. It checks the checkpoint (`moeify.vllm.plan.servable_layers`) before
building anything, builds vLLM's model, then puts a `MoeifyMoE` in place of the MLP of every
converted layer (layers left dense keep vLLM's MLP). Loading routes each converted layer's
`model.layers.<i>.mlp.*` tensors to its block and everything else to vLLM's loader.

The classes are created on first access (module `__getattr__`), so the registry's
"moeify.vllm.models:<name>" imports only the base model that is served, and they pickle by name.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Iterable

import torch

from . import BASES
from .block import MoeifyMoE
from .plan import NotServable, servable_layers

_MLP_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")


def install_blocks(model, layers: list[dict[str, Any] | None], act: str, prefix: str = "") -> dict[int, MoeifyMoE]:
    """Replace the MLP of each converted layer held by this pipeline rank with a MoeifyMoE; {layer: block}."""
    from vllm.model_executor.models.utils import PPMissingLayer

    hidden = model.config.hidden_size
    decoder = model.model.layers
    blocks: dict[int, MoeifyMoE] = {}
    for i, cfg in enumerate(layers):
        if cfg is None or isinstance(decoder[i], PPMissingLayer):
            continue
        name = f"{prefix}.model.layers.{i}.mlp" if prefix else f"model.layers.{i}.mlp"
        decoder[i].mlp = MoeifyMoE(hidden, cfg, act, prefix=name)
        blocks[i] = decoder[i].mlp
    return blocks


def load_with_blocks(model, base_load, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str] | None:
    """vLLM's load_weights with each converted layer's mlp.* tensors routed to its MoeifyMoE."""
    blocks: dict[int, MoeifyMoE] = model._moeify_blocks
    converted: set[int] = model._moeify_converted

    def rest():
        for name, tensor in weights:
            m = _MLP_TENSOR.match(name)
            if m and int(m.group(1)) in converted:
                block = blocks.get(int(m.group(1)))  # None: the layer lives on another pipeline rank
                if block is not None:
                    block.take(m.group(2), tensor)
                continue
            yield name, tensor

    loaded = base_load(model, rest())
    incomplete = {i: b.missing() for i, b in blocks.items() if not b.loaded}
    if incomplete:
        raise NotServable(f"moeify.vllm: the checkpoint lacks tensors of converted layers {incomplete}; it is incomplete or "
                          "does not match its config.json - re-save it.")
    if loaded is None:
        return None
    names = set(loaded)
    for i, b in blocks.items():
        names |= {f"model.layers.{i}.mlp.{n}" for n in b.loaded_names()}
    return names


def make_model_class(name: str) -> type:
    """Moeify<Base>ForCausalLM on vLLM's <Base>ForCausalLM."""
    module, base_name = BASES[name]
    base = getattr(importlib.import_module(module), base_name)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        layers, act = servable_layers(vllm_config.model_config.hf_config)  # refuse before anything is allocated
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._moeify_converted = {i for i, cfg in enumerate(layers) if cfg is not None}
        self._moeify_blocks = install_blocks(self, layers, act, prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str] | None:
        return load_with_blocks(self, base.load_weights, weights)

    doc = f"vLLM's {base_name} with moeify MoE blocks in the converted layers (moeify.vllm)."
    return type(name, (base,), {"__init__": __init__, "load_weights": load_weights, "__module__": __name__,
                                "__qualname__": name, "__doc__": doc})


def __getattr__(name: str) -> type:
    if name in BASES:
        cls = make_model_class(name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["install_blocks", "load_with_blocks", "make_model_class", *BASES]
