"""CMoE and the calibration pipeline on tiny random models."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

import moeify
from moeify.errors import InputError
from moeify.blocks.hierarchical import HierarchicalExperts
from moeify.methods.cmoe import CMoEConfig, plan_cmoe
from moeify.methods.common import balanced_assignment, balanced_kmeans
from moeify.core.layout import parse_layout
from moeify.core.dense import GatedWeights

from .conftest import DENSE_ARCHS, MOE_ARCHS, tiny_model


def _ids(n=4, L=48, seed=0):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def _cal(n=4, L=48):
    return moeify.Calibration.from_windows(_ids(n, L), _ids(1, L, seed=9), batch_size=2)


def _weights(d_h=100, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GatedWeights(torch.randn(d_h, H, generator=g), torch.randn(d_h, H, generator=g), torch.randn(H, d_h, generator=g) / 10, "silu")


@pytest.mark.parametrize("variant", ["paper", "reference", "moeify"])
@pytest.mark.parametrize("layout,d_h", [("S3A3E8", 100), ("S1A3E8", 96), ("S0A2E7", 101), ("S2A6E16", 130)])
def test_partition_covers_every_neuron_once_with_requested_sizes(variant, layout, d_h):
    w = _weights(d_h)
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    cfg = CMoEConfig(layout=layout, variant=variant)
    res = plan_cmoe(w, x, cfg, 0)
    p = res.plan
    ids = np.concatenate([p.shared, *p.experts])
    assert np.array_equal(np.sort(ids), np.arange(d_h))
    lay = parse_layout(layout)
    m = d_h // lay.experts
    assert len(p.experts) == lay.experts - lay.shared
    if lay.shared:
        assert p.shared.size == lay.shared * m + d_h % lay.experts
        assert p.expert_sizes == [m] * lay.routed
    else:
        assert sorted(p.expert_sizes, reverse=True) == [m + (j < d_h % lay.experts) for j in range(lay.routed)]
    assert p.top_k == lay.active


@pytest.mark.parametrize("solver", ["paths", "scipy"])
@pytest.mark.parametrize("sizes", [[2, 2, 2], [3, 2, 1], [1, 1, 1, 1, 1, 1], [4, 3]])
def test_balanced_assignment_is_optimal_by_brute_force(sizes, solver):
    rng = np.random.default_rng(sum(sizes) * 7 + len(sizes))
    n = sum(sizes)
    for trial in range(6):
        cost = rng.random((n, len(sizes))) if trial % 2 else rng.integers(0, 3, (n, len(sizes))).astype(float)  # ties too
        got = balanced_assignment(cost, sizes, solver)
        assert np.bincount(got, minlength=len(sizes)).tolist() == sizes
        best = min(
            sum(cost[i, labels[i]] for i in range(n))
            for labels in set(itertools.permutations(np.repeat(np.arange(len(sizes)), sizes)))
        )
        assert sum(cost[i, got[i]] for i in range(n)) == pytest.approx(best)


def test_shortest_path_solver_matches_scipy_on_larger_problems():
    rng = np.random.default_rng(5)
    for n, sizes in [(60, [20, 20, 20]), (97, [13] * 7 + [6]), (128, [8] * 16)]:
        cost = rng.random((n, len(sizes))) ** 3
        a = balanced_assignment(cost, sizes, "paths")
        b = balanced_assignment(cost, sizes, "scipy")
        assert np.bincount(a, minlength=len(sizes)).tolist() == sizes
        assert cost[np.arange(n), a].sum() == pytest.approx(cost[np.arange(n), b].sum(), abs=1e-9)


@pytest.mark.parametrize("sizes", [[2, 2, 2], [3, 2, 1], [1, 1, 1, 1, 1, 1], [4, 3]])
def test_balanced_assignment_from_a_start_is_optimal_by_brute_force(sizes):
    """Cycle cancelling from a feasible start (what k-means passes after its first iteration) reaches the optimum."""
    rng = np.random.default_rng(sum(sizes) * 11 + len(sizes))
    n = sum(sizes)
    labels_all = set(itertools.permutations(np.repeat(np.arange(len(sizes)), sizes)))
    best = lambda cost: min(sum(cost[i, lab[i]] for i in range(n)) for lab in labels_all)
    for trial in range(6):
        cost = rng.random((n, len(sizes))) if trial % 2 else rng.integers(0, 3, (n, len(sizes))).astype(float)
        start = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        got = balanced_assignment(cost, sizes, "paths", start=start)
        assert np.bincount(got, minlength=len(sizes)).tolist() == sizes
        assert sum(cost[i, got[i]] for i in range(n)) == pytest.approx(best(cost))
        assert np.array_equal(np.bincount(start, minlength=len(sizes)), sizes)  # the caller's start is not modified in place
    # a start with the wrong cluster sizes is not a feasible assignment: solved from nothing instead
    cost = rng.random((n, len(sizes)))
    bad = np.zeros(n, dtype=np.int64)
    assert np.array_equal(balanced_assignment(cost, sizes, "paths", start=bad), balanced_assignment(cost, sizes, "paths"))


def test_warm_started_assignment_equals_the_cold_one_on_generic_costs():
    """Generic (tie-free) costs have one optimum: the warm start gives the same assignment as solving from nothing,
    here along a sequence of slowly changing costs like balanced k-means' iterations."""
    rng = np.random.default_rng(3)
    for n, sizes in [(60, [20, 20, 20]), (97, [13] * 7 + [6]), (128, [8] * 16), (200, [40] * 5)]:
        cost = rng.random((n, len(sizes)))
        prev = balanced_assignment(cost, sizes, "paths")
        for step in range(5):
            cost = cost + 0.05 * rng.standard_normal(cost.shape)
            cold = balanced_assignment(cost, sizes, "paths")
            warm = balanced_assignment(cost, sizes, "paths", start=prev)
            assert np.array_equal(warm, cold)
            assert np.array_equal(cold, balanced_assignment(cost, sizes, "scipy"))
            prev = warm


def test_balanced_kmeans_recovers_planted_clusters():
    # three groups of neurons that fire on disjoint token sets
    T, per = 90, 4
    feats = torch.zeros(T, 3 * per)
    for c in range(3):
        feats[c * 30 : (c + 1) * 30, c * per : (c + 1) * per] = 1.0
    perm = torch.randperm(3 * per, generator=torch.Generator().manual_seed(0))
    feats = feats[:, perm]
    init = np.array([int((perm == c * per).nonzero()) for c in range(3)])
    assign, _, iters = balanced_kmeans(feats.T, [per] * 3, init, 10)
    groups = {tuple(sorted(np.flatnonzero(assign == j))) for j in range(3)}
    truth = {tuple(sorted(int((perm == c * per + i).nonzero()) for i in range(per))) for c in range(3)}
    assert groups == truth
    assert iters >= 1


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_cmoe_all_experts_active_is_exact(arch):
    model = tiny_model(arch)
    ids = _ids(2, 16, seed=3)
    ref = model(ids).logits
    conv = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S2A6E8"), calibration=_cal(), progress=False)
    torch.testing.assert_close(conv(ids).logits, ref, atol=1e-5, rtol=1e-5)
    part = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S1A1E8"), calibration=_cal(), progress=False)
    assert (part(ids).logits - ref).abs().max() > 1e-4  # routing really drops experts


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_hierarchical_conversion_of_moe_models(arch, tmp_path):
    model = tiny_model(arch)
    ids = _ids(2, 16, seed=3)
    ref = model(ids).logits
    conv = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S1A3E4"), calibration=_cal(), progress=False)
    torch.testing.assert_close(conv(ids).logits, ref, atol=1e-5, rtol=1e-5)
    part = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S1A1E4"), calibration=_cal(), progress=False)
    out = part(ids).logits
    assert (out - ref).abs().max() > 1e-5
    layers = part.config.moeify["layers"]
    assert all(lc is None or lc["kind"] == "hierarchical" for lc in layers) and any(layers)
    part.save_pretrained(tmp_path / "h")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert isinstance(back.model.layers[0].mlp.experts, HierarchicalExperts)
    torch.testing.assert_close(back(ids).logits, out, atol=1e-6, rtol=1e-5)  # fused-router kernels differ by an ulp


def test_same_seed_same_plan_and_weights():
    model = tiny_model("llama")
    a = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S1A2E6"), calibration=_cal(), progress=False)
    b = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S1A2E6"), calibration=_cal(), progress=False)
    assert a.config.moeify["layers"] == b.config.moeify["layers"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_saved_cmoe_reloads_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = moeify.convert(tiny_model("qwen2"), CMoEConfig(layout="S1A3E8", variant="paper"), calibration=_cal(), progress=False)
    ids = _ids(2, 16, seed=5)
    out = model(ids).logits
    model.save_pretrained(tmp_path / "c")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    torch.testing.assert_close(back(ids).logits, out, atol=0, rtol=0)
    assert back.config.moeify["method"] == "cmoe"
    assert back.config.moeify["config"]["_data"]["layout"] == "S1A3E8"


def test_sequential_and_dense_feeding_differ_only_after_layer_zero():
    model = tiny_model("llama")
    seq = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S1A1E8"), calibration=_cal(), progress=False)
    cal = _cal()
    cal.sequential = False
    dense = moeify.convert(copy.deepcopy(model), CMoEConfig(layout="S1A1E8"), calibration=cal, progress=False)
    sl, dl = seq.config.moeify["summary"]["per_layer"], dense.config.moeify["summary"]["per_layer"]
    assert sl[0]["calibration_error"] == dl[0]["calibration_error"]
    assert sl[1]["calibration_error"] != dl[1]["calibration_error"]


@pytest.mark.parametrize("layout", ["S1A2E8", "S0A3E6"])
@torch.no_grad()
def test_convert_reports_router_fidelity_on_heldout_tokens(layout):
    """The summary's held-out router fidelity equals an independent computation: the converted model run on the
    held-out tokens, each layer's MLP input captured, the expert outputs computed from the *dense* model's
    weights and the block's neuron ids, the oracle top-k taken here, the router's choice from the block."""
    dense = tiny_model("llama")
    heldout = _ids(1, 48, seed=9)
    cal = moeify.Calibration.from_windows(_ids(4, 48), heldout, batch_size=2)
    conv = moeify.convert(copy.deepcopy(dense), CMoEConfig(layout=layout), calibration=cal, progress=False)
    s = conv.config.moeify["summary"]
    assert s["calibration"]["heldout_tokens"] == 48
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(conv.model.layers)]
    conv(heldout)
    for h in hooks:
        h.remove()
    per = s["per_layer"]
    assert len(per) == len(conv.model.layers) == 2
    for i, layer in enumerate(conv.model.layers):
        block, mlp, x = layer.mlp, dense.model.layers[i].mlp, inputs[i]
        assert block.dropped_bias is not None  # the default variant compensates dropped experts: that path is checked too
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # the dense neurons' activations
        F = mlp.down_proj(h)

        def part(ids):
            ids = torch.as_tensor(ids)
            return h[:, ids] @ mlp.down_proj.weight[:, ids].T

        shared = part(block.shared_index) if block.shared_size else torch.zeros_like(F)
        bounds = np.cumsum([0, *block.expert_sizes])
        E = torch.stack([part(block.routed_index[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)  # [T, N, H]
        k, N = block.top_k, E.shape[1]
        oracle = E.norm(dim=-1).topk(k, dim=-1).indices
        _, router, _ = block.route(x)
        keep_r = torch.zeros(x.shape[0], N).scatter_(1, router, 1.0)
        keep_o = torch.zeros(x.shape[0], N).scatter_(1, oracle, 1.0)
        overlap = float((keep_r * keep_o).sum() / (x.shape[0] * k))
        bias = block.dropped_bias if block.dropped_bias is not None else torch.zeros(N, F.shape[1])

        def rel_error(keep):
            y = shared + torch.einsum("tn,tnh->th", keep, E) + (1 - keep) @ bias
            return float((F - y).norm() / F.norm())

        fid = per[i]["router_fidelity"]
        assert fid["tokens"] == 48
        assert fid["overlap"] == pytest.approx(overlap, abs=1e-6), (i, fid, overlap)
        assert fid["rel_error_router"] == pytest.approx(rel_error(keep_r), rel=1e-4)
        assert fid["rel_error_oracle"] == pytest.approx(rel_error(keep_o), rel=1e-4)
        assert fid["rel_error_oracle"] < fid["rel_error_router"] or overlap == 1.0
    assert s["router_fidelity"] == pytest.approx(np.mean([p["router_fidelity"]["overlap"] for p in per]))
    assert s["heldout_rel_error_router"] == pytest.approx(np.mean([p["router_fidelity"]["rel_error_router"] for p in per]))
    assert 0.0 < s["router_fidelity"] < 1.0  # a router that is neither perfect nor disjoint from the oracle here


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layout="S5A4E8"), "active routed experts"),
        (dict(layout="S9A1E8"), "more shared"),
        (dict(layout="3-3-8"), "SxAyEz"),
        (dict(layout="S1A1E8", k_act=0), "k_act"),
        (dict(layout="S1A1E8", variant="fast"), "variant"),
        (dict(layout="S1A1E8", router="magic"), "router must be"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(kwargs, match):
    with pytest.raises(InputError, match=match):
        CMoEConfig(**kwargs)


def test_more_experts_than_neurons_fails_before_calibration():
    with pytest.raises(InputError, match="do not fit"):
        moeify.convert(tiny_model("llama", intermediate=96), CMoEConfig(layout="S1A1E128"), calibration=_cal(), progress=False)


def test_nan_activations_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="layer 1"):
        moeify.convert(model, CMoEConfig(layout="S1A1E8"), calibration=_cal(), progress=False)


def test_too_short_calibration_text_fails_before_model_work(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4 w5")
    cal = moeify.Calibration(source=str(short), samples=2, seq_len=32)
    with pytest.raises(InputError, match="need at least 33"):
        cal.validate(tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        moeify.Calibration(source=str(empty)).validate(tok)


def test_calibrated_method_without_calibration_is_refused():
    with pytest.raises(InputError, match="needs calibration"):
        moeify.convert(tiny_model("llama"), CMoEConfig(layout="S1A1E8"), progress=False)


def test_heldout_windows_never_overlap_calibration_windows():
    from moeify.data.calibration import heldout_from

    ids = torch.arange(1000)
    starts = [0, 300, 310, 700]
    held = heldout_from(ids, starts, 100, 150, 50)
    assert held is not None and held.numel() == 150
    cal = set()
    for s in starts:
        cal.update(range(s, s + 100))
    assert not cal & set(held.reshape(-1).tolist())


def test_prune_keeps_the_most_active_neurons():
    from moeify.methods.prune import PruneConfig

    w = _weights(96)
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(2))
    res = PruneConfig(layout="S1A3E8").plan(w, x, 0)
    kept = res.plan.shared
    assert kept.size == 48 and res.plan.experts == []
    h = torch.nn.functional.silu(x @ w.gate.T) * (x @ w.up.T)
    counts = torch.zeros(96)
    for row in h.abs().topk(10, dim=-1).indices:
        counts[row] += 1
    order = sorted(range(96), key=lambda i: -counts[i].item())
    assert counts[kept].min() >= counts[order[47]]  # nothing kept is less active than the 48th most active
    y = h[:, torch.as_tensor(kept)] @ w.down[:, torch.as_tensor(kept)].T
    torch.testing.assert_close(res.output, y, atol=1e-4, rtol=1e-4)


def test_prune_converts_and_removes_neurons():
    from moeify.methods.prune import PruneConfig

    conv = moeify.convert(tiny_model("llama"), PruneConfig(fraction=0.5), calibration=_cal(), progress=False)
    s = conv.config.moeify["summary"]
    assert s["active_mlp_fraction"] == pytest.approx(0.5) and s["mlp_params_removed_fraction"] == pytest.approx(0.5)
    assert conv.model.layers[0].mlp.shared_size == 48


@pytest.mark.parametrize("variant", ["paper", "reference", "moeify"])
@pytest.mark.parametrize("layout", ["S1A2E8", "S0A3E6"])
def test_block_computes_what_the_calibration_pass_predicted(variant, layout):
    """The next layer is fed from the plan's own output; the saved block must compute exactly that."""
    from moeify.blocks.moe import MoEMLP

    w = _weights(96)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(4))
    res = plan_cmoe(w, x, CMoEConfig(layout=layout, variant=variant), 0)
    block = MoEMLP.from_dense(w, res.plan, res.router_state, res.block_state)
    torch.testing.assert_close(block(x), res.output, atol=2e-4, rtol=1e-4)
    xh = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    yh, fid = res.heldout(xh)
    torch.testing.assert_close(block(xh), yh, atol=2e-4, rtol=1e-4)
    assert 0.0 <= fid["overlap"] <= 1.0


def test_dropped_expert_compensation_is_the_mean_of_unselected_outputs():
    from moeify.blocks.moe import MoEMLP

    w = _weights(64)
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(6))
    res = plan_cmoe(w, x, CMoEConfig(layout="S1A1E4", variant="moeify"), 0)
    block = MoEMLP.from_dense(w, res.plan, res.router_state, res.block_state)
    _, idx, _ = block.route(x)
    for j in range(block.num_experts):
        unsel = ~(idx == j).any(-1)
        expected = block.expert_forward(x[unsel], j).mean(0)
        torch.testing.assert_close(block.dropped_bias[j], expected, atol=1e-5, rtol=1e-4)
    # and it changes nothing when every expert is active
    full = plan_cmoe(w, x, CMoEConfig(layout="S1A3E4", variant="moeify"), 0)
    assert full.block_state is None and not full.plan.compensate


def test_hierarchical_conversion_of_a_moeify_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from moeify.blocks.hierarchical import HierarchicalMoEMLP

    ids = _ids(2, 16, seed=3)
    dense = tiny_model("llama")
    ref = dense(ids).logits
    b4 = moeify.convert(copy.deepcopy(dense), moeify.MLPMoEConfig(branches=4), progress=False)
    b4.save_pretrained(tmp_path / "b4")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b4")
    exact = moeify.convert(copy.deepcopy(loaded), CMoEConfig(layout="S1A3E4"), calibration=_cal(), progress=False)
    assert isinstance(exact.model.layers[0].mlp, HierarchicalMoEMLP)
    torch.testing.assert_close(exact(ids).logits, ref, atol=1e-5, rtol=1e-5)
    half = moeify.convert(loaded, CMoEConfig(layout="S1A1E4"), calibration=_cal(), progress=False)
    out = half(ids).logits
    assert (out - ref).abs().max() > 1e-4
    m = half.config.moeify
    assert m["summary"]["active_mlp_fraction"] == pytest.approx(0.5)  # every branch keeps 2 of its 4 sub-experts
    assert m["provenance"]["converted_from"]["method"] == "mlpmoe"
    half.save_pretrained(tmp_path / "h")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert isinstance(back.model.layers[1].mlp, HierarchicalMoEMLP)
    torch.testing.assert_close(back(ids).logits, out, atol=0, rtol=0)
    with pytest.raises(InputError, match="already hierarchical"):
        moeify.convert(back, CMoEConfig(layout="S1A1E4"), calibration=_cal(), progress=False)
