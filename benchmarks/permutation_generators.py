"""Research permutation generators, kept next to the benchmarks that compare them.

The library's :meth:`patchssl.permutations.PermutationSet.generate` offers the methods that
its default set and its documented usage need (``"auto"``, ``"max_min"``, ``"projective"``).
This module keeps Noroozi & Favaro's max-average greedy (``"max_avg"``), whose minimum distance
is low (2 for 1000 x 9), for the comparisons in ``bench_permutations.py`` and
``permutation_methods_table.py`` and for anyone reproducing the original selection:

    import sys; sys.path.insert(0, "benchmarks")
    from permutation_generators import generate_max_avg
    perms = generate_max_avg(1000, 9, seed=0)  # a PermutationSet, method "max_avg"

The greedy: each step adds the permutation with the largest average Hamming distance to the
chosen set. The sum of distances from ``p`` to a set ``S`` is ``|S| N - sum_k c[k, p(k)]``
with ``c`` the position-by-tile count matrix of ``S``, so each step is a linear assignment
problem on ``c`` (:func:`scipy.optimize.linear_sum_assignment`); when its optimum is already
in the set, the next-best assignments are ranked with Murty's algorithm until an unused one
appears. Exact for any N; 1000 x 9 in well under a second.

References:
    M. Noroozi and P. Favaro, "Unsupervised Learning of Visual Representations by Solving
    Jigsaw Puzzles", ECCV 2016, arXiv:1603.09246.

    K. G. Murty, "An Algorithm for Ranking all the Assignments in Order of Increasing Cost",
    Operations Research 16(3), 1968.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment

from patchssl._validation import check_int
from patchssl.permutations import PermutationSet

__all__ = ["generate", "generate_max_avg", "k_best_assignments", "max_avg_rows"]


def generate_max_avg(num_permutations: int, num_tiles: int = 9, seed: int = 0) -> PermutationSet:
    """Noroozi & Favaro's max-average greedy, seeded; the rows of shape (K, N) in a set.

    The same rows as ``PermutationSet.generate(K, N, method="max_avg", seed=seed)`` gave when
    the method was part of the library.
    """
    k = check_int(num_permutations, "num_permutations")
    n = check_int(num_tiles, "num_tiles", minimum=2)
    seed = check_int(seed, "seed", minimum=0)
    if k > math.factorial(n):
        raise ValueError(
            f"cannot choose {k} distinct permutations of {n} tiles: there are only "
            f"{n}! = {math.factorial(n)}"
        )
    rows = max_avg_rows(k, n, np.random.default_rng(seed))
    return PermutationSet(rows, method="max_avg", seed=seed)


def generate(num_permutations: int, num_tiles: int, method: str, seed: int = 0) -> PermutationSet:
    """``PermutationSet.generate``, plus ``method="max_avg"`` (for the benchmark scripts)."""
    if method == "max_avg":
        return generate_max_avg(num_permutations, num_tiles, seed)
    return PermutationSet.generate(num_permutations, num_tiles, method=method, seed=seed)


def k_best_assignments(cost: np.ndarray) -> Iterator[np.ndarray]:
    """Assignments of a square cost matrix in order of increasing total cost (Murty 1968).

    Yields ``cols`` with ``cols[r]`` the column assigned to row ``r``. Each solved node is
    split into disjoint subproblems: for the i-th row of its free rows, keep the node's
    choice for the earlier free rows (forced) and forbid its choice for row i (excluded).
    """
    n = cost.shape[0]

    def solve(forced: tuple[tuple[int, int], ...], excluded: tuple[tuple[int, int], ...]):
        c = cost.copy()
        for r, col in excluded:
            c[r, col] = np.inf
        for r, col in forced:
            keep = c[r, col]
            c[r, :] = np.inf
            c[:, col] = np.inf
            c[r, col] = keep
        try:
            rows, cols = linear_sum_assignment(c)
        except ValueError:  # infeasible: no assignment avoids the excluded cells
            return None
        total = float(c[rows, cols].sum())
        return None if not np.isfinite(total) else (total, cols)

    counter = itertools.count()
    root = solve((), ())
    heap = [(root[0], next(counter), root[1], (), ())] if root else []
    while heap:
        _, _, cols, forced, excluded = heapq.heappop(heap)
        yield cols
        forced_rows = {r for r, _ in forced}
        free = [r for r in range(n) if r not in forced_rows]
        fixed = list(forced)
        for r in free[:-1]:  # the last free row is determined by the others
            child_excluded = (*excluded, (r, int(cols[r])))
            child = solve(tuple(fixed), child_excluded)
            if child is not None:
                heapq.heappush(
                    heap, (child[0], next(counter), child[1], tuple(fixed), child_excluded)
                )
            fixed.append((r, int(cols[r])))


def max_avg_rows(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy max-average-distance selection, one assignment problem per step; (k, n)."""
    chosen = np.empty((k, n), dtype=np.int64)
    seen: set[bytes] = set()
    counts = np.zeros((n, n), dtype=np.float64)
    positions = np.arange(n)
    first = rng.permutation(n)
    chosen[0] = first
    seen.add(first.tobytes())
    counts[positions, first] += 1
    # Tie-breaking noise: the sum of n entries stays below 0.5, so it orders assignments of
    # equal integer cost without ever overturning a strictly better one.
    scale = 0.5 / n
    for i in range(1, k):
        cost = counts + rng.random((n, n)) * scale
        _, cols = linear_sum_assignment(cost)
        cols = cols.astype(np.int64)
        if cols.tobytes() in seen:
            # The optimum is taken: walk down the ranked assignments to the best unseen one.
            for cols in k_best_assignments(cost):
                cols = cols.astype(np.int64)
                if cols.tobytes() not in seen:
                    break
        chosen[i] = cols
        seen.add(cols.tobytes())
        counts[positions, cols] += 1
    return chosen
