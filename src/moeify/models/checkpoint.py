"""Models in and checkpoints out: hub ids, safetensors folders, GGUF files; atomic saves, model cards.

Safe by default: only safetensors weights are loaded (a pickle-only checkpoint is
refused), and remote code is off unless the caller asks for it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_dir, prepare_output
from .modeling import classes_for, model_card, save
from ..data.assets import DEFAULT_ALIASES
from ..errors import InputError

log = logging.getLogger("moeify")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16.")
    return DTYPES[name]


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """A local path or hub id; the default model, the 1.5B Qwen coder (and their aliases) resolve to the offline cache."""
    from ..data.assets import QWEN_CODER_ALIASES, pull_default_model, pull_qwen_coder

    if name_or_path is None or str(name_or_path) in DEFAULT_ALIASES:
        return str(pull_default_model())
    if str(name_or_path).lower() in QWEN_CODER_ALIASES:  # the GGUF asset (the hub id itself stays a hub id)
        return str(pull_qwen_coder())
    return str(name_or_path)


def check_weights(path: Path) -> None:
    """Before loading: the folder has a config and readable safetensors weights, not only pickles."""
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; point at a Hugging Face model folder (or a .gguf file).")
    st = sorted(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not st:
        if pickles:
            raise InputError(
                f"{path} holds only pickle weights ({', '.join(p.name for p in pickles[:3])}); moeify never unpickles "
                "checkpoints. Convert them to safetensors first (e.g. load with transformers in a trusted environment "
                "and call save_pretrained(..., safe_serialization=True))."
            )
        raise InputError(f"{path} has no weights (*.safetensors); the checkpoint is incomplete - re-download or re-save it.")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{index} is corrupt ({e}); re-download or re-save the checkpoint.") from None
        missing = [s for s in sorted(shards) if not (path / s).is_file()]
        if missing:
            raise InputError(f"{path} is missing weight shard(s) {missing}; re-download or re-save the checkpoint.")
    from safetensors import safe_open

    for f in st:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
        except Exception as e:  # safetensors raises several error types for bad headers
            raise InputError(f"{f} is not a readable safetensors file ({e}); it is corrupt or truncated - re-download or re-save it.") from None
        if not keys:
            raise InputError(f"{f} holds no tensors; re-download or re-save the checkpoint.")
        size = f.stat().st_size
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise InputError(f"{f} is truncated ({size} bytes, header says {8 + header_len + end}); re-download or re-save it.")


def load_config(name_or_path: str, *, trust_remote_code: bool = False):
    """The model's config, for checks that must happen before weights are read."""
    from transformers import AutoConfig

    from .arch import check_config_supported

    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise InputError(f"GGUF file {p} does not exist.")
        cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    elif p.exists():
        check_weights(p)
        _register_moeify_type(p)
        cfg = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    else:
        _check_hub_model(str(name_or_path))  # seconds, not half a minute of retries, when the hub is unreachable
        try:
            cfg = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        except OSError as e:
            raise InputError(
                f"could not find model {name_or_path!r}: not a local path, and the hub lookup failed ({e}). "
                "Pass a local folder with config.json + *.safetensors, a .gguf file, or run `moeify pull` for the default model."
            ) from None
    check_config_supported(cfg)
    return cfg


def _register_moeify_type(folder: Path) -> None:
    """moeify_<x> classes for a checkpoint of an architecture moeify only auto-detects (built from x's Auto classes)."""
    try:
        mt = str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # AutoConfig reports an unreadable config.json
    if mt.startswith("moeify_"):
        classes_for(mt[len("moeify_"):])


# --------------------------------------------------------------------------- checks before any weight is read


def _looks_like_path(text: str) -> bool:
    """A model argument that can only be a local path (a hub id is NAME or ORG/NAME)."""
    import re

    return (text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or text.count("/") > 1 or text.endswith("/")
            or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", text) or ".." in text or "--" in text)


def _hub_model_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any cache problem: not usable offline
        return False


def _check_hub_model(name: str) -> None:
    """A model argument that is not a local path: a hub id, which needs the hub or a cached copy."""
    if _looks_like_path(name):
        raise InputError(f"no such model folder {Path(name).expanduser()}; give a local folder with config.json + *.safetensors, a .gguf "
                         "file, a hub id, or nothing for the default model (`moeify pull`).")
    from ..data.texts import hub_status

    why = hub_status()
    if why is None:
        return
    if not _hub_model_cached(name):
        raise InputError(f"{name!r} is not a local folder, and the Hugging Face hub is not reachable ({why}) with no "
                         "cached copy; pass a local folder with config.json + *.safetensors or a .gguf file, or run "
                         "`moeify pull` for the default model.")
    os.environ["HF_HUB_OFFLINE"] = "1"  # read the cached copy without retrying the network
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def check_model_source(name_or_path: str | os.PathLike | None, *, what: str = "MODEL", trust_remote_code: bool = False):
    """Resolve a model argument and check it before any weight is read: ``(path, config)``.

    A local folder must hold config.json and readable safetensors weights (check_weights), a .gguf file must
    exist, and a hub id needs the hub (one short reachability check, no minute of retries) or a cached copy.
    Every error names ``what`` (``MODEL``, ``--baseline``, ...) and is one line.
    """
    try:
        path = resolve_model_path(name_or_path)
        p = Path(path).expanduser()
        if p.suffix == ".gguf":
            if not p.is_file():
                raise InputError(f"GGUF file {p} does not exist.")
        elif p.exists():
            if not p.is_dir():
                raise InputError(f"{p} is a file; give a model folder (config.json + *.safetensors) or a .gguf file.")
        try:  # a hub id is checked there: the hub answers, or a cached copy exists
            cfg = load_config(path, trust_remote_code=trust_remote_code)
        except InputError:
            raise
        except (OSError, ValueError, KeyError) as e:  # a config.json transformers cannot read
            raise InputError(f"cannot read its config ({type(e).__name__}: {' '.join(str(e).split())[:300]}).") from None
    except InputError as e:
        raise InputError(f"{what} {name_or_path if name_or_path is not None else '(default)'}: {e}") from None
    return path, cfg


def load_tokenizer(path: str, *, trust_remote_code: bool = False, what: str = "MODEL"):
    """The model's tokenizer alone (seconds, unlike the weights): text sources are checked with it before loading."""
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        msg = " ".join(str(e).split())
        raise InputError(f"{what} {path}: could not load its tokenizer ({type(e).__name__}: {msg[:300]}); the folder needs "
                         "tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json).") from None


def recorded_base_model(config) -> str | None:
    """The base model a moeify checkpoint records (provenance.base_model), from its config alone; None otherwise."""
    mo = getattr(config, "moeify", None)
    if not isinstance(mo, dict):
        return None
    return (mo.get("provenance") or {}).get("base_model") or None


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """(model, tokenizer) from a hub id, a local safetensors folder, or a GGUF file (dequantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    dt = parse_dtype(dtype)
    load_config(path, trust_remote_code=trust_remote_code)
    p = Path(path)
    kw: dict[str, Any] = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kw)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name) if with_tokenizer else None
        model.hf_quantizer = None  # weights are dequantised to plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kw)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code) if with_tokenizer else None
    model.eval()
    if not getattr(model, "name_or_path", None):
        model.name_or_path = path
    model._moeify_origin = str(name_or_path) if name_or_path is not None else DEFAULT_ALIASES[-1]
    return model, tok


def load(path: str | os.PathLike, *, dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) of a moeify checkpoint (or any supported model)."""
    return load_model(str(path), dtype=dtype)


__all__ = ["atomic_dir", "check_model_source", "check_weights", "load", "load_config", "load_model", "load_tokenizer", "model_card",
           "parse_dtype", "prepare_output", "recorded_base_model", "resolve_model_path", "save"]
