"""Speed of PermutationSet.generate against the published max-Hamming algorithm, in one run.

The reference below is the algorithm of Noroozi & Favaro (2016) as it is usually implemented:
enumerate all N! permutations, and at every greedy step recompute the Hamming distance from
every chosen permutation to every candidate, average over the chosen set and take the argmax.
It is written here (not imported) so that the comparison runs anywhere. ``max_avg``
(``permutation_generators.py``, next to this script) applies the same criterion as a linear
assignment problem per step.

Usage:
    python benchmarks/bench_permutations.py           # reference at K = 100 (about 10 s)
    python benchmarks/bench_permutations.py --quick   # reference at K = 30, fewer repeats
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time

import numpy as np
import scipy
import torch
from permutation_generators import generate, generate_max_avg
from scipy.spatial.distance import cdist

from patchssl.permutations import PermutationSet


def reference_max_hamming(num_permutations: int, num_tiles: int = 9, seed: int = 0) -> np.ndarray:
    """The slow published algorithm: full distance recomputation over all N! at every step."""
    everything = np.array(list(itertools.permutations(range(num_tiles))), dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(everything)))]
    for _ in range(1, num_permutations):
        # (N!, |S|) distances, recomputed from scratch each step, then the mean per candidate.
        dist = cdist(everything, everything[chosen], metric="hamming")
        score = dist.mean(axis=1)
        score[chosen] = -1.0
        chosen.append(int(np.argmax(score)))
    return everything[chosen]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine() -> str:
    return (
        f"{platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs | Python {platform.python_version()} | torch {torch.__version__}"
        f" | numpy {np.__version__} | scipy {scipy.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter run (reference at K=30)")
    args = parser.parse_args()
    k_ref = 30 if args.quick else 100
    repeats = 3 if args.quick else 7
    print(f"machine: {machine()}")
    print()

    # Warm caches (the N! enumeration, the projective group) so that timings are steady.
    PermutationSet.generate(10, 9, method="max_min", seed=0)
    PermutationSet.generate(600, 9, method="projective", seed=0)

    print(f"## max_avg against the published reference, K = {k_ref}, N = 9")
    t_ref, ref_rows = timed(lambda: reference_max_hamming(k_ref), 1)
    t_fast, fast = timed(lambda: generate_max_avg(k_ref, 9), repeats)
    ref = PermutationSet(ref_rows)
    print(f"reference (all 9! candidates, full recompute): {t_ref:8.3f} s")
    print(f"max_avg (assignment per step):                 {t_fast:8.4f} s")
    ratio = t_ref / t_fast
    verdict = "PASS" if ratio >= 100 else "FAIL"
    print(f"speed-up: {ratio:,.0f}x  [{verdict}: target >= 100x]")
    print(
        f"same criterion: reference mean/min Hamming {ref.mean_hamming():.4f}/{ref.min_hamming()}"
        f", max_avg {fast.mean_hamming():.4f}/{fast.min_hamming()}"
    )
    print()

    print("## 1000 x 9, every method (median of repeats)")
    print(f"| {'method':<10} | {'seconds':>8} | min | {'mean':>6} | target |")
    print(f"|{'-' * 12}|{'-' * 10}|-----|{'-' * 8}|--------|")
    for method in ("auto", "projective", "max_avg", "max_min"):
        reps = 1 if method == "max_min" else repeats
        seconds, ps = timed(lambda m=method: generate(1000, 9, method=m), reps)
        target = "< 1 s " if method in ("auto", "projective", "max_avg") else "-     "
        ok = "" if target.startswith("-") else (" ok" if seconds < 1.0 else " SLOW")
        print(
            f"| {method:<10} | {seconds:8.3f} | {ps.min_hamming():>3} | {ps.mean_hamming():6.3f} "
            f"| {target}|{ok}"
        )
    print()

    print("## statistics of existing sets")
    for label, fn in [
        ("min_hamming(), 2000 x 9", lambda: generate_max_avg(2000, 9)),
    ]:
        ps = fn()
        seconds, _ = timed(lambda ps=ps: PermutationSet(ps.numpy()).min_hamming(), repeats)
        print(f"{label}: {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
