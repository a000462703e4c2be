"""LLaMA-MoE splits: random and gate-row clustering, analytical / MoEfication routers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import moeify
from moeify.errors import InputError
from moeify.methods.llama_moe import LlamaMoEConfig, plan_llama_moe
from moeify.core.dense import GatedWeights

from .conftest import random_gated_weights as _weights
from .conftest import random_hidden as _x
from .conftest import random_ids as _ids
from .conftest import tiny_model


@pytest.mark.parametrize("split", ["random", "cluster"])
@pytest.mark.parametrize("router", ["analytical", "mlp", "centroid"])
def test_partition_sizes_and_router_shapes(split, router):
    d_h, E = 100, 8
    res = plan_llama_moe(_weights(d_h), _x(), LlamaMoEConfig(experts=E, active=3, split=split, router=router, router_steps=10), 2)
    p = res.plan
    assert np.array_equal(np.sort(np.concatenate(p.experts)), np.arange(d_h)) and p.shared.size == 0
    assert sorted(p.expert_sizes) == [12] * 4 + [13] * 4 and p.top_k == 3
    st = res.router_state
    if router == "analytical":
        assert p.router["type"] == "analytical" and p.router["neurons"] == 8 * E
        assert st["gate_up"].shape == (2 * 8 * E, 32) and st["combine"].shape == (E, 8 * E)
        # each expert's router reads only its own neurons
        assert ((st["combine"] != 0).sum(1) == 8).all()
    elif router == "mlp":
        assert st["w1"].shape == (4 * E, 32) and st["w2"].shape == (E, 4 * E)
    else:
        assert st["weight"].shape == (E, 32)


def test_random_split_is_seeded_and_not_contiguous():
    w = _weights(96)
    a = plan_llama_moe(w, _x(), LlamaMoEConfig(experts=8, active=2, seed=0), 0).plan
    b = plan_llama_moe(w, _x(), LlamaMoEConfig(experts=8, active=2, seed=0), 0).plan
    c = plan_llama_moe(w, _x(), LlamaMoEConfig(experts=8, active=2, seed=1), 0).plan
    d = plan_llama_moe(w, _x(), LlamaMoEConfig(experts=8, active=2, seed=0), 1).plan  # another layer gets another split
    assert all(np.array_equal(e, f) for e, f in zip(a.experts, b.experts))
    assert not all(np.array_equal(e, f) for e, f in zip(a.experts, c.experts))
    assert not all(np.array_equal(e, f) for e, f in zip(a.experts, d.experts))
    assert not any(np.array_equal(e, np.arange(e[0], e[0] + e.size)) for e in a.experts)


def test_cluster_split_is_deterministic_and_keeps_similar_rows_together():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 32, generator=g) * 4
    truth = torch.arange(96) % 4
    w = GatedWeights(base[truth] + 0.05 * torch.randn(96, 32, generator=g), torch.randn(96, 32, generator=g), torch.randn(32, 96, generator=g), "silu")
    cfg = LlamaMoEConfig(experts=4, active=1, split="cluster")
    a = plan_llama_moe(w, _x(), cfg, 0).plan
    b = plan_llama_moe(w, _x(), cfg, 0).plan
    assert all(np.array_equal(e, f) for e, f in zip(a.experts, b.experts))
    for e in a.experts:
        assert len(set(truth[torch.as_tensor(e)].tolist())) == 1


@pytest.mark.parametrize("split", ["random", "cluster"])
def test_all_experts_active_is_exact(split):
    model = tiny_model("qwen2")
    ref = copy.deepcopy(model)
    cal = moeify.Calibration.from_windows(_ids(2, 32, 0), _ids(1, 32, 9))
    conv = moeify.convert(model, LlamaMoEConfig(experts=6, active=6, split=split), calibration=cal, progress=False)
    probe = _ids(2, 12, 1)
    assert torch.allclose(conv(probe).logits, ref(probe).logits, atol=1e-5)


def test_sparse_conversion_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    cal = moeify.Calibration.from_windows(_ids(2, 32, 0), _ids(1, 32, 9))
    conv = moeify.convert(tiny_model("llama"), LlamaMoEConfig(experts=8, fraction=0.25), calibration=cal, progress=False)
    s = conv.config.moeify["summary"]
    assert s["active_mlp_fraction"] == pytest.approx(0.25)
    assert 0.0 <= s["router_fidelity"] <= 1.0
    moeify.save(conv, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    probe = _ids(2, 12, 1)
    assert torch.equal(again(probe).logits, conv(probe).logits)


def test_bad_settings():
    # too many experts and unreachable fractions: tests/test_moefication.py (shared by the equal-expert methods)
    with pytest.raises(InputError, match="split"):
        LlamaMoEConfig(split="halves")
    with pytest.raises(InputError, match="between 1 and 16"):
        LlamaMoEConfig(active=17)
