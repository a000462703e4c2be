"""Calibration data: which tokens a data-driven conversion profiles, and on which it is checked.

    cal = moeify.Calibration(source="austen", samples=8, seq_len=2048, seed=0)
    model = moeify.convert(model, moeify.CMoEConfig(layout="S3A3E8"), calibration=cal, tokenizer=tok)

Calibration windows are drawn GPTQ-style from the source's calibration split
(docs/protocol.md). Router fidelity is measured on `heldout_tokens` tokens taken
from the same calibration split at positions that overlap no calibration
window, so no number is reported on data the conversion was fitted to, and
the evaluation split is never touched.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import InputError


@dataclasses.dataclass
class Calibration:
    """source: a text source (see moeify.texts); samples x seq_len calibration tokens.

    sequential: profile layer l on the outputs of the already converted layers
        0..l-1 (the paper's setting); False feeds the dense outputs instead.
    heldout_tokens: tokens for the router-fidelity report (0 disables it).
    batch_size: windows per layer forward (memory vs speed).
    """

    source: str = "austen"
    samples: int = 8
    seq_len: int = 2048
    seed: int = 0
    sequential: bool = True
    heldout_tokens: int = 2048
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise InputError(f"calibration {name} must be a positive integer, got {v!r}.")
        if self.seq_len < 16:
            raise InputError(f"calibration seq_len={self.seq_len} is too short to profile anything; use at least 16 tokens (the protocol uses 2048).")
        if self.heldout_tokens < 0:
            raise InputError(f"heldout_tokens must be >= 0, got {self.heldout_tokens}.")
        self._cache: dict | None = None

    @classmethod
    def from_windows(cls, windows: torch.Tensor, heldout: torch.Tensor | None = None, **kw) -> "Calibration":
        """Calibration on given token windows [n, L] (and optional held-out windows), e.g. pre-tokenized data."""
        windows = torch.as_tensor(windows, dtype=torch.long)
        if windows.dim() != 2 or windows.numel() == 0:
            raise InputError("calibration windows must be a non-empty [n, seq_len] tensor of token ids.")
        cal = cls(source="<windows>", samples=windows.shape[0], seq_len=windows.shape[1], **kw)
        cal._cache = {"key": None, "windows": (windows, None if heldout is None else torch.as_tensor(heldout, dtype=torch.long))}
        return cal

    @property
    def pretokenized(self) -> bool:
        """True for calibration on given token windows (from_windows): no text source to read."""
        return self._cache is not None and self._cache.get("key") is None

    def _ids(self, tokenizer) -> torch.Tensor:
        from .texts import load_token_ids

        return load_token_ids(tokenizer, self.source, "calibration")

    def validate(self, tokenizer) -> None:
        """Load the text and draw the windows now, so bad or too-short text fails before model work."""
        self.windows(tokenizer)

    def windows(self, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(calibration windows [samples, seq_len], held-out windows [w, L] or None)."""
        key = id(tokenizer)
        if self._cache is not None and self._cache["key"] in (key, None):
            return self._cache["windows"]
        if tokenizer is None:
            raise InputError("calibration needs the model's tokenizer: pass tokenizer=... to moeify.convert.")
        from .texts import sample_windows, window_starts

        ids = self._ids(tokenizer)
        need = self.seq_len + 1
        if ids.numel() < need:
            raise InputError(
                f"calibration source {self.source!r} has {ids.numel()} tokens; {self.samples} windows of {self.seq_len} tokens "
                f"need at least {need}. Give more text, or lower --seq-len."
            )
        starts = window_starts(ids.numel(), self.samples, self.seq_len, self.seed)
        cal = sample_windows(ids, self.samples, self.seq_len, self.seed)
        held = heldout_from(ids, starts, self.seq_len, self.heldout_tokens, self.seq_len)
        self._cache = {"key": key, "windows": (cal, held), "starts": starts}
        return cal, held

    def window_starts(self, tokenizer) -> list[int] | None:
        """Token offsets of the calibration windows in the source's token stream (None for given windows)."""
        self.windows(tokenizer)
        return self._cache.get("starts")


def heldout_from(ids: torch.Tensor, starts: list[int], seq_len: int, n_tokens: int, max_len: int) -> torch.Tensor | None:
    """Up to `n_tokens` tokens in windows of <= max_len that overlap no [s, s+seq_len) calibration span.

    Gaps between calibration windows are scanned from the end of the text backwards
    (deterministic). Returns None if n_tokens == 0 or no gap is long enough (then the
    fidelity report says so).
    """
    if n_tokens <= 0:
        return None
    import numpy as np

    L = min(max_len, n_tokens)
    n = ids.numel()
    covered = np.zeros(n + 1, dtype=np.int64)
    np.add.at(covered, np.asarray(starts, dtype=np.int64), 1)
    np.add.at(covered, np.asarray(starts, dtype=np.int64) + seq_len, -1)
    free = np.concatenate([[False], covered.cumsum()[:n] == 0, [False]])
    edges = np.flatnonzero(np.diff(free.astype(np.int8)))
    runs = list(zip(edges[0::2], edges[1::2]))  # [start, end) of free stretches
    out = []
    for run_start, run_end in reversed(runs):
        while run_end - run_start >= L and len(out) * L < n_tokens:
            out.append(ids[run_end - L : run_end])
            run_end -= L
    if not out:
        return None
    return torch.stack(out)


__all__ = ["Calibration", "heldout_from"]
