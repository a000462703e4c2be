"""vLLM serves tiny moeify checkpoints exactly: greedy tokens (and their log-probs) equal transformers + moeify in fp32.

Every architecture the plugin serves, every router kind (analytical with one and with several
neurons per expert, low-rank analytical, linear, low-rank linear, MLP, static), every gate mode,
compensation, selection bias, expert scales, unequal expert sizes, blocks without a shared
expert, all-active blocks and layers left dense. Engines run in this process in eager mode
(one import of vLLM for all); one checkpoint with every recipe also runs compiled, and one with
tensor parallelism 2.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from .helpers import build_checkpoint, block_spec, compare, engine, hf_greedy, vllm_greedy  # noqa: E402

N_TOKENS = 32
PROMPTS = [[1, 5, 9, 33, 100, 7, 250, 64], [3, 200, 17], [42, 42, 8, 199, 120, 77, 5, 6, 91, 13, 2]]

# one converted layer each; shared + experts = 160 neurons
RECIPES = {
    "analytical-1/expert+compensate": block_spec(32, [40, 24, 64], 2, {"type": "analytical"}, compensate=True),
    "analytical-multi+abs+norm+cmoe+scales+bias": block_spec(
        16, [36, 30, 42, 36], 2, {"type": "analytical", "neurons": 8, "absolute": True, "normalize": True},
        gate="cmoe", scales=True, selection_bias=True),
    "analytical-lowrank+compensate": block_spec(40, [30, 50, 40], 1, {"type": "analytical", "neurons": 6, "rank": 16, "absolute": True},
                                                compensate=True),
    "linear+softmax+scales+no-shared": block_spec(0, [50, 30, 48, 32], 2, {"type": "linear"}, gate="softmax", scales=True),
    "linear-lowrank+cmoe+compensate+bias": block_spec(64, [31, 33, 32], 1, {"type": "linear", "rank": 8}, gate="cmoe",
                                                      compensate=True, selection_bias=True),
    "mlp+bias+compensate": block_spec(16, [72, 72], 1, {"type": "mlp", "hidden": 12}, selection_bias=True, compensate=True),
    "static+scales (MLPMoE)": block_spec(0, [40, 40, 40, 40], 4, {"type": "static"}, scales=True),
    "all-active+cmoe": block_spec(33, [48, 39, 40], 3, {"type": "analytical", "neurons": 6}, gate="cmoe"),
}
NAMES = list(RECIPES)
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


def layers_for(a: int) -> list:
    """Architecture a: three recipes in rotation and one layer left dense, at a rotating position."""
    picked = [RECIPES[NAMES[(3 * a + j) % len(NAMES)]] for j in range(3)]
    picked.insert(a % 4, None)
    return picked


def test_every_recipe_runs_on_at_least_two_architectures():
    counts = {name: 0 for name in NAMES}
    for a in range(len(ARCHS)):
        for j in range(3):
            counts[NAMES[(3 * a + j) % len(NAMES)]] += 1
    assert min(counts.values()) >= 2, counts


@pytest.mark.parametrize("a,arch", list(enumerate(ARCHS)), ids=ARCHS)
def test_greedy_tokens_equal_transformers(tmp_path, a, arch):
    path = build_checkpoint(tmp_path / arch, arch, layers_for(a), seed=a)
    hf = hf_greedy(path, PROMPTS, N_TOKENS)
    with engine(path, skip_tokenizer_init=True) as llm:
        vl = vllm_greedy(llm, PROMPTS, N_TOKENS)
    assert compare(hf, vl) == []
    assert all(len(toks) == N_TOKENS for toks, _ in vl)


def test_every_recipe_compiled(tmp_path):
    """All recipes in one Llama, through vLLM's default torch.compile path (Dynamo traces every router kind)."""
    layers = [RECIPES[n] for n in NAMES] + [None]
    path = build_checkpoint(tmp_path / "all", "llama", layers, seed=11)
    hf = hf_greedy(path, PROMPTS, N_TOKENS)
    with engine(path, skip_tokenizer_init=True, enforce_eager=False) as llm:
        vl = vllm_greedy(llm, PROMPTS, N_TOKENS)
    assert compare(hf, vl) == []


def _shapes(model):
    """Per-rank shapes of layer 0's block (run on each worker)."""
    block = model.model.layers[0].mlp
    return {  # (vLLM's CPU linear layers repack their weights after loading: read the layers' partition sizes)
        "shared_gate_up_rows": block.shared.gate_up_proj.output_size_per_partition,
        "shared_down_cols": block.shared.down_proj.input_size_per_partition,
        "expert_size_per_rank": block.experts.moe_config.intermediate_size_per_partition,
        "router_gate_up": tuple(block.router.gate_up.shape),
    }


def test_tensor_parallel_2(tmp_path, monkeypatch):
    """TP=2: experts and the shared expert split across two ranks (odd sizes padded), routers replicated; same tokens.

    vLLM's automatic CPU thread binding gives each rank a NUMA node and this machine has one, so the
    two ranks are bound by hand (vLLM's VLLM_CPU_OMP_THREADS_BIND, one core each).
    """
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function to the workers
    layers = [RECIPES["all-active+cmoe"], RECIPES["linear-lowrank+cmoe+compensate+bias"], RECIPES["analytical-multi+abs+norm+cmoe+scales+bias"],
              RECIPES["static+scales (MLPMoE)"]]
    layers[0] = block_spec(33, [41, 47, 39], 2, {"type": "analytical", "neurons": 6}, gate="cmoe", compensate=True, selection_bias=True)
    path = build_checkpoint(tmp_path / "tp2", "llama", layers, seed=5)
    hf = hf_greedy(path, PROMPTS, N_TOKENS)
    with engine(path, in_process=False, tensor_parallel_size=2, enforce_eager=True, skip_tokenizer_init=True) as llm:
        vl = vllm_greedy(llm, PROMPTS, N_TOKENS)
        shapes = llm.apply_model(_shapes)
    assert compare(hf, vl) == []
    hidden = 128
    assert len(shapes) == 2
    for s in shapes:
        assert s["shared_gate_up_rows"] == 2 * 17  # 33 shared neurons padded to 34, 17 per rank
        assert s["shared_down_cols"] == 17
        assert s["expert_size_per_rank"] >= 24  # experts padded to 48, 24 per rank (the CPU kernel may round up further)
        assert s["router_gate_up"] == (12, hidden)  # replicated: 2 x 6 router neurons, full hidden size


def test_refuses_hierarchical_blocks(tmp_path):
    """A layer config the fused MoE layer cannot run exactly is refused when the model is built, with the reason."""
    from moeify.vllm.plan import NotServable

    path = build_checkpoint(tmp_path / "h", "llama", [RECIPES["mlp+bias+compensate"], None], seed=3)
    cfg = json.loads((path / "config.json").read_text())
    cfg["moeify"]["layers"][1] = {"kind": "hierarchical", "experts": [], "outer": {"shared": 0}}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotServable, match="layer 1 holds a hierarchical MoE block"):
        with engine(path, skip_tokenizer_init=True):
            pass


@pytest.mark.parametrize("change,match", [
    (lambda c: c["moeify"]["layers"][0].update(gate="sigmoid"), "gate 'sigmoid'"),
    (lambda c: c["moeify"]["layers"][0].update(experts_bias=True), "block settings \\['experts_bias'\\]"),
    (lambda c: c["moeify"]["layers"][0].update(router={"type": "hash"}), "router 'hash'"),
    (lambda c: c.update(hidden_act="relu"), "activation 'relu'"),
    (lambda c: c["moeify"].update(format_version=99), "format version 99"),
])
def test_refuses_what_it_cannot_serve_exactly(tmp_path, change, match):
    from transformers import AutoConfig

    from moeify.vllm.plan import NotServable, servable_layers

    path = build_checkpoint(tmp_path / "r", "llama", [RECIPES["mlp+bias+compensate"]], seed=4)
    cfg = json.loads((path / "config.json").read_text())
    servable_layers(AutoConfig.from_pretrained(path))  # the checkpoint as written is served
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotServable, match=match):
        servable_layers(AutoConfig.from_pretrained(path))


def test_plugin_registers_every_architecture_moeify_converts():
    from vllm import ModelRegistry

    from moeify.models.modeling import classes_for
    from moeify.vllm import BASES, register

    register()
    for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        arch = classes_for(mt)[1].__name__
        assert arch in BASES, arch
        assert arch in ModelRegistry.get_supported_archs()


def test_refuses_moeify_blocks_inside_a_moe_models_experts():
    """Mixtral etc. converted by moeify (hierarchically, inside each expert) are refused; an unconverted one is served."""
    from moeify.blocks.moe import FORMAT_VERSION
    from moeify.models.modeling import classes_for
    from moeify.vllm.plan import NotServable, servable_layers

    from .helpers import tiny_config

    base = tiny_config("mixtral", 2).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k, None)
    cfg_cls = classes_for("mixtral")[0]
    hier = {"kind": "hierarchical", "experts": [{"shared": 40, "experts": [60, 60], "top_k": 1, "router": {"type": "analytical"}, "gate": "unit"}] * 4}
    mo = {"format_version": FORMAT_VERSION, "base_model_type": "mixtral", "layers": [hier, None]}
    with pytest.raises(NotServable, match="hierarchical"):
        servable_layers(cfg_cls(**base, moeify=mo))
    layers, act = servable_layers(cfg_cls(**base, moeify=dict(mo, layers=[None, None])))
    assert layers == [None, None] and act == "silu"
