"""Datasets that decode images to uint8 tensors, and a loader whose failures never stop an epoch.

Datasets here only decode and resize: tiling, shuffling and normalisation happen later, on the
device, on whole batches (see :class:`patchssl.tiling.PatchTiler`). An item is a dict::

    {"image": uint8 (C, H, W), "index": int, "path": str, ...}       # a good item
    {"error": reason, "index": int, "path": str, "shape": (C, H, W), ...}  # an unreadable file

and :func:`collate_skip_failed` stacks the good items and lists the failed ones, so that a
corrupt or truncated file is skipped, counted and reported instead of stopping training.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from patchssl._validation import check_int
from patchssl.data.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ResizeMode,
    SizeLike,
    _check_channels,
    _check_resize,
    is_image_file,
    load_image,
    normalize_size,
)
from patchssl.data.manifest import Record

__all__ = [
    "ImageFolderDataset",
    "ManifestDataset",
    "collate_skip_failed",
    "default_workers",
    "find_images",
    "make_loader",
    "seed_worker",
]


def find_images(
    root: str | os.PathLike[str],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    *,
    follow_symlinks: bool = True,
) -> list[Path]:
    """List image files under ``root``, recursively, in a deterministic sorted order.

    Hidden files and folders (names starting with ``.``) are skipped. Matching of
    ``extensions`` is case-insensitive (``.JPG`` matches ``.jpg``). The order is the sorted
    order of the paths relative to ``root`` (POSIX form), the same on every machine. Each
    real folder is scanned once, however many symbolic links lead to it (a link back to a
    parent folder cannot make the scan loop or list an image twice), and only regular files
    are kept (a FIFO or a device named ``x.png`` would block the loader).

    Args:
        root: Folder to scan.
        extensions: File name endings to keep, with the dot (``".png"``).
        follow_symlinks: Whether to descend into symlinked folders.

    Returns:
        Paths of the image files (``root`` joined with the relative path).

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is a file.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is a file, not a folder")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found: list[tuple[str, Path]] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in seen_dirs:
            dirnames[:] = []  # this real folder was scanned already (a symlink loop)
            continue
        seen_dirs.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if is_image_file(name, exts):
                path = Path(dirpath) / name
                try:
                    regular = stat.S_ISREG(os.stat(path).st_mode)
                except OSError:  # a dangling link
                    regular = False
                if regular:
                    found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


class _ImageDataset(Dataset[dict[str, Any]]):
    """Shared decoding and error handling of the two datasets."""

    def __init__(
        self,
        image_size: SizeLike | None,
        *,
        channels: int = 3,
        resize: ResizeMode | str = "stretch",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        _check_channels(channels)
        _check_resize(resize)
        self.image_size = None if image_size is None else normalize_size(image_size)
        self.channels = channels
        self.resize = resize
        self.transform = transform

    def _path(self, index: int) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    def _meta(self, index: int) -> dict[str, Any]:
        return {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        path = self._path(index)
        item: dict[str, Any] = {"index": index, "path": str(path), **self._meta(index)}
        try:
            image = load_image(path, self.image_size, channels=self.channels, resize=self.resize)
        except ImageReadError as err:
            item["error"] = err.reason
            if self.image_size is not None:
                item["shape"] = (self.channels, *self.image_size)
            return item
        if self.transform is not None:
            image = self.transform(image)
        item["image"] = image
        return item

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError


class ImageFolderDataset(_ImageDataset):
    """All images under a folder (recursively, sorted), for pretraining on unlabeled data.

    Args:
        root: Folder of images (sub-folders are scanned too; hidden files are skipped).
        image_size: Working size ``S`` or ``(H, W)``; None keeps each file's own size (then
            the batch size must be 1 or all files the same size).
        extensions: File endings to pick up (case-insensitive).
        channels: 3 (RGB) or 1 (grayscale).
        resize: ``"stretch"`` (the paper's), ``"pad"`` or ``"center_crop"``; see
            :func:`patchssl.data.io.resize_image`.
        exclude: Paths to leave out (for example images that are also in the labeled
            evaluation set; see :func:`patchssl.data.splits.find_overlap`). Compared after
            ``os.path.abspath``.
        transform: Optional function applied to each uint8 ``(C, H, W)`` tensor.

    Items:
        ``{"image": uint8 tensor (C, H, W), "index": int, "path": str}``, or for a file that
        cannot be read ``{"error": str, "index": int, "path": str, "shape": (C, H, W)}``.

    Raises:
        FileNotFoundError: If ``root`` does not exist or holds no image with one of
            ``extensions``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: SizeLike | None,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        channels: int = 3,
        resize: ResizeMode | str = "stretch",
        exclude: Iterable[str | os.PathLike[str]] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(image_size, channels=channels, resize=resize, transform=transform)
        self.root = Path(root)
        paths = find_images(self.root, extensions)
        if not paths:
            raise FileNotFoundError(
                f"no images found under {self.root} (looked recursively for files ending in "
                f"{', '.join(extensions)}; hidden files are skipped). Check the path, or pass "
                "extensions=... for other file types."
            )
        self.num_excluded = 0
        if exclude is not None:
            drop = {os.path.abspath(p) for p in exclude}
            kept = [p for p in paths if os.path.abspath(p) not in drop]
            self.num_excluded = len(paths) - len(kept)
            paths = kept
            if not paths:
                raise ValueError(f"every image under {self.root} is in `exclude`; none is left")
        self.paths: list[Path] = paths

    def __len__(self) -> int:
        return len(self.paths)

    def _path(self, index: int) -> Path:
        return self.paths[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, images={len(self)}, "
            f"image_size={self.image_size}, channels={self.channels}, resize={self.resize!r})"
        )


class ManifestDataset(_ImageDataset):
    """Labeled images listed in a manifest (see :func:`patchssl.data.manifest.read_manifest`).

    Args:
        records: The manifest rows (each with a resolved ``path``, an integer ``label``, a
            ``patient`` and an optional ``visit``).
        image_size: Working size ``S`` or ``(H, W)``.
        channels: 3 (RGB) or 1 (grayscale).
        resize: ``"stretch"``, ``"pad"`` or ``"center_crop"``.
        transform: Optional function applied to each uint8 ``(C, H, W)`` tensor.

    Items:
        ``{"image": uint8 (C, H, W), "label": int, "index": int, "path": str,
        "patient": str, "visit": str | None}``; an unreadable file gives the same keys with
        ``"error"`` in place of ``"image"``.

    Raises:
        ValueError: If ``records`` is empty.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: SizeLike | None,
        *,
        channels: int = 3,
        resize: ResizeMode | str = "stretch",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(image_size, channels=channels, resize=resize, transform=transform)
        self.records: list[Record] = list(records)
        if not self.records:
            raise ValueError("ManifestDataset needs at least one record; the manifest is empty")

    def __len__(self) -> int:
        return len(self.records)

    def _path(self, index: int) -> Path:
        return Path(self.records[index].path)

    def _meta(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        return {"label": r.label, "patient": r.patient, "visit": r.visit}

    @property
    def labels(self) -> np.ndarray:
        """Integer labels, shape ``(len(self),)``."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def groups(self) -> list[str]:
        """Patient id of each record (the grouping used by the splits)."""
        return [r.patient for r in self.records]

    @property
    def paths(self) -> list[Path]:
        """Image path of each record."""
        return [Path(r.path) for r in self.records]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, image_size={self.image_size}, "
            f"channels={self.channels}, resize={self.resize!r})"
        )


def collate_skip_failed(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable items of a batch and list the unreadable ones.

    Args:
        items: Dataset items (see :class:`ImageFolderDataset`); failed items carry
            ``"error"`` instead of ``"image"``.

    Returns:
        A dict with ``"image"``, a uint8 tensor ``(B, C, H, W)`` of the ``B`` good items
        (channels-last strides when the items are :func:`patchssl.data.io.load_image`'s
        views of ``(H, W, C)`` memory)
        (``B`` may be 0: then the shape is ``(0, C, H, W)`` when the working size is known,
        else ``(0, 0, 0, 0)``; check ``batch["image"].shape[0]`` and skip such a batch);
        ``"index"``, a long tensor ``(B,)``; ``"label"``, a long tensor ``(B,)`` when the
        items have labels; ``"path"`` and any other per-item fields (``"patient"``,
        ``"visit"``) as lists of length ``B``; and ``"failed"``, a list of ``(path, reason)``
        for the items that could not be read.

    Raises:
        ValueError: If the good images have different shapes (set an ``image_size``).
    """
    good = [it for it in items if "error" not in it]
    bad = [it for it in items if "error" in it]
    batch: dict[str, Any] = {"failed": [(str(it["path"]), str(it["error"])) for it in bad]}
    if good:
        shapes = {tuple(it["image"].shape) for it in good}
        if len(shapes) > 1:
            raise ValueError(
                f"images in one batch have different shapes {sorted(shapes)}; give the dataset "
                "an image_size so that every image is resized to the same size"
            )
        batch["image"] = _stack_images([it["image"] for it in good])
    else:
        shape = next((tuple(it["shape"]) for it in bad if "shape" in it), (0, 0, 0))
        batch["image"] = torch.empty((0, *shape), dtype=torch.uint8)
    batch["index"] = torch.tensor([int(it["index"]) for it in good], dtype=torch.long)
    keys: list[str] = []
    for it in items:
        for key in it:
            if key not in ("image", "index", "error", "shape") and key not in keys:
                keys.append(key)
    for key in keys:
        values = [it.get(key) for it in good]
        if key == "label":
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            batch[key] = values
    return batch


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(C, H, W)`` images into ``(B, C, H, W)`` with one plain copy.

    Images that are views of ``(H, W, C)`` memory (what :func:`patchssl.data.io.load_image`
    returns) are stacked as such, so the batch is channels-last (no transposing copy on the
    loader's core: the device converts, if it needs to, at its own speed); others are
    stacked channels-first. In a DataLoader worker the batch is written straight into shared
    memory, as ``torch.utils.data.default_collate`` does, instead of being copied there when
    it is sent to the main process.
    """
    hwc = [im.permute(1, 2, 0) for im in images]
    if all(t.is_contiguous() for t in hwc):
        parts, permute = hwc, (0, 3, 1, 2)
    else:
        parts, permute = images, None
    out = None
    if torch.utils.data.get_worker_info() is not None:
        first = parts[0]
        numel = first.numel() * len(parts)
        storage = first.untyped_storage()._new_shared(numel * first.element_size())
        out = first.new(storage).resize_(len(parts), *first.shape)
    stacked = torch.stack(parts, out=out)
    return stacked.permute(*permute) if permute is not None else stacked


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a DataLoader worker from its torch seed.

    PyTorch already gives every worker its own torch seed (derived from the loader's
    generator); this makes user transforms that use ``random`` or ``np.random`` repeat too.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def default_workers(device: torch.device | str | None = None) -> int:
    """How many decoding processes a loader should use, from the cores and the device.

    The cores are those this process may run on (``os.sched_getaffinity``, which honours
    ``taskset`` and container CPU sets; ``os.cpu_count()`` where it is missing), shared
    among the processes of a ``torchrun`` job on this machine (``LOCAL_WORLD_SIZE``).

    * CUDA (or another accelerator): every core but one (the one that drives the device),
      at most 16. A 512 px JPEG costs 1.5 to 3 ms of a core to decode, so a GPU step at
      1,000 to 1,500 images/s needs several.
    * CPU: none on 4 cores or fewer (decoding in the training process costs about 1% of a
      CPU step, and a worker process would take a core from the step's threads), else one
      per 4 cores, at most 4.

    Args:
        device: The training device (``None``: CUDA when available, else the CPU).

    Returns:
        The number of workers (``num_workers`` of a ``DataLoader``).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    cores = max(1, cores // local)
    if device is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
    if kind == "cpu":
        return 0 if cores <= 4 else min(4, cores // 4)
    return max(1, min(16, cores - 1))


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int | None = 0,
    drop_last: bool = False,
    sampler: Sampler[int] | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable[[list[Any]], Any] = collate_skip_failed,
    prefetch_factor: int | None = None,
) -> DataLoader[Any]:
    """A DataLoader that repeats exactly for a given seed and never dies on a bad file.

    The shuffling order comes from a ``torch.Generator`` seeded with ``seed`` (never from the
    global RNG), each worker's RNGs are derived from it (:func:`seed_worker`), and batches
    are built with :func:`collate_skip_failed`.

    Args:
        dataset: Any dataset of dict items (usually :class:`ImageFolderDataset` or
            :class:`ManifestDataset`).
        batch_size: Images per batch (>= 1).
        shuffle: Reshuffle every epoch (ignored when ``sampler`` is given).
        seed: Seed of the loader's generator.
        num_workers: Decoding processes (0 = in the main process; ``None`` =
            :func:`default_workers`).
        drop_last: Drop the last incomplete batch.
        sampler: Custom sampler (for example a class-balanced one); exclusive with shuffle.
        pin_memory: Pin batches for faster host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs (needs ``num_workers > 0``).
        collate_fn: Batch builder.
        prefetch_factor: Batches each worker prepares ahead (``None``: torch's default, 2;
            only with workers).

    Returns:
        A ``torch.utils.data.DataLoader`` yielding dicts with ``"image"`` of shape
        ``(B, C, H, W)`` uint8 (see :func:`collate_skip_failed`).

    Raises:
        ValueError: For a non-positive ``batch_size`` or negative ``num_workers``.
        TypeError: For a ``batch_size`` or ``num_workers`` that is not an int.
    """
    check_int(batch_size, "batch_size")
    if num_workers is None:
        num_workers = default_workers(None if pin_memory else "cpu")
    check_int(num_workers, "num_workers", minimum=0)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
