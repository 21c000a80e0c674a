"""Frozen-feature probes of an encoder (``patchssl probe``), and the kNN probe of pretraining.

``patchssl probe --checkpoint CKPT --data MANIFEST`` embeds the labeled images with the frozen
encoder of a checkpoint and fits linear and kNN probes on a patient-grouped split
(:func:`patchssl.probe.probe_features`); ``--checkpoint none`` does the same with a randomly
initialised encoder of the configured geometry, seeded as a pretraining run with the same
``train.seed`` starts, so "pretrained against random" is one command each. During
``patchssl pretrain``, ``probe.manifest`` (``--probe-data``) adds the kNN probe's AUC to
``metrics.csv`` every ``probe.every`` epochs (:class:`PretrainProbe`).

References:
    Alain & Bengio, arXiv:1610.01644, 2016 (linear probes). Wu et al., CVPR 2018
    (arXiv:1805.01978) and Caron et al., ICCV 2021 (arXiv:2104.14294) (the weighted kNN).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patchssl.checkpoint import CheckpointError
from patchssl.classifier import checkpoint_input_norm
from patchssl.data import grouped_stratified_split, load_split, make_loader, records_from_split
from patchssl.engine.common import (
    as_config,
    build_encoder,
    build_tiler,
    prepare_run,
    say,
    write_json,
)
from patchssl.engine.config import Config, ConfigError
from patchssl.engine.data import labeled_dataset, labeled_records
from patchssl.engine.distributed import broadcast_object, is_main_process
from patchssl.engine.logging import SkippedFiles, echo, progress
from patchssl.engine.seeding import derive_seed
from patchssl.pretext import get_pretext_class
from patchssl.probe import embed_images, encoder_from_checkpoint, probe_features

__all__ = ["PretrainProbe", "ProbeRunResult", "probe"]

# geometry keys a command-line flag may set, and how the checkpoint's tiler/encoder says them
GEOMETRY_KEYS = ("backbone", "image_size", "patch_size", "grid")


@dataclass
class ProbeRunResult:
    """What :func:`probe` produced.

    Attributes:
        result: The :class:`patchssl.probe.ProbeResult`.
        out_dir: Output folder.
        json_path: ``probe.json``.
        markdown_path: ``probe.md``.
    """

    result: Any
    out_dir: Path
    json_path: Path
    markdown_path: Path


def _is_random(checkpoint: str) -> bool:
    return checkpoint.strip().lower() in ("none", "random", "null")


def _pretext_input_norm(config: Config) -> str:
    """The input normalisation the configured pretext task would train with."""
    options = dict(config.pretext.options)
    if "per_patch_norm" in options:
        return "per_patch" if options["per_patch_norm"] else "encoder"
    nested = options.get("defences")
    if isinstance(nested, Mapping) and "per_patch_norm" in nested:
        return "per_patch" if nested["per_patch_norm"] else "encoder"
    try:
        cls = get_pretext_class(config.pretext.name)
        defaults = cls.default_defences()
    except (KeyError, ImportError, TypeError, ValueError, AttributeError):  # a broken plugin
        return "encoder"
    return "per_patch" if defaults.normalizes else "encoder"


def _geometry(encoder: nn.Module, tiler: nn.Module) -> dict[str, Any]:
    return {
        "backbone": getattr(encoder, "backbone_name", None),
        "image_size": int(tiler.image_size[0]),
        "patch_size": int(tiler.patch_size[0]),
        "grid": int(tiler.grid[0]),
    }


def _check_expected(source: str, geometry: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    """Refuse geometry flags that disagree with the checkpoint, listing every difference."""
    differences = [
        f"{key}: the checkpoint has {geometry[key]!r}, --{key.replace('_', '-')} asks for {value!r}"
        for key, value in expect.items()
        if value is not None and key in geometry and geometry[key] != value
    ]
    if differences:
        raise ConfigError(
            f"{source} does not match the geometry flags ({'; '.join(differences)}). With a "
            "checkpoint the geometry comes from the checkpoint: leave these flags out, or "
            "probe a random encoder of that geometry with --checkpoint none."
        )


def load_probe_encoder(
    config: Config, device: torch.device, *, expect: Mapping[str, Any] | None = None
) -> tuple[nn.Module, nn.Module, str, dict[str, Any]]:
    """The encoder, tiler and input normalisation that ``probe.checkpoint`` names.

    Args:
        config: Run configuration (``probe.checkpoint``; for ``none`` the geometry of
            ``model``/``data`` and ``train.seed``).
        device: Where the encoder goes.
        expect: Geometry flags given on the command line (``backbone``, ``image_size``,
            ``patch_size``, ``grid``); with a checkpoint, any that differs is refused.

    Returns:
        ``(encoder in eval mode, tiler, input_norm, description)``.

    Raises:
        ConfigError: No checkpoint named, a file that cannot be read, or conflicting flags.
    """
    name = config.probe.checkpoint
    if not name:
        raise ConfigError(
            "the probe needs an encoder: --checkpoint FILE (a checkpoint of patchssl pretrain), "
            "or --checkpoint none for a randomly initialised encoder (the baseline)"
        )
    if _is_random(name):
        torch.manual_seed(derive_seed(config.train.seed, "init"))  # as pretraining starts
        encoder = build_encoder(config, device)
        tiler = build_tiler(config)
        norm = _pretext_input_norm(config)
        source = f"random initialisation (seed {config.train.seed})"
    else:
        try:
            encoder, tiler, norm = encoder_from_checkpoint(name)
        except FileNotFoundError as err:
            raise ConfigError(f"probe.checkpoint: {err}") from err
        except (CheckpointError, ValueError, TypeError, KeyError) as err:
            message = f"probe.checkpoint: cannot load the encoder of {name}: {err}"
            raise ConfigError(message) from err
        _check_expected(name, _geometry(encoder, tiler), expect or {})
        source = name
    chosen = config.probe.input_norm
    if chosen not in ("auto", "per_patch", "encoder"):
        raise ConfigError(f"probe.input_norm must be auto, per_patch or encoder; got {chosen!r}")
    norm = norm if chosen == "auto" else chosen
    info = {"encoder": source, "input_norm": norm, **_geometry(encoder, tiler)}
    return encoder.to(device).eval(), tiler.to(device).eval(), norm, info


def probe(
    config: Config | dict[str, Any] | str | Path | None,
    *,
    expect: Mapping[str, Any] | None = None,
) -> ProbeRunResult:
    """Probe a frozen encoder on a labeled manifest; write ``probe.json`` and ``probe.md``.

    The labeled images (``data.manifest``, with the ``data`` columns and label map) are
    embedded once; linear and kNN probes on mean-, max-pooled and concatenated features, and the
    position diagnostic, are fitted on a patient-grouped split: ``data.split`` when given
    (its train and val parts fit, its test part tests), else one drawn with
    ``probe.test_size`` and ``train.seed``. Intervals: ``eval.n_boot`` resamples of patients,
    level ``eval.ci``.

    Args:
        config: Run configuration (``probe.checkpoint``, ``data.manifest``, ``out``).
        expect: Geometry flags given on the command line, checked against the checkpoint.

    Returns:
        The :class:`ProbeRunResult`.

    Raises:
        ConfigError: Missing encoder or manifest, conflicting flags, labels that are not
            binary, or too few patients of a class to split.
    """
    config = as_config(config)
    pc = config.probe
    out, device = prepare_run(config, save=False)
    encoder, tiler, norm, info = load_probe_encoder(config, device, expect=expect)
    config.data.image_size = info["image_size"]
    config.data.in_chans = int(getattr(encoder, "in_chans", config.data.in_chans))
    say(f"probing {info['encoder']} ({info['backbone']}, {norm} input norm) on {device}")
    records = labeled_records(config)
    n_fit = None
    if config.data.split:
        try:
            parts = records_from_split(records, load_split(config.data.split))
        except (KeyError, ValueError, FileNotFoundError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ConfigError(f"data.split {config.data.split}: {message}") from err
        fit = [*parts.get("train", []), *parts.get("val", [])]
        records, n_fit = fit + list(parts.get("test", [])), len(fit)
        if not n_fit or n_fit == len(records):
            raise ConfigError(f"data.split {config.data.split} needs train and test images")
    loader = make_loader(
        labeled_dataset(config, records),
        config.train.batch_size,
        num_workers=config.data.workers,
        pin_memory=device.type == "cuda",
    )
    emb = embed_images(
        encoder,
        loader,
        tiler=tiler,
        input_norm=norm,
        device=device,
        progress=lambda it: progress(
            it, total=len(loader), desc="probe: embedding", enabled=config.train.progress
        ),
    )
    skipped = SkippedFiles(out)
    skipped.add(emb.failed, where="probe")
    skipped.report("probe")
    split = None
    if n_fit is not None:
        split = (np.flatnonzero(emb.indices < n_fit), np.flatnonzero(emb.indices >= n_fit))
    try:
        result = probe_features(
            emb.features,
            emb.labels,
            emb.groups,
            split=split,
            test_size=pc.test_size,
            seed=config.train.seed,
            k=pc.k,
            temperature=pc.temperature,
            n_boot=config.eval.n_boot,
            alpha=1.0 - config.eval.ci,
        )
    except ValueError as err:
        raise ConfigError(f"probe of {config.data.manifest}: {err}") from err
    result.counts["unreadable"] = len(emb.failed)
    result.settings.update(
        {**info, "manifest": str(config.data.manifest), "data_split": config.data.split}
    )
    json_path = write_json(out / "probe.json", result.to_dict())
    markdown = result.to_markdown(f"Frozen-feature probe of {info['encoder']}")
    markdown_path = out / "probe.md"
    if is_main_process():
        markdown_path.write_text(markdown, encoding="utf-8")
    say(f"probe written to {json_path} and {markdown_path}")
    echo(markdown)
    return ProbeRunResult(result, out, json_path, markdown_path)


class PretrainProbe:
    """The kNN probe that ``patchssl pretrain`` runs every ``probe.every`` epochs.

    The labeled images of ``probe.manifest`` are read and split by patient once, at the
    start; each probe embeds them with the current (frozen, eval-mode) encoder and returns
    the kNN probe's test AUC on mean-pooled features as ``probe_knn_auc`` (no logistic
    regression, no bootstrap: it costs one pass over the labeled images). Rank 0 computes it
    and sends it to the other processes.

    Args:
        config: Run configuration (``probe.manifest``, ``probe.every``, ``probe.test_size``,
            ``probe.k``, ``probe.temperature``; columns and label map from ``data``).
        device: Device of the model.

    Raises:
        ConfigError: On an unreadable manifest, non-binary labels, or too few patients of a
            class to split.
    """

    def __init__(self, config: Config, device: torch.device) -> None:
        pc = config.probe
        if pc.every < 0:
            raise ConfigError(f"probe.every must be >= 0 (0 = off); got {pc.every}")
        self.every = pc.every
        self.epochs = config.train.epochs
        self.config = config
        self.device = device
        labeled = config.copy()
        labeled.data.manifest = pc.manifest
        labeled.data.max_images = None
        records = labeled_records(labeled)
        labels = np.array([r.label for r in records])
        if not set(np.unique(labels).tolist()) <= {0, 1}:
            raise ConfigError(
                f"probe.manifest {pc.manifest}: the probe needs binary labels (0/1 after the "
                f"label map); got {sorted(set(labels.tolist()))}"
            )
        try:
            train, test = grouped_stratified_split(
                labels, [r.patient for r in records], test_size=pc.test_size, seed=config.train.seed
            )
        except ValueError as err:
            raise ConfigError(f"probe.manifest {pc.manifest}: {err}") from err
        self.train_set, self.test_set = set(train.tolist()), set(test.tolist())
        self.loader = make_loader(
            labeled_dataset(labeled, records),
            config.train.batch_size,
            num_workers=0,
            pin_memory=device.type == "cuda",
        )
        say(
            f"kNN probe every {self.every} epoch(s) on {len(records)} labeled images of "
            f"{pc.manifest} ({len(train)} fit, {len(test)} test, grouped by patient)"
        )

    def due(self, epoch: int) -> bool:
        """Whether the probe runs after ``epoch`` (0-based): every ``every``-th, and the last."""
        done = epoch + 1
        return self.every > 0 and (done % self.every == 0 or done == self.epochs)

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Probe the encoder of the pretext task ``model`` after ``epoch``.

        Args:
            model: The pretext task (its ``encoder``, ``tiler`` and ``model_config``).
            epoch: 0-based epoch.

        Returns:
            ``{"probe_knn_auc": auc}`` when due (``nan`` when undefined), else ``{}``.
        """
        if not self.due(epoch):
            return {}
        auc = float("nan")
        if is_main_process():
            auc = self._knn_auc(model)
        return {"probe_knn_auc": float(broadcast_object(auc))}

    def _knn_auc(self, model: nn.Module) -> float:
        emb = embed_images(
            model.encoder,
            self.loader,
            tiler=model.tiler,
            input_norm=checkpoint_input_norm(model.model_config),
            device=self.device,
        )
        train = np.flatnonzero([i in self.train_set for i in emb.indices.tolist()])
        test = np.flatnonzero([i in self.test_set for i in emb.indices.tolist()])
        if len(np.unique(emb.labels[train])) < 2 or len(test) == 0:
            return float("nan")  # unreadable images left a side without a class
        pc = self.config.probe
        result = probe_features(
            emb.features,
            emb.labels,
            emb.groups,
            split=(train, test),
            methods=("knn",),
            poolings=("mean",),
            position=False,
            k=pc.k,
            temperature=pc.temperature,
            n_boot=0,
        )
        value = result.get("knn")
        return float("nan") if value is None else float(value)
