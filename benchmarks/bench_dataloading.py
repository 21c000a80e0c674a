"""Data loading per core: decoding original photographs against reading the prepared cache.

Cervix photographs are about 2800 x 1900 px JPEGs; training wants 512 px images. This script
writes a few such originals from real content (scikit-image's fundus photograph, cropped,
upscaled and given sensor-like noise), then measures, on one thread (``num_workers=0``):

* ``pil_resize_original``: the classic way, ``Image.open(...).convert("RGB").resize((512,
  512), BILINEAR)`` on the full-size decode, then a tensor;
* ``load_image_original``: :func:`patchssl.data.io.load_image` on the original (JPEG DCT
  scaling: decodes at half size or less before resizing);
* ``load_image_cache_png`` / ``load_image_cache_jpeg``: reading the 512 px cache that
  ``prepare_images`` wrote (PNG, or JPEG quality 95);
* ``loader_cache_png``: ImageFolderDataset + DataLoader over the PNG cache (batches of 8);
* ``decode_jpeg_cache``: ``torchvision.io.decode_jpeg`` alone on the JPEG cache (the floor a
  decoder on the CPU can reach), and ``load_image_over_decode_jpeg``, the ratio of
  ``load_image`` to it (the two timed interleaved);
* ``decode_jpeg_<device>_batch``: with ``--device cuda``, ``decode_jpeg(list of files,
  device="cuda")`` on batches of ``--gpu-batch`` cache files (nvJPEG; the GPU decodes, the
  loader only reads bytes);
* ``prepare_*``: ``prepare_images`` throughput (decode, resize, encode, write), 1 worker and
  all cores.

Files are read from the page cache (each is read once before timing): the figures are decode
and resize costs, not disk speed.

Usage:
    python benchmarks/bench_dataloading.py               # 8 originals of 2816 x 1880 px
    python benchmarks/bench_dataloading.py --quick       # 2 smaller originals, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_args,
    describe_machine,
    markdown_table,
    measure,
    measure_interleaved,
    save_csv,
    save_results,
    sync,
)
from PIL import Image

from patchssl.data.datasets import ImageFolderDataset, make_loader
from patchssl.data.io import load_image
from patchssl.data.prepare import prepare_images


def make_originals(
    folder: Path, count: int, size: tuple[int, int], *, quality: int = 92, seed: int = 0
) -> list[Path]:
    """Write ``count`` camera-like JPEGs of ``size`` (W, H) from a real fundus photograph."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    source = Image.fromarray(skdata.retina())  # 1411 x 1411 RGB, a real photograph
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths = []
    for i in range(count):
        # A random crop with the originals' aspect ratio, upscaled to the camera's size.
        crop_w = int(rng.integers(900, 1400))
        crop_h = min(1411, int(crop_w * height / width))
        x0 = int(rng.integers(0, 1411 - crop_w + 1))
        y0 = int(rng.integers(0, 1411 - crop_h + 1))
        image = source.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize(size, Image.BICUBIC)
        if i % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)
        array = array * rng.uniform(0.85, 1.15) + rng.normal(0.0, 3.0, array.shape)  # sensor noise
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        path = folder / f"original_{i:03d}.jpg"
        image.save(path, quality=quality, subsampling=2)  # 4:2:0, as cameras write
        paths.append(path)
    return paths


def pil_resize(path: Path, image_size: int) -> torch.Tensor:
    """The classic way: full decode, convert, resize, to tensor."""
    with Image.open(path) as im:
        image = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def read_all(paths: list[Path], fn: Callable[[Path], Any]) -> Callable[[], None]:
    def call() -> None:
        for path in paths:
            fn(path)

    return call


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the rows (also printed and saved)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    add_common_args(parser, default_out="benchmarks/results/dataloading.json")
    parser.add_argument("--count", type=int, default=None, help="number of originals")
    parser.add_argument(
        "--original-size", type=int, nargs=2, default=None, metavar=("W", "H"), help="px"
    )
    parser.add_argument("--image-size", type=int, default=512, help="working size (px)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where the images go (default: tmp)")
    parser.add_argument(
        "--gpu-batch", type=int, default=64, help="files per decode_jpeg(device=...) call"
    )
    args = parser.parse_args(argv)
    # Per core: one torch thread and no loader workers; Pillow decodes on one thread.
    torch.set_num_threads(args.threads or 1)
    count = args.count or (2 if args.quick else 8)
    original = tuple(args.original_size or ((1400, 940) if args.quick else (2816, 1880)))
    repeats = args.repeats or (1 if args.quick else 5)
    size = args.image_size
    timing = {"warmup": 1, "repeats": repeats, "min_time": 0.0}
    all_cores = os.cpu_count() or 1

    print(f"machine: {describe_machine()}")
    print(
        f"settings: {count} originals of {original[0]}x{original[1]} px -> {size} px, "
        f"torch threads {torch.get_num_threads()}, num_workers=0, repeats {repeats}"
    )
    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="patchssl-"))
    rows: list[dict[str, Any]] = []
    try:
        src = workdir / "originals"
        paths = make_originals(src, count, original)
        mean_kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"originals: {len(paths)} JPEGs, mean {mean_kib:.0f} KiB, in {src}")

        def record(name: str, what: str, seconds: float, per_call: int, **extra: Any) -> None:
            row = {
                "name": name,
                "what": what,
                "images_per_s": per_call / seconds,
                "ms_per_image": seconds / per_call * 1e3,
                "images": per_call,
                **extra,
            }
            rows.append(row)
            print(f"{name:24s} {row['images_per_s']:8.1f} img/s  {row['ms_per_image']:8.2f} ms/img")

        # prepare_images first: it also builds the caches the next rows read.
        for fmt in ("png", "jpeg"):
            for workers in sorted({1, all_cores}):
                dst = workdir / f"cache_{fmt}_{workers}"
                samples = []
                for _ in range(repeats):
                    shutil.rmtree(dst, ignore_errors=True)
                    start = time.perf_counter()
                    report = prepare_images(
                        src, dst, size, workers=workers, format=fmt, quality=95, progress=False
                    )
                    samples.append(time.perf_counter() - start)
                if report.failed:
                    raise RuntimeError(f"prepare_images failed on {report.failed}")
                record(
                    f"prepare_{fmt}_{workers}w",
                    f"prepare_images(format={fmt!r}, workers={workers})",
                    float(np.median(samples)),
                    count,
                    workers=workers,
                )
        png = sorted((workdir / "cache_png_1").rglob("*.png"))
        jpg = sorted((workdir / "cache_jpeg_1").rglob("*.jpg"))
        assert len(png) == len(jpg) == count, (len(png), len(jpg))
        cache_kib = {
            "png": sum(p.stat().st_size for p in png) / count / 1024,
            "jpeg": sum(p.stat().st_size for p in jpg) / count / 1024,
        }
        print(f"cache: PNG {cache_kib['png']:.0f} KiB, JPEG {cache_kib['jpeg']:.0f} KiB per image")

        cases: list[tuple[str, str, Callable[[], None]]] = [
            (
                "pil_resize_original",
                "Image.open + convert + resize(BILINEAR), full decode",
                read_all(paths, lambda p: pil_resize(p, size)),
            ),
            (
                "load_image_original",
                "patchssl load_image(original, 512) (JPEG draft decode)",
                read_all(paths, lambda p: load_image(p, size)),
            ),
            (
                "load_image_cache_png",
                "patchssl load_image(cache .png)",
                read_all(png, lambda p: load_image(p, size)),
            ),
            (
                "load_image_cache_jpeg",
                "patchssl load_image(cache .jpg, quality 95)",
                read_all(jpg, lambda p: load_image(p, size)),
            ),
        ]
        for name, what, fn in cases:
            t = measure(fn, **timing)
            record(name, what, t.median_s, count)

        # load_image against decode_jpeg on the JPEG cache (the engine's input), interleaved.
        from torchvision.io import decode_jpeg, read_file

        ratio_t = measure_interleaved(
            {
                "decode_jpeg": read_all(jpg, lambda p: decode_jpeg(read_file(str(p)))),
                "load_image": read_all(jpg, lambda p: load_image(p, size)),
            },
            warmup=1,
            repeats=max(3, repeats),
            min_time=0.0 if args.quick else 0.5,
        )
        record(
            "decode_jpeg_cache",
            "torchvision.io.decode_jpeg(read_file(cache .jpg)), the decoder alone",
            ratio_t["decode_jpeg"].median_s,
            count,
        )
        over = ratio_t["load_image"].median_s / ratio_t["decode_jpeg"].median_s
        rows.append(
            {
                "name": "load_image_over_decode_jpeg",
                "what": "load_image / decode_jpeg on the JPEG cache (interleaved medians)",
                "ratio": over,
                "images_per_s": count / ratio_t["load_image"].median_s,
                "ms_per_image": ratio_t["load_image"].median_s / count * 1e3,
                "images": count,
            }
        )
        print(f"load_image / decode_jpeg on the 512 px JPEG cache: {over:.2f}x")
        device = torch.device(args.device or "cpu")
        if device.type != "cpu":
            datas = [read_file(str(p)) for p in jpg]
            batch_files = [datas[i % len(datas)] for i in range(args.gpu_batch)]

            def gpu_decode() -> None:
                decode_jpeg(batch_files, device=device)
                sync(device)

            t = measure(gpu_decode, device=device, warmup=2, repeats=repeats, min_time=0.5)
            record(
                f"decode_jpeg_{device.type}_batch",
                f"decode_jpeg(list of {args.gpu_batch} cache files, device={device.type!r})",
                t.median_s,
                args.gpu_batch,
            )

        dataset = ImageFolderDataset(workdir / "cache_png_1", size)
        batch = min(8, count)
        loader = make_loader(dataset, batch, num_workers=0, drop_last=True)
        seen = (len(dataset) // batch) * batch

        def epoch() -> None:
            for items in loader:
                assert items["image"].dtype == torch.uint8

        t = measure(epoch, **timing)
        record(
            "loader_cache_png",
            f"ImageFolderDataset + DataLoader(batch {batch}, num_workers=0), PNG cache",
            t.median_s,
            seen,
        )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")
    print(markdown_table(rows, ["name", "images_per_s", "ms_per_image", "what"]))
    out = save_results(
        args.out,
        [
            *({"table": "dataloading", **r} for r in rows),
            {
                "table": "run",
                "argv": sys.argv[1:] if argv is None else argv,
                "seconds": elapsed,
                "originals": [original[0], original[1]],
                "original_kib": mean_kib,
                "cache_kib": cache_kib,
            },
        ],
    )
    save_csv(out.with_suffix(".csv"), rows)
    print(f"results written to {out}")
    return rows


if __name__ == "__main__":
    main()
