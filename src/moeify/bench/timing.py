"""Speed of a converted model against its dense baseline (protocol.md "Speed").

Dense and converted in one process, interleaved repetitions (the order alternates every
repetition), same dtype, threads and inputs; medians, spread and speedups (moeify.bench.stats),
each next to the physical limit it is measured against (moeify.bench.cost): decode tok/s
against the bytes of weights read per token, and the attainable (Amdahl) limit from a third
timing of the baseline with its MLPs skipped; prefill tok/s against matmul FLOPs.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from .. import kernels
from ..blocks.moe import MoEMLP
from ..data.texts import perplexity_windows
from ..errors import InputError
from .cost import attainable_limit, cost_summary, mlp_modules, token_cost
from .stats import speedup, summarize

log = logging.getLogger("moeify")

WORKLOADS = ("decode", "prefill-1x2048", "prefill-8x512")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_workloads(workloads: list[str]) -> list[str]:
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise InputError(f"unknown workload(s) {bad}; choose from {', '.join(WORKLOADS)}.")
    if not workloads:
        raise InputError(f"no workload given; choose from {', '.join(WORKLOADS)}.")
    return list(workloads)


def bench_inputs(tokenizer, vocab_size: int, prompt_tokens: int = 128, seed: int = 0, text: str = "austen") -> dict[str, torch.Tensor]:
    """The same token ids for every model: held-out Austen text (protocol.md), or seeded random ids (text="random", or no tokenizer)."""
    if text not in ("austen", "random"):
        raise InputError(f"benchmark text must be 'austen' or 'random', got {text!r}.")
    need = 2 * 2048
    ids = None
    if tokenizer is not None and text == "austen":
        try:
            w = perplexity_windows(tokenizer, quick=True)
            if w.shape[0] >= 2:
                ids = w[:2].reshape(-1)
        except Exception as e:  # assets missing: fall back to random ids, and say so
            log.warning("held-out Austen text unavailable (%s); benchmarking on random token ids", e)
    source = "austen-v1 held-out windows 0-1"
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (need,), generator=g)
        source = f"random token ids (seed {seed})"
    return {
        "prompt": ids[:prompt_tokens].reshape(1, -1),
        "prefill-1x2048": ids[:2048].reshape(1, 2048),
        "prefill-8x512": ids[:4096].reshape(8, 512),
        "source": source,
    }


# --------------------------------------------------------------------------- one run of a workload


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def run_decode(model, prompt: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """Greedy generation with HF `generate` and its KV cache; decode tok/s excludes the prompt's prefill."""
    from transformers import GenerationConfig, LogitsProcessorList

    dev = model.device
    prompt = prompt.to(dev)
    clock = _StepClock()
    eos = getattr(model.generation_config, "eos_token_id", None)
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                           eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else (eos[0] if eos else 0))
    sync(dev)
    t0 = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg, logits_processor=LogitsProcessorList([clock]))
    sync(dev)
    t1 = time.perf_counter()
    n = out.shape[1] - prompt.shape[1]
    if n != new_tokens or len(clock.times) < 2:
        raise InputError(f"generate produced {n} tokens instead of {new_tokens}; the model's generation config stops early.")
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return {"tokens_per_s": decode, "end_to_end_tokens_per_s": n / (t1 - t0), "tokens": out[0, prompt.shape[1]:].tolist()}


@torch.no_grad()
def run_prefill(model, ids: torch.Tensor) -> dict[str, Any]:
    """One forward over [B, L] with the KV cache on, keeping the last position's logits (what generate's prefill does)."""
    dev = model.device
    ids = ids.to(dev)
    sync(dev)
    t0 = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    sync(dev)
    return {"tokens_per_s": ids.numel() / (time.perf_counter() - t0)}


def run_workload(model, workload: str, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, Any]:
    """One run of `workload` (one of WORKLOADS) on the ids from bench_inputs."""
    if workload == "decode":
        return run_decode(model, inputs["prompt"], new_tokens)
    return run_prefill(model, inputs[workload])


def skipped_mlp_forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """An MLP's forward while SkipMLPs is active: zeros, no weight read."""
    return torch.zeros_like(x)


class SkipMLPs:
    """Context: every MLP of `model` returns zeros (its weights are not read); for the attainable decode limit."""

    def __init__(self, model):
        self.mlps = mlp_modules(model)

    def __enter__(self):
        for m in self.mlps:
            m.forward = skipped_mlp_forward
        return self

    def __exit__(self, *exc):
        for m in self.mlps:
            del m.forward


def _run_named(models: dict[str, nn.Module], name: str, wl: str, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, Any]:
    if name == "no_mlp":
        with SkipMLPs(models["baseline"]):
            return run_workload(models["baseline"], wl, inputs, new_tokens)
    return run_workload(models[name], wl, inputs, new_tokens)


# --------------------------------------------------------------------------- dense vs converted


def compare_models(
    model,
    baseline,
    tokenizer=None,
    *,
    workloads: list[str] | tuple[str, ...] = WORKLOADS,
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 128,
    prompt_tokens: int = 128,
    text: str = "austen",
    attainable: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Dense `baseline` vs converted `model`, interleaved in this process: tokens/s, speedups, limits.

    attainable: also time the baseline's decode with its MLPs skipped (one more generation per
    repetition) for the attainable (Amdahl) limit next to the bytes limit.
    """
    workloads = check_workloads(list(workloads))
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}.")
    if new_tokens < 2:
        raise InputError(f"new_tokens must be >= 2 (decode speed is timed between generation steps), got {new_tokens}.")
    p_model, p_base = next(model.parameters()), next(baseline.parameters())
    if p_model.dtype != p_base.dtype or p_model.device != p_base.device:
        raise InputError(f"model ({p_model.dtype}, {p_model.device}) and baseline ({p_base.dtype}, {p_base.device}) must share dtype and device.")
    model.eval()
    baseline.eval()
    dtype = p_model.dtype
    inputs = bench_inputs(tokenizer, int(model.config.vocab_size), prompt_tokens, text=text)
    cost_m, cost_b = token_cost(model), token_cost(baseline)
    models = {"baseline": baseline, "model": model}
    results: dict[str, Any] = {}
    for wl in workloads:
        runs: dict[str, list[float]] = {"baseline": [], "model": []}
        extra: dict[str, Any] = {}
        no_mlp = attainable and wl == "decode"
        names = ("baseline", "model", "no_mlp") if no_mlp else ("baseline", "model")
        if no_mlp:
            runs["no_mlp"] = []
        for name in names:
            for _ in range(warmup):
                _run_named(models, name, wl, inputs, new_tokens)
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                res = _run_named(models, name, wl, inputs, new_tokens)
                runs[name].append(res["tokens_per_s"])
                if name == "no_mlp":
                    continue
                if wl == "decode":
                    extra.setdefault(f"{name}_end_to_end_tokens_per_s", []).append(res["end_to_end_tokens_per_s"])
                    extra[f"{name}_tokens"] = res["tokens"]
            if progress:
                progress(f"{wl} {r + 1}/{repeats}: baseline {runs['baseline'][-1]:.1f} tok/s, model {runs['model'][-1]:.1f} tok/s")
        if wl == "decode":
            limit = cost_b.decode_bytes(dtype) / cost_m.decode_bytes(dtype)
            kind = "bytes of weights read per token"
            a, b = extra.pop("baseline_tokens"), extra.pop("model_tokens")
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            extra["greedy_tokens_identical_prefix"] = same
            for k in list(extra):
                if k.endswith("end_to_end_tokens_per_s"):
                    extra[k] = summarize(extra[k])
            if no_mlp:
                t_dense, t_free = 1.0 / statistics.median(runs["baseline"]), 1.0 / statistics.median(runs.pop("no_mlp"))
                f = cost_m.mlp_active_params / cost_b.mlp_active_params if cost_b.mlp_active_params else 1.0
                att = attainable_limit(t_dense, t_free, f)
                extra["attainable"] = {
                    "limit": att, "mlp_fraction": f, "dense_ms_per_token": 1e3 * t_dense, "no_mlp_ms_per_token": 1e3 * t_free,
                    "kind": "Amdahl: measured non-MLP time per token + MLP time scaled by the fraction of MLP weights read",
                    "of_limit": (t_dense * statistics.median(runs["model"])) / att,
                }
        else:
            bsz, seq = inputs[wl].shape
            limit = cost_b.prefill_flops(bsz, seq) / cost_m.prefill_flops(bsz, seq)
            kind = "matmul FLOPs (causal attention, one LM-head row per sequence)"
        results[wl] = {
            "unit": "tokens/s",
            "baseline": summarize(runs["baseline"]),
            "model": summarize(runs["model"]),
            **speedup(runs["baseline"], runs["model"], True, limit, kind),
            **extra,
        }
    return {
        "workloads": results,
        "inputs": inputs["source"],
        "settings": {"repeats": repeats, "warmup": warmup, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                     "dtype": str(dtype).replace("torch.", ""), "device": str(p_model.device), "threads": torch.get_num_threads(),
                     "interleaved": "baseline/model order alternates every repetition"},
        "cost": {
            "baseline": cost_summary(cost_b, dtype),
            "model": cost_summary(cost_m, dtype),
        },
        "kernels": kernel_summary(model),
        "decode_steps": kernels.decode_steps(model),
        "native": kernels.native.describe(),
    }


def kernel_summary(model) -> dict[str, int]:
    """How many MoE blocks run which backend (None = auto)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, MoEMLP):
            k = "auto" if m.kernel is None else getattr(m.kernel, "__name__", str(m.kernel)).lstrip("_")
            out[k] = out.get(k, 0) + 1
    return out


def device_name(device: str) -> str:
    """The GPU's or CPU's model name, recorded with the timings."""
    import platform

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name
