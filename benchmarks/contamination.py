"""Does a training text contain the zero-shot tasks' documents? 13-word runs shared with their validation sets.

The usual contamination test (GPT-3's, 13-grams of lower-cased words): every validation document of
ARC-Easy, ARC-Challenge, PIQA and WinoGrande (the offline copies `moeify pull` caches: question,
choices, answers, every field) is cut into 13-word runs and looked up among the runs of the text
source (any `--text` moeify takes: austen's calibration split, wordnet, a file, A+B). Reports, per task,
how many documents share at least one run.

    python benchmarks/contamination.py --text wordnet --json benchmarks/results/contamination_wordnet.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import datasets

from moeify.data.assets import zero_shot_dir
from moeify.data.texts import load_text
from runinfo import run_info

TASKS = {"arc_easy": "ai2_arc/ARC-Easy/validation", "arc_challenge": "ai2_arc/ARC-Challenge/validation",
         "piqa": "piqa/plain_text/validation", "winogrande": "winogrande/winogrande_xl/validation"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _runs(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _document(row: dict) -> str:
    """Every field of a row as text (ARC's choices are {"text": [...], "label": [...]})."""
    return " ".join(" ".join(map(str, v.get("text", []))) if isinstance(v, dict) else str(v) for v in row.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="wordnet")
    ap.add_argument("--n", type=int, default=13)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    info = run_info(None, **{k: str(v) for k, v in vars(args).items()})
    source = set()
    for line in load_text(args.text).splitlines():  # runs within a line (a gloss, a line of a novel) and across none
        source |= _runs(_words(line), args.n)
    tasks = {}
    for task, folder in TASKS.items():
        docs = datasets.load_from_disk(str(zero_shot_dir() / folder))
        shared = [i for i, row in enumerate(docs) if _runs(_words(_document(row)), args.n) & source]
        tasks[task] = {"documents": len(docs), "sharing_a_run": len(shared), "indices": shared[:50]}
        print(f"{task}: {len(shared)} of {len(docs)} validation documents share a {args.n}-word run with {args.text!r}")
    result = {**info, "text": args.text, "n": args.n, "text_runs": len(source), "tasks": tasks}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
