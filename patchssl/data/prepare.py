"""The resize cache: decode and resize a folder of large originals once, in parallel.

Cervix photographs are about 2800 x 1900 pixels; decoding one takes far longer than a
training step needs it to. :func:`prepare_images` writes every image of a folder, at the
working size, into a cache folder that mirrors the source tree; training then reads the
cache. The run is:

* parallel (a thread pool: Pillow releases the GIL while decoding, resizing and encoding);
* resumable: outputs that already exist at the right size are skipped, and every output is
  written to a temporary name and then renamed (``os.replace``), so an interrupted run never
  leaves a half-written image under its final name (a leftover temporary file is simply
  overwritten by the next run);
* forgiving: a file that cannot be read is skipped and listed in the report, with its reason;
* documented: ``dst/patchssl_prepare.json`` records the settings, the counts, the failures
  and the source -> cache mapping.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from patchssl._validation import atomic_write, check_int
from patchssl.data.datasets import find_images
from patchssl.data.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ResizeMode,
    SizeLike,
    _check_channels,
    _check_resize,
    load_pil_image,
    normalize_size,
)
from patchssl.data.manifest import Record

__all__ = [
    "INDEX_NAME",
    "PrepareReport",
    "cache_path",
    "map_records_to_cache",
    "prepare_images",
]

#: Name of the JSON index written into the cache folder.
INDEX_NAME = "patchssl_prepare.json"
_TMP_SUFFIX = ".patchssl-tmp"
_FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg"}


@dataclass
class PrepareReport:
    """What :func:`prepare_images` did.

    Attributes:
        src: Source folder.
        dst: Cache folder.
        total: Images found.
        written: Images decoded, resized and written in this run.
        skipped: Images whose cache file already existed at the right size.
        failed: ``(source path, reason)`` for each image that could not be read.
        seconds: Wall time of the run.
        index_path: The JSON index in ``dst``.
    """

    src: Path
    dst: Path
    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    index_path: Path | None = None

    def summary(self) -> str:
        """One line for the console."""
        text = (
            f"prepared {self.total} images into {self.dst}: {self.written} written, "
            f"{self.skipped} already there, {len(self.failed)} failed ({self.seconds:.1f} s)"
        )
        if self.failed:
            text += "; failed: " + "; ".join(f"{p} ({r})" for p, r in self.failed[:5])
            if len(self.failed) > 5:
                text += f"; ... and {len(self.failed) - 5} more (see {self.index_path})"
        return text


def _normalize_format(format: str) -> str:
    fmt = format.lower()
    if fmt not in _FORMATS:
        raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
    return "jpeg" if fmt == "jpg" else fmt


def cache_path(
    path: str | os.PathLike[str],
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    format: str = "png",
) -> Path:
    """Where :func:`prepare_images` writes (or wrote) the cached copy of ``path``.

    The cache mirrors the source tree; only the file extension changes to the cache format
    (``a/b/img.JPG`` -> ``dst/a/b/img.png``).

    Args:
        path: A source image under ``src``.
        src: The source folder given to :func:`prepare_images`.
        dst: The cache folder.
        format: ``"png"`` or ``"jpeg"``.

    Returns:
        The cache path.

    Raises:
        ValueError: If ``path`` is not under ``src``.
    """
    suffix = _FORMATS[_normalize_format(format)]
    src_abs = Path(os.path.abspath(src))
    p = Path(os.path.abspath(path))
    try:
        rel = p.relative_to(src_abs)
    except ValueError:
        raise ValueError(f"{path} is not inside the source folder {src}") from None
    return Path(dst) / rel.with_suffix(suffix)


def map_records_to_cache(
    records: Sequence[Record],
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    format: str = "png",
    *,
    check_files: bool = True,
) -> list[Record]:
    """Point manifest records at their cached copies (same relative paths under ``dst``).

    Args:
        records: Records whose paths are under ``src``.
        src: The source folder that was prepared.
        dst: The cache folder.
        format: The cache format used.
        check_files: Raise if a cached file is missing (for example because the original
            could not be read, or ``prepare`` was not run).

    Returns:
        New records with ``path`` in the cache (everything else unchanged).

    Raises:
        ValueError: If a record's image is not under ``src``.
        FileNotFoundError: If cached files are missing (listed, with the count).
    """
    out = [r.with_path(os.path.abspath(cache_path(r.path, src, dst, format))) for r in records]
    if check_files:
        missing = [str(r.path) for r in out if not r.path.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of {len(out)} cached images are missing in {dst}: {shown}. "
                f"Run `patchssl prepare` on {src} first (or check its report for files it "
                "could not read)."
            )
    return out


def _is_complete(path: Path, size: tuple[int, int]) -> bool:
    """Whether a cache file exists and its header says the expected size."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            return im.size == (size[1], size[0])
    except Exception:  # any unreadable header means: write it again
        return False


def _prepare_one(
    src_path: str,
    out_path: str,
    size: tuple[int, int],
    resize: str,
    channels: int,
    fmt: str,
    quality: int,
) -> tuple[str, str | None]:
    """Decode, resize and write one image atomically. Returns (status, reason)."""
    try:
        image = load_pil_image(src_path, size, channels=channels, resize=resize)
    except ImageReadError as err:
        return "failed", err.reason
    out = Path(out_path)
    if fmt == "png":
        # Level 1: several times faster than the default 6, files a little larger.
        options: dict[str, Any] = {"format": "PNG", "compress_level": 1}
    else:
        options = {"format": "JPEG", "quality": quality, "subsampling": 0}
    try:
        # A fixed temporary name, so that a killed run's leftover is overwritten; no fsync:
        # the cache can be rebuilt, and a sync per image adds about 10-15% to the write of a
        # 512 px PNG (2-core x86-64 CPU).
        atomic_write(
            out,
            lambda fh: image.save(fh, **options),
            fsync=False,
            temp_name=f".{out.name}{_TMP_SUFFIX}",
        )
    except OSError as err:
        return "failed", f"cannot write {out}: {err}"
    return "written", None


def _write_index(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=1) + "\n")


def prepare_images(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    image_size: SizeLike,
    *,
    workers: int | None = None,
    resize: ResizeMode | str = "stretch",
    format: Literal["png", "jpeg"] | str = "png",
    quality: int = 95,
    channels: int = 3,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    files: Iterable[str | os.PathLike[str]] | None = None,
    executor: Literal["thread", "process"] = "thread",
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Resize every image under ``src`` once into a cache folder ``dst``, in parallel.

    Args:
        src: Folder of original images (scanned recursively, hidden files skipped).
        dst: Cache folder (created); mirrors ``src``'s sub-folders.
        image_size: Working size ``S`` or ``(H, W)`` (the paper: 512).
        workers: Parallel workers (default: number of CPUs, at most 16).
        resize: ``"stretch"`` (the paper's), ``"pad"`` or ``"center_crop"``.
        format: ``"png"`` (lossless, default) or ``"jpeg"`` (smaller; ``quality``, 4:4:4).
        quality: JPEG quality (1..100).
        channels: 3 (RGB) or 1 (grayscale).
        extensions: File endings to pick up.
        files: Only these files (all under ``src``) instead of scanning, for example the
            images of a manifest.
        executor: ``"thread"`` (default; measured as fast as processes, since Pillow drops
            the GIL) or ``"process"``.
        overwrite: Rewrite outputs that already exist.
        progress: Show a tqdm progress bar (on a terminal only; none when stderr is
            redirected).

    Returns:
        A :class:`PrepareReport` (written / skipped / failed counts, failures with reasons).

    Raises:
        FileNotFoundError: If ``src`` does not exist or holds no images.
        ValueError: For bad arguments, two different sources that map to the same cache
            file (e.g. ``a.jpg`` and ``a.png``; one file listed twice is cached once), or a
            ``dst`` prepared earlier with other settings (use another ``dst`` or
            ``overwrite=True``).
    """
    from tqdm.auto import tqdm  # deferred: a display library

    size = normalize_size(image_size)
    _check_resize(resize)
    _check_channels(channels)
    fmt = _normalize_format(format)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if executor not in ("thread", "process"):
        raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}")
    if workers is None:
        workers = min(16, os.cpu_count() or 1)
    check_int(workers, "workers")
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_dir():
        raise FileNotFoundError(f"source folder {src_p} does not exist")
    if os.path.abspath(src_p) == os.path.abspath(dst_p):
        raise ValueError("dst must differ from src: the cache would overwrite the originals")
    start = time.perf_counter()
    sources = [Path(p) for p in files] if files is not None else find_images(src_p, extensions)
    if not sources:
        raise FileNotFoundError(
            f"no images found under {src_p} (looked for {', '.join(extensions)})"
        )
    settings = {
        "image_size": list(size),
        "resize": resize,
        "format": fmt,
        "quality": int(quality) if fmt == "jpeg" else None,
        "channels": channels,
    }
    index_path = dst_p / INDEX_NAME
    if index_path.is_file() and not overwrite:
        try:
            old = json.loads(index_path.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, json.JSONDecodeError):
            old = {}
        if old and old != settings:
            raise ValueError(
                f"{dst_p} was prepared with other settings ({old}); now asked for {settings}. "
                "Use another dst, or overwrite=True to rewrite every image."
            )
    targets: dict[Path, Path] = {}
    clashes: list[str] = []
    for s in sources:
        out = cache_path(s, src_p, dst_p, fmt)
        if out in targets:
            if os.path.abspath(targets[out]) == os.path.abspath(s):
                continue  # the same file listed twice (a repeated manifest row): one copy
            clashes.append(f"{targets[out]} and {s} -> {out}")
        targets[out] = s
    if clashes:
        raise ValueError(
            f"{len(clashes)} source images map to the same cache file: {'; '.join(clashes[:3])}. "
            "Rename one of each pair."
        )
    report = PrepareReport(src=src_p, dst=dst_p, total=len(targets))
    dst_p.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[Path, Path]] = []
    for out, s in targets.items():
        if not overwrite and _is_complete(out, size):
            report.skipped += 1
        else:
            todo.append((s, out))
    pool: Executor = (ThreadPoolExecutor if executor == "thread" else ProcessPoolExecutor)(
        max_workers=workers
    )
    bar = tqdm(
        total=len(targets),
        initial=report.skipped,
        desc="prepare",
        unit="img",
        disable=not progress or not sys.stderr.isatty(),  # no bar in a log file
        dynamic_ncols=True,
    )
    try:
        futures = {
            pool.submit(_prepare_one, str(s), str(out), size, resize, channels, fmt, quality): s
            for s, out in todo
        }
        for fut in as_completed(futures):
            status, reason = fut.result()
            if status == "written":
                report.written += 1
            else:
                report.failed.append((str(futures[fut]), str(reason)))
            bar.update(1)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    report.failed.sort()
    report.seconds = time.perf_counter() - start
    failed_set = {p for p, _ in report.failed}
    payload = {
        "format": "patchssl-prepare",
        "format_version": 1,
        "src": os.path.abspath(src_p),
        "settings": settings,
        "counts": {
            "total": report.total,
            "written": report.written,
            "skipped": report.skipped,
            "failed": len(report.failed),
        },
        "seconds": round(report.seconds, 3),
        "failed": [{"path": p, "reason": r} for p, r in report.failed],
        "files": {
            Path(os.path.abspath(s))
            .relative_to(os.path.abspath(src_p))
            .as_posix(): out.relative_to(dst_p).as_posix()
            for out, s in targets.items()
            if str(s) not in failed_set
        },
    }
    _write_index(index_path, payload)
    report.index_path = index_path
    return report
