"""Streaming conversion: a model larger than memory converted one decoder layer at a time, from disk to disk.

The same pipeline as `convert` (sequential.py for calibrated methods, convert.py's
weights-only loop for data-free ones), on a model skeleton without storage:

1. the skeleton is built with accelerate's `init_empty_weights` (parameters on the
   meta device, no memory); the weight source (models/weights.py) maps its tensors;
2. the tensors outside the decoder layers are copied to the output one at a time
   (the LM head is not needed to convert); the embedding keeps only the rows of
   the token ids the calibration uses, the final norm and rotary tables are filled;
3. for each layer (`LayerLoader.load`): its tensors are read (safetensors memory
   map, or GGUF dequantised tensor by tensor) onto the compute device; the
   calibration tokens run through it and its MLP is converted as in memory;
   `LayerLoader.done` writes its tensors as one output shard and empties it;
4. config (the same moeify block as the in-memory path), index, tokenizer and model
   card are written, and the staged folder is renamed into place: an interrupted
   conversion leaves nothing at the output path.

Peak memory: one layer + the calibration activations + the used embedding rows
(`estimate_memory`), whatever the model size. Every layer's time, tokens/s and the
peak resident memory so far are in the summary (`config.json["moeify"]["summary"]`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.files import prepare_output, staged_dir
from ..core.process import peak_rss_mib, return_freed_memory, rss_mib, trim_heap
from ..core.method import MethodConfig
from ..errors import InputError
from ..kernels.common import forget
from ..models.arch import activation_name, decoder_layers, mlp_sites, spec_for
from ..models.checkpoint import load_config, load_tokenizer, parse_dtype, resolve_model_path
from ..models.modeling import as_moeify_model, model_card
from ..models.weights import WeightSource, checkpoint_names, open_source, tied_head
from .convert import check_request, config_intermediate_sizes, convert_weights_only, log_converted, moeify_config, prepare_calibration, site_sizes

log = logging.getLogger("moeify")

MIB = 1 << 20
BIG_TENSOR_BYTES = 16 * MIB  # tensors outside the layers from this size on are written a block of rows at a time


def resolve_device(device: str | torch.device | None) -> torch.device:
    """cpu | cuda[:N] | auto (cuda when available); a device that is not there is refused."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is visible to torch here; use --device cpu (or auto).")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: moeify converts on cpu or cuda.")
    return dev


def skeleton(cfg, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The CausalLM of `cfg` with every parameter on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _layers_prefix(spec) -> str:
    return spec.layers + "."


def _state_names(module: nn.Module) -> list[str]:
    return list(module.state_dict().keys())


def fill(module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype, device: torch.device) -> None:
    """Give `module` (parameters on meta) its tensors from `source`, cast to dtype, on device."""
    names = _state_names(module)
    tensors = source.load(prefix + n for n in names)
    sd = {n: _cast(tensors[prefix + n], dtype).to(device) for n in names}
    module.load_state_dict(sd, assign=True, strict=True)
    module.to(device)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class _RowsOnly:
    """An embedding that holds only the rows of the given token ids (forward pre-hook maps ids to rows)."""

    def __init__(self, embed: nn.Embedding, ids: torch.Tensor, rows: torch.Tensor):
        self.ids = ids
        embed.weight = nn.Parameter(rows, requires_grad=False)
        embed.padding_idx = None
        embed.register_forward_pre_hook(self._remap)

    def _remap(self, module, args):
        idx = torch.searchsorted(self.ids, args[0].to(self.ids.device))
        return (idx,) + tuple(args[1:])


class ShardWriter:
    """Writes the output's safetensors shards and their index, one group of tensors at a time."""

    def __init__(self, folder: Path, total: int):
        self.folder, self.total, self.count = folder, total, 0
        self.weight_map: dict[str, str] = {}
        self.bytes = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """A group of tensors (one decoder layer) as one shard, each written from its own memory (no copies)."""
        if tensors:
            self._shard([(k, tuple(v.shape), v.dtype, [v]) for k, v in tensors.items()])

    def write_rows(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, blocks) -> None:
        """One large tensor as its own shard, written block of rows by block (never whole in memory)."""
        self._shard([(name, tuple(shape), dtype, blocks)])

    def _shard(self, entries: list[tuple[str, tuple[int, ...], torch.dtype, Any]]) -> None:
        """The safetensors layout (8-byte header length, JSON header, raw little-endian data), written incrementally:
        the safetensors package writes only whole tensors through a bytes copy of each; files are read back by safe_open."""
        from safetensors.torch import _TYPES  # the package's own dtype names

        codes = {v: k for k, v in _TYPES.items()}
        self.count += 1
        file = f"model-{self.count:05d}-of-{self.total:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        sizes = []
        for name, shape, dtype, _ in entries:
            numel = 1
            for d in shape:
                numel *= int(d)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            sizes.append(nbytes)
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.folder / file, "wb") as fh:
            fh.write(len(head).to_bytes(8, "little"))
            fh.write(head)
            for (name, _, dtype, blocks), nbytes in zip(entries, sizes):
                written = 0
                for block in blocks:
                    b = block.detach().to("cpu", dtype).contiguous().reshape(-1)
                    fh.write(b.view(torch.uint8).numpy())
                    written += b.numel() * b.element_size()
                if written != nbytes:
                    raise RuntimeError(f"{name}: wrote {written} bytes, expected {nbytes}")
                self.weight_map[name] = file
        self.bytes += offset

    def finish(self) -> None:
        if self.count != self.total:
            raise RuntimeError(f"wrote {self.count} shards, planned {self.total}")
        index = {"metadata": {"total_size": self.bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class LayerLoader:
    """The streaming side of the pipeline: fills each decoder layer before its turn, writes and empties it after."""

    def __init__(self, model: nn.Module, spec, source: WeightSource, writer: ShardWriter, dtype: torch.dtype, device: torch.device):
        self.model, self.spec, self.source, self.writer = model, spec, source, writer
        self.dtype, self.device = dtype, device
        self.prefix = _layers_prefix(spec)
        self.per_layer: list[dict[str, Any]] = []
        self.tokens = 0
        self._t = 0.0
        self.seconds = {"outside": 0.0, "read": 0.0, "write": 0.0}
        self._read = 0.0

    def outside_groups(self) -> tuple[list[str], list[str]]:
        """The tensors outside the decoder layers: (large 2-D ones, each its own shard written by row blocks; the rest, one shard)."""
        names = [n for n in _state_names(self.model) if not n.startswith(self.prefix) and not tied_head(self.model, n)]
        big = [n for n in names if self.source.nbytes(n) >= BIG_TENSOR_BYTES and len(self.source.shape(n)) == 2]
        return big, [n for n in names if n not in big]

    def shards(self, layers: int) -> int:
        big, rest = self.outside_groups()
        return layers + len(big) + (1 if rest else 0)

    def begin(self, model: nn.Module, ids: list[torch.Tensor]) -> None:
        """Copy the tensors outside the layers to the output; fill the embedding rows of `ids` and the final norm."""
        t0 = time.perf_counter()
        self.tokens = int(sum(t.numel() for t in ids))
        emb = model.get_input_embeddings()
        emb_name = _param_name(model, emb.weight)
        big, rest = self.outside_groups()
        for n in big:  # the embedding table and the LM head, the largest tensors of a model: a block of rows at a time
            shape = self.source.shape(n)
            rows = max(1, (8 * MIB) // (4 * shape[1]))
            self.writer.write_rows(n, shape, self.dtype, self.source.row_blocks(n, rows))
        self.writer.write({n: _cast(t, self.dtype) for n, t in self.source.load(rest).items()})
        if not ids:  # a data-free method runs no tokens: the layers are all it needs
            self._t = time.perf_counter()
            self.seconds["outside"] = self._t - t0
            return
        used = torch.unique(torch.cat([t.reshape(-1) for t in ids]))
        _RowsOnly(emb, used.to(self.device), _cast(self.source.rows(emb_name, used), self.dtype).to(self.device))
        layers = decoder_layers(model, self.spec)
        head = model.get_output_embeddings()
        stored = self.source.keys()
        for name, mod in model.named_modules():
            if mod is layers or mod is emb or mod is head or name.startswith(self.prefix) or not name:
                continue
            if any(p.is_meta for p in mod.parameters(recurse=False)):
                prefix = name + "."
                if all(prefix + n in stored for n, _ in mod.named_parameters(recurse=False)):
                    fill_direct(mod, prefix, self.source, self.dtype, self.device)
            for bname, buf in list(mod.named_buffers(recurse=False)):
                if not buf.is_meta:
                    setattr(mod, bname, buf.to(self.device))
        self._t = time.perf_counter()
        self.seconds["outside"] = self._t - t0

    def load(self, index: int, layer: nn.Module) -> None:
        self._t = time.perf_counter()
        fill(layer, f"{self.prefix}{index}.", self.source, self.dtype, self.device)
        self._read = time.perf_counter() - self._t
        self.seconds["read"] += self._read

    def done(self, index: int, layer: nn.Module, stats: dict[str, Any]) -> None:
        prefix = f"{self.prefix}{index}."
        t = time.perf_counter()
        self.writer.write(checkpoint_names(self.model, {prefix + k: v for k, v in layer.state_dict().items()}))
        layer.to("meta")
        forget(layer)  # the kernels' per-block state holds views of the real weights
        trim_heap()
        write = time.perf_counter() - t
        self.seconds["write"] += write
        seconds = time.perf_counter() - self._t
        rec = {"layer": index, "seconds": round(seconds, 3), "read_seconds": round(self._read, 3), "write_seconds": round(write, 3),
               "tokens_per_s": round(self.tokens / max(seconds, 1e-9), 1), "peak_rss_mib": round(peak_rss_mib(), 1)}
        stats["streaming"] = rec
        self.per_layer.append(rec)
        log.info("layer %d streamed: %.1f s, %.0f tokens/s, peak resident %.0f MiB", index, seconds, rec["tokens_per_s"], rec["peak_rss_mib"])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def fill_direct(module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype, device: torch.device) -> None:
    """Fill only `module`'s own parameters (not its children's)."""
    for n, p in list(module.named_parameters(recurse=False)):
        t = _cast(source.load([prefix + n])[prefix + n], dtype).to(device)
        setattr(module, n, nn.Parameter(t, requires_grad=p.requires_grad))


def _param_name(model: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is param)


# --------------------------------------------------------------------------- estimates, checks before the first layer


def estimate_memory(cfg, model: nn.Module, spec, calibration, dtype: torch.dtype, experts: int = 8) -> dict[str, int]:
    """Bytes the streaming conversion will hold at most (resident memory), before anything is read.

    - now: the process as it is (libraries, tokenizer, the model's skeleton);
    - layer: one decoder layer in fp32, twice (the dense layer and the MoE block built from it);
    - activations: the hidden states of the calibration and held-out tokens, about four copies
      (stream, layer output, MLP inputs, MLP output);
    - plan: the method's own arrays over the calibration tokens, the larger of h(x) + |h|·‖d‖ +
      clustering features (three [T, I]) and h(x) + per-expert outputs ([T, I] + (E + 2) [T, H]);
    - embedding rows of the token ids used.
    Measured peaks were within 7 % of it (SmolLM2 8 × 2048, Qwen2.5-1.5B 2 × 2048, CMoE).
    """
    hidden = int(cfg.hidden_size)
    layers = decoder_layers(model, spec)
    layer0 = sum(p.numel() for p in layers[0].parameters()) * 4  # fp32 while converting
    cal_tokens = calibration.samples * calibration.seq_len if calibration is not None else 0
    tokens = cal_tokens + (calibration.heldout_tokens if calibration is not None else 0)
    item = torch.finfo(dtype).bits // 8
    sizes = config_intermediate_sizes(cfg)
    inter = max(sizes) if sizes else 0
    acts = 4 * tokens * hidden * 4
    plan = max(3 * cal_tokens * inter * 4, cal_tokens * inter * 4 + (experts + 2) * cal_tokens * hidden * 4)
    emb = min(tokens, int(cfg.vocab_size)) * hidden * item
    now = int(rss_mib() * MIB)
    return {"now": now, "layer": layer0, "activations": acts, "plan": plan, "embedding_rows": emb,
            "total": now + layer0 * 2 + acts + plan + emb}


def output_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the output weights (the dense model's size: a conversion never adds more than its routers)."""
    item = torch.finfo(dtype).bits // 8
    return int(sum(p.numel() for n, p in model.named_parameters() if not tied_head(model, n)) * item * 1.02)


def parse_memory(text: str | int | None) -> int | None:
    """'1.5GB', '800MiB', '2G', or bytes -> bytes."""
    if text is None or isinstance(text, int):
        return text
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise InputError(f"--max-memory {text!r}: give a size such as 1.5GB, 800MB or 2GiB.")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


# --------------------------------------------------------------------------- entry point


def convert_streaming(
    model: str | os.PathLike | None,
    config: MethodConfig,
    output: str | os.PathLike,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    max_memory: str | int | None = None,
    overwrite: bool = False,
    refit: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    before_rename: Callable[[Path, dict], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Convert `model` (a safetensors folder, a .gguf file, a hub id in the cache, or None for the default) from disk to
    `output` one decoder layer at a time; the checkpoint is the one `convert` + `save` write.

    device: where each layer computes (cpu | cuda | auto); each layer is filled there for its turn and emptied after.
    max_memory: refuse up front (e.g. "1.5GB") when the estimate of what the conversion holds exceeds it.
    before_rename(tmp_dir, moeify_config): runs on the finished checkpoint before it is renamed into place
    (the CLI scores perplexity there and records it).

    Returns (output path, config.json["moeify"]).
    """
    check_request(config, refit)
    if config.needs_calibration and calibration is None:
        raise InputError(f"method {config.method!r} needs calibration data: pass calibration=moeify.Calibration(...).")
    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    limit = parse_memory(max_memory)
    path = resolve_model_path(model)
    if not Path(path).exists():
        raise InputError(f"streaming conversion reads a local model folder or .gguf file; {path!r} is neither. Download it "
                         "first (e.g. huggingface-cli download), or convert in memory (moeify convert --in-memory).")
    out = prepare_output(output, overwrite)
    cfg = load_config(path, trust_remote_code=trust_remote_code)
    config.check(config_intermediate_sizes(cfg))
    tok = tokenizer if tokenizer is not None else _tokenizer_if_any(path, trust_remote_code)
    net = skeleton(cfg, dt, trust_remote_code)
    net._moeify_origin = str(model) if model is not None else None
    if net._moeify_origin is None:
        from ..data.assets import DEFAULT_ALIASES

        net._moeify_origin = DEFAULT_ALIASES[-1]
    spec = spec_for(net)
    act = activation_name(net.config, spec)
    sites = list(mlp_sites(net, spec))
    sizes = site_sizes(net, config, sites, spec, act)
    source = open_source(path, net)
    return_freed_memory()
    if calibration is not None and config.needs_calibration:
        calibration.validate(tok)
    calibration, state = prepare_calibration(net, config, calibration, tok)
    lay = getattr(config, "lay", None)  # methods that keep per-expert outputs while planning (CMoE) have a layout
    estimate = estimate_memory(cfg, net, spec, calibration if config.needs_calibration else None, dt,
                               experts=lay.experts if lay is not None else 8)
    if limit is not None and estimate["total"] > limit:
        raise InputError(
            f"--max-memory {max_memory}: this conversion needs about {estimate['total'] / MIB:.0f} MiB (this process now "
            f"{estimate['now'] / MIB:.0f} MiB, one layer twice {2 * estimate['layer'] / MIB:.0f} MiB, calibration activations "
            f"{estimate['activations'] / MIB:.0f} MiB, the method's arrays {estimate['plan'] / MIB:.0f} MiB); "
            "lower --samples or --seq-len, or raise --max-memory."
        )
    need = output_bytes(net, dt)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise InputError(f"output {out}: the checkpoint needs about {need / (1 << 30):.2f} GiB and {out.parent} has "
                         f"{free / (1 << 30):.2f} GiB free; free some space or write elsewhere (-o).")

    layers = decoder_layers(net, spec)
    dense_params = sum(p.numel() for n, p in net.named_parameters() if not tied_head(net, n))
    t0 = time.perf_counter()
    with staged_dir(out) as tmp:
        writer = ShardWriter(tmp, total=0)
        loader = LayerLoader(net, spec, source, writer, dt, dev)
        writer.total = loader.shards(len(layers))
        if config.needs_calibration:
            from .sequential import convert_sequential

            plans, extra = convert_sequential(net, config, calibration, state, tokenizer=tok, progress=progress, refit=refit, loader=loader)
        else:
            loader.begin(net, [])
            plans, extra = convert_weights_only(net, config, sites, spec, act, progress, loader=loader)
        writer.finish()
        extra["streaming"] = {"source": source.kind, "device": str(dev), "dtype": str(dt).replace("torch.", ""),
                              "peak_rss_mib": round(peak_rss_mib(), 1), "estimate_mib": {k: round(v / MIB, 1) for k, v in estimate.items()},
                              "max_memory_mib": round(limit / MIB, 1) if limit is not None else None,
                              "output_bytes": writer.bytes, "per_layer": loader.per_layer,
                              "stage_seconds": {k: round(v, 3) for k, v in loader.seconds.items()},
                              "parameters": {"dense": dense_params, "converted": sum(p.numel() for n, p in net.named_parameters() if not tied_head(net, n))}}
        moeify_cfg = moeify_config(net, config, plans, sizes, extra, time.perf_counter() - t0, refit)
        net = as_moeify_model(net, moeify_cfg)
        _write_metadata(net, tmp, tok, path)
        if before_rename is not None:
            before_rename(tmp, net.config.moeify)
            net.config.save_pretrained(str(tmp))
            (tmp / "README.md").write_text(model_card(net))
    log_converted(moeify_cfg)
    return out, net.config.moeify


def _tokenizer_if_any(path: str, trust_remote_code: bool):
    """The model's tokenizer; None for a checkpoint without one (calibration given as token windows needs none)."""
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    except InputError:
        return None


def _write_metadata(net: nn.Module, tmp: Path, tok, path: str) -> None:
    net.config.save_pretrained(str(tmp))
    gen = getattr(net, "generation_config", None)
    src_gen = Path(path) / "generation_config.json" if Path(path).is_dir() else None
    if src_gen is not None and src_gen.is_file():
        shutil.copyfile(src_gen, tmp / "generation_config.json")
    elif gen is not None:
        gen.save_pretrained(str(tmp))
    if tok is not None:
        tok.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(net))


__all__ = ["LayerLoader", "ShardWriter", "convert_streaming", "estimate_memory", "parse_memory", "resolve_device", "skeleton"]
