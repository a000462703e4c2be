"""MoEfication: balanced k-means on normalised W_gate rows, centroid and trained MLP routers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify.cli.app import app
from moeify.errors import InputError
from moeify.methods.llama_moe import LlamaMoEConfig
from moeify.methods.moefication import MoEficationConfig, plan_moefication
from moeify.methods.common import expert_mass, topk_mask, train_mlp_router
from moeify.core.dense import GatedWeights

from .conftest import random_gated_weights as _weights
from .conftest import random_hidden as _x
from .conftest import random_ids as _ids
from .conftest import tiny_model


@pytest.mark.parametrize("router", ["mlp", "centroid"])
@pytest.mark.parametrize("d_h,E", [(96, 8), (100, 8), (96, 32)])
def test_partition_equal_sizes_and_router_shapes(router, d_h, E):
    w = _weights(d_h)
    cfg = MoEficationConfig(experts=E, active=E // 4, router=router, router_steps=10)
    res = plan_moefication(w, _x(), cfg, 0)
    p = res.plan
    ids = np.concatenate(p.experts)
    assert np.array_equal(np.sort(ids), np.arange(d_h)) and p.shared.size == 0
    assert len(p.experts) == E and p.top_k == E // 4
    assert max(p.expert_sizes) - min(p.expert_sizes) <= 1 and sum(p.expert_sizes) == d_h
    if d_h % E == 0:
        assert set(p.expert_sizes) == {d_h // E}
    if router == "mlp":
        assert p.router == {"type": "mlp", "hidden": 4 * E}
        assert res.router_state["w1"].shape == (4 * E, 32) and res.router_state["w2"].shape == (E, 4 * E)
        assert res.router_state["b2"].shape == (E,)
    else:
        assert p.router == {"type": "linear"} and res.router_state["weight"].shape == (E, 32)


def test_clusters_group_similar_gate_rows():
    # four well separated directions, 24 rows each (plus noise): the clustering must recover them exactly
    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1)
    truth = torch.arange(96) % 4
    gate = base[truth] * 5 + 0.05 * torch.randn(96, 32, generator=g)
    w = GatedWeights(gate, torch.randn(96, 32, generator=g), torch.randn(32, 96, generator=g), "silu")
    p = plan_moefication(w, _x(), MoEficationConfig(experts=4, active=2, router="centroid"), 0).plan
    for e in p.experts:
        assert len(set(truth[torch.as_tensor(e)].tolist())) == 1


def test_deterministic_with_seed_and_seed_matters():
    w, x = _weights(), _x()
    a = plan_moefication(w, x, MoEficationConfig(experts=8, active=2, router_steps=30, seed=0), 0)
    b = plan_moefication(w, x, MoEficationConfig(experts=8, active=2, router_steps=30, seed=0), 0)
    c = plan_moefication(w, x, MoEficationConfig(experts=8, active=2, router_steps=30, seed=1), 0)
    assert all(np.array_equal(e, f) for e, f in zip(a.plan.experts, b.plan.experts))
    assert all(torch.equal(a.router_state[k], b.router_state[k]) for k in a.router_state)
    assert not torch.equal(a.router_state["w2"], c.router_state["w2"])


def test_trained_router_predicts_the_heavy_experts():
    w, x = _weights(), _x(T=1024)
    cfg = MoEficationConfig(experts=8, active=2)
    res = plan_moefication(w, x, cfg, 0)
    xh = _x(T=512, seed=7)
    from moeify.blocks.routers import MLPRouter

    router = MLPRouter(8, 32, res.plan.router, "silu")
    router.load_state_dict(res.router_state)
    truth = topk_mask(expert_mass(w.hidden(xh), res.plan.experts), 2)
    pred = topk_mask(router(xh).detach(), 2)
    overlap = float((truth * pred).sum(-1).mean() / 2)
    assert overlap > 0.6  # random selection overlaps 2/8 = 0.25 on average


def test_train_mlp_router_fits_a_learnable_rule():
    x = _x(T=2048, H=16)
    labels = torch.stack([(x[:, j] > 0).float() for j in range(4)], dim=1)
    st = train_mlp_router(x * 3 + 1, labels, 16, steps=300, batch=256, lr=1e-2, seed=0)
    logits = torch.tanh((x * 3 + 1) @ st["w1"].T + st["b1"]) @ st["w2"].T + st["b2"]
    assert float(((logits > 0).float() == labels).float().mean()) > 0.95  # the standardisation is folded in correctly


def test_all_experts_active_is_exact_and_save_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    cal = moeify.Calibration.from_windows(_ids(2, 32, 0), _ids(1, 32, 9))
    conv = moeify.convert(model, MoEficationConfig(experts=8, active=8), calibration=cal, progress=False)
    probe = _ids(2, 12, 1)
    assert torch.allclose(conv(probe).logits, ref(probe).logits, atol=1e-5)
    sparse = moeify.convert(tiny_model("llama"), MoEficationConfig(experts=8, fraction=0.5, router_steps=20), calibration=cal, progress=False)
    moeify.save(sparse, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(again(probe).logits, sparse(probe).logits)
    assert again.config.moeify["method"] == "moefication"


@pytest.mark.parametrize("cls", [MoEficationConfig, LlamaMoEConfig])
def test_equal_expert_methods_refuse_too_many_experts_and_unreachable_fractions(cls):
    with pytest.raises(InputError, match="at most 96 experts"):
        moeify.convert(tiny_model("llama"), cls(experts=97, active=2),
                       calibration=moeify.Calibration.from_windows(_ids(1, 32, 0)), progress=False)
    with pytest.raises(InputError, match=r"nearest reachable fraction is 0\.3125"):
        cls(experts=32, fraction=0.3)


def test_bad_settings():
    with pytest.raises(InputError, match="router"):
        MoEficationConfig(router="oracle")
    with pytest.raises(InputError, match="disagree"):
        MoEficationConfig(experts=8, active=2, fraction=0.5)


def test_convert_cli(tiny_dir, tmp_path):
    cal = tmp_path / "cal.txt"
    cal.write_text(" ".join(f"w{(i * 13) % 126}" for i in range(400)))
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--method", "moefication", "--experts", "8", "--fraction", "0.25", "--router", "centroid",
                                 "--calib", str(cal), "--samples", "2", "--seq-len", "32", "-o", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output
    m, _ = moeify.load(out)
    assert m.config.moeify["layers"][0]["top_k"] == 2 and len(m.config.moeify["layers"][0]["experts"]) == 8


@pytest.mark.parametrize("make", ["moefication-mlp", "moefication-centroid", "llama-analytical", "expertweaver", "expertweaver-downcycle"])
def test_calibration_output_equals_the_built_block(make):
    from moeify.methods.expertweaver import ExpertWeaverConfig, plan_expertweaver
    from moeify.methods.llama_moe import LlamaMoEConfig, plan_llama_moe
    from moeify.blocks.moe import MoEMLP

    w, x = _weights(100), _x(T=240)
    if make.startswith("moefication"):
        res = plan_moefication(w, x, MoEficationConfig(experts=8, active=3, router=make.split("-")[1], router_steps=10), 0)
    elif make == "llama-analytical":
        res = plan_llama_moe(w, x, LlamaMoEConfig(experts=8, active=3), 0)
    else:
        cfg = ExpertWeaverConfig(experts=10, active=6, alpha_min=0.1, downcycle=make.endswith("downcycle"), shared_ratio=0.2)
        res = plan_expertweaver(w, x, cfg, 0, {"windows": 6, "seq_len": 40, "sample_len": 10, "per_window": 4,
                                               "sample_task": np.repeat(np.arange(6) % 3, 4)})
    block = MoEMLP.from_dense(w, res.plan, res.router_state)
    with torch.no_grad():
        assert torch.allclose(res.output, block(x), atol=1e-5, rtol=1e-4)
    assert res.info["calibration_error"] > 0.01  # top-k of fewer than all experts is not exact on random weights
