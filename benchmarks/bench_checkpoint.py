"""The engine's checkpoint writes at the end of an epoch: ``last.pt``, then ``best.pt``.

When an epoch improves the monitored metric, ``best.pt`` holds the same payload as the
``last.pt`` just written. The engine copies that file (:func:`patchssl.checkpoint.copy_checkpoint`)
instead of serialising and hashing the payload a second time (:func:`save_checkpoint` twice,
the baseline). Both are timed here, interleaved, on the payload of a pretraining checkpoint
(a timm model's weights and its AdamW state), and their ratio printed::

    python benchmarks/bench_checkpoint.py                      # resnet50: about 300 MB
    python benchmarks/bench_checkpoint.py --backbone resnet10t --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine

from patchssl.checkpoint import copy_checkpoint, payload_checksum, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = timm.create_model(args.backbone)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's two moments exist, as in an engine checkpoint
    payload = {"kind": "pretrain", "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="patchssl-ckpt-"))
    last, best = folder / "last.pt", folder / "best.pt"
    twice, copied, checksum = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        save_checkpoint(last, payload)
        save_checkpoint(best, payload)
        twice.append(time.perf_counter() - t)
        t = time.perf_counter()
        save_checkpoint(last, payload)
        copy_checkpoint(last, best)
        copied.append(time.perf_counter() - t)
        t = time.perf_counter()
        payload_checksum(payload)
        checksum.append(time.perf_counter() - t)
    size = last.stat().st_size / 1e6
    for path in (last, best):
        path.unlink()
    folder.rmdir()
    a, b = statistics.median(twice), statistics.median(copied)
    print(describe_machine())
    print(f"{args.backbone} + AdamW checkpoint: {size:.0f} MB, median of {args.repeats}")
    print(f"last.pt + best.pt, saved twice (baseline): {a:.3f} s")
    print(f"last.pt saved, best.pt copied (engine):    {b:.3f} s   ratio {a / b:.2f}x")
    print(f"of which the payload checksum (sha256):    {statistics.median(checksum):.3f} s")


if __name__ == "__main__":
    main()
