"""Predictions of a fine-tuned classifier on new images (``patchssl predict``).

The classifier, its geometry (image size, channels, tiling) and its class names come from the
checkpoint alone, so a folder of new images (or a CSV that lists them) is all that is needed.
The predicted class is decided at the threshold that fine-tuning chose on the validation split
and stored in the checkpoint (the one :func:`patchssl.engine.evaluate` reports metrics at), so
prediction and evaluation agree. Unreadable images are listed, not fatal.

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (the classifier; attention overlays as in Fig. 4b).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchssl.data import ManifestDataset, Record, find_images, make_loader
from patchssl.engine.config import ConfigError
from patchssl.engine.device import resolve_device
from patchssl.engine.evaluation import load_classifier, predict, stored_threshold
from patchssl.engine.settings import checkpoint_class_names, checkpoint_settings
from patchssl.explain import draw_attention

__all__ = ["PredictionResult", "predict_images"]


@dataclass
class PredictionResult:
    """What :func:`predict_images` found, one row per image.

    Attributes:
        rows: One dict per image, in input order: ``"image"`` (its path), one column per
            class (named for the class; its probability), ``"predicted"`` (the class name)
            and ``"error"`` (empty; for an unreadable image the reason, and the other values
            ``None``).
        class_names: The classes, in index order (from the run's label map).
        threshold: Probability of the last class (the positive one) from which an image is
            predicted positive; ``None`` with more than two classes (the most probable class
            is predicted).
        threshold_source: Where the threshold came from, in words.
        checkpoint: The checkpoint used.
        failed: ``(path, reason)`` of the images that could not be read.
        overlays: Attention overlays drawn (with ``explain``).
    """

    rows: list[dict[str, Any]]
    class_names: list[str]
    threshold: float | None
    threshold_source: str
    checkpoint: Path
    failed: list[tuple[str, str]] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """The CSV header: ``image``, the class columns, ``predicted``, ``error``."""
        return ["image", *_class_columns(self.class_names), "predicted", "error"]

    def write_csv(self, path: str | Path) -> Path:
        """Write :attr:`rows` as a CSV file (probabilities with 6 decimals).

        Args:
            path: Output file (parent folders are created).

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow(
                    {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}
                )
        tmp.replace(path)
        return path


def _class_columns(names: Sequence[str]) -> list[str]:
    """Column names for the class probabilities: the class names, unless one clashes."""
    clash = {"image", "predicted", "error"} & set(names) or len(set(names)) < len(names)
    return [f"p({n})" for n in names] if clash else list(names)


def _image_list(
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], column: str
) -> list[Path]:
    """The image paths of a folder (recursively), a CSV (``column``) or a list."""
    if isinstance(images, (str, os.PathLike)):
        source = Path(images)
        if source.is_dir():
            found = find_images(source)
            if not found:
                raise ConfigError(f"no images found under {source}")
            return found
        if source.suffix.lower() == ".csv" and source.is_file():
            return _csv_images(source, column)
        if not source.exists():
            raise ConfigError(f"{source} does not exist; give a folder of images or a CSV")
        return [source]
    paths = [Path(p) for p in images]
    if not paths:
        raise ConfigError("no images given")
    return paths


def _csv_images(path: Path, column: str) -> list[Path]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        reader.fieldnames = fields
        match = next((f for f in fields if f.casefold() == column.casefold()), None)
        if match is None:
            raise ConfigError(
                f"{path} has no '{column}' column (columns: {', '.join(fields) or 'none'}); "
                "name the column of image paths with --image-column (image_column=)"
            )
        cells = [(row.get(match) or "").strip() for row in reader]
    paths = [Path(c) if Path(c).is_absolute() else path.parent / c for c in cells if c]
    if not paths:
        raise ConfigError(f"{path} lists no images in its '{match}' column")
    return paths


def _threshold(
    ckpt: dict[str, Any], threshold: float | None, num_classes: int
) -> tuple[float | None, str]:
    if num_classes != 2:
        return None, f"none ({num_classes} classes: the most probable class is predicted)"
    if threshold is not None:
        return float(threshold), "given"
    stored = stored_threshold(ckpt)
    if stored is not None:
        criterion = ((ckpt.get("config") or {}).get("eval") or {}).get("threshold", "youden")
        return stored, f"chosen on the validation split ({criterion}), stored in the checkpoint"
    return 0.5, (
        "0.5: the checkpoint stores no threshold (its validation split did not hold both "
        "classes); pass threshold= (--threshold) to choose one"
    )


def predict_images(
    checkpoint: str | os.PathLike[str],
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    threshold: float | None = None,
    device: str = "auto",
    batch_size: int = 16,
    workers: int = 0,
    image_column: str | None = None,
    explain: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> PredictionResult:
    """Predict the class of new images with a fine-tuned checkpoint.

    Images are read and resized as in training (the checkpoint's image size and channels);
    the classifier sees centred patches (no jitter). For two classes an image is predicted as
    the last class (the positive one) when its probability is at least the threshold.

    Args:
        checkpoint: A ``patchssl finetune`` checkpoint (``best.pt``).
        images: A folder (searched recursively), a CSV file listing image paths (relative
            ones start from the CSV's folder), or a list of image paths.
        threshold: Decision threshold on the positive class's probability (default: the one
            fine-tuning chose on the validation split and stored in the checkpoint).
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: Images per forward pass.
        workers: Decoding processes (0 = in this process).
        image_column: CSV column of the image paths (default: the fine-tuning manifest's,
            else ``image``).
        explain: A folder to draw each image's attention overlay into (patches above the
            mean weight outlined; the paper's Fig. 4b).
        progress: Show a progress bar (on a terminal).

    Returns:
        The :class:`PredictionResult` (``rows``: one dict per image, input order).

    Raises:
        ConfigError: When the checkpoint is missing or not a fine-tuned classifier, no image is
            given or found, or the CSV has no image column.

    Example:
        >>> result = predict_images("runs/finetune/best.pt", "new_images/")  # doctest: +SKIP
        >>> result.rows[0]  # doctest: +SKIP
        {'image': 'new_images/a.png', 'CIN0/1': 0.81, 'CIN2+': 0.19, 'predicted': 'CIN0/1', ...}
    """
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"batch_size must be >= 1 and workers >= 0; got {batch_size}, {workers}")
    ckpt_path = Path(checkpoint)
    target = resolve_device(device)
    model, ckpt = load_classifier(ckpt_path, target)
    settings = checkpoint_settings(ckpt, str(ckpt_path))
    saved_data = (ckpt.get("config") or {}).get("data") or {}
    column = image_column or saved_data.get("path_column") or "image"
    paths = _image_list(images, column)
    records = [Record(path=p, label=-1, raw_label="", patient="") for p in paths]
    dataset = ManifestDataset(
        records,
        settings.get("data.image_size", model.tiler.image_size),
        channels=int(settings.get("data.in_chans", 3)),
    )
    loader = make_loader(dataset, batch_size, num_workers=workers)
    pred = predict(model, loader, target, show_progress=progress, desc="predict")
    probs = pred.probs
    names = checkpoint_class_names(ckpt, int(probs.shape[1]) if probs.size else model.num_classes)
    cut, source = _threshold(ckpt, threshold, len(names))
    columns = _class_columns(names)
    by_index = {int(i): k for k, i in enumerate(pred.indices.tolist())}
    reasons = {str(p): r for p, r in pred.failed}
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {"image": str(path)}
        k = by_index.get(i)
        if k is None:
            row.update(dict.fromkeys(columns))
            row.update(predicted=None, error=reasons.get(str(path), "unreadable"))
        else:
            row.update({c: float(p) for c, p in zip(columns, probs[k])})
            chosen = int(np.argmax(probs[k])) if cut is None else int(probs[k, -1] >= cut)
            row.update(predicted=names[chosen], error="")
        rows.append(row)
    result = PredictionResult(
        rows=rows,
        class_names=names,
        threshold=cut,
        threshold_source=source,
        checkpoint=ckpt_path,
        failed=list(pred.failed),
    )
    if explain is not None and len(pred.indices):
        result.overlays = _draw(model, dataset, pred, rows, names, Path(explain))
    return result


def _draw(
    model: Any, dataset: Any, pred: Any, rows: list[dict[str, Any]], names: list[str], out: Path
) -> list[Path]:
    """One attention overlay per readable image, titled with the predicted class."""
    boxes = model.tiler.centre_boxes().cpu().numpy()
    out.mkdir(parents=True, exist_ok=True)
    drawn: list[Path] = []
    for k, index in enumerate(pred.indices.tolist()):
        row = rows[index]
        path = out / f"attention_{index:04d}_{Path(row['image']).stem}.png"
        shown = float(pred.probs[k][names.index(row["predicted"])])
        title = f"{row['predicted']} (p={shown:.2f})"
        draw_attention(dataset[index]["image"], boxes, pred.weights[k], path=path, title=title)
        drawn.append(path)
    return drawn
