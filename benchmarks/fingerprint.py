"""Fingerprints of conversions: one sha256 per method setting over every tensor and the plan.

A change that must not move any number (a refactor) is checked by running this on the
commit before and after it and comparing the digests (identical tensors and plans give
identical perplexities, accuracies and speeds' inputs). Uses only the public API, so it
runs on older commits too:

    PYTHONPATH=<old checkout>/src python benchmarks/fingerprint.py --json old.json
    python benchmarks/fingerprint.py --json new.json --against old.json

Settings: SmolLM2 (`moeify pull`), calibration austen 2 x 512 (seed 0) for every method
and setting below, plus (--full) CMoE S3A3E8 at the protocol's 8 x 2048, and hierarchical
conversions of a moeify block and of a tiny Qwen3-MoE.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys

import torch

import moeify


def digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    h.update(json.dumps(model.config.moeify["layers"], sort_keys=True).encode())
    return h.hexdigest()[:32]


def settings(full: bool):
    cal = lambda: moeify.Calibration(source="austen", samples=2, seq_len=512, seed=0)  # noqa: E731
    runs = {
        "mlpmoe_b8": (moeify.MLPMoEConfig(branches=8), None),
        "mlpmoe_compensated_0.25": (moeify.MLPMoEConfig(branches=8, prune=0.25, prune_mode="compensated"), None),
        "mlpmoe_fractal_fade_0.3": (moeify.MLPMoEConfig(branches=8, prune=0.3), None),
        "cmoe_s3a3e8": (moeify.CMoEConfig(layout="S3A3E8"), cal),
        "cmoe_paper_s1a3e8": (moeify.CMoEConfig(layout="S1A3E8", variant="paper"), cal),
        "cmoe_s1a1e8_router_rank32": (moeify.CMoEConfig(layout="S1A1E8", router_rank=32), cal),
        "prune_0.5": (moeify.PruneConfig(fraction=0.5), cal),
        "moefication_0.75": (moeify.MoEficationConfig(fraction=0.75), cal),
        "llama_moe_random_0.75": (moeify.LlamaMoEConfig(fraction=0.75, split="random"), cal),
        "llama_moe_cluster_mlp_0.5": (moeify.LlamaMoEConfig(fraction=0.5, split="cluster", router="mlp"), cal),
        "expertweaver_0.75": (moeify.ExpertWeaverConfig(fraction=0.75), cal),
        "expertweaver_downcycle_0.5": (moeify.ExpertWeaverConfig(fraction=0.5, downcycle=True, tasks="none"), cal),
    }
    if full:
        runs = {"cmoe_s3a3e8_protocol_8x2048": (moeify.CMoEConfig(layout="S3A3E8"), lambda: moeify.Calibration())}
    return runs, cal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write {setting: digest} here")
    ap.add_argument("--full", action="store_true", help="only CMoE S3A3E8 at the protocol's 8 x 2048 calibration")
    ap.add_argument("--against", help="a JSON of an earlier run: exit 1 if any digest differs")
    a = ap.parse_args()
    dense, tok = moeify.load_model(None)
    runs, cal = settings(a.full)
    out = {}
    for name, (cfg, c) in runs.items():
        torch.manual_seed(0)
        kw = {"calibration": c(), "tokenizer": tok} if c else {}
        out[name] = digest(moeify.convert(copy.deepcopy(dense), cfg, progress=False, **kw))
        print(name, out[name], flush=True)
    if not a.full:
        m = moeify.convert(copy.deepcopy(dense), moeify.CMoEConfig(layout="S1A3E8"), calibration=cal(), tokenizer=tok, progress=False)
        out["hierarchical_cmoe_s1a1e4_of_s1a3e8"] = digest(moeify.convert(m, moeify.CMoEConfig(layout="S1A1E4"), calibration=cal(),
                                                                          tokenizer=tok, progress=False))
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig

        torch.manual_seed(0)
        qc = Qwen3MoeConfig(vocab_size=tok.vocab_size + 100, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=16)
        qm = AutoModelForCausalLM.from_config(qc).eval()
        out["hierarchical_qwen3_moe_tiny"] = digest(moeify.convert(qm, moeify.CMoEConfig(layout="S1A1E4"), calibration=cal(), tokenizer=tok,
                                                                   progress=False))
    with open(a.json, "w") as fh:
        json.dump(out, fh, indent=1)
    if a.against:
        old = json.load(open(a.against))
        diff = sorted(k for k in old if k in out and old[k] != out[k])
        print("identical" if not diff else f"DIFFERENT: {diff}", f"({len(set(old) & set(out))} settings compared)")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
