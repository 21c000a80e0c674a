"""Two settings of one transfer-benchmark row, paired on the same test images.

``bench_transfer.py`` pairs its rows (``+ SSL + AL`` against ``+ AL``...) within one setting.
This script pairs one row under two settings (another classifier head, attention or input
normalisation; another pretraining), on the same data, label budgets, seeds and test patients:
the paired AUC difference and, for an attention row, the paired difference of top-patch
lesion hits, each with a patient-bootstrap 95% interval; ``--row probe`` pairs the linear
probes of two pretrainings. Runs come from the benchmark's cache
(keyed on their settings); what is missing is trained first. Options after ``--`` are shared
by both settings; ``--a`` and ``--b`` add each one's own::

    python benchmarks/compare_transfer.py --row al \\
        --a "--attention softmax --set model.head=pooled" \\
        --b "--attention sigmoid --set model.head=concat" \\
        -- --input-norm encoder --budgets 8 16 32 64 128 --seeds 0 1 2 --threads 1

References:
    Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018.
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 17(3), 2021.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchssl.probe import pool_patch_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer as bt


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the benchmark options shared by both settings."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shared: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, shared = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--row",
        required=True,
        choices=[*sorted(bt.ROWS), "probe"],
        help="the row compared (probe: the linear probe of each setting's pretraining)",
    )
    p.add_argument("--a", default="", help="bench_transfer options of setting A")
    p.add_argument("--b", default="", help="bench_transfer options of setting B")
    p.add_argument("--name-a", default="A", help="name of setting A in the tables")
    p.add_argument("--name-b", default="B", help="name of setting B in the tables")
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p.parse_args(argv), shared


def hit_differences(
    weights: dict[tuple[str, int, int], np.ndarray],
    names: tuple[str, str],
    data: Any,
    boxes: np.ndarray,
    budgets: Sequence[int],
    seeds: Sequence[int],
    n_boot: int,
) -> list[dict[str, Any]]:
    """Top-patch lesion hits of ``names[0]`` minus ``names[1]``, paired per image, by budget.

    Over seeds the per-resample differences are averaged (as ``bench_transfer.paired_table``
    does for the AUC); the interval is the 2.5-97.5 percentile of that average.
    """
    a, b = names
    out = []
    for budget in budgets:
        rates: dict[str, list[float]] = {a: [], b: []}
        boots = []
        for seed in seeds:
            hits = {}
            for name in names:
                res = bt.top_patch_hits(weights[(name, budget, seed)], data, boxes)
                hits[name] = res["per_image"]["hit"]
                rates[name].append(res["hit_rate"])
            mult = bt.patient_multiplicities(res["patients"], n_boot)
            boots.append((mult @ (hits[a] - hits[b])) / mult.sum(axis=1))
        lo, hi = np.percentile(np.mean(boots, axis=0), [2.5, 97.5])
        out.append(
            {
                "budget": budget,
                "pair": f"{a} - {b}",
                f"hit_{a}": float(np.mean(rates[a])),
                f"hit_{b}": float(np.mean(rates[b])),
                "diff": float(np.mean(rates[a]) - np.mean(rates[b])),
                "ci_low": float(lo),
                "ci_high": float(hi),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (or read from the cache) both settings' runs; print and return the comparison."""
    import torch

    args, shared = parse_args(argv)
    names = (args.name_a, args.name_b)
    parser = bt.build_parser()
    settings = [
        bt.settings_from(parser.parse_args([*shared, *shlex.split(extra)]))
        for extra in (args.a, args.b)
    ]
    ns = parser.parse_args(shared)
    for field in ("budgets", "seeds", "n_boot", "image_size", "patch_size", "test_patients"):
        if getattr(settings[0], field) != getattr(settings[1], field):
            raise SystemExit(f"both settings must share {field}: put it after '--'")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cache = Path(ns.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = [bt.make_data(s, cache) for s in settings]
    if data[0].root != data[1].root:
        raise SystemExit("both settings must draw the same data: put its options after '--'")
    s0 = settings[0]
    scores: dict[tuple[str, int, int], np.ndarray] = {}
    weights: dict[tuple[str, int, int], np.ndarray] = {}
    ssl, attention = bt.ROWS.get(args.row, (True, False))
    for name, s in zip(names, settings, strict=True):
        checkpoint = bt.pretrain_checkpoint(s, data[0], cache, ns.threads) if ssl else None
        if args.row == "probe":  # the frozen features of each pretraining, probed alike
            patches = bt.probe_features(s, data[0], checkpoint, cache, ns.threads)
            feats = pool_patch_features(patches, s.probe_pool)
            for budget in s0.budgets:
                for seed in s0.seeds:
                    scores[(name, budget, seed)] = bt.linear_probe(feats, data[0], budget, seed)
            continue
        for budget in s0.budgets:
            for seed in s0.seeds:
                bt._say(f"{name}: row {args.row}, budget {budget}, seed {seed}")
                res = bt.run_row(s, data[0], args.row, budget, seed, checkpoint, cache, ns.threads)
                scores[(name, budget, seed)] = res["probs"]
                weights[(name, budget, seed)] = res["weights"]
    recs = [data[0].records[i] for i in data[0].test_index]
    labels = np.array([r.label for r in recs])
    groups = np.array([r.patient for r in recs])
    aucs, diffs = bt.paired_table(
        scores, labels, groups, names, [names], s0.budgets, s0.seeds, s0.n_boot
    )
    payload: dict[str, Any] = {
        "command": "python benchmarks/compare_transfer.py "
        + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "row": args.row,
        "settings": {names[0]: args.a, names[1]: args.b, "shared": shlex.join(shared)},
        "test_images": len(recs),
        "auc": aucs,
        "diffs": diffs,
    }
    lines = ["| budget | setting | AUC [95% CI] |", "|---:|---|---|"]
    lines += [
        f"| {r['budget']} | {r['row']} | {r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |"
        for r in aucs
    ]
    lines += ["", "| budget | AUC difference | 95% CI |", "|---:|---|---|"]
    lines += [
        f"| {d['budget']} | {d['pair']} {d['diff']:+.3f} | "
        f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |"
        for d in diffs
    ]
    if attention:
        from patchssl.engine.common import build_tiler

        boxes = build_tiler(bt.base_config(s0, data[0], ns.threads)).centre_boxes().numpy()
        boxes = boxes.reshape(-1, 4)
        payload["localisation"] = bt.localisation(weights, data[0], boxes, s0.n_boot)
        payload["hit_diffs"] = hit_differences(
            weights, names, data[0], boxes, s0.budgets, s0.seeds, s0.n_boot
        )
        lines += ["", "| budget | setting | top patch | middle patch | top - middle [95% CI] |"]
        lines += ["|---:|---|---:|---:|---|"]
        lines += [
            f"| {r['budget']} | {r['row']} | {r['top_patch_hit']:.3f} | "
            f"{r['middle_patch_hit']:.3f} | {r['diff_vs_middle']:+.3f} "
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] |"
            for r in payload["localisation"]
        ]
        lines += ["", "| budget | top-patch hits, difference | 95% CI |", "|---:|---|---|"]
        lines += [
            f"| {d['budget']} | {d['pair']} {d['diff']:+.3f} | "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |"
            for d in payload["hit_diffs"]
        ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return payload


if __name__ == "__main__":
    main()
