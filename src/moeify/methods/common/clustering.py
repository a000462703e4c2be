"""Balanced clustering shared by the methods: exact equal-size assignment, balanced k-means.

Every method that splits neurons into experts of fixed sizes (CMoE, MoEfication,
the LLaMA-MoE clustering split, ExpertWeaver) solves the same problem: a linear
assignment whose columns repeat cluster j sizes[j] times (docs/methods.md §2).
"""

from __future__ import annotations

import numpy as np
import torch

from ...core.layout import Layout
from ...errors import InputError


def order_desc(values: np.ndarray) -> np.ndarray:
    """Indices by decreasing value, ties by increasing index (deterministic)."""
    return np.lexsort((np.arange(values.size), -values))


def activation_rates(marks: torch.Tensor, d_h: int) -> torch.Tensor:
    return torch.bincount(marks.reshape(-1), minlength=d_h).double() / marks.shape[0]


def balanced_assignment(cost: np.ndarray, sizes: list[int], solver: str = "auto") -> np.ndarray:
    """Assign each of n items to a cluster, cluster j receiving exactly sizes[j] items, minimising total cost.

    cost: [n, N] item-to-cluster costs with sum(sizes) == n. This is a linear assignment
    problem whose columns repeat cluster j sizes[j] times. solver="scipy" solves that n x n
    problem with scipy's Jonker-Volgenant linear_sum_assignment; solver="paths" solves the
    same problem exactly with the Hungarian method's row-by-row shortest augmenting paths,
    which with repeated columns only visit the N cluster nodes (O(n N^2) numpy work per
    row instead of an n x n search; 10-100x faster for the few-cluster case). "auto"
    picks "paths" for N <= 64. Both return an optimal assignment.
    """
    n, N = cost.shape
    if sum(sizes) != n or len(sizes) != N:
        raise InputError(f"balanced assignment: sizes {sizes} do not add up to {n} items in {N} clusters.")
    if solver == "auto":
        solver = "paths" if N <= 64 else "scipy"
    if solver == "scipy":
        from scipy.optimize import linear_sum_assignment

        col_cluster = np.repeat(np.arange(N), sizes)
        rows, cols = linear_sum_assignment(cost[:, col_cluster])
        out = np.empty(n, dtype=np.int64)
        out[rows] = col_cluster[cols]
        return out
    if solver != "paths":
        raise InputError(f"unknown assignment solver {solver!r}; use auto, paths or scipy.")
    return _assign_by_paths(np.asarray(cost, dtype=np.float64), np.asarray(sizes, dtype=np.int64))


def _assign_by_paths(C: np.ndarray, cap: np.ndarray) -> np.ndarray:
    n, N = C.shape
    assign = np.full(n, -1, dtype=np.int64)
    count = np.zeros(N, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(N)]
    tol = 1e-12 * (np.abs(C).max() + 1.0)
    W = np.full((N, N), np.inf)  # W[c, k]: cheapest move of a member of c to k (cached per cluster)
    arg = np.zeros((N, N), dtype=np.int64)
    dirty = set(range(N))
    for i in range(n):
        free = count < cap
        j = int(np.argmin(C[i]))
        if free[j]:  # the cheapest cluster has room: nothing to reroute
            assign[i] = j
            count[j] += 1
            members[j].append(i)
            dirty.add(j)
            continue
        # edge j -> k: move the member t of j with the smallest C[t, k] - C[t, j]
        for c in dirty:
            if members[c]:
                idx = np.asarray(members[c])
                D = C[idx] - C[idx, c][:, None]
                a = D.argmin(0)
                W[c] = D[a, np.arange(N)]
                W[c, c] = np.inf
                arg[c] = idx[a]
        dirty = set()
        dist = C[i].copy()
        pred = np.full(N, -1, dtype=np.int64)  # -1: entered directly by item i
        for _ in range(N):
            cand = dist[:, None] + W
            src = cand.argmin(0)
            best = cand[src, np.arange(N)]
            better = best < dist - tol
            if not better.any():
                break
            dist[better] = best[better]
            pred[better] = src[better]
        end = int(np.flatnonzero(free)[np.argmin(dist[free])])
        path = [end]
        while pred[path[-1]] >= 0:
            path.append(int(pred[path[-1]]))
        path.reverse()  # path[0] receives item i; one member moves along each edge
        moves = [(int(arg[a, b]), a, b) for a, b in zip(path, path[1:])]
        for t, a, b in moves:
            members[a].remove(t)
            members[b].append(t)
            assign[t] = b
        assign[i] = path[0]
        members[path[0]].append(i)
        count[end] += 1
        dirty.update(path)
    return assign


def balanced_kmeans(feats: torch.Tensor, sizes: list[int], init: np.ndarray, max_iters: int, solver: str = "auto") -> tuple[np.ndarray, torch.Tensor, int]:
    """Balanced k-means of the rows of feats [n, T] (one row per neuron, L2).

    Returns (assignment [n], centroids [N, T], iterations). init: indices of the N
    items whose rows are the initial centroids. Stops when no assignment changes.
    """
    feats = feats.float().contiguous()
    sq = (feats * feats).sum(1).double()  # |c_i|^2
    cent = feats[torch.as_tensor(init)].clone()
    size_t = torch.as_tensor(sizes, dtype=torch.float32)[:, None]
    assign = None
    it = 0
    for it in range(1, max_iters + 1):
        cost = sq[:, None] - 2.0 * (feats @ cent.T).double() + (cent * cent).sum(1).double()[None, :]
        new = balanced_assignment(cost.numpy(), sizes, solver)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        onehot = torch.zeros(len(sizes), feats.shape[0])
        onehot[torch.as_tensor(assign), torch.arange(feats.shape[0])] = 1.0
        cent = (onehot @ feats) / size_t
    return assign, cent, it


def seeded_init(n: int, k: int, seed: int, layer: int) -> np.ndarray:
    """k distinct item indices for initial centroids, reproducible per (seed, layer)."""
    return np.random.default_rng([seed, layer]).choice(n, size=k, replace=False)


def cluster_rows(rows: torch.Tensor, experts: int, seed: int, layer: int, max_iters: int) -> tuple[list[np.ndarray], int]:
    """Balanced k-means of neuron feature rows into `experts` groups of equal size (+-1); neuron ids per group."""
    n = rows.shape[0]
    _, sizes = Layout(0, 1, experts).sizes(n)
    assign, _, iters = balanced_kmeans(rows, sizes, seeded_init(n, experts, seed, layer), max_iters)
    return [np.flatnonzero(assign == j) for j in range(experts)], iters
