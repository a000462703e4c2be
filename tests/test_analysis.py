"""`moeify analyze`: the metrics on constructed cases with known answers, and the command on a tiny checkpoint."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify.analysis.metrics import (activation_rate_histogram, adjusted_rand_index, best_subset_errors, expert_load, fvu, fvu_curves, jaccard,
                                     matched_gaussian, partition_agreement)
from moeify.cli.app import app
from moeify.errors import InputError

runner = CliRunner()


# --------------------------------------------------------------------------- metrics with known answers


def test_fvu_known_values():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(500, 8, generator=g)
    assert fvu(F, F) == 0.0
    assert fvu(F, F.mean(0, keepdim=True).expand_as(F)) == pytest.approx(1.0)
    assert fvu(F, 0.5 * F + 0.5 * F.mean(0)) == pytest.approx(0.25, rel=1e-6)


def test_jaccard_and_ari_of_identical_and_relabelled_partitions():
    experts = [np.array([0, 3, 5]), np.array([1, 2, 4]), np.array([6, 7, 8])]
    assert jaccard([9, 10], [10, 9]) == 1.0
    same = partition_agreement([9, 10], experts, [10, 9], [experts[2], experts[0], experts[1]])
    assert same["shared_jaccard"] == 1.0 and same["routed_ari"] == pytest.approx(1.0) and same["routed_common"] == 9
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    # every pair of neurons split differently: ARI below 0 (worse than chance) for this crossing partition
    crossed = [np.array([0, 1, 6]), np.array([3, 2, 7]), np.array([5, 4, 8])]
    assert partition_agreement([], experts, [], crossed)["routed_ari"] < 0


def test_adjusted_rand_index_matches_sklearn():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    for n, ka, kb in ((50, 3, 4), (200, 8, 8), (7, 2, 5)):
        a, b = rng.integers(0, ka, n), rng.integers(0, kb, n)
        assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
        assert adjusted_rand_index(a, (a + 1) % ka) == pytest.approx(1.0)
    assert adjusted_rand_index(np.zeros(5), np.zeros(5)) == 1.0


def test_expert_load_share_dead_and_entropy():
    sel = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 2]])
    r = expert_load(sel, 4)
    assert r["share"] == pytest.approx([3 / 8, 3 / 8, 2 / 8, 0.0])
    assert r["dead"] == [3]
    uniform = expert_load(torch.arange(8).reshape(4, 2), 8)
    assert uniform["entropy_normalized"] == pytest.approx(1.0) and uniform["entropy_bits"] == pytest.approx(3.0)
    assert expert_load(torch.zeros(10, 1, dtype=torch.long), 4)["entropy_bits"] == 0.0


def test_activation_rate_histogram_splits_shared_and_routed():
    rates = np.array([0.5, 0.2, 0.0, 0.01, 0.0, 0.3])
    hist = activation_rate_histogram(rates, np.array([0, 5]), np.array([1e-3, 0.1, 1.0]))
    assert hist["shared"] == [0, 2] and hist["shared_zero"] == 0
    assert hist["routed"] == [1, 1] and hist["routed_zero"] == 2
    assert hist["marks_in_shared"] == pytest.approx(0.8 / 1.01)


def test_matched_gaussian_matches_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g)
    mean = torch.tensor([3.0, -1.0, 0.0, 10.0, 0.5, 2.0])
    cov = A @ A.T + torch.diag(torch.tensor([100.0, 1, 1, 1, 1, 0.01]))  # anisotropic, like hidden states
    x = torch.distributions.MultivariateNormal(mean, cov).sample((50_000,))
    y = matched_gaussian(x, 50_000, seed=1)
    assert y.shape == (50_000, 6)
    torch.testing.assert_close(y.double().mean(0), x.double().mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(y.double().T), torch.cov(x.double().T), atol=0.02 * float(cov.abs().max()), rtol=0.05)
    assert torch.equal(matched_gaussian(x, 10, seed=3), matched_gaussian(x, 10, seed=3))
    # a rank-deficient covariance (one input direction constant) still works
    x[:, 2] = 1.0
    z = matched_gaussian(x, 1000, seed=0)
    assert torch.allclose(z[:, 2], torch.ones(1000), atol=1e-4)


def test_best_subset_search_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    experts = [torch.randn(40, 5, generator=g) * (j + 1) for j in range(5)]
    rest = sum(experts) + 0.1 * torch.randn(40, 5, generator=g)
    got, how = best_subset_errors(rest, experts, [0, 1, 2, 3, 5])
    assert how == "exact"
    import itertools

    for k in (1, 2, 3):
        brute = torch.stack([((rest - sum((experts[j] for j in c), torch.zeros(40, 5))) ** 2).sum(-1)
                             for c in itertools.combinations(range(5), k)]).min(0).values
        torch.testing.assert_close(got[k].float(), brute, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0].float(), (rest**2).sum(-1))


def test_fvu_curves_full_set_is_exact_and_router_equal_to_oracle_matches_it():
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(200, 6, generator=g)
    experts = [torch.randn(200, 6, generator=g) * s for s in (0.1, 1.0, 3.0, 0.5)]
    dense = shared + sum(experts)
    norms = torch.stack([e.norm(dim=-1) for e in experts], -1)
    res = fvu_curves(dense, shared, experts, norms, [0, 1, 2, 3, 4])
    assert res["oracle"][4] == pytest.approx(0.0, abs=1e-12) and res["router"][4] == pytest.approx(0.0, abs=1e-12)
    assert res["router"] == pytest.approx(res["norm_oracle"])
    assert all(a >= b - 1e-12 for a, b in zip(res["oracle"], res["oracle"][1:]))  # more experts never hurt the best subset
    assert all(o <= r + 1e-9 for o, r in zip(res["oracle"], res["router"]))  # the best subset is a lower bound


# --------------------------------------------------------------------------- the command on a tiny checkpoint


def _words(path, n, seed):
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(126)}" for _ in range(n)))
    return path


@pytest.fixture
def tiny_cmoe(tiny_dir, tmp_path):
    calib = _words(tmp_path / "calib.txt", 4000, 0)
    out = tmp_path / "cmoe"
    r = runner.invoke(app, ["convert", str(tiny_dir), "--method", "cmoe", "--layout", "S1A2E6", "--calib", str(calib), "--samples", "4",
                            "--seq-len", "64", "--router-neurons", "3", "-o", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output
    return out, calib, _words(tmp_path / "held.txt", 1500, 1)


def test_analyze_tiny_checkpoint_end_to_end(tiny_cmoe, tmp_path):
    out, calib, held = tiny_cmoe
    js, figs = tmp_path / "a.json", tmp_path / "figs"
    r = runner.invoke(app, ["analyze", str(out), "--calib", str(calib), "--heldout", str(held), "--heldout-tokens", "256",
                            "--calib-tokens", "256", "--seq-len", "64", "--ranks", "4,8", "--distill", "--distill-steps", "20",
                            "--json", str(js), "--out", str(figs)])
    assert r.exit_code == 0, r.output
    a = json.loads(js.read_text())
    assert a["protocol"] == "analysis-v1" and a["method"] == "cmoe" and len(a["layers"]) == 2
    assert a["settings"]["tokens"] == {"heldout": 256, "calib_a": 256, "calib_b": 256}
    for lay in a["layers"]:
        sm = lay["secret_moe"]
        assert sm["k"] == list(range(6)) and sm["real"]["oracle"][-1] == pytest.approx(0.0, abs=1e-9)  # exact conversion
        assert sm["real"]["static"][-1] == pytest.approx(0.0, abs=1e-9)
        assert sm["real"]["oracle"][2] <= sm["real"]["router"][2] + 1e-12
        assert 0 <= lay["fidelity"]["overlap"] <= 1 and sum(lay["load"]["share"]) == pytest.approx(1.0)
        st = lay["stability"]["a_vs_b"]
        assert 0 <= st["shared_jaccard"] <= 1 and -1 <= st["routed_ari"] <= 1
        assert [row["rank"] for row in lay["lowrank"]] == [None, 4, 8]
        assert lay["activation_rates"]["k_act"] == 10
        assert sum(lay["activation_rates"]["shared"]) + lay["activation_rates"]["shared_zero"] == lay["shared"]
    assert a["summary"]["secret_moe"]["layers"] == 2
    assert a["distill"]["layer"] == 1 and a["distill"]["steps"] == 20 and set(a["distill"]["fvu"]) == {"real", "gaussian"}
    assert "distill.png" in a["figures"]
    assert sorted(p.name for p in figs.glob("*.png")) == sorted(a["figures"])


def test_analysis_with_a_router_equal_to_the_oracle_has_fidelity_one(tiny_cmoe):
    """Replace a block's router by the oracle itself (scores = ||E_j(x)||): overlap 1, equal errors."""
    from moeify.analysis.run import AnalysisSettings, analyze_layer, dense_from_block

    out, _, _ = tiny_cmoe
    model, _ = moeify.load(out)
    block = model.model.layers[0].mlp

    class OracleRouter(torch.nn.Module):
        def forward(self, x):
            return torch.stack([block.expert_forward(x, e).norm(dim=-1) for e in range(block.num_experts)], -1)

    block.router = OracleRouter()
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    res = analyze_layer(block, dense_from_block(block), {"heldout": x}, None, AnalysisSettings(ranks=()), 0)
    assert res["fidelity"]["overlap"] == 1.0
    assert res["fidelity"]["rel_error_router"] == pytest.approx(res["fidelity"]["rel_error_oracle"])
    assert res["secret_moe"]["real"]["router"] == pytest.approx(res["secret_moe"]["real"]["norm_oracle"])


def test_dense_from_block_reproduces_the_original_mlp(tiny_cmoe, tiny_dir):
    from moeify.analysis.run import dense_from_block

    out, _, _ = tiny_cmoe
    model, _ = moeify.load(out)
    dense, _ = moeify.load(tiny_dir)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    w = dense_from_block(model.model.layers[1].mlp)
    torch.testing.assert_close(w(x), dense.model.layers[1].mlp(x), atol=1e-5, rtol=1e-5)


def test_analyze_no_gaussian_drops_only_the_gaussian_comparison(tiny_cmoe, tmp_path):
    out, calib, held = tiny_cmoe
    common = ["analyze", str(out), "--calib", str(calib), "--heldout", str(held), "--heldout-tokens", "128", "--calib-tokens", "128",
              "--seq-len", "64", "--ranks", "", "--no-stability"]
    res = {}
    for name, flag in (("with", "--gaussian"), ("without", "--no-gaussian")):
        js = tmp_path / f"{name}.json"
        r = runner.invoke(app, [*common, flag, "--json", str(js)])
        assert r.exit_code == 0, r.output
        res[name] = json.loads(js.read_text())
    assert res["with"]["settings"]["gaussian"] is True and res["without"]["settings"]["gaussian"] is False
    for a, b in zip(res["with"]["layers"], res["without"]["layers"]):
        assert "gaussian" in a["secret_moe"] and "gaussian_refit" in a["secret_moe"]
        assert "gaussian" not in b["secret_moe"] and "gaussian_refit" not in b["secret_moe"]
        assert a["secret_moe"]["real"] == b["secret_moe"]["real"]  # the real-input curves do not depend on the option
        assert a["fidelity"] == b["fidelity"]
    assert "fvu_gaussian" in json.dumps(res["with"]["summary"]) and "fvu_gaussian" not in json.dumps(res["without"]["summary"])


def test_analyze_refuses_bad_input_before_model_work(tiny_cmoe, tiny_dir, tmp_path):
    out, calib, held = tiny_cmoe
    r = runner.invoke(app, ["analyze", str(tiny_dir), "--calib", str(calib), "--heldout", str(held)])
    assert r.exit_code == 2 and "not a moeify checkpoint" in r.output
    r = runner.invoke(app, ["analyze", str(out), "--layers", "7", "--calib", str(calib), "--heldout", str(held)])
    assert r.exit_code == 2 and "not converted MoE layers" in r.output
    r = runner.invoke(app, ["analyze", str(out), "--calib", str(_words(tmp_path / "tiny.txt", 100, 2)), "--heldout", str(held),
                            "--calib-tokens", "256", "--seq-len", "64"])
    assert r.exit_code == 2 and "too few for two disjoint subsets" in r.output
    js = tmp_path / "exists.json"
    js.write_text("{}")
    r = runner.invoke(app, ["analyze", str(out), "--json", str(js)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    with pytest.raises(InputError, match="positive integer"):
        moeify.analysis.AnalysisSettings(heldout_tokens=0)


# --------------------------------------------------------------------------- distillation students


def test_moe_student_adds_exactly_the_selected_single_neuron_experts_with_unit_weight():
    from moeify.analysis.distill import MoEStudent

    torch.manual_seed(0)
    m = MoEStudent(8, shared=2, experts=6, top_k=2, act="silu", rank=3)
    for p in m.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 8)
    s = m.router(x)
    sel = s.topk(2, dim=-1).indices
    gu = m.gate_up(x)
    h = torch.nn.functional.silu(gu[:, :6]) * gu[:, 6:]
    expect = m.shared(x) + torch.stack([(h[t, sel[t]][:, None] * m.down[sel[t]]).sum(0) for t in range(5)])
    torch.testing.assert_close(m(x), expect)


def test_distillation_learns_a_representable_teacher():
    from moeify.analysis.distill import distill_layer
    from moeify.core.dense import GatedWeights

    g = torch.Generator().manual_seed(0)
    H = 16
    w = GatedWeights(torch.randn(8, H, generator=g) / 4, torch.randn(8, H, generator=g) / 4, torch.randn(H, 8, generator=g) / 4, "silu")
    xs = {"calib_a": torch.randn(1024, H, generator=g), "calib_b": torch.randn(1024, H, generator=g), "heldout": torch.randn(512, H, generator=g)}
    r = distill_layer(w, xs, active=8, experts=16, rank=4, steps=150, batch=128, progress=False)
    assert set(r["fvu"]) == {"real", "gaussian"} and set(r["fvu"]["real"]) == {"dense", "moe", "moe_lowrank"}
    assert r["fvu"]["real"]["dense"] < 0.4  # the dense student has as many neurons as the teacher
    assert all(0 < v < 1 for row in r["fvu"].values() for v in row.values())  # every student beats predicting the mean


# --------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_analysis_of_a_lowrank_cmoe_smollm2_in_memory():
    from moeify.analysis import AnalysisSettings, analyze

    dense, tok = moeify.load_model()
    cal = moeify.Calibration(source="austen", samples=1, seq_len=256, heldout_tokens=0)
    model = moeify.convert(dense, moeify.CMoEConfig(layout="S3A3E8", router_rank=32), calibration=cal, tokenizer=tok, progress=False)
    assert model.model.layers[0].mlp.router.proj.shape == (32, 576)
    a = analyze(model, AnalysisSettings(layers=[2], heldout_tokens=256, calib_tokens=256, seq_len=256, ranks=(16,)), progress=False)
    assert [lay["layer"] for lay in a["layers"]] == [2]
    assert a["settings"]["tokens"] == {"heldout": 256, "calib_a": 256, "calib_b": 256}
    for lay in a["layers"]:
        sm = lay["secret_moe"]
        assert sm["real"]["oracle"][-1] == pytest.approx(0.0, abs=1e-9) and sm["k"] == list(range(6))  # S3A3E8: 5 routed experts
        assert sm["real"]["oracle"][3] < sm["real"]["oracle"][0] and sm["gaussian"]["oracle"][3] < 1
        assert [row["rank"] for row in lay["lowrank"]] == [32, None, 16] and lay["lowrank"][0]["checkpoint_setting"]
        assert 0 < lay["fidelity"]["overlap"] <= 1
