"""MLPMoE slicing, Fractal Fade, uniform and Compensated pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moeify
from moeify.methods.mlpmoe import MLPMoEConfig, branch_slices, fractal_fade_keep, neuron_scores, plan_mlpmoe
from moeify.core.dense import GatedWeights
from moeify.blocks.moe import MoEMLP


def weights(d=120, h=16, seed=0, skew=True):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(d, h, generator=g)
    if skew:  # make importance differ strongly between slices
        gate = gate * torch.linspace(0.2, 3.0, d)[:, None]
    return GatedWeights(gate=gate, up=torch.randn(d, h, generator=g), down=torch.randn(h, d, generator=g), act="silu")


def test_branches_are_contiguous_and_cover_everything():
    sl = branch_slices(1537, 8)
    assert len(sl) == 8
    assert np.array_equal(np.concatenate(sl), np.arange(1537))
    assert max(s.size for s in sl) - min(s.size for s in sl) <= 1


def test_plain_mlpmoe_is_static_and_unit():
    plan = plan_mlpmoe(weights(), MLPMoEConfig(branches=8))
    assert plan.router == {"type": "static"} and plan.top_k == 8 and plan.scales is None
    assert plan.shared.size == 0


def test_scores_match_definition():
    w = weights(d=5, h=3)
    s = neuron_scores(w)
    i = 3
    assert s[i] == pytest.approx(float(w.gate[i].norm() * w.up[i].norm() * w.down[:, i].norm()), rel=1e-6)


@pytest.mark.parametrize("mode", ["fractal-fade", "uniform"])
@pytest.mark.parametrize("prune", [0.1, 0.2, 0.5])
def test_pruning_meets_the_budget_exactly(mode, prune):
    w = weights()
    plan = plan_mlpmoe(w, MLPMoEConfig(branches=8, prune=prune, prune_mode=mode))
    plan.validate(120, allow_missing=True)
    assert plan.num_neurons == round((1 - prune) * 120)


def test_fractal_fade_keeps_more_of_important_branches_and_uniform_does_not():
    w = weights()
    s = neuron_scores(w)
    ff = plan_mlpmoe(w, MLPMoEConfig(branches=8, prune=0.3, prune_mode="fractal-fade"))
    un = plan_mlpmoe(w, MLPMoEConfig(branches=8, prune=0.3, prune_mode="uniform"))
    imp = np.array([s[b].sum() for b in branch_slices(120, 8)])
    most = int(np.argmax(imp))
    assert ff.expert_sizes[most] == 15  # level 0 keeps its whole branch
    assert max(un.expert_sizes) - min(un.expert_sizes) <= 1
    # dyadic levels: a branch of a lower level never keeps fewer neurons than one of a higher level
    rank = np.argsort(np.argsort(-imp))
    level = np.floor(np.log2(rank + 1))
    sizes = np.array(ff.expert_sizes)
    for a in range(8):
        for b in range(8):
            if level[a] < level[b]:
                assert sizes[a] >= sizes[b] - 1


def test_pruning_removes_the_lowest_scores_inside_each_branch():
    w = weights()
    s = neuron_scores(w)
    plan = plan_mlpmoe(w, MLPMoEConfig(branches=4, prune=0.25, prune_mode="uniform"))
    for kept, full in zip(plan.experts, branch_slices(120, 4)):
        dropped = np.setdiff1d(full, kept)
        assert s[dropped].max() <= s[kept].min()


def test_fractal_fade_bisection_solves_gamma():
    sizes = np.array([10] * 8)
    imp = np.arange(8.0)
    keep = fractal_fade_keep(sizes, imp, 50)
    assert keep.sum() == 50 and keep[np.argmax(imp)] == 10


def test_compensated_drops_least_important_branches_and_preserves_second_moment():
    w = weights()
    s = neuron_scores(w)
    plan = plan_mlpmoe(w, MLPMoEConfig(branches=10, prune=0.2, prune_mode="compensated"))
    assert plan.num_experts == 8
    imp = np.array([s[b].sum() for b in branch_slices(120, 10)])
    kept_ids = {int(e[0]) for e in plan.experts}
    dropped = [b for b, sl in enumerate(branch_slices(120, 10)) if int(sl[0]) not in kept_ids]
    assert set(dropped) == set(np.argsort(imp)[:2].tolist())
    alpha = plan.scales[0]
    assert np.allclose(plan.scales, alpha) and alpha > 1
    kept = plan.routed_index
    assert alpha**2 * np.sum(s[kept] ** 2) == pytest.approx(np.sum(s**2), rel=1e-9)
    # and the block applies alpha
    block = MoEMLP.from_dense(w, plan)
    x = torch.randn(3, 16)
    ref = alpha * (torch.nn.functional.silu(x @ w.gate[kept].T) * (x @ w.up[kept].T)) @ w.down[:, kept].T
    with torch.no_grad():
        assert torch.allclose(block(x), ref.float(), atol=1e-4)


def test_deterministic_plans():
    w = weights(seed=3)
    a = plan_mlpmoe(w, MLPMoEConfig(branches=6, prune=0.3))
    b = plan_mlpmoe(w, MLPMoEConfig(branches=6, prune=0.3))
    assert all(np.array_equal(x, y) for x, y in zip(a.experts, b.experts))


def test_config_round_trip():
    cfg = MLPMoEConfig(branches=5, prune=0.2, prune_mode="compensated")
    d = cfg.to_dict()
    assert d["_type"] == "MLPMoEConfig" and d["_version"] == 1
    assert moeify.MethodConfig.from_dict(d) == cfg
