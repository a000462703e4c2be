"""ExpertWeaver (arXiv 2602.15521), training-free mode: GLU gate-activation patterns decide
the shared expert, its layer-adaptive size, the routed experts and a linear router
(docs/methods.md §3).

Per layer, on the MLP inputs of the calibration samples (layer-sequential):

1. Profile: a_ij = token mean of |act(W_gate x)_i| over sample j (gate branch only).
2. Per neuron, task means a_{i,t}; CV_i = std_t(a_{i,t}) / (mean_t(a_{i,t}) + eps); the layer
   specialisation ratio r_l = share of neurons with CV_i > tau (tau = 0.6).
3. Shared share alpha_l = alpha_max - (alpha_max - alpha_min) r_l (0.7 / 0.2). With N_e
   experts (default 64) of d_e = d_h / N_e neurons: N_se = round(round(alpha_l d_h) / d_e)
   shared experts, consolidated into one always-on MLP of the N_se d_e neurons with the
   highest mean |a| (mean over tasks, so every task counts the same; the remainder
   d_h - N_e d_e when N_e does not divide d_h joins it, so no neuron is lost).
4. Routed experts: balanced k-means (exact linear assignment, cmoe.py) on the profile
   vectors a_i of the other neurons, N_e - N_se experts of d_e neurons.
5. Router: column e = mean of expert e's W_gate rows; top-(k - N_se) by x . W_router; unit
   weights. k = active fraction x N_e is the same in every layer, so the *total* active
   experts per layer meet the target and the routed top-k varies by layer. When the
   target is below the layer's share (k <= N_se, e.g. 25 % active and alpha_l = 0.7) the
   shared expert is capped at k - 1 experts so one routed expert stays active; the
   summary reports alpha (the formula) and alpha_effective (what was built) per layer.
6. downcycle=True (an initialisation for continued training, not a training-free
   model): uniform shared ratio `shared_ratio` in every layer and a softmax router,
   y = shared + sum_{top-k} softmax(s)_e E_e (softmax over all routed experts).

"Tasks". The paper profiles few-shot samples of ~45 Flan-v2 tasks (5 each); Flan-v2 is
not available offline. moeify's tasks are distinct local text sources and formats, none
of them evaluation data:

* the calibration windows themselves, cut into `sample_len`-token samples; with the
  `austen` source each sample is labelled by the novel it comes from (emma,
  mansfieldpark, prideprejudice, sensesensibility: 4 tasks of one genre). The held-out
  novels (persuasion, northangerabbey) and the zero-shot task data are never read;
* `tasks="local"` adds three formats far from 19th-century prose, read from the
  installed (version-pinned) Python packages: "code" (transformers' modeling_*.py of
  eight architectures), "licences" (licence files of the installed distributions) and
  "docs" (their package descriptions, Markdown/reST). Distributions named *eval* are
  skipped. `task_windows` windows of the calibration length are drawn from each (seeded)
  and cut into samples the same way; they flow through the same layer-sequential
  pipeline, so every task's hidden states come from the already converted layers.

So ExpertWeaver sees the same calibration windows as every other method plus
3 x `task_windows` windows of other formats. `tasks` also takes a comma list of those
names and text sources (a file or a folder of .txt), one task each, or "none".
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.dense import GatedWeights
from ..core.method import LayerResult, MethodConfig, option, positive_int
from ..core.plan import LayerPlan
from ..data.calibration import Calibration
from ..errors import InputError
from .common import balanced_kmeans, check_experts_fit, finish_plan, order_desc, resolve_active, seeded_init

log = logging.getLogger("moeify")

LOCAL_TASKS = ("code", "licences", "docs")
CODE_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "olmoe")
TASK_CHARS = 300_000  # per local task: ample for a few 2048-token windows, cheap to tokenize


@dataclasses.dataclass
class ExpertWeaverConfig(MethodConfig):
    """N_e experts per layer, `active` of them in total per token (or `fraction` of N_e), layer-adaptive shared share."""

    method = "expertweaver"
    needs_calibration = True

    experts: int = option(64, 'N_e experts per layer')
    active: int | None = option(None, 'experts active per token in total (instead of --fraction)')
    fraction: float | None = option(None, 'active fraction of the N_e experts')
    tau: float = option(0.6, 'CV threshold of a specialised neuron')
    alpha_min: float = option(0.2, 'smallest shared share')
    alpha_max: float = option(0.7, 'largest shared share')
    tasks: str = option("local", 'profiling tasks added to the calibration windows: local (code, licences, docs) | none | comma list of those and text files/folders', cli="profile-tasks")
    task_windows: int = option(1, 'windows per added task')
    sample_len: int = option(256, 'tokens per profiling sample')
    eps: float = 1e-6
    max_iters: int = option(10, 'balanced k-means iterations cap')
    seed: int = option(0, 'seed of the k-means initialisation')
    downcycle: bool = option(False, 'downcycling export (uniform shared ratio, softmax router)')
    shared_ratio: float = option(0.2, 'shared share when downcycling')

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise InputError(f"need 0 <= alpha_min <= alpha_max <= 1; got alpha_min={self.alpha_min}, alpha_max={self.alpha_max}.")
        positive_int("expertweaver: experts", self.experts, what="N_e")
        # the smallest shared share (alpha_min, or the downcycling ratio) plus one routed expert must fit the active budget
        low = round((self.shared_ratio if self.downcycle else self.alpha_min) * self.experts)
        why = (f" (downcycling's shared_ratio={self.shared_ratio} makes {low} shared experts, plus one routed)" if self.downcycle
               else f" (alpha_min={self.alpha_min} makes at least {low} shared experts, plus one routed)")
        self.active = resolve_active(self.experts, self.active, self.fraction, self.method, default_fraction=0.75,
                                     min_active=low + 1, why=why)
        self.fraction = self.active / self.experts
        if not self.tau > 0:
            raise InputError(f"tau (the CV threshold) must be positive, got {self.tau}.")
        for name in ("task_windows", "sample_len", "max_iters"):
            positive_int(name, getattr(self, name))
        if not self.tasks or not str(self.tasks).strip():
            raise InputError('tasks must be "local", "none" or a comma list of code, licences, docs and text files/folders.')
        if self.downcycle and not 0.0 <= self.shared_ratio < 1.0:
            raise InputError(f"shared_ratio must be in [0, 1), got {self.shared_ratio}.")
        if self.downcycle and self.active >= self.experts:
            raise InputError("downcycling routes with softmax weights: keep at least one routed expert inactive (active < experts).")

    def check(self, intermediate_sizes: list[int]) -> None:
        check_experts_fit(self.experts, intermediate_sizes, self.method)

    # ------------------------------------------------------------------ calibration

    def prepare(self, calibration: Calibration, tokenizer) -> tuple[Calibration, dict[str, Any]]:
        """(the calibration windows plus the task windows, the run state: which task each sample belongs to)."""
        cal, held = calibration.windows(tokenizer)
        n, L = cal.shape
        s = min(int(self.sample_len), L)
        per = L // s
        names, window_task, sample_task_std = [], [], None
        austen = _austen_sample_labels(calibration, tokenizer, n, L, s, per)
        if austen is not None:
            names, sample_task_std = austen
        else:
            names = [str(calibration.source)]
            sample_task_std = np.zeros(n * per, dtype=np.int64)
        extra, task_info = [], []
        for j, (name, text) in enumerate(_task_texts(self.tasks)):
            from ..data.texts import sample_windows, tokenize

            ids = tokenize(tokenizer, text)
            if ids.numel() < L + 1:
                raise InputError(f"expertweaver task {name!r} has {ids.numel()} tokens; windows of {L} tokens need at least {L + 1}. "
                                 "Give more text for it, or a shorter --seq-len.")
            extra.append(sample_windows(ids, int(self.task_windows), L, seed=int(calibration.seed) + 1 + j))
            window_task += [len(names)] * int(self.task_windows)
            task_info.append({"task": name, "tokens": int(ids.numel()), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]})
            names.append(name)
        windows = torch.cat([cal, *extra]) if extra else cal
        sample_task = np.concatenate([sample_task_std, np.repeat(np.asarray(window_task, dtype=np.int64), per)])
        present = np.unique(sample_task)
        samples = {"windows": int(windows.shape[0]), "seq_len": L, "sample_len": s, "per_window": per,
                         "sample_task": sample_task, "task_names": names, "tasks_present": int(present.size)}
        log.info("expertweaver: %d samples of %d tokens from %d tasks (%s)", sample_task.size, s, present.size,
                 ", ".join(names[t] for t in present))
        out = Calibration.from_windows(windows, held, seed=calibration.seed, sequential=calibration.sequential,
                                       heldout_tokens=calibration.heldout_tokens, batch_size=calibration.batch_size)
        out.source = f"{calibration.source} + tasks [{', '.join(names[t] for t in present)}]"
        out.samples = int(calibration.samples)
        out.task_info = task_info
        return out, samples

    def plan(self, weights: GatedWeights, x: torch.Tensor, layer: int, state: dict[str, Any] | None = None) -> LayerResult:
        return plan_expertweaver(weights, x, self, layer, state)

    def describe(self) -> str:
        return f"N_e={self.experts}, {self.active} active in total"

    def compare_details(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        per_layer = summary.get("per_layer") or []
        if not per_layer or "alpha" not in per_layer[0]:
            return None
        return {k: [lay.get(k) for lay in per_layer] for k in
                ("alpha", "alpha_effective", "specialisation_ratio", "shared_experts", "routed_top_k", "total_active_experts")}

    @classmethod
    def compare_markdown(cls, rows: list[dict[str, Any]]) -> list[str]:
        if not rows:
            return []
        lines = ["", "ExpertWeaver shared share per layer (alpha_l from the specialisation ratio; effective = built):", ""]
        for r in rows:
            a = r[cls.method]
            lines.append(f"- {r['active_target']:.0%} active: alpha_l {min(a['alpha']):.3f}..{max(a['alpha']):.3f}, "
                         f"effective {min(a['alpha_effective']):.3f}..{max(a['alpha_effective']):.3f}, routed top-k "
                         f"{min(a['routed_top_k'])}..{max(a['routed_top_k'])}, total active experts {sorted(set(a['total_active_experts']))}")
        return lines

    @classmethod
    def compare_figures(cls, rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
        """expertweaver_shares.png: alpha_l and the built shared share across depth, per active fraction."""
        if not rows:
            return {}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..core.files import atomic_write

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            a = r[cls.method]
            line, = ax.plot(range(len(a["alpha"])), a["alpha"], marker=".", label=f"alpha_l ({r['active_target']:.0%} active)")
            ax.plot(range(len(a["alpha"])), a["alpha_effective"], linestyle=":", color=line.get_color(),
                    label=f"built share ({r['active_target']:.0%} active)")
        cfg = rows[0]["config"]
        for v in (cfg["alpha_min"], cfg["alpha_max"]):
            ax.axhline(v, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("layer")
        ax.set_ylabel("shared share of the MLP neurons")
        ax.set_title("ExpertWeaver layer-adaptive shared share")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out) / "expertweaver_shares.png"
        atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
        plt.close(fig)
        return {"shares_plot": path}


# --------------------------------------------------------------------------- tasks


def _austen_sample_labels(calibration: Calibration, tokenizer, n: int, L: int, s: int, per: int):
    """(novel names, novel index per sample) for austen calibration windows; None for other sources."""
    if str(calibration.source).lower() != "austen" or calibration.samples != n or calibration.seq_len != L:
        return None
    from ..data.assets import pull_austen
    from ..data.texts import AUSTEN_CALIBRATION, load_token_ids

    starts = calibration.window_starts(tokenizer)  # the offsets Calibration.windows drew
    if starts is None:
        return None
    starts = np.asarray(starts)
    folder = pull_austen()
    lengths = [load_token_ids(tokenizer, str(folder / f"{b}.txt"), "calibration").numel() for b in AUSTEN_CALIBRATION]
    # novel k starts at the summed lengths of the ones before (the "\n\n" separators shift this by a token or
    # two per novel: irrelevant for labelling samples of hundreds of tokens)
    bounds = np.cumsum(lengths)[:-1]
    sample_start = (starts[:, None] + np.arange(per)[None, :] * s).reshape(-1)
    return list(AUSTEN_CALIBRATION), np.searchsorted(bounds, sample_start, side="right").astype(np.int64)


def _task_texts(tasks: str) -> list[tuple[str, str]]:
    spec = str(tasks).strip()
    if spec.lower() == "none":
        return []
    items = list(LOCAL_TASKS) if spec.lower() == "local" else [t.strip() for t in spec.split(",") if t.strip()]
    out = []
    for item in items:
        key = item.lower()
        if key == "code":
            out.append(("code", _code_text()))
        elif key in ("licences", "licenses"):
            out.append(("licences", _dist_text(_licence_files)))
        elif key == "docs":
            out.append(("docs", _dist_text(_description)))
        else:
            from ..data.texts import load_text

            out.append((Path(item).name or item, load_text(item, "calibration")))
    for name, text in out:
        if not text.strip():
            raise InputError(f"expertweaver task {name!r} has no text here; pick other tasks with --tasks.")
    return out


def _code_text() -> str:
    import transformers

    root = Path(transformers.__file__).parent / "models"
    parts = [p.read_text(encoding="utf-8") for m in CODE_MODELS for p in sorted((root / m).glob("modeling_*.py"))]
    return "\n\n".join(parts)[:TASK_CHARS]


def _distributions():
    from importlib import metadata

    seen = {}
    for d in metadata.distributions():
        name = (d.metadata.get("Name") or "").lower()
        if name and "eval" not in name and name != "moeify" and name not in seen:
            seen[name] = d
    return [seen[k] for k in sorted(seen)]


def _licence_files(dist) -> str:
    texts = []
    for f in sorted(dist.files or [], key=str):
        base = Path(str(f)).name.upper()
        if ".dist-info" in str(f) and base.startswith(("LICENSE", "LICENCE", "COPYING")):
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
    return "\n\n".join(texts)


def _description(dist) -> str:
    body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else ""
    return body or dist.metadata.get("Description") or ""


def _dist_text(read) -> str:
    parts, total = [], 0
    for d in _distributions():
        t = read(d).strip()
        if t:
            parts.append(t)
            total += len(t)
            if total >= TASK_CHARS:
                break
    return "\n\n".join(parts)[:TASK_CHARS]


# --------------------------------------------------------------------------- the plan


def gate_profiles(g: torch.Tensor, n_windows: int, L: int, s: int, per: int) -> torch.Tensor:
    """a [samples, d_h]: per sample, the token mean of |act(W_gate x)| (the paper's profile) from g = act(W_gate x)."""
    g = g.view(n_windows, L, -1)[:, : per * s].abs()
    return g.reshape(n_windows, per, s, -1).mean(2).reshape(n_windows * per, -1)


def specialisation(a: torch.Tensor, sample_task: np.ndarray, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(task means [tasks, d_h], CV per neuron [d_h]) over the tasks that have samples."""
    tasks, inv = np.unique(sample_task, return_inverse=True)
    inv_t = torch.as_tensor(inv)
    sums = torch.zeros(tasks.size, a.shape[1], dtype=torch.float64).index_add_(0, inv_t, a.double())
    means = sums / torch.bincount(inv_t, minlength=tasks.size).double()[:, None]
    cv = means.std(0, unbiased=False) / (means.mean(0) + eps)
    return means, cv


def plan_expertweaver(w: GatedWeights, x: torch.Tensor, cfg: ExpertWeaverConfig, layer: int, lay: dict[str, Any] | None) -> LayerResult:
    d_h = w.intermediate_size
    x = x.reshape(-1, w.hidden_size)
    if lay is None:
        raise InputError("expertweaver profiles task samples: convert with moeify.convert(model, ExpertWeaverConfig(...), "
                         "calibration=..., tokenizer=...) or `moeify convert --method expertweaver`, which prepare them.")
    if x.shape[0] != lay["windows"] * lay["seq_len"]:
        raise InputError(f"layer {layer}: expertweaver got {x.shape[0]} tokens instead of its {lay['windows']} x {lay['seq_len']} "
                         "calibration samples; it converts dense MLPs only (not the experts of an MoE model).")
    N_e, k = cfg.experts, cfg.active
    g, h = w.gate_and_hidden(x)
    a = gate_profiles(g, lay["windows"], lay["seq_len"], lay["sample_len"], lay["per_window"])
    del g
    means, cv = specialisation(a, lay["sample_task"], cfg.eps)
    ratio = float((cv > cfg.tau).double().mean())
    alpha = cfg.shared_ratio if cfg.downcycle else cfg.alpha_max - (cfg.alpha_max - cfg.alpha_min) * ratio
    m = d_h // N_e
    rem = d_h - m * N_e
    n_se = int(round(round(alpha * d_h) / (d_h / N_e)))
    capped = n_se > k - 1
    n_se = max(0, min(n_se, k - 1))
    importance = means.mean(0).numpy()
    order = order_desc(importance)
    n_shared = n_se * m + rem
    shared = np.sort(order[:n_shared])
    routed = order[n_shared:]
    n_r = N_e - n_se
    feats = a[:, torch.as_tensor(routed)].T.contiguous()  # profile vector a_i per routed neuron
    assign, _, iters = balanced_kmeans(feats, [m] * n_r, seeded_init(routed.size, n_r, cfg.seed, layer), cfg.max_iters)
    experts = [np.sort(routed[assign == j]) for j in range(n_r)]
    gate_rows = w.gate.float()
    weight = torch.stack([gate_rows[torch.as_tensor(e)].mean(0) for e in experts])
    plan = LayerPlan(shared=shared, experts=experts, top_k=k - n_se, router={"type": "linear"},
                     gate="softmax" if cfg.downcycle else "unit")
    info = {"tokens": int(x.shape[0]), "samples": int(a.shape[0]), "tasks": int(means.shape[0]),
            "specialisation_ratio": ratio, "alpha": float(alpha), "alpha_effective": n_shared / d_h,
            "shared_experts": n_se, "routed_top_k": k - n_se, "total_active_experts": n_se + (k - n_se),
            "shared_capped": bool(capped), "cluster_iterations": iters}
    return finish_plan(w, x, h, plan, {"weight": weight}, info, layer)
