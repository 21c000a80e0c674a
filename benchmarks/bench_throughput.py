"""Throughput of jigsaw pretraining, fine-tuning and inference, and where the time goes.

Measures images per second (full images of 9 patches) and peak memory for:

* ``pretrain``: a JigsawPretext step (tiling, shuffling, defences, encoder, head, loss,
  backward, optimizer step) from uint8 images already in device memory;
* ``finetune``: a PatchClassifier training step (cross-entropy on two classes);
* ``inference``: PatchClassifier in eval mode under ``torch.inference_mode()``;

at two geometries (``small``: 192 px, 3x3 patches of 64 px, ResNet18; ``paper``: 512 px,
3x3 patches of 153 px, ResNet50), for a sweep of batch sizes, with options compared in the
same run (fp32 against bf16 autocast, ``channels_last``, ``torch.compile``), and two ratios:

1. the whole pretraining step against the bare backbone's forward, backward and optimizer
   step on the same ``(B * 9, C, h, w)`` patches (the cost of tiling, shuffling, defences
   and the head);
2. the library's pipeline against a classic one written here: per-sample tiling, jitter,
   shuffling (Python's ``random``), per-tile normalisation in DataLoader workers, fp32,
   collated, as the published jigsaw code does; both timed end to end from uint8 images in
   memory to the optimizer step, with the same model, batch size and number of workers.

Usage:
    python benchmarks/bench_throughput.py                  # CPU default set (a few minutes)
    python benchmarks/bench_throughput.py --quick          # seconds: smoke test
    python benchmarks/bench_throughput.py --device cuda    # GPU set (bf16, channels_last,
                                                           # compile, batches 32..256)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    PeakMemory,
    Timing,
    add_common_args,
    describe_machine,
    markdown_table,
    measure,
    measure_interleaved,
    pick_device,
    save_csv,
    save_results,
)
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from patchssl.classifier import PatchClassifier
from patchssl.encoder import SharedPatchEncoder
from patchssl.permutations import PermutationSet
from patchssl.pretext.jigsaw import JigsawPretext
from patchssl.tiling import PatchTiler


@dataclass(frozen=True)
class Geometry:
    name: str
    image_size: int
    patch_size: int
    backbone: str


GEOMETRIES = {
    "small": Geometry("small", 192, 64, "resnet18"),
    "paper": Geometry("paper", 512, 153, "resnet50"),
    "tiny": Geometry("tiny", 112, 32, "test_resnet"),  # smoke tests only
}

# Batch sizes swept per geometry (every "sweep" variant runs at each of them). On the CPU the
# sweep stops at 8 at the small geometry and 1 at the paper's: throughput is flat from B = 8 on
# one core, and larger batches only lengthen the run (the set must stay under 10 minutes).
BATCHES = {
    "cpu": {"small": [2, 8], "paper": [1], "tiny": [2]},
    "cuda": {"small": [64, 128, 256], "paper": [32, 64, 128], "tiny": [8]},
}
# On CUDA the batch sweep runs in the setting a user should choose (bf16 autocast with
# channels_last); fp32, fp32 + channels_last and bf16 alone are compared at one batch.
SWEEP = {"cpu": ["fp32"], "cuda": ["bf16-cl"]}
# Options compared at one batch size. "bf16@inference" runs in inference mode only: this
# CPU has no bf16 instructions (no AVX512-BF16/AMX), so autocast to bf16 is emulated and a
# bf16 training step costs about 30 times an fp32 one; one row says so, more would waste time.
COMPARE_BATCH = {
    "cpu": {"small": 2, "paper": 1, "tiny": 2},
    "cuda": {"small": 128, "paper": 64, "tiny": 8},
}
COMPARE = {
    "cpu": {"small": ["fp32-cl", "bf16@inference"], "paper": ["fp32-cl"], "tiny": []},
    "cuda": {
        "small": ["fp32", "fp32-cl", "bf16"],
        "paper": ["fp32", "fp32-cl", "bf16"],
        "tiny": ["bf16-cl"],
    },
}
# --compile adds one compiled variant, in the modes where it matters most (compiling the
# training graph of a ResNet50 takes a minute or more; the fine-tuning graph is the same
# backbone as the pretraining one).
COMPILED = {"cpu": "fp32-compile@pretrain+inference", "cuda": "bf16-cl-compile@pretrain+inference"}
# The two ratios: at which batch, with which variants, with how many loader workers.
RATIO_BATCH = {
    "cpu": {"small": 8, "paper": 1, "tiny": 2},
    "cuda": {"small": 128, "paper": 64, "tiny": 8},
}
RATIOS = {"cpu": ["fp32"], "cuda": ["fp32", "bf16-cl"]}
# More repeats for the ratios on the CPU: one step per repeat there, and a VM's noise of 10-30%
# between single steps would otherwise decide a ratio of a few percent.
RATIO_REPEATS = {"cpu": 7, "cuda": 3}
MODES = ("pretrain", "finetune", "inference")


@dataclass(frozen=True)
class Variant:
    """Precision and options, spelled like ``bf16-cl-compile``."""

    name: str
    bf16: bool
    channels_last: bool
    compile: bool

    @classmethod
    def parse(cls, name: str) -> Variant:
        parts = name.split("-")
        if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"cl", "compile"}:
            raise ValueError(
                f"unknown variant {name!r}: write fp32 or bf16, then optionally -cl "
                "(channels_last) and -compile (torch.compile), e.g. bf16-cl-compile"
            )
        return cls(name, parts[0] == "bf16", "cl" in parts[1:], "compile" in parts[1:])

    def autocast(self, device: torch.device) -> Any:
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Models and steps
# --------------------------------------------------------------------------------------------
def build_encoder(geom: Geometry, variant: Variant, device: torch.device) -> SharedPatchEncoder:
    encoder = SharedPatchEncoder(
        geom.backbone, patch_size=geom.patch_size, channels_last=variant.channels_last
    )
    return encoder.to(device)


def build_tiler(geom: Geometry) -> PatchTiler:
    return PatchTiler(3, geom.patch_size, geom.image_size)


def build_task(geom: Geometry, variant: Variant, device: torch.device) -> JigsawPretext:
    encoder = build_encoder(geom, variant, device)
    task = JigsawPretext(encoder, PermutationSet.default(), build_tiler(geom))
    return task.to(device).train()


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


def maybe_compile(encoder: SharedPatchEncoder, variant: Variant) -> None:
    """Compile the encoder in place (its ``__call__``: normalisation, backbone, pooling)."""
    if variant.compile:
        encoder.compile(dynamic=False)


def random_images(batch: int, geom: Geometry, device: torch.device, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    size = (batch, 3, geom.image_size, geom.image_size)
    return torch.randint(0, 256, size, dtype=torch.uint8, generator=gen).to(device)


def pretrain_step(
    geom: Geometry,
    variant: Variant,
    batch: int,
    device: torch.device,
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
) -> Callable[[], None]:
    """One jigsaw step on uint8 images already on the device (``optimizer(task)`` if given)."""
    task = build_task(geom, variant, device)
    maybe_compile(task.encoder, variant)
    opt = optimizer(task) if optimizer is not None else make_optimizer(task.parameters())
    images = random_images(batch, geom, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with variant.autocast(device):
            loss = task(images, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def build_classifier(geom: Geometry, variant: Variant, device: torch.device) -> PatchClassifier:
    encoder = build_encoder(geom, variant, device)
    clf = PatchClassifier(encoder, num_classes=2, attention="sigmoid", tiler=build_tiler(geom))
    maybe_compile(clf.encoder, variant)
    return clf.to(device)


def finetune_step(
    geom: Geometry, variant: Variant, batch: int, device: torch.device
) -> Callable[[], None]:
    clf = build_classifier(geom, variant, device).train()
    opt = make_optimizer(clf.parameters())
    images = random_images(batch, geom, device)
    labels = torch.arange(batch, device=device) % 2

    def step() -> None:
        with variant.autocast(device):
            logits = clf(images)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def inference_step(
    geom: Geometry, variant: Variant, batch: int, device: torch.device
) -> Callable[[], None]:
    clf = build_classifier(geom, variant, device).eval()
    images = random_images(batch, geom, device)

    def step() -> None:
        with torch.inference_mode(), variant.autocast(device):
            clf(images).float().softmax(dim=-1)

    return step


STEPS = {"pretrain": pretrain_step, "finetune": finetune_step, "inference": inference_step}


# --------------------------------------------------------------------------------------------
# Ratio 1: the whole pretraining step against the bare backbone
# --------------------------------------------------------------------------------------------
def bare_backbone_step(
    task: JigsawPretext, batch: int, variant: Variant, device: torch.device
) -> Callable[[], None]:
    """Forward, backward and SGD step of the task's own backbone on ready float patches."""
    backbone = task.encoder.backbone
    ph, pw = task.tiler.patch_size
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(batch * task.tiler.num_patches, 3, ph, pw, generator=gen).to(device)
    if variant.channels_last:
        patches = patches.contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(backbone.parameters())

    def step() -> None:
        with variant.autocast(device):
            feats = backbone.forward_head(backbone.forward_features(patches), pre_logits=True)
        loss = feats.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# --------------------------------------------------------------------------------------------
# Ratio 2: the classic pipeline (per-sample tiling and shuffling in the loader workers)
# --------------------------------------------------------------------------------------------
class ClassicJigsawDataset(Dataset):
    """Per-sample jigsaw in ``__getitem__``, the way the published jigsaw loaders do it.

    For each image: turn it gray with probability 0.3, cut 9 tiles at the grid's centre
    positions plus a random jitter (Python's ``random``), standardise each tile's channels by
    the tile's own mean and standard deviation, pick one of the K permutations at random, and
    stack the tiles in that order: ``(N, C, h, w)`` float32 and the permutation's index.
    """

    def __init__(
        self,
        images: Tensor,
        tiler: PatchTiler,
        permutations: list[list[int]],
        *,
        gray_prob: float = 0.3,
        seed: int = 0,
    ) -> None:
        self.images = images  # (M, C, H, W) uint8, CPU
        self.corners = [(y0, x0) for x0, y0, _, _ in tiler.centre_boxes().tolist()]
        self.patch = tiler.patch_size
        self.jitter = tiler.jitter
        self.permutations = permutations
        self.gray_prob = gray_prob
        self.rng = random.Random(seed)  # re-seeded per worker by worker_init

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        rng = self.rng
        image = self.images[index].float().div_(255.0)
        if rng.random() < self.gray_prob:
            gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
            image = gray.expand(3, -1, -1)
        ph, pw = self.patch
        tiles = []
        for y0, x0 in self.corners:
            dy = rng.randint(-self.jitter, self.jitter)
            dx = rng.randint(-self.jitter, self.jitter)
            tile = image[:, y0 + dy : y0 + dy + ph, x0 + dx : x0 + dx + pw]
            mean = tile.mean(dim=(1, 2), keepdim=True)
            std = tile.std(dim=(1, 2), keepdim=True).clamp_min(1e-5)
            tiles.append((tile - mean) / std)
        label = rng.randrange(len(self.permutations))
        order = self.permutations[label]
        return torch.stack([tiles[order[k]] for k in range(len(order))]), label


class InMemoryImages(Dataset):
    """uint8 images already in memory: what the library's loaders hand over after decoding."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    if isinstance(dataset, ClassicJigsawDataset):
        dataset.rng = random.Random(1000 + worker_id)


def endless(dataset: Dataset, batch: int, workers: int, device: torch.device) -> Iterator[Any]:
    sampler = RandomSampler(
        dataset,
        replacement=True,
        num_samples=batch * 1_000_000,
        generator=torch.Generator().manual_seed(0),
    )
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
        prefetch_factor=2 if workers > 0 else None,
    )
    return iter(loader)


def pipeline_steps(
    geom: Geometry, batch: int, variant: Variant, workers: int, device: torch.device
) -> dict[str, Callable[[], None]]:
    """The library's step, the bare backbone's step, the two end-to-end pipelines, and the
    data preparation of each pipeline alone (the library's on the device, the classic one's
    per-sample loader work with no workers)."""
    task = build_task(geom, variant, device)
    opt = make_optimizer(task.parameters())
    pool = random_images(max(4 * batch, 32), geom, torch.device("cpu"), seed=2)
    on_device = random_images(batch, geom, device)
    gen = torch.Generator(device=device).manual_seed(0)
    perms = PermutationSet.default().permutations.tolist()

    def library_in_memory() -> None:
        with variant.autocast(device):
            loss = task(on_device, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ours = endless(InMemoryImages(pool), batch, workers, device)

    def library_pipeline() -> None:
        images = next(ours).to(device, non_blocking=True)
        with variant.autocast(device):
            loss = task(images, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    classic_data = ClassicJigsawDataset(pool, build_tiler(geom), perms)
    theirs = endless(classic_data, batch, workers, device)

    def classic_pipeline() -> None:
        tiles, labels = next(theirs)
        tiles = tiles.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = task.head(task.encoder(tiles, normalized=True))  # fp32, as published
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    classic_alone = endless(classic_data, batch, 0, torch.device("cpu"))

    def classic_loader() -> None:
        next(classic_alone)  # the classic per-sample work alone, on this process

    def library_prep() -> None:
        with torch.no_grad(), variant.autocast(device):
            task.make_inputs(on_device, gen)  # tiling, shuffling and defences alone

    return {
        "library_prep": library_prep,
        "classic_loader": classic_loader,
        "bare_backbone": bare_backbone_step(task, batch, variant, device),
        "library_step": library_in_memory,
        "library_pipeline": library_pipeline,
        "classic_pipeline": classic_pipeline,
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:300]


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_one(
    mode: str,
    geom: Geometry,
    variant: Variant,
    batch: int,
    device: torch.device,
    timing: dict[str, Any],
) -> dict[str, Any]:
    """Build, warm up and time one configuration; errors become a row, not a crash."""
    row: dict[str, Any] = {
        "mode": mode,
        "geometry": geom.name,
        "image_size": geom.image_size,
        "patch_size": geom.patch_size,
        "backbone": geom.backbone,
        "batch": batch,
        "variant": variant.name,
        "device": str(device),
    }
    _free(device)
    try:
        step = STEPS[mode](geom, variant, batch, device)
        with PeakMemory(device) as mem:
            t = measure(step, device=device, **timing)
        row.update(
            images_per_s=batch / t.median_s,
            ms_per_step=t.median_s * 1e3,
            samples_ms=[s * 1e3 for s in t.samples],
            iters=t.iters,
            first_call_s=t.first_call_s,
            peak_mib=mem.peak_mib,
            step_mib=mem.step_mib,
            memory_method=mem.method,
        )
    except Exception as err:  # a failing option is a result (e.g. compile without a compiler)
        row["error"] = _error_text(err)
        if os.environ.get("PATCHSSL_BENCH_DEBUG"):
            traceback.print_exc()
    _free(device)
    return row


def run_ratios(
    geom: Geometry,
    variant: Variant,
    batch: int,
    workers: int,
    device: torch.device,
    timing: dict[str, Any],
) -> dict[str, Any]:
    """Interleaved timing of the steps of :func:`pipeline_steps`; the ratios of their medians."""
    row: dict[str, Any] = {
        "geometry": geom.name,
        "backbone": geom.backbone,
        "batch": batch,
        "variant": variant.name,
        "workers": workers,
        "device": str(device),
        "repeats": timing["repeats"],
    }
    _free(device)
    try:
        fns = pipeline_steps(geom, batch, variant, workers, device)
        times: dict[str, Timing] = measure_interleaved(fns, device=device, **timing)
        for name, t in times.items():
            row[f"{name}_ms"] = t.median_s * 1e3
            row[f"{name}_images_per_s"] = batch / t.median_s
        row["step_over_bare"] = times["library_step"].median_s / times["bare_backbone"].median_s
        row["classic_over_library"] = (
            times["classic_pipeline"].median_s / times["library_pipeline"].median_s
        )
        row["pipeline_over_step"] = (
            times["library_pipeline"].median_s / times["library_step"].median_s
        )
        row["library_prep_ms_per_image"] = times["library_prep"].median_s * 1e3 / batch
        row["classic_loader_ms_per_image"] = times["classic_loader"].median_s * 1e3 / batch
    except Exception as err:
        row["error"] = _error_text(err)
        if os.environ.get("PATCHSSL_BENCH_DEBUG"):
            traceback.print_exc()
    _free(device)
    return row


def _print_row(row: dict[str, Any]) -> None:
    head = (
        f"{row['mode']:9s} {row['geometry']:5s} {row['backbone']:9s} B={row['batch']:<4d} "
        f"{row['variant']:16s}"
    )
    if "error" in row:
        print(f"{head} ERROR {row['error']}", flush=True)
        return
    print(
        f"{head} {row['images_per_s']:9.2f} img/s  {row['ms_per_step']:9.1f} ms/step  "
        f"peak {row['peak_mib']:8.0f} MiB (+{row['step_mib']:.0f})  "
        f"first call {row['first_call_s']:.2f} s  x{row['iters']} iters",
        flush=True,
    )


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _str_list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def parse_variant_spec(spec: str) -> tuple[Variant, tuple[str, ...]]:
    """``"bf16-cl@inference+finetune"`` -> the variant and the modes it runs in."""
    name, _, modes = spec.partition("@")
    chosen = tuple(m for m in modes.split("+") if m) or MODES
    for mode in chosen:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r} in {spec!r}; choose from {', '.join(MODES)}")
    return Variant.parse(name), chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    add_common_args(parser, default_out="benchmarks/results/throughput.json")
    parser.add_argument(
        "--geometries", type=_str_list, default=None, help="small,paper (tiny: smoke tests)"
    )
    parser.add_argument("--modes", type=_str_list, default=list(MODES), help=",".join(MODES))
    parser.add_argument(
        "--batches", type=_int_list, default=None, help="batch sizes swept (all geometries)"
    )
    parser.add_argument("--sweep", type=_str_list, default=None, help="variants at every batch")
    parser.add_argument(
        "--compare",
        type=_str_list,
        default=None,
        help="variants at the comparison batch, e.g. fp32-cl,bf16@inference,bf16-cl-compile",
    )
    parser.add_argument(
        "--compare-batch", type=int, default=None, help="batch at which options are compared"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add torch.compile (fp32-compile on CPU, bf16-cl-compile on CUDA) to --compare",
    )
    parser.add_argument("--no-ratios", action="store_true", help="skip the two ratios")
    parser.add_argument(
        "--ratio-variants", type=_str_list, default=None, help="variants for the ratios"
    )
    parser.add_argument("--ratio-batch", type=int, default=None, help="batch for the ratios")
    parser.add_argument(
        "--workers",
        type=_int_list,
        default=None,
        help="DataLoader workers for the pipeline ratio, e.g. 0,2 (default: 0 on CPU, "
        "min(8, cores) on CUDA)",
    )
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--min-time", type=float, default=None, help="seconds per repeat (iterations adapt)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the rows (also printed and saved)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    geometries = args.geometries or (["tiny"] if args.quick else ["small", "paper"])
    for mode in args.modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for name in geometries:
        if name not in GEOMETRIES:
            raise SystemExit(f"unknown geometry {name!r}; choose from {', '.join(GEOMETRIES)}")
    if args.quick:
        timing = {"warmup": 1, "repeats": 1, "min_time": 0.0}
    elif kind == "cuda":
        timing = {"warmup": 3, "repeats": 3, "min_time": 0.5}
    else:
        timing = {"warmup": 1, "repeats": 3, "min_time": 0.5}
    for key in ("warmup", "repeats", "min_time"):
        if getattr(args, key) is not None:
            timing[key] = getattr(args, key)
    sweep = [Variant.parse(v) for v in (args.sweep or (["fp32"] if args.quick else SWEEP[kind]))]
    workers_list = args.workers or (
        [0] if kind == "cpu" or args.quick else [min(8, os.cpu_count() or 1)]
    )
    ratio_variants = [Variant.parse(v) for v in (args.ratio_variants or RATIOS[kind])]
    ratio_timing = dict(timing)
    if not args.quick and args.repeats is None:
        ratio_timing["repeats"] = RATIO_REPEATS[kind]

    print(f"machine: {describe_machine()}")
    print(
        f"settings: device={device} torch threads={torch.get_num_threads()} timing={timing} "
        f"optimizer=SGD(momentum 0.9) cudnn.benchmark={torch.backends.cudnn.benchmark}"
    )
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    ratio_rows: list[dict[str, Any]] = []
    for name in geometries:
        geom = GEOMETRIES[name]
        batches = args.batches or BATCHES[kind][name]
        cmp_batch = args.compare_batch or (batches[0] if args.quick else COMPARE_BATCH[kind][name])
        specs = (
            args.compare
            if args.compare is not None
            else ([] if args.quick else COMPARE[kind][name])
        )
        compare = [parse_variant_spec(v) for v in specs]
        compiled = [parse_variant_spec(COMPILED[kind])] if args.compile else []
        plans: dict[str, list[tuple[str, int, Variant]]] = {"main": [], "compiled": []}
        for mode in args.modes:
            plans["main"] += [(mode, b, v) for b in batches for v in sweep]
            plans["main"] += [(mode, cmp_batch, v) for v, modes in compare if mode in modes]
            plans["compiled"] += [(mode, cmp_batch, v) for v, modes in compiled if mode in modes]
        # Compiled variants come last, after the ratios: their compilation is the slowest part.
        seen: set[tuple[str, int, str]] = set()
        for stage in ("main", "ratios", "compiled"):
            if stage == "ratios":
                if args.no_ratios:
                    continue
                ratio_batch = args.ratio_batch or (
                    batches[0] if args.quick else RATIO_BATCH[kind][name]
                )
                for variant in ratio_variants:
                    for workers in workers_list:
                        row = run_ratios(geom, variant, ratio_batch, workers, device, ratio_timing)
                        ratio_rows.append(row)
                        _write(args.out, rows, ratio_rows, argv, None, timing)
                        _print_ratio_row(row)
                continue
            for mode, batch, variant in plans[stage]:
                if (mode, batch, variant.name) in seen:
                    continue
                seen.add((mode, batch, variant.name))
                row = run_one(mode, geom, variant, batch, device, timing)
                _print_row(row)
                rows.append(row)
                _write(args.out, rows, ratio_rows, argv, None, timing)  # a killed run keeps rows
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")
    columns = ["mode", "geometry", "backbone", "batch", "variant", "images_per_s"]
    columns += ["ms_per_step", "peak_mib", "step_mib", "first_call_s", "error"]
    print(markdown_table(rows, columns))
    if ratio_rows:
        print(markdown_table(ratio_rows, RATIO_COLUMNS))
    out = _write(args.out, rows, ratio_rows, argv, elapsed, timing)
    print(f"results written to {out}")
    return rows + ratio_rows


def _write(
    path: str,
    rows: list[dict[str, Any]],
    ratio_rows: list[dict[str, Any]],
    argv: list[str] | None,
    elapsed: float | None,
    timing: dict[str, Any],
) -> Any:
    """Save what was measured so far (JSON, and CSV beside it); ``elapsed`` is None mid-run."""
    out = save_results(
        path,
        [
            *({"table": "throughput", **r} for r in rows),
            *({"table": "ratios", **r} for r in ratio_rows),
            {
                "table": "run",
                "argv": sys.argv[1:] if argv is None else argv,
                "seconds": elapsed,
                "complete": elapsed is not None,
                "timing": timing,
            },
        ],
    )
    save_csv(out.with_suffix(".csv"), rows)
    if ratio_rows:
        save_csv(out.with_name(out.stem + "_ratios.csv"), ratio_rows)
    return out


RATIO_COLUMNS = [
    "geometry",
    "batch",
    "variant",
    "workers",
    "bare_backbone_ms",
    "library_step_ms",
    "step_over_bare",
    "library_pipeline_ms",
    "classic_pipeline_ms",
    "classic_over_library",
    "library_prep_ms_per_image",
    "classic_loader_ms_per_image",
    "error",
]


def _print_ratio_row(row: dict[str, Any]) -> None:
    head = f"ratios {row['geometry']} B={row['batch']} {row['variant']} workers={row['workers']}"
    if "error" in row:
        print(f"{head}: ERROR {row['error']}", flush=True)
        return
    print(
        f"{head}: bare backbone {row['bare_backbone_ms']:.1f} ms, library step "
        f"{row['library_step_ms']:.1f} ms (x{row['step_over_bare']:.2f}), library pipeline "
        f"{row['library_pipeline_ms']:.1f} ms, classic pipeline "
        f"{row['classic_pipeline_ms']:.1f} ms "
        f"(classic/library x{row['classic_over_library']:.2f}); "
        f"prep per image: library {row['library_prep_ms_per_image']:.2f} ms, classic loader "
        f"{row['classic_loader_ms_per_image']:.2f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
