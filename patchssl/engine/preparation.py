"""Data preparation (``patchssl prepare``): resize cache, manifest check, split, overlap check.

Cervix photographs are large (about 2800 x 1900 px); decoding and resizing them at every epoch
wastes most of a training run. ``prepare`` resizes each image once into ``<out>/cache`` (in
parallel, resumable, reporting unreadable files), checks the manifest (unknown labels are
refused and listed), draws the patient-grouped split (``<out>/split.json``), and reports
labeled evaluation images that also sit in the unlabeled pretraining folder.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchssl.data import prepare_images
from patchssl.engine.common import as_config, prepare_run, say, write_json
from patchssl.engine.config import Config, ConfigError
from patchssl.engine.data import find_eval_overlap, labeled_records, make_split
from patchssl.engine.run_dir import run_folder, start_run

__all__ = ["PrepareResult", "next_commands", "prepare"]


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote.

    Attributes:
        out_dir: Output folder.
        cache: The cache folder (``<out>/cache``), to pass as ``data.cache``.
        split: ``split.json`` when a manifest was given.
        reports: The :class:`patchssl.data.PrepareReport` of each cached folder.
        overlap: Number of evaluation images also found in the pretraining folder.
        next_commands: The ``patchssl pretrain`` and ``finetune`` command lines that train
            on the prepared data (printed at the end).
    """

    out_dir: Path
    cache: Path
    split: Path | None = None
    reports: dict[str, Any] = field(default_factory=dict)
    overlap: int = 0
    next_commands: list[str] = field(default_factory=list)


def prepare(config: Config | dict[str, Any] | str | Path | None) -> PrepareResult:
    """Resize images into a cache, check the manifest and draw the split.

    Args:
        config: Run configuration: ``data.unlabeled`` and/or ``data.manifest``,
            ``data.image_size``, ``data.workers``, ``data.test_size``, ``data.val_size``,
            ``train.seed``; outputs go to ``out``.

    Returns:
        The :class:`PrepareResult`.

    Raises:
        ConfigError: When neither data source is given, the manifest is invalid, or ``out``
            holds a training run (without ``train.overwrite``) or is in use by another run.
    """
    config = as_config(config)
    d = config.data
    if not d.unlabeled and not d.manifest:
        raise ConfigError(
            "nothing to prepare: give --data DIR (unlabeled) and/or --manifest FILE.csv"
        )
    with run_folder(config):
        return _prepare(config)


def _prepare(config: Config) -> PrepareResult:
    """The body of :func:`prepare`, with the output folder locked."""
    d = config.data
    if d.unlabeled and not Path(d.unlabeled).is_dir():
        raise ConfigError(f"data.unlabeled: folder not found: {d.unlabeled}")
    records = labeled_records(config) if d.manifest else []  # checked before any write
    out, _ = prepare_run(config, save=False)
    start_run(config)
    cache = out / "cache"
    result = PrepareResult(out_dir=out, cache=cache)
    workers = None if d.workers is None else max(1, d.workers)  # None: every core
    if d.unlabeled:
        src = Path(d.unlabeled)
        say(f"resizing unlabeled images from {src} to {d.image_size} px into {cache / 'unlabeled'}")
        try:
            report = prepare_images(
                src,
                cache / "unlabeled",
                d.image_size,
                workers=workers,
                channels=d.in_chans,
                progress=config.train.progress,
            )
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from err
        say(report.summary())
        result.reports["unlabeled"] = report
    if d.manifest:
        say(f"manifest {d.manifest}: {len(records)} labeled images, labels valid")
        root = Path(d.image_root) if d.image_root else Path(d.manifest).parent
        try:
            report = prepare_images(
                root,
                cache / "labeled",
                d.image_size,
                workers=workers,
                channels=d.in_chans,
                files=[r.path for r in records],
                progress=config.train.progress,
            )
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from err
        say(report.summary())
        result.reports["labeled"] = report
        parts = make_split(config, records, out)
        result.split = out / "split.json"
        if d.unlabeled:
            evaluation = [r.path for k in ("val", "test") for r in parts.get(k, [])]
            result.overlap = len(find_eval_overlap(config, evaluation, out_dir=out))
    write_json(
        out / "prepare.json",
        {
            "cache": str(cache),
            "split": str(result.split) if result.split else None,
            "reports": {
                k: {
                    "total": r.total,
                    "written": r.written,
                    "skipped": r.skipped,
                    "failed": [list(f) for f in r.failed],
                }
                for k, r in result.reports.items()
            },
        },
    )
    result.next_commands = next_commands(config, result)
    lines = "\n".join(f"  {c}" for c in result.next_commands)
    say(
        f"prepared data in {out}; the commands below read the cache (its image size, "
        f"{d.image_size} px, is taken from it):\n{lines}"
    )
    return result


def next_commands(config: Config, result: PrepareResult) -> list[str]:
    """The ``pretrain`` and ``finetune`` command lines that train on a prepared folder.

    They name the cache (``--set data.cache``) and the split (``--split``), the label map and
    manifest columns when they are not the defaults, and output folders beside ``out``
    (``pretrain`` and ``finetune``); the image size comes from the cache. Each runs as
    printed.

    Args:
        config: The configuration ``prepare`` ran with.
        result: Its result.

    Returns:
        One command line per step (``pretrain`` when unlabeled images were prepared,
        ``finetune`` when a manifest was).
    """
    d, defaults = config.data, Config().data
    common = ["--set", f"data.cache={result.cache}"]
    if result.split:
        common += ["--split", str(result.split)]
    labels: list[str] = []
    if d.label_map != defaults.label_map:
        label_map = d.label_map if isinstance(d.label_map, str) else json.dumps(d.label_map)
        labels += ["--label-map", label_map]
    for key in ("image_root", "path_column", "label_column", "patient_column", "visit_column"):
        if getattr(d, key) != getattr(defaults, key):
            labels += ["--set", f"data.{key}={getattr(d, key)}"]
    base = result.out_dir.parent
    commands: list[list[str]] = []
    pretrained = base / "pretrain" / "best.pt"
    if d.unlabeled:
        args = ["pretrain", "--data", d.unlabeled, *common, "--out", str(base / "pretrain")]
        commands.append(args)
    if d.manifest:
        init = ["--init", str(pretrained)] if d.unlabeled else []
        args = ["finetune", "--data", d.manifest, *init, *common, *labels]
        commands.append([*args, "--out", str(base / "finetune")])
    return ["patchssl " + shlex.join(c) for c in commands]
