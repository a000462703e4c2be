"""Zero-shot evaluation through lm-eval on the offline task copies."""

from __future__ import annotations

import copy

import pytest
import torch

from moeify.errors import InputError
from moeify.eval.zero_shot import average, build_tasks, compare_zero_shot, parse_limits, parse_tasks

from .conftest import tiny_model


def test_parse_limits_global_and_per_task():
    tasks = ["arc_easy", "hellaswag", "boolq"]
    assert parse_limits(None, tasks) == {"arc_easy": None, "hellaswag": None, "boolq": None}
    assert parse_limits("50", tasks) == {"arc_easy": 50, "hellaswag": 50, "boolq": 50}
    assert parse_limits("hellaswag=7,boolq=9", tasks) == {"arc_easy": None, "hellaswag": 7, "boolq": 9}


@pytest.mark.parametrize("spec", ["x", "0", "piqa=5", "hellaswag=-1"])
def test_parse_limits_rejects_bad_specs(spec):
    with pytest.raises(InputError):
        parse_limits(spec, ["arc_easy", "hellaswag"])


def test_parse_tasks_rejects_empty_and_duplicates():
    assert parse_tasks(" arc_easy, piqa ") == ["arc_easy", "piqa"]
    for bad in ("", " , ", "piqa,piqa"):
        with pytest.raises(InputError):
            parse_tasks(bad)


def test_unknown_task_is_refused():
    with pytest.raises(InputError, match="unknown lm-eval task"):
        build_tasks(["arc_easy", "no_such_task_xyz"])


def test_offline_tasks_use_lm_eval_prompts_on_the_full_local_validation_splits():
    tasks = build_tasks(["arc_easy", "boolq", "winogrande"], data="local")
    arc = tasks["arc_easy"]
    docs = list(arc.validation_docs())
    assert len(docs) == 570  # ARC-Easy validation
    d = docs[0]
    # lm-eval's arc_easy.yaml prompt and target, applied to our local documents
    assert arc.doc_to_text(d) == f"Question: {d['question']}\nAnswer:"
    assert arc.doc_to_choice(d) == list(d["choices"]["text"])
    assert arc.doc_to_target(d) == d["choices"]["label"].index(d["answerKey"])
    boolq = list(tasks["boolq"].validation_docs())
    assert len(boolq) == 3270
    assert all(doc["label"] == int(doc["answer"]) for doc in boolq[:200])
    assert len(list(tasks["winogrande"].validation_docs())) == 1267


def _loglik(model, tok, context: str, continuation: str) -> float:
    # lm-eval's pair encoding: continuation tokens = encode(context + continuation) minus the context's
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_accuracy_matches_a_hand_computed_scoring(tmp_path):
    """A tiny random model with SmolLM2's tokenizer: lm-eval's acc / acc_norm through our wiring equal a
    direct log-likelihood argmax over the same documents; the same model as baseline recovers 100 %."""
    from transformers import AutoTokenizer

    from moeify.data.assets import pull_default_model

    tok = AutoTokenizer.from_pretrained(str(pull_default_model()))
    model = tiny_model("llama", vocab_size=len(tok), seed=3)
    limit = 6
    res = compare_zero_shot(model, copy.deepcopy(model), tok, ["arc_easy"], limits={"arc_easy": limit}, batch_size=4)
    entry = res["tasks"]["arc_easy"]
    assert entry["n"] == limit and entry["limit"] == limit
    task = build_tasks(["arc_easy"])["arc_easy"]
    docs = list(task.validation_docs())[:limit]
    hits = hits_norm = 0
    for d in docs:
        ctx = task.doc_to_text(d)
        choices = task.doc_to_choice(d)
        ll = [_loglik(model, tok, ctx, " " + c) for c in choices]
        gold = task.doc_to_target(d)
        hits += int(max(range(len(ll)), key=ll.__getitem__) == gold)
        norm = [v / len(" " + c) for v, c in zip(ll, choices)]
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    acc, acc_norm = entry["metrics"]["acc"], entry["metrics"]["acc_norm"]
    assert acc["model"] == pytest.approx(hits / limit)
    assert acc_norm["model"] == pytest.approx(hits_norm / limit)
    assert acc["dense"] == acc["model"] and acc["recovery"] == pytest.approx(1.0)


def test_average_is_the_unweighted_task_mean_with_recovery_of_the_means():
    tasks = {
        "a": {"metrics": {"acc": {"dense": 0.8, "model": 0.6}, "acc_norm": {"dense": 0.5, "model": 0.5}}},
        "b": {"metrics": {"acc": {"dense": 0.4, "model": 0.4}}},
    }
    avg = average(tasks)
    assert avg["acc"]["dense"] == pytest.approx(0.6) and avg["acc"]["model"] == pytest.approx(0.5)
    assert avg["acc"]["recovery"] == pytest.approx(0.5 / 0.6)
    assert avg["acc_norm"]["tasks"] == 1 and avg["acc_norm"]["recovery"] == pytest.approx(1.0)


def test_cli_refuses_unknown_task_before_loading_the_model(tmp_path):
    from typer.testing import CliRunner

    from moeify.cli.app import app

    r = CliRunner().invoke(app, ["eval", str(tmp_path / "does-not-exist"), "--tasks", "arc_easy,bogus_task_q"])
    assert r.exit_code == 2
    assert "unknown lm-eval task" in r.output
