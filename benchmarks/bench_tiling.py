"""PatchTiler against per-sample cropping in Python, as a ratio measured in the same run.

The baseline is what a classic jigsaw data loader does: for every image, for every tile, pick
a random offset and slice (the published jigsaw code does this per sample in the workers).

Usage:
    python benchmarks/bench_tiling.py            # CPU (and the GPU too when one is present)
    python benchmarks/bench_tiling.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import random

import torch
from _common import RESULTS, describe_machine, save_results, timeit

from patchssl.tiling import PatchTiler


def python_crops(images: torch.Tensor, tiler: PatchTiler, rng: random.Random) -> torch.Tensor:
    """Per-sample, per-tile slicing with random jitter: the baseline."""
    ph, pw = tiler.patch_size
    origin = tiler.centre_boxes().tolist()
    out = []
    for image in images:
        tiles = []
        for x0, y0, _, _ in origin:
            dy = rng.randint(-tiler.jitter, tiler.jitter)
            dx = rng.randint(-tiler.jitter, tiler.jitter)
            tiles.append(image[:, y0 + dy : y0 + dy + ph, x0 + dx : x0 + dx + pw])
        out.append(torch.stack(tiles))
    return torch.stack(out)


def run(device: str, batch: int, image_size: int, patch: int) -> dict:
    tiler = PatchTiler(3, patch, image_size).to(device).train()
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    images = images.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rng = random.Random(0)
    ours = timeit(lambda: tiler(images, generator=gen), device=device, iters=10)
    base = timeit(lambda: python_crops(images, tiler, rng), device=device, iters=3)
    return {
        "device": device,
        "batch": batch,
        "geometry": f"{image_size} px, 3x3 x {patch} px",
        "patchtiler_ms": ours * 1e3,
        "python_loop_ms": base * 1e3,
        "speedup": base / ours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: every one present)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "tiling.json"))
    args = parser.parse_args()
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    print(f"machine: {describe_machine()}")
    rows = []
    for device in devices:
        for image_size, patch in ((512, 153), (192, 60)):
            row = run(device, args.batch, image_size, patch)
            rows.append(row)
            print(
                f"{device:5s} batch {row['batch']:4d}  {row['geometry']:>20s}: "
                f"PatchTiler {row['patchtiler_ms']:8.2f} ms, per-sample Python "
                f"{row['python_loop_ms']:8.2f} ms, ratio {row['speedup']:6.1f}x"
            )
    print(f"results written to {save_results(args.out, rows)}")


if __name__ == "__main__":
    main()
