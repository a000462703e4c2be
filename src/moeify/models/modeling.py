"""moeify's model classes: the base architecture with MoE blocks in place of MLPs.

For every supported base architecture X there is a config class `MoeifyXConfig`
(model_type `moeify_<x>`, all of X's fields plus a `moeify` block) and a model
class subclassing X's CausalLM. They are registered with transformers' Auto
classes on `import moeify`, so `AutoModelForCausalLM.from_pretrained(dir)`
reloads a converted checkpoint with no remote code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..blocks.moe import FORMAT_VERSION, MoEMLP
from ..core.files import atomic_dir
from ..errors import InputError
from .arch import ARCHITECTURES, DENSE_TYPES, MOE_TYPES, activation_name, mlp_sites, spec_for

log = logging.getLogger("moeify")

_CLASSES: dict[str, tuple[type, type]] = {}


def install_blocks(model: nn.Module, moeify_cfg: dict[str, Any]) -> None:
    """Replace the MLPs named in config.moeify["layers"] by empty MoE blocks of the right shapes."""
    mt = moeify_cfg.get("base_model_type")
    spec = ARCHITECTURES[mt] if mt in ARCHITECTURES else spec_for(model)
    act = activation_name(model.config, spec)
    layers = moeify_cfg.get("layers") or []
    sites = list(mlp_sites(model, spec))
    if len(layers) != len(sites):
        raise InputError(f"checkpoint plan has {len(layers)} layers but the model has {len(sites)}; the config is corrupt.")
    hidden = model.config.hidden_size
    for site, layer_cfg in zip(sites, layers):
        if layer_cfg is None:
            continue
        if layer_cfg.get("kind") == "hierarchical" and "outer" in layer_cfg:
            from ..blocks.hierarchical import HierarchicalMoEMLP

            site.replace(HierarchicalMoEMLP(hidden, layer_cfg, act))
            continue
        if layer_cfg.get("kind") == "hierarchical":
            from ..blocks.hierarchical import HierarchicalExperts

            if site.kind != "moe_block":
                raise InputError(f"layer {site.layer}: the checkpoint plan is hierarchical but the model has no MoE block there; the config is corrupt.")
            setattr(site.module, spec.experts, HierarchicalExperts(hidden, layer_cfg["experts"], act))
            continue
        site.replace(MoEMLP(hidden, layer_cfg, act))


def _base_classes(model_type: str, base: tuple[type, type] | None) -> tuple[type, type]:
    """(config class, CausalLM class) of a base architecture: transformers' Auto classes, else the model's own classes.

    An architecture that is only auto-detected (a Llama-like model whose model_type is in no table here) may be
    unknown to the Auto classes too, or known with a different model class; the loaded model's own classes are
    then the base, so conversion, save and reload in this process work for it as for a listed architecture.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if base is not None:
        return base
    try:
        base_cfg = CONFIG_MAPPING[model_type]
        return base_cfg, MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    except KeyError:
        raise InputError(
            f"transformers' Auto classes do not know the architecture {model_type!r}, so moeify cannot build "
            f"moeify_{model_type} from it: register its config and CausalLM classes first "
            f"(AutoConfig.register({model_type!r}, MyConfig); AutoModelForCausalLM.register(MyConfig, MyForCausalLM)), "
            f"then reload the moeify_{model_type} checkpoint with moeify.load (or call moeify.models.modeling.classes_for({model_type!r}) "
            "before AutoModelForCausalLM.from_pretrained)."
        ) from None


def _make_classes(model_type: str, base: tuple[type, type] | None = None) -> tuple[type, type]:
    from transformers import AutoConfig, AutoModelForCausalLM

    base_cfg, base_model = _base_classes(model_type, base)
    new_type = f"moeify_{model_type}"
    cfg_cls = type(f"Moeify{base_cfg.__name__}", (base_cfg,), {"model_type": new_type, "__module__": __name__})

    def __init__(self, config):
        base_model.__init__(self, config)
        install_blocks(self, config.moeify)

    def save_pretrained(self, save_directory, *, overwrite: bool = False, tokenizer=None, **kwargs):
        """Atomic save with tokenizer and model card; refuses an existing output unless overwrite=True."""
        return save(self, save_directory, tokenizer=tokenizer, overwrite=overwrite, **kwargs)

    model_cls = type(
        f"Moeify{base_model.__name__}",
        (base_model,),
        {"config_class": cfg_cls, "__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__, "_no_split_modules": ["MoEMLP"] + list(getattr(base_model, "_no_split_modules", None) or [])},
    )
    AutoConfig.register(new_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    _share_weight_renamings(model_type, new_type)
    # module attributes under their names, so configs and models pickle by reference (vLLM spawns processes)
    globals()[cfg_cls.__name__], globals()[model_cls.__name__] = cfg_cls, model_cls
    return cfg_cls, model_cls


def _share_weight_renamings(model_type: str, new_type: str) -> None:
    """Give moeify_<type> the base type's checkpoint key renamings, so save and reload agree.

    transformers renames some modules when it saves MoE models (Mixtral's `mlp` is
    written as `block_sparse_moe`) and undoes it on load, looked up by model_type.
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
    except ImportError:  # an older transformers without conversion mappings
        return
    mapping = get_checkpoint_conversion_mapping(model_type)
    if mapping:
        register_checkpoint_conversion_mapping(new_type, mapping, overwrite=True)


def classes_for(model_type: str, base: tuple[type, type] | None = None) -> tuple[type, type]:
    """(config class, model class) for a base model_type, created and registered on first use.

    ``base``: the (config class, CausalLM class) to build on instead of transformers' Auto classes (an
    auto-detected architecture converted from a loaded model). Call ``classes_for("my_llama")`` in a fresh
    process, after registering my_llama with the Auto classes, to reload a ``moeify_my_llama`` checkpoint.
    """
    cached = _CLASSES.get(model_type)
    if cached is None or (base is not None and cached[0].__mro__[1] is not base[0]):
        _CLASSES[model_type] = _make_classes(model_type, base)
    return _CLASSES[model_type]


def register_all() -> None:
    for mt in DENSE_TYPES + MOE_TYPES:
        try:
            classes_for(mt)
        except InputError:  # an older transformers without this architecture
            log.debug("transformers has no %s; not registered", mt)


def as_moeify_model(model, moeify_cfg: dict[str, Any]):
    """Turn a converted base model in place into moeify's class, with the plan in its config."""
    from .arch import base_model_type

    mt = base_model_type(model.config)
    if mt in DENSE_TYPES + MOE_TYPES or model.config.model_type != mt:
        cfg_cls, model_cls = classes_for(mt)  # a listed architecture, or already one of moeify's classes
    else:  # an auto-detected architecture: build on the model's own classes (the Auto classes may not know them)
        cfg_cls, model_cls = classes_for(mt, (type(model.config), type(model)))
    d = model.config.to_dict()
    for k in ("model_type", "architectures", "moeify", "transformers_version"):
        d.pop(k, None)
    moeify_cfg = {"format_version": FORMAT_VERSION, "base_model_type": mt, **moeify_cfg}
    cfg = cfg_cls(**d, moeify=moeify_cfg)
    cfg.architectures = [model_cls.__name__]
    model.config = cfg
    model.__class__ = model_cls
    return model


# --------------------------------------------------------------------------- saving (the classes' save_pretrained)


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
    lines += _recovery_card(s.get("refit"), m.get("finetune"))
    return "\n".join(lines) + "\n"


def _recovery_card(refit: dict[str, Any] | None, ft: dict[str, Any] | None) -> list[str]:
    """The model card's lines for a refit conversion and for `moeify finetune` (what was trained, on what, the result)."""
    lines: list[str] = []
    if refit:
        lines += ["", "## Refit at conversion (closed form, docs/methods.md §6)", "",
                  f"- layers refit: {refit.get('layers_changed')} of {refit.get('layers')}",
                  f"- block error on the calibration tokens: {refit['calibration_error_before']:.4f} -> {refit['calibration_error_after']:.4f}",
                  f"- block error on the held-out tokens: {refit['heldout_error_before']:.4f} -> {refit['heldout_error_after']:.4f}"]
    if ft:
        st = ft.get("settings", {})
        trained = ", ".join(st.get("what") or [])
        lines += ["", f"## Fine-tuning (`moeify finetune`, {ft.get('mode')} mode)", "",
                  f"- trained: {trained}; LoRA rank {st.get('lora_rank')}, alpha {st.get('lora_alpha')}, merged",
                  f"- text: {st.get('text')}, {st.get('samples')} windows x {st.get('seq_len')} tokens, seed {st.get('seed')}"]
        if ft.get("steps") is not None:
            lines.append(f"- {ft['steps']} steps, {ft.get('tokens')} tokens, {ft.get('seconds', float('nan')) / 60:.1f} min")
        loss = ft.get("loss") or {}
        if loss.get("first") is not None:
            lines.append(f"- loss {loss['first']:.4f} -> {loss['last']:.4f}")
        ppl = ft.get("ppl")
        if ppl and ppl.get("after") is not None:
            dense = f"{ppl['dense']:.4f}" if ppl.get("dense") is not None else "n/a"
            lines += ["", f"| perplexity ({ppl.get('protocol')}) | dense | before | after |", "|---|---|---|---|",
                      f"| | {dense} | {ppl['before']:.4f} | {ppl['after']:.4f} |"]
    return lines


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
