"""Text sources and token windows, shared by calibration and perplexity.

A *source* is a string naming where text comes from:

==============================  ============================================================
``"austen"``                    offline default (protocol.md ``austen-v1``); fetched by
                                :func:`moeify.assets.pull_austen`
``"wordnet"``                   WordNet 3.0's glosses, one ``"word: gloss"`` line per synset (general
                                English); fetched by :func:`moeify.assets.pull_wordnet`
``"wikitext2"``                 ``wikitext-2-raw-v1`` via ``datasets`` (needs the hub)
``"c4"``                        ``allenai/c4`` shard 0 via ``datasets`` (needs the hub)
``"hf:NAME[:CONFIG]:SPLIT:COL"`` any hub dataset; rows of COL joined with ``"\\n\\n"``
``path/to/file.txt``            a local UTF-8 text file (any extension but .jsonl)
``path/to/folder``              every ``*.txt`` in it, sorted by name, joined with ``"\\n\\n"``
``path/to/file.jsonl[:FIELD]``  one JSON object per line; FIELD (default ``text``) joined
                                with ``"\\n\\n"``; a list of chat messages is rendered with
                                the tokenizer's chat template
``"A+B"``                       the texts of sources A and B (any of the above) joined with
                                ``"\\n\\n"``: windows drawn from it come from each source in
                                proportion to its length (e.g. ``"austen+wordnet"``)
==============================  ============================================================

The ``split`` is ``"calibration"`` or ``"heldout"``; ``wordnet``, local files and ``hf:``
sources are the same text for both.

Windows follow protocol.md: calibration windows are drawn GPTQ-style
(:func:`sample_windows`), held-out windows are consecutive and
non-overlapping (:func:`heldout_windows`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

import torch

from ..core.files import atomic_write
from ..errors import AssetError, InputError

logger = logging.getLogger("moeify")

SPLITS = ("calibration", "heldout")
AUSTEN_CALIBRATION = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")
AUSTEN_HELDOUT = ("persuasion", "northangerabbey")

QUICK_WINDOWS = 16  # protocol.md: `quick` = first 16 held-out windows
C4_HELDOUT_DOCS = 1100  # "c4-new": first 1,100 validation documents joined with spaces
C4_MAX_WINDOWS = 256  # ... truncated to 256 x 2048 tokens
C4_CALIBRATION_DOCS = 20_000  # a few million tokens: plenty to draw windows from
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"

_CACHE_VERSION = 1
_SOURCES_HELP = (
    "A text source is 'austen', 'wordnet', 'wikitext2', 'c4', 'hf:NAME[:CONFIG]:SPLIT:COLUMN', "
    "a UTF-8 text file, a folder of .txt files, a .jsonl file (optionally 'file.jsonl:FIELD'), or several joined with '+'."
)


# --------------------------------------------------------------------------- text


def load_text(source: str, split: str = "calibration", *, tokenizer=None) -> str:
    """Return the text of ``source`` for ``split`` (see the module docstring).

    ``tokenizer`` is needed only for JSONL chat data (a field holding a list of
    ``{"role", "content"}`` messages), which is rendered with its chat template.
    Raises :class:`InputError` for a missing, unreadable, empty, binary or non-UTF-8 input.
    """
    return _load_text(source, split, tokenizer, render_chat=True)


def _load_text(source, split: str, tokenizer, *, render_chat: bool) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {SPLITS}")
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise InputError(f"empty text source {source!r}. {_SOURCES_HELP}")
    source = str(source)
    key = source.lower()
    parts = source.split("+")
    if len(parts) > 1 and all(p.strip() for p in parts) and not Path(source).expanduser().exists():
        return "\n\n".join(_load_text(p.strip(), split, tokenizer, render_chat=render_chat) for p in parts)

    if key == "austen":
        text = _austen(split)
    elif key == "wordnet":
        from .assets import WORDNET_TEXT, pull_wordnet

        text = (pull_wordnet() / WORDNET_TEXT).read_text(encoding="utf-8")
    elif key in ("wikitext2", "wikitext-2", "wikitext"):
        text = _wikitext2(split)
    elif key in ("c4", "c4-new"):
        text = _c4(split)
    elif key.startswith("hf:"):
        text = _hf(source)
    else:
        text = _local(source, tokenizer, render_chat)

    if not text.strip():
        raise InputError(f"text source {source!r} ({split}) is empty. {_SOURCES_HELP}")
    return text


# --------------------------------------------------------------------------- checks before any model is loaded


def check_text_source(source, split: str = "calibration", *, tokenizer=None, min_tokens: int | None = None,
                      what: str | None = None) -> int | None:
    """Check a text source before a model is loaded, and name ``what`` (e.g. ``"--ppl"``) in any error.

    Without a tokenizer: the source exists and is readable, non-empty UTF-8 text (a local file, folder or
    .jsonl), or - for hub sources (wikitext2, c4, hf:...) - the hub answers or the dataset is in the local
    Hugging Face cache. With a tokenizer (cheap to load, unlike the model): the text is tokenized (cached) and
    must have at least ``min_tokens`` tokens; returns the token count.
    """
    try:
        key = str(source).lower() if isinstance(source, (str, os.PathLike)) else ""
        hub = _hub_dataset(key, str(source)) if key else None
        if tokenizer is None:
            if hub is not None:
                _check_hub_dataset(*hub)
            else:
                _load_text(source, split, None, render_chat=False)
            return None
        n = int(load_token_ids(tokenizer, source, split).numel())
        if min_tokens is not None and n < min_tokens:
            raise InputError(f"text source {str(source)!r} ({split}) has {n} tokens, fewer than the {min_tokens} needed; "
                             "give more text or a smaller sequence length.")
        return n
    except InputError as e:
        if what is None:
            raise
        raise InputError(f"{what} {source}: {e}") from None


def _hub_dataset(key: str, source: str) -> tuple[str, str] | None:
    """(hub dataset id, description) of a source that needs the hub, or None for local and offline sources."""
    if key in ("wikitext2", "wikitext-2", "wikitext"):
        return "wikitext", "WikiText-2"
    if key in ("c4", "c4-new"):
        return "allenai/c4", "C4"
    if key.startswith("hf:"):
        name = source[3:].split(":")[0]
        if not name or len(source[3:].split(":")) not in (3, 4):
            raise InputError(f"bad hub source {source!r}: write hf:NAME[:CONFIG]:SPLIT:COLUMN, "
                             "e.g. hf:wikitext:wikitext-2-raw-v1:test:text")
        return name, f"hub dataset {name!r}"
    return None


def _check_hub_dataset(name: str, what: str) -> None:
    why = hub_status()
    if why is None:
        return
    if hf_dataset_cached(name):
        _datasets_offline()
        return
    raise InputError(f"{what} needs the Hugging Face hub, which is not reachable ({why}), and is not in the local "
                     "datasets cache; offline, use the 'austen' source or a local text file.")


def _datasets_offline() -> None:
    """The hub is unreachable but the data is cached: let `datasets` read its cache without retrying the network."""
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


_HUB_STATUS: dict[str, str | None] = {}


def hub_status(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub (``$HF_ENDPOINT``) answers within ``timeout`` seconds, else why not.

    Checked once per process (one short request), so every command can fail in seconds instead of
    retrying an unreachable hub for a minute. ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` count as
    unreachable.
    """
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if endpoint in _HUB_STATUS:
        return _HUB_STATUS[endpoint]
    why: str | None = None
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            why = f"{var} is set"
    if why is None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            why = f"{endpoint}: {reason}"
    if why is not None:
        logger.debug("Hugging Face hub not reachable: %s", why)
    _HUB_STATUS[endpoint] = why
    return why


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface").expanduser()


def hf_dataset_cached(name: str) -> bool:
    """Whether the local Hugging Face caches hold anything of hub dataset ``name`` (so `datasets` can work offline)."""
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub").expanduser()
    candidates = [datasets_cache / name.replace("/", "___"), hub_cache / f"datasets--{name.replace('/', '--')}"]
    return any(c.is_dir() and any(c.iterdir()) for c in candidates)


def _austen(split: str) -> str:
    from .assets import pull_austen

    folder = pull_austen()
    books = AUSTEN_CALIBRATION if split == "calibration" else AUSTEN_HELDOUT
    return "\n\n".join((folder / f"{b}.txt").read_text(encoding="utf-8") for b in books)


def _load_dataset(*args, what: str, **kwargs):
    _check_hub_dataset(str(args[0]), what)  # seconds, not a minute of retries, when the hub is unreachable
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise AssetError(f"{what} needs the `datasets` package: pip install datasets") from exc
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        raise AssetError(
            f"could not load {what} with datasets.load_dataset ({type(exc).__name__}: {exc}). "
            "It needs the Hugging Face hub; offline, use the 'austen' source or a local text file."
        ) from exc


def _wikitext2(split: str) -> str:
    # GPTQ / SparseGPT / Wanda: test split joined with "\n\n"; train for calibration.
    hf_split = "train" if split == "calibration" else "test"
    data = _load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split, what="WikiText-2")
    return "\n\n".join(data["text"])


def _c4(split: str) -> str:
    if split == "heldout":
        data = _load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION_FILE},
                             split="validation", what="C4 validation shard 0")
        return " ".join(data.select(range(min(C4_HELDOUT_DOCS, len(data))))["text"])
    data = _load_dataset("allenai/c4", data_files={"train": C4_TRAIN_FILE},
                         split="train", what="C4 train shard 0")
    return "\n\n".join(data.select(range(min(C4_CALIBRATION_DOCS, len(data))))["text"])


def _hf(source: str) -> str:
    parts = source[3:].split(":")
    if len(parts) == 3:
        name, config, hf_split, column = parts[0], None, parts[1], parts[2]
    elif len(parts) == 4:
        name, config, hf_split, column = parts
    else:
        raise InputError(f"bad hub source {source!r}: write hf:NAME[:CONFIG]:SPLIT:COLUMN, "
                         "e.g. hf:wikitext:wikitext-2-raw-v1:test:text")
    data = _load_dataset(name, config, split=hf_split, what=f"hub dataset {name!r}")
    if column not in data.column_names:
        raise InputError(f"hub dataset {name!r} has no column {column!r}; it has {data.column_names}")
    return "\n\n".join(str(x) for x in data[column] if x is not None)


def _local(source: str, tokenizer, render_chat: bool = True) -> str:
    path = Path(source).expanduser()
    field = None
    if not path.exists() and ":" in source:
        base, maybe_field = source.rsplit(":", 1)
        if base.lower().endswith(".jsonl") and maybe_field:
            path, field = Path(base).expanduser(), maybe_field
    if not path.exists():
        raise InputError(f"text source {source!r} is not a known name and no such file or folder "
                         f"exists. {_SOURCES_HELP}")
    if path.is_dir():
        try:
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
        except OSError as exc:
            raise InputError(f"cannot read folder {path} ({exc.strerror or exc}).") from None
        if not files:
            raise InputError(f"folder {path} has no *.txt files; put UTF-8 text files in it "
                             "or pass one file.")
        return "\n\n".join(_read_text_file(p) for p in files)
    if path.suffix.lower() == ".jsonl" or field is not None:
        return _read_jsonl(path, field or "text", tokenizer, render_chat)
    return _read_text_file(path)


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror or exc}); check the path and its permissions.") from None
    if b"\x00" in data[:1 << 20]:
        raise InputError(f"{path} looks like a binary file (it contains NUL bytes); "
                         "give a UTF-8 text file.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc}); convert it, e.g. "
                         f"`iconv -t UTF-8 {path.name} > {path.stem}.utf8.txt`.") from exc
    if not text.strip():
        raise InputError(f"{path} is empty; give a file with text in it.")
    return text


def _read_jsonl(path: Path, field: str, tokenizer, render_chat: bool = True) -> str:
    texts = []
    raw = _read_text_file(path)
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno} is not valid JSON ({exc.msg}); a .jsonl file "
                             "has one JSON object per line.") from exc
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"{path}:{lineno} has no field {field!r} (it has {keys}); "
                             f"name the field with '{path}:FIELD'.")
        value = record[field]
        if isinstance(value, list) and not render_chat:  # checked before the tokenizer is loaded
            value = json.dumps(value)
        elif isinstance(value, list):  # chat messages
            if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
                raise InputError(f"{path}:{lineno}: field {field!r} is a list (chat messages); "
                                 "rendering it needs a tokenizer with a chat template.")
            value = tokenizer.apply_chat_template(value, tokenize=False)
        elif not isinstance(value, str):
            raise InputError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, "
                             "expected a string.")
        texts.append(value)
    return "\n\n".join(texts)


# --------------------------------------------------------------------------- tokens


def tokenize(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of ``text`` without special tokens, as a 1-D LongTensor.

    The whole text is encoded in one call: splitting it into chunks changes
    the ids at the seams for some tokenizers (SentencePiece adds a prefix
    space to every call), and a fast tokenizer does ~1M tokens in seconds.
    ``verbose=False`` silences the "longer than the maximum length" warning,
    which does not apply to text that is cut into windows afterwards.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False,
                    return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _tokenizer_fingerprint(tokenizer) -> str:
    # name_or_path alone is not enough (a local path can hold a different
    # tokenizer tomorrow); the ids of a probe string catch most changes cheaply.
    probe = "The quick brown fox, 1234 \u00e9t\u00e9 \n\n  naïve\tcafé. <|im_end|>"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return json.dumps([str(getattr(tokenizer, "name_or_path", "")), len(tokenizer),
                       type(tokenizer).__name__, list(ids)])


def load_token_ids(tokenizer, source: str = "austen", split: str = "calibration", *,
              cache: bool = True) -> torch.LongTensor:
    """Tokenized text of ``source``/``split``, cached under
    ``MOEIFY_HOME/cache/tokens`` as ``.npy`` (keyed by source, split, tokenizer
    and a hash of the text) so repeated runs skip re-tokenizing."""
    import numpy as np

    from .assets import moeify_home

    text = load_text(source, split, tokenizer=tokenizer)
    if not cache:
        return tokenize(tokenizer, text)

    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key_src = json.dumps([_CACHE_VERSION, str(source), split, _tokenizer_fingerprint(tokenizer),
                          text_hash])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(source)).name or str(source))[:40]
    folder = moeify_home() / "cache" / "tokens"
    path = folder / f"{slug}-{split}-{key}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            logger.debug("token ids from cache %s", path)
            return torch.from_numpy(arr.astype(np.int64))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable token cache %s: %s", path, exc)

    ids = tokenize(tokenizer, text)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
        atomic_write(path, lambda tmp: np.save(tmp, ids.numpy().astype(dtype), allow_pickle=False))
    except OSError as exc:  # a read-only cache must not stop the run
        logger.warning("could not cache token ids at %s: %s", path, exc)
    return ids


# --------------------------------------------------------------------------- windows


def _check_ids(token_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        raise InputError("token ids must be a 1-D tensor (one long sequence of the whole text)")
    return token_ids.long()


def sample_windows(token_ids: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """``n`` windows of ``seq_len`` tokens at GPTQ-style random offsets
    (protocol.md): ``random.seed(seed)``; per window
    ``i = random.randint(0, n_tokens - seq_len - 1)``.

    A private ``random.Random(seed)`` gives the same offsets without touching
    the global ``random`` state.
    """
    token_ids = _check_ids(token_ids)
    if n < 1 or seq_len < 1:
        raise InputError(f"need n >= 1 windows of seq_len >= 1 tokens, got n={n}, seq_len={seq_len}")
    n_tokens = token_ids.numel()
    if n_tokens < seq_len + 1:
        raise InputError(f"the text has {n_tokens} tokens but windows of {seq_len} tokens need "
                         f"at least {seq_len + 1}; give more text or a smaller sequence length.")
    return torch.stack([token_ids[i:i + seq_len] for i in window_starts(n_tokens, n, seq_len, seed)])


def window_starts(n_tokens: int, n: int, seq_len: int, seed: int = 0) -> list[int]:
    """The offsets `sample_windows` cuts at: the one place they are drawn (protocol, GPTQ-style)."""
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - seq_len - 1) for _ in range(n)]


def heldout_windows(token_ids: torch.Tensor, seq_len: int = 2048,
                    max_windows: int | None = None) -> torch.LongTensor:
    """Consecutive non-overlapping windows from the start, remainder dropped,
    at most ``max_windows`` of them: shape ``[w, seq_len]``."""
    token_ids = _check_ids(token_ids)
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2 to predict anything, got {seq_len}")
    w = token_ids.numel() // seq_len
    if max_windows is not None:
        w = min(w, int(max_windows))
    if w < 1:
        raise InputError(f"the text has {token_ids.numel()} tokens, fewer than one window of "
                         f"{seq_len}; give more text or a smaller sequence length.")
    return token_ids[: w * seq_len].reshape(w, seq_len).clone()


def calibration_windows(tokenizer, source: str = "austen", n: int = 8, seq_len: int = 2048,
                        seed: int = 0) -> torch.LongTensor:
    """Calibration windows ``[n, seq_len]`` from the calibration split of ``source``."""
    ids = load_token_ids(tokenizer, source, "calibration")
    return sample_windows(ids, n, seq_len, seed)


def perplexity_windows(tokenizer, source: str = "austen", quick: bool = True,
                       seq_len: int = 2048) -> torch.LongTensor:
    """Held-out windows ``[w, seq_len]`` of ``source``: the first 16 when
    ``quick``, else all (C4 is capped at 256, the "c4-new" convention)."""
    ids = load_token_ids(tokenizer, source, "heldout")
    limit = QUICK_WINDOWS if quick else None
    if str(source).lower() in ("c4", "c4-new"):
        limit = min(limit or C4_MAX_WINDOWS, C4_MAX_WINDOWS)
    return heldout_windows(ids, seq_len, limit)
