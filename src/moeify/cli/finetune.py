"""`moeify finetune`: CMoE's light fine-tuning of a converted checkpoint (docs/methods.md, "Light fine-tuning")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .app import _environment, _write_json, app, check_output_dir, check_output_file, console


@app.command()
def finetune(
    checkpoint: str = typer.Argument(..., metavar="DIR", help="A moeify-converted checkpoint folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the fine-tuned checkpoint to."),
    text: str = typer.Option("austen", help="Training text (its calibration split): austen | wikitext2 | c4 | FILE | DIR | FILE.jsonl[:field] | hf:... | dense (windows sampled from the dense base model: data-free distillation)"),
    samples: int = typer.Option(64, help="Training windows (drawn like calibration windows)."),
    seq_len: int = typer.Option(512, help="Window length in tokens."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: one epoch over the windows); per block with --local."),
    tokens: Optional[int] = typer.Option(None, help="Token budget instead of --steps: steps = tokens / (batch size x seq len)."),
    batch_size: int = typer.Option(4, help="Windows per optimizer step."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the LoRA adapters and the router (default 2e-4), or of the expert weights "
                                                  "with --local (default 1e-3)."),
    scale_lr: float = typer.Option(1e-3, help="Learning rate of the gate scale u (g = 1 + softmax(s) u)."),
    expert_lr: float = typer.Option(2e-5, help="Learning rate of the expert weights themselves with --what ...,experts (full rank)."),
    schedule: str = typer.Option("constant", help="Learning-rate schedule: constant, or cosine (linear warm-up over 5 % of the steps, "
                                                  "then a cosine decay to 0)."),
    bias_gamma: float = typer.Option(1e-3, help="Step of the selection-bias sign rule per optimizer step."),
    lora_rank: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: float = typer.Option(32.0, help="LoRA alpha (scaling alpha / rank)."),
    lora_dropout: float = typer.Option(0.1, help="LoRA dropout on the attention adapters (peft has none for parameter adapters)."),
    what: str = typer.Option("lora,scale,bias", help="What trains: a comma-separated subset of lora (attention, and the experts unless experts is given), "
                                                     "experts (the expert weights at full rank), scale, bias, router."),
    local: bool = typer.Option(False, "--local", help="Train each MoE block alone to match the dense MLP on its own inputs, layer by layer."),
    distill: float = typer.Option(0.0, help="Weight of distillation from the dense base model: loss = (1 - w) x next-token loss + w x "
                                            "KL(dense || model); 0 = next-token loss only (CMoE), 1 = learn the dense model's predictions alone."),
    seed: int = typer.Option(0, help="Seed for the windows, the window order, LoRA init and dropout."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Held-out perplexity before and after (and of the dense base model)."),
    ppl: str = typer.Option("austen", help="Perplexity text source (its held-out split, quick windows)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory / --json file."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write machine-readable results here."),
) -> None:
    """Light fine-tuning (CMoE §4.3): LoRA on attention and experts, the gate scale u, the balancing bias b; merged and saved."""
    from ..finetuning import FinetuneConfig, prepare
    from ..finetuning import finetune as run_finetune
    from ..models.checkpoint import save

    # every input is checked before the model is loaded: settings, outputs, the checkpoint, texts, windows
    cfg = FinetuneConfig(text=text, samples=samples, seq_len=seq_len, steps=steps, tokens=tokens, batch_size=batch_size, lr=lr,
                         scale_lr=scale_lr, expert_lr=expert_lr, schedule=schedule, bias_gamma=bias_gamma, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         what=what, local=local, distill=distill, seed=seed, evaluate=evaluate, ppl=ppl)
    cfg.check()
    check_output_dir(output, "--output", overwrite=overwrite)
    check_output_file(json_out, "--json", overwrite=overwrite)
    inputs = prepare(checkpoint, cfg)
    model, report = run_finetune(checkpoint, cfg, tokenizer=inputs.tokenizer)
    out = save(model, output, tokenizer=inputs.tokenizer, overwrite=overwrite)
    result: dict[str, Any] = {"checkpoint": checkpoint, "output": str(out), **report, "environment": _environment()}
    _print(result)
    _write_json(json_out, result)


def _print(r: dict[str, Any]) -> None:
    t = Table(title=f"{r['checkpoint']}: fine-tuned ({r['mode']}, {', '.join(r['settings']['what'])})")
    t.add_column("")
    t.add_column("value", justify="right")
    p = r.get("ppl")
    if p:
        t.add_row(f"perplexity ({p['protocol']}) dense", "n/a" if p.get("dense") is None else f"{p['dense']:.4f}")
        t.add_row("perplexity before", f"{p['before']:.4f}")
        t.add_row("perplexity after", f"{p['after']:.4f}")
    if r["mode"] == "local" and "heldout_error_after" in r:
        t.add_row("block error vs dense (held-out, mean)", f"{r['heldout_error_before']:.4f} -> {r['heldout_error_after']:.4f}")
    loss = r.get("loss") or {}
    if loss.get("first") is not None:
        t.add_row("training loss first / last step", f"{loss['first']:.4f} / {loss['last']:.4f}")
    if loss.get("kl_per_step"):
        t.add_row(f"KL to the dense model first / last step (distill {r['distill']['weight']:g})",
                  f"{loss['kl_per_step'][0]:.4f} / {loss['kl_per_step'][-1]:.4f}")
    t.add_row("steps" + (" per block" if r["mode"] == "local" else ""), str(r["steps"]))
    if r.get("text"):
        t.add_row("training windows sampled from the dense model", f"{r['text']['tokens']:,} tokens in {r['text']['seconds']:.1f} s")
    t.add_row("tokens trained", f"{r['tokens']:,}")
    t.add_row("training time", f"{r['seconds']:.1f} s ({r['tokens'] / max(r['seconds'], 1e-9):.0f} tokens/s)")
    t.add_row("total time (incl. perplexity)", f"{r['total_seconds']:.1f} s")
    if r["u"]["layers"]:
        t.add_row("gate scale u: max |u|", f"{r['u']['abs_max']:.4g}")
    if r["bias"]["layers"]:
        t.add_row("selection bias b: max |b|", f"{r['bias']['abs_max']:.4g}")
    console.print(t)
    for note in r.get("notes") or []:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"saved to [bold]{r['output']}[/bold]")
