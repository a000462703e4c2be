"""Light fine-tuning of a converted checkpoint: CMoE §4.3, done right (docs/methods.md, "Light fine-tuning").

A converted block is exact when every expert is active; routing drops experts and costs
quality. CMoE recovers part of it with a short fine-tuning run that trains three things:

1. **LoRA** (rank 8, α 32, dropout 0.1) on the attention projections and on every expert
   projection. moeify's experts are packed bare parameters (`shared_gate_up`, `shared_down`,
   `gate_up`, `down` of a `MoEMLP`), adapted with peft's `target_parameters` (one rank-r update
   per packed matrix: the same form as LoRA on the dense projections, its rows regrouped by
   expert). peft cannot apply dropout to a parameter adapter, so the expert adapter is a second
   peft adapter without dropout. Both are merged at the end: the output is a plain checkpoint.
2. **The gate scale u**: g_e = 1 + softmax(s)_e u_e, u = 0 at the start (exact). A block with
   unit gates is switched to this form (its config says gate "cmoe", so a reload builds u).
   u has its own learning rate, and - unlike the public CMoE code, where PEFT freezes it - it
   is trainable after the adapters are added. With top-k selection u gets gradients only
   through g_e.
3. **The selection bias b** (aux-loss-free balancing): selection uses s + b; after each
   optimizer step b_e += γ sign(mean load - load_e), the load counted from the routing the
   forward pass used. b is a buffer of the block, so it is saved (the public code loses it).

Optional: "router" trains the router's parameters by gradient (through the gate weights);
"experts" trains the packed expert parameters themselves at full rank (their own learning rate)
instead of a rank-r adapter, LoRA then adapting attention only; `schedule="cosine"` warms every
learning rate up over the first 5 % of the steps and decays it along a cosine.

Optional: **distillation** from the dense base model (`distill=α`, full mode): the loss is
(1 - α) · next-token cross-entropy + α · KL(dense ‖ model) of the next-token distributions,
per token, temperature 1, the dense model run without gradients on the same windows. With
α = 1 the model learns to predict what the dense model predicts, never the text itself, so it
cannot gain from learning the training text's domain (docs/methods.md, "Light fine-tuning").

Training windows come from the text source's calibration split with the calibration sampler
(data/calibration.py), never from evaluation text: a check refuses any 32-token n-gram shared
with the perplexity windows before the model is loaded. `text="dense"` needs no text: the
windows are sampled from the dense base model itself (nucleus sampling, p = 0.95, from the
beginning-of-text token, seeded), so that distillation covers what the dense model writes
about rather than one corpus (data-free distillation; the same overlap check applies).
AdamW in float32, seeded, fixed window order. The report scores held-out perplexity before and after (and the dense base model when
the checkpoint's recorded base is available) and is stored in config.json["moeify"]["finetune"].

The layer-local mode (`local=True`) trains each block alone, layer by layer on the converted
model's own hidden states (pipeline/stream.py), to reproduce the dense MLP's output: relative
MSE, the router and b fixed, the expert weights and u trained, no backward pass through the
model. The per-block error is reported on held-out calibration tokens before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import math
import os
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blocks.moe import MoEMLP
from .errors import InputError, MoeifyError

log = logging.getLogger("moeify")

WHAT = ("lora", "experts", "scale", "bias", "router")
SCHEDULES = ("constant", "cosine")
EXPERT_LR = 2e-5
WARMUP = 0.05  # cosine schedule: share of the steps spent warming up linearly
EXPERT_PARAMS = ("shared_gate_up", "shared_down", "gate_up", "down")
NGRAM = 32  # tokens of text that may not appear in both the training and the evaluation windows
LORA_LR = 2e-4
LOCAL_LR = 1e-3
LOCAL_HELDOUT_TOKENS = 2048  # local mode: held-out calibration tokens for the per-block error
_PARAMETRIC_ROUTERS = ("linear", "analytical", "mlp")
DENSE_TEXT = "dense"  # --text: windows sampled from the dense base model
SAMPLE_TOP_P = 0.95
SAMPLE_BATCH = 32


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (docs/methods.md, "Light fine-tuning").

    text: training text source (its calibration split), or "dense": windows sampled from the dense base model;
        samples x seq_len windows.
    steps / tokens: the budget, at most one of them (default: one epoch over the windows).
    batch_size: windows per optimizer step (local mode: batch_size x seq_len tokens per step).
    lr: learning rate of the LoRA adapters and the router (default 2e-4), or of the expert weights in local
        mode (default 1e-3: measured better than 2e-4 and 5e-3 on the held-out block error); scale_lr: u's;
        bias_gamma: b's step.
    expert_lr: full mode with "experts": learning rate of the expert weights themselves (full rank).
    schedule: "constant" learning rates, or "cosine": linear warm-up over the first 5 % of the steps, then a cosine
        decay to 0 (every parameter group).
    what: any of lora, experts, scale, bias, router (a set, or a comma-separated string). In full mode lora adapts
        attention and, unless "experts" is given, the expert weights; "experts" trains the expert weights at full
        rank (at expert_lr). In local mode both mean the block's own weights.
    local: train each block alone against the dense MLP, layer by layer.
    distill: full mode, weight of the distillation term: (1 - distill) x next-token loss + distill x KL(dense || model);
        0 (default) is CMoE's next-token loss, 1 distillation alone.
    evaluate / ppl: held-out perplexity (quick windows of `ppl`) before and after.
    """

    text: str = "austen"
    samples: int = 64
    seq_len: int = 512
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 4
    lr: float | None = None
    scale_lr: float = 1e-3
    expert_lr: float = EXPERT_LR
    schedule: str = "constant"
    bias_gamma: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    what: frozenset[str] | str = frozenset({"lora", "scale", "bias"})
    local: bool = False
    distill: float = 0.0
    seed: int = 0
    evaluate: bool = True
    ppl: str = "austen"

    def __post_init__(self) -> None:
        self.what = parse_what(self.what)

    def check(self) -> None:
        """Refuse bad settings before anything is read (InputError saying what to do)."""
        if not isinstance(self.text, (str, os.PathLike)) or not str(self.text).strip():
            raise InputError("--text must name a text source (austen, a file, a folder, ...).")
        for name, minimum in (("samples", 1), ("seq_len", 16), ("batch_size", 1), ("lora_rank", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {v!r}.")
        if self.batch_size > self.samples:
            raise InputError(f"--batch-size {self.batch_size} is larger than --samples {self.samples}; use at most as many windows per step as there are.")
        if self.steps is not None and self.tokens is not None:
            raise InputError("--steps and --tokens both set the budget; give one of them.")
        for name in ("steps", "tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"--{name} must be a positive integer, got {v!r}.")
        if self.schedule not in SCHEDULES:
            raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        for name in ("lr", "scale_lr", "expert_lr", "bias_gamma", "lora_alpha"):
            v = getattr(self, name)
            if name == "lr" and v is None:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if isinstance(self.distill, bool) or not isinstance(self.distill, (int, float)) or not 0 <= self.distill <= 1:
            raise InputError(f"--distill is the weight of the distillation term, a number in [0, 1]; got {self.distill!r}.")
        if self.local and self.distill:
            raise InputError("--distill is for the full mode: --local already trains each block to reproduce the dense MLP's output.")
        if self.local and not self.what & {"lora", "experts", "scale"}:
            raise InputError(f"--local trains the expert weights (lora or experts) and the gate scale u (scale); the router and the selection "
                             f"bias stay fixed, so --what {','.join(sorted(self.what))} leaves nothing to train: add experts or scale.")

    @property
    def learning_rate(self) -> float:
        """--lr, else the mode's default: 2e-4 for LoRA (CMoE's order of magnitude), 1e-3 for the local mode's expert weights."""
        if self.lr is not None:
            return float(self.lr)
        return LOCAL_LR if self.local else LORA_LR

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    @property
    def num_steps(self) -> int:
        """Optimizer steps (per block in local mode): --steps, else --tokens / (batch_size x seq_len), else one epoch."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / (self.batch_size * self.seq_len))
        return self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["what"] = sorted(self.what)
        d["text"] = str(self.text)
        d["lr"] = self.learning_rate
        d["steps"] = self.num_steps
        return d


def parse_what(what) -> frozenset[str]:
    """A subset of WHAT from a set or a comma-separated string; unknown items are refused."""
    items = [w.strip().lower() for w in what.split(",")] if isinstance(what, str) else [str(w).strip().lower() for w in what]
    items = [w for w in items if w]
    bad = [w for w in items if w not in WHAT]
    if bad:
        raise InputError(f"--what {bad[0]!r} is not something fine-tuning trains; use a comma-separated subset of {', '.join(WHAT)}.")
    if not items:
        raise InputError(f"--what is empty; use a comma-separated subset of {', '.join(WHAT)}.")
    return frozenset(items)


# --------------------------------------------------------------------------- what trains where (from config.json alone)


@dataclasses.dataclass
class FinetunePlan:
    """Which layers' blocks train what. Decided from the checkpoint's config before any weight is read."""

    blocks: list[int]  # layers holding a plain MoEMLP
    lora: list[int]  # expert weights (LoRA in full mode, the block's own weights in local mode)
    experts: list[int]  # full mode: expert weights trained at full rank
    scale: list[int]  # u (blocks with unit gates switch to the cmoe form)
    bias: list[int]  # selection bias b (full mode)
    router: list[int]  # router parameters (full mode)
    attention: bool  # LoRA on the attention projections (full mode)
    dense_exact: bool  # every block holds all dense neurons as converted: dense_from_block gives the dense MLP
    notes: list[str]


def _routes(lc: dict[str, Any]) -> bool:
    """A block whose tokens skip experts (a static router or top_k = experts runs all of them)."""
    rtype = (lc.get("router") or {}).get("type", "static")
    return bool(lc["experts"]) and rtype != "static" and int(lc["top_k"]) < len(lc["experts"])


def plan_finetune(moeify_cfg: dict[str, Any], intermediate_sizes: list[int], config: FinetuneConfig) -> FinetunePlan:
    """What `config.what` trains in a checkpoint, from config.json["moeify"]; InputError if nothing."""
    layers = moeify_cfg.get("layers") or []
    plain = {i: lc for i, lc in enumerate(layers) if isinstance(lc, dict) and lc.get("kind") != "hierarchical" and "experts" in lc}
    notes = []
    hier = [i for i, lc in enumerate(layers) if isinstance(lc, dict) and lc.get("kind") == "hierarchical"]
    if hier:
        notes.append(f"layers {hier} are hierarchical (MoE experts split into sub-experts): left as they are")
    if not plain:
        raise InputError("the checkpoint has no MoE block that fine-tuning can train (a plain moeify MoEMLP; hierarchical conversions of MoE "
                         "models are not supported): convert a dense model with `moeify convert` first.")
    what, local = config.what, config.local
    routing = [i for i, lc in plain.items() if _routes(lc)]
    weights = sorted(plain) if what & {"lora", "experts"} else []
    experts = weights if "experts" in what and not local else []
    lora = [] if experts else weights
    scale = [i for i in routing if plain[i].get("gate", "unit") in ("unit", "cmoe")] if "scale" in what else []
    if "scale" in what and len(scale) < len(routing):
        notes.append("softmax-gated blocks have no u: their gates are left as they are")
    bias = routing if "bias" in what and not local else []
    router = []
    if "router" in what and not local:
        with_params = [i for i in routing if (plain[i].get("router") or {}).get("type") in _PARAMETRIC_ROUTERS]
        # the router gets gradients only through the gate weights: g = 1 + softmax(s) u (u trained), or a softmax gate
        router = [i for i in with_params if plain[i].get("gate") == "softmax" or i in scale or plain[i].get("gate") == "cmoe"]
        if with_params and not router:
            raise InputError("--what router: top-k selection passes no gradient to the router, only the gate weights do; add scale "
                             "(g = 1 + softmax(s) u trains the router through softmax(s)).")
    if local and what & {"bias", "router"}:
        notes.append("local mode keeps the router and the selection bias fixed")
    if not (lora or experts or scale or bias or router):
        asked = ",".join(sorted(what))
        why = ("every block runs all of its experts (a static router, or top_k = experts), so the selection bias, u and the router change nothing"
               if not routing else "the blocks' gates have no u (softmax gates)")
        raise InputError(f"--what {asked}: nothing to train in this checkpoint: {why}; add lora or experts to train the expert weights.")
    sizes = list(intermediate_sizes) + [0] * max(0, len(layers) - len(intermediate_sizes))
    complete = all(int(lc["shared"]) + sum(int(m) for m in lc["experts"]) == sizes[i] for i, lc in plain.items())
    refit = moeify_cfg.get("refit")
    refit = bool(refit.get("layers")) if isinstance(refit, dict) else bool(refit)
    changed = any(set(r.get("settings", {}).get("what", [])) & {"lora", "experts"} for r in _finetune_history(moeify_cfg))
    return FinetunePlan(blocks=sorted(plain), lora=lora, experts=experts, scale=scale, bias=bias, router=router,
                        attention="lora" in what and not local, dense_exact=complete and not refit and not changed, notes=notes)


def _finetune_history(moeify_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    out, rec = [], moeify_cfg.get("finetune")
    while isinstance(rec, dict):
        out.append(rec)
        rec = rec.get("previous")
    return out


# --------------------------------------------------------------------------- data: calibration windows, never evaluation text


def ngram_hashes(windows: torch.Tensor, n: int = NGRAM) -> torch.Tensor:
    """One int64 per n-token n-gram of every window [w * (L - n + 1)]: sum_j c_j t_{i+j} with fixed random c_j < 2^31,
    exact (no overflow) for vocabularies below 2^20; memory of the windows, not of the n-grams."""
    windows = windows.long()
    w, L = windows.shape
    if L < n:
        return windows.new_zeros(0)
    coef = torch.randint(1, 2**31 - 1, (n,), generator=torch.Generator().manual_seed(12345), dtype=torch.long).tolist()
    h = torch.zeros(w, L - n + 1, dtype=torch.long)
    for j, c in enumerate(coef):
        h += windows[:, j : j + L - n + 1] * c
    return h.reshape(-1)


def check_no_overlap(train: torch.Tensor, evaluation: torch.Tensor, n: int = NGRAM, what: str = "--text") -> None:
    """Refuse training windows that share any n-token stretch of text with the evaluation windows."""
    train, evaluation = train.long().cpu(), evaluation.long().cpu()
    n = min(n, train.shape[1], evaluation.shape[1])
    th, eh = ngram_hashes(train, n), ngram_hashes(evaluation, n)
    hit = torch.isin(th, eh)
    if not bool(hit.any()):
        return
    # confirm the hash matches on the tokens themselves (different n-grams can share a hash in principle)
    sorted_eh, order = eh.sort()
    where = order[torch.searchsorted(sorted_eh, th[hit])]
    pos = hit.nonzero().squeeze(1)
    tl, el = train.shape[1] - n + 1, evaluation.shape[1] - n + 1
    cols = torch.arange(n)
    grams = train[(pos // tl)[:, None], (pos % tl)[:, None] + cols]
    egrams = evaluation[(where // el)[:, None], (where % el)[:, None] + cols]
    shared = int((grams == egrams).all(1).sum())
    if shared:
        raise InputError(f"{what}: the fine-tuning windows share {shared} stretch(es) of {n} tokens with the perplexity evaluation windows; "
                         "train on text that is not evaluated (the source's calibration split: with austen, the four calibration novels).")


# --------------------------------------------------------------------------- inputs, checked before any model is loaded


@dataclasses.dataclass
class FinetuneInputs:
    path: str | None  # checkpoint folder (None for a model given in memory)
    tokenizer: Any
    plan: FinetunePlan
    windows: torch.Tensor | None  # [samples, seq_len] training windows (None: sampled from the dense model once it is loaded)
    heldout: torch.Tensor | None  # local mode: held-out calibration tokens for the per-block error
    eval_windows: torch.Tensor | None  # the evaluation windows (overlap check; scored when config.evaluate)
    base_path: str | None  # the dense base model, when it can be loaded
    base_note: str | None


def prepare(model_or_dir, config: FinetuneConfig, *, tokenizer=None) -> FinetuneInputs:
    """Every check that needs no weights: settings, checkpoint, plan, texts, windows, overlap, base model."""
    from .data.texts import check_text_source, perplexity_windows
    from .models.checkpoint import check_model_source, load_tokenizer, recorded_base_model
    from .pipeline.convert import config_intermediate_sizes

    config.check()
    if isinstance(model_or_dir, (str, os.PathLike)):
        path, cfg = check_model_source(str(model_or_dir), what="DIR")
        mo = getattr(cfg, "moeify", None)
        if not isinstance(mo, dict):
            raise InputError(f"DIR {model_or_dir} is a dense model, not a moeify checkpoint: run `moeify convert {model_or_dir} -o CONVERTED` "
                             "first, then fine-tune CONVERTED.")
    elif isinstance(model_or_dir, nn.Module):
        path, cfg = None, model_or_dir.config
        mo = getattr(cfg, "moeify", None)
        if not isinstance(mo, dict):
            raise InputError("this model was not converted by moeify: call moeify.convert first.")
        if any(p.dtype != torch.float32 for p in model_or_dir.parameters()):
            raise InputError("fine-tuning runs in float32: load the checkpoint with dtype='float32'.")
    else:
        raise InputError(f"finetune takes a converted checkpoint folder or model, got {type(model_or_dir).__name__}.")
    plan = plan_finetune(mo, config_intermediate_sizes(cfg), config)
    if not config.local and (plan.lora or plan.attention) and importlib.util.find_spec("peft") is None:
        raise InputError("LoRA fine-tuning needs peft: pip install 'moeify[train]' (or --local, or --what scale,bias without lora).")
    sampled = is_dense_text(config.text)
    if sampled and config.local:
        raise InputError("--text dense samples training windows for the full mode; --local reads the blocks' inputs from a text source "
                         "(e.g. --text austen).")
    if not sampled:
        check_text_source(config.text, "calibration", what="--text")
    evaluate_on = config.evaluate or str(config.ppl).lower() == "austen"  # the protocol's windows are checked even with --no-eval
    if config.evaluate:
        check_text_source(config.ppl, "heldout", what="--ppl")
    tok = tokenizer if tokenizer is not None else getattr(model_or_dir, "_moeify_tokenizer", None)
    if tok is None:
        if path is None:
            raise InputError("pass tokenizer=... (the model carries none).")
        tok = load_tokenizer(path, what="DIR")
    windows, heldout = (None, None) if sampled else _text_windows(tok, config)
    eval_windows = None
    if evaluate_on:
        try:
            eval_windows = perplexity_windows(tok, config.ppl, quick=True)
        except MoeifyError as e:
            if config.evaluate:
                raise InputError(f"--ppl {config.ppl}: {e}") from None
            log.warning("no overlap check against the %s evaluation windows (--no-eval, and they cannot be read: %s)", config.ppl, e)
    if eval_windows is not None and windows is not None:
        check_no_overlap(windows, eval_windows)
        if heldout is not None:
            check_no_overlap(heldout, eval_windows)
    base_path, note = None, None
    base_name = recorded_base_model(cfg)
    if base_name:
        try:
            base_path = check_model_source(base_name, what="the recorded base model")[0]
        except InputError as e:
            note = str(e)
    else:
        note = "the checkpoint records no base model"
    if sampled and base_path is None:
        raise InputError(f"--text dense samples the training windows from the dense base model, which cannot be loaded ({note}); "
                         "give a text source (e.g. --text austen), or make the recorded base model available.")
    if config.distill and base_path is None:
        raise InputError(f"--distill {config.distill:g} learns from the dense base model, which cannot be loaded ({note}); "
                         "use --distill 0, or make the recorded base model available.")
    if config.local and not plan.dense_exact and base_path is None:
        raise InputError("--local trains each block to match the dense MLP, and this checkpoint's blocks no longer hold the whole dense MLP "
                         f"(neurons dropped, refit or fine-tuned experts), so the dense base model's weights are needed: {note}.")
    return FinetuneInputs(path=path, tokenizer=tok, plan=plan, windows=windows, heldout=heldout,
                          eval_windows=eval_windows, base_path=base_path, base_note=note)


def is_dense_text(text) -> bool:
    return isinstance(text, str) and text.strip().lower() == DENSE_TEXT


def _text_windows(tok, config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training windows (and the local mode's held-out tokens) from the text source's calibration split."""
    from .data.calibration import Calibration
    from .data.texts import load_token_ids

    need = config.samples * config.seq_len + 1  # room for windows that need not overlap
    try:
        n = int(load_token_ids(tok, config.text, "calibration").numel())
    except InputError as e:
        raise InputError(f"--text {config.text}: {e}") from None
    if n < need:
        raise InputError(f"--text {config.text} has {n} tokens (calibration split); {config.samples} windows of {config.seq_len} tokens need at "
                         f"least {need}: give more text, or fewer --samples or a shorter --seq-len.")
    try:
        cal = Calibration(source=str(config.text), samples=config.samples, seq_len=config.seq_len, seed=config.seed,
                          heldout_tokens=LOCAL_HELDOUT_TOKENS if config.local else 0)
        return cal.windows(tok)
    except InputError as e:
        raise InputError(f"--text {config.text}: {e}") from None


def dense_samples(model, tokenizer, samples: int, seq_len: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """`samples` windows of `seq_len` tokens written by `model`: nucleus sampling (p = SAMPLE_TOP_P, temperature 1) from
    the beginning-of-text token, end-of-text suppressed until the window is full, batches of SAMPLE_BATCH with the
    KV cache, seeded (the global RNG is restored afterwards). Returns (windows [samples, seq_len], a report)."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InputError("--text dense: the tokenizer has no beginning- or end-of-text token to start the samples from.")
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_p=SAMPLE_TOP_P, top_k=0, max_new_tokens=seq_len - 1,
                           min_new_tokens=seq_len - 1, pad_token_id=start, eos_token_id=tokenizer.eos_token_id)
    out, t0 = [], time.perf_counter()
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for i in tqdm(range(0, samples, SAMPLE_BATCH), desc="sampling windows", unit="batch", disable=not progress):
            ids = torch.full((min(SAMPLE_BATCH, samples - i), 1), start, dtype=torch.long)
            out.append(model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen))
    model.train(was_training)
    windows = torch.cat(out)
    assert windows.shape == (samples, seq_len), windows.shape
    return windows, {"source": DENSE_TEXT, "top_p": SAMPLE_TOP_P, "temperature": 1.0, "start_token": int(start),
                     "tokens": int(windows.numel()), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- the run


def finetune(model_or_dir, config: FinetuneConfig, *, tokenizer=None, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a converted checkpoint (a folder, or a converted model in memory, changed in place).

    Returns (model, report); the report is also stored in model.config.moeify["finetune"], so
    `model.save_pretrained(out)` (or moeify.save) records it. See the module docstring.
    """
    from .eval.perplexity import perplexity
    from .models.checkpoint import load_model

    t_start = time.perf_counter()
    inputs = prepare(model_or_dir, config, tokenizer=tokenizer)
    if inputs.path is not None:
        model, _ = load_model(inputs.path, dtype="float32", with_tokenizer=False)
    else:
        model = model_or_dir
    model._moeify_tokenizer = inputs.tokenizer
    blocks = _blocks(model, inputs.plan)
    plan = inputs.plan
    report: dict[str, Any] = {"mode": "local" if config.local else "full", "settings": config.to_dict(),
                              "layers": {k: getattr(plan, k) for k in ("lora", "experts", "scale", "bias", "router")},
                              "attention_lora": plan.attention, "notes": list(plan.notes)}
    ppl: dict[str, Any] = {}
    base = None
    scored = inputs.eval_windows if config.evaluate else None
    if scored is not None:
        ppl = {"source": str(config.ppl), "protocol": _protocol(config.ppl, int(scored.shape[0])),
               "windows": int(scored.shape[0]), "tokens": int(scored.shape[0] * (scored.shape[1] - 1))}
        ppl["before"] = perplexity(model, scored, progress=progress)["ppl"]
    need_base = (config.local and not plan.dense_exact) or bool(config.distill)  # the dense MLP's outputs, or the teacher
    windows = inputs.windows
    if inputs.base_path is not None and (need_base or windows is None or scored is not None):
        base = load_model(inputs.base_path, dtype="float32", with_tokenizer=False)[0]
        if windows is None:  # --text dense: the dense model writes the training windows
            windows, report["text"] = dense_samples(base, inputs.tokenizer, config.samples, config.seq_len, config.seed, progress)
            if inputs.eval_windows is not None:
                check_no_overlap(windows, inputs.eval_windows)
        if scored is not None:
            ppl["dense"] = perplexity(base, scored, progress=progress)["ppl"]
        if not need_base:
            base = None  # not kept in memory while training
    elif scored is not None:
        ppl["dense"] = None
        report["notes"].append(f"no dense perplexity: {inputs.base_note}")
    t0 = time.perf_counter()
    if config.local:
        report.update(_train_local(model, blocks, plan, inputs, config, base, progress))
    else:
        report.update(_train_full(model, blocks, plan, windows, config, progress, teacher=base))
        if config.distill:
            report["distill"] = {"weight": float(config.distill), "teacher": inputs.base_path}
    report["seconds"] = time.perf_counter() - t0
    del base
    if scored is not None:
        ppl["after"] = perplexity(model, scored, progress=progress)["ppl"]
        report["ppl"] = ppl
    report["u"] = _u_stats(blocks, plan.scale)
    report["bias"] = _bias_stats(blocks, plan.bias)
    report["total_seconds"] = time.perf_counter() - t_start
    previous = model.config.moeify.get("finetune")
    model.config.moeify["finetune"] = {**report, **({"previous": previous} if isinstance(previous, dict) else {})}
    model.eval()
    return model, report


def _protocol(source: str, windows: int) -> str:
    return "austen-v1 quick" if str(source).lower() == "austen" else f"{source} ({windows} windows of 2048)"


def _blocks(model, plan: FinetunePlan) -> dict[int, MoEMLP]:
    from .models.arch import mlp_sites, spec_for

    sites = {s.layer: s.module for s in mlp_sites(model, spec_for(model))}
    out = {}
    for i in plan.blocks:
        if type(sites.get(i)) is not MoEMLP:
            raise InputError(f"layer {i}: the config describes a MoE block but the model holds {type(sites.get(i)).__name__}; the checkpoint is corrupt.")
        out[i] = sites[i]
    return out


def _use_cmoe_gate(model, layer: int, block: MoEMLP) -> bool:
    """Give a unit-gate block CMoE's gate g = 1 + softmax(s) u with u = 0 (the same outputs); its config says so, so reloads build u."""
    if block.gate_u is not None:
        return False
    block.gate_u = nn.Parameter(torch.zeros(block.num_experts, dtype=block.expert_scale.dtype, device=block.expert_scale.device))
    block.gate_mode = "cmoe"
    block.layer_config["gate"] = "cmoe"
    model.config.moeify["layers"][layer]["gate"] = "cmoe"
    return True


def _window_batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Window ids of every step: epoch after epoch, each a seeded permutation cut into batches."""
    out: list[torch.Tensor] = []
    epoch = 0
    while len(out) < steps:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm.split(batch_size))
        epoch += 1
    return out[:steps]


class _LoadCounter:
    """Counts, per block, how often each expert was selected by the forward passes (route() as the block ran it)."""

    def __init__(self, blocks: dict[int, MoEMLP]):
        self.blocks = blocks
        self.counts = {i: torch.zeros(b.num_experts, dtype=torch.long, device=b.selection_bias.device) for i, b in blocks.items()}
        for i, b in blocks.items():
            b.route = self._recording(i, b.route)

    def _recording(self, i: int, route):
        def recorded(x):
            scores, idx, w = route(x)
            self.counts[i] += torch.bincount(idx.reshape(-1), minlength=self.counts[i].numel())
            return scores, idx, w

        return recorded

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """CMoE's sign rule towards equal load: b_e += γ sign(mean load - load_e)."""
        for i, b in self.blocks.items():
            load = self.counts[i].to(b.selection_bias.dtype)
            b.selection_bias += gamma * torch.sign(load.mean() - load)
            self.counts[i].zero_()

    def remove(self) -> None:
        for b in self.blocks.values():
            b.__dict__.pop("route", None)


def _attention_linears(model, spec, with_mlp: bool = False) -> list[str]:
    """Full names of the nn.Linear modules of every decoder layer outside its MLP (the attention projections); with_mlp: all of them."""
    from .models.arch import decoder_layers

    names = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and (with_mlp or (name != spec.mlp and not name.startswith(spec.mlp + "."))):
                names.append(f"{spec.layers}.{i}.{name}")
    return names


def finetune_dense_control(dense: nn.Module, config: FinetuneConfig, *, tokenizer, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The control of a full-mode run: the dense model fine-tuned on the same windows with the same budget.

    LoRA (same rank, alpha, dropout, learning rate, steps, seed) on every Linear of every decoder layer
    (attention and the dense MLP's projections, the counterparts of the converted model's attention and
    expert adapters), merged; when the run trains the experts at full rank ("experts" in config.what), the
    dense MLP's weights train at full rank too (expert_lr) and LoRA adapts attention only. Its perplexity
    after training is what a converted model's fine-tuned perplexity is compared with, so a gain from learning the training text's domain is not counted as
    recovery. With distillation the control trains on the same loss against a frozen copy of itself.
    Returns (model changed in place, report).
    """
    config.check()
    if config.local:
        raise InputError("the dense control is for the full mode: the local mode learns the dense MLP's outputs, never the text.")
    if getattr(dense.config, "moeify", None):
        raise InputError("the dense control takes the dense base model, not a converted one.")
    if is_dense_text(config.text):  # the same windows as the converted model's run: sampled from the dense model before it trains
        windows, _ = dense_samples(dense, tokenizer, config.samples, config.seq_len, config.seed, progress)
    else:  # the windows `prepare` gives the converted model's run (the full mode: no held-out tokens)
        windows, _ = _text_windows(tokenizer, config)
    plan = FinetunePlan(blocks=[], lora=[], experts=[], scale=[], bias=[], router=[], attention=True, dense_exact=True, notes=["dense control"])
    teacher = copy.deepcopy(dense).requires_grad_(False) if config.distill else None  # the same loss: against the untouched dense model
    t0 = time.perf_counter()
    report = _train_full(dense, {}, plan, windows, config, progress, with_mlp=True, teacher=teacher)
    report["seconds"] = time.perf_counter() - t0
    return dense, report


def _add_lora(model, names: dict[str, list[str]], config: FinetuneConfig):
    """peft LoRA: adapter "attention" on Linear modules (with dropout), "experts" on bare parameters (peft allows no dropout there)."""
    from peft import LoraConfig, get_peft_model

    common = {"r": config.lora_rank, "lora_alpha": config.lora_alpha, "bias": "none"}
    adapters = []
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's deprecation notes about transformers internals
        for adapter, cfg in (("attention", LoraConfig(target_modules=names["modules"], lora_dropout=config.lora_dropout, **common)),
                             ("experts", LoraConfig(target_modules=[], target_parameters=names["parameters"], lora_dropout=0.0, **common))):
            if not (cfg.target_modules or cfg.target_parameters):
                continue
            if peft_model is None:
                peft_model = get_peft_model(model, cfg, adapter_name=adapter)
            else:
                peft_model.add_adapter(adapter, cfg)
            adapters.append(adapter)
        if peft_model is not None:
            peft_model.base_model.set_adapter(adapters)
    return peft_model


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - weight) x cross-entropy + weight x KL(teacher || model), each a mean over tokens; (loss, ce, kl).

    logits, teacher_logits [B, L, V] score the next token: position t predicts labels[:, t] [B, L].
    """
    V = logits.shape[-1]
    logp = F.log_softmax(logits.reshape(-1, V).float(), dim=-1)
    ce = F.nll_loss(logp, labels.reshape(-1))
    logq = F.log_softmax(teacher_logits.reshape(-1, V).float(), dim=-1)
    kl = F.kl_div(logp, logq, log_target=True, reduction="sum") / logp.shape[0]
    return (1 - weight) * ce + weight * kl, ce, kl


def _step_loss(model, x: torch.Tensor, teacher, weight: float) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """One batch's training loss: the model's own next-token loss, or with a teacher the distillation loss (and its ce, kl)."""
    if teacher is None:
        return model(input_ids=x, labels=x, use_cache=False).loss, None
    with torch.no_grad():
        target = teacher(input_ids=x, use_cache=False).logits[:, :-1]
    loss, ce, kl = distillation_loss(model(input_ids=x, use_cache=False).logits[:, :-1], target, x[:, 1:], weight)
    return loss, (float(ce.detach()), float(kl.detach()))


def _schedule(opt, kind: str, steps: int):
    """Every group's learning rate times 1 (constant), or a linear warm-up over WARMUP of the steps, then a cosine decay
    from the peak (first step after the warm-up) towards 0 (reached one step after the last)."""
    warm = max(1, round(WARMUP * steps))

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train_full(model, blocks: dict[int, MoEMLP], plan: FinetunePlan, windows: torch.Tensor, config: FinetuneConfig,
                progress: bool, with_mlp: bool = False, teacher=None) -> dict[str, Any]:
    """The §4.3 loop: next-token loss on the training windows (or the distillation loss against `teacher`, the dense
    model, when config.distill > 0), AdamW, the bias rule after every step; LoRA merged at the end."""
    from tqdm.auto import tqdm

    from . import kernels
    from .models.arch import decoder_layers, spec_for

    spec = spec_for(model)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)  # LoRA init and dropout
    switched = [i for i in plan.scale if _use_cmoe_gate(model, i, blocks[i])]
    reference = kernels.get("reference")  # the differentiable definition; the route() it calls is the one counted
    for b in blocks.values():
        b.kernel = reference
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = None
    dense_mlp_full = with_mlp and "experts" in config.what  # the dense control of an "experts" run: its MLP weights at full rank
    if plan.lora or plan.attention or with_mlp:
        names = {"modules": _attention_linears(model, spec, with_mlp and not dense_mlp_full) if plan.attention else [],
                 "parameters": [f"{spec.layers}.{i}.{spec.mlp}.{p}" for i in plan.lora for p in EXPERT_PARAMS
                                if getattr(blocks[i], p).numel()]}
        peft_model = _add_lora(model, names, config)
    groups = []
    if peft_model is not None:
        groups.append({"params": [p for n, p in model.named_parameters() if "lora_" in n], "lr": config.learning_rate})
    full = [t for i in plan.experts for t in (getattr(blocks[i], p) for p in EXPERT_PARAMS) if t.numel()]
    if dense_mlp_full:
        full += [m.weight for layer in decoder_layers(model, spec) for m in getattr(layer, spec.mlp).modules() if isinstance(m, nn.Linear)]
    for p in full:  # after peft, which freezes everything but its adapters
        p.requires_grad_(True)
    if full:
        groups.append({"params": full, "lr": config.expert_lr})
    u = [blocks[i].gate_u for i in plan.scale]
    for p in u:  # peft froze everything but the adapters; u trains (the public code's bug: PEFT froze it)
        p.requires_grad_(True)
    if u:
        groups.append({"params": u, "lr": config.scale_lr})
    router = [p for i in plan.router for p in blocks[i].router.parameters()]
    for p in router:
        p.requires_grad_(True)
    if router:
        groups.append({"params": router, "lr": config.learning_rate})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0) if groups else None
    steps = config.num_steps
    sched = _schedule(opt, config.schedule, steps) if opt is not None else None
    counter = _LoadCounter({i: blocks[i] for i in plan.bias}) if plan.bias else None
    batches = _window_batches(windows.shape[0], config.batch_size, steps, config.seed)
    if teacher is not None:  # the callers pass one only when config.distill > 0
        teacher.eval()
    losses: list[float] = []
    parts: list[tuple[float, float]] = []
    tokens = 0
    merged = False
    bar = tqdm(batches, desc="finetune", unit="step", disable=not progress)
    t0 = time.perf_counter()
    model.train()
    try:
        for ids in bar:
            x = windows[ids].to(device)
            with torch.set_grad_enabled(opt is not None):
                loss, part = _step_loss(model, x, teacher, config.distill)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if counter is not None:
                counter.update_bias(config.bias_gamma)
            losses.append(float(loss.detach()))
            if part is not None:
                parts.append(part)
            tokens += x.numel()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if peft_model is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model.merge_and_unload()
            merged = True
    finally:
        bar.close()
        model.eval()
        if counter is not None:
            counter.remove()
        if peft_model is not None and not merged:  # an interrupted run: take the adapters out, leave the model as it was loaded
            peft_model.unload()
        for b in blocks.values():
            b.kernel = None
        for p in model.parameters():
            p.requires_grad_(False)
    loss = {"first": losses[0] if losses else None, "last": losses[-1] if losses else None, "per_step": losses}
    if parts:  # the two terms of the distillation loss
        loss["ce_per_step"], loss["kl_per_step"] = [c for c, _ in parts], [k for _, k in parts]
    return {"steps": len(batches), "tokens": tokens, "gate_switched": switched, "loss": loss}


# --------------------------------------------------------------------------- local mode


def _train_block(block: MoEMLP, x: torch.Tensor, y: torch.Tensor, train_weights: bool, train_u: bool, config: FinetuneConfig,
                 layer: int) -> tuple[list[float], int]:
    """Fit one block to the dense output y on its inputs x: relative MSE ||F_moe(x) - y||^2 / ||y||^2, router fixed."""
    params: list[dict[str, Any]] = []
    if train_weights:
        params.append({"params": [getattr(block, p) for p in EXPERT_PARAMS if getattr(block, p).numel()], "lr": config.learning_rate})
    if train_u and block.gate_u is not None:
        params.append({"params": [block.gate_u], "lr": config.scale_lr})
    for g in params:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, betas=(0.9, 0.95), weight_decay=0.0)
    per_step = config.batch_size * config.seq_len
    T = x.shape[0]
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + layer)
    order = torch.cat([torch.randperm(T, generator=g) for _ in range(math.ceil(config.num_steps * per_step / T))])
    losses, tokens = [], 0
    try:
        for s in range(config.num_steps):
            sel = order[s * per_step : (s + 1) * per_step].to(x.device)
            xs, ys = x[sel], y[sel]
            loss = (block.forward_reference(xs) - ys).pow(2).sum() / ys.pow(2).sum().clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            tokens += sel.numel()
    finally:
        for grp in params:
            for p in grp["params"]:
                p.requires_grad_(False)
    return losses, tokens


@torch.no_grad()
def _relative_error(block: MoEMLP, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((block.forward_reference(x).float() - y).norm() / y.norm().clamp_min(1e-30))


def _train_local(model, blocks: dict[int, MoEMLP], plan: FinetunePlan, inputs: FinetuneInputs, config: FinetuneConfig, base,
                 progress: bool) -> dict[str, Any]:
    """Layer by layer on the converted model's hidden states: each block trained to the dense MLP's output on its own inputs."""
    from tqdm.auto import tqdm

    from .models.arch import activation_name, decoder_layers, dense_weights, mlp_sites, spec_for
    from .pipeline.sequential import dense_from_block
    from .pipeline.stream import LayerStream

    spec = spec_for(model)
    act = activation_name(model.config, spec)
    dense_sites = {s.layer: s.module for s in mlp_sites(base, spec_for(base))} if base is not None else {}
    layers = decoder_layers(model, spec)
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    switched = [i for i in plan.scale if _use_cmoe_gate(model, i, blocks[i])]
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        stream = LayerStream(model, spec, inputs.windows, config.batch_size)
        held = LayerStream(model, spec, inputs.heldout, config.batch_size) if inputs.heldout is not None else None
    per_layer = []
    tokens = 0
    trained = set(plan.lora) | set(plan.scale)
    bar = tqdm(list(mlp_sites(model, spec)), desc="finetune (local)", unit="layer", disable=not progress)
    for site in bar:
        i, layer = site.layer, layers[site.layer]
        if i not in trained:
            stream.step(layer, i)
            if held is not None:
                held.step(layer, i)
            continue
        block = blocks[i]
        post = getattr(layer, spec.mlp_post_norm) if spec.mlp_post_norm else None
        with torch.no_grad():
            outs, caps = stream.run_captured(layer, i, site.parent, site.attr)
            x = torch.cat([c[0] for c in caps]).float()
            # the dense MLP: the base model's, or the block as converted (it holds every dense neuron), before it trains
            w = dense_weights(dense_sites[i], spec, act) if base is not None else None
            y = _dense_output(w, block, x, dense_from_block)
            h_outs, h_caps = held.run_captured(layer, i, site.parent, site.attr) if held is not None else (None, None)
            xh = torch.cat([c[0] for c in h_caps]).float() if h_caps else None
            yh = _dense_output(w, block, xh, dense_from_block) if xh is not None else None
            row: dict[str, Any] = {"layer": i, "train_error_before": _relative_error(block, x, y)}
            if xh is not None:
                row["heldout_error_before"] = _relative_error(block, xh, yh)
        losses, n = _train_block(block, x, y, i in plan.lora, i in plan.scale, config, i)
        tokens += n
        with torch.no_grad():
            row["train_error_after"] = _relative_error(block, x, y)
            row["loss_first"], row["loss_last"] = losses[0], losses[-1]
            stream.advance(outs, [block(c[0]) for c in caps], post)
            if held is not None:
                row["heldout_error_after"] = _relative_error(block, xh, yh)
                held.advance(h_outs, [block(c[0]) for c in h_caps], post)
        per_layer.append(row)
        key = "heldout_error_after" if "heldout_error_after" in row else "train_error_after"
        bar.set_postfix(err=f"{row.get(key.replace('after', 'before')):.3f}->{row[key]:.3f}")
        log.info("layer %d: block error vs dense %s", i, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "layer"))
    bar.close()
    model.train(was_training)
    out: dict[str, Any] = {"steps": config.num_steps, "tokens": tokens, "gate_switched": switched, "local": per_layer}
    for k in ("heldout_error_before", "heldout_error_after"):
        vals = [r[k] for r in per_layer if k in r]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def _dense_output(w, block: MoEMLP, x: torch.Tensor, dense_from_block) -> torch.Tensor:
    return w(x).float() if w is not None else dense_from_block(block, x)


# --------------------------------------------------------------------------- report helpers


@torch.no_grad()
def _u_stats(blocks: dict[int, MoEMLP], layers: list[int]) -> dict[str, Any]:
    rows = [{"layer": i, "mean": float(u.mean()), "min": float(u.min()), "max": float(u.max()), "abs_mean": float(u.abs().mean())}
            for i in layers if (u := blocks[i].gate_u) is not None]
    return {"layers": rows, "abs_max": max((max(abs(r["min"]), abs(r["max"])) for r in rows), default=0.0)}


@torch.no_grad()
def _bias_stats(blocks: dict[int, MoEMLP], layers: list[int]) -> dict[str, Any]:
    rows = [{"layer": i, "min": float(b.min()), "max": float(b.max()), "abs_mean": float(b.abs().mean())}
            for i in layers for b in [blocks[i].selection_bias]]
    return {"layers": rows, "abs_max": max((max(abs(r["min"]), abs(r["max"])) for r in rows), default=0.0)}


__all__ = ["WHAT", "FinetuneConfig", "FinetuneInputs", "FinetunePlan", "check_no_overlap", "finetune", "ngram_hashes", "parse_what",
           "plan_finetune", "prepare"]
