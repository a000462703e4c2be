"""The low-rank router option of CMoE (router_rank): data-aware projection, conversion, save/reload, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify.cli.app import app
from moeify.errors import InputError
from moeify.methods.cmoe import CMoEConfig, lowrank_factors

from .conftest import tiny_model


def _ids(n=4, L=48, seed=0):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def _cal():
    return moeify.Calibration.from_windows(_ids(), _ids(1, 48, seed=9), batch_size=2)


def test_rank_r_projection_is_exact_for_inputs_in_an_r_dim_subspace():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 32, generator=g)  # full rank 20
    Q = torch.linalg.qr(torch.randn(32, 5, generator=g))[0].T  # 5 orthonormal directions
    x = torch.randn(400, 5, generator=g) @ Q
    P, A = lowrank_factors(M, x, 5)
    assert P.shape == (5, 32) and A.shape == (20, 5)
    torch.testing.assert_close(x @ P.T @ A.T, x @ M.T, atol=1e-3, rtol=1e-3)


def test_rank_r_projection_is_exact_for_a_rank_r_router_matrix():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(16, 4, generator=g) @ torch.randn(4, 32, generator=g)  # rank 4
    x = torch.randn(300, 32, generator=g)
    P, A = lowrank_factors(M, x, 4)
    torch.testing.assert_close(x @ P.T @ A.T, x @ M.T, atol=1e-3, rtol=1e-3)


def test_data_aware_projection_beats_plain_svd_on_anisotropic_inputs():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(16, 32, generator=g)
    scale = torch.logspace(1, -2, 32)  # inputs live mostly in the first directions
    x = torch.randn(2000, 32, generator=g) * scale
    errs = []
    for r in (2, 4, 8, 16):
        P, A = lowrank_factors(M, x, r)
        errs.append(float((x @ M.T - x @ P.T @ A.T).norm()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * float((x @ M.T).norm())
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    plain = x @ (U[:, :4] * S[:4] @ Vh[:4]).T
    assert errs[1] < 0.75 * float((x @ M.T - plain).norm())


def test_lowrank_router_converts_reloads_and_is_exact_with_every_expert_active(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama")
    ids = _ids(2, 16, seed=5)
    dense_logits = base(ids).logits
    exact = moeify.convert(tiny_model("llama"), CMoEConfig(layout="S1A7E8", router_rank=8), calibration=_cal(), progress=False)
    torch.testing.assert_close(exact(ids).logits, dense_logits, atol=1e-4, rtol=1e-4)

    model = moeify.convert(tiny_model("llama"), CMoEConfig(layout="S1A2E8", router_rank=8), calibration=_cal(), progress=False)
    block = model.model.layers[0].mlp
    assert block.router.proj.shape == (8, 64) and block.router.gate_up.shape[1] == 8
    assert model.config.moeify["layers"][0]["router"]["rank"] == 8
    out = model(ids).logits
    model.save_pretrained(tmp_path / "lr")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "lr")
    torch.testing.assert_close(back(ids).logits, out, atol=0, rtol=0)


def test_lowrank_router_differs_from_full_rank_and_scores_match_the_plan():
    cal = _cal()
    full = moeify.convert(tiny_model("llama"), CMoEConfig(layout="S1A2E8"), calibration=cal, progress=False)
    low = moeify.convert(tiny_model("llama"), CMoEConfig(layout="S1A2E8", router_rank=4), calibration=_cal(), progress=False)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
    bf, bl = full.model.layers[0].mlp, low.model.layers[0].mlp
    assert torch.equal(bf.shared_index, bl.shared_index) and torch.equal(bf.routed_index, bl.routed_index)
    assert not torch.allclose(bf.router(x), bl.router(x))
    # the block's router output is exactly act(G P x) * (U P x), abs, combined
    r = bl.router
    xp = x @ r.proj.T
    n = r.n
    gu = xp @ r.gate_up.T
    torch.testing.assert_close(r(x), (torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]).abs() @ r.combine.T)


@pytest.mark.parametrize("rank,match", [(0, "router_rank"), (2.5, "router_rank")])
def test_bad_router_rank_fails_in_the_config(rank, match):
    with pytest.raises(InputError, match=match):
        CMoEConfig(layout="S1A2E8", router_rank=rank)


def test_router_rank_at_least_the_hidden_size_is_refused():
    with pytest.raises(InputError, match="below the hidden size"):
        moeify.convert(tiny_model("llama"), CMoEConfig(layout="S1A2E8", router_rank=64), calibration=_cal(), progress=False)


def test_cli_router_rank_option(tiny_dir, tmp_path):
    import random

    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(126)}" for _ in range(3000)))
    out, js = tmp_path / "lr", tmp_path / "lr.json"
    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--method", "cmoe", "--layout", "S1A2E8", "--calib", str(text), "--samples", "4",
                                 "--seq-len", "64", "--router-rank", "6", "-o", str(out), "--no-eval", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["config"]["router_rank"] == 6
    cfg = json.loads((out / "config.json").read_text())
    assert all(lay["router"]["rank"] == 6 for lay in cfg["moeify"]["layers"])
