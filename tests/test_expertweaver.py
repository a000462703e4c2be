"""ExpertWeaver (training-free and downcycling): profiles, layer-adaptive shared share, partition, router."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify.cli.app import app
from moeify.errors import InputError
from moeify.methods.expertweaver import ExpertWeaverConfig, plan_expertweaver
from moeify.core.dense import GatedWeights

from .conftest import tiny_model

H = 32


def _weights(d_h=130, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GatedWeights(torch.randn(d_h, H, generator=g), torch.randn(d_h, H, generator=g), torch.randn(H, d_h, generator=g) / 10, "silu")


def _samples(n=6, L=40, s=10, tasks=(0, 0, 1, 1, 2, 2)):
    """The run state ExpertWeaverConfig.prepare returns: which task each calibration sample belongs to."""
    per = L // s
    return {"windows": n, "seq_len": L, "sample_len": s, "per_window": per,
            "sample_task": np.repeat(np.asarray(tasks), per), "task_names": ["a", "b", "c"], "tasks_present": 3}


def _x(n=6, L=40, seed=1, task_scale=(1.0, 1.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, H, generator=g)
    scale = torch.tensor(task_scale).repeat_interleave(n // len(task_scale))
    return (x * scale[:, None, None]).reshape(-1, H)


def _reference_profile(w, x, cfg, lay):
    """CV and mean |a| computed independently with numpy from the definitions in methods.md §3."""
    g = np.abs(torch.nn.functional.silu(x @ w.gate.T).numpy()).reshape(lay["windows"], lay["seq_len"], -1)
    per, s = lay["per_window"], lay["sample_len"]
    a = g[:, : per * s].reshape(lay["windows"], per, s, -1).mean(2).reshape(lay["windows"] * per, -1)
    tasks = lay["sample_task"]
    means = np.stack([a[tasks == t].mean(0) for t in np.unique(tasks)])
    cv = means.std(0) / (means.mean(0) + cfg.eps)
    return means.mean(0), cv


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (0.2, 1.0, 4.0)])
def test_layer_adaptive_share_partition_and_router(scales):
    w = _weights(130)
    x = _x(task_scale=scales)
    cfg = ExpertWeaverConfig(experts=16, fraction=0.75, max_iters=5)
    res = cfg.plan(w, x, 3, _samples())
    p, info = res.plan, res.info
    importance, cv = _reference_profile(w, x, cfg, _samples())
    r = float((cv > cfg.tau).mean())
    assert info["specialisation_ratio"] == pytest.approx(r)
    assert info["alpha"] == pytest.approx(0.7 - 0.5 * r) and 0.2 <= info["alpha"] <= 0.7
    m, rem = 130 // 16, 130 % 16  # 8 neurons per expert, 2 left over go to the shared expert
    n_se = round(round(info["alpha"] * 130) / (130 / 16))
    assert info["shared_experts"] == n_se and p.shared.size == n_se * m + rem
    assert info["alpha_effective"] == pytest.approx(p.shared.size / 130)
    assert p.expert_sizes == [m] * (16 - n_se)
    assert n_se + p.top_k == 12 == info["total_active_experts"]  # 75 % of 16 experts in total, whatever the share
    assert np.array_equal(np.sort(np.concatenate([p.shared, *p.experts])), np.arange(130))
    assert set(p.shared) == set(np.argsort(-importance, kind="stable")[: p.shared.size])  # highest mean |act(W_gate x)|
    wr = res.router_state["weight"]
    assert p.router == {"type": "linear"} and wr.shape == (16 - n_se, H) and p.gate == "unit"
    for j, e in enumerate(p.experts):
        assert torch.allclose(wr[j], w.gate[torch.as_tensor(e)].mean(0), atol=1e-6)
    if scales[0] != scales[2]:  # tasks with very different inputs make neurons task-specific: a smaller shared share
        assert r > 0.1 and info["alpha"] < 0.7


def test_share_is_capped_when_the_target_is_below_it():
    w, x = _weights(128), _x()
    cfg = ExpertWeaverConfig(experts=16, fraction=0.25, alpha_min=0.1)  # alpha near 0.7 > 25 % active
    info = plan_expertweaver(w, x, cfg, 0, _samples()).info
    assert info["shared_capped"] and info["shared_experts"] == 3 and info["routed_top_k"] == 1
    assert info["total_active_experts"] == 4


def test_deterministic_with_seed():
    w, x = _weights(), _x()
    runs = [plan_expertweaver(w, x, ExpertWeaverConfig(experts=16, seed=s), 0, _samples()).plan for s in (0, 0, 5)]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].experts, runs[1].experts))
    assert np.array_equal(runs[0].shared, runs[2].shared)  # the shared expert does not depend on the seed


def _ids(n, L, seed):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def test_all_experts_active_is_exact_through_convert():
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    cal = moeify.Calibration.from_windows(_ids(3, 32, 0), _ids(1, 32, 9))
    conv = moeify.convert(model, ExpertWeaverConfig(experts=12, fraction=1.0, tasks="none", sample_len=8), calibration=cal, progress=False)
    probe = _ids(2, 12, 1)
    assert torch.allclose(conv(probe).logits, ref(probe).logits, atol=1e-5)
    per_layer = conv.config.moeify["summary"]["per_layer"]
    assert [lay["samples"] for lay in per_layer] == [12, 12]  # 3 windows x 4 samples of 8 tokens


def test_downcycling_uniform_share_softmax_router_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    cal = moeify.Calibration.from_windows(_ids(2, 32, 0), _ids(1, 32, 9))
    cfg = ExpertWeaverConfig(experts=16, fraction=0.5, tasks="none", sample_len=8, downcycle=True, shared_ratio=0.25)
    conv = moeify.convert(tiny_model("llama"), cfg, calibration=cal, progress=False)
    layers = conv.config.moeify["summary"]["per_layer"]
    assert [lay["shared_experts"] for lay in layers] == [4, 4] and [lay["top_k"] for lay in layers] == [4, 4]
    block = conv.model.layers[0].mlp
    x = torch.randn(5, 64)
    scores, idx, wts = block.route(x)
    assert block.gate_mode == "softmax"
    assert torch.allclose(wts, scores.softmax(-1).gather(-1, idx))
    moeify.save(conv, tmp_path / "d")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    probe = _ids(2, 12, 1)
    assert torch.equal(again(probe).logits, conv(probe).logits)


def test_task_calibration_from_files_and_cli(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for name, step in (("a.txt", 3), ("b.txt", 7)):
        (tmp_path / name).write_text(" ".join(f"w{(i * step) % 126}" for i in range(300)))
    cal = moeify.Calibration.from_windows(_ids(2, 32, 0), _ids(1, 32, 9))
    cfg = ExpertWeaverConfig(experts=16, tasks=f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", task_windows=2, sample_len=16)
    new, state = cfg.prepare(cal, tok)
    win, held = new.windows(tok)
    assert win.shape == (2 + 2 * 2, 32) and torch.equal(win[:2], _ids(2, 32, 0))
    assert state["sample_task"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert state["task_names"] == ["<windows>", "a.txt", "b.txt"] and "a.txt" in new.source
    assert "_samples" not in vars(cfg) and cfg.to_dict()["_data"]["tasks"] == cfg.tasks  # run state never lives on the config
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--method", "expertweaver", "--experts", "16", "--fraction", "0.5",
                                 "--profile-tasks", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", "--calib", str(tmp_path / "a.txt"),
                                 "--samples", "2", "--seq-len", "32", "-o", str(out), "--no-eval", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    alphas = [lay["alpha"] for lay in data["summary"]["per_layer"]]
    assert len(alphas) == 2 and all(0.2 <= a <= 0.7 for a in alphas)
    assert {lay["total_active_experts"] for lay in data["summary"]["per_layer"]} == {8}
    assert moeify.load(out)[0].config.moeify["method"] == "expertweaver"


def test_bad_settings():
    with pytest.raises(InputError, match="at most 96 experts"):
        moeify.convert(tiny_model("llama"), ExpertWeaverConfig(experts=128, tasks="none"),
                       calibration=moeify.Calibration.from_windows(_ids(1, 32, 0)), progress=False)
    with pytest.raises(InputError, match=r"nearest reachable fraction is 0\.21875"):
        ExpertWeaverConfig(fraction=0.125)
    with pytest.raises(InputError, match=r"nearest reachable fraction is 0\.296875"):
        ExpertWeaverConfig(fraction=0.3)
    with pytest.raises(InputError, match="alpha_min"):
        ExpertWeaverConfig(alpha_min=0.8, alpha_max=0.7)
    with pytest.raises(InputError, match="task samples"):
        plan_expertweaver(_weights(), _x(), ExpertWeaverConfig(experts=16), 0, None)
    with pytest.raises(InputError, match="dense MLPs only"):
        plan_expertweaver(_weights(), _x()[:100], ExpertWeaverConfig(experts=16), 0, _samples())
    with pytest.raises(InputError, match="no such file"):
        ExpertWeaverConfig(tasks="/nonexistent/t.txt").prepare(moeify.Calibration.from_windows(_ids(1, 32, 0)), None)


@pytest.mark.integration
def test_real_task_calibration_labels_novels_and_local_formats():
    _, tok = moeify.load_model()
    cfg = ExpertWeaverConfig()
    new, lay = cfg.prepare(moeify.Calibration(), tok)
    win, _ = new.windows(tok)
    assert win.shape == (8 + 3, 2048) and lay["sample_len"] == 256 and lay["per_window"] == 8
    assert lay["task_names"] == ["emma", "mansfieldpark", "prideprejudice", "sensesensibility", "code", "licences", "docs"]
    present = set(lay["sample_task"][: 8 * 8].tolist())
    assert len(present) >= 3 and present <= {0, 1, 2, 3}
    assert lay["sample_task"][64:].tolist() == [4] * 8 + [5] * 8 + [6] * 8
    # the local task windows are text of another kind than the novels: code must contain python keywords
    code = tok.decode(win[8])
    assert "self." in code and "def " in code
