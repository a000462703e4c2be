"""convert(): load -> calibrate -> plan -> build, over the method protocol (core/method.py).

Data-free methods plan every dense MLP from its weights (`_convert_weights_only`);
calibrated methods run the layer-sequential pipeline (sequential.py). Both build
blocks through `plan_layer` (layer.py). Saving is models/checkpoint.py.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..blocks.hierarchical import HierarchicalMoEMLP
from ..core.method import MethodConfig
from ..core.plan import LayerPlan, plan_summary
from ..errors import InputError
from ..models.arch import activation_name, decoder_layers, dense_weights, expert_weights, mlp_sites, spec_for
from ..models.checkpoint import load_config, load_model, resolve_model_path
from ..models.modeling import as_moeify_model
from .layer import plan_layer

log = logging.getLogger("moeify")


def _version() -> str:
    from .._version import __version__

    return __version__


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def config_intermediate_sizes(cfg) -> list[int]:
    n = int(getattr(cfg, "num_hidden_layers", 0))
    d_h = getattr(cfg, "intermediate_size", 0)
    if isinstance(d_h, (list, tuple)):
        return [int(v) for v in d_h]
    return [int(d_h or 0)] * n


def convert(
    model: str | os.PathLike | torch.nn.Module | None,
    config: MethodConfig,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    progress: bool = True,
    refit: bool = False,
) -> torch.nn.Module:
    """Convert the dense MLPs of `model` (a loaded CausalLM, a hub id, a folder or a .gguf) in place.

    refit: calibrated methods only; after planning each MLP, solve its block's down projections
    (and compensation vectors) in closed form on the router's real selections (pipeline/refit.py),
    shrunk towards the planned weights with a ridge chosen on the held-out tokens. The checkpoint
    records `refit` in config.json["moeify"].

    Returns the model as moeify's class: save it with `moeify.save(model, dir)` or
    `model.save_pretrained(dir)`; the plan and summary are in `model.config.moeify`.
    """
    check_request(config, refit)
    if isinstance(model, (str, os.PathLike)) or model is None:
        path = resolve_model_path(model)
        config.check(config_intermediate_sizes(load_config(path, trust_remote_code=trust_remote_code)))
        model, tokenizer = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
        model._moeify_origin = str(model._moeify_origin)
    spec = spec_for(model)
    act = activation_name(model.config, spec)
    sites = list(mlp_sites(model, spec))
    sizes = site_sizes(model, config, sites, spec, act)
    calibration, state = prepare_calibration(model, config, calibration, tokenizer)
    t0 = time.perf_counter()
    if config.needs_calibration:
        from .sequential import convert_sequential

        plans, extra = convert_sequential(model, config, calibration, state, tokenizer=tokenizer, progress=progress, refit=refit)
    else:
        plans, extra = convert_weights_only(model, config, sites, spec, act, progress)
    moeify_cfg = moeify_config(model, config, plans, sizes, extra, time.perf_counter() - t0, refit)
    tok = tokenizer if tokenizer is not None else getattr(model, "_moeify_tokenizer", None)
    model = as_moeify_model(model, moeify_cfg)
    model._moeify_tokenizer = tok
    model.moeify_plans = plans
    log_converted(moeify_cfg)
    return model


def check_request(config, refit: bool) -> None:
    """What `convert`, `convert_streaming` and the CLI refuse before anything is read: a config that is no method's,
    refit of a data-free method."""
    if not isinstance(config, MethodConfig):
        raise InputError(f"config must be a moeify method config (e.g. moeify.CMoEConfig()), got {type(config).__name__}.")
    if refit and not config.needs_calibration:
        raise InputError(f"--refit needs calibration data, and {config.method!r} is data-free: use a calibrated method "
                         "(cmoe, moefication, llama-moe, expertweaver, prune) or drop --refit.")


def moeify_config(model, config: MethodConfig, plans: list, sizes: list[int], extra: dict, seconds: float, refit: bool) -> dict[str, Any]:
    """config.json["moeify"] of a conversion (in memory or streamed): method, per-layer plans, summary, provenance."""
    summary = plan_summary(plans, sizes)
    summary["seconds"] = seconds
    summary.update(extra)
    origin = getattr(model, "_moeify_origin", None) or getattr(model, "name_or_path", None)
    previous = getattr(model.config, "moeify", None)  # converting a moeify model again (hierarchically)
    if isinstance(previous, dict):
        origin = (previous.get("provenance") or {}).get("base_model") or origin
    return {
        "method": config.method,
        "config": config.to_dict(),
        "layers": [p.to_config() if p is not None else None for p in plans],
        **({"refit": extra.get("refit", {"layers": 0})} if refit else {}),
        "summary": summary,
        "provenance": {
            "base_model": str(origin) if origin else None,
            "moeify_version": _version(),
            "torch_version": torch.__version__,
            "transformers_version": __import__("transformers").__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({"converted_from": {"method": previous.get("method"), "config": previous.get("config")}} if isinstance(previous, dict) else {}),
        },
    }


def log_converted(moeify_cfg: dict[str, Any]) -> None:
    s = moeify_cfg["summary"]
    log.info("converted %d MLPs with %s in %.2fs: active MLP fraction %.3f, MLP params removed %.3f",
             sum(p is not None for p in moeify_cfg["layers"]), moeify_cfg["method"], s["seconds"], s["active_mlp_fraction"],
             s["mlp_params_removed_fraction"])


def site_sizes(model, config: MethodConfig, sites, spec, act) -> list[int]:
    """Intermediate size of every MLP the method converts (0: left as it is); refuses a model with nothing to convert."""
    sizes = [_site_intermediate_size(s, spec, act, config.needs_calibration) for s in sites]
    if not any(sizes):
        raise InputError(
            f"the model has no dense gated MLP that {config.method!r} can convert (already converted, or an MoE model: "
            "use a calibrated method such as cmoe, which converts MoE experts hierarchically)."
        )
    config.check(sizes)
    return sizes


def prepare_calibration(model, config: MethodConfig, calibration, tokenizer) -> tuple[Any, Any]:
    """(calibration, method state): ExpertWeaver, e.g., adds its task samples and returns which sample is which task."""
    if not config.needs_calibration:
        return calibration, None
    if calibration is None:
        raise InputError(f"method {config.method!r} needs calibration data: pass calibration=moeify.Calibration(...).")
    return config.prepare(calibration, tokenizer if tokenizer is not None else getattr(model, "_moeify_tokenizer", None))


def _site_intermediate_size(site, spec, act, hierarchical: bool) -> int:
    if site.kind == "dense":
        return dense_weights(site.module, spec, act).intermediate_size
    if site.kind == "moe_block" and hierarchical:
        return expert_weights(site.module, spec, act)[0].intermediate_size
    if site.kind == "moeify" and hierarchical:
        if isinstance(site.module, HierarchicalMoEMLP):
            raise InputError(f"layer {site.layer}: this block is already hierarchical; convert the original model instead.")
        return site.module.shared_size + site.module.routed_size
    return 0


@torch.no_grad()
def convert_weights_only(model, config, sites, spec, act, progress, loader=None) -> tuple[list[LayerPlan | None], dict]:
    """Data-free methods: plan every dense MLP from its weights. `loader` (streaming.py) fills and empties each layer."""
    plans: list[LayerPlan | None] = []
    layers = decoder_layers(model, spec)
    for site in tqdm(sites, desc=f"{config.method}", disable=not progress, unit="layer"):
        if loader is not None:
            loader.load(site.layer, layers[site.layer])
        if site.kind != "dense":
            plans.append(None)
        else:
            res, block = plan_layer(config, dense_weights(site.module, spec, act), None, site.layer)
            site.replace(block)
            plans.append(res.plan)
        if loader is not None:
            loader.done(site.layer, layers[site.layer], {"layer": site.layer})
    return plans, {}


__all__ = ["check_request", "convert", "convert_weights_only", "count_parameters", "config_intermediate_sizes", "moeify_config", "prepare_calibration", "site_sizes"]
