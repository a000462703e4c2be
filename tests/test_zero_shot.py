"""Zero-shot evaluation through lm-eval on the offline task copies."""

from __future__ import annotations

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


def _hand_scores(model, tok, task, docs) -> tuple[int, int]:
    """(acc hits, acc_norm hits): a direct log-likelihood argmax over the choices, lm-eval's definitions."""
    hits = hits_norm = 0
    for d in docs:
        ctx = task.doc_to_text(d)
        choices = task.doc_to_choice(d)
        ll = [_loglik(model, tok, ctx, " " + c) for c in choices]
        gold = task.doc_to_target(d)
        hits += int(max(range(len(ll)), key=ll.__getitem__) == gold)
        norm = [v / len(" " + c) for v, c in zip(ll, choices)]
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    return hits, hits_norm


def test_accuracy_matches_a_hand_computed_scoring(tmp_path):
    """Two different tiny random models with SmolLM2's tokenizer, as baseline ("dense") and converted ("model"):
    lm-eval's acc / acc_norm through our wiring equal a direct log-likelihood argmax for each of them, on
    the right side, and recovery is their ratio. The two models score differently on these documents
    (4 vs 1 of 10), so a swap of dense and model, or scoring one model twice, fails here."""
    from transformers import AutoTokenizer

    from moeify.data.assets import pull_default_model

    tok = AutoTokenizer.from_pretrained(str(pull_default_model()))
    dense = tiny_model("llama", vocab_size=len(tok), seed=3)
    model = tiny_model("llama", vocab_size=len(tok), seed=6)
    limit = 10
    task = build_tasks(["arc_easy"])["arc_easy"]
    docs = list(task.validation_docs())[:limit]
    hand = {"dense": _hand_scores(dense, tok, task, docs), "model": _hand_scores(model, tok, task, docs)}
    assert hand["dense"][0] != hand["model"][0]  # the models are told apart by acc (else the test proves nothing)
    res = compare_zero_shot(model, dense, tok, ["arc_easy"], limits={"arc_easy": limit}, batch_size=4)
    entry = res["tasks"]["arc_easy"]
    assert entry["n"] == limit and entry["limit"] == limit
    acc, acc_norm = entry["metrics"]["acc"], entry["metrics"]["acc_norm"]
    for role in ("dense", "model"):
        assert acc[role] == pytest.approx(hand[role][0] / limit), role
        assert acc_norm[role] == pytest.approx(hand[role][1] / limit), role
    assert acc["recovery"] == pytest.approx(hand["model"][0] / hand["dense"][0])


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


# --------------------------------------------------------------------------- every cached task, offline


def test_tasks_beyond_the_dev_suite_read_their_offline_copy_with_lm_evals_own_config():
    from moeify.eval.zero_shot import offline_copy, offline_tasks

    off = offline_tasks()
    assert set(off) >= {"arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq",
                        "openbookqa", "sciq", "social_iqa", "commonsense_qa", "copa", "cb", "rte", "sst2", "mrpc", "mmlu_anatomy"}
    assert "lambada_openai" not in off and "triviaqa" not in off  # not cached (triviaqa's cached config is another one)
    # lm-eval scores MMLU on its test split, which is cached: the same documents; SciQ's test split is not: validation
    assert offline_copy("mmlu_anatomy").split == "test" and offline_copy("sciq").split == "validation"
    tasks = build_tasks(["sciq", "copa", "mmlu_anatomy"], data="local")
    sciq = tasks["sciq"]
    d = sciq.eval_docs[0]
    assert len(sciq.eval_docs) == 1000  # SciQ validation
    assert sciq.doc_to_text(d) == f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:"  # lm-eval's sciq.yaml
    assert sciq.doc_to_target(d) == 3 and sciq.doc_to_choice(d)[3] == d["correct_answer"]
    assert len(tasks["copa"].eval_docs) == 100 and len(tasks["mmlu_anatomy"].eval_docs) == 135  # MMLU anatomy test


def test_resolve_refuses_groups_unknown_names_and_unreachable_data(monkeypatch):
    import moeify.data.texts as texts
    from moeify.eval.zero_shot import resolve_tasks

    monkeypatch.setattr(texts, "_HUB_STATUS", {"https://huggingface.co": "unreachable (test)"})
    for var in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_tasks(["sciq", "copa"])["copa"].folder == "super_glue/copa"
    with pytest.raises(InputError, match="did you mean sciq"):
        resolve_tasks(["sciqq"])
    with pytest.raises(InputError, match="lm-eval group"):
        resolve_tasks(["mmlu"])
    with pytest.raises(InputError, match="lm-eval tag"):
        resolve_tasks(["ai2_arc"])
    with pytest.raises(InputError, match="no offline copy of lambada_openai"):
        resolve_tasks(["sciq", "lambada_openai"], data="local")
    with pytest.raises(InputError, match=r"lambada_openai \(no offline copy\) need the Hugging Face hub, which is not reachable \(unreachable \(test\)\)"):
        resolve_tasks(["sciq", "lambada_openai"], data="auto")
    with pytest.raises(InputError, match="--task-data hub"):
        resolve_tasks(["sciq"], data="hub")


def test_a_task_beyond_the_dev_suite_scores_offline_with_its_dense_baseline():
    from transformers import AutoTokenizer

    from moeify.data.assets import pull_default_model

    tok = AutoTokenizer.from_pretrained(str(pull_default_model()))
    dense = tiny_model("llama", vocab_size=len(tok), seed=3)
    model = tiny_model("llama", vocab_size=len(tok), seed=6)
    res = compare_zero_shot(model, dense, tok, ["copa"], limits={"copa": 8}, batch_size=4, data="local")
    e = res["tasks"]["copa"]
    assert e["n"] == 8 and e["split"] == "validation" and e["data"] == "offline copy super_glue/copa"
    acc = e["metrics"]["acc"]
    assert 0 <= acc["dense"] <= 1 and 0 <= acc["model"] <= 1 and set(e["seconds"]) == {"dense", "model"}


def test_eval_tasks_list_shows_the_offline_tasks(tmp_path):
    import json

    from typer.testing import CliRunner

    from moeify.cli.app import app

    js = tmp_path / "tasks.json"
    r = CliRunner().invoke(app, ["eval", "--tasks", "list", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "lm-eval tasks run offline here" in r.output and "sciq" in r.output and "mmlu_<config>" in r.output
    listed = json.loads(js.read_text())["tasks"]
    assert listed["sciq"] == {"folder": "sciq/none", "split": "validation"} and listed["boolq"]["folder"] == "boolq/none"
