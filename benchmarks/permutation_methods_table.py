"""What each PermutationSet.generate method (and max_avg) gives: min/mean Hamming distance, time.

Prints a Markdown table; with ``--write docs/permutations.md`` it also replaces the text
between the ``<!-- table:start -->`` and ``<!-- table:end -->`` markers of that page.

Usage:
    python benchmarks/permutation_methods_table.py [--write docs/permutations.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
from permutation_generators import generate

from patchssl.permutations import PermutationSet

START, END = "<!-- table:start -->", "<!-- table:end -->"

CASES = [
    (1000, 9, ["auto", "projective", "max_avg", "max_min"]),
    (100, 16, ["auto", "max_avg", "max_min"]),
    (1000, 16, ["auto", "max_avg", "max_min"]),
]


def machine() -> str:
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}"
    )


def build_table(seed: int = 0) -> str:
    # Warm the caches (N! enumeration, projective group) so that times are of generation only.
    PermutationSet.generate(10, 9, method="max_min", seed=seed)
    PermutationSet.generate(600, 9, method="projective", seed=seed)
    lines = [
        "| method | K | N | min Hamming | mean Hamming | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, n, methods in CASES:
        for method in methods:
            start = time.perf_counter()
            ps = generate(k, n, method=method, seed=seed)
            seconds = time.perf_counter() - start
            name = method if method != "auto" else f"auto (= {ps.method})"
            lines.append(
                f"| {name} | {k} | {n} | {ps.min_hamming()} | {ps.mean_hamming():.3f} | "
                f"{seconds:.3f} |"
            )
            print(lines[-1], flush=True)
    command = "python benchmarks/permutation_methods_table.py --write docs/permutations.md"
    lines += [
        "",
        f"Seed {seed}; one run each. Machine: {machine()}. Produced by `{command}`.",
    ]
    return "\n".join(lines)


def write_into(path: Path, table: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: markers {START} and {END} not found")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), flags=re.S)
    path.write_text(pattern.sub(lambda _m: f"{START}\n{table}\n{END}", text, count=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="Markdown page to update between markers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = build_table(args.seed)
    print()
    print(table)
    if args.write is not None:
        write_into(args.write, table)
        print(f"\nwrote the table into {args.write}")


if __name__ == "__main__":
    main()
