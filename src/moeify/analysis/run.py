"""`moeify analyze`: how MoE-like each converted MLP is, measured on tokens it was not fitted on.

One streamed pass: the held-out windows and two disjoint calibration subsets flow through
the converted model layer by layer (calibration.pipeline's stream); a pre-hook on each MoE
block records its inputs, the layer's metrics are computed, and only the hidden states of
the next layer are kept. Per layer:

* activation-rate histogram (top-K_a marking, as CMoE profiles) split shared / routed;
* expert load on held-out tokens, dead experts, load entropy;
* router fidelity (diagnostics.router_fidelity): top-k overlap with the oracle, relative
  MLP error with the router's and the oracle's selection;
* partition stability: the layer re-planned from each calibration subset with the
  checkpoint's own method config; Jaccard of the shared sets, ARI of the routed experts;
* the "secret MoE" test (methods.md §4): FVU of the best k-of-N expert subset and of the
  router for every k, on real inputs and on Gaussian inputs with the same mean and
  covariance (with the checkpoint's partition, and with a partition re-fitted on
  Gaussian inputs), against a static MLP with the same active neurons;
* low-rank routers (CMoE router_rank) re-fitted on calibration subset A at a few ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Iterator

import numpy as np
import torch

from ..models.arch import activation_name, decoder_layers, dense_weights, mlp_sites, spec_for
from ..core.method import MethodConfig
from ..blocks.diagnostics import router_fidelity
from ..errors import InputError
from ..core.dense import GatedWeights
from ..blocks.moe import MoEMLP
from .metrics import activation_rate_histogram, expert_load, fvu, fvu_curves, matched_gaussian, partition_agreement, static_fvu

log = logging.getLogger("moeify")

PROTOCOL = "analysis-v1"
RATE_BINS = np.logspace(-5, 0, 26)


@dataclasses.dataclass
class AnalysisSettings:
    """What `analyze` measures and on how many tokens.

    heldout: text source whose held-out split gives the evaluation tokens (austen-v1:
        Persuasion + Northanger Abbey, from the start); calib: source of the two disjoint
        calibration subsets (default: the checkpoint's recorded calibration source);
        each subset is calib_tokens tokens in windows of seq_len drawn without overlap.
    ranks: low-rank router ranks to re-fit and compare (methods with router_rank only).
    """

    heldout: str = "austen"
    heldout_tokens: int = 4096
    calib: str | None = None
    calib_tokens: int = 4096
    seq_len: int = 2048
    seed: int = 0
    layers: list[int] | None = None
    ranks: tuple[int, ...] = (16, 64)
    gaussian: bool = True
    stability: bool = True
    distill: bool = False
    distill_layer: int | None = None
    distill_steps: int = 600
    batch_size: int = 2

    def __post_init__(self) -> None:
        for name in ("heldout_tokens", "calib_tokens", "seq_len", "batch_size", "distill_steps"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise InputError(f"analysis {name} must be a positive integer, got {v!r}.")
        if self.seq_len < 16:
            raise InputError(f"analysis seq_len={self.seq_len} is too short; use at least 16 tokens (2048 by default).")
        self.ranks = tuple(int(r) for r in self.ranks)
        if any(r < 1 for r in self.ranks):
            raise InputError(f"router ranks must be positive integers, got {list(self.ranks)}.")


# --------------------------------------------------------------------------- tokens


def token_sets(tokenizer, s: AnalysisSettings, calib_source: str) -> dict[str, torch.Tensor]:
    """{'heldout', 'calib_a', 'calib_b'} token windows; the two calibration subsets never overlap."""
    from ..data.texts import heldout_windows, load_token_ids

    held_ids = load_token_ids(tokenizer, s.heldout, "heldout")
    L = min(s.seq_len, s.heldout_tokens)
    held = heldout_windows(held_ids, L, math.ceil(s.heldout_tokens / L))
    sets = {"heldout": held}
    if s.stability or s.ranks or s.distill:
        cal_ids = load_token_ids(tokenizer, calib_source, "calibration")
        Lc = min(s.seq_len, s.calib_tokens)
        n = math.ceil(s.calib_tokens / Lc)
        windows = heldout_windows(cal_ids, Lc)  # consecutive, non-overlapping
        if windows.shape[0] < 2 * n:
            raise InputError(f"calibration source {calib_source!r} has {cal_ids.numel()} tokens: too few for two disjoint subsets of "
                             f"{n} x {Lc} tokens. Lower --calib-tokens or give more text.")
        perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(s.seed))
        sets["calib_a"], sets["calib_b"] = windows[perm[:n]], windows[perm[n : 2 * n]]
    return sets


def layer_inputs(model, sets: dict[str, torch.Tensor], batch_size: int, last_layer: int | None = None) -> Iterator[tuple[Any, dict[str, torch.Tensor]]]:
    """(site, {set name: MLP inputs [T, H]}) layer after layer, through the model as it is (converted)."""
    from ..pipeline.stream import LayerStream

    spec = spec_for(model)
    streams = {k: LayerStream(model, spec, ids, batch_size) for k, ids in sets.items()}
    layers = decoder_layers(model, spec)
    for site in mlp_sites(model, spec):
        if last_layer is not None and site.layer > last_layer:
            return
        yield site, {name: st.step(layers[site.layer], site.layer, record=site.module).float() for name, st in streams.items()}


# --------------------------------------------------------------------------- one layer


def dense_from_block(block: MoEMLP) -> GatedWeights | None:
    """The dense MLP a complete block was cut from (neurons back at their original ids), or None if neurons were dropped."""
    sh, ri = block.shared_index, block.routed_index
    ids = torch.cat([sh, ri])
    d = ids.numel()
    if d == 0 or not torch.equal(ids.sort().values, torch.arange(d, device=ids.device)):
        return None
    H, S = block.hidden_size, block.shared_size
    gate = block.down.new_zeros(d, H)
    up, down = torch.zeros_like(gate), block.down.new_zeros(H, d)
    gate[sh], up[sh], down[:, sh] = block.shared_gate_up[:S], block.shared_gate_up[S:], block.shared_down.T
    if block.num_experts:
        gcols, ucols, _ = block._cols(block.gate_up.device)
        gate[ri], up[ri], down[:, ri] = block.gate_up[gcols], block.gate_up[ucols], block.down.T
    return GatedWeights(gate=gate.detach(), up=up.detach(), down=down.detach(), act=block.act)


def _partition(block: MoEMLP) -> tuple[np.ndarray, list[np.ndarray]]:
    ri = block.routed_index.cpu().numpy()
    return block.shared_index.cpu().numpy(), [ri[block.offsets[e] : block.offsets[e + 1]] for e in range(block.num_experts)]


def _expert_outputs(h: torch.Tensor, down: torch.Tensor, shared: np.ndarray, experts: list[np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    def part(idx):
        i = torch.as_tensor(idx, dtype=torch.long)
        return h[:, i] @ down[:, i].T

    return (part(shared) if len(shared) else h.new_zeros(h.shape[0], down.shape[0])), [part(e) for e in experts]


def _curves(w: GatedWeights, x: torch.Tensor, shared: np.ndarray, experts: list[np.ndarray], scores: torch.Tensor | None, ks: list[int],
            h: torch.Tensor | None = None) -> dict:
    h = w.hidden(x) if h is None else h
    down = w.down.float()
    F = h @ down.T
    sh_out, ex_out = _expert_outputs(h, down, shared, experts)
    res = fvu_curves(F, sh_out, ex_out, scores, ks)
    mean_m = float(np.mean([e.size for e in experts])) if experts else 0.0
    routed = np.concatenate(experts) if experts else np.zeros(0, dtype=np.int64)
    res["static"] = static_fvu(h, down, F, shared, routed, [int(round(k * mean_m)) for k in ks])
    return res


def _fvu_from_rel(F: torch.Tensor, rel: float) -> float:
    """FVU from ||F - y|| / ||F|| (router_fidelity's error, which is the block's own output): saves a block forward."""
    F = F.double()
    return float(rel**2 * (F * F).sum() / ((F - F.mean(0)) ** 2).sum().clamp_min(1e-300))


def _replan(cfg: MethodConfig, w: GatedWeights, x: torch.Tensor, layer: int):
    from ..pipeline.layer import plan_layer

    return plan_layer(cfg, w, x, layer)[0]


def analyze_layer(block: MoEMLP, w: GatedWeights, xs: dict[str, torch.Tensor], cfg: MethodConfig | None, s: AnalysisSettings,
                  layer: int) -> dict[str, Any]:
    """Every per-layer metric of the module docstring for one MoE block; w = the dense MLP it came from."""
    xh = xs["heldout"]
    shared, experts = _partition(block)
    d_h, N = w.intermediate_size, block.num_experts
    routed_active = N > 0 and not block.all_active()
    out: dict[str, Any] = {"layer": layer, "shared": int(block.shared_size), "experts": list(block.expert_sizes),
                           "top_k": int(block.top_k) if N else 0, "router": block.router_type, "tokens": int(xh.shape[0])}
    h = w.hidden(xh)
    down = w.down.float()
    F = h @ down.T
    k_act = min(int(getattr(cfg, "k_act", 10) or 10), d_h)
    marks = h.abs().topk(k_act, dim=-1, sorted=False).indices
    rates = torch.bincount(marks.reshape(-1), minlength=d_h).double().numpy() / marks.shape[0]
    out["activation_rates"] = {"k_act": k_act, **activation_rate_histogram(rates, shared, RATE_BINS)}
    del marks
    scores = None
    if routed_active:
        scores, idx, _ = block.route(xh)
        out["fidelity"] = router_fidelity(block, xh, F)
        out["block_fvu"] = _fvu_from_rel(F, out["fidelity"]["rel_error_router"])
        norms = torch.stack([(h[:, torch.as_tensor(e)] @ down[:, torch.as_tensor(e)].T).norm(dim=-1) for e in experts], -1)
        out["load"] = {**expert_load(idx, N), "oracle_share": expert_load(norms.topk(block.top_k, dim=-1).indices, N)["share"]}
    else:
        out["block_fvu"] = fvu(F, block(xh).float())
    ks = list(range(N + 1))
    mean_m = float(np.mean(block.expert_sizes)) if N else 0.0
    sm: dict[str, Any] = {"k": ks, "active_fraction": [(block.shared_size + k * mean_m) / d_h for k in ks],
                          "block_k": out["top_k"], "real": _curves(w, xh, shared, experts, scores, ks, h=h)}
    del h
    if s.gaussian:
        xg = matched_gaussian(xh, xh.shape[0], s.seed + 1000 * layer)
        sm["gaussian"] = _curves(w, xg, shared, experts, block.router(xg) if routed_active else None, ks)
        if cfg is not None and cfg.needs_calibration and N:
            fit = matched_gaussian(xh, xs.get("calib_a", xh).shape[0], s.seed + 1000 * layer + 1)
            gp = _replan(cfg, w, fit, layer).plan
            sm["gaussian_refit"] = _curves(w, xg, gp.shared, gp.experts, None, ks)
            sm["gaussian_refit"]["shared"] = int(gp.shared.size)
    out["secret_moe"] = sm
    if cfg is not None and cfg.needs_calibration and "calib_a" in xs and N:
        res_a = _replan(cfg, w, xs["calib_a"], layer)
        if s.stability:
            res_b = _replan(cfg, w, xs["calib_b"], layer)
            pa, pb = res_a.plan, res_b.plan
            out["stability"] = {"a_vs_b": partition_agreement(pa.shared, pa.experts, pb.shared, pb.experts),
                                "a_vs_checkpoint": partition_agreement(pa.shared, pa.experts, shared, experts),
                                "b_vs_checkpoint": partition_agreement(pb.shared, pb.experts, shared, experts),
                                "tokens_per_subset": int(xs["calib_a"].shape[0])}
        if routed_active and s.ranks and "router_rank" in {f.name for f in dataclasses.fields(cfg)}:
            out["lowrank"] = _lowrank(cfg, w, xs["calib_a"], xh, F, res_a, s.ranks, layer)
    elif cfg is not None and not cfg.needs_calibration:
        out["stability"] = {"not_applicable": f"{cfg.method} plans from the weights alone; the same weights always give the same plan"}
    return out


def _lowrank(cfg, w: GatedWeights, xa: torch.Tensor, xh: torch.Tensor, F: torch.Tensor, full, ranks, layer: int) -> list[dict]:
    rows = []
    order = [cfg.router_rank, None, *sorted(r for r in ranks if r < w.hidden_size)]  # the checkpoint's own rank first
    for rank in dict.fromkeys(order):
        res = full if rank == cfg.router_rank else _replan(dataclasses.replace(cfg, router_rank=rank), w, xa, layer)
        blk = MoEMLP.from_dense(w, res.plan, res.router_state, res.block_state)
        fid = router_fidelity(blk, xh, F)
        rows.append({"rank": rank, "checkpoint_setting": rank == cfg.router_rank, "overlap": fid["overlap"], "rel_error_router": fid["rel_error_router"],
                     "rel_error_oracle": fid["rel_error_oracle"], "fvu": _fvu_from_rel(F, fid["rel_error_router"])})
    return rows


# --------------------------------------------------------------------------- the model


def analyze(path: str, settings: AnalysisSettings | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Analyse a moeify checkpoint folder (or a converted in-memory model) layer by layer; returns the analysis JSON."""
    from tqdm.auto import tqdm

    from ..models.checkpoint import load_model

    s = settings or AnalysisSettings()
    t0 = time.perf_counter()
    if isinstance(path, torch.nn.Module):
        model, tok = path, getattr(path, "_moeify_tokenizer", None)
        if tok is None:
            raise InputError("an in-memory model needs its tokenizer: set model._moeify_tokenizer or pass a checkpoint folder.")
    else:
        model, tok = load_model(str(path), dtype="float32")
    mo = getattr(model.config, "moeify", None)
    if not isinstance(mo, dict):
        raise InputError(f"{path} is not a moeify checkpoint (no 'moeify' block in config.json); convert it first with `moeify convert`.")
    cfg = MethodConfig.from_dict(mo["config"]) if mo.get("config") else None
    recorded = (mo.get("summary") or {}).get("calibration") or {}
    calib = s.calib or recorded.get("source") or "austen"
    if calib == "<windows>":
        calib = "austen"
    spec = spec_for(model)
    sites = list(mlp_sites(model, spec))
    moe_layers = [st.layer for st in sites if st.kind == "moeify"]
    if not moe_layers:
        raise InputError(f"{path} has no moeify MoE block to analyse.")
    wanted = sorted(set(s.layers)) if s.layers else moe_layers
    bad = [i for i in wanted if i not in moe_layers]
    if bad:
        raise InputError(f"layer(s) {bad} are not converted MoE layers; choose among {moe_layers}.")
    sets = token_sets(tok, s, calib)  # text problems fail here, before any forward pass
    model.eval()
    act = activation_name(model.config, spec)
    base = None
    per_layer: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    distill_inputs: dict[str, torch.Tensor] | None = None
    distill_layer = s.distill_layer if s.distill_layer is not None else wanted[len(wanted) // 2]
    from ..blocks.hierarchical import HierarchicalMoEMLP

    bar = tqdm(total=len(wanted), desc="analyze", unit="layer", disable=not progress)
    with torch.no_grad():
        for site, xs in layer_inputs(model, sets, s.batch_size, last_layer=max(wanted + ([distill_layer] if s.distill else []))):
            i = site.layer
            if i not in wanted and not (s.distill and i == distill_layer):
                continue
            block = site.module
            if isinstance(block, HierarchicalMoEMLP):
                skipped.append({"layer": i, "why": "hierarchical block (MoE inside MoE): not analysed"})
                bar.update(1)
                continue
            w = dense_from_block(block)
            if w is None:  # neurons were dropped: compare with the base model's MLP
                base = base or _base_sites(mo, spec)
                w = dense_weights(base[i].module, spec, act)
            if s.distill and i == distill_layer:
                distill_inputs = {"w": w, **xs}
            if i in wanted:
                per_layer.append(analyze_layer(block, w, xs, cfg, s, i))
                bar.update(1)
                log.info("layer %d: %s", i, _line(per_layer[-1]))
    bar.close()
    result: dict[str, Any] = {
        "protocol": PROTOCOL,
        "checkpoint": str(path) if not isinstance(path, torch.nn.Module) else getattr(path, "name_or_path", "<model>"),
        "method": mo.get("method"),
        "config": (mo.get("config") or {}).get("_data"),
        "base_model": (mo.get("provenance") or {}).get("base_model"),
        "settings": {**dataclasses.asdict(s), "calib": calib, "ranks": list(s.ranks),
                     "tokens": {k: int(v.numel()) for k, v in sets.items()}, "seq_len_used": {k: int(v.shape[1]) for k, v in sets.items()}},
        "layers": per_layer,
        "skipped": skipped,
        "summary": summarize(per_layer),
    }
    if s.distill and distill_inputs is not None:
        from .distill import distill_layer as run_distill

        result["distill"] = run_distill(distill_inputs.pop("w"), distill_inputs, block_sizes=_block_shape(model, spec, distill_layer),
                                        steps=s.distill_steps, seed=s.seed, layer=distill_layer, progress=progress)
    result["seconds"] = time.perf_counter() - t0
    return result


def _block_shape(model, spec, layer: int) -> dict[str, int]:
    b = list(mlp_sites(model, spec))[layer].module
    return {"shared": int(b.shared_size), "routed": int(b.routed_size), "top_k": int(b.top_k), "experts": int(b.num_experts)}


def _base_sites(mo: dict, spec) -> list:
    from ..models.checkpoint import load_model

    name = (mo.get("provenance") or {}).get("base_model")
    if not name:
        raise InputError("this checkpoint dropped neurons and does not record its base model; the dense MLP is needed for the analysis.")
    base, _ = load_model(name, dtype="float32", with_tokenizer=False)
    return list(mlp_sites(base, spec))


def _mean(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over layers, and the per-layer verdict of the secret-MoE test at the block's k."""
    out: dict[str, Any] = {"layers": len(layers)}
    fid = [lay["fidelity"] for lay in layers if "fidelity" in lay]
    for key in ("overlap", "rel_error_router", "rel_error_oracle"):
        out[key] = _mean([f.get(key) for f in fid])
    out["block_fvu"] = _mean([lay["block_fvu"] for lay in layers])
    out["dead_experts"] = sum(len(lay["load"]["dead"]) for lay in layers if "load" in lay)
    out["load_entropy_normalized"] = _mean([lay["load"]["entropy_normalized"] for lay in layers if "load" in lay])
    st = [lay["stability"]["a_vs_b"] for lay in layers if "a_vs_b" in lay.get("stability", {})]
    out["shared_jaccard"] = _mean([x["shared_jaccard"] for x in st])
    out["routed_ari"] = _mean([x.get("routed_ari") for x in st])
    verdict = []
    for lay in layers:
        sm = lay["secret_moe"]
        k = sm["block_k"]
        if "gaussian" not in sm or not 0 < k < len(sm["k"]) - 1:
            continue
        real, gauss = sm["real"]["oracle"][k], sm["gaussian"]["oracle"][k]
        refit = sm.get("gaussian_refit", {}).get("oracle", [None] * len(sm["k"]))[k]
        verdict.append({"layer": lay["layer"], "k": k, "real": real, "gaussian": gauss, "gaussian_refit": refit,
                        "holds": real < gauss, "holds_refit": None if refit is None else real < refit,
                        "routing_gain_real": sm["real"]["static"][k] - real, "routing_gain_gaussian": sm["gaussian"]["static"][k] - gauss})
    if verdict:
        out["secret_moe"] = {"per_layer": verdict, "holds_layers": sum(v["holds"] for v in verdict),
                             "holds_refit_layers": sum(bool(v["holds_refit"]) for v in verdict), "layers": len(verdict),
                             "fvu_real": _mean([v["real"] for v in verdict]), "fvu_gaussian": _mean([v["gaussian"] for v in verdict]),
                             "fvu_gaussian_refit": _mean([v["gaussian_refit"] for v in verdict])}
    ranks: dict[str, list] = {}
    for lay in layers:
        for row in lay.get("lowrank", []):
            ranks.setdefault(str(row["rank"] or "full"), []).append(row)
    if ranks:
        out["lowrank"] = {r: {k: _mean([row[k] for row in rows]) for k in ("overlap", "rel_error_router", "fvu")} for r, rows in ranks.items()}
    return out


def _line(lay: dict[str, Any]) -> str:
    parts = [f"block FVU {lay['block_fvu']:.3f}"]
    if "fidelity" in lay:
        parts.append(f"overlap {lay['fidelity']['overlap']:.3f}")
    sm = lay["secret_moe"]
    k = sm["block_k"]
    if "gaussian" in sm:
        parts.append(f"oracle FVU@k={k} real {sm['real']['oracle'][k]:.3f} vs gaussian {sm['gaussian']['oracle'][k]:.3f}")
    if "a_vs_b" in lay.get("stability", {}):
        st = lay["stability"]["a_vs_b"]
        parts.append(f"shared Jaccard {st['shared_jaccard']:.3f}, ARI {st.get('routed_ari', float('nan')):.3f}")
    return ", ".join(parts)
