"""The ablation of Chae et al. (JIPS 2021, Table 2) on any dataset, with optional k-fold CV.

For every backbone (default: ResNet50 and VGG16) it trains and evaluates four variants on one
shared, patient-grouped split:

* (a) ``BACKBONE``: from scratch, no attention;
* (b) ``BACKBONE + SSL``: from the jigsaw-pretrained encoder, no attention;
* (c) ``BACKBONE + AL``: from scratch, sigmoid attention;
* (d) ``BACKBONE + SSL + AL``: from the jigsaw-pretrained encoder, sigmoid attention (the paper's
  method);
* with ``--imagenet [WEIGHTS]``, (e) ``BACKBONE + ImageNet + AL``: from timm's ImageNet weights
  (or a local weights file), sigmoid attention, no jigsaw.

The jigsaw task is pretrained once per backbone and the checkpoint is reused by (b) and (d). The
split is drawn once and saved (``split.json``; ``split_fold{k}.json`` with ``--folds``), so every
row sees the same images. Each row's decision threshold is chosen on the validation part and
applied unchanged to the test part. The table (Markdown, CSV, JSON) gives accuracy, specificity,
sensitivity and precision (the paper's four), F1 and AUC with 95% bootstrap intervals that
resample patients, and the counts behind them (test images, positives, negatives,
TP/FP/TN/FN). With ``--folds K`` every row is trained K times, once per fold, and the table gives
each metric's mean, standard deviation, minimum and maximum across folds.

Examples::

    # the synthetic cervix-like benchmark, small enough for a CPU
    python examples/cervix/ablation.py --synthetic --quick --out runs/ablation-synthetic

    # your data (a folder with unlabeled/ and labeled.csv), the paper's setup, 5 folds
    python examples/cervix/ablation.py --data /data/cervix \\
        --config examples/cervix/configs/paper.yaml --folds 5 --out runs/ablation

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." Journal of Information Processing Systems 17(3), 2021.

    Noroozi, Favaro. "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles." ECCV 2016, arXiv:1603.09246.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "QUICK",
    "AblationRow",
    "RowResult",
    "aggregate_folds",
    "apply_budget",
    "build_parser",
    "main",
    "make_rows",
    "run_ablation",
]

#: Settings of ``--quick``: the synthetic benchmark at a size that trains ResNet50 and VGG16
#: (patches of 32 px, the smallest they accept) in about 25 CPU-minutes together (38 minutes of
#: wall time on a busy, shared 2-core machine; see docs/cervix.md).
QUICK: dict[str, Any] = {
    "image_size": 112,
    "patch_size": 32,
    "num_permutations": 64,
    "pretrain_epochs": 2,
    "epochs": 5,
    "batch_size": 8,
    "num_unlabeled": 96,
    "num_patients": 90,
    "images_per_patient": 2,
    "label_budget": 12,
    "n_boot": 1000,
}

#: Metrics of the table, in the paper's order, then ours.
METRICS: tuple[str, ...] = ("accuracy", "specificity", "sensitivity", "precision", "f1", "auc")
_TITLES = {
    "accuracy": "Accuracy",
    "specificity": "Specificity",
    "sensitivity": "Sensitivity",
    "precision": "Precision",
    "f1": "F1",
    "auc": "AUC",
}


@dataclass(frozen=True)
class AblationRow:
    """One variant of the ablation.

    Attributes:
        backbone: timm name of the patch encoder.
        ssl: Start from the jigsaw-pretrained encoder (otherwise from scratch).
        attention: Use the paper's sigmoid patch attention (otherwise none).
        imagenet: Start from ImageNet weights (``model.pretrained``) instead of random ones.
    """

    backbone: str
    ssl: bool
    attention: bool
    imagenet: bool = False

    @property
    def name(self) -> str:
        """Row name in the paper's style, e.g. ``resnet50 + SSL + AL``."""
        return (
            self.backbone
            + (" + ImageNet" if self.imagenet else "")
            + (" + SSL" if self.ssl else "")
            + (" + AL" if self.attention else "")
        )

    @property
    def folder(self) -> str:
        """Run folder name, e.g. ``resnet50_ssl_al``."""
        start = "_imagenet" if self.imagenet else ("_ssl" if self.ssl else "_scratch")
        return self.backbone.replace("/", "_") + start + ("_al" if self.attention else "_noal")


def make_rows(backbones: Sequence[str], *, imagenet: bool = False) -> list[AblationRow]:
    """The four variants (a)-(d) of each backbone, in Table 2's order.

    Args:
        backbones: timm names, e.g. ``["resnet50", "vgg16"]``.
        imagenet: Add a fifth row per backbone: ImageNet weights and attention, no jigsaw
            (the usual transfer baseline, when the weights are available).

    Returns:
        ``4 * len(backbones)`` rows (5 with ``imagenet``).
    """
    variants = [(False, False), (True, False), (False, True), (True, True)]
    rows = []
    for b in backbones:
        rows += [AblationRow(b, ssl, att) for ssl, att in variants]
        if imagenet:
            rows.append(AblationRow(b, ssl=False, attention=True, imagenet=True))
    return rows


@dataclass
class RowResult:
    """What one row measured on one split.

    Attributes:
        row: The variant.
        fold: Fold index (0 without cross-validation).
        report: :class:`patchssl.metrics.EvaluationReport` of the test part.
        threshold: Decision threshold chosen on the validation part.
        best_epoch: Epoch (1-based) of the checkpoint that was evaluated.
        seconds: Wall time of fine-tuning and evaluation.
        out_dir: Run folder.
    """

    row: AblationRow
    fold: int
    report: Any
    threshold: float
    best_epoch: int | None
    seconds: float
    out_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- splits
def _patient_labels(records: Sequence[Any]) -> dict[str, int]:
    """Label of each patient: the highest of its images' labels (CIN2+ if any image is)."""
    labels: dict[str, int] = {}
    for r in records:
        labels[str(r.patient)] = max(labels.get(str(r.patient), 0), int(r.label))
    return labels


def apply_budget(records: Sequence[Any], budget: int | None, seed: int) -> list[Any]:
    """Keep the images of ``budget`` training patients, stratified by label.

    The share of positive patients is kept (rounded, at least one patient of each class
    present), and the choice is seeded.

    Args:
        records: Training records (with ``patient`` and ``label``).
        budget: Number of patients to keep, or ``None`` for all.
        seed: Seed of the choice.

    Returns:
        The kept records, in their original order.

    Raises:
        ValueError: When ``budget`` is below 2 (one patient of each class is needed).
    """
    patients = _patient_labels(records)
    if budget is None or budget >= len(patients):
        return list(records)
    if budget < 2:
        raise ValueError(
            f"--label-budget must be at least 2 patients (one per class); got {budget}"
        )
    by_class: dict[int, list[str]] = {}
    for pid in sorted(patients):
        by_class.setdefault(patients[pid], []).append(pid)
    rng = np.random.default_rng([seed, 17])
    total = len(patients)
    quota = {c: max(1, round(budget * len(p) / total)) for c, p in by_class.items()}
    while sum(quota.values()) > budget:  # rounding up both classes can overshoot by one
        largest = max(quota, key=lambda c: quota[c])
        quota[largest] -= 1
    while sum(quota.values()) < budget:
        spare = [c for c in quota if quota[c] < len(by_class[c])]
        quota[max(spare, key=lambda c: len(by_class[c]) - quota[c])] += 1
    keep: set[str] = set()
    for c, pids in by_class.items():
        chosen = rng.choice(len(pids), size=min(quota[c], len(pids)), replace=False)
        keep.update(pids[i] for i in chosen)
    return [r for r in records if str(r.patient) in keep]


def _describe(parts: dict[str, list[Any]]) -> dict[str, dict[str, int]]:
    return {
        k: {
            "images": len(v),
            "positive_images": int(sum(r.label for r in v)),
            "patients": len({r.patient for r in v}),
        }
        for k, v in parts.items()
    }


def make_splits(
    config: Any,
    records: list[Any],
    out: Path,
    *,
    folds: int,
    budget: int | None,
    seed: int,
) -> list[Path]:
    """Draw the split (or the K cross-validation splits) once and save them.

    Without folds: train / val / test grouped by patient and stratified by label
    (``data.test_size``, ``data.val_size``). With ``folds = K``: each patient-grouped,
    label-stratified fold in turn is the test part, and a validation part
    (``data.val_size``) is carved out of the other folds. Then the training part is cut to
    ``budget`` patients.

    Args:
        config: The run configuration.
        records: Labeled manifest records.
        out: Output folder.
        folds: Number of folds (0 or 1 for a single split).
        budget: Training patients to keep, or ``None``.
        seed: Seed of the split and of the budget.

    Returns:
        The saved ``split*.json`` paths, one per fold.
    """
    from patchssl.data import (
        grouped_kfold,
        grouped_stratified_split,
        save_split,
        split_records,
    )

    d = config.data
    labels = np.array([r.label for r in records])
    groups = [str(r.patient) for r in records]
    layouts: list[dict[str, list[Any]]] = []
    if folds and folds > 1:
        for train_idx, test_idx in grouped_kfold(labels, groups, n_splits=folds, seed=seed):
            sub_tr, sub_val = grouped_stratified_split(
                labels[train_idx],
                [groups[i] for i in train_idx],
                test_size=d.val_size,
                seed=seed + 1,
            )
            layouts.append(
                {
                    "train": [records[train_idx[i]] for i in sub_tr],
                    "val": [records[train_idx[i]] for i in sub_val],
                    "test": [records[i] for i in test_idx],
                }
            )
    else:
        layouts.append(
            split_records(
                records,
                test_size=d.test_size,
                val_size=d.val_size * (1.0 - d.test_size),
                seed=seed,
            )
        )
    paths = []
    for k, parts in enumerate(layouts):
        before = len({r.patient for r in parts["train"]})
        parts["train"] = apply_budget(parts["train"], budget, seed + k)
        name = f"split_fold{k}.json" if len(layouts) > 1 else "split.json"
        meta = {
            "manifest": str(d.manifest),
            "seed": seed,
            "fold": k,
            "folds": len(layouts),
            "label_budget_patients": budget,
            "train_patients_before_budget": before,
            "parts": _describe(parts),
        }
        paths.append(save_split(out / name, parts, meta=meta))
        counts = ", ".join(
            f"{p} {v['images']} images ({v['positive_images']} positive, {v['patients']} patients)"
            for p, v in meta["parts"].items()
        )
        _say(f"{name}: {counts}")
    return paths


# ---------------------------------------------------------------------------------- runs
def _say(message: str) -> None:
    print(f"[ablation] {message}", flush=True)


def _pretrain(config: Any, backbone: str, out: Path, epochs: int) -> Path:
    from patchssl.engine import pretrain

    cfg = config.copy()
    cfg.out = str(out / f"pretrain_{backbone.replace('/', '_')}")
    cfg.model.backbone = backbone
    cfg.model.init = None
    cfg.train.epochs = epochs
    cfg.train.class_weights = "none"
    result = pretrain(cfg)
    return Path(result.best_checkpoint)


def _run_row(
    config: Any,
    row: AblationRow,
    split: Path,
    checkpoint: Path | None,
    out: Path,
    fold: int,
    imagenet_weights: bool | str = True,
) -> RowResult:
    from patchssl.engine import evaluate, finetune

    start = time.perf_counter()
    cfg = config.copy()
    cfg.out = str(out)
    cfg.model.backbone = row.backbone
    cfg.model.attention = "sigmoid" if row.attention else "none"
    cfg.model.init = str(checkpoint) if row.ssl else None
    if row.imagenet:
        cfg.model.pretrained = imagenet_weights
    cfg.data.split = str(split)
    trained = finetune(cfg)
    cfg.eval.checkpoint = str(trained.best_checkpoint)
    evaluation = evaluate(cfg, name=row.name)
    best = trained.best_epoch + 1 if trained.best_epoch is not None else None
    return RowResult(
        row=row,
        fold=fold,
        report=evaluation.test,
        threshold=float(evaluation.threshold),
        best_epoch=best,
        seconds=time.perf_counter() - start,
        out_dir=out,
    )


# ---------------------------------------------------------------------------------- tables
def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:.{digits}f}"


def single_split_table(results: Sequence[RowResult]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table and CSV rows of a single-split ablation.

    Args:
        results: One :class:`RowResult` per row (fold 0).

    Returns:
        ``(markdown, csv_rows)``.
    """
    from patchssl.metrics import format_table

    table = format_table({r.row.name: r.report for r in results})
    rows = []
    for r in results:
        rep = r.report
        line: dict[str, Any] = {
            "row": r.row.name,
            "backbone": r.row.backbone,
            "ssl": r.row.ssl,
            "attention": r.row.attention,
        }
        for m in METRICS:
            lo, hi = rep.ci.get(m, (float("nan"), float("nan")))
            line[m] = rep.metrics.get(m, float("nan"))
            line[f"{m}_ci_low"] = lo
            line[f"{m}_ci_high"] = hi
        line.update({k: rep.counts[k] for k in ("n", "n_positive", "n_negative")})
        line.update({k: rep.counts[k] for k in ("tp", "fp", "tn", "fn")})
        line.update(
            {
                "n_patients": rep.counts.get("n_groups"),
                "threshold": r.threshold,
                "best_epoch": r.best_epoch,
                "seconds": round(r.seconds, 1),
            }
        )
        rows.append(line)
    return table, rows


def aggregate_folds(results: Sequence[RowResult]) -> list[dict[str, Any]]:
    """Mean, standard deviation, minimum and maximum of each metric across folds, per row.

    Counts are summed over folds (every labeled image is tested exactly once). A metric that is
    undefined in a fold (``nan``) is left out of that row's statistics, and ``folds_defined``
    says how many folds remained.

    Args:
        results: :class:`RowResult` of every row and fold.

    Returns:
        One dict per row, in first-seen row order: ``row``, ``folds``, then for each metric
        ``{m}_mean``, ``{m}_std`` (sample standard deviation, ``ddof=1``), ``{m}_min``,
        ``{m}_max``, ``{m}_folds_defined``; and summed ``n``, ``n_positive``, ``n_negative``,
        ``tp``, ``fp``, ``tn``, ``fn``.
    """
    order: list[AblationRow] = []
    grouped: dict[AblationRow, list[RowResult]] = {}
    for r in results:
        if r.row not in grouped:
            order.append(r.row)
            grouped[r.row] = []
        grouped[r.row].append(r)
    out = []
    for row in order:
        items = grouped[row]
        line: dict[str, Any] = {
            "row": row.name,
            "backbone": row.backbone,
            "ssl": row.ssl,
            "attention": row.attention,
            "folds": len(items),
        }
        for m in METRICS:
            values = np.array([it.report.metrics.get(m, float("nan")) for it in items], float)
            values = values[np.isfinite(values)]
            line[f"{m}_folds_defined"] = int(values.size)
            if values.size == 0:
                stats = (float("nan"),) * 4
            else:
                std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
                stats = (float(values.mean()), std, float(values.min()), float(values.max()))
            for suffix, value in zip(("mean", "std", "min", "max"), stats, strict=True):
                line[f"{m}_{suffix}"] = value
        for k in ("n", "n_positive", "n_negative", "tp", "fp", "tn", "fn"):
            line[k] = int(sum(it.report.counts[k] for it in items))
        out.append(line)
    return out


def folds_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`aggregate_folds`: ``mean ± std [min, max]`` in percent."""
    headers = ["Model", *[f"{_TITLES[m]} (%)" for m in METRICS], "n (pos/neg)", "TP/FP/TN/FN"]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for r in rows:
        cells = [r["row"]]
        for m in METRICS:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            spread = f" ± {_fmt(std, 1)}" if std == std else ""
            cells.append(
                f"{_fmt(mean, 1)}{spread} [{_fmt(r[f'{m}_min'], 1)}, {_fmt(r[f'{m}_max'], 1)}]"
            )
        cells.append(f"{r['n']} ({r['n_positive']}/{r['n_negative']})")
        cells.append(f"{r['tp']}/{r['fp']}/{r['tn']}/{r['fn']}")
        lines.append("| " + " | ".join(cells) + " |")
    folds = rows[0]["folds"] if rows else 0
    note = (
        f"Mean ± standard deviation [minimum, maximum] over {folds} patient-grouped folds, in "
        "percent; each fold's threshold chosen on its own validation part. Counts summed over "
        "the folds (every labeled image is tested once)."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()
                }
            )


def _json_clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_clean(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    """The command-line options of the ablation runner."""
    p = argparse.ArgumentParser(
        prog="ablation.py",
        description="Run the ablation of Chae et al. 2021 (Table 2): each backbone without "
        "self-supervision and attention, with SSL only, with attention only, and with both; "
        "on one shared patient-grouped split, or with patient-grouped k-fold cross-validation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data",
        metavar="DIR",
        help="a dataset folder holding unlabeled/ (pretraining images) and labeled.csv "
        "(image,label,patient,visit)",
    )
    src.add_argument(
        "--synthetic",
        action="store_true",
        help="generate the synthetic cervix-like benchmark (patchssl.data.make_synthetic_cervix)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="base YAML/JSON config (e.g. configs/paper.yaml)"
    )
    p.add_argument("--out", metavar="DIR", default="runs/cervix-ablation", help="output folder")
    p.add_argument(
        "--backbones", nargs="+", default=["resnet50", "vgg16"], help="timm backbone names"
    )
    p.add_argument(
        "--label-budget",
        type=int,
        metavar="PATIENTS",
        help="train on the images of this many training patients (stratified; default: all)",
    )
    p.add_argument(
        "--imagenet",
        nargs="?",
        const=True,
        default=None,
        metavar="WEIGHTS",
        help="add an 'ImageNet + AL' row per backbone (timm's ImageNet weights: downloaded, or "
        "read from the Hugging Face cache offline; or WEIGHTS, a local .pth/.safetensors file)",
    )
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation (0 = one split)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (train.epochs)")
    p.add_argument("--pretrain-epochs", type=int, help="pretraining epochs (default: --epochs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, split and training")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small CPU settings: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument("--image-size", type=int, help="working image size (data.image_size)")
    p.add_argument("--patch-size", type=int, help="patch side (model.patch_size)")
    p.add_argument(
        "--num-permutations", type=int, help="jigsaw permutations (default: the config's)"
    )
    p.add_argument("--batch-size", type=int, help="images per step (train.batch_size)")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples (eval.n_boot)")
    p.add_argument("--threads", type=int, help="CPU threads (train.num_threads)")
    p.add_argument("--device", help="auto, cpu or cuda (train.device)")
    p.add_argument("--num-unlabeled", type=int, help="--synthetic: unlabeled images")
    p.add_argument("--num-patients", type=int, help="--synthetic: labeled patients")
    p.add_argument("--images-per-patient", type=int, help="--synthetic: images per patient")
    p.add_argument(
        "--explain",
        choices=["none", "best", "all"],
        default="best",
        help="attention overlays and t-SNE plots: none, the SSL + AL row of the first backbone "
        "and its from-scratch counterpart (best), or every row (all); single split only",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config option, e.g. --set train.lr=0.0005 (repeatable)",
    )
    return p


def _pick(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    if value is not None:
        return value
    if args.quick and name in QUICK:
        return QUICK[name]
    return default


def _base_config(args: argparse.Namespace) -> Any:
    from patchssl.engine.config import apply_overrides, load_config

    config = load_config(args.config) if args.config else load_config(None)
    if not args.config and not args.quick:
        # The library defaults are the paper's geometry; without a config on a CPU, warn.
        _say("no --config: using the library defaults (the paper's 512 px / 153 px geometry)")
    c = config
    c.data.image_size = _pick(args, "image_size", c.data.image_size)
    c.model.patch_size = _pick(args, "patch_size", c.model.patch_size)
    c.train.epochs = _pick(args, "epochs", c.train.epochs)
    c.train.batch_size = _pick(args, "batch_size", c.train.batch_size)
    c.eval.n_boot = _pick(args, "n_boot", c.eval.n_boot)
    c.train.seed = args.seed
    num_perm = _pick(args, "num_permutations", None)
    if num_perm is not None:
        options = {k: v for k, v in c.pretext.options.items() if k != "permutations"}
        options["num_permutations"] = int(num_perm)
        c.pretext.options = options
    if args.threads:
        c.train.num_threads = args.threads
    if args.device:
        c.train.device = args.device
    if args.quick:
        c.data.workers = 0
        c.train.patience = 0
        c.train.tensorboard = "false"
        c.train.progress = False
    c.train.resume = False
    return apply_overrides(c, args.overrides)


def run_ablation(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the ablation described by the command-line arguments ``argv``.

    Writes into ``--out``: the split(s), one folder per pretraining and per row, and
    ``ablation.md``, ``ablation.csv``, ``ablation.json`` (plus ``ablation_folds.csv`` with every
    fold's numbers when ``--folds`` is given).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The JSON payload that was written to ``ablation.json``.
    """
    import torch

    from patchssl.engine.data import labeled_records

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = _base_config(args)
    config.out = str(out)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    command = "python examples/cervix/ablation.py " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    _say(f"output: {out}; {torch.get_num_threads()} CPU thread(s)")

    synthetic_info: dict[str, Any] | None = None
    if args.synthetic:
        from patchssl.data import make_synthetic_cervix

        n_unl = _pick(args, "num_unlabeled", 400)
        n_pat = _pick(args, "num_patients", 100)
        per = _pick(args, "images_per_patient", 2)
        _say(f"synthetic benchmark: {n_unl} unlabeled images, {n_pat} patients x {per} images")
        data = make_synthetic_cervix(
            out / "data",
            num_unlabeled=n_unl,
            num_patients=n_pat,
            images_per_patient=per,
            image_size=config.data.image_size,
            positive_fraction=0.4,
            seed=args.seed,
            progress=False,
        )
        config.data.unlabeled = str(data.unlabeled_dir)
        config.data.manifest = str(data.manifest)
        config.data.label_map = "cervix"
        synthetic_info = json.loads(Path(data.info).read_text(encoding="utf-8"))
    else:
        root = Path(args.data)
        if not (root / "unlabeled").is_dir() or not (root / "labeled.csv").is_file():
            raise SystemExit(
                f"--data {root}: expected a folder with unlabeled/ and labeled.csv (see "
                "examples/cervix/README.md); give the paths in --config instead if they differ"
            )
        config.data.unlabeled = str(root / "unlabeled")
        config.data.manifest = str(root / "labeled.csv")

    records = labeled_records(config)
    budget = _pick(args, "label_budget", None)
    splits = make_splits(config, records, out, folds=args.folds, budget=budget, seed=args.seed)

    rows = make_rows(args.backbones, imagenet=args.imagenet is not None)
    pretrain_epochs = args.pretrain_epochs or _pick(args, "pretrain_epochs", config.train.epochs)
    checkpoints: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    results: list[RowResult] = []
    for backbone in args.backbones:
        t = time.perf_counter()
        _say(f"pretraining the jigsaw task with {backbone} ({pretrain_epochs} epochs)")
        checkpoints[backbone] = _pretrain(config, backbone, out, pretrain_epochs)
        seconds[f"pretrain_{backbone}"] = time.perf_counter() - t
        for k, split in enumerate(splits):
            for row in (r for r in rows if r.backbone == backbone):
                where = out / (f"fold{k}" if len(splits) > 1 else "") / row.folder
                _say(
                    f"row '{row.name}'"
                    + (f", fold {k + 1}/{len(splits)}" if len(splits) > 1 else "")
                )
                result = _run_row(
                    config, row, split, checkpoints[backbone], where, k, args.imagenet or True
                )
                seconds[f"{row.folder}_fold{k}"] = result.seconds
                results.append(result)

    figures: dict[str, Any] = {}
    if len(splits) == 1 and args.explain != "none":
        from patchssl.engine import explain

        wanted = (
            [r for r in results]
            if args.explain == "all"
            else [r for r in results if r.row.backbone == args.backbones[0] and r.row.attention]
        )
        for r in wanted:
            cfg = config.copy()
            cfg.out = str(r.out_dir)
            cfg.data.split = str(splits[0])
            cfg.explain.checkpoint = str(r.out_dir / "best.pt")
            ex = explain(cfg)
            figures[r.row.name] = {
                "grid": ex.grid,
                "embedding": ex.embedding,
                "lesion_localisation": ex.lesion,
            }

    seconds["total"] = time.perf_counter() - start
    payload: dict[str, Any] = {
        "command": command,
        "seed": args.seed,
        "folds": args.folds,
        "label_budget_patients": budget,
        "backbones": args.backbones,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "splits": [str(s) for s in splits],
        "pretrain_checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "pretrain_epochs": pretrain_epochs,
        "config": config.to_dict(),
        "synthetic": synthetic_info,
        "figures": figures,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    header = (
        f"# Ablation (Chae et al. 2021, Table 2 layout)\n\nCommand: `{command}`\n\n"
        f"Seed {args.seed}; backbones {', '.join(args.backbones)}; "
        f"{config.data.image_size} px images, {config.model.grid}x{config.model.grid} patches of "
        f"{config.model.patch_size} px; fine-tuning {config.train.epochs} epochs, pretraining "
        f"{pretrain_epochs} epochs; label budget: "
        f"{budget if budget is not None else 'all'} training patients. "
        f"Wall time {seconds['total'] / 60:.1f} min on {torch.get_num_threads()} thread(s).\n\n"
    )
    if len(splits) == 1:
        table, csv_rows = single_split_table(results)
        payload["rows"] = [
            {
                **line,
                "report": r.report.to_dict(),
                "out_dir": str(r.out_dir),
            }
            for line, r in zip(csv_rows, results, strict=True)
        ]
        markdown = header + table
    else:
        agg = aggregate_folds(results)
        table = folds_table(agg)
        payload["rows"] = agg
        payload["per_fold"] = [
            {
                "row": r.row.name,
                "fold": r.fold,
                "report": r.report.to_dict(),
                "threshold": r.threshold,
            }
            for r in results
        ]
        _, fold_rows = single_split_table(results)
        for line, r in zip(fold_rows, results, strict=True):
            line["fold"] = r.fold
        _write_csv(out / "ablation_folds.csv", fold_rows)
        csv_rows = agg
        markdown = header + table
    _write_csv(out / "ablation.csv", csv_rows)
    (out / "ablation.md").write_text(markdown, encoding="utf-8")
    tmp = out / "ablation.json.tmp"
    tmp.write_text(json.dumps(_json_clean(payload), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "ablation.json")
    print("\n" + table, flush=True)
    _say(f"done in {seconds['total'] / 60:.1f} min; table: {out / 'ablation.md'}")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a configuration error)."""
    from patchssl.engine.config import ConfigError

    try:
        run_ablation(argv)
    except (ConfigError, ValueError) as err:
        print(f"ablation.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
