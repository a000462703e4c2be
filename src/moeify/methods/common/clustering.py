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


def balanced_assignment(cost: np.ndarray, sizes: list[int], solver: str = "auto", start: np.ndarray | None = None) -> np.ndarray:
    """Assign each of n items to a cluster, cluster j receiving exactly sizes[j] items, minimising total cost.

    cost: [n, N] item-to-cluster costs with sum(sizes) == n. This is a linear assignment
    problem whose columns repeat cluster j sizes[j] times. solver="scipy" solves that n x n
    problem with scipy's Jonker-Volgenant linear_sum_assignment. solver="paths" finds the
    same optimum on the graph of the N clusters (a transportation problem): from a feasible
    start, negative cycles of member moves between clusters are cancelled until none is left,
    which is this problem's optimality condition (O(n N) numpy work per step instead of an
    n x n search). "auto" picks "paths" for N <= 64. Both return an optimal assignment (the
    same one whenever the optimum is unique, as it is for generic costs).

    start: the feasible assignment "paths" starts from (balanced k-means passes the previous
    iteration's: few items change cluster, so a few steps finish it); without one (or with
    one whose cluster sizes differ from sizes) a greedy one by regret.
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
    C = np.asarray(cost, dtype=np.float64)
    cap = np.asarray(sizes, dtype=np.int64)
    feasible = start is not None and np.array_equal(np.bincount(start, minlength=N), cap)
    return _cancel_cycles(C, np.array(start, dtype=np.int64) if feasible else _greedy(C, cap))


def _greedy(C: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """A feasible start: items by decreasing regret (second-cheapest minus cheapest cost), each to its cheapest cluster with room."""
    n, N = C.shape
    out = np.empty(n, dtype=np.int64)
    room = np.array(cap, dtype=np.int64)
    pref = np.argsort(C, axis=1, kind="stable")
    two = np.take_along_axis(C, pref[:, :2], axis=1) if N > 1 else np.zeros((n, 2))
    for i in np.argsort(two[:, 0] - two[:, 1], kind="stable").tolist():
        for j in pref[i].tolist():
            if room[j]:
                out[i] = j
                room[j] -= 1
                break
    return out


def _cancel_cycles(C: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Improve a feasible assignment to an optimal one (in place; cluster sizes stay the same).

    In the graph of clusters whose edge c -> k costs the cheapest move of a member of c to k,
    every negative cycle is an improvement. Two-cluster cycles are taken whole: the m members of c
    that gain most by moving to k swap with the m members of k that gain most by moving to c, for
    the largest m whose ranked pairs still lower the cost (for up to 16 clusters, disjoint pairs at
    once); a longer negative cycle moves one member along each edge. No negative cycle left = optimal.
    """
    n, N = C.shape
    tol = 1e-12 * (np.abs(C).max() + 1.0)  # cost changes below this are ties (float noise), not improvements
    rows, cols = np.arange(n), np.arange(N)
    while True:  # every step lowers the total cost by more than tol, so this ends
        D = C - C[rows, assign][:, None]  # cost change of moving item t to cluster k
        members = [np.flatnonzero(assign == c) for c in range(N)]
        W = np.full((N, N), np.inf)
        arg = np.zeros((N, N), dtype=np.int64)
        for c, idx in enumerate(members):
            if idx.size:
                a = D[idx].argmin(0)
                W[c], arg[c] = D[idx[a], cols], idx[a]
        np.fill_diagonal(W, np.inf)
        if N <= 16:
            pairs = np.argwhere(np.triu(W + W.T < -tol, 1))
            if pairs.size:
                busy = np.zeros(N, dtype=bool)
                for c, k in pairs.tolist():
                    if not (busy[c] or busy[k]):
                        _exchange(D, assign, members[c], members[k], c, k, tol)
                        busy[[c, k]] = True
                continue
        cycle = _negative_cycle(W, tol)
        if cycle is None:
            return assign
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            assign[arg[a, b]] = b


def _exchange(D: np.ndarray, assign: np.ndarray, ic: np.ndarray, ik: np.ndarray, c: int, k: int, tol: float) -> None:
    """The best exchange between clusters c and k (members ic, ik; D: each item's cost change per cluster)."""
    a, b = D[ic, k], D[ik, c]
    m = min(ic.size, ik.size)
    oa, ob = np.argsort(a, kind="stable")[:m], np.argsort(b, kind="stable")[:m]
    swaps = int(np.count_nonzero(a[oa] + b[ob] < -tol))  # ranked pair sums only grow: a prefix improves
    assign[ic[oa[:swaps]]], assign[ik[ob[:swaps]]] = k, c


def _negative_cycle(W: np.ndarray, tol: float) -> list[int] | None:
    """A cycle of clusters with total edge cost below -tol (Bellman-Ford from every node at once), or None."""
    N = W.shape[0]
    dist = np.zeros(N)
    pred = np.full(N, -1, dtype=np.int64)
    cols = np.arange(N)
    for _ in range(N):
        cand = dist[:, None] + W
        src = cand.argmin(0)
        best = cand[src, cols]
        better = best < dist - tol
        if not better.any():
            return None
        dist[better] = best[better]
        pred[better] = src[better]
    v = int(np.flatnonzero(better)[0])
    for _ in range(N):  # N steps back along the predecessors land on a cycle
        v = int(pred[v])
    cycle, u = [v], int(pred[v])
    while u != v:
        cycle.append(u)
        u = int(pred[u])
    cycle.reverse()  # cycle[i] -> cycle[i + 1]: pred[x] is the node before x
    weight = sum(W[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1]))
    return cycle if weight < -tol else None


def balanced_kmeans(feats: torch.Tensor, sizes: list[int], init: np.ndarray, max_iters: int, solver: str = "auto") -> tuple[np.ndarray, torch.Tensor, int]:
    """Balanced k-means of the rows of feats [n, T] (one row per neuron, L2).

    Returns (assignment [n], centroids [N, T], iterations). init: indices of the N
    items whose rows are the initial centroids. Stops when no assignment changes.
    """
    feats = feats.float().contiguous()
    cent = feats[torch.as_tensor(init)].clone()
    size_t = torch.as_tensor(sizes, dtype=torch.float32)[:, None]
    assign, sums = None, None
    moved_rows = feats.new_empty(0, feats.shape[1])  # grown to the most items that moved in one iteration
    it = 0
    for it in range(1, max_iters + 1):
        # |f_i - c_j|^2 without |f_i|^2: the same for every cluster of item i, so it cannot change the assignment
        cost = (cent * cent).sum(1).double()[None, :] - 2.0 * (feats @ cent.T).double()
        new = balanced_assignment(cost.numpy(), sizes, solver, start=assign)
        if assign is None:
            sums = feats.new_zeros(len(sizes), feats.shape[1]).index_add_(0, torch.as_tensor(new), feats)
        else:
            moved = np.flatnonzero(new != assign)
            if moved.size == 0:
                break
            # cluster sums follow the items that moved (few after the first iterations); their rows go through one
            # reused buffer (fresh ones would be fresh pages on every iteration where large blocks are mapped anew)
            if moved_rows.shape[0] < moved.size:
                moved_rows = feats.new_empty(moved.size, feats.shape[1])
            rows = torch.index_select(feats, 0, torch.as_tensor(moved), out=moved_rows[: moved.size])
            sums.index_add_(0, torch.as_tensor(new[moved]), rows).index_add_(0, torch.as_tensor(assign[moved]), rows, alpha=-1.0)
        assign = new
        cent = sums / size_t
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
