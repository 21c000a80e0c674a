"""End to end: ``patchssl pretrain`` itself against the benchmark step of the same settings.

``bench_throughput.py`` times a pretraining step from uint8 images already on the device. A
user runs the engine: the data loader (reading a prepared JPEG cache), the step, the
learning-rate schedule, logging, validation on the held-out images and a checkpoint every
epoch. This script runs both and reports their ratio, in one run:

1. writes synthetic cervix-like images (:func:`patchssl.data.make_synthetic_cervix`) and
   prepares a JPEG cache at the working size (:func:`patchssl.data.prepare_images`, what
   ``patchssl prepare`` runs; quality 95), copied up to ``--images`` files;
2. runs :func:`patchssl.engine.pretrain` in a fresh process (``python bench_engine.py
   --child``) for ``--epochs`` epochs with the benchmark step's geometry, batch, precision
   and ``channels_last``, and the engine's own defaults otherwise (AdamW, fused on CUDA;
   loader workers from the cores, pinned memory on CUDA, validation on 5% held out,
   ``last.pt``/``best.pt`` every epoch);
3. after each epoch (a callback, once its checkpoints are taken), runs the benchmark step
   (``bench_throughput``'s task on uint8 images already on the device, with the engine's
   optimizer: :func:`reference_step`) in the same process, for as many steps as an epoch
   has: each epoch is bracketed by two step timings, so that a change of load on a shared
   machine hits both sides of its ratio. With ``train.async_checkpoint`` (``auto``: on
   CUDA) the epoch's ``last.pt``/``best.pt`` are still being written in the background
   then; the callback waits for them after its step timing, and that wait is counted in
   the engine's next epoch (see below);
4. reports the median over the epochs after the first (worker start-up and compilation
   are left out) of the ratios engine / step.

Two engine figures per run: ``engine_images_per_s`` (training images per second of wall
time from the end of one epoch to the end of the next, everything included; the first
epoch, with worker start-up and compilation, is left out) and ``loop_images_per_s`` (the
training loop alone, as ``metrics.csv`` reports it: loader and steps, without validation
and checkpoints). ``epoch_fixed_s`` is the difference: what validation, checkpoints and
logging cost per epoch, whatever the epoch's size (the benchmark's epochs are short; a real
one of 44,031 images spreads it over 600 times more steps).

What a checkpoint costs the engine: written in the training thread
(``--async-checkpoint false``), all of it. Written in the background, the engine's epoch
ends once the payload is copied to CPU memory; the write then runs during the callback's
step timing, as it would during the next epoch's training, and whatever of it outlasts
that timing (``write_wait_s``, per epoch) is counted in the engine's next epoch, as the
engine would wait for it there. The write's host work overlaps the step timing rather than
the engine's own steps, so a run where it slows the step shows in ``step_samples``.

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
from _common import add_common_args, describe_machine, markdown_table, pick_device, sync
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
        "async_checkpoint": args.async_checkpoint,
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


def reference_step(geom: Any, variant: Any, batch: int, device: torch.device, train: Any) -> Any:
    """``bench_throughput``'s pretraining step, with the engine's optimizer.

    The task, images (uint8, already on the device), precision and ``channels_last`` are
    ``bench_throughput.pretrain_step``'s; the optimizer is the engine's
    (:func:`patchssl.engine.loop.build_optimizer` of the run's ``train`` section: AdamW by
    default, fused on CUDA), so that the ratio measures what the engine adds around a step.
    """
    import bench_throughput as bt

    from patchssl.engine.loop import build_optimizer

    return bt.pretrain_step(
        geom, variant, batch, device, optimizer=lambda task: build_optimizer(task, train)
    )


def child(config_path: str, result_path: str) -> None:
    """Run :func:`patchssl.engine.pretrain`, timing the benchmark step between its epochs.

    After each epoch's checkpoints are taken (a callback), the benchmark step runs as many
    steps as an epoch has, in this same process: every epoch is bracketed by two step
    timings, so a change of load on the machine hits both sides of each ratio. A checkpoint
    still being written in the background is then waited for, after ``resume``: inside the
    engine's next epoch.
    """
    import bench_throughput as bt

    from patchssl.engine import pretrain

    spec = json.loads(Path(config_path).read_text())
    config, step_spec = spec["config"], spec["step"]
    geom = bt.GEOMETRIES[step_spec["geometry"]]
    variant = bt.Variant.parse(step_spec["variant"])
    batch = int(step_spec["batch"])
    marks: list[dict[str, float]] = []
    seen: dict[str, Any] = {}
    state: dict[str, Any] = {}

    def mark(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
        device = trainer.device
        sync(device)
        end = time.perf_counter()
        loader = trainer.loader
        n = min(len(trainer.sampler), trainer.steps_per_epoch * trainer.batch_size)
        if getattr(loader, "drop_last", False):
            n = (n // trainer.batch_size) * trainer.batch_size
        seen.update(train_images=n, workers=getattr(loader, "num_workers", None))
        if "step" not in state:
            state["step"] = reference_step(geom, variant, batch, device, trainer.train)
            for _ in range(int(step_spec["warmup"])):  # compilation and warm-up, untimed
                state["step"]()
        steps = max(1, trainer.steps_per_epoch)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            state["step"]()
        sync(device)
        resumed = time.perf_counter()
        # a write still running is waited for inside the engine's next epoch (counted there)
        trainer.wait_for_checkpoints()
        marks.append(
            {
                "end": end,
                "resume": resumed,
                "step_images_per_s": steps * batch / (resumed - t0),
                "write_wait_s": time.perf_counter() - resumed,
            }
        )

    start = time.perf_counter()
    result = pretrain(config, callbacks=[mark])
    out = {"start": start, "marks": marks, "history": result.history, **seen}
    Path(result_path).write_text(json.dumps(out, default=str))


def run_engine(config: dict, step: dict, work: Path, timeout: float | None) -> dict[str, Any]:
    """Run the child process; return its result with the per-epoch wall times."""
    cfg = work / "engine_config.json"
    res = work / "engine_result.json"
    cfg.write_text(json.dumps({"config": config, "step": step}))
    env = dict(os.environ)
    root = str(HERE.parent)
    path = os.pathsep.join([root, str(HERE)])
    env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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
    parser.add_argument(
        "--async-checkpoint",
        default="auto",
        choices=("auto", "true", "false"),
        help="train.async_checkpoint: write checkpoints in the background (auto: on CUDA)",
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
    warmup = 1 if args.quick or not cuda else 3
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
        "async_checkpoint": args.async_checkpoint,
        "device": str(device),
        "epochs": epochs,
    }
    try:
        cache = prepare_cache(work / "data", geom.image_size, images, args.unique or 64)
        print(f"prepared {images} JPEGs in {cache} ({time.perf_counter() - started:.0f} s)")
        config = engine_config(args, geom, work / "data" / "synthetic" / "unlabeled", cache)
        step_spec = {
            "geometry": geom.name,
            "variant": variant.name,
            "batch": batch,
            "warmup": warmup,
        }
        engine = run_engine(config, step_spec, work, args.timeout)
        history, marks = engine["history"], engine["marks"]
        n_train = int(engine["train_images"])
        # Epoch k (k >= 2) runs from the end of the step timing after epoch k - 1 to the end
        # of epoch k; the step timings on either side of it are its reference.
        epoch_s = [b["end"] - a["resume"] for a, b in itertools.pairwise(marks)]
        steps = [m["step_images_per_s"] for m in marks]
        refs = [statistics.mean(pair) for pair in itertools.pairwise(steps)]
        engine_rates = [n_train / s_ for s_ in epoch_s]
        loop_rates = [r["images_per_s"] for r in history[1:]]
        step = statistics.median(refs)
        row.update(
            step_images_per_s=step,
            engine_images_per_s=statistics.median(engine_rates),
            loop_images_per_s=statistics.median(loop_rates),
            engine_over_step=statistics.median(e / r for e, r in zip(engine_rates, refs)),
            loop_over_step=statistics.median(e / r for e, r in zip(loop_rates, refs)),
            step_samples=steps,
            engine_samples=engine_rates,
            loop_samples=loop_rates,
            epoch_wall_s=epoch_s,
            epoch_loop_s=[r["epoch_time_s"] for r in history],
            write_wait_s=[m["write_wait_s"] for m in marks],
            # Validation, checkpoints and logging: a fixed cost per epoch, whatever its size.
            epoch_fixed_s=statistics.median(
                w - r["epoch_time_s"] for w, r in zip(epoch_s, history[1:])
            ),
            first_epoch_s=marks[0]["end"] - engine["start"],
            train_images=n_train,
            workers=engine["workers"],
            process_s=engine["process_s"],
        )
        print(
            f"engine: {row['engine_images_per_s']:.2f} images/s end to end "
            f"({row['engine_over_step']:.3f}x the step), loop alone "
            f"{row['loop_images_per_s']:.2f} images/s ({row['loop_over_step']:.3f}x); "
            f"step {step:.2f} images/s (between the epochs: "
            f"{', '.join(f'{v:.2f}' for v in steps)}); "
            f"per epoch {row['epoch_fixed_s']:.2f} s of validation, checkpoints and logging; "
            f"loader workers {row['workers']}",
            flush=True,
        )
    except Exception as err:  # a failure is a result (e.g. no compiler for torch.compile)
        row["error"] = f"{type(err).__name__}: {err}".replace("\n", " ")[-800:]
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
