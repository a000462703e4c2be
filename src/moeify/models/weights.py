"""A checkpoint's tensors read one module at a time, from safetensors shards or a GGUF file.

The streaming conversion (pipeline/streaming.py) never holds the whole model: it
builds the model's skeleton without storage (accelerate's `init_empty_weights`),
then fills one decoder layer at a time from a `WeightSource` and empties it again.

- safetensors: each shard is opened with `safe_open` (a memory map); a tensor is
  read when asked for. Checkpoints whose on-disk names differ from the modules'
  (transformers' conversion mappings: MoE models store one tensor per expert and
  fuse them on load) are converted with that mapping, a layer at a time, and
  written back under the names transformers saves (`checkpoint_names`).
- GGUF: the `gguf` package's reader (a memory map) and dequantiser, one tensor at a
  time, with transformers' GGUF name map and tensor processors (the same
  dequantised values as `from_pretrained(..., gguf_file=...)`). Embedding rows are
  dequantised only for the token ids the calibration uses (`rows`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from ..errors import InputError


class WeightSource(ABC):
    """Tensors by their names in the model's state dict (`model.state_dict()` keys)."""

    kind = "?"

    @abstractmethod
    def keys(self) -> set[str]:
        """The module names this source can give."""

    @abstractmethod
    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as stored (GGUF: dequantised to float32)."""

    @abstractmethod
    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor (an embedding table) without reading the others."""

    @abstractmethod
    def nbytes(self, name: str) -> int:
        """Bytes of the tensor once read in its stored dtype (an upper bound for quantised GGUF tensors: float32)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header."""

    def row_blocks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """The tensor in blocks of `rows` rows, in order (a block at a time in memory: embedding tables, LM heads)."""
        t = self.load([name])[name]
        yield from t.split(rows)


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
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[list[int], str]] = {}
        for f in files:
            with safe_open(str(self.folder / f), framework="pt") as h:
                for k in h.keys():
                    if weight_map is None or weight_map.get(k) == f:
                        self._where[k] = f
                        sl = h.get_slice(k)
                        self._shapes[k] = (list(sl.get_shape()), sl.get_dtype())
        self._model = model
        self._renamed: dict[str, str] = {}  # on-disk name -> module name, where transformers converts on load
        if model is not None:
            wanted = {k for k in model.state_dict() if not tied_head(model, k)}
            if wanted - set(self._where):  # e.g. MoE models store one tensor per expert, fused into one parameter on load
                self._renamed = {k: _loaded_name(model, k) for k in self._where}
            missing = sorted(wanted - set(self._where) - set(self._renamed.values()), key=_natural)
            if missing:
                raise InputError(f"{self.folder}: the checkpoint has no tensor for {len(missing)} of the model's parameters (e.g. "
                                 f"{missing[0]}); it does not match its config.json (re-download or re-save it).")

    def keys(self) -> set[str]:
        return set(self._where)

    def _open(self, file: str):
        """A shard opened for one read and closed after it: its memory map (pages count as resident) is released."""
        from safetensors import safe_open

        return safe_open(str(self.folder / file), framework="pt")

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._where]
        if missing and self._renamed:
            return self._load_converted(names)
        if missing:
            raise InputError(f"{self.folder}: the checkpoint has no tensor(s) {missing[:3]}; it does not match its config.json "
                             "(re-download or re-save it).")
        return self._read(names)

    def _load_converted(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The modules' tensors made from the on-disk ones by transformers' conversion mapping (the load direction)."""
        wanted = set(names)
        disk = [k for k, target in self._renamed.items() if target in wanted]
        converted = convert_checkpoint_keys(self._model, self._read(disk))
        missing = [n for n in names if n not in converted]
        if missing:
            raise InputError(f"{self.folder}: could not build {missing[:3]} from the checkpoint's tensors; it does not match its config.json.")
        return {n: converted[n] for n in names}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for file in sorted({self._where[n] for n in names}):
            with self._open(file) as h:
                out.update({n: h.get_tensor(n) for n in names if self._where[n] == file})
        return {n: out[n] for n in names}

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Read in blocks of rows, keeping the wanted ones (a block at a time in memory)."""
        n = self._shapes[name][0][0]
        chunk = 4096
        ids = ids.long()
        order = torch.argsort(ids)
        sorted_ids = ids[order]
        parts = []
        with self._open(self._where[name]) as h:
            sl = h.get_slice(name)
            for a in range(0, n, chunk):
                sel = sorted_ids[(sorted_ids >= a) & (sorted_ids < a + chunk)]
                if sel.numel():
                    parts.append(sl[a : a + chunk][sel - a])
        out = torch.cat(parts)
        res = torch.empty_like(out)
        res[order] = out
        return res

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name][0])

    def row_blocks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        n = self._shapes[name][0][0]
        for a in range(0, n, rows):
            with self._open(self._where[name]) as h:
                yield h.get_slice(name)[a : a + rows]

    def nbytes(self, name: str) -> int:
        shape, dtype = self._shapes[name]
        numel = 1
        for d in shape:
            numel *= int(d)
        return numel * _DTYPE_BYTES.get(dtype, 4)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _conversions(model: nn.Module):
    """(renamings, converters): transformers' checkpoint conversion mapping of this model (empty without one)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover - a transformers without conversion mappings stores modules' names
        return [], []
    transforms = get_model_conversion_mapping(model, add_legacy=False) or []
    return [t for t in transforms if not isinstance(t, WeightConverter)], [t for t in transforms if isinstance(t, WeightConverter)]


def _loaded_name(model: nn.Module, key: str) -> str:
    """The module name an on-disk tensor name becomes when transformers loads the checkpoint."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model)
    return rename_source_key(key, renamings, converters)[0]


def convert_checkpoint_keys(model: nn.Module, on_disk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk tensors -> the modules' tensors, with transformers' conversion mapping of `model` (renamings, then
    converters such as per-expert tensors merged into one fused parameter); the same operations as from_pretrained."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model)
    groups: dict[str, tuple[object, dict[str, list[torch.Tensor]]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(on_disk, key=_natural):  # experts in index order
        target, pattern = rename_source_key(key, renamings, converters)[:2]
        if pattern is None:
            out[target] = on_disk[key]
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        groups.setdefault(target, (conv, {}))[1].setdefault(pattern, []).append(on_disk[key])
    for target, (conv, collected) in groups.items():
        tensors = {p: collected[p] for p in conv.source_patterns if p in collected}
        for op in conv.operations:
            tensors = op.convert(tensors, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                 full_layer_name=target, model=model, config=getattr(model, "config", None))
        (out[target],) = tensors.values()
    return out


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The modules' tensors under the names transformers saves them with (its conversion mapping reversed)."""
    if not any(_conversions(model)):
        return tensors
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def tied_head(model: nn.Module, key: str) -> bool:
    """The LM head's weight when it is the embedding's (not stored, not written)."""
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
        self.reader.fields.clear()  # the tokenizer's vocabulary and merges as numpy views: hundreds of MiB, not needed here
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
        out = torch.from_numpy(np.ascontiguousarray(w).copy())
        self._release()
        return out

    def _release(self) -> None:
        """Drop the file's pages from this process's resident set (they stay in the page cache)."""
        import mmap

        mm = getattr(self.reader.data, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._where]
        if missing:
            raise InputError(f"{self.path}: the GGUF file has no tensor for {missing[:3]}; it does not match its own metadata.")
        return {n: self._dequantize(n) for n in names}

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self._dequantize(name, rows=ids.long())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[self._where[name]].shape.tolist()))

    def row_blocks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """Dequantised a block of rows at a time; only for tensors the tensor processors leave unchanged."""
        if self._where[name] not in ("token_embd.weight", "output.weight"):
            yield from super().row_blocks(name, rows)
            return
        n = self.shape(name)[0]
        for a in range(0, n, rows):
            yield self._dequantize(name, rows=torch.arange(a, min(a + rows, n)))

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


__all__ = ["GGUFSource", "SafetensorsSource", "WeightSource", "checkpoint_names", "convert_checkpoint_keys", "open_source", "tied_head"]
