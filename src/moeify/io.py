"""Models in and checkpoints out: hub ids, safetensors folders, GGUF files; atomic saves.

Safe by default: only safetensors weights are loaded (a pickle-only checkpoint is
refused), and remote code is off unless the caller asks for it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

log = logging.getLogger("moeify")

DEFAULT_ALIASES = ("smollm2", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16.")
    return DTYPES[name]


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """A local path or hub id; the default model (and its aliases) resolve to the offline cache."""
    from .assets import DEFAULT_MODEL, pull_default_model

    if name_or_path is None or str(name_or_path) in DEFAULT_ALIASES or str(name_or_path) == DEFAULT_MODEL:
        return str(pull_default_model())
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

    from . import modeling  # noqa: F401  (moeify_* model types)
    from .arch import check_config_supported

    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise InputError(f"GGUF file {p} does not exist.")
        cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    elif p.exists():
        check_weights(p)
        cfg = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    else:
        try:
            cfg = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        except OSError as e:
            raise InputError(
                f"could not find model {name_or_path!r}: not a local path, and the hub lookup failed ({e}). "
                "Pass a local folder with config.json + *.safetensors, a .gguf file, or run `moeify pull` for the default model."
            ) from None
    check_config_supported(cfg)
    return cfg


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """(model, tokenizer) from a hub id, a local safetensors folder, or a GGUF file (dequantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import modeling  # noqa: F401

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


def prepare_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Check the output path up front, before any expensive work."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"output {out} already exists; choose another path or pass --overwrite (overwrite=True) to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def atomic_dir(out: Path, write, overwrite: bool) -> Path:
    """Run write(tmp_dir), then rename tmp_dir into place; a failure leaves `out` untouched."""
    out = prepare_output(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
