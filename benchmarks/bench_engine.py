"""End to end: ``patchssl pretrain`` itself against the benchmark step of the same settings.

``bench_throughput.py`` times a pretraining step from uint8 images already on the device. A
user runs the engine: the data loader (reading a prepared JPEG cache), the step, the
learning-rate schedule, logging, validation on the held-out images and a checkpoint every
epoch. This script runs both and reports their ratio, in one run:

1. writes synthetic cervix-like images (:func:`patchssl.data.make_synthetic_cervix`) and
   prepares a JPEG cache at the working size (:func:`patchssl.data.prepare_images`, what
   ``patchssl prepare`` runs; quality 95), copied up to ``--images`` files;
2. times the benchmark step (``bench_throughput.pretrain_step``: same geometry, batch,
   precision, ``channels_last``, SGD with momentum);
3. runs :func:`patchssl.engine.pretrain` in a fresh process (``python bench_engine.py
   --child``) for ``--epochs`` epochs with the same settings (``train.optimizer=sgd``) and
   the engine's own defaults otherwise (loader workers from the cores, pinned memory on
   CUDA, validation on 5% held out, ``last.pt``/``best.pt`` every epoch), and reads the wall
   time between the ends of consecutive epochs (after each epoch's checkpoints);
4. times the step again, and divides.

Two engine figures per run: ``engine_images_per_s`` (training images per second of wall
time from the end of one epoch to the end of the next, everything included; the first
epoch, with worker start-up and compilation, is left out) and ``loop_images_per_s`` (the
training loop alone, as ``metrics.csv`` reports it: loader and steps, without validation
and checkpoints).

Usage:
    python benchmarks/bench_engine.py --device cpu                  # small geometry, fp32
    python benchmarks/bench_engine.py --device cuda --geometry paper --variant bf16-cl
    python benchmarks/bench_engine.py --device cpu --quick          # seconds: smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import add_common_args, describe_machine, markdown_table, measure, pick_device
from _common import save_results as _save_results

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def prepare_cache(work: Path, image_size: int, images: int, unique: int, seed: int = 0) -> Path:
    """Synthetic images, prepared as a JPEG cache at ``image_size``, copied up to ``images``.

    Returns:
        The cache root (``data.cache``): its ``unlabeled/`` holds the JPEGs.
    """
    from patchssl.data import make_synthetic_cervix, prepare_images

    cache = work / "cache"
    if len(list((cache / "unlabeled").glob("*.jpg"))) == images:  # from an earlier run
        return cache
    unique = max(1, min(unique, images))
    synth = make_synthetic_cervix(
        work / "synthetic",
        num_unlabeled=unique,
        num_patients=0,
        image_size=image_size,
        seed=seed,
        progress=False,
    )
    report = prepare_images(
        synth.unlabeled_dir,
        cache / "unlabeled",
        image_size,
        format="jpeg",
        quality=95,
        progress=False,
    )
    if report.failed:
        raise RuntimeError(f"prepare_images failed on {report.failed}")
    files = sorted((cache / "unlabeled").rglob("*.jpg"))
    for i in range(len(files), images):  # same bytes, new names: decoding costs the same
        shutil.copyfile(files[i % len(files)], cache / "unlabeled" / f"copy_{i:06d}.jpg")
    return cache


# --------------------------------------------------------------------------------------------
# The engine, in a child process
# --------------------------------------------------------------------------------------------
def engine_config(args: argparse.Namespace, geom: Any, data_dir: Path, cache: Path) -> dict:
    """The run configuration of :func:`patchssl.engine.pretrain` for these settings."""
    cuda = args.device_obj.type == "cuda"
    variant = args.variant_obj
    train: dict[str, Any] = {
        "epochs": args.epochs,
        "batch_size": args.batch,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_epochs": 0,
        "amp": ("bf16" if variant.bf16 else "none") if cuda else "none",
        "compile": args.compile != "none",
        "compile_scope": "model" if args.compile == "model" else "encoder",
        "device": str(args.device_obj),
        "seed": 0,
        "patience": 0,
        "progress": False,
        "tensorboard": "false",
        "num_threads": args.threads,
    }
    return {
        "out": str(args.work / f"run_{args.compile}_{time.strftime('%H%M%S')}"),
        "data": {
            "unlabeled": str(data_dir),
            "cache": str(cache),
            "image_size": geom.image_size,
            "workers": args.workers,
        },
        "model": {
            "backbone": geom.backbone,
            "patch_size": geom.patch_size,
            "grid": 3,
            "channels_last": variant.channels_last,
        },
        "train": train,
    }


def child(config_path: str, result_path: str) -> None:
    """Run :func:`patchssl.engine.pretrain` and write the epoch end times and metrics."""
    from patchssl.engine import pretrain

    config = json.loads(Path(config_path).read_text())
    ends: list[float] = []
    seen: dict[str, Any] = {}

    def mark(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        loader = trainer.loader
        n = min(len(trainer.sampler), trainer.steps_per_epoch * trainer.batch_size)
        if getattr(loader, "drop_last", False):
            n = (n // trainer.batch_size) * trainer.batch_size
        seen.update(train_images=n, workers=getattr(loader, "num_workers", None))

    start = time.perf_counter()
    result = pretrain(config, callbacks=[mark])
    out = {
        "start": start,
        "ends": ends,
        "history": result.history,
        **seen,
    }
    Path(result_path).write_text(json.dumps(out, default=str))


def run_engine(config: dict, work: Path, timeout: float | None) -> dict[str, Any]:
    """Run the child process; return its result with the per-epoch wall times."""
    cfg = work / "engine_config.json"
    res = work / "engine_result.json"
    cfg.write_text(json.dumps(config))
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, str(HERE / "bench_engine.py"), "--child", str(cfg), str(res)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"patchssl pretrain failed (status {proc.returncode}): {tail}")
    out = json.loads(res.read_text())
    out["process_s"] = wall
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def step_images_per_s(
    geom: Any, variant: Any, batch: int, device: torch.device, timing: dict
) -> float:
    """The benchmark step's images/s (``bench_throughput.pretrain_step``, SGD)."""
    import bench_throughput as bt

    step = bt.pretrain_step(geom, variant, batch, device)
    t = measure(step, device=device, **timing)
    del step
    bt._free(device)
    return batch / t.median_s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    add_common_args(parser, default_out="benchmarks/results/engine.json")
    parser.add_argument("--geometry", default=None, help="small, paper (tiny: smoke tests)")
    parser.add_argument("--variant", default=None, help="fp32 (CPU default) or bf16-cl (CUDA)")
    parser.add_argument(
        "--compile",
        default="none",
        choices=("none", "encoder", "model"),
        help="train.compile with train.compile_scope (the step compiles its encoder)",
    )
    parser.add_argument("--batch", type=int, default=None, help="images per step")
    parser.add_argument("--images", type=int, default=None, help="training set size (files)")
    parser.add_argument("--unique", type=int, default=None, help="distinct images rendered")
    parser.add_argument("--epochs", type=int, default=None, help="engine epochs (>= 2)")
    parser.add_argument(
        "--workers", type=int, default=None, help="data.workers (default: the engine's choice)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="step timing repeats")
    parser.add_argument(
        "--no-step-after",
        action="store_true",
        help="time the step before the engine only (saves a second torch.compile)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="engine run limit (s)")
    parser.add_argument("--workdir", default=None, help="where data and run go (default: tmp)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the rows (also printed and saved)."""
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return []
    import bench_throughput as bt

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    geom = bt.GEOMETRIES[args.geometry or ("tiny" if args.quick else "small")]
    variant = bt.Variant.parse(
        (args.variant or ("bf16-cl" if cuda else "fp32"))
        + ("-compile" if args.compile != "none" else "")
    )
    batch = args.batch or (2 if args.quick else (64 if cuda else 8))
    epochs = max(2, args.epochs or (2 if args.quick else 3))
    # Enough steps per epoch that an epoch lasts seconds: 8 steps on the CPU, 40 on a GPU.
    images = args.images or batch * (2 if args.quick else (40 if cuda else 8))
    train_images = images  # 5% more are held out for validation (added below)
    images = train_images + max(1, round(train_images * 0.05 / 0.95))
    timing = (
        {"warmup": 1, "repeats": 1, "min_time": 0.0}
        if args.quick
        else {"warmup": 3 if cuda else 1, "repeats": args.repeats or 3, "min_time": 0.5}
    )
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="patchssl-e2e-"))
    args.work, args.device_obj, args.variant_obj = work, device, variant
    args.epochs, args.batch = epochs, batch
    print(f"machine: {describe_machine()}")
    print(
        f"settings: {geom.name} geometry ({geom.image_size} px, 3x3 of {geom.patch_size} px, "
        f"{geom.backbone}), B={batch}, {variant.name}, compile={args.compile}, "
        f"{train_images} training images + validation, {epochs} epochs, device {device}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    started = time.perf_counter()
    row: dict[str, Any] = {
        "geometry": geom.name,
        "backbone": geom.backbone,
        "batch": batch,
        "variant": variant.name,
        "compile": args.compile,
        "device": str(device),
        "epochs": epochs,
    }
    try:
        cache = prepare_cache(work / "data", geom.image_size, images, args.unique or 64)
        print(f"prepared {images} JPEGs in {cache} ({time.perf_counter() - started:.0f} s)")
        before = step_images_per_s(geom, variant, batch, device, timing)
        print(f"step (before): {before:.2f} images/s", flush=True)
        row["step_before"] = before
        _save_results(args.out, [{"table": "engine", **row, "complete": False}])
        config = engine_config(args, geom, work / "data" / "synthetic" / "unlabeled", cache)
        engine = run_engine(config, work, args.timeout)
        if args.no_step_after:
            after = before
        else:
            after = step_images_per_s(geom, variant, batch, device, timing)
            print(f"step (after): {after:.2f} images/s", flush=True)
        history = engine["history"]
        n_train = int(engine["train_images"])
        ends = engine["ends"]
        epoch_s = [b - a for a, b in itertools.pairwise(ends)]
        step = statistics.mean([before, after])
        row.update(
            step_images_per_s=step,
            step_before=before,
            step_after=after,
            engine_images_per_s=n_train / statistics.median(epoch_s),
            loop_images_per_s=statistics.median(r["images_per_s"] for r in history[1:]),
            epoch_wall_s=epoch_s,
            first_epoch_s=ends[0] - engine["start"],
            train_images=n_train,
            workers=engine["workers"],
            process_s=engine["process_s"],
        )
        row["engine_over_step"] = row["engine_images_per_s"] / step
        row["loop_over_step"] = row["loop_images_per_s"] / step
        print(
            f"engine: {row['engine_images_per_s']:.2f} images/s end to end "
            f"({row['engine_over_step']:.3f}x the step), loop alone "
            f"{row['loop_images_per_s']:.2f} images/s ({row['loop_over_step']:.3f}x); "
            f"step {step:.2f} images/s (before {before:.2f}, after {after:.2f}); "
            f"loader workers {row['workers']}",
            flush=True,
        )
    except Exception as err:  # a failure is a result (e.g. no compiler for torch.compile)
        row["error"] = f"{type(err).__name__}: {err}".replace("\n", " ")[:600]
        print(f"ERROR {row['error']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    columns = ["geometry", "batch", "variant", "compile", "step_images_per_s"]
    columns += ["engine_images_per_s", "engine_over_step", "loop_images_per_s", "loop_over_step"]
    print(markdown_table([row], [*columns, "error"]))
    print(f"total {elapsed:.0f} s")
    out = _save_results(
        args.out,
        [
            {"table": "engine", **row},
            {"table": "run", "argv": sys.argv[1:] if argv is None else argv, "seconds": elapsed},
        ],
    )
    print(f"results written to {out}")
    return [row]


if __name__ == "__main__":
    main()
