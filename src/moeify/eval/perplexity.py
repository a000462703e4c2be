"""Perplexity on fixed token windows (protocol.md, ``austen-v1``).

Each window is scored on its own with the standard causal shift (position t
predicts token t+1), and ppl = exp(mean NLL over all predicted tokens), so a
window of L tokens contributes L-1 predictions.

The loss is computed in float32 without holding ``[L, vocab]`` float32 logits
for a whole batch: the decoder runs once, then the LM head is applied to
chunks of positions. For SmolLM2 (vocab 49,152) one 2048-token window of full
float32 logits is 400 MB; a 512-position chunk is 100 MB.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

logger = logging.getLogger("moeify")

# Config attributes of architectures whose forward post-processes the LM head
# output (Gemma 2/3 soft-capping, Cohere / Granite / Falcon-H1 scaling): the
# split decoder + LM head path would get their logits wrong.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                         "lm_head_multiplier", "output_multiplier_scale")


def perplexity(model, windows: torch.Tensor, *, batch_size: int = 1, dtype=None,
               progress: bool = True, chunk_tokens: int = 512) -> dict:
    """Perplexity of a causal LM on ``windows`` (``[w, L]`` token ids).

    Args:
        model: a Hugging Face causal LM (anything whose ``model(input_ids).logits``
            are next-token logits).
        windows: LongTensor ``[w, L]``; each row is scored independently.
        batch_size: windows per forward pass.
        dtype: compute dtype via autocast (e.g. ``torch.bfloat16``; label such
            numbers); ``None`` runs the model in its own dtype. The loss is
            always float32.
        progress: show a tqdm bar.
        chunk_tokens: rows of logits (batch x positions) materialised at once.

    Returns:
        ``{"ppl", "nll", "windows", "tokens", "seq_len", "seconds"}`` where
        ``nll`` is the mean NLL per predicted token and ``tokens = w * (L-1)``.
    """
    windows = _check_windows(windows)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    w, seq_len = windows.shape
    device = _model_device(model)
    was_training = model.training
    model.eval()
    split = _split_lm(model)
    total_nll = 0.0  # python float = float64 accumulation across windows
    start = time.perf_counter()
    try:
        with torch.inference_mode(), _autocast(device, dtype):
            exact = dtype is None and next(model.parameters()).dtype == torch.float32
            if split is not None and not _split_matches(model, split, windows[:1, :8].to(device),
                                                        exact):
                logger.info("perplexity: decoder/LM-head split does not reproduce %s's logits; "
                            "using full logits", type(model).__name__)
                split = None
            bar = tqdm(total=w, desc="perplexity", unit="window", disable=not progress,
                       leave=False)
            for i in range(0, w, batch_size):
                ids = windows[i:i + batch_size].to(device)
                total_nll += _batch_nll(model, split, ids, chunk_tokens)
                bar.update(ids.shape[0])
            bar.close()
    finally:
        model.train(was_training)

    tokens = w * (seq_len - 1)
    nll = total_nll / tokens
    return {"ppl": math.exp(nll), "nll": nll, "windows": w, "tokens": tokens,
            "seq_len": seq_len, "seconds": time.perf_counter() - start}


def compare_perplexity(model, baseline, windows: torch.Tensor, *, batch_size: int = 1,
                       dtype=None, progress: bool = True) -> dict:
    """Perplexity of ``model`` and ``baseline`` on the same windows, in one run.

    Returns ``{"model", "baseline", "ratio", "windows", "tokens"}`` with
    ``ratio = ppl_model / ppl_baseline`` (what ``moeify eval --json`` writes
    under ``ppl.<source>``).
    """
    windows = _check_windows(windows)
    base = perplexity(baseline, windows, batch_size=batch_size, dtype=dtype, progress=progress)
    ours = perplexity(model, windows, batch_size=batch_size, dtype=dtype, progress=progress)
    return {"model": ours["ppl"], "baseline": base["ppl"], "ratio": ours["ppl"] / base["ppl"],
            "windows": ours["windows"], "tokens": ours["tokens"]}


# --------------------------------------------------------------------------- internals


def _check_windows(windows) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise InputError("windows must be a 2-D tensor [n_windows, seq_len] of token ids "
                         "(see moeify.texts.perplexity_windows)")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise InputError(f"need at least one window of at least 2 tokens, got {tuple(windows.shape)}")
    if windows.is_floating_point() or windows.is_complex():
        raise InputError(f"windows must hold integer token ids, got {windows.dtype}")
    return windows.long()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _split_lm(model):
    """(decoder, lm_head) when the model's logits are plain ``lm_head(hidden)``; else None."""
    config = getattr(model, "config", None)
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return None
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if decoder is None or decoder is model or not isinstance(head, nn.Linear):
        return None
    return decoder, head


def _hidden(decoder, ids: torch.Tensor) -> torch.Tensor:
    out = decoder(input_ids=ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _split_matches(model, split, ids: torch.Tensor, exact: bool) -> bool:
    """Check on a few tokens that ``lm_head(decoder(ids))`` equals ``model(ids).logits``."""
    decoder, head = split
    try:
        ours = head(_hidden(decoder, ids)).float()
    except Exception:  # noqa: BLE001 - any failure means: use the plain path
        return False
    ref = model(input_ids=ids, use_cache=False).logits.float()
    if ours.shape != ref.shape:
        return False
    tol = 1e-4 if exact else 2e-2  # relative to the largest logit; half precision is noisy
    scale = max(1.0, ref.abs().max().item())
    return (ours - ref).abs().max().item() <= tol * scale


def _batch_nll(model, split, ids: torch.Tensor, chunk_tokens: int) -> float:
    """Summed NLL of the predicted tokens of a batch of windows."""
    b, seq_len = ids.shape
    step = max(1, chunk_tokens // b)  # positions per chunk
    total = 0.0
    if split is not None:
        decoder, head = split
        hidden = _hidden(decoder, ids)
        for s in range(0, seq_len - 1, step):
            e = min(s + step, seq_len - 1)
            logits = head(hidden[:, s:e]).float()
            total += _nll_sum(logits, ids[:, s + 1:e + 1])
        return total
    logits = model(input_ids=ids, use_cache=False).logits
    for s in range(0, seq_len - 1, step):
        e = min(s + step, seq_len - 1)
        total += _nll_sum(logits[:, s:e].float(), ids[:, s + 1:e + 1])
    return total


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum").item()
