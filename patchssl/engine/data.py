"""From a configuration to datasets, splits and overlap checks (the engine's data plumbing).

Labeled images come from a CSV manifest, unlabeled ones from a folder. The split of the labeled
images is stratified by label and grouped by patient (train / val / test), saved with the run as
``split.json`` and reused when ``data.split`` names a saved one. When ``data.cache`` names the
output of ``patchssl prepare``, images are read from the resized copies there, while splits and
reports keep naming the original files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from torch.utils.data import DistributedSampler

from patchssl.data import (
    ImageFolderDataset,
    LabelMap,
    ManifestDataset,
    ManifestError,
    default_workers,
    find_images,
    find_overlap,
    load_split,
    make_loader,
    map_records_to_cache,
    read_manifest,
    records_from_split,
    save_split,
    split_records,
)
from patchssl.data.prepare import cache_path
from patchssl.engine.common import say, write_json
from patchssl.engine.config import Config, ConfigError
from patchssl.engine.distributed import get_rank, get_world_size, is_main_process
from patchssl.engine.logging import echo
from patchssl.engine.loop import describe_batch, per_process_batch_size

__all__ = [
    "cache_dirs",
    "check_labels",
    "find_eval_overlap",
    "labeled_dataset",
    "labeled_records",
    "make_split",
    "unlabeled_dataset",
    "write_split",
]


def cache_dirs(config: Config) -> tuple[Path, Path] | None:
    """``(unlabeled cache, labeled cache)`` folders of ``data.cache``, or ``None``."""
    if not config.data.cache:
        return None
    root = Path(config.data.cache)
    return root / "unlabeled", root / "labeled"


def unlabeled_dataset(config: Config, *, exclude: list[Path] | None = None) -> Any:
    """The :class:`patchssl.data.ImageFolderDataset` of ``data.unlabeled`` (or its cache).

    Args:
        config: Run configuration.
        exclude: Source image paths to leave out (overlap with the labeled evaluation images).

    Returns:
        The dataset (capped at ``data.max_images`` when set).
    """
    root = Path(config.data.unlabeled or "")
    if not root.is_dir():
        raise ConfigError(f"data.unlabeled: folder not found: {root}")
    cache = cache_dirs(config)
    source = root
    if cache is not None and cache[0].is_dir():
        source = cache[0]
        if exclude:
            exclude = [cache_path(p, root, cache[0]) for p in exclude]
        echo(f"reading unlabeled images from the cache {source}")
    try:
        dataset = ImageFolderDataset(
            source, config.data.image_size, channels=config.data.in_chans, exclude=exclude
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    if config.data.max_images and len(dataset) > config.data.max_images:
        dataset.paths = dataset.paths[: config.data.max_images]
    return dataset


def labeled_records(config: Config) -> list[Any]:
    """Read ``data.manifest`` with the configured label map and columns.

    Returns:
        The :class:`patchssl.data.Record` list (original image paths).

    Raises:
        ConfigError: When the manifest is missing, has unknown labels (listed) or bad columns.
    """
    if not config.data.manifest:
        raise ConfigError("labeled data needed: --data FILE.csv (data.manifest)")
    manifest = Path(config.data.manifest)
    if manifest.is_dir():
        for name in ("labeled.csv", "manifest.csv", "labels.csv"):
            if (manifest / name).is_file():
                manifest = manifest / name
                break
        else:
            raise ConfigError(f"data.manifest: {manifest} is a folder without a labeled.csv")
    d = config.data
    try:
        records = read_manifest(
            manifest,
            label_map=d.label_map,
            root=d.image_root,
            image_column=d.path_column,
            label_column=d.label_column,
            patient_column=d.patient_column or None,
            visit_column=d.visit_column or None,
            allow_outside_root=d.allow_outside_root,
        )
    except (ManifestError, FileNotFoundError) as err:
        message = str(err)  # the reader's messages name the file; name it once
        if str(manifest) not in message:
            message = f"{manifest}: {message}"
        raise ConfigError(message) from err
    if d.max_images and len(records) > d.max_images:
        records = records[: d.max_images]
    return records


def make_split(
    config: Config, records: list[Any], out_dir: Path, *, save: bool = True
) -> dict[str, list[Any]]:
    """Load ``data.split`` or draw a new patient-grouped, label-stratified split; save it.

    The split is written to ``<out>/split.json`` either way, so the run's folder always holds
    the split it used. A saved split that leaves manifest images out of every part is used
    as it is, with a warning that counts them.

    Args:
        config: Run configuration (``data.split``, ``test_size``, ``val_size``; ``train.seed``).
        records: Manifest records.
        out_dir: Run folder.
        save: Write ``split.json`` now; with ``False`` the caller writes it with
            :func:`write_split` once every other check has passed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` lists of records.

    Raises:
        ConfigError: When the saved split does not match the manifest, or a new split cannot
            be drawn (too few patients of a class).
    """
    d = config.data
    if d.split:
        try:
            parts = records_from_split(records, load_split(d.split))
        except (FileNotFoundError, KeyError, ValueError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ConfigError(f"data.split: {message}") from err
        source = f"reused {d.split}"
        used = {str(r.path) for part in parts.values() for r in part}
        unused = [r for r in records if str(r.path) not in used]
        if unused:
            echo(
                f"warning: the saved split {d.split} leaves {len(unused)} of {len(records)} "
                f"manifest image(s) out of every part (first: {unused[0].path}); they are not "
                "used. Drop data.split to draw a split of every image.",
                err=True,
            )
    else:
        if not 0.0 < d.test_size < 1.0 or not 0.0 <= d.val_size < 1.0:
            raise ConfigError(
                f"data.test_size must be in (0, 1) and data.val_size in [0, 1); got "
                f"{d.test_size} and {d.val_size}"
            )
        try:
            parts = split_records(
                records,
                test_size=d.test_size,
                val_size=d.val_size * (1.0 - d.test_size),
                seed=config.train.seed,
            )
        except ValueError as err:
            raise ConfigError(f"cannot split the labeled images: {err}") from err
        source = f"new split (seed {config.train.seed})"
    parts.setdefault("val", [])
    check_patient_leakage(parts)
    binary = max((r.label for r in records), default=0) <= 1

    def describe(part: list[Any]) -> str:
        if binary:
            labels = f"{sum(r.label for r in part)} positive"
        else:
            counts = Counter(r.label for r in part)
            labels = "classes " + "/".join(str(counts[c]) for c in sorted(counts))
        return f"{len(part)} ({labels}, {len({r.patient for r in part})} patients)"

    counts = ", ".join(f"{k} {describe(v)}" for k, v in parts.items())
    where = "saved to" if save else "to be saved to"
    echo(f"split ({source}): {counts}; {where} {out_dir / 'split.json'}")
    if save:
        write_split(config, parts, out_dir)
    return parts


def write_split(config: Config, parts: dict[str, list[Any]], out_dir: Path) -> Path:
    """Write the split of a run to ``<out_dir>/split.json`` (on the main process).

    Args:
        config: Run configuration (recorded with the split: manifest, seed, sizes).
        parts: ``{"train": [...], "val": [...], "test": [...]}`` from :func:`make_split`.
        out_dir: Run folder.

    Returns:
        The path of ``split.json``.
    """
    d = config.data
    meta = {
        "manifest": str(d.manifest),
        "seed": config.train.seed,
        "test_size": d.test_size,
        "val_size": d.val_size,
        "source": f"reused {d.split}" if d.split else f"new split (seed {config.train.seed})",
    }
    path = out_dir / "split.json"
    if is_main_process():  # every process draws the same split; rank 0 writes it
        save_split(path, parts, meta=meta)
    return path


def check_labels(config: Config, records: list[Any]) -> None:
    """Refuse labeled images whose classes cannot train ``model.num_classes`` classes.

    Raises:
        ConfigError: When the label map's number of classes differs from
            ``model.num_classes``, or a class has no image (listing the counts).
    """
    k = config.model.num_classes
    try:
        names = LabelMap.from_config(config.data.label_map).class_names
    except Exception:  # already read once by labeled_records; any problem was reported there
        names = tuple(str(i) for i in range(k))
    if len(names) != k:
        raise ConfigError(
            f"the label map has {len(names)} classes ({', '.join(names)}) but "
            f"model.num_classes={k}; set --set model.num_classes={len(names)} or use a "
            f"{k}-class label map"
        )
    counts = Counter(r.label for r in records)
    missing = [c for c in range(k) if counts[c] == 0]
    if missing:
        listed = ", ".join(f"class {c} ({names[c]}): {counts[c]}" for c in range(k))
        raise ConfigError(
            f"the labeled images do not cover every class ({listed} image(s)); a classifier "
            f"cannot learn class(es) {', '.join(names[c] for c in missing)} without "
            "examples. Add images of every class, or check the label column and --label-map."
        )


def check_patient_leakage(parts: dict[str, list[Any]]) -> None:
    """Refuse a split in which one patient's images are in two parts.

    Raises:
        ConfigError: Naming the patients and parts.
    """
    owner: dict[str, str] = {}
    clashes: list[str] = []
    for name, recs in parts.items():
        for r in recs:
            first = owner.setdefault(str(r.patient), name)
            if first != name:
                clashes.append(f"{r.patient} ({first} and {name})")
    if clashes:
        shown = ", ".join(sorted(set(clashes))[:5])
        raise ConfigError(
            f"patient leakage: {len(set(clashes))} patient(s) have images in two parts of the "
            f"split: {shown}. Make a new split (drop data.split) so that patients stay together."
        )


def to_cache(config: Config, records: list[Any]) -> list[Any]:
    """Point records at their resized copies in ``data.cache`` when it exists."""
    cache = cache_dirs(config)
    if cache is None or not cache[1].is_dir() or not records:
        return records

    root = config.data.image_root or str(Path(config.data.manifest or ".").parent)
    try:
        return map_records_to_cache(records, root, cache[1])
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.cache: {err}") from err


def labeled_dataset(config: Config, records: list[Any]) -> Any:
    """A :class:`patchssl.data.ManifestDataset` of ``records`` (read from the cache if any)."""
    return ManifestDataset(
        to_cache(config, records), config.data.image_size, channels=config.data.in_chans
    )


def find_eval_overlap(
    config: Config,
    labeled_paths: list[Path] | None = None,
    *,
    out_dir: Path | None = None,
    after_pretraining: bool = False,
    write: bool = True,
) -> list[Any]:
    """Check whether labeled evaluation images are also in the unlabeled pretraining folder.

    The evaluation images are ``labeled_paths`` when given, else the val and test parts of
    ``data.split`` when set, else every image of ``data.manifest``. Overlaps are reported with a
    warning (and written to ``<out>/overlap.json``); the caller excludes them from pretraining
    when ``data.exclude_overlap`` is set.

    Args:
        config: Run configuration.
        labeled_paths: Evaluation images to compare against.
        out_dir: Where to write ``overlap.json`` (default ``config.out``).
        after_pretraining: The check runs after pretraining (fine-tuning): the message then
            says how to redo the pretraining without them.
        write: Write ``overlap.json`` now; a run that has not finished its checks passes
            ``False`` and calls :func:`write_overlap` once it may write.

    Returns:
        The :class:`patchssl.data.Overlap` list (empty when there is none).
    """
    d = config.data
    if not d.unlabeled or not Path(d.unlabeled).is_dir():
        return []
    if labeled_paths is None:
        if d.split and Path(d.split).is_file():
            parts = load_split(d.split)
            labeled_paths = [Path(p) for k in ("val", "test") for p in parts.get(k, [])]
        elif d.manifest:
            labeled_paths = [r.path for r in labeled_records(config)]
        else:
            return []
    pretrain_paths = find_images(Path(d.unlabeled))
    overlaps = find_overlap(pretrain_paths, labeled_paths)
    if not overlaps:
        return []
    out = Path(out_dir or config.out)
    if write:
        write_overlap(out, overlaps)
    shown = "; ".join(f"{o.pretrain} = {o.labeled} ({o.reason})" for o in overlaps[:3])
    if after_pretraining:
        action = (
            "the pretrained encoder has seen them; pretrain again with "
            "data.exclude_overlap=true for an unbiased test"
        )
    elif d.exclude_overlap:
        action = "excluded from pretraining"
    else:
        action = "kept; set data.exclude_overlap=true to leave them out of pretraining"
    echo(
        f"warning: {len(overlaps)} labeled evaluation image(s) are also in the pretraining folder "
        f"{d.unlabeled} ({action}): {shown}; list in {out / 'overlap.json'}",
        err=True,
    )
    return overlaps


def write_overlap(out: Path, overlaps: list[Any]) -> None:
    """Write the overlaps found by :func:`find_eval_overlap` to ``<out>/overlap.json``.

    Args:
        out: The run folder.
        overlaps: :class:`patchssl.data.Overlap` entries; nothing is written when empty.
    """
    if not overlaps:
        return

    write_json(
        Path(out) / "overlap.json",
        [
            {"pretrain": str(o.pretrain), "labeled": str(o.labeled), "reason": o.reason}
            for o in overlaps
        ],
    )


def training_loaders(
    config: Config, train_set: Any, val_set: Any | None, device: Any
) -> tuple[Any, Any, Any | None]:
    """The loaders of a training run: the training loader, its sampler, the validation loader.

    Every process draws the same data order from torch's ``DistributedSampler`` seeded with
    ``train.seed`` (the order of an epoch depends only on the seed and the epoch, so a run can
    resume with another number of processes), sharded by rank (padded to equal shards). Every
    training image is kept, so that unreadable ones are all reported, except a lone last one
    (decided on the shard length, which is the same on every process). Memory is pinned on
    CUDA. ``data.workers`` unset: :func:`patchssl.data.default_workers` of the device.

    Args:
        config: Run configuration (``train.batch_size`` or ``train.global_batch_size``,
            ``train.seed``, ``data.workers``).
        train_set: Training dataset of this process's run.
        val_set: Validation dataset, or ``None`` for no validation.
        device: The run's ``torch.device``.

    Returns:
        ``(loader, sampler, val_loader)``; ``val_loader`` is ``None`` without ``val_set``.
    """
    train_cfg = config.train
    batch_size = per_process_batch_size(train_cfg)
    say(f"batch size: {describe_batch(batch_size)}")
    sampler = DistributedSampler(
        train_set,
        num_replicas=get_world_size(),
        rank=get_rank(),
        shuffle=True,
        seed=train_cfg.seed,
    )
    pin = device.type == "cuda"
    workers = config.data.workers
    if workers is None:
        workers = default_workers(device)
        say(f"data loader: {workers} worker process(es) (data.workers, from the cores and device)")
    loader = make_loader(
        train_set,
        batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=len(sampler) > batch_size and len(sampler) % batch_size == 1,
        pin_memory=pin,
        persistent_workers=workers > 0,
        seed=train_cfg.seed,
    )
    val_loader = None
    if val_set is not None:
        # As many workers as it has batches, up to the training loader's: with fewer, decoding
        # the held-out images dominated each epoch's fixed cost on a GPU (2 workers for 526
        # images took about 0.8 s). Workers that stay alive save their start-up every epoch.
        val_batches = -(-len(val_set) // batch_size)
        val_loader = make_loader(
            val_set,
            batch_size,
            num_workers=min(workers, val_batches),
            pin_memory=pin,
            persistent_workers=workers > 0,
        )
    return loader, sampler, val_loader
