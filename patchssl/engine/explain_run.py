"""Explanations of a fine-tuned classifier (``patchssl explain``).

For the images of a split it draws each patch's attention weight onto the image, outlining the
patches above the mean weight (the paper's Fig. 4b), and a t-SNE map of the classifier features
coloured by label (Fig. 4a). When the manifest records lesion boxes (``lesion_x0, lesion_y0,
lesion_x1, lesion_y1``), it also scores how often the highest-weight patch of a positive image
overlaps the lesion, beside two baselines (a random patch, and always the middle patch) and the
gate's selectivity, each rate with an interval that resamples patients
(:func:`patchssl.explain.lesion_hit_rate`).

References:
    Chae et al., JIPS 2021, Fig. 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchssl import _optional
from patchssl.data import load_split, make_loader, records_from_split
from patchssl.engine.common import as_config, prepare_run, say, write_json
from patchssl.engine.config import Config, ConfigError
from patchssl.engine.data import labeled_dataset, labeled_records
from patchssl.engine.device import resolve_amp
from patchssl.engine.evaluation import (
    _split_for,
    load_classifier,
    predict,
    run_config_for,
)
from patchssl.engine.logging import SkippedFiles
from patchssl.engine.settings import checkpoint_class_names
from patchssl.explain import attention_grid, draw_attention, lesion_hit_rate, plot_embedding

__all__ = ["ExplainResult", "explain", "format_lesion", "lesion_boxes"]

_LESION_COLUMNS = ("lesion_x0", "lesion_y0", "lesion_x1", "lesion_y1")


@dataclass
class ExplainResult:
    """What :func:`explain` wrote.

    Attributes:
        out_dir: Folder of the explanation files.
        overlays: One attention overlay PNG per explained image.
        grid: Contact sheet of the overlays.
        embedding: t-SNE plot PNG (``None`` when not drawn).
        lesion: The lesion-localisation dict of :func:`patchssl.explain.lesion_hit_rate`
            (``hit_rate``, ``chance``, ``centre_patch_rate``, each with its ``*_ci``,
            ``vs_centre``, ``vs_chance``, ``selectivity``, ``ties``, ...), or ``None`` without
            recorded lesions.
        json_path: ``explain.json``.
    """

    out_dir: Path
    overlays: list[Path] = field(default_factory=list)
    grid: Path | None = None
    embedding: Path | None = None
    lesion: dict[str, Any] | None = None
    json_path: Path | None = None


def _title(names: list[str], label: int, probs: np.ndarray) -> str:
    """``"CIN2+ (p=0.83 CIN2+)"``: the image's class and the probability of the last class.

    For two classes the probability shown is the positive class's (the score that orders the
    overlays); for more, the most probable class's.
    """
    shown = len(names) - 1 if len(names) == 2 else int(np.argmax(probs))
    truth = names[label] if 0 <= label < len(names) else "unlabeled"
    return f"{truth} (p {names[shown]}={float(probs[shown]):.2f})"


def lesion_boxes(records: list[Any]) -> np.ndarray | None:
    """Lesion boxes of shape (M, 4) from the manifest's ``lesion_*`` columns (nan if absent).

    Returns:
        The boxes, or ``None`` when the manifest has no lesion columns.
    """
    if not records or not all(c in records[0].extra for c in _LESION_COLUMNS):
        return None
    boxes = np.full((len(records), 4), np.nan)
    for i, r in enumerate(records):
        for j, c in enumerate(_LESION_COLUMNS):
            try:
                boxes[i, j] = float(r.extra.get(c, "") or "nan")
            except ValueError:
                boxes[i, j] = math.nan
    return boxes


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _pct_ci(value: float, ci: Any) -> str:
    lo, hi = ci

    def pct(x: float | None) -> str:
        return "n/a" if x is None or x != x else f"{100 * x:.1f}"

    return f"{pct(value)}% [{pct(lo)}, {pct(hi)}]"


def format_lesion(lesion: dict[str, Any]) -> str:
    """One line: the hit rate beside its baselines and the gate's selectivity.

    Args:
        lesion: A dict from :func:`patchssl.explain.lesion_hit_rate` (or read back from
            ``explain.json``, where intervals are lists).

    Returns:
        ``"top-weight patch on the lesion in <hits>/<count> positive images, <rate> [<low>,
        <high>]; middle patch ...; random patch (chance) ...; gate weight range ...,
        normalised entropy ..."``.
    """
    sel = lesion.get("selectivity") or {}
    hits = lesion.get("hits", 0)
    hits_text = f"{hits:g}" if isinstance(hits, float) else str(hits)
    text = (
        f"top-weight patch on the lesion in {hits_text}/{lesion.get('count', 0)} positive images, "
        f"{_pct_ci(lesion.get('hit_rate'), lesion.get('hit_rate_ci', (None, None)))}; "
        f"middle patch "
        f"{_pct_ci(lesion.get('centre_patch_rate'), lesion.get('centre_patch_ci', (None, None)))}"
        f"; random patch (chance) "
        f"{_pct_ci(lesion.get('chance'), lesion.get('chance_ci', (None, None)))}; "
        f"gate weight range {_num(sel.get('weight_range')):.3f}, "
        f"normalised entropy {_num(sel.get('weight_entropy')):.3f}"
    )
    if lesion.get("ties"):
        text += f"; {lesion['ties']} image(s) with tied top weights"
    return text


def explain(config: Config | dict[str, Any] | str | Path | None) -> ExplainResult:
    """Draw attention overlays and the embedding plot of a fine-tuned classifier.

    Writes into ``<out>/explain/``: ``attention_*.png`` (one per image, the highest-scoring
    images first), ``attention_grid.png``, ``embedding_tsne.png`` and ``explain.json``.

    Args:
        config: Run configuration: ``explain.checkpoint`` (default ``<out>/best.pt``),
            ``explain.split``, ``explain.num_images``, ``explain.embedding``.

    Returns:
        The :class:`ExplainResult`.

    Raises:
        ConfigError: On a missing checkpoint or split.

    Without matplotlib (a dependency of patchssl, but removable), the embedding plot is
    skipped with a note and everything else is still written.
    """
    config = as_config(config)
    ex = config.explain
    ckpt_path = Path(ex.checkpoint) if ex.checkpoint else Path(config.out) / "best.pt"
    out, device = prepare_run(config, save=False)
    model, ckpt = load_classifier(ckpt_path, device)
    config = run_config_for(config, ckpt, str(ckpt_path))
    target = out / "explain"
    say(f"explaining {ckpt_path} ({ex.split} split); output: {target}")
    records = labeled_records(config)
    split_path = _split_for(config, ckpt_path)
    parts = records_from_split(records, load_split(split_path))
    if ex.split == "all":
        chosen = [r for k in ("train", "val", "test") for r in parts.get(k, [])]
    elif ex.split in parts:
        chosen = parts[ex.split]
    else:
        raise ConfigError(
            f"explain.split must be one of {', '.join([*parts, 'all'])}; got '{ex.split}'"
        )
    if not chosen:
        raise ConfigError(f"the '{ex.split}' split of {split_path} is empty")
    dataset = labeled_dataset(config, chosen)
    loader = make_loader(dataset, config.train.batch_size, num_workers=config.data.workers)
    amp_dtype, _ = resolve_amp(config.train.amp, device)
    skipped = SkippedFiles(out)
    pred = predict(model, loader, device, amp_dtype=amp_dtype, skipped=skipped, desc="explain")
    skipped.report("explanation")
    if pred.scores.size == 0:
        raise ConfigError("no readable image to explain")
    names = checkpoint_class_names(ckpt, int(pred.probs.shape[1]))
    boxes = model.tiler.centre_boxes().cpu().numpy()
    result = ExplainResult(out_dir=target)
    target.mkdir(parents=True, exist_ok=True)

    lesions_all = lesion_boxes(chosen)
    lesions = lesions_all[pred.indices] if lesions_all is not None else None
    order = np.argsort(-pred.scores, kind="stable")[: max(0, ex.num_images)]
    images, titles, sheet_lesions = [], [], []
    for rank, i in enumerate(order):
        image = dataset[int(pred.indices[i])]["image"]
        title = _title(names, int(pred.labels[i]), pred.probs[i])
        lesion = lesions[i] if lesions is not None else None
        name = Path(pred.paths[i]).stem
        path = target / f"attention_{rank:02d}_{name}.png"
        draw_attention(image, boxes, pred.weights[i], path=path, lesion_box=lesion, title=title)
        result.overlays.append(path)
        images.append(image)
        titles.append(title)
        sheet_lesions.append(lesion if lesion is not None else np.full(4, np.nan))
    if images:
        result.grid = target / "attention_grid.png"
        attention_grid(
            torch.stack(images),
            boxes,
            pred.weights[order],
            result.grid,
            lesion_boxes=np.stack(sheet_lesions) if lesions is not None else None,
            titles=titles,
        )
    if ex.embedding and pred.features.shape[0] >= 3:
        if not _optional.is_available("matplotlib"):
            say("note: embedding plot skipped: matplotlib is missing (pip install matplotlib)")
        else:
            result.embedding = target / "embedding_tsne.png"
            plot_embedding(
                pred.features,
                pred.labels,
                result.embedding,
                seed=config.train.seed,
                class_names=names,
                title=f"t-SNE of classifier features ({ex.split}, {pred.features.shape[0]} images)",
            )
    if lesions is not None:
        result.lesion = lesion_hit_rate(
            boxes,
            pred.weights,
            lesions,
            pred.labels,
            groups=pred.patients if all(pred.patients) else None,
            n_boot=config.eval.n_boot,
            alpha=1.0 - config.eval.ci,
            seed=config.train.seed,
        )
    result.json_path = write_json(
        target / "explain.json",
        {
            "checkpoint": str(ckpt_path),
            "split": ex.split,
            "overlays": [str(p) for p in result.overlays],
            "grid": str(result.grid) if result.grid else None,
            "embedding": str(result.embedding) if result.embedding else None,
            "lesion_localisation": result.lesion,
        },
    )
    if result.lesion is not None and result.lesion["count"]:
        say(f"lesion localisation: {format_lesion(result.lesion)}")
    say(f"explanations written to {target}")
    return result
