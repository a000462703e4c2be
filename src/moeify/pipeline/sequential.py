"""Layer-sequential calibration: plan each MLP on the hidden states of the layers before it.

For each decoder layer in order (one site loop for every kind of MLP site):

1. the layer runs with its MLP (or an MoE block's fused experts) replaced by a capture
   module that stores its input and returns zeros, so the layer's output is the
   residual stream without the MLP, and the MLP never runs densely;
2. the method plans the MLP from the captured inputs (all calibration tokens) and the
   MoE block replaces it (`plan_layer`: plan, validate, build: the one place this happens);
3. the block's output on the captured inputs is added back (through the layer's
   post-MLP norm where the architecture has one): the next layer's input. With
   `Calibration(sequential=False)` the dense MLP's output is added instead.

Held-out tokens (never used for fitting) travel the same way and give the
router-fidelity report. Memory: the hidden states of the calibration tokens, one
layer's MLP activations, and the statistics the method keeps.

Site kinds: "dense" (a gated MLP: converted), "moe_block" (an MoE model's fused experts:
each expert becomes a sub-MoE, pipeline/hierarchical.py), "moeify" (a moeify block:
its routed experts become sub-MoEs), "other" (left as it is).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blocks.diagnostics import router_fidelity
from ..blocks.moe import MoEMLP
from ..core.dense import check_finite
from ..core.method import MethodConfig
from ..core.plan import LayerPlan
from ..models.arch import activation_name, decoder_layers, dense_weights, expert_weights, mlp_sites, spec_for
from .hierarchical import convert_moe_block, convert_moeify_block
from .layer import plan_layer
from .refit import refit_block, refittable
from .stream import LayerStream

log = logging.getLogger("moeify")


@dataclasses.dataclass
class _SiteResult:
    module: nn.Module  # what replaces the captured module
    plan: Any
    stats: dict[str, Any]
    feed: list[torch.Tensor]  # per calibration batch: the MLP output the next layer sees
    heldout: Callable[[list[tuple]], tuple[list[torch.Tensor], dict[str, float] | None]]


def _sizes(caps: list[tuple]) -> list[int]:
    return [c[0].shape[0] for c in caps]


def _convert_dense(site, caps, spec, act, config, state, sequential, h_caps=None, refit=False) -> _SiteResult:
    i = site.layer
    x = torch.cat([c[0] for c in caps])
    check_finite(x, i, "MLP inputs")
    w = dense_weights(site.module, spec, act)
    res, block = plan_layer(config, w, x, i, state)
    stats = {"layer": i, **res.info, "shared": res.plan.shared.size, "experts": res.plan.expert_sizes, "top_k": res.plan.top_k}
    refit_done = refit and refittable(block)
    if refit_done:  # the output-side weights solved in closed form on the router's real selections (refit.py)
        xh = torch.cat([c[0] for c in h_caps]) if h_caps else None
        stats["refit"] = refit_block(block, x, w, xh)
        stats["calibration_error"] = stats["refit"]["calibration_error_after"]
    y = res.output if res.output is not None and not refit_done else block(x)
    feed = y if sequential or res.dense_output is None else res.dense_output

    def heldout(h_caps):
        xh = torch.cat([c[0] for c in h_caps])
        if res.heldout is not None and not refit_done:
            yh, fid = res.heldout(xh)
        else:  # a refit block no longer holds the dense MLP: the reference is the dense weights themselves
            dense = w(xh).float() if refit_done else dense_from_block(block, xh)
            yh, fid = block(xh), router_fidelity(block, xh, dense)
        return list(yh.split(_sizes(h_caps))), fid

    return _SiteResult(block, res.plan, stats, list(feed.split(_sizes(caps))), heldout)


def _convert_moe_block(site, caps, spec, act, config, state, sequential, h_caps=None, refit=False) -> _SiteResult:
    experts_mod = getattr(site.module, spec.experts)
    hier, hplan, stats = convert_moe_block(expert_weights(site.module, spec, act), caps, config, site.layer, state)
    feed = [(hier if sequential else experts_mod)(*c) for c in caps]
    return _SiteResult(hier, hplan, {"layer": site.layer, **stats}, feed, lambda h_caps: ([hier(*c) for c in h_caps], None))


def _convert_moeify(site, caps, spec, act, config, state, sequential, h_caps=None, refit=False) -> _SiteResult:
    x = torch.cat([c[0] for c in caps])
    check_finite(x, site.layer, "MLP inputs")
    old = site.module
    new, hplan, stats = convert_moeify_block(old, x, config, site.layer, state)
    feed = list((new if sequential else old)(x).split(_sizes(caps)))
    return _SiteResult(new, hplan, {"layer": site.layer, **stats}, feed, lambda h_caps: ([new(c[0]) for c in h_caps], None))


_CONVERTERS = {"dense": _convert_dense, "moe_block": _convert_moe_block, "moeify": _convert_moeify}


def _target(site, spec) -> tuple[nn.Module, str]:
    """(parent, attribute) of the module a site's conversion captures and replaces."""
    return (site.module, spec.experts) if site.kind == "moe_block" else (site.parent, site.attr)


def _post_norm(layer: nn.Module, spec) -> nn.Module | None:
    name = getattr(spec, "mlp_post_norm", None)
    return getattr(layer, name) if name else None


@torch.no_grad()
def convert_sequential(model, config: MethodConfig, calibration, state: Any = None, *, tokenizer=None,
                       progress: bool = True, refit: bool = False, loader=None) -> tuple[list[LayerPlan | None], dict[str, Any]]:
    """Convert every MLP of `model` in place, layer by layer on calibration activations.

    refit: after planning, solve each routed block's output-side weights in closed form on the
    router's selections (refit.py; dense MLP sites), the ridge strength chosen on the held-out tokens.
    loader: streaming conversion (streaming.py): `begin(model, ids)` before the first layer, `load(i, layer)`
    fills layer i's weights before its turn, `done(i, layer, stats)` writes and empties it after; the
    activations live on `loader.device`.

    Returns (plans per layer, extra summary: calibration error and router fidelity per layer).
    """
    t0 = time.perf_counter()
    spec = spec_for(model)
    act = activation_name(model.config, spec)
    cal_ids, held_ids = calibration.windows(tokenizer)
    was_training = model.training
    model.eval()
    device = None
    if loader is not None:
        loader.begin(model, [t for t in (cal_ids, held_ids) if t is not None])
        device = loader.device
    t = time.perf_counter()
    cal = LayerStream(model, spec, cal_ids, calibration.batch_size, device=device)
    held = LayerStream(model, spec, held_ids, calibration.batch_size, device=device) if held_ids is not None else None
    t_embed = time.perf_counter() - t
    layers = decoder_layers(model, spec)
    plans: list[Any] = []
    per_layer: list[dict[str, Any]] = []
    bar = tqdm(list(mlp_sites(model, spec)), desc=f"{config.method} (calibrated)", unit="layer", disable=not progress)
    stages = {"forward": 0.0, "plan": 0.0, "heldout": 0.0}
    for site in bar:
        i, layer = site.layer, layers[site.layer]
        if loader is not None:
            loader.load(i, layer)
        convert_site = _CONVERTERS.get(site.kind)
        if convert_site is None:
            t = time.perf_counter()
            cal.step(layer, i)
            if held is not None:
                held.step(layer, i)
            stages["forward"] += time.perf_counter() - t
            plans.append(None)
            if loader is not None:
                loader.done(i, layer, {"layer": i})
            continue
        post = _post_norm(layer, spec)
        parent, attr = _target(site, spec)
        t = time.perf_counter()
        outs, caps = cal.run_captured(layer, i, parent, attr)
        # the held-out inputs of this MLP (they depend only on the layers before it): the refit chooses its ridge on them
        h_outs, h_caps = held.run_captured(layer, i, parent, attr) if held is not None else (None, None)
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        done = convert_site(site, caps, spec, act, config, state, calibration.sequential, h_caps, refit)
        setattr(parent, attr, done.module)
        t_plan = time.perf_counter() - t
        t = time.perf_counter()
        cal.advance(outs, done.feed, post)
        if held is not None:
            ys, fid = done.heldout(h_caps)
            if fid:
                done.stats["router_fidelity"] = fid
            held.advance(h_outs, ys, post)
        t_held = time.perf_counter() - t
        done.stats["seconds"] = {"forward": round(t_fwd, 3), "plan": round(t_plan, 3), "heldout": round(t_held, 3)}
        for k, v in zip(("forward", "plan", "heldout"), (t_fwd, t_plan, t_held)):
            stages[k] += v
        plans.append(done.plan)
        per_layer.append(done.stats)
        if loader is not None:
            loader.done(i, layer, done.stats)
        if "calibration_error" in done.stats:
            bar.set_postfix(err=f"{done.stats['calibration_error']:.3f}")
        log.info("layer %d: %s", i, _layer_line(done.stats))
        del done, outs, caps, h_outs, h_caps  # the replaced MLP and this layer's activations go before the next layer
    model.train(was_training)
    extra = _summary(per_layer, calibration, held_ids, t0)
    extra["stage_seconds"] = {"embed": round(t_embed, 3), **{k: round(v, 3) for k, v in stages.items()}}
    return plans, extra


def _summary(per_layer: list[dict[str, Any]], calibration, held_ids, t0: float) -> dict[str, Any]:
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
    refits = [s["refit"] for s in per_layer if "refit" in s]
    if refits:
        extra["refit"] = {"layers": len(refits), "layers_changed": sum(r["lambda"] is not None for r in refits),
                          **{k: float(sum(r[k] for r in refits) / len(refits)) for k in
                             ("calibration_error_before", "calibration_error_after", "heldout_error_before", "heldout_error_after")}}
    stages: dict[str, float] = {}
    for s in per_layer:
        for k, v in (s.get("plan_seconds") or {}).items():
            stages[k] = stages.get(k, 0.0) + v
    if stages:  # the method's own stages summed over layers (within stage_seconds["plan"])
        extra["plan_stages"] = {k: round(v, 3) for k, v in stages.items()}
    extra["pipeline_seconds"] = time.perf_counter() - t0
    return extra


def dense_from_block(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
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
