"""Layer-sequential calibration: profile each MLP on the hidden states of the layers before it.

One pass over the decoder with every layer replaced by a recorder collects the
inputs of layer 0 and the keyword arguments each layer receives (masks, rotary
embeddings). Then, for each layer in order:

1. the layer runs with its MLP (or an MoE block's experts) replaced by a capture
   module that stores its input and returns zeros, so the layer's output is the
   residual stream without the MLP, and the MLP never runs densely;
2. the method plans the MLP from the captured inputs (all calibration tokens);
3. the MoE block replaces the MLP and its output on the captured inputs is added
   back (through the layer's post-MLP norm where the architecture has one), which
   gives the converted layer's output: the next layer's input.

Held-out tokens (never used for fitting) travel the same way and give the
router-fidelity report. Memory: the hidden states of the calibration tokens, one
layer's MLP activations, and the statistics the method keeps.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import activation_name, decoder_layers, dense_weights, expert_weights, mlp_sites, spec_for
from ..diagnostics import router_fidelity
from ..errors import InputError
from ..moe import MoEMLP
from ..plan import LayerPlan

log = logging.getLogger("moeify")


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


class _Capture(nn.Module):
    """Stands in for an MLP (or fused experts): stores its inputs, returns zeros."""

    def __init__(self):
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, ...]] = []

    def forward(self, x, *extra):
        self.inputs.append((x.detach().reshape(-1, x.shape[-1]),) + tuple(e.detach() for e in extra))
        return torch.zeros_like(x)


def _decoder(model, spec) -> nn.Module:
    path = spec.layers.rsplit(".", 1)[0]
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


@torch.no_grad()
def _record(model, spec, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
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
        _decoder(model, spec)(input_ids=ids.to(_device(model)), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return first[0], [s[0] for s in stores]


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _Stream:
    """Token windows flowing through the decoder: hidden states + per-layer call arguments, per batch."""

    def __init__(self, model, spec, ids: torch.Tensor, batch_size: int):
        self.batches = []
        for i in range(0, ids.shape[0], batch_size):
            hidden, calls = _record(model, spec, ids[i : i + batch_size])
            self.batches.append([hidden, calls])

    def run_layer(self, layer: nn.Module, index: int) -> list[torch.Tensor]:
        outs = []
        for hidden, calls in self.batches:
            args, kwargs = calls[index]
            outs.append(layer(hidden, *args, **kwargs))
        return outs


def _post_norm(layer: nn.Module, spec) -> nn.Module | None:
    name = getattr(spec, "mlp_post_norm", None)
    return getattr(layer, name) if name else None


def _run_captured(stream: _Stream, layer: nn.Module, index: int, parent: nn.Module, attr: str) -> tuple[list[torch.Tensor], list[tuple]]:
    """Layer outputs with the module at parent.attr replaced by a capture, and the captured inputs."""
    original = getattr(parent, attr)
    cap = _Capture()
    setattr(parent, attr, cap)
    try:
        outs = stream.run_layer(layer, index)
    finally:
        setattr(parent, attr, original)
    return outs, cap.inputs


def _advance(stream: _Stream, outs: list[torch.Tensor], mlp_outs: list[torch.Tensor], post: nn.Module | None) -> None:
    for b, (o, y) in enumerate(zip(outs, mlp_outs)):
        y = y.reshape(o.shape).to(o.dtype)
        stream.batches[b][0] = o + (post(y) if post is not None else y)


def _check_finite(x: torch.Tensor, layer: int, what: str) -> None:
    if not torch.isfinite(x).all():
        raise InputError(f"layer {layer}: the {what} contain NaN or inf on the calibration tokens; the model's weights or "
                         "the chosen dtype overflow (try --dtype float32, or check the checkpoint).")


@torch.no_grad()
def convert_sequential(model, config, calibration, *, tokenizer=None, progress: bool = True) -> tuple[list[LayerPlan | None], dict[str, Any]]:
    """Convert every MLP of `model` in place, layer by layer on calibration activations.

    Returns (plans per layer, extra summary: calibration error and router fidelity per layer).
    """
    t0 = time.perf_counter()
    spec = spec_for(model)
    act = activation_name(model.config, spec)
    cal_ids, held_ids = calibration.windows(tokenizer)
    was_training = model.training
    model.eval()
    cal = _Stream(model, spec, cal_ids, calibration.batch_size)
    held = _Stream(model, spec, held_ids, calibration.batch_size) if held_ids is not None else None
    layers = decoder_layers(model, spec)
    sites = list(mlp_sites(model, spec))
    plans: list[LayerPlan | Any | None] = []
    per_layer: list[dict[str, Any]] = []
    bar = tqdm(sites, desc=f"{config.method} (calibrated)", unit="layer", disable=not progress)
    for site in bar:
        i = site.layer
        layer = layers[i]
        post = _post_norm(layer, spec)
        if site.kind == "dense":
            outs, caps = _run_captured(cal, layer, i, site.parent, site.attr)
            x = torch.cat([c[0] for c in caps])
            _check_finite(x, i, "MLP inputs")
            w = dense_weights(site.module, spec, act)
            res = config.plan_from_activations(w, x, i)
            res.plan.validate(w.intermediate_size, layer=i, allow_missing=getattr(config, "allow_missing", False))
            block = MoEMLP.from_dense(w, res.plan, res.router_state, getattr(res, "block_state", None))
            y = res.output if res.output is not None else block(x)
            dense_y = res.dense_output
            site.replace(block)
            feed = y if calibration.sequential or dense_y is None else dense_y
            _advance(cal, outs, list(feed.split([c[0].shape[0] for c in caps])), post)
            stats = {"layer": i, **res.info, "shared": res.plan.shared.size, "experts": res.plan.expert_sizes, "top_k": res.plan.top_k}
            if held is not None:
                h_outs, h_caps = _run_captured(held, layer, i, site.parent, site.attr)
                xh = torch.cat([c[0] for c in h_caps])
                if res.heldout is not None:
                    yh, fid = res.heldout(xh)
                else:
                    yh, fid = block(xh), router_fidelity(block, xh, _dense_from_block(block, xh))
                if fid:
                    stats["router_fidelity"] = fid
                _advance(held, h_outs, list(yh.split([c[0].shape[0] for c in h_caps])), post)
            plans.append(res.plan)
        elif site.kind == "moe_block" and hasattr(config, "plan_from_activations"):
            from ..hierarchical import convert_moe_block

            experts_mod = getattr(site.module, spec.experts)
            outs, caps = _run_captured(cal, layer, i, site.module, spec.experts)
            hier, hplan, stats = convert_moe_block(experts_mod, expert_weights(site.module, spec, act), caps, config, i)
            setattr(site.module, spec.experts, hier)
            _advance(cal, outs, [(hier if calibration.sequential else experts_mod)(*c) for c in caps], post)
            if held is not None:
                h_outs, h_caps = _run_captured(held, layer, i, site.module, spec.experts)
                _advance(held, h_outs, [hier(*c) for c in h_caps], post)
            stats = {"layer": i, **stats}
            plans.append(hplan)
        elif site.kind == "moeify" and hasattr(config, "plan_from_activations"):
            from ..hierarchical import convert_moeify_block

            outs, caps = _run_captured(cal, layer, i, site.parent, site.attr)
            x = torch.cat([c[0] for c in caps])
            _check_finite(x, i, "MLP inputs")
            old = site.module
            new, hplan, stats = convert_moeify_block(old, x, config, i)
            site.replace(new)
            _advance(cal, outs, list((new if calibration.sequential else old)(x).split([c[0].shape[0] for c in caps])), post)
            if held is not None:
                h_outs, h_caps = _run_captured(held, layer, i, site.parent, site.attr)
                _advance(held, h_outs, [new(c[0]) for c in h_caps], post)
            stats = {"layer": i, **stats}
            plans.append(hplan)
        else:
            cal.batches = [[o, b[1]] for o, b in zip(cal.run_layer(layer, i), cal.batches)]
            if held is not None:
                held.batches = [[o, b[1]] for o, b in zip(held.run_layer(layer, i), held.batches)]
            plans.append(None)
            continue
        per_layer.append(stats)
        if "calibration_error" in stats:
            bar.set_postfix(err=f"{stats['calibration_error']:.3f}")
        log.info("layer %d: %s", i, _layer_line(stats))
    model.train(was_training)
    extra: dict[str, Any] = {"per_layer": per_layer, "calibration": {"source": calibration.source, "samples": calibration.samples,
                                                                  "seq_len": calibration.seq_len, "seed": calibration.seed,
                                                                  "sequential": calibration.sequential,
                                                                  "heldout_tokens": int(held_ids.numel()) if held_ids is not None else 0}}
    errs = [s["calibration_error"] for s in per_layer if "calibration_error" in s]
    if errs:
        extra["calibration_error"] = float(sum(errs) / len(errs))
    fids = [s["router_fidelity"]["overlap"] for s in per_layer if "overlap" in s.get("router_fidelity", {})]
    if fids:
        extra["router_fidelity"] = float(sum(fids) / len(fids))
    for key in ("rel_error_router", "rel_error_oracle"):
        vals = [s["router_fidelity"][key] for s in per_layer if key in s.get("router_fidelity", {})]
        if vals:
            extra[f"heldout_{key}"] = float(sum(vals) / len(vals))
    extra["pipeline_seconds"] = time.perf_counter() - t0
    return plans, extra


def _dense_from_block(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """F(x) of the original dense MLP, from the block with every neuron active (exact by construction)."""
    out = block._shared(x).float() if block.shared_size else torch.zeros(x.shape[0], block.hidden_size)
    if block.num_experts:
        out = out + block._dense_routed(x, None).float()
    return out


def _layer_line(s: dict[str, Any]) -> str:
    parts = [f"shared {s.get('shared')}", f"experts {len(s.get('experts', []))}x{max(s.get('experts') or [0])}", f"top-k {s.get('top_k')}"]
    if "calibration_error" in s:
        parts.append(f"calib ||F-F_moe||/||F|| {s['calibration_error']:.4f}")
    if "overlap" in s.get("router_fidelity", {}):
        parts.append(f"held-out router/oracle overlap {s['router_fidelity']['overlap']:.3f}")
    return ", ".join(parts)
