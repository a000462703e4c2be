"""convert(), save(), load(): thin orchestration over methods, blocks and checkpoints."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .arch import activation_name, dense_weights, expert_weights, mlp_sites, spec_for
from .config import MethodConfig
from .errors import InputError
from .io import atomic_dir, load_config, load_model, prepare_output, resolve_model_path
from .modeling import as_moeify_model
from .moe import MoEMLP
from .plan import LayerPlan, plan_summary

log = logging.getLogger("moeify")


def _version() -> str:
    from . import __version__

    return __version__


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _config_intermediate_sizes(cfg) -> list[int]:
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
) -> torch.nn.Module:
    """Convert the dense MLPs of `model` (a loaded CausalLM, a hub id, a folder or a .gguf) in place.

    Returns the model as moeify's class: save it with `moeify.save(model, dir)` or
    `model.save_pretrained(dir)`; the plan and summary are in `model.config.moeify`.
    """
    if not isinstance(config, MethodConfig):
        raise InputError(f"config must be a moeify method config (e.g. moeify.MLPMoEConfig()), got {type(config).__name__}.")
    if isinstance(model, (str, os.PathLike)) or model is None:
        path = resolve_model_path(model)
        config.check(_config_intermediate_sizes(load_config(path, trust_remote_code=trust_remote_code)))
        model, tokenizer = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
        model._moeify_origin = str(model._moeify_origin)
    spec = spec_for(model)
    act = activation_name(model.config, spec)
    sites = list(mlp_sites(model, spec))
    hierarchical = config.needs_calibration and hasattr(config, "plan_from_activations")
    sizes = [_site_intermediate_size(s, spec, act, hierarchical) for s in sites]
    if not any(sizes):
        raise InputError(
            f"the model has no dense gated MLP that {config.method!r} can convert (already converted, or an MoE model: "
            "use a calibrated method such as cmoe, which converts MoE experts hierarchically)."
        )
    config.check(sizes)
    if config.needs_calibration and calibration is None:
        raise InputError(f"method {config.method!r} needs calibration data: pass calibration=moeify.Calibration(...).")
    if config.needs_calibration and hasattr(config, "prepare_calibration"):  # e.g. ExpertWeaver adds its task samples
        calibration = config.prepare_calibration(calibration, tokenizer if tokenizer is not None else getattr(model, "_moeify_tokenizer", None))
    t0 = time.perf_counter()
    if config.needs_calibration:
        from .calibration.pipeline import convert_sequential

        plans, extra = convert_sequential(model, config, calibration, tokenizer=tokenizer, progress=progress)
    else:
        plans, extra = _convert_weights_only(model, config, sites, spec, act, progress)
    seconds = time.perf_counter() - t0
    summary = plan_summary(plans, sizes)
    summary["seconds"] = seconds
    summary.update(extra)
    origin = getattr(model, "_moeify_origin", None) or getattr(model, "name_or_path", None)
    previous = getattr(model.config, "moeify", None)  # converting a moeify model again (hierarchically)
    if isinstance(previous, dict):
        origin = (previous.get("provenance") or {}).get("base_model") or origin
    moeify_cfg = {
        "method": config.method,
        "config": config.to_dict(),
        "layers": [p.to_config() if p is not None else None for p in plans],
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
    tok = tokenizer if tokenizer is not None else getattr(model, "_moeify_tokenizer", None)
    model = as_moeify_model(model, moeify_cfg)
    model._moeify_tokenizer = tok
    model.moeify_plans = plans
    log.info(
        "converted %d MLPs with %s in %.2fs: active MLP fraction %.3f, MLP params removed %.3f",
        sum(p is not None for p in plans), config.method, seconds, summary["active_mlp_fraction"], summary["mlp_params_removed_fraction"],
    )
    return model


def _site_intermediate_size(site, spec, act, hierarchical: bool) -> int:
    if site.kind == "dense":
        return dense_weights(site.module, spec, act).intermediate_size
    if site.kind == "moe_block" and hierarchical:
        return expert_weights(site.module, spec, act)[0].intermediate_size
    if site.kind == "moeify" and hierarchical:
        from .hierarchical import HierarchicalMoEMLP

        if isinstance(site.module, HierarchicalMoEMLP):
            raise InputError(f"layer {site.layer}: this block is already hierarchical; convert the original model instead.")
        return site.module.shared_size + site.module.routed_size
    return 0


@torch.no_grad()
def _convert_weights_only(model, config, sites, spec, act, progress) -> tuple[list[LayerPlan | None], dict]:
    plans: list[LayerPlan | None] = []
    for site in tqdm(sites, desc=f"{config.method}", disable=not progress, unit="layer"):
        if site.kind != "dense":
            plans.append(None)
            continue
        w = dense_weights(site.module, spec, act)
        plan = config.plan_layer(w, site.layer)
        plan.validate(w.intermediate_size, layer=site.layer, allow_missing=getattr(config, "prune", 0) > 0)
        site.replace(MoEMLP.from_dense(w, plan))
        plans.append(plan)
    return plans, {}


def model_card(model) -> str:
    m = model.config.moeify
    s = m.get("summary", {})
    prov = m.get("provenance", {})
    base = prov.get("base_model")
    lines = ["---", "library_name: transformers", "tags: [moeify, mixture-of-experts]"]
    if base:
        lines.append(f"base_model: {base}")
    lines += [
        "---",
        "",
        f"# {base or 'A model'} converted to MoE with moeify ({m['method']})",
        "",
        "Reload with `import moeify` then `AutoModelForCausalLM.from_pretrained(path)` (no remote code).",
        "",
        f"- method config: `{m['config']}`",
        f"- active MLP fraction per token: {s.get('active_mlp_fraction', float('nan')):.4f}",
        f"- MLP parameters removed: {s.get('mlp_params_removed_fraction', float('nan')):.4f}",
        f"- conversion time: {s.get('seconds', float('nan')):.2f} s",
        f"- moeify {prov.get('moeify_version')}, transformers {prov.get('transformers_version')}, torch {prov.get('torch_version')}",
    ]
    metrics = m.get("metrics") or {}
    for name, r in (metrics.get("ppl") or {}).items():
        lines += [
            "",
            f"## Perplexity ({name}, {r.get('protocol', '')}, {r.get('windows')} windows, {r.get('tokens')} tokens)",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| dense baseline | {r['baseline']:.4f} |",
            f"| converted | {r['model']:.4f} |",
            f"| ratio | {r['ratio']:.5f} |",
        ]
    return "\n".join(lines) + "\n"


def save(model, out: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write a converted model atomically: safetensors, config with the moeify block, tokenizer, model card."""
    if not hasattr(model.config, "moeify"):
        raise InputError("this model was not converted by moeify; call moeify.convert first.")
    tok = tokenizer if tokenizer is not None else getattr(model, "_moeify_tokenizer", None)
    base = super(type(model), model)  # the base architecture's own save_pretrained

    def write(tmp: Path) -> None:
        base.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(model))

    out = atomic_dir(Path(out), write, overwrite)
    log.info("saved %s", out)
    return out


def load(path: str | os.PathLike, *, dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) of a moeify checkpoint (or any supported model)."""
    return load_model(str(path), dtype=dtype)


__all__ = ["convert", "save", "load", "count_parameters", "prepare_output"]
