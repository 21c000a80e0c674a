"""Where a pretraining step's time goes: the library's jigsaw step against the bare backbone.

``bench_throughput.py`` reports the ratio *library step / bare backbone step*; this script
says what makes up the difference, with ``torch.profiler`` over a few steps of each (the same
two steps as that ratio, built by ``bench_throughput``):

- wall time per step, and the time the device spends in kernels per step (on CUDA): a step
  whose wall time exceeds its kernel time leaves the device idle, waiting for the host;
- the host-device synchronisations per step (``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``, blocking ``cudaMemcpy``), each of which stops the host from
  queuing work ahead;
- the operators with the largest self time on the device (on the CPU: on the host) in each
  step, so that the library's extra work (tiling, defences, head, loss) can be read off.

Usage:
    python benchmarks/profile_step.py --device cuda --geometry paper --variant bf16-cl --batch 64
    python benchmarks/profile_step.py --device cpu --quick          # seconds: smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import add_common_args, pick_device, save_results, sync
from bench_throughput import (
    GEOMETRIES,
    Variant,
    bare_backbone_step,
    build_task,
    pretrain_step,
)
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaMemcpy",
    "cudaEventSynchronize",
)


def profile_steps(
    step: Callable[[], None], steps: int, warmup: int, device: torch.device, top: int
) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step`` after ``warmup`` unprofiled ones."""
    for _ in range(warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def self_time(e: Any) -> float:  # microseconds
        if on_device:
            return float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        return float(e.self_cpu_time_total)

    syncs = {e.key: e.count / steps for e in events if e.key in SYNC_CALLS}
    # The device's busy time: the kernels' own rows (an operator's row counts its kernels too).
    kernel_us = sum(
        self_time(e) for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
    )
    ranked = sorted(events, key=self_time, reverse=True)[:top]
    return {
        "self_ms_per_step": {e.key: self_time(e) / steps / 1e3 for e in events},
        "wall_ms": wall * 1e3,
        "device_busy_ms": kernel_us / steps / 1e3 if on_device else None,
        "syncs_per_step": syncs,
        "top": [
            {"op": e.key, "self_ms_per_step": self_time(e) / steps / 1e3, "calls": e.count / steps}
            for e in ranked
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_out="benchmarks/results/profile_step.json")
    parser.add_argument("--geometry", default="paper", choices=sorted(GEOMETRIES))
    parser.add_argument("--variant", default="bf16-cl", help="e.g. fp32, bf16-cl, bf16-cl-compile")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps of each")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="operators listed per step")
    args = parser.parse_args(argv)
    if args.quick:
        args.geometry, args.batch, args.steps, args.warmup, args.top = "tiny", 2, 2, 1, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    geom = GEOMETRIES[args.geometry]
    variant = Variant.parse(args.variant)
    task = build_task(geom, variant, device)  # its backbone is the bare step's
    report: dict[str, Any] = {
        "geometry": geom.name,
        "backbone": geom.backbone,
        "batch": args.batch,
        "variant": variant.name,
        "device": str(device),
    }
    steps = {
        "bare_backbone": bare_backbone_step(task, args.batch, variant, device),
        "library_step": pretrain_step(geom, variant, args.batch, device),
    }
    for name, fn in steps.items():
        report[name] = profile_steps(fn, args.steps, args.warmup, device, args.top)
        r = report[name]
        busy = "" if r["device_busy_ms"] is None else f", device busy {r['device_busy_ms']:.2f} ms"
        print(f"== {name}: {r['wall_ms']:.2f} ms per step{busy}; syncs {r['syncs_per_step']}")
        for row in r["top"]:
            print(f"   {row['self_ms_per_step']:8.3f} ms  x{row['calls']:<6.1f} {row['op'][:90]}")
    # What the library adds: the operators whose self time grew most over the bare step's.
    ours = report["library_step"].pop("self_ms_per_step")
    base = report["bare_backbone"].pop("self_ms_per_step")
    extra = sorted(((op, ms - base.get(op, 0.0)) for op, ms in ours.items()), key=lambda t: -t[1])[
        : args.top
    ]
    report["library_extra"] = [{"op": op, "extra_ms_per_step": ms} for op, ms in extra]
    print("== what the library step adds (self time per step over the bare step's):")
    for op, ms in extra:
        print(f"   {ms:+8.3f} ms  {op[:100]}")
    bare, lib = report["bare_backbone"]["wall_ms"], report["library_step"]["wall_ms"]
    report["step_over_bare"] = lib / bare
    print(f"library step / bare backbone: {lib / bare:.3f} (wall time per step, profiled)")
    save_results(args.out, [report])
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
