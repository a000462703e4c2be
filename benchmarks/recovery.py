"""Recovery on SmolLM2: training-free | + refit | + fine-tuning | + both, with the dense model (and a fine-tuned dense control).

Protocol austen-v1 (quick by default), fp32, calibration 8 x 2048 austen tokens (seed 0; `--calib` and
`--calib-samples` change the conversions' calibration text, e.g. `austen+wordnet`), dense scored in the same run on
the same windows. Conversion settings: CMoE at the given layouts (24 router neurons, the best training-free
CMoE of the README) and MoEfication at 50 % (`--moefication`). Fine-tuning: `moeify.finetune` with the options
given as JSON (`--ft-opts`), on the calibration novels only (never the evaluation windows). The README's runs use
the layer-local mode (`{"local": true}`): each block learns the dense MLP's outputs, never the text itself, so it
cannot gain from learning the Austen domain and needs no fine-tuned dense control; the full mode (LoRA on the
whole model's next-token loss) needs that control: `--dense-control` fine-tunes the dense model with the same windows,
budget and LoRA settings (`moeify.finetuning.finetune_dense_control`) and each fine-tuned row gets its ratio against it.
With distillation alone (`{"distill": 1.0}` in --ft-opts) the model learns the dense model's next-token distributions,
not the text, and the original dense model is the control (no --dense-control needed).

Checkpoints go to --out (one folder per run) and every finished row is written to the JSON at once, so an
interrupted run resumes where it stopped. Reproduce the README table:

    python benchmarks/recovery.py --json benchmarks/results/recovery.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import moeify
from moeify.data.texts import perplexity_windows
from moeify.eval.perplexity import perplexity
from runinfo import run_info


def _settings(args) -> list[tuple[str, moeify.MethodConfig]]:
    out = [(f"cmoe-{lay.lower()}", moeify.CMoEConfig(layout=lay, router_neurons=args.router_neurons))
           for lay in args.layouts.split(",") if lay]
    if args.moefication:
        out.append(("moefication-0.5", moeify.MoEficationConfig.for_fraction(0.5)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layouts", default="S3A3E8,S1A3E8,S1A1E8")
    ap.add_argument("--router-neurons", type=int, default=24)
    ap.add_argument("--calib", default="austen", help="calibration text of the conversions (a text source, e.g. austen+wordnet)")
    ap.add_argument("--calib-samples", type=int, default=8, help="calibration windows of 2048 tokens")
    ap.add_argument("--moefication", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--runs", default="base,refit,ft,refit+ft", help="comma list of: base, refit, ft, refit+ft")
    ap.add_argument("--ft-opts", default="{}", help="FinetuneConfig options as JSON")
    ap.add_argument("--dense-control", action="store_true", help="full mode: also fine-tune the dense model with the same data and budget")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("out/recovery"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/recovery.json"))
    args = ap.parse_args()
    info = run_info(args.model, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "model"})
    ft_opts = {"evaluate": False, **json.loads(args.ft_opts)}

    dense, tok = moeify.load_model(args.model)
    cal = moeify.Calibration(source=args.calib, samples=args.calib_samples, seq_len=2048, seed=0)
    cal.validate(tok)
    windows = perplexity_windows(tok, source="austen", quick=not args.full)
    ft_cfg = moeify.FinetuneConfig(**ft_opts)
    ft_cfg.check()

    ft_settings = json.loads(json.dumps(ft_cfg.to_dict()))  # as the JSON holds it (lists, not tuples), so resumed rows compare equal
    result = json.loads(args.json.read_text()) if args.json.is_file() else {}
    # rows are comparable only for the same conversion settings and protocol (its own key: run_info's "settings" holds the
    # latest command's arguments, which differ from run to run of a resumed table)
    recovery_settings = {"router_neurons": args.router_neurons, "full": args.full,
                         **({"calib": args.calib, "calib_samples": args.calib_samples}
                            if (args.calib, args.calib_samples) != ("austen", 8) else {})}
    if result.get("recovery_settings", recovery_settings) != recovery_settings or "rows" not in result:
        result = {"rows": []}
    result["recovery_settings"] = recovery_settings
    result.update(info)
    # a fine-tuned row counts as done only for the same fine-tuning settings
    result["rows"] = [r for r in result["rows"] if "ft" not in r["run"] or r.get("ft_settings") == ft_settings]
    done = {(r["setting"], r["run"]) for r in result["rows"]}

    def save_row(row):
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("summary", "finetune")}), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")

    if "dense" not in result:
        t0 = time.perf_counter()
        result["dense"] = {**perplexity(dense, windows, progress=False), "eval_seconds": time.perf_counter() - t0}
        result["protocol"] = f"austen-v1 {'full' if args.full else 'quick'}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    base_ppl = result["dense"]["ppl"]
    print(f"dense ppl {base_ppl:.4f}", flush=True)

    if (result.get("dense_finetuned") or {}).get("ft_settings") != ft_settings:
        result.pop("dense_finetuned", None)
    if args.dense_control and "dense_finetuned" not in result:
        from moeify.finetuning import finetune_dense_control

        t0 = time.perf_counter()
        tuned, rep = finetune_dense_control(copy.deepcopy(dense), ft_cfg, tokenizer=tok, progress=False)
        seconds = time.perf_counter() - t0
        result["dense_finetuned"] = {**perplexity(tuned, windows, progress=False), "finetune_seconds": seconds, "finetune": rep,
                                     "ft_settings": ft_settings}
        print(f"dense fine-tuned (control) ppl {result['dense_finetuned']['ppl']:.4f}", flush=True)
        del tuned
    ctrl = (result.get("dense_finetuned") or {}).get("ppl")

    runs = args.runs.split(",")
    for name, cfg in _settings(args):
        converted = {}
        for refit in (False, True):
            if not any(r in runs for r in (["base", "ft"] if not refit else ["refit", "refit+ft"])):
                continue
            tag = "refit" if refit else "base"
            if all((name, r) in done for r in ([tag, "ft" if not refit else "refit+ft"])):
                continue
            path = args.out / f"{name}-{tag}"
            t0 = time.perf_counter()
            if (path / "config.json").is_file():
                model, _ = moeify.load(path)
                seconds = None
            else:
                model = moeify.convert(copy.deepcopy(dense), cfg, calibration=cal, tokenizer=tok, progress=False, refit=refit)
                seconds = time.perf_counter() - t0
                moeify.save(model, path, tokenizer=tok, overwrite=True)
            converted[tag] = (model, seconds)
            if (name, tag) not in done:
                s = model.config.moeify["summary"]
                r = perplexity(model, windows, progress=False)
                save_row({"setting": name, "run": tag, "method": cfg.method, "config": cfg.to_dict()["_data"],
                          "active_mlp_fraction": s["active_mlp_fraction"], "ppl": r["ppl"], "ratio": r["ppl"] / base_ppl, "convert_seconds": seconds,
                          "calibration_error": s.get("calibration_error"), "refit": s.get("refit")})
            ft_run = "refit+ft" if refit else "ft"
            if ft_run in runs and (name, ft_run) not in done:
                t0 = time.perf_counter()
                tuned, rep = moeify.finetune(model, ft_cfg, tokenizer=tok, progress=False)
                seconds = time.perf_counter() - t0
                r = perplexity(tuned, windows, progress=False)
                save_row({"setting": name, "run": ft_run, "method": cfg.method, "ft_settings": ft_settings, "ppl": r["ppl"], "ratio": r["ppl"] / base_ppl,
                          "ratio_vs_finetuned_dense": r["ppl"] / ctrl if ctrl else None, "finetune_seconds": seconds,
                          "finetune": rep})
                moeify.save(tuned, args.out / f"{name}-{ft_run}", tokenizer=tok, overwrite=True)
                del tuned
    print("\n| setting | run | ppl | ratio |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['setting']} | {r['run']} | {r['ppl']:.2f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
