"""Token windows flowing through a decoder one layer at a time (public: analysis uses it too).

One pass over the decoder with every layer replaced by a recorder collects the
inputs of layer 0 and the keyword arguments each layer receives (masks, rotary
embeddings); after that each layer runs on its own, on the stored hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.arch import ArchSpec, decoder_layers


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records what it is called with and passes hidden states through."""

    def __init__(self, store: list, layer: nn.Module):
        super().__init__()
        self.store = store
        for name in ("attention_type", "layer_type", "layer_idx"):
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.store.append((args[1:], kwargs))
        return hidden


class Capture(nn.Module):
    """Stands in for an MLP (or fused experts): stores its inputs, returns zeros."""

    def __init__(self):
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, ...]] = []

    def forward(self, x, *extra):
        self.inputs.append((x.detach().reshape(-1, x.shape[-1]),) + tuple(e.detach() for e in extra))
        return torch.zeros_like(x)


def _decoder(model, spec: ArchSpec) -> nn.Module:
    mod = model
    for part in spec.layers.rsplit(".", 1)[0].split("."):
        mod = getattr(mod, part)
    return mod


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _record(model, spec: ArchSpec, ids: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, list]:
    """(input hidden states of layer 0, [(args, kwargs) per layer]) for one batch of windows."""
    layers = decoder_layers(model, spec)
    originals = list(layers)
    stores: list[list] = [[] for _ in originals]
    first: list[torch.Tensor] = []
    try:
        for i, layer in enumerate(originals):
            rec = _Recorder(stores[i], layer)
            if i == 0:
                rec.register_forward_pre_hook(lambda m, a, kw: first.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
            layers[i] = rec
        _decoder(model, spec)(input_ids=ids.to(device if device is not None else model_device(model)), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return first[0], [s[0] for s in stores]


class LayerStream:
    """Hidden states of token windows at the current layer, batch by batch, with each layer's call arguments."""

    def __init__(self, model, spec: ArchSpec, ids: torch.Tensor, batch_size: int, device: torch.device | None = None):
        self.batches = []
        for i in range(0, ids.shape[0], batch_size):
            hidden, calls = _record(model, spec, ids[i : i + batch_size], device)
            self.batches.append([hidden, calls])

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, index: int) -> list[torch.Tensor]:
        """The layer's outputs per batch (the stream does not move)."""
        outs = []
        for hidden, calls in self.batches:
            args, kwargs = calls[index]
            outs.append(layer(hidden, *args, **kwargs))
        return outs

    def step(self, layer: nn.Module, index: int, record: nn.Module | None = None) -> torch.Tensor | None:
        """Move the stream through the layer as it is; with `record`, return the inputs that module saw [T, H]."""
        store: list[torch.Tensor] = []

        def keep(module, args, kwargs) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            store.append(x.detach().reshape(-1, x.shape[-1]))

        hook = record.register_forward_pre_hook(keep, with_kwargs=True) if record is not None else None
        try:
            outs = self.run_layer(layer, index)
        finally:
            if hook is not None:
                hook.remove()
        self.batches = [[o, b[1]] for o, b in zip(outs, self.batches)]
        return torch.cat(store) if record is not None else None

    def run_captured(self, layer: nn.Module, index: int, parent: nn.Module, attr: str) -> tuple[list[torch.Tensor], list[tuple]]:
        """Layer outputs with the module at parent.attr replaced by a capture (its output zero), and the captured calls."""
        original = getattr(parent, attr)
        cap = Capture()
        setattr(parent, attr, cap)
        try:
            outs = self.run_layer(layer, index)
        finally:
            setattr(parent, attr, original)
        return outs, cap.inputs

    def advance(self, outs: list[torch.Tensor], mlp_outs: list[torch.Tensor], post: nn.Module | None) -> None:
        """Next layer's input: the layer's output without its MLP plus the (post-normed) MLP output."""
        for b, (o, y) in enumerate(zip(outs, mlp_outs)):
            y = y.reshape(o.shape).to(o.dtype)
            self.batches[b][0] = o + (post(y) if post is not None else y)
