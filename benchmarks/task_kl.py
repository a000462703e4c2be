"""How far is a converted model from the dense one on the documents of tasks it is NOT evaluated on?

KL(dense || model) per token, teacher-forced, on the validation documents of four multiple-choice tasks that
the README's zero-shot evaluation does not use (SciQ, OpenBookQA, CommonsenseQA, HellaSwag; the offline copies
`moeify pull` caches): each document is its question (or context) followed by its correct answer, scored from
its first token, as lm-eval feeds a zero-shot document (the dense logits held in bfloat16, the KL in float32).
The mean over the documents of each task, the mean over the four tasks, and the same KL on 8 Austen held-out
windows of 512 tokens. A continuous, low-noise companion to zero-shot accuracy (whose 4-task mean moves by ~2
points between two seeds of one recipe), on documents outside that evaluation.

    python benchmarks/task_kl.py out/a out/b --json benchmarks/results/task_kl.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import datasets
import torch

import moeify
from moeify.data.assets import zero_shot_dir
from moeify.data.texts import load_token_ids, sample_windows
from runinfo import run_info


def _answer(choices: dict, key: str) -> str:
    return choices["text"][choices["label"].index(key)]


TASKS = {
    "sciq": ("sciq/none/validation", lambda d: f"Question: {d['question']}\nAnswer: {d['correct_answer']}"),
    "openbookqa": ("openbookqa/main/validation", lambda d: f"{d['question_stem']} {_answer(d['choices'], d['answerKey'])}"),
    "commonsense_qa": ("tau/commonsense_qa/none/validation",
                       lambda d: f"Question: {d['question']}\nAnswer: {_answer(d['choices'], d['answerKey'])}"),
    "hellaswag": ("hellaswag/none/validation", lambda d: f"{d['activity_label']}: {d['ctx']} {d['endings'][int(d['label'])]}"),
}


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, in nats."""
    lt, ls = teacher.float().log_softmax(-1), student.float().log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="converted (or fine-tuned) checkpoint folders")
    ap.add_argument("--model", default=None, help="the dense base model (default: the embedded SmolLM2)")
    ap.add_argument("--docs", type=int, default=150, help="documents per task (the first N of its validation set)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    info = run_info(args.model, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "model"})
    dense, tok = moeify.load_model(args.model)
    docs = {}
    for task, (folder, text) in TASKS.items():
        rows = datasets.load_from_disk(str(zero_shot_dir() / folder))
        docs[task] = [tok(text(r), return_tensors="pt").input_ids for r in rows.select(range(min(args.docs, len(rows))))]
    austen = sample_windows(load_token_ids(tok, "austen", "heldout"), 8, 512, 0)
    with torch.no_grad():
        # the dense logits are kept in bfloat16 (27k positions x 49k vocabulary); the KL is computed in float32
        teacher = {t: [dense(e).logits[0].bfloat16() for e in v] for t, v in docs.items()}
        teacher_austen = dense(austen).logits
        result = {**info, "docs_per_task": {t: len(v) for t, v in docs.items()}, "tokens_per_task": {t: sum(e.numel() for e in v) for t, v in docs.items()},
                  "austen_windows": list(austen.shape), "checkpoints": {}}
        for path in args.checkpoints:
            t0 = time.perf_counter()
            model, _ = moeify.load(path)
            r = {t: float(torch.stack([_kl(q, model(e).logits[0]).mean() for q, e in zip(teacher[t], v)]).mean()) for t, v in docs.items()}
            r["tasks_mean"] = sum(r[t] for t in docs) / len(docs)
            r["austen_heldout"] = float(_kl(teacher_austen, model(austen).logits).mean())
            r["seconds"] = time.perf_counter() - t0
            result["checkpoints"][path] = r
            print(path, " ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "seconds"), flush=True)
            del model
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
