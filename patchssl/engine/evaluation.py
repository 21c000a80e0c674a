"""Evaluation of a fine-tuned classifier on the held-out test split (``patchssl evaluate``).

The decision threshold is chosen on the validation split (Youden's J by default) and applied
unchanged to the test split: it is never tuned on test images. Reported: the paper's four
metrics (accuracy, specificity, sensitivity, precision) plus AUC, F1, sensitivity at a chosen
specificity and the confusion matrix, each with a bootstrap confidence interval that resamples
patients (all images of a patient together).

References:
    Chae et al., JIPS 2021, Table 2. Efron & Tibshirani, "An Introduction to the Bootstrap",
    1993.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patchssl.checkpoint import CheckpointError, load_checkpoint
from patchssl.classifier import PatchClassifier
from patchssl.data import load_split, make_loader, records_from_split
from patchssl.engine.common import as_config, prepare_run, say, write_json
from patchssl.engine.config import Config, ConfigError
from patchssl.engine.data import labeled_dataset, labeled_records
from patchssl.engine.device import autocast_context, move_batch, resolve_amp
from patchssl.engine.logging import SkippedFiles, echo, progress
from patchssl.engine.settings import checkpoint_class_names, resolve_settings
from patchssl.metrics import choose_threshold, evaluate_predictions, format_table

__all__ = [
    "EvaluationResult",
    "Predictions",
    "choose_val_threshold",
    "evaluate",
    "load_classifier",
    "predict",
    "stored_threshold",
]


@dataclass
class Predictions:
    """Model outputs on a set of images.

    Attributes:
        probs: Class probabilities, shape (M, K).
        scores: Probability of class 1 (the positive class), shape (M,).
        labels: Labels, shape (M,) (``-1`` when the images are unlabeled).
        weights: Attention weights, shape (M, N).
        features: Features the final layer sees, shape (M, F).
        indices: Dataset indices of the M readable images, shape (M,).
        paths: Image paths (M,).
        patients: Patient ids (M,) (empty strings when unknown).
        failed: ``(path, reason)`` of unreadable images (not in the arrays).
        loss: Mean loss when a loss function was given, else ``nan``.
    """

    probs: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    features: np.ndarray
    indices: np.ndarray
    paths: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    loss: float = float("nan")


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    skipped: SkippedFiles | None = None,
    show_progress: bool = False,
    desc: str = "predict",
) -> Predictions:
    """Run a classifier in eval mode over a loader (centred patches, no jitter).

    Args:
        model: A :class:`patchssl.classifier.PatchClassifier` (its
            ``forward_with_attention`` gives logits, weights and features).
        loader: Yields collated batches with ``"image"`` (B, C, H, W) uint8.
        device: Device of the model.
        amp_dtype: Autocast dtype (``None`` = float32).
        loss_fn: ``loss_fn(logits, labels)`` for the mean loss.
        skipped: Collects unreadable files.
        show_progress: Show a progress bar.
        desc: Label of the progress bar.

    Returns:
        The :class:`Predictions` (arrays on the CPU).
    """
    model.eval()
    probs, labels, weights, features, indices = [], [], [], [], []
    paths: list[str] = []
    patients: list[str] = []
    failed: list[tuple[str, str]] = []
    loss_sum, count = 0.0, 0
    for batch in progress(loader, desc=desc, enabled=show_progress):
        if batch.get("failed"):
            failed.extend(batch["failed"])
            if skipped is not None:
                skipped.add(batch["failed"], where=desc)
        if batch["image"].shape[0] == 0:
            continue
        batch = move_batch(batch, device)
        with autocast_context(device, amp_dtype):
            out = model.forward_with_attention(batch["image"])
        logits = out.logits.float()
        n = int(logits.shape[0])
        if "label" in batch:
            labels.append(batch["label"].cpu())
            if loss_fn is not None:
                loss_sum += float(loss_fn(logits, batch["label"])) * n
                count += n
        else:
            labels.append(torch.full((n,), -1, dtype=torch.long))
        probs.append(torch.softmax(logits, dim=-1).cpu())
        weights.append(out.weights.float().cpu())
        features.append(out.features.float().cpu())
        indices.append(batch["index"].cpu())
        paths.extend(batch.get("path", [""] * n))
        patients.extend(str(p) for p in batch.get("patient", [""] * n))

    def cat(items: list[torch.Tensor], width: int | None = None) -> np.ndarray:
        if not items:
            return np.zeros((0,) if width is None else (0, width), dtype=np.float32)
        return torch.cat(items).numpy()

    p = cat(probs, 2)
    return Predictions(
        probs=p,
        scores=p[:, 1] if p.shape[1] > 1 else p[:, 0],
        labels=cat(labels).astype(np.int64),
        weights=cat(weights, 0),
        features=cat(features, 0),
        indices=cat(indices).astype(np.int64),
        paths=paths,
        patients=patients,
        failed=failed,
        loss=loss_sum / count if count else float("nan"),
    )


def choose_val_threshold(
    labels: np.ndarray, scores: np.ndarray, criterion: str | float, target: float = 0.9
) -> float | None:
    """The decision threshold that ``criterion`` chooses on validation predictions.

    The one rule that fine-tuning (which stores the threshold in each checkpoint),
    :func:`evaluate` and :func:`patchssl.engine.predict_images` share.

    Args:
        labels: Validation labels of shape (M,), 0 or 1.
        scores: Probabilities of class 1, shape (M,).
        criterion: A criterion of :func:`patchssl.metrics.choose_threshold` (``youden``,
            ``f1``, ``specificity``) or a fixed number.
        target: Specificity to reach for the ``specificity`` criterion.

    Returns:
        The threshold, or ``None`` when the labels lack a class.

    Raises:
        ConfigError: For an unknown criterion.
    """
    if isinstance(criterion, (int, float)) and not isinstance(criterion, bool):
        return float(criterion)
    if len(set(np.asarray(labels).tolist())) < 2:
        return None
    try:
        if criterion == "specificity":
            return choose_threshold(labels, scores, criterion=criterion, target=target)
        return choose_threshold(labels, scores, criterion=str(criterion))
    except ValueError as err:
        raise ConfigError(f"eval.threshold: {err}") from err


def stored_threshold(
    ckpt: dict[str, Any], criterion: str | float | None = None, target: float | None = None
) -> float | None:
    """The threshold a fine-tuning checkpoint stored (chosen on its validation split).

    Args:
        ckpt: A loaded fine-tuning checkpoint.
        criterion: Only return it when it was chosen with this criterion (``None``: any).
        target: With ``criterion="specificity"``, the target it must have been chosen for.

    Returns:
        The threshold, or ``None`` when the checkpoint stores none (or another criterion's).
    """
    value = (ckpt.get("metrics") or {}).get("val_threshold")
    if value is None or not np.isfinite(value):
        return None
    if criterion is not None:
        saved = (ckpt.get("config") or {}).get("eval") or {}
        if saved.get("threshold") != criterion:
            return None
        if criterion == "specificity" and saved.get("target_specificity") != target:
            return None
    return float(value)


def load_classifier(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Load a fine-tuned classifier checkpoint.

    Args:
        path: A ``finetune`` checkpoint (``best.pt`` or ``last.pt``).
        device: Target device.

    Returns:
        ``(classifier in eval mode on device, checkpoint dict)``.

    Raises:
        ConfigError: When the file is missing or not a fine-tuning checkpoint.
    """
    path = Path(path)
    try:
        ckpt = load_checkpoint(path, kind="finetune")
    except FileNotFoundError as err:
        raise ConfigError(
            f"{err}; fine-tune first (patchssl finetune) or pass --checkpoint"
        ) from err
    except CheckpointError as err:
        raise ConfigError(str(err)) from err
    try:
        model = PatchClassifier.from_checkpoint(ckpt)
    except (CheckpointError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"cannot rebuild the classifier of {path}: {err}") from err
    return model.to(device).eval(), ckpt


def run_config_for(config: Config, ckpt: dict[str, Any], source: str = "the checkpoint") -> Config:
    """Fill the data settings a checkpoint's run used, where ``config`` leaves them unset.

    ``patchssl evaluate --out RUN`` then needs no other option: the manifest, label map and
    split of the fine-tuning run are reused, and the image size, channels and geometry are the
    checkpoint's (an option given that disagrees is refused, see
    :func:`patchssl.engine.settings.resolve_settings`).

    Args:
        config: The run configuration.
        ckpt: The loaded fine-tuning checkpoint.
        source: How to name the checkpoint in messages.

    Returns:
        The completed configuration.
    """
    saved = ckpt.get("config") or {}
    if not config.data.manifest and saved:
        data = dict(saved.get("data") or {})
        merged = config.to_dict()
        merged["data"] = {**merged["data"], **data}
        for key in ("workers", "cache"):
            if getattr(config.data, key) != getattr(Config().data, key):
                merged["data"][key] = getattr(config.data, key)
        config = Config.from_dict(merged).mark_given(config.given)
    return resolve_settings(config, checkpoint=ckpt, source=source, note=False)


def _split_for(config: Config, ckpt_path: Path) -> str:
    if config.data.split:
        return config.data.split
    for candidate in (Path(config.out) / "split.json", ckpt_path.parent / "split.json"):
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(
        "no split to evaluate: pass --split FILE (the split.json written by patchssl finetune), "
        "or --out the fine-tuning run folder"
    )


@dataclass
class EvaluationResult:
    """What :func:`evaluate` produced.

    Attributes:
        test: :class:`patchssl.metrics.EvaluationReport` of the test split.
        val: Report of the validation split (at the same threshold), or ``None``.
        threshold: The decision threshold (chosen on the validation split).
        json_path: ``eval.json``.
        markdown_path: ``eval.md``.
        test_predictions: The test :class:`Predictions`.
    """

    test: Any
    val: Any
    threshold: float
    json_path: Path
    markdown_path: Path
    test_predictions: Predictions


def _write_predictions(path: Path, pred: Predictions, threshold: float) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "patient", "label", "score", "predicted"])
        for i in range(len(pred.scores)):
            writer.writerow(
                [
                    pred.paths[i],
                    pred.patients[i],
                    int(pred.labels[i]),
                    f"{pred.scores[i]:.6f}",
                    int(pred.scores[i] >= threshold),
                ]
            )


def evaluate(
    config: Config | dict[str, Any] | str | Path | None, *, name: str = "model"
) -> EvaluationResult:
    """Evaluate a fine-tuned classifier on the test split; write JSON and Markdown reports.

    Writes ``eval.json``, ``eval.md`` and ``predictions_{val,test}.csv`` in ``config.out``.

    Args:
        config: Run configuration: ``eval.checkpoint`` (default ``<out>/best.pt``), the split
            (``data.split`` or ``<out>/split.json``), ``eval.threshold``,
            ``eval.target_specificity``, ``eval.n_boot``, ``eval.ci``.
        name: Row name of the model in ``eval.md``.

    Returns:
        The :class:`EvaluationResult`.

    Raises:
        ConfigError: On a missing checkpoint or split, or a validation split without both
            classes (the threshold cannot be chosen).
    """
    config = as_config(config)
    ev = config.eval
    ckpt_path = Path(ev.checkpoint) if ev.checkpoint else Path(config.out) / "best.pt"
    out, device = prepare_run(config, save=False)
    model, ckpt = load_classifier(ckpt_path, device)
    config = run_config_for(config, ckpt, str(ckpt_path))
    say(f"evaluating {ckpt_path} on {device}; output: {out}")
    records = labeled_records(config)
    split_path = _split_for(config, ckpt_path)
    try:
        parts = records_from_split(records, load_split(split_path))
    except (KeyError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(f"split {split_path}: {message}") from err
    if not parts.get("test"):
        raise ConfigError(f"split {split_path} has no test images")
    amp_dtype, _ = resolve_amp(config.train.amp, device)
    skipped = SkippedFiles(out)

    def run(part: str) -> Predictions:
        loader = make_loader(
            labeled_dataset(config, parts[part]),
            config.train.batch_size,
            num_workers=config.data.workers,
            pin_memory=device.type == "cuda",
        )
        return predict(
            model,
            loader,
            device,
            amp_dtype=amp_dtype,
            skipped=skipped,
            show_progress=config.train.progress,
            desc=f"evaluate {part}",
        )

    val = run("val") if parts.get("val") else None
    test = run("test")
    skipped.report("evaluation")
    stored = stored_threshold(ckpt, ev.threshold, ev.target_specificity)
    if isinstance(ev.threshold, (int, float)) and not isinstance(ev.threshold, bool):
        threshold, how = float(ev.threshold), "fixed in the configuration"
    elif stored is not None:
        threshold = stored
        how = (
            f"chosen on the validation split ({ev.threshold}) when the checkpoint was saved, "
            "and stored in it (patchssl predict uses the same)"
        )
    else:
        if val is None or len(set(val.labels.tolist())) < 2:
            raise ConfigError(
                "the threshold is chosen on the validation split, which needs both classes; "
                "make a split with a larger data.val_size, or fix it with --threshold 0.5"
            )
        threshold = choose_val_threshold(
            val.labels, val.scores, ev.threshold, ev.target_specificity
        )
        how = f"chosen on the validation split ({ev.threshold})"
        if threshold is None:  # pragma: no cover - both classes were checked above
            raise ConfigError("no threshold could be chosen on the validation split")
    alpha = 1.0 - ev.ci
    common = {
        "threshold": threshold,
        "n_boot": ev.n_boot,
        "seed": config.train.seed,
        "sensitivity_at": ev.target_specificity,
        "alpha": alpha,
    }
    test_report = evaluate_predictions(test.labels, test.scores, groups=test.patients, **common)
    val_report = None
    if val is not None and len(set(val.labels.tolist())) == 2:
        val_report = evaluate_predictions(
            val.labels, val.scores, groups=val.patients, **{**common, "n_boot": 0}
        )
    names = checkpoint_class_names(ckpt, int(test.probs.shape[1]))
    payload = {
        "checkpoint": str(ckpt_path),
        "split": split_path,
        "threshold": threshold,
        "threshold_choice": how,
        "class_names": names,
        "test": test_report.to_dict(),
        "val": val_report.to_dict() if val_report is not None else None,
        "skipped_files": [list(f) for f in test.failed + (val.failed if val else [])],
    }
    json_path = write_json(out / "eval.json", payload)
    table = format_table({name: test_report})
    classes = f"Positive class: {names[-1]} (against {', '.join(names[:-1])}). "
    md = (
        f"# Evaluation of {ckpt_path}\n\n{classes}"
        f"Test split: {test_report.counts['n']} images of {test_report.counts['n_groups']} "
        f"patients. Threshold {threshold:.4f}, {how}. Values in percent with "
        f"{round(100 * ev.ci)}% bootstrap intervals resampled by {test_report.resampled_by} "
        f"({ev.n_boot} resamples).\n\n{table}"
    )
    markdown_path = out / "eval.md"
    markdown_path.write_text(md, encoding="utf-8")
    _write_predictions(out / "predictions_test.csv", test, threshold)
    if val is not None:
        _write_predictions(out / "predictions_val.csv", val, threshold)
    say(f"evaluation written to {json_path} and {markdown_path}")
    echo(table)
    return EvaluationResult(
        test=test_report,
        val=val_report,
        threshold=threshold,
        json_path=json_path,
        markdown_path=markdown_path,
        test_predictions=test,
    )
