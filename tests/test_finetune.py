"""Light fine-tuning (moeify.finetune, `moeify finetune`) on a tiny CMoE-converted Llama with a word-level tokenizer.

Every expected value is computed here from the model, the windows and the rules of docs/methods.md
("Light fine-tuning"), never read back from the code under test.
"""

from __future__ import annotations

import importlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moeify
from moeify.blocks.moe import MoEMLP
from moeify.cli.app import app
from moeify.errors import InputError
from moeify.finetuning import FinetuneConfig, check_no_overlap, finetune

from .conftest import save_tiny_llama

ft_module = importlib.import_module("moeify.finetuning")
runner = CliRunner()


def _language(n: int, seed: int) -> str:
    """Words w0..w119 from a small Markov chain: text a tiny model can learn something from."""
    r = random.Random(seed)
    out, w = [], 0
    for _ in range(n):
        w = (w * 7 + r.choice([1, 2, 3, 5])) % 120
        out.append(f"w{w}")
    return " ".join(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    dense = save_tiny_llama(root / "dense")
    (root / "train.txt").write_text(_language(12000, 1))
    (root / "eval.txt").write_text(_language(2100, 2))  # one perplexity window of 2048 tokens
    cal = moeify.Calibration(source=str(root / "train.txt"), samples=4, seq_len=64)
    conv = moeify.convert(str(dense), moeify.CMoEConfig(layout="S1A2E6", router_neurons=3), calibration=cal, progress=False)
    conv.save_pretrained(root / "cmoe")
    static = moeify.convert(str(dense), moeify.MLPMoEConfig(branches=4), progress=False)  # all experts active: nothing routes
    static.save_pretrained(root / "static")
    return {"root": root, "dense": str(dense), "cmoe": str(root / "cmoe"), "static": str(root / "static"),
            "train": str(root / "train.txt"), "eval": str(root / "eval.txt")}


def _cfg(world, **kw) -> FinetuneConfig:
    base = {"text": world["train"], "samples": 8, "seq_len": 64, "batch_size": 4, "steps": 3, "ppl": world["eval"], "evaluate": False}
    base.update(kw)
    return FinetuneConfig(**base)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _blocks(model) -> dict[int, MoEMLP]:
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEMLP)}


def _windows(world, cfg: FinetuneConfig) -> torch.Tensor:
    from moeify.data.texts import load_token_ids, sample_windows
    from moeify.models.checkpoint import load_tokenizer

    tok = load_tokenizer(world["cmoe"])
    return sample_windows(load_token_ids(tok, cfg.text, "calibration"), cfg.samples, cfg.seq_len, cfg.seed)


def _ids(n=2, L=24, seed=5):
    return torch.randint(0, 120, (n, L), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- u, b, LoRA, determinism, loss


def test_u_moves_from_zero_and_the_reloaded_model_has_it(world, tmp_path):
    before = _load(world["cmoe"])
    assert all(b.gate_u is None and b.layer_config["gate"] == "unit" for b in _blocks(before).values())
    model, _ = finetune(world["cmoe"], _cfg(world, what="scale", scale_lr=1e-2, steps=4), progress=False)
    blocks = _blocks(model)
    assert len(blocks) == 2
    for b in blocks.values():
        assert b.gate_u is not None and b.gate_u.abs().max() > 1e-3  # Adam moves each u by ~scale_lr per step with a gradient
    assert all(lc["gate"] == "cmoe" for lc in model.config.moeify["layers"])
    model.save_pretrained(tmp_path / "u")
    back = _load(tmp_path / "u")
    assert all(lc["gate"] == "cmoe" for lc in back.config.moeify["layers"])
    for i, b in _blocks(back).items():
        assert torch.equal(b.gate_u, blocks[i].gate_u)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
        assert (back(ids).logits - before(ids).logits).abs().max() > 1e-6  # u changed the outputs


def test_selection_bias_follows_the_sign_rule_and_survives_reload(world, tmp_path):
    gamma = 0.25
    cfg = _cfg(world, what="bias", steps=1, batch_size=8, bias_gamma=gamma)  # one step over all 8 windows; no gradients
    original = _load(world["cmoe"])
    windows = _windows(world, cfg)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, b in _blocks(original).items()]
    with torch.no_grad():
        original(windows)
    for h in hooks:
        h.remove()
    expected = {}
    for i, b in _blocks(original).items():
        assert torch.equal(b.selection_bias, torch.zeros_like(b.selection_bias))
        with torch.no_grad():
            scores = b.router(inputs[i]).float()
        load = torch.bincount(scores.topk(b.top_k, dim=-1).indices.reshape(-1), minlength=b.num_experts).float()
        assert load.sum() == windows.numel() * b.top_k
        # towards equal load: over-loaded experts down by gamma, under-loaded up by gamma
        expected[i] = torch.where(load > load.mean(), -gamma, torch.where(load < load.mean(), gamma, 0.0))
        assert (expected[i] != 0).any()
    model, report = finetune(world["cmoe"], cfg, progress=False)
    assert report["steps"] == 1
    for i, b in _blocks(model).items():
        torch.testing.assert_close(b.selection_bias, expected[i], atol=0, rtol=0)
    model.save_pretrained(tmp_path / "b")
    for i, b in _blocks(_load(tmp_path / "b")).items():
        torch.testing.assert_close(b.selection_bias, expected[i], atol=0, rtol=0)


def test_merged_lora_output_reloads_with_identical_logits(world, tmp_path):
    from safetensors.torch import load_file

    original = _load(world["cmoe"])
    model, _ = finetune(world["cmoe"], _cfg(world, lr=1e-2, steps=3), progress=False)
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert type(model.model.layers[0].mlp) is MoEMLP and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.mlp.gate_up", "model.layers.1.mlp.down", "model.layers.0.mlp.shared_gate_up"):
        assert not torch.equal(model.state_dict()[name], original.state_dict()[name]), name  # LoRA was merged into it
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)  # not a LoRA target
    assert all(b.gate_u.abs().max() > 0 for b in _blocks(model).values())  # u trains next to the adapters (peft froze it in CMoE's code)
    model.save_pretrained(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    back = _load(tmp_path / "m")
    assert set(back.state_dict()) == set(model.state_dict())
    ids = _ids()
    with torch.no_grad():
        for kernel in ("auto", "reference"):
            moeify.kernels.use(back, kernel)
            moeify.kernels.use(model, kernel)
            torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())["moeify"]
    assert cfg["method"] == "cmoe" and cfg["config"]["_data"]["layout"] == "S1A2E6"  # the conversion's record is kept
    assert cfg["finetune"]["settings"]["what"] == ["bias", "lora", "scale"] and cfg["finetune"]["steps"] == 3


def _delta_rank(model, original, name: str) -> int:
    d = model.state_dict()[name] - original.state_dict()[name]
    return int(torch.linalg.matrix_rank(d.reshape(-1, d.shape[-1]))) if d.abs().max() > 0 else 0


@pytest.mark.parametrize("what,attention", [("experts", False), ("lora,experts", True)])
def test_experts_train_at_full_rank_and_reload(world, tmp_path, what, attention):
    original = _load(world["cmoe"])
    model, report = finetune(world["cmoe"], _cfg(world, what=what, lr=1e-2, expert_lr=1e-2, steps=3), progress=False)
    assert report["layers"]["experts"] == [0, 1] and report["layers"]["lora"] == []
    for i in (0, 1):
        for p, rows in (("gate_up", 160), ("down", 80), ("shared_gate_up", 32)):  # S1A2E6 of 96 neurons, hidden 64
            name = f"model.layers.{i}.mlp.{p}"
            assert original.state_dict()[name].reshape(-1, 64).shape[0] == rows
            assert _delta_rank(model, original, name) == min(rows, 64), name  # full rank: more than any LoRA rank (8)
    q = _delta_rank(model, original, "model.layers.0.self_attn.q_proj.weight")
    assert q == (8 if attention else 0)  # attention: LoRA rank 8 with lora, untouched without
    model.save_pretrained(tmp_path / "m")
    back = _load(tmp_path / "m")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["moeify"]["finetune"]["settings"]["expert_lr"] == 1e-2


def test_lora_alone_changes_the_experts_by_rank_8_only(world):
    original = _load(world["cmoe"])
    model, _ = finetune(world["cmoe"], _cfg(world, what="lora", lr=1e-2, steps=3), progress=False)
    assert _delta_rank(model, original, "model.layers.0.mlp.shared_gate_up") == 8


def test_cosine_schedule_warms_up_then_decays_to_zero():
    steps = 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = ft_module._schedule(opt, "cosine", steps)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = 2  # 5 % of 40 steps
    expected = [0.5 * (s + 1) / warm for s in range(warm)]
    expected += [0.5 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))) for s in range(warm, steps)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[-1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 37 / 38)))  # the last step still learns a little
    flat = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    const = ft_module._schedule(flat, "constant", steps)
    for _ in range(5):
        flat.step()
        const.step()
    assert flat.param_groups[0]["lr"] == 0.5


def test_same_seed_gives_identical_weights_and_another_seed_does_not(world):
    a, _ = finetune(world["cmoe"], _cfg(world, lr=1e-2, steps=2), progress=False)
    b, _ = finetune(world["cmoe"], _cfg(world, lr=1e-2, steps=2), progress=False)
    c, _ = finetune(world["cmoe"], _cfg(world, lr=1e-2, steps=2, seed=1), progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@torch.no_grad()
def _mean_loss(model, windows) -> float:
    return float(model(input_ids=windows, labels=windows).loss)


def test_training_loss_on_the_training_windows_goes_down(world):
    cfg = _cfg(world, what="lora,scale", lr=5e-3, scale_lr=1e-2, steps=8)
    windows = _windows(world, cfg)
    before = _mean_loss(_load(world["cmoe"]), windows)
    model, report = finetune(world["cmoe"], cfg, progress=False)
    after = _mean_loss(model, windows)
    assert after < before - 0.01, (before, after)
    assert report["tokens"] == 8 * 4 * 64


def test_router_trains_when_asked(world):
    original = _load(world["cmoe"])
    model, _ = finetune(world["cmoe"], _cfg(world, what="scale,router", lr=1e-2, scale_lr=1e-2), progress=False)
    for i, b in _blocks(model).items():
        old = dict(_blocks(original)[i].router.named_parameters())
        assert any(not torch.equal(p, old[n]) for n, p in b.router.named_parameters())
    frozen = _blocks(finetune(world["cmoe"], _cfg(world, what="scale", scale_lr=1e-2), progress=False)[0])
    for i, b in frozen.items():
        old = dict(_blocks(original)[i].router.named_parameters())
        assert all(torch.equal(p, old[n]) for n, p in b.router.named_parameters())


def test_report_has_perplexity_before_after_and_dense(world):
    from moeify.data.texts import perplexity_windows
    from moeify.eval.perplexity import perplexity
    from moeify.models.checkpoint import load_tokenizer

    model, report = finetune(world["cmoe"], _cfg(world, evaluate=True, steps=2, lr=1e-2), progress=False)
    w = perplexity_windows(load_tokenizer(world["cmoe"]), world["eval"])
    p = report["ppl"]
    assert p["windows"] == 1 and p["tokens"] == 2047
    assert p["before"] == pytest.approx(perplexity(_load(world["cmoe"]), w, progress=False)["ppl"], rel=1e-6)
    assert p["dense"] == pytest.approx(perplexity(_load(world["dense"]), w, progress=False)["ppl"], rel=1e-6)
    assert p["after"] == pytest.approx(perplexity(model, w, progress=False)["ppl"], rel=1e-6)
    assert p["after"] != p["before"]


# --------------------------------------------------------------------------- distillation from the dense model


def test_distillation_loss_is_cross_entropy_and_kl_by_their_definitions():
    from moeify.finetuning import distillation_loss

    g = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 5), generator=g)
    p, q = torch.softmax(logits.double(), -1), torch.softmax(teacher.double(), -1)
    ce = -torch.log(p.gather(-1, labels[..., None])).mean()
    kl = (q * (q.log() - p.log())).sum(-1).mean()  # KL(teacher || model), per token
    for w in (0.0, 0.3, 1.0):
        loss, c, k = distillation_loss(logits, teacher, labels, w)
        assert float(c) == pytest.approx(float(ce), rel=1e-5) and float(k) == pytest.approx(float(kl), rel=1e-5)
        assert float(loss) == pytest.approx(float((1 - w) * ce + w * kl), rel=1e-5)
    assert float(distillation_loss(logits, logits.clone(), labels, 1.0)[0]) == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def _kl_to(teacher, model, windows) -> float:
    q = torch.log_softmax(teacher(input_ids=windows).logits.double(), -1)
    p = torch.log_softmax(model(input_ids=windows).logits.double(), -1)
    return float((q.exp() * (q - p)).sum(-1).mean())


@pytest.fixture(scope="module")
def sharp(world):
    """The tiny dense model with 20x larger logits (its final norm scaled), and its CMoE S1A1E6 conversion: the tiny
    model's own predictions are nearly uniform, so its conversion is within KL 1e-3 of it and leaves nothing to distill."""
    import shutil

    root = Path(world["root"]) / "sharp"
    dense = _load(world["dense"])
    with torch.no_grad():
        dense.model.norm.weight.mul_(20.0)
    dense.save_pretrained(root / "dense")
    for f in Path(world["dense"]).iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, root / "dense" / f.name)  # the tokenizer
    cal = moeify.Calibration(source=world["train"], samples=4, seq_len=64)
    moeify.convert(str(root / "dense"), moeify.CMoEConfig(layout="S1A1E6", router_neurons=3), calibration=cal,
                   progress=False).save_pretrained(root / "cmoe")
    return {**world, "dense": str(root / "dense"), "cmoe": str(root / "cmoe")}


def test_distillation_moves_the_converted_model_towards_the_dense_model(sharp):
    cfg = _cfg(sharp, distill=1.0, what="lora,scale", lr=5e-4, steps=8)
    windows = _windows(sharp, cfg)
    dense = _load(sharp["dense"])
    before = _kl_to(dense, _load(sharp["cmoe"]), windows)
    model, report = finetune(sharp["cmoe"], cfg, progress=False)
    after = _kl_to(dense, model, windows)
    assert after < 0.8 * before, (before, after)
    assert report["distill"] == {"weight": 1.0, "teacher": sharp["dense"]}
    loss = report["loss"]
    assert len(loss["kl_per_step"]) == len(loss["ce_per_step"]) == 8
    assert loss["per_step"] == pytest.approx(loss["kl_per_step"], rel=1e-6)  # distill 1: the loss is the KL alone
    # a mixed loss is the weighted sum of its two recorded terms
    _, mixed = finetune(sharp["cmoe"], _cfg(sharp, distill=0.25, steps=2, lr=5e-4), progress=False)
    m = mixed["loss"]
    for total, c, k in zip(m["per_step"], m["ce_per_step"], m["kl_per_step"]):
        assert total == pytest.approx(0.75 * c + 0.25 * k, rel=1e-5)


def test_dense_control_distills_from_a_frozen_copy_of_itself(world):
    """The control trains on the same loss: its teacher is the dense model as it was before training. At the first step
    the two agree (KL 0); as the next-token half of the loss moves the control, the KL to the frozen copy grows (a teacher
    that trained along would stay at 0; no dropout, so nothing else tells the two forwards apart)."""
    from moeify.finetuning import finetune_dense_control
    from moeify.models.checkpoint import load_tokenizer

    tok = load_tokenizer(world["dense"])
    before = {k: v.clone() for k, v in _load(world["dense"]).state_dict().items()}
    tuned, rep = finetune_dense_control(_load(world["dense"]), _cfg(world, distill=0.5, steps=4, lr=1e-2, lora_dropout=0.0),
                                        tokenizer=tok, progress=False)
    kl = rep["loss"]["kl_per_step"]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-5, kl
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())


def _orphan(world, tmp_path) -> str:
    """A copy of the converted checkpoint whose recorded dense base model is gone."""
    import shutil

    folder = tmp_path / "orphan"
    shutil.copytree(world["cmoe"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["moeify"]["provenance"]["base_model"] = str(tmp_path / "gone")
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_distillation_without_the_dense_base_model_is_refused_before_loading(world, tmp_path, no_loading):
    folder = _orphan(world, tmp_path)
    with pytest.raises(InputError, match=r"--distill 0.5 learns from the dense base model, which cannot be loaded"):
        ft_module.prepare(str(folder), _cfg(world, distill=0.5))
    ft_module.prepare(str(folder), _cfg(world))  # without distillation the base model is not needed


# --------------------------------------------------------------------------- windows written by the dense model (--text dense)


def test_dense_samples_are_the_models_nucleus_samples_and_reproducible(sharp):
    """Every sampled token lies in the model's top-p nucleus at its position (the sampler used this model and p), the
    windows are full (end-of-text suppressed) and start from the beginning-of-text token, a seed gives the same windows,
    another seed others, and the caller's RNG is left as it was."""
    from moeify.models.checkpoint import load_tokenizer

    tok = load_tokenizer(sharp["dense"])
    dense = _load(sharp["dense"])
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    w, rep = ft_module.dense_samples(dense, tok, 6, 40, seed=3, progress=False)
    assert torch.equal(torch.rand(1), expected_next)  # fork_rng: the global RNG untouched
    assert w.shape == (6, 40) and rep["tokens"] == 240 and rep["top_p"] == ft_module.SAMPLE_TOP_P
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert (w[:, 0] == start).all()
    if tok.eos_token_id is not None and tok.eos_token_id != start:
        assert not (w[:, 1:] == tok.eos_token_id).any()
    with torch.no_grad():
        probs = torch.softmax(dense(input_ids=w).logits[:, :-1].double(), -1)
    p_sorted, order = probs.sort(-1, descending=True)
    rank = (order == w[:, 1:, None]).double().argmax(-1)  # rank of the sampled token in the model's distribution
    mass_before = torch.cumsum(p_sorted, -1).gather(-1, rank[..., None]).squeeze(-1) - p_sorted.gather(-1, rank[..., None]).squeeze(-1)
    assert (mass_before < ft_module.SAMPLE_TOP_P + 1e-6).all()  # inside the nucleus
    assert (rank > 0).any()  # sampled, not greedy
    again, _ = ft_module.dense_samples(dense, tok, 6, 40, seed=3, progress=False)
    other, _ = ft_module.dense_samples(dense, tok, 6, 40, seed=4, progress=False)
    assert torch.equal(w, again) and not torch.equal(w, other)


def test_distillation_on_windows_the_dense_model_wrote(sharp):
    """The training windows are the dense model's samples (same seed: the same windows), and distilling on them moves the
    converted model towards the dense one there."""
    from moeify.models.checkpoint import load_tokenizer

    cfg = _cfg(sharp, text="dense", distill=1.0, what="lora,scale", lr=5e-4, steps=8, samples=8, seq_len=48)
    dense = _load(sharp["dense"])
    windows, _ = ft_module.dense_samples(dense, load_tokenizer(sharp["dense"]), 8, 48, seed=cfg.seed, progress=False)
    before = _kl_to(dense, _load(sharp["cmoe"]), windows)
    model, report = finetune(sharp["cmoe"], cfg, progress=False)
    assert report["text"]["source"] == "dense" and report["text"]["tokens"] == 8 * 48
    assert _kl_to(dense, model, windows) < 0.8 * before
    assert model.config.moeify["finetune"]["settings"]["text"] == "dense"
    _, again = finetune(sharp["cmoe"], cfg, progress=False)
    assert again["loss"]["per_step"] == report["loss"]["per_step"]  # same windows, same run


def test_dense_text_is_refused_up_front_without_the_base_model_or_with_local(world, tmp_path, no_loading):
    with pytest.raises(InputError, match="--text dense samples training windows for the full mode; --local"):
        ft_module.prepare(world["cmoe"], _cfg(world, text="dense", local=True))
    folder = _orphan(world, tmp_path)
    with pytest.raises(InputError, match=r"--text dense samples the training windows from the dense base model, which cannot be loaded"):
        ft_module.prepare(str(folder), _cfg(world, text="dense"))
    inputs = ft_module.prepare(world["cmoe"], _cfg(world, text="DENSE"))  # no text read: the windows come later
    assert inputs.windows is None and inputs.base_path == world["dense"]


# --------------------------------------------------------------------------- local mode


def test_local_mode_reduces_each_blocks_error_against_the_dense_mlp(world, tmp_path):
    dense = _load(world["dense"])
    original = _load(world["cmoe"])
    model, report = finetune(world["cmoe"], _cfg(world, local=True, steps=16, lr=1e-3, scale_lr=1e-2), progress=False)
    assert report["mode"] == "local" and [r["layer"] for r in report["local"]] == [0, 1]
    # the block's inputs on text it was not trained on, from the fine-tuned model
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    from moeify.data.texts import heldout_windows, load_token_ids
    from moeify.models.checkpoint import load_tokenizer

    ids = heldout_windows(load_token_ids(load_tokenizer(world["cmoe"]), world["eval"], "heldout"), 256, 4)
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for i, x in inputs.items():
        with torch.no_grad():
            y = dense.model.layers[i].mlp(x)
            err_before = (original.model.layers[i].mlp(x) - y).norm() / y.norm()
            err_after = (model.model.layers[i].mlp(x) - y).norm() / y.norm()
        assert err_after < 0.97 * err_before, (i, float(err_before), float(err_after))
    model.save_pretrained(tmp_path / "local")
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "local")(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_local_mode_on_a_pruned_checkpoint_fits_the_dense_base_model(world, tmp_path):
    """Blocks that dropped neurons cannot give the dense output themselves: the recorded base model's MLPs are the target."""
    dense = _load(world["dense"])
    pruned = moeify.convert(str(world["dense"]), moeify.MLPMoEConfig(branches=4, prune=0.25, prune_mode="uniform"), progress=False)
    pruned.save_pretrained(tmp_path / "pruned")
    model, _ = finetune(str(tmp_path / "pruned"), _cfg(world, local=True, what="lora", steps=16), progress=False)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(_ids(4, 64, seed=11))
    for h in hooks:
        h.remove()
    for i, x in inputs.items():
        with torch.no_grad():
            y = dense.model.layers[i].mlp(x)
            assert (model.model.layers[i].mlp(x) - y).norm() < 0.97 * (pruned.model.layers[i].mlp(x) - y).norm()
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    cfg["moeify"]["provenance"]["base_model"] = None
    (tmp_path / "pruned" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="dense base model's weights are needed"):
        finetune(str(tmp_path / "pruned"), _cfg(world, local=True, what="lora"), progress=False)


# --------------------------------------------------------------------------- inputs


def test_overlap_check_trips_on_shared_text_only():
    g = torch.Generator().manual_seed(0)
    evaluation = torch.randint(0, 50_000, (2, 256), generator=g)
    train = torch.randint(0, 50_000, (3, 128), generator=g)
    check_no_overlap(train, evaluation)  # disjoint random text
    leaked = train.clone()
    leaked[1, 40:80] = evaluation[1, 100:140]  # 40 tokens of evaluation text inside a training window
    with pytest.raises(InputError, match="share 9 stretch"):  # 40 - 32 + 1 shared 32-grams
        check_no_overlap(leaked, evaluation)
    short = train.clone()
    short[1, 40:71] = evaluation[1, 100:131]  # 31 tokens: below the n-gram length, not an overlap
    check_no_overlap(short, evaluation)


@pytest.mark.parametrize("kw,pattern", [
    ({"lr": 0.0}, r"--lr must be a positive number"),
    ({"scale_lr": -1e-3}, r"--scale-lr must be a positive number"),
    ({"bias_gamma": float("nan")}, r"--bias-gamma must be a positive number"),
    ({"steps": 2, "tokens": 100}, r"--steps and --tokens"),
    ({"steps": 0}, r"--steps must be a positive integer"),
    ({"samples": 0}, r"--samples must be an integer >= 1"),
    ({"seq_len": 8}, r"--seq-len must be an integer >= 16"),
    ({"batch_size": 9}, r"--batch-size 9 is larger than --samples 8"),
    ({"lora_rank": 0}, r"--lora-rank must be an integer >= 1"),
    ({"lora_dropout": 1.0}, r"--lora-dropout must be in \[0, 1\)"),
    ({"expert_lr": 0.0}, r"--expert-lr must be a positive number"),
    ({"schedule": "linear"}, r"--schedule must be one of constant, cosine, got 'linear'"),
    ({"local": True, "what": "bias,router"}, r"--local .* nothing to train"),
    ({"distill": 1.5}, r"--distill is the weight of the distillation term, a number in \[0, 1\]; got 1.5"),
    ({"distill": -0.1}, r"--distill is the weight .* got -0.1"),
    ({"distill": float("nan")}, r"--distill is the weight"),
    ({"local": True, "distill": 0.5}, r"--distill is for the full mode"),
])
def test_bad_settings_raise_input_errors(world, kw, pattern):
    with pytest.raises(InputError, match=pattern):
        _cfg(world, **kw).check()


def test_bad_what_items_are_refused():
    with pytest.raises(InputError, match=r"--what 'gates' .* lora, experts, scale, bias, router"):
        FinetuneConfig(what="lora,gates")
    with pytest.raises(InputError, match=r"--what is empty"):
        FinetuneConfig(what=" , ")


@pytest.fixture
def no_loading(monkeypatch):
    import moeify.models.checkpoint as ckpt

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ckpt, "load_model", refuse)


def _no_moe_block(world) -> str:
    """A copy of the checkpoint whose config lists no converted layer (its weights are never read)."""
    import shutil

    folder = Path(world["root"]) / "no-blocks"
    if not folder.exists():
        shutil.copytree(world["cmoe"], folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["moeify"]["layers"] = [None] * len(cfg["moeify"]["layers"])
        (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def _leaky(world) -> str:
    path = Path(world["root"]) / "leaky.txt"
    path.write_text(" ".join(Path(world["eval"]).read_text().split()[:1000]))  # the start of the evaluated text
    return str(path)


def _short(world) -> str:
    path = Path(world["root"]) / "short.txt"
    path.write_text(_language(300, 3))
    return str(path)


def _empty(world) -> str:
    path = Path(world["root"]) / "empty.txt"
    path.write_text("  \n")
    return str(path)


CLI_ROWS = [
    ("dense-model", lambda w: [w["dense"]], r"DIR .* is a dense model, not a moeify checkpoint: run `moeify convert"),
    ("missing-dir", lambda w: [str(Path(w["root"]) / "nope")], r"DIR .*no such model folder"),
    ("no-moe-block", lambda w: [_no_moe_block(w)], r"no MoE block that fine-tuning can train"),
    ("bias-on-static-router", lambda w: [w["static"], "--what", "bias"], r"--what bias: nothing to train .*static router"),
    ("router-without-scale", lambda w: [w["cmoe"], "--what", "router,lora"], r"--what router: .*add scale"),
    ("bad-what", lambda w: [w["cmoe"], "--what", "lora,gates"], r"--what 'gates' is not something fine-tuning trains"),
    ("lr-zero", lambda w: [w["cmoe"], "--lr", "0"], r"--lr must be a positive number, got 0.0"),
    ("lr-negative", lambda w: [w["cmoe"], "--lr", "-1e-4"], r"--lr must be a positive number"),
    ("steps-and-tokens", lambda w: [w["cmoe"], "--steps", "2", "--tokens", "1000"], r"--steps and --tokens both set the budget"),
    ("text-empty", lambda w: [w["cmoe"], "--text", _empty(w)], r"--text .*empty"),
    ("text-missing", lambda w: [w["cmoe"], "--text", str(Path(w["root"]) / "none.txt")], r"--text .*no such file"),
    ("text-too-short", lambda w: [w["cmoe"], "--text", _short(w)], r"--text .* has 300 tokens \(calibration split\); 8 windows of 64 tokens need at least 513"),
    ("text-overlaps-evaluation", lambda w: [w["cmoe"], "--text", _leaky(w)], r"share \d+ stretch\(es\) of 32 tokens with the perplexity evaluation"),
    ("local-nothing", lambda w: [w["cmoe"], "--local", "--what", "bias"], r"--local trains the expert weights"),
    ("distill-out-of-range", lambda w: [w["cmoe"], "--distill", "2"], r"--distill is the weight of the distillation term, a number in \[0, 1\]"),
    ("distill-local", lambda w: [w["cmoe"], "--local", "--distill", "1"], r"--distill is for the full mode"),
]


@pytest.mark.parametrize("row,argv,pattern", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_is_one_line_exit_2_before_loading(world, tmp_path, no_loading, row, argv, pattern):
    import re

    out = tmp_path / "out"
    args = ["finetune", *argv(world), "-o", str(out), "--samples", "8", "--seq-len", "64", "--ppl", world["eval"]]
    if "--text" not in args:
        args += ["--text", world["train"]]
    r = runner.invoke(app, args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()


def test_cli_refuses_an_existing_output_before_loading(world, tmp_path, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("1")
    r = runner.invoke(app, ["finetune", world["cmoe"], "-o", str(out), "--text", world["train"], "--ppl", world["eval"]])
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output
    assert (out / "keep").read_text() == "1"


def _interrupting(real):
    def batches(*a, **k):
        first = real(*a, **k)[0]

        def gen():
            yield first
            raise KeyboardInterrupt  # Ctrl-C in the middle of training

        return gen()

    return batches


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_nothing_at_the_output(world, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep").write_text("old")
    monkeypatch.setattr(ft_module, "_window_batches", _interrupting(ft_module._window_batches))
    r = runner.invoke(app, ["finetune", world["cmoe"], "-o", str(out), "--text", world["train"], "--ppl", world["eval"], "--samples", "8",
                            "--seq-len", "64", "--steps", "3", "--no-eval", "--overwrite"])
    assert r.exit_code == 130, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])  # no temporary folder left either
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep"] and (out / "keep").read_text() == "old"


def test_cli_writes_a_checkpoint_that_reloads_and_a_json(world, tmp_path):
    out, js = tmp_path / "ft", tmp_path / "ft.json"
    r = runner.invoke(app, ["finetune", world["cmoe"], "-o", str(out), "--text", world["train"], "--ppl", world["eval"], "--samples", "8",
                            "--seq-len", "64", "--steps", "2", "--lr", "1e-2", "--json", str(js)])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert data["output"] == str(out) and data["steps"] == 2 and data["tokens"] == 2 * 4 * 64
    assert set(data["ppl"]) >= {"before", "after", "dense"} and data["ppl"]["dense"] > 1
    assert "perplexity after" in r.output
    back = _load(out)
    rec = back.config.moeify["finetune"]
    assert rec["ppl"]["after"] == data["ppl"]["after"] and rec["settings"]["lr"] == 1e-2
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()  # the model card says what was trained and what it gave
    assert "## Fine-tuning (`moeify finetune`, full mode)" in card
    assert f"2 steps, {2 * 4 * 64} tokens" in card
    assert f"{data['ppl']['before']:.4f} | {data['ppl']['after']:.4f}" in card


# --------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_austen_training_windows_do_not_overlap_the_evaluation_windows():
    from moeify.data.texts import calibration_windows, load_token_ids, perplexity_windows
    from moeify.models.checkpoint import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(None))
    cfg = FinetuneConfig(samples=256, seq_len=512)
    ev = perplexity_windows(tok, "austen", quick=True)
    check_no_overlap(calibration_windows(tok, "austen", cfg.samples, cfg.seq_len, cfg.seed), ev)
    # and the check is live on this text: a window cut from the evaluation novels is refused
    with pytest.raises(InputError, match="share"):
        check_no_overlap(load_token_ids(tok, "austen", "heldout")[5000:5512][None], ev)


def test_dense_control_trains_lora_on_every_decoder_linear_and_merges(world):
    from moeify.finetuning import finetune_dense_control
    from moeify.models.checkpoint import load_tokenizer

    tok = load_tokenizer(world["dense"])
    dense = _load(world["dense"])
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    tuned, rep = finetune_dense_control(dense, _cfg(world, steps=4), tokenizer=tok, progress=False)
    after = tuned.state_dict()
    assert set(after) == set(before)  # merged: no adapter keys left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for i in range(len(tuned.model.layers)):  # attention and MLP projections of every layer moved; nothing else did
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            assert f"model.layers.{i}.{name}.weight" in changed
    assert all(".weight" in k and ("self_attn" in k or ".mlp." in k) for k in changed)
    assert rep["steps"] == 4 and rep["loss"]["last"] < rep["loss"]["first"]


def test_dense_control_of_an_experts_run_trains_the_mlp_at_full_rank(world):
    from moeify.finetuning import finetune_dense_control
    from moeify.models.checkpoint import load_tokenizer

    dense = _load(world["dense"])
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    tuned, _ = finetune_dense_control(dense, _cfg(world, what="lora,experts", lr=1e-2, expert_lr=1e-2, steps=3),
                                      tokenizer=load_tokenizer(world["dense"]), progress=False)
    after = tuned.state_dict()
    assert set(after) == set(before)

    def rank(name):
        return int(torch.linalg.matrix_rank(after[name] - before[name]))

    for i in range(len(tuned.model.layers)):
        assert rank(f"model.layers.{i}.mlp.gate_proj.weight") == 64 and rank(f"model.layers.{i}.mlp.down_proj.weight") == 64
        assert rank(f"model.layers.{i}.self_attn.q_proj.weight") == 8


def test_dense_control_refuses_converted_models_and_the_local_mode(world):
    from moeify.finetuning import finetune_dense_control
    from moeify.models.checkpoint import load_tokenizer

    tok = load_tokenizer(world["dense"])
    with pytest.raises(InputError, match="dense base model"):
        finetune_dense_control(_load(world["cmoe"]), _cfg(world), tokenizer=tok, progress=False)
    with pytest.raises(InputError, match="full mode"):
        finetune_dense_control(_load(world["dense"]), _cfg(world, local=True), tokenizer=tok, progress=False)


def test_lora_without_peft_is_refused_before_loading(world, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(InputError, match=r"needs peft: pip install 'moeify\[train\]'"):
        ft_module.prepare(world["cmoe"], _cfg(world))
