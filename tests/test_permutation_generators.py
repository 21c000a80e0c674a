"""The research generator kept with the benchmarks (benchmarks/permutation_generators.py)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from patchssl.permutations import PermutationSet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from permutation_generators import generate, generate_max_avg, k_best_assignments


def ref_dist(p, q) -> int:
    return sum(int(a) != int(b) for a, b in zip(p, q))


def test_max_avg_is_seeded_and_a_permutation_set():
    a = generate_max_avg(30, 9, seed=5)
    assert a == generate_max_avg(30, 9, seed=5) and a != generate_max_avg(30, 9, seed=6)
    assert a.method == "max_avg" and a.seed == 5 and a.permutations.shape == (30, 9)
    assert generate(30, 9, "max_avg", seed=5) == a
    assert generate(30, 9, "max_min", seed=5) == PermutationSet.generate(
        30, 9, method="max_min", seed=5
    )
    with pytest.raises(ValueError, match="only 3! = 6"):
        generate_max_avg(7, 3)


def test_max_avg_each_step_maximises_the_average_distance():
    # Exhaustive check against every permutation of 6 tiles (720): each new row is a
    # not-yet-chosen permutation with the largest summed distance to the rows before it.
    k, n = 200, 6
    rows = generate_max_avg(k, n, seed=1).numpy()
    everything = np.array(list(itertools.permutations(range(n))))
    for i in range(1, k):
        sums = (everything[:, None, :] != rows[None, :i, :]).sum(axis=(1, 2))
        taken = (everything[:, None, :] == rows[None, :i, :]).all(axis=2).any(axis=1)
        best = sums[~taken].max()
        assert sum(ref_dist(rows[i], r) for r in rows[:i]) == best, f"step {i}"


def test_max_avg_can_take_every_permutation():
    # K = N! forces the k-best (Murty) fallback many times.
    ps = generate_max_avg(24, 4, seed=0)
    assert sorted(map(tuple, ps.numpy().tolist())) == list(itertools.permutations(range(4)))


def test_k_best_assignments_in_order():
    rng = np.random.default_rng(0)
    cost = rng.random((4, 4))
    ranked = [tuple(c.tolist()) for c in k_best_assignments(cost)]
    brute = sorted(
        itertools.permutations(range(4)), key=lambda p: sum(cost[r, p[r]] for r in range(4))
    )
    assert ranked == brute


def test_max_avg_on_16_tiles():
    ps = generate_max_avg(200, 16, seed=0)
    assert ps.permutations.shape == (200, 16)
    assert ps.min_hamming() >= 2
    # Balanced position-by-tile counts give the largest possible mean; a random set is ~15.
    assert ps.mean_hamming() > 15.0
