"""The analysis metrics, each a small vectorised function with a known answer on constructed cases.

Notation as in methods.md: F(x) = shared(x) + sum_j E_j(x) for a complete partition of
the MLP's neurons into a shared expert and N routed experts. An approximation that
keeps a subset S of the routed experts outputs shared(x) + sum_{j in S} E_j(x).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


# exact best-subset search enumerates all subsets of the routed experts up to this many experts
EXACT_SUBSETS_MAX_EXPERTS = 12


def fvu(target: torch.Tensor, approx: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||F - F_hat||^2 / sum ||F - mean(F)||^2 over tokens."""
    target = target.double()
    var = ((target - target.mean(0, keepdim=True)) ** 2).sum()
    return float(((target - approx.double()) ** 2).sum() / var.clamp_min(1e-300))


def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| of two index sets (1.0 for two empty sets)."""
    a, b = set(np.asarray(a).ravel().tolist()), set(np.asarray(b).ravel().tolist())
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def partition_agreement(shared_a, experts_a: list, shared_b, experts_b: list) -> dict[str, float]:
    """Jaccard of the shared sets and adjusted Rand index of the routed assignments.

    The ARI is computed over the neurons that are routed in both partitions (expert
    numbering does not matter: ARI is invariant to relabelling).
    """
    def labels(experts):
        return {int(n): j for j, e in enumerate(experts) for n in np.asarray(e).ravel()}

    la, lb = labels(experts_a), labels(experts_b)
    common = sorted(set(la) & set(lb))
    out = {"shared_jaccard": jaccard(shared_a, shared_b), "routed_common": len(common)}
    if len(common) >= 2:
        out["routed_ari"] = adjusted_rand_index(np.array([la[n] for n in common]), np.array([lb[n] for n in common]))
    return out


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert-Arabie adjusted Rand index of two labelings of the same items (1 = same partition, ~0 = chance).

    Written out (it is one formula on the contingency table) so the analysis does not pull in
    scikit-learn at run time; the tests check it against sklearn.metrics.adjusted_rand_score.
    """
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.float64)
    np.add.at(table, (ia, ib), 1.0)

    def pairs(v):
        return (v * (v - 1) / 2).sum()

    n = pairs(np.array([float(a.size)]))
    sum_ij, sum_a, sum_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = sum_a * sum_b / n if n else 0.0
    top = 0.5 * (sum_a + sum_b)
    if top == expected:  # both labelings put everything in one cluster (or all apart): identical
        return 1.0
    return float((sum_ij - expected) / (top - expected))


def expert_load(selected: torch.Tensor, num_experts: int) -> dict:
    """Share of selections per expert, dead experts and the load entropy, from [T, k] expert ids.

    entropy_bits is the entropy of the load distribution; normalized divides by log2 N
    (1.0 = perfectly balanced, 0 = every token picks the same experts).
    """
    counts = torch.bincount(selected.reshape(-1), minlength=num_experts).double()
    share = counts / counts.sum().clamp_min(1.0)
    p = share[share > 0]
    ent = float(-(p * p.log2()).sum())
    return {
        "share": share.tolist(),
        "dead": [int(j) for j in torch.nonzero(counts == 0).ravel()],
        "entropy_bits": ent,
        "entropy_normalized": ent / math.log2(num_experts) if num_experts > 1 else 1.0,
    }


def activation_rate_histogram(rates: np.ndarray, shared: np.ndarray, bins: np.ndarray) -> dict:
    """Histogram of neuron activation rates, split into shared and routed neurons (rate 0 counted apart)."""
    rates = np.asarray(rates, dtype=np.float64)
    is_shared = np.zeros(rates.size, dtype=bool)
    is_shared[np.asarray(shared, dtype=np.int64)] = True
    out = {"bins": bins.tolist()}
    for name, mask in (("shared", is_shared), ("routed", ~is_shared)):
        r = rates[mask]
        out[name] = np.histogram(r[r > 0], bins=bins)[0].tolist()
        out[f"{name}_zero"] = int((r == 0).sum())
    out["marks_in_shared"] = float(rates[is_shared].sum() / max(rates.sum(), 1e-300))
    return out


def matched_gaussian(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples of N(mean(x), cov(x)) [n, H] float32, with a fixed seed.

    Hidden states are anisotropic (a few huge directions), so the factorisation is an
    eigendecomposition in float64 with negative round-off eigenvalues clipped, not a
    Cholesky that would fail on a near-singular covariance.
    """
    import scipy.linalg

    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    # scipy's eigh: torch's multithreaded LAPACK path is ~10x slower on small shared CPUs
    evals, evecs = (torch.from_numpy(a) for a in scipy.linalg.eigh(cov.numpy()))
    root = evecs * evals.clamp_min(0).sqrt()
    z = torch.randn(n, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mean + z @ root.T).float()


def _subset_masks(N: int, k: int) -> torch.Tensor:
    return torch.tensor([[j in c for j in range(N)] for c in itertools.combinations(range(N), k)], dtype=torch.float64)


def best_subset_errors(rest: torch.Tensor, experts: list[torch.Tensor], ks: list[int]) -> tuple[dict[int, torch.Tensor], str]:
    """Per token, the smallest ||rest - sum_{j in S} E_j||^2 over subsets S of size k, for each k.

    rest = F(x) - shared(x), the part the routed experts must explain. With the Gram
    matrix G = <E_i, E_j> and c = <rest, E_j> per token, err(S) = |rest|^2 - 2 c.1_S +
    1_S^T G 1_S, evaluated for every subset at once when N <= EXACT_SUBSETS_MAX_EXPERTS
    ("exact"); otherwise by greedy forward selection ("greedy", an upper bound).
    """
    N = len(experts)
    r = rest.double()
    G = r.new_zeros(r.shape[0], N, N)
    c = r.new_zeros(r.shape[0], N)
    for t0 in range(0, r.shape[0], 1024):  # token chunks bound the [T, N, H] stack's memory
        E = torch.stack([e[t0 : t0 + 1024].double() for e in experts], dim=1) if N else r.new_zeros(0, 0, r.shape[1])
        if N:
            G[t0 : t0 + 1024] = torch.einsum("tih,tjh->tij", E, E)
            c[t0 : t0 + 1024] = torch.einsum("th,tjh->tj", r[t0 : t0 + 1024], E)
    base = (r * r).sum(-1)
    out: dict[int, torch.Tensor] = {}
    if N <= EXACT_SUBSETS_MAX_EXPERTS:
        for k in ks:
            if k == 0:
                out[k] = base
                continue
            M = _subset_masks(N, k)  # [C, N]
            err = base[:, None] - 2 * c @ M.T + torch.einsum("cj,tjl,cl->tc", M, G, M)
            out[k] = err.min(-1).values.clamp_min(0)
        return out, "exact"
    chosen = torch.zeros(r.shape[0], N, dtype=torch.float64)
    err = base.clone()
    out[0] = base.clone()
    for step in range(1, max(ks) + 1):
        # adding j changes the error by -2 c_j + 2 (G chosen)_j + G_jj
        delta = -2 * c + 2 * torch.einsum("tjl,tl->tj", G, chosen) + torch.diagonal(G, dim1=1, dim2=2)
        delta = delta.masked_fill(chosen > 0, float("inf"))
        j = delta.argmin(-1)
        err = err + delta.gather(1, j[:, None]).squeeze(1)
        chosen.scatter_(1, j[:, None], 1.0)
        if step in ks:
            out[step] = err.clamp_min(0).clone()
    return out, "greedy"


def fvu_curves(dense: torch.Tensor, shared: torch.Tensor, experts: list[torch.Tensor], scores: torch.Tensor | None,
               ks: list[int]) -> dict:
    """FVU of F(x) approximated by the shared expert plus k routed experts, for each k.

    oracle: the best k-of-N subset per token; norm_oracle: the k experts of largest ||E_j(x)||
    (the oracle the router is trained/measured against); router: the top-k of `scores`.
    """
    F = dense.double()
    var = ((F - F.mean(0, keepdim=True)) ** 2).sum().clamp_min(1e-300)
    rest = F - shared.double()
    best, how = best_subset_errors(rest, experts, ks)
    res: dict = {"k": list(ks), "oracle": [float(best[k].sum() / var) for k in ks], "oracle_search": how}
    if not experts:
        return res
    rest = rest.float()
    E = torch.stack([e.float() for e in experts], 1)  # [T, N, H]
    norms = E.norm(dim=-1)

    def by_scores(s: torch.Tensor) -> list[float]:
        vals = []
        for k in ks:
            keep = torch.zeros_like(s, dtype=torch.float32)
            if k:
                keep.scatter_(1, s.topk(k, dim=-1).indices, 1.0)
            vals.append(float(((rest - torch.einsum("tn,tnh->th", keep, E)).double() ** 2).sum() / var))
        return vals

    res["norm_oracle"] = by_scores(norms)
    if scores is not None:
        res["router"] = by_scores(scores.float())
    return res


def static_fvu(h: torch.Tensor, down: torch.Tensor, dense: torch.Tensor, shared: np.ndarray, routed: np.ndarray,
               counts: list[int]) -> list[float]:
    """FVU of a static MLP (no routing) keeping the shared neurons plus the `count` routed neurons
    of largest mean contribution |h_i| ||W_down[:, i]|| on these tokens: the dense model with the
    same active neurons, chosen with hindsight."""
    if not len(routed):
        return [fvu(dense, h @ down.T)] * len(counts)
    r = torch.as_tensor(routed)
    contrib = (h[:, r].abs().mean(0) * down[:, r].norm(dim=0)).numpy()
    order = routed[np.lexsort((routed, -contrib))]
    sh = torch.as_tensor(np.asarray(shared, dtype=np.int64))
    approx = h[:, sh] @ down[:, sh].T
    out, done = [], 0
    for c in sorted(counts):  # neurons are added in order, so each count only adds the new ones
        add = torch.as_tensor(order[done:c].astype(np.int64))
        approx = approx + h[:, add] @ down[:, add].T
        done = max(done, c)
        out.append((c, fvu(dense, approx)))
    by_count = dict(out)
    return [by_count[c] for c in counts]
