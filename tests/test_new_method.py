"""A new method is one file: this test file defines one, and it runs through every entry point unchanged.

`EveryOtherNeuronConfig` exists only here: expert j holds the neurons i with i % stride == j,
one of the `stride` experts runs per token, chosen by a linear router whose row j is the
mean W_gate row of expert j. Subclassing MethodConfig registers it; nothing in moeify is
edited for it to work in moeify.convert, `moeify convert` (with its own --stride option),
`moeify compare`, and save -> reload.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify.cli.app import app
from moeify.compare import compare
from moeify.core.method import METHODS, LayerResult, MethodConfig, option
from moeify.core.plan import LayerPlan
from moeify.errors import InputError

from .conftest import tiny_model


@dataclasses.dataclass
class EveryOtherNeuronConfig(MethodConfig):
    """Expert j = neurons i with i % stride == j; top-1 of `stride` experts by a linear router."""

    method = "every-other-neuron"

    stride: int = option(2, "experts per layer; neuron i goes to expert i % stride")

    def __post_init__(self) -> None:
        if int(self.stride) != self.stride or self.stride < 2:
            raise InputError(f"stride must be an integer >= 2, got {self.stride}.")

    def plan(self, weights, x, layer, state=None) -> LayerResult:
        d_h = weights.intermediate_size
        experts = [np.arange(j, d_h, self.stride) for j in range(self.stride)]
        gate = weights.gate.float()
        router = torch.stack([gate[torch.as_tensor(e)].mean(0) for e in experts])
        return LayerResult(LayerPlan(shared=[], experts=experts, top_k=1, router={"type": "linear"}), {"weight": router})

    @classmethod
    def for_fraction(cls, fraction: float, **opts) -> "EveryOtherNeuronConfig":
        return cls(stride=round(1 / fraction), **opts)

    def describe(self) -> str:
        return f"stride {self.stride}"


def _expected_block_output(model_dense, layer: int, x: torch.Tensor, stride: int) -> torch.Tensor:
    """The method's definition computed here from the dense weights, independently of moeify's block."""
    mlp = model_dense.model.layers[layer].mlp
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    h = torch.nn.functional.silu(x @ g.T) * (x @ u.T)
    router = torch.stack([g[j::stride].mean(0) for j in range(stride)])
    pick = (x @ router.T).argmax(-1)
    keep = (torch.arange(g.shape[0])[None, :] % stride) == pick[:, None]
    return (h * keep) @ d.T


def test_the_method_is_registered_by_its_type():
    assert METHODS["every-other-neuron"] is EveryOtherNeuronConfig
    cfg = MethodConfig.from_dict(EveryOtherNeuronConfig(stride=3).to_dict())
    assert isinstance(cfg, EveryOtherNeuronConfig) and cfg.stride == 3


def test_python_api_convert_save_reload(tmp_path):
    dense = tiny_model("llama")
    x = torch.randn(7, dense.config.hidden_size, generator=torch.Generator().manual_seed(0))
    want = _expected_block_output(dense, 1, x, 3)
    conv = moeify.convert(tiny_model("llama"), EveryOtherNeuronConfig(stride=3), progress=False)
    block = conv.model.layers[1].mlp
    assert block.num_experts == 3 and block.top_k == 1 and conv.config.moeify["method"] == "every-other-neuron"
    with torch.no_grad():
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)
    out = moeify.save(conv, tmp_path / "ck")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(again.model.layers[1].mlp(x), want, atol=1e-5, rtol=1e-5)
    assert again.config.moeify["config"]["_type"] == "EveryOtherNeuronConfig"


def test_cli_convert_with_the_methods_own_option(tiny_dir, tmp_path):
    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--method", "every-other-neuron", "--stride", "4", "-o", str(tmp_path / "o"),
                                 "--no-eval", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    m, _ = moeify.load(tmp_path / "o")
    assert [len(lay["experts"]) for lay in m.config.moeify["layers"]] == [4, 4]
    assert json.loads((tmp_path / "r.json").read_text())["config"] == {"stride": 4}
    bad = CliRunner().invoke(app, ["convert", str(tiny_dir), "--method", "every-other-neuron", "--stride", "1", "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "stride must be an integer >= 2" in bad.output and not (tmp_path / "b").exists()
    unknown = CliRunner().invoke(app, ["convert", str(tiny_dir), "--method", "every-other-neuron", "--layout", "S1A1E2", "-o", str(tmp_path / "c")])
    assert unknown.exit_code == 2 and "has no option --layout" in unknown.output


def test_compare_runs_the_new_method(tiny_dir, tmp_path):
    ppl = tmp_path / "ppl.txt"
    ppl.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(600)))
    res = compare(str(tiny_dir), ["every-other-neuron", "mlpmoe"], [0.5], out_dir=tmp_path / "cmp", ppl_source=str(ppl), eval_seq_len=256,
                  calibration=moeify.Calibration(source=str(ppl), samples=1, seq_len=32), progress=False)
    row = next(r for r in res["runs"] if r["method"] == "every-other-neuron")
    assert row["setting"] == "stride 2" and row["active_mlp_fraction"] == pytest.approx(0.5) and row["ppl"] > 0
    assert "| every-other-neuron |" in (tmp_path / "cmp" / "compare.md").read_text()
