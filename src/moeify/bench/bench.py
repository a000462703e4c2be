"""Speed of a converted model against its dense baseline, and of one MoE layer against its MLP.

protocol.md "Speed": dense and converted in one process, interleaved repetitions
(the order alternates every repetition), same dtype, threads and inputs; medians,
spread and ratios; next to every ratio the physical limit it is measured against:

* decode (batch 1, memory-bound): weights read per token, from the actual active
  parameter count (shared + top-k experts + router per MoE layer, attention, norms,
  LM head); limit = dense bytes / converted bytes;
* prefill (compute-bound): matmul FLOPs per sequence, with the causal attention
  scores and one LM-head row per sequence (the prefill keeps one position's logits);
  limit = dense FLOPs / converted FLOPs.

Decode also gets an *attainable* limit (Amdahl): the baseline is timed a third way
with its MLPs skipped, which measures what a token costs outside the MLPs on this
machine (attention, LM head, the framework's per-layer and per-step overhead), a
cost that conversion cannot touch. attainable = t_dense / (t_no_mlp + f (t_dense -
t_no_mlp)), f = MLP weights read per token, converted / dense: the speedup if the
MoE MLPs streamed their weights exactly as fast as the dense MLPs and cost nothing
else. Where per-token overhead is large (small models, slow dispatch) it is well
below the bytes limit.

Timings are medians over repetitions; `spread` gives min, max and the
interquartile range so a noisy machine shows as such.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..blocks.routers import Router
from ..errors import InputError

log = logging.getLogger("moeify")

WORKLOADS = ("decode", "prefill-1x2048", "prefill-8x512")


# --------------------------------------------------------------------------- statistics


def summarize(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "iqr": [q[0], q[2]], "runs": list(values)}


def _ratio_block(base: list[float], model: list[float], higher_is_better: bool, limit: float | None, limit_kind: str) -> dict[str, Any]:
    """Speedup of model over base (> 1: the converted model is faster), from medians and per pair."""
    if higher_is_better:
        ratio = statistics.median(model) / statistics.median(base)
        pairs = [m / b for m, b in zip(model, base)]
    else:
        ratio = statistics.median(base) / statistics.median(model)
        pairs = [b / m for m, b in zip(model, base)]
    out = {"speedup": ratio, "speedup_pairs": summarize(pairs), "limit": limit, "limit_kind": limit_kind}
    if limit:
        out["of_limit"] = ratio / limit
    return out


# --------------------------------------------------------------------------- what a token costs


def _unique_params(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters())  # tied weights are one Parameter, listed once


def moe_active_params(block) -> float:
    """Parameters a MoEMLP reads for one token: shared expert, router, top-k experts of mean size, scales, biases."""
    from ..blocks.moe import MoEMLP

    if not isinstance(block, MoEMLP):
        return float(sum(p.numel() for p in _unique_params(block)))
    routed = 3 * block.routed_size * block.hidden_size
    fraction = 1.0 if block.all_active() else block.top_k / block.num_experts
    rest = sum(p.numel() for n, p in block.named_parameters() if n not in ("gate_up", "down"))
    return float(rest + fraction * routed)


def _mlp_modules(model) -> list[nn.Module]:
    from ..models.arch import mlp_sites

    return [s.module for s in mlp_sites(model)]


@dataclass
class TokenCost:
    """Per token: parameters read (decode) and matmul parameters (2 FLOPs each); per layer attention width."""

    read_params: float
    matmul_params: float
    lm_head_params: float
    attention_width: int  # num_heads * head_dim, for the QK^T and PV products
    layers: int
    mlp_active_params: float
    mlp_dense_params: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def decode_bytes(self, dtype: torch.dtype) -> float:
        return self.read_params * torch.empty(0, dtype=dtype).element_size()

    def prefill_flops(self, batch: int, seq: int) -> float:
        per_token = 2.0 * self.matmul_params + 4.0 * self.attention_width * self.layers * (seq + 1) / 2.0
        return batch * (seq * per_token + 2.0 * self.lm_head_params)


def token_cost(model) -> TokenCost:
    """What one token costs `model` (a dense or converted causal LM)."""
    params = _unique_params(model)
    total = float(sum(p.numel() for p in params))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is emb or (not emb.is_meta and emb.data_ptr() == head.data_ptr())
    read = total - (0.0 if tied else emb.numel())  # an untied input embedding is one row per token
    mlp_active = mlp_total = 0.0
    for m in _mlp_modules(model):
        n = float(sum(p.numel() for p in m.parameters()))
        a = moe_active_params(m)
        mlp_total += n
        mlp_active += a
        read += a - n
    linear = 0.0
    mlp_ids = {id(m) for mod in _mlp_modules(model) for m in mod.modules()}
    from ..models.arch import decoder_layers

    for layer in decoder_layers(model):
        for m in layer.modules():
            if isinstance(m, nn.Linear) and id(m) not in mlp_ids:
                linear += m.weight.numel()
    cfg = model.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", None) or (cfg.hidden_size // max(heads, 1)))
    return TokenCost(
        read_params=read, matmul_params=linear + mlp_active, lm_head_params=float(head.numel()),
        attention_width=heads * head_dim, layers=int(cfg.num_hidden_layers), mlp_active_params=mlp_active, mlp_dense_params=mlp_total,
    )


# --------------------------------------------------------------------------- model workloads


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def bench_inputs(tokenizer, vocab_size: int, prompt_tokens: int = 128, seed: int = 0, text: str = "austen") -> dict[str, torch.Tensor]:
    """The same token ids for every model: held-out Austen text (protocol.md), or seeded random ids (text="random", or no tokenizer)."""
    if text not in ("austen", "random"):
        raise InputError(f"benchmark text must be 'austen' or 'random', got {text!r}.")
    need = 2 * 2048
    ids = None
    if tokenizer is not None and text == "austen":
        try:
            from ..data.texts import perplexity_windows

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    _sync(dev)
    t0 = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg, logits_processor=LogitsProcessorList([clock]))
    _sync(dev)
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
    _sync(dev)
    t0 = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    _sync(dev)
    return {"tokens_per_s": ids.numel() / (time.perf_counter() - t0)}


class _SkipMLPs:
    """Context: every MLP of `model` returns zeros (its weights are not read); for the attainable decode limit."""

    def __init__(self, model):
        self.mlps = _mlp_modules(model)

    def __enter__(self):
        for m in self.mlps:
            m.forward = _zeros_like_input
        return self

    def __exit__(self, *exc):
        for m in self.mlps:
            del m.forward


def _zeros_like_input(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.zeros_like(x)


def attainable_limit(t_dense: float, t_no_mlp: float, mlp_fraction: float) -> float:
    """Amdahl: dense time per token over non-MLP time + the MLP time scaled by the fraction of MLP weights read."""
    return t_dense / (t_no_mlp + mlp_fraction * max(t_dense - t_no_mlp, 0.0))


def _run(model, workload: str, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, Any]:
    if workload == "decode":
        return run_decode(model, inputs["prompt"], new_tokens)
    return run_prefill(model, inputs[workload])


def check_workloads(workloads: list[str]) -> list[str]:
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise InputError(f"unknown workload(s) {bad}; choose from {', '.join(WORKLOADS)}.")
    if not workloads:
        raise InputError(f"no workload given; choose from {', '.join(WORKLOADS)}.")
    return list(workloads)


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
            **_ratio_block(runs["baseline"], runs["model"], True, limit, kind),
            **extra,
        }
    return {
        "workloads": results,
        "inputs": inputs["source"],
        "settings": {"repeats": repeats, "warmup": warmup, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                     "dtype": str(dtype).replace("torch.", ""), "device": str(p_model.device), "threads": torch.get_num_threads(),
                     "interleaved": "baseline/model order alternates every repetition"},
        "cost": {
            "baseline": _cost_dict(cost_b, dtype),
            "model": _cost_dict(cost_m, dtype),
        },
        "kernels": kernel_summary(model),
    }


def _run_named(models: dict[str, nn.Module], name: str, wl: str, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, Any]:
    if name == "no_mlp":
        with _SkipMLPs(models["baseline"]):
            return _run(models["baseline"], wl, inputs, new_tokens)
    return _run(models[name], wl, inputs, new_tokens)


def _cost_dict(c: TokenCost, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "decode_params_read_per_token": c.read_params,
        "decode_bytes_per_token": c.decode_bytes(dtype),
        "mlp_active_params_per_token": c.mlp_active_params,
        "mlp_params": c.mlp_dense_params,
        "prefill_flops_1x2048": c.prefill_flops(1, 2048),
        "prefill_flops_8x512": c.prefill_flops(8, 512),
    }


def kernel_summary(model) -> dict[str, int]:
    """How many MoE blocks run which backend (None = auto)."""
    from ..blocks.moe import MoEMLP

    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, MoEMLP):
            k = "auto" if m.kernel is None else getattr(m.kernel, "__name__", str(m.kernel)).lstrip("_")
            out[k] = out.get(k, 0) + 1
    return out


# --------------------------------------------------------------------------- peak memory


def peak_memory_child(path: str, dtype: str, workloads: list[str], new_tokens: int, kernel: str = "auto", device: str = "cpu",
                      text: str = "austen") -> dict[str, Any]:
    """Peak resident memory of a fresh process that loads `path` and runs each workload once.

    CPU memory has no allocator statistics, and both models share the benchmark's
    process; a child's peak RSS is the honest number. The child prepares the inputs
    first, then restarts the kernel's peak counter (Linux clear_refs), so the peak
    covers loading the model and running it; `peak_mb_over_before_load` subtracts
    what the process held before (interpreter, torch, inputs).
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "moeify.bench.bench", "--peak", path, "--dtype", dtype, "--workloads", ",".join(workloads),
           "--new-tokens", str(new_tokens), "--kernel", kernel, "--device", device, "--text", text]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise InputError(f"the peak-memory run of {path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so earlier phases do not mask the model's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_main(argv: list[str]) -> None:
    import argparse
    import resource

    ap = argparse.ArgumentParser()
    ap.add_argument("--peak", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default="austen")
    a = ap.parse_args(argv)
    import moeify
    from moeify import kernels
    from ..models.checkpoint import load_config, load_model

    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.peak) if a.text == "austen" else None
    except (OSError, ValueError):
        pass
    # the inputs first: tokenizing the corpus has its own peak, which is not the model's
    inputs = bench_inputs(tok, int(load_config(a.peak).vocab_size), text=a.text)
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_mb("VmRSS")
    m, _ = load_model(a.peak, dtype=a.dtype, with_tokenizer=False)
    m.to(a.device).eval()
    kernels.use(m, a.kernel)
    loaded = _status_mb("VmRSS")
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for wl in a.workloads.split(","):
        _run(m, wl, inputs, a.new_tokens)
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {"peak_rss_mb": peak, "rss_before_load_mb": before, "loaded_rss_mb": loaded, "peak_mb_over_before_load": peak - before,
           "peak_counter_reset": reset, "moeify": moeify.__version__}
    if dev.type == "cuda":
        res["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    print(json.dumps(res))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in _unique_params(model)) + sum(b.numel() * b.element_size() for b in model.buffers())


# --------------------------------------------------------------------------- one layer


class SkewedRouter(Router):
    """The CMoE analytical router's computation, with the selection drawn from a skewed distribution.

    Random weights route uniformly, which flatters an MoE (perfect load balance). Expert
    popularity here is p_j proportional to exp(-beta j); each token draws its k experts
    without replacement (Gumbel top-k, i.e. Plackett-Luce), and the draw is added to the
    router's scores with a weight that makes it decide. beta = 0.43 reproduces the sorted
    expert loads measured on SmolLM2 converted by CMoE at S1A1E8 (held-out Austen text:
    2.84, 1.56, 0.94, 0.66, 0.46, 0.33, 0.21 x the mean load).
    """

    def __init__(self, inner: nn.Module, num_experts: int, beta: float, seed: int):
        super().__init__()
        self.inner = inner
        self.num_experts = num_experts
        self.beta = beta
        self.seed = seed
        self.draw: torch.Tensor | None = None

    def prepare(self, tokens: int, device) -> None:
        g = torch.Generator().manual_seed(self.seed)
        logp = -self.beta * torch.arange(self.num_experts, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(torch.rand(tokens, self.num_experts, generator=g).clamp_(1e-10, 1 - 1e-7)))
        self.draw = ((logp + gumbel) * 1e4).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.draw[: x.shape[0]]


SKEW_BETA = 0.43


def build_layer(hidden: int, intermediate: int, layout: str, *, act: str = "silu", router_neurons: int = 8, beta: float = SKEW_BETA,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """(dense MLP as GatedWeights, MoEMLP) with random weights; the MoE's router is CMoE's, its routing skewed."""
    from ..core.layout import check_layout_fits, parse_layout
    from ..core.dense import GatedWeights
    from ..blocks.moe import MoEMLP
    from ..core.plan import LayerPlan

    lay = parse_layout(layout)
    check_layout_fits(lay, [intermediate])
    if hidden < 1 or intermediate < 1:
        raise InputError(f"hidden and intermediate sizes must be positive, got {hidden} and {intermediate}.")
    g = torch.Generator().manual_seed(seed)
    w = GatedWeights(
        gate=torch.randn(intermediate, hidden, generator=g) / math.sqrt(hidden),
        up=torch.randn(intermediate, hidden, generator=g) / math.sqrt(hidden),
        down=torch.randn(hidden, intermediate, generator=g) / math.sqrt(intermediate),
        act=act,
    )
    shared, sizes = lay.sizes(intermediate)
    bounds = [shared]
    for m in sizes:
        bounds.append(bounds[-1] + m)
    experts = [list(range(bounds[j], bounds[j + 1])) for j in range(len(sizes))]
    n_rep = min(router_neurons, min(sizes)) if sizes else 0
    router = {"type": "analytical", "neurons": n_rep * len(sizes), "absolute": True} if sizes else {"type": "static"}
    plan = LayerPlan(shared=list(range(shared)), experts=experts, top_k=lay.active if sizes else 0, router=router)
    state = None
    if sizes:
        rep = torch.tensor([e[i] for e in experts for i in range(n_rep)])
        combine = torch.zeros(len(sizes), n_rep * len(sizes))
        for j in range(len(sizes)):
            combine[j, j * n_rep : (j + 1) * n_rep] = w.down[:, rep[j * n_rep : (j + 1) * n_rep]].norm(dim=0)
        state = {"gate_up": torch.cat([w.gate[rep], w.up[rep]]), "combine": combine}
    block = MoEMLP.from_dense(w, plan, state)
    if sizes and lay.active < len(sizes):
        block.router = SkewedRouter(block.router, len(sizes), beta, seed)
    w = GatedWeights(gate=w.gate.to(device, dtype), up=w.up.to(device, dtype), down=w.down.to(device, dtype), act=act)
    block = block.to(device=device, dtype=dtype)
    block.expert_scale.data = block.expert_scale.data.float()
    return w, block, lay


def _time_call(fn: Callable[[], Any], device: torch.device, min_seconds: float) -> tuple[float, int]:
    """Seconds per call, calling fn enough times to fill min_seconds (so small shapes are timed well)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - t0
    n = max(1, min(1000, int(min_seconds / max(once, 1e-7))))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n, n


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """fn captured in a CUDA graph (launch overhead out of the way); fn itself if capture fails."""
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as e:  # some op could not be captured: time it eagerly, and say so
        log.warning("CUDA graph capture failed (%s); timing eagerly", e)
        return fn


@torch.no_grad()
def compare_layer(
    hidden: int,
    intermediate: int,
    layout: str,
    tokens: list[int],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 7,
    act: str = "silu",
    router_neurons: int = 8,
    beta: float = SKEW_BETA,
    kernel: str = "auto",
    cuda_graphs: bool = False,
    min_seconds: float = 0.05,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One dense gated MLP (the framework's matmuls: MKL / cuBLAS) vs its MoE block, on random weights."""
    from .. import kernels
    from ..models.checkpoint import parse_dtype

    dt = parse_dtype(dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but torch sees no CUDA GPU; use --device cpu.")
    if not tokens or any(t < 1 for t in tokens):
        raise InputError(f"tokens must be positive integers, got {tokens}.")
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}.")
    w, block, lay = build_layer(hidden, intermediate, layout, act=act, router_neurons=router_neurons, beta=beta, dtype=dt, device=dev, seed=seed)
    kernels.use(block, kernel)
    act_fn = block.act_fn
    gate_w, up_w, down_w = w.gate, w.up, w.down

    def dense(x):
        return torch.nn.functional.linear(act_fn(torch.nn.functional.linear(x, gate_w)) * torch.nn.functional.linear(x, up_w), down_w)

    H, I = hidden, intermediate
    shared, sizes = lay.sizes(I)
    router_params = sum(p.numel() for p in block.router.parameters())
    k = block.top_k if sizes else 0
    dense_flops = 2.0 * 3 * H * I
    moe_flops = 2.0 * (3 * H * (shared + (sum(sizes) if block.all_active() else k * sum(sizes) / max(len(sizes), 1))) + router_params)
    rows = []
    g = torch.Generator().manual_seed(seed + 1)
    for T in tokens:
        x = torch.randn(T, H, generator=g).to(dev, dt)
        if isinstance(block.router, SkewedRouter):
            block.router.prepare(T, dev)
        touched = load = None
        if sizes and not block.all_active():
            idx = (block.router(x) + block.selection_bias.float()).topk(k, dim=-1).indices
            counts = torch.bincount(idx.reshape(-1).cpu(), minlength=len(sizes)).double()
            touched = int((counts > 0).sum())
            load = sorted((counts / counts.mean()).tolist(), reverse=True)
        n_experts_read = len(sizes) if block.all_active() else (touched or 0)
        moe_bytes_params = 3 * H * (shared + (sum(sizes) / max(len(sizes), 1)) * n_experts_read) + router_params
        fd, fm = (lambda: dense(x)), (lambda: block(x))
        if cuda_graphs and dev.type == "cuda":
            fd, fm = _graphed(fd, dev), _graphed(fm, dev)
        for _ in range(2):
            fd(), fm()
        td, tm = [], []
        for r in range(repeats):
            for name in (("dense", "moe") if r % 2 == 0 else ("moe", "dense")):
                if name == "dense":
                    td.append(_time_call(fd, dev, min_seconds)[0])
                else:
                    tm.append(_time_call(fm, dev, min_seconds)[0])
        flop_limit = dense_flops / moe_flops
        row = {
            "tokens": T,
            "dense_ms": summarize([t * 1e3 for t in td]),
            "moe_ms": summarize([t * 1e3 for t in tm]),
            **_ratio_block(td, tm, False, flop_limit, "active FLOPs (shared + top-k experts + router)"),
            "bytes_limit": (3 * H * I) / moe_bytes_params,
            "experts_touched": touched,
            "expert_load_sorted": load,
        }
        rows.append(row)
        if progress:
            progress(f"T={T}: dense {row['dense_ms']['median']:.3f} ms, moe {row['moe_ms']['median']:.3f} ms, "
                     f"speedup {row['speedup']:.2f} (FLOP limit {flop_limit:.2f})")
    return {
        "shape": {"hidden": H, "intermediate": I, "layout": str(lay), "shared_neurons": shared, "expert_sizes": sizes, "top_k": k,
                  "router": block.layer_config.get("router"), "router_params": router_params, "act": act},
        "routing": {"distribution": f"Plackett-Luce, p_j ~ exp(-{beta} j) (SmolLM2 CMoE-S1A1E8 loads)", "beta": beta} if sizes and not block.all_active() else None,
        "settings": {"dtype": dtype, "device": str(dev), "repeats": repeats, "kernel": kernel, "cuda_graphs": cuda_graphs and dev.type == "cuda",
                     "threads": torch.get_num_threads(), "min_seconds_per_measurement": min_seconds, "seed": seed,
                     "interleaved": "dense/moe order alternates every repetition"},
        "rows": rows,
    }


def device_name(device: str) -> str:
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


if __name__ == "__main__":
    import sys

    _peak_main(sys.argv[1:])
