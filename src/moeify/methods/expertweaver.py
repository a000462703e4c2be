"""ExpertWeaver (arXiv 2602.15521), training-free mode: GLU gate-activation patterns decide
the shared expert, its layer-adaptive size, the routed experts and a linear router
(../shared/docs/methods.md §3).

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
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration import Calibration
from ..calibration.profile import CalibratedPlan
from ..config import MethodConfig
from ..errors import InputError
from ..moe import GatedWeights, activation
from ..plan import LayerPlan
from .cmoe import balanced_kmeans, order_desc
from .moefication import check_experts_fit, finish_plan, resolve_active, seeded_init

log = logging.getLogger("moeify")

LOCAL_TASKS = ("code", "licences", "docs")
CODE_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "olmoe")
TASK_CHARS = 300_000  # per local task: ample for a few 2048-token windows, cheap to tokenize


@dataclasses.dataclass
class ExpertWeaverConfig(MethodConfig):
    """N_e experts per layer, `active` of them in total per token (or `fraction` of N_e), layer-adaptive shared share."""

    method = "expertweaver"
    needs_calibration = True

    experts: int = 64
    active: int | None = None
    fraction: float | None = None
    tau: float = 0.6
    alpha_min: float = 0.2
    alpha_max: float = 0.7
    tasks: str = "local"
    task_windows: int = 1
    sample_len: int = 256
    eps: float = 1e-6
    max_iters: int = 10
    seed: int = 0
    downcycle: bool = False
    shared_ratio: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise InputError(f"need 0 <= alpha_min <= alpha_max <= 1; got alpha_min={self.alpha_min}, alpha_max={self.alpha_max}.")
        if int(self.experts) != self.experts or self.experts < 1:
            raise InputError(f"expertweaver: experts (N_e) must be a positive integer, got {self.experts}.")
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
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v}.")
        if not self.tasks or not str(self.tasks).strip():
            raise InputError('tasks must be "local", "none" or a comma list of code, licences, docs and text files/folders.')
        if self.downcycle and not 0.0 <= self.shared_ratio < 1.0:
            raise InputError(f"shared_ratio must be in [0, 1), got {self.shared_ratio}.")
        if self.downcycle and self.active >= self.experts:
            raise InputError("downcycling routes with softmax weights: keep at least one routed expert inactive (active < experts).")
        self._samples: dict[str, Any] | None = None  # set by prepare_calibration; not part of the saved config

    def check(self, intermediate_sizes: list[int]) -> None:
        check_experts_fit(self.experts, intermediate_sizes, self.method)

    # ------------------------------------------------------------------ calibration

    def prepare_calibration(self, calibration: Calibration, tokenizer) -> Calibration:
        """The calibration windows plus the task windows; remembers which task each sample belongs to."""
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
            from ..texts import sample_windows, tokenize

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
        self._samples = {"windows": int(windows.shape[0]), "seq_len": L, "sample_len": s, "per_window": per,
                         "sample_task": sample_task, "task_names": names, "tasks_present": int(present.size)}
        log.info("expertweaver: %d samples of %d tokens from %d tasks (%s)", sample_task.size, s, present.size,
                 ", ".join(names[t] for t in present))
        out = Calibration.from_windows(windows, held, seed=calibration.seed, sequential=calibration.sequential,
                                       heldout_tokens=calibration.heldout_tokens, batch_size=calibration.batch_size)
        out.source = f"{calibration.source} + tasks [{', '.join(names[t] for t in present)}]"
        out.samples = int(calibration.samples)
        out.task_info = task_info
        return out

    def plan_from_activations(self, w: GatedWeights, x: torch.Tensor, layer: int) -> CalibratedPlan:
        return plan_expertweaver(w, x, self, layer)


# --------------------------------------------------------------------------- tasks


def _austen_sample_labels(calibration: Calibration, tokenizer, n: int, L: int, s: int, per: int):
    """(novel names, novel index per sample) for austen calibration windows; None for other sources."""
    if str(calibration.source).lower() != "austen" or calibration.samples != n or calibration.seq_len != L:
        return None
    from ..assets import pull_austen
    from ..texts import AUSTEN_CALIBRATION, load_token_ids

    ids = load_token_ids(tokenizer, "austen", "calibration")
    rng = random.Random(calibration.seed)  # the window offsets Calibration.windows drew (protocol.md)
    starts = np.array([rng.randint(0, ids.numel() - L - 1) for _ in range(n)])
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
            from ..texts import load_text

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


def gate_and_hidden(w: GatedWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(W_gate x), h(x)) [T, d_h] float32 from one fused gate/up matmul."""
    d_h = w.intermediate_size
    gu = x.float() @ torch.cat([w.gate, w.up]).float().T
    g = activation(w.act)(gu[:, :d_h])
    return g, g * gu[:, d_h:]


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


def plan_expertweaver(w: GatedWeights, x: torch.Tensor, cfg: ExpertWeaverConfig, layer: int) -> CalibratedPlan:
    d_h = w.intermediate_size
    x = x.reshape(-1, w.hidden_size)
    lay = cfg._samples
    if lay is None:
        raise InputError("expertweaver profiles task samples: convert with moeify.convert(model, ExpertWeaverConfig(...), "
                         "calibration=..., tokenizer=...) or `moeify convert --method expertweaver`, which prepare them.")
    if x.shape[0] != lay["windows"] * lay["seq_len"]:
        raise InputError(f"layer {layer}: expertweaver got {x.shape[0]} tokens instead of its {lay['windows']} x {lay['seq_len']} "
                         "calibration samples; it converts dense MLPs only (not the experts of an MoE model).")
    N_e, k = cfg.experts, cfg.active
    g, h = gate_and_hidden(w, x)
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
