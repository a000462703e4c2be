"""A checkpoint's tensors read one module at a time, from safetensors shards or a GGUF file.

The streaming conversion (pipeline/streaming.py) never holds the whole model: it
builds the model's skeleton without storage (accelerate's `init_empty_weights`),
then fills one decoder layer at a time from a `WeightSource` and empties it again.

- safetensors: each shard is opened with `safe_open` (a memory map); a tensor is
  read when asked for. Checkpoints whose on-disk names differ from the modules'
  (transformers' conversion mappings: MoE models store one tensor per expert and
  fuse them on load) are refused with a pointer to the in-memory path.
- GGUF: the `gguf` package's reader (a memory map) and dequantiser, one tensor at a
  time, with transformers' GGUF name map and tensor processors (the same
  dequantised values as `from_pretrained(..., gguf_file=...)`). Embedding rows are
  dequantised only for the token ids the calibration uses (`rows`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import InputError


class WeightSource:
    """Tensors by their names in the model's state dict (`model.state_dict()` keys)."""

    kind = "?"

    def keys(self) -> set[str]:
        raise NotImplementedError

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor (an embedding table) without reading the others."""
        return self.load([name])[name][ids]

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor once read in its stored dtype (an upper bound for quantised GGUF tensors: float32)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- safetensors


class SafetensorsSource(WeightSource):
    kind = "safetensors"

    def __init__(self, folder: str | Path, model: nn.Module | None = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        self._handles = {f: safe_open(str(self.folder / f), framework="pt") for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                if weight_map is None or weight_map.get(k) == f:
                    self._where[k] = f
        if model is not None:  # names on disk that are not the modules' (transformers renames on load, e.g. fused experts)
            wanted = {k for k in model.state_dict() if not _tied(model, k)}
            missing = sorted(wanted - set(self._where), key=_natural)
            if missing:
                raise InputError(
                    f"{self.folder}: {len(missing)} tensor(s) of the model are not stored under their module names (e.g. {missing[0]}); "
                    "transformers converts this checkpoint format while loading (MoE models store one tensor per expert), which "
                    "the streaming path does not do. Convert it in memory: moeify convert --in-memory (or moeify.convert)."
                )

    def keys(self) -> set[str]:
        return set(self._where)

    def _get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._where]
        if missing:
            raise InputError(f"{self.folder}: the checkpoint has no tensor(s) {missing[:3]}; it does not match its config.json "
                             "(re-download or re-save it).")
        return {n: self._get(n) for n in names}

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        sl = self._handles[self._where[name]].get_slice(name)
        n = sl.get_shape()[0]
        chunk = 4096
        ids = ids.long()
        order = torch.argsort(ids)
        sorted_ids = ids[order]
        parts = []
        for a in range(0, n, chunk):
            sel = sorted_ids[(sorted_ids >= a) & (sorted_ids < a + chunk)]
            if sel.numel():
                parts.append(sl[a : a + chunk][sel - a])
        out = torch.cat(parts) if parts else torch.empty(0)
        res = torch.empty_like(out)
        res[order] = out
        return res

    def nbytes(self, name: str) -> int:
        sl = self._handles[self._where[name]].get_slice(name)
        numel = 1
        for d in sl.get_shape():
            numel *= int(d)
        return numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _tied(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in s.split(".")]


# --------------------------------------------------------------------------- GGUF


def _gguf_arch_processor(config):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .arch import base_model_type

    arch = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.get(base_model_type(config), base_model_type(config))
    cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    return cls(config=config.to_dict())


class GGUFSource(WeightSource):
    kind = "gguf"

    def __init__(self, path: str | Path, model: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        self.path = Path(path)
        self.reader = GGUFReader(str(self.path))
        self.processor = _gguf_arch_processor(model.config)
        from .arch import base_model_type

        gguf_to_hf = get_gguf_hf_weights_map(model, self.processor, model_type=base_model_type(model.config))
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._where = {hf: g for g, hf in gguf_to_hf.items() if g in self._tensors}
        if getattr(model.config, "tie_word_embeddings", False):
            self._where.pop("lm_head.weight", None)

    def check_types(self) -> None:
        """Every tensor's type is one the dequantiser knows (before any layer is processed)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import _type_traits

        known = set(_type_traits) | {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
        bad = sorted({t.tensor_type.name for t in self.reader.tensors if t.tensor_type not in known})
        if bad:
            raise InputError(f"{self.path}: tensor type(s) {', '.join(bad)} cannot be dequantised by the installed gguf package "
                             f"(knows {', '.join(sorted(k.name for k in known))}); upgrade gguf (pip install -U gguf) or use a "
                             "GGUF file quantised with a supported type.")

    def keys(self) -> set[str]:
        return set(self._where)

    def _dequantize(self, name: str, rows=None) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        t = self._tensors[self._where[name]]
        data = t.data if rows is None else t.data[rows.numpy()]
        w = dequantize(data, t.tensor_type)
        if rows is None:
            w = self.processor.process(weights=w, name=t.name, tensor_key_mapping={}, parsed_parameters={"tensors": {}}).weights
        return torch.from_numpy(np.ascontiguousarray(w).copy())

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._where]
        if missing:
            raise InputError(f"{self.path}: the GGUF file has no tensor for {missing[:3]}; it does not match its own metadata.")
        return {n: self._dequantize(n) for n in names}

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self._dequantize(name, rows=ids.long())

    def nbytes(self, name: str) -> int:
        return int(self._tensors[self._where[name]].n_elements) * 4


def open_source(path: str | Path, model: nn.Module) -> WeightSource:
    """The weight source of a model folder (safetensors) or a .gguf file, mapped onto `model`'s state-dict names."""
    p = Path(path)
    if p.suffix == ".gguf":
        src = GGUFSource(p, model)
        src.check_types()
        return src
    return SafetensorsSource(p, model)


__all__ = ["GGUFSource", "SafetensorsSource", "WeightSource", "open_source"]
