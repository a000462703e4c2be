"""Closed-form refit at conversion (pipeline/refit.py): checked against an independent least-squares solve."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeify
from moeify.blocks.moe import MoEMLP
from moeify.core.dense import GatedWeights
from moeify.errors import InputError
from moeify.methods.cmoe import CMoEConfig, plan_cmoe
from moeify.methods.moefication import MoEficationConfig
from moeify.pipeline.refit import LAMBDAS, refit_block
from moeify.pipeline.sequential import dense_from_block

from .conftest import DENSE_ARCHS, tiny_model


def _weights(d_h=96, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GatedWeights(torch.randn(d_h, H, generator=g), torch.randn(d_h, H, generator=g), torch.randn(H, d_h, generator=g) / 10, "silu")


def _x(T, H=32, seed=1):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


def _block(layout="S1A2E6", compensate=False, seed=0):
    w = _weights(seed=seed)
    x = _x(1200)
    res = plan_cmoe(w, x, CMoEConfig(layout=layout, compensate=compensate), 0)
    return w, x, MoEMLP.from_dense(w, res.plan, res.router_state, res.block_state)


def _rel(block, w, x):
    with torch.no_grad():
        y = w(x)
        return float((block(x) - y).norm() / y.norm())


@pytest.mark.parametrize("compensate", [False, True])
def test_refit_lowers_calibration_and_heldout_error(compensate):
    w, x, block = _block(compensate=compensate)
    xh = _x(400, seed=7)
    before_cal, before_held = _rel(block, w, x), _rel(block, w, xh)
    info = refit_block(block, x, w, xh)
    after_cal, after_held = _rel(block, w, x), _rel(block, w, xh)
    assert info["lambda"] is not None
    assert after_cal < 0.97 * before_cal
    assert after_held < before_held
    # the reported errors are the block's measured ones
    assert info["calibration_error_before"] == pytest.approx(before_cal, rel=1e-4)
    assert info["calibration_error_after"] == pytest.approx(after_cal, rel=1e-4)
    assert info["heldout_error_after"] == pytest.approx(after_held, rel=1e-4)


def test_refit_solves_the_ridge_problem():
    """The refit weights equal an independent solve: routed experts run one by one, the normal equations by lstsq."""
    w, x, block = _block(compensate=True)
    ref = copy.deepcopy(block)
    info = refit_block(block, x, w, _x(400, seed=7))
    lam = info["lambda"]
    with torch.no_grad():
        _, idx, gates = ref.route(x)
        cols = []
        s = ref.shared_size
        gu = x @ ref.shared_gate_up.T
        cols.append(torch.nn.functional.silu(gu[:, :s]) * gu[:, s:])
        for e in range(ref.num_experts):
            o0, o1 = ref.offsets[e], ref.offsets[e + 1]
            m = o1 - o0
            gu = x @ ref.gate_up[2 * o0 : 2 * o1].T
            g = (gates * (idx == e)).sum(1, keepdim=True)  # 0 where e is not selected
            cols.append((torch.nn.functional.silu(gu[:, :m]) * gu[:, m:]) * g)
        sel = torch.zeros(x.shape[0], ref.num_experts).scatter_(1, idx, 1.0)
        cols.append(1.0 - sel)
        f = torch.cat(cols, 1).double()
        y = w(x).double()
        w0 = torch.cat([ref.shared_down, ref.down, ref.dropped_bias]).double()
        g = f.T @ f
        reg = lam * torch.linalg.eigvalsh(g).clamp_min(0).mean()
        want = torch.linalg.solve(g + reg * torch.eye(g.shape[0], dtype=g.dtype), f.T @ y + reg * w0)
    got = torch.cat([block.shared_down, block.down, block.dropped_bias]).double()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    # the input side and the router are untouched
    assert torch.equal(block.gate_up, ref.gate_up) and torch.equal(block.shared_gate_up, ref.shared_gate_up)
    assert all(torch.equal(a, b) for a, b in zip(block.router.parameters(), ref.router.parameters()))


def test_refit_keeps_the_plan_when_nothing_helps():
    """A block with every expert active is the dense MLP: the held-out choice keeps its weights (lambda None) or leaves them equal."""
    w, x, block = _block(layout="S2A4E6")
    before = copy.deepcopy(block.state_dict())
    info = refit_block(block, x, w, _x(300, seed=3))
    assert _rel(block, w, x) < 1e-5
    if info["lambda"] is None:
        assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_refit_without_heldout_chooses_on_a_calibration_split():
    w, x, block = _block()
    before = _rel(block, w, x)
    info = refit_block(block, x, w, None)
    assert info["chosen_on"].startswith("last eighth")
    assert _rel(block, w, x) < before


def _ids(n, L, seed):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_convert_refit_saves_reloads_and_records_it(arch, tmp_path):
    cal = moeify.Calibration.from_windows(_ids(4, 64, 0), _ids(2, 64, 9), batch_size=2)
    plain = moeify.convert(tiny_model(arch), CMoEConfig(layout="S1A2E6", compensate=True), calibration=cal, progress=False)
    refit = moeify.convert(tiny_model(arch), CMoEConfig(layout="S1A2E6", compensate=True), calibration=cal, progress=False, refit=True)
    s0, s1 = plain.config.moeify["summary"], refit.config.moeify["summary"]
    assert refit.config.moeify["refit"]["layers"] == len(refit.config.moeify["layers"])
    assert "refit" not in plain.config.moeify
    assert s1["refit"]["calibration_error_after"] < s1["refit"]["calibration_error_before"]
    assert s1["refit"]["heldout_error_after"] <= s1["refit"]["heldout_error_before"]
    # same plan, other down weights
    assert refit.config.moeify["layers"] == plain.config.moeify["layers"]
    # per layer, on the same inputs, the held-out choice never makes the block worse than the plan
    assert all(lay["refit"]["heldout_error_after"] <= lay["refit"]["heldout_error_before"] for lay in s1["per_layer"])
    assert "refit" not in s0["per_layer"][0]
    path = moeify.save(refit, tmp_path / "r")
    assert json.loads((path / "config.json").read_text())["moeify"]["refit"]["layers"] > 0
    card = (path / "README.md").read_text()
    assert f"{s1['refit']['heldout_error_before']:.4f} -> {s1['refit']['heldout_error_after']:.4f}" in card
    again = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = _ids(1, 20, 5)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, refit(ids).logits, atol=1e-5)


def test_refit_is_deterministic():
    cal = moeify.Calibration.from_windows(_ids(4, 64, 0), _ids(2, 64, 9), batch_size=2)
    a, b = (moeify.convert(tiny_model("llama"), MoEficationConfig(experts=6, active=2, router_steps=20), calibration=cal, progress=False, refit=True)
            for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_refit_refuses_data_free_methods():
    with pytest.raises(InputError, match="data-free"):
        moeify.convert(tiny_model("llama"), moeify.MLPMoEConfig(branches=2), refit=True, progress=False)


def test_lambda_grid_includes_weak_and_strong_ridges():
    assert min(LAMBDAS) <= 1e-4 and max(LAMBDAS) >= 1.0


def test_cli_convert_refit_writes_the_record(tiny_dir, tmp_path):
    import random

    from typer.testing import CliRunner

    from moeify.cli.app import app

    rng = random.Random(0)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{rng.randrange(126)}" for _ in range(4000)))
    out, js = tmp_path / "cmoe", tmp_path / "r.json"
    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--method", "cmoe", "--layout", "S1A2E6", "--calib", str(calib), "--samples", "4",
                                 "--seq-len", "64", "--router-neurons", "3", "--refit", "-o", str(out), "--no-eval", "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["refit"] is True
    assert res["summary"]["refit"]["calibration_error_after"] < res["summary"]["refit"]["calibration_error_before"]
    assert json.loads((out / "config.json").read_text())["moeify"]["refit"] == res["summary"]["refit"]
