"""Tiny moeify checkpoints built in code, vLLM engines in this process, and greedy decoding with transformers + moeify."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# tiny models: head_dim 32 (vLLM's CPU attention serves 32..512), hidden 128 (the CPU fused MoE kernel wants multiples of 32)
COMMON = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
INTERMEDIATE = 160
KV_CACHE_BYTES = 256 << 20


def tiny_config(arch: str, layers: int):
    """The main suite's tiny configs (tests/conftest.py) at sizes vLLM's CPU kernels accept."""
    from tests.conftest import tiny_config as base

    return base(arch, INTERMEDIATE, common=COMMON, head_dim=32, sliding_window=64, num_hidden_layers=layers)


def _random_router(kind: dict[str, Any], n_experts: int, hidden: int, act: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    from moeify.blocks.routers import ROUTERS

    router = ROUTERS[kind["type"]](n_experts, hidden, kind, act)
    state = {}
    for name, p in router.named_parameters():
        fan_in = p.shape[-1] if p.dim() > 1 else 1
        state[name] = torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5 if p.dim() > 1 else 0.3)
    return state


def block_spec(shared: int, experts: list[int], top_k: int, router: dict[str, Any], gate: str = "unit",
               compensate: bool = False, scales: bool = False, selection_bias: bool = False) -> dict[str, Any]:
    """One converted layer of a tiny checkpoint; `shared + sum(experts)` must be INTERMEDIATE."""
    assert shared + sum(experts) == INTERMEDIATE
    return dict(shared=shared, experts=experts, top_k=top_k, router=router, gate=gate, compensate=compensate,
                scales=scales, selection_bias=selection_bias)


def build_checkpoint(path: Path, arch: str, layers: list[dict[str, Any] | None], seed: int = 0) -> Path:
    """A tiny random `arch` model whose layer i is converted with layers[i] (None: left dense), saved as a moeify checkpoint.

    Neurons are assigned to experts at random; routers, expert scales, gate u, compensation
    vectors and selection biases are random, so every part of the block changes the output.
    """
    import numpy as np
    from transformers import AutoModelForCausalLM

    from moeify.blocks.moe import MoEMLP
    from moeify.core.plan import LayerPlan
    from moeify.models.arch import ARCHITECTURES, activation_name, dense_weights, mlp_sites
    from moeify.models.checkpoint import save
    from moeify.models.modeling import as_moeify_model

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = tiny_config(arch, len(layers))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # spread the weights: clear top-1 margins, so greedy tokens do not hinge on float rounding
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=g)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    spec = ARCHITECTURES[arch]
    act = activation_name(model.config, spec)
    plans = []
    for site, lay in zip(mlp_sites(model, spec), layers):
        if lay is None:
            plans.append(None)
            continue
        perm = rng.permutation(INTERMEDIATE)
        shared, rest = perm[: lay["shared"]], perm[lay["shared"] :]
        cuts = np.cumsum(lay["experts"])[:-1]
        experts = np.split(rest, cuts)
        n = len(experts)
        scales = rng.uniform(0.6, 1.4, size=n) if lay["scales"] else None
        plan = LayerPlan(shared=shared, experts=experts, top_k=lay["top_k"], router=dict(lay["router"]), gate=lay["gate"],
                         scales=scales, compensate=lay["compensate"])
        plan.validate(INTERMEDIATE)
        weights = dense_weights(site.module, spec, act)
        block = MoEMLP.from_dense(weights, plan, _random_router(lay["router"], n, cfg.hidden_size, act, g) if n else None)
        with torch.no_grad():
            if block.gate_u is not None:
                block.gate_u.copy_(torch.randn(n, generator=g) * 2.0)
            if block.dropped_bias is not None:
                block.dropped_bias.copy_(torch.randn(block.dropped_bias.shape, generator=g) * 0.2)
            if lay["selection_bias"]:
                block.selection_bias.copy_(torch.randn(n, generator=g) * 0.5)
        site.replace(block)
        plans.append(plan)
    moeify_cfg = {"method": "test", "config": {"test": True}, "layers": [p.to_config() if p is not None else None for p in plans]}
    model = as_moeify_model(model, moeify_cfg)
    save(model, path, overwrite=True)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[float], float]]:
    """Greedy continuation of each prompt with transformers + moeify (fp32): (tokens, their log-probs, smallest top-1 margin)."""
    from moeify.models.checkpoint import load_model

    model, _ = load_model(str(path), dtype="float32", with_tokenizer=False)
    out = [greedy(model, prompt, n) for prompt in prompts]
    del model
    gc.collect()
    return out


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float], float]:
    """n greedy tokens after prompt with a transformers model and its KV cache: (tokens, their log-probs, smallest top-1 margin)."""
    toks, lps, margin = [], [], float("inf")
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            logits = res.logits[0, -1].float()
            top = logits.topk(2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            t = int(top.indices[0])
            toks.append(t)
            lps.append(float(logits.log_softmax(-1)[t]))
            res = model(torch.tensor([[t]]), past_key_values=res.past_key_values, use_cache=True)
    return toks, lps, margin


@contextmanager
def engine(path: Path, *, in_process: bool = True, **kw):
    """A vLLM engine on `path` in fp32; in_process: engine and worker in this process (no spawn, no torch.compile)."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    args: dict[str, Any] = dict(dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=512, seed=0)
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        args.update(enforce_eager=True, distributed_executor_backend="uni")
    else:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    args.update(kw)
    affinity = os.sched_getaffinity(0)  # an in-process worker binds this process to its cores
    llm = None
    try:
        llm = LLM(str(path), **args)
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        os.sched_setaffinity(0, affinity)  # engines started later (spawned processes inherit it) get every core again


def vllm_greedy(llm, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True, detokenize=False)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    out = []
    for r in res:
        o = r.outputs[0]
        toks = list(o.token_ids)
        lps = [float(step[t].logprob) for step, t in zip(o.logprobs, toks)]
        out.append((toks, lps))
    return out


def compare(hf, vl, lp_tol: float = 2e-3) -> list[str]:
    """Differences between HF and vLLM greedy runs (empty: equal tokens, log-probs within lp_tol)."""
    problems = []
    for i, ((ht, hl, margin), (vt, vlp)) in enumerate(zip(hf, vl)):
        if ht != vt:
            first = next(j for j, (a, b) in enumerate(zip(ht, vt)) if a != b)
            problems.append(f"prompt {i}: tokens differ from step {first} (HF {ht[first]}, vLLM {vt[first]}; smallest HF top-1 margin {margin:.2e})")
            continue
        worst = max(abs(a - b) for a, b in zip(hl, vlp))
        if worst > lp_tol:
            problems.append(f"prompt {i}: log-probs differ by up to {worst:.2e}")
    return problems
