"""Can fine-tuning learn the synthetic task at all? The fine-tuning recipe, from scratch.

Before any row of the transfer benchmark (``bench_transfer.py``) can beat another, the
classifier must learn the task from the labels it is given. This script trains the library's
classifier (:func:`patchssl.engine.finetuning.build_classifier`, the engine's
:class:`~patchssl.engine.finetuning.FinetuneTask` step, optimizer and warmup-cosine schedule) on
the benchmark's own images held in memory, without the engine's per-epoch work (checkpoints,
logs), so that many recipes fit in minutes, and scores each on the benchmark's held-out test
patients (test AUC with a patient-bootstrap 95% interval).

Each variant is a list of config overrides on top of the benchmark's fine-tuning settings::

    python benchmarks/bench_finetune_recipe.py --list
    python benchmarks/bench_finetune_recipe.py --variants base encoder_norm --budgets 32 128
    python benchmarks/bench_finetune_recipe.py --device cuda --images 4000

The test set and the budget draw are the transfer benchmark's (``--test-patients`` of its
data); only from-scratch rows are trained here, so no pretraining checkpoint is needed.

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." JIPS 17(3), 2021.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, pick_device
from bench_transfer import Settings, base_config, budget_patients, make_data

from patchssl.engine.config import apply_overrides
from patchssl.engine.finetuning import FinetuneTask, build_classifier
from patchssl.engine.loop import build_optimizer, build_scheduler
from patchssl.metrics import binary_metrics, bootstrap_ci

#: name -> config overrides (``section.key=value``) on top of the benchmark's settings.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "encoder_norm": ["model.input_norm=encoder"],
    "lr3e-4": ["train.lr=0.0003"],
    "lr3e-3": ["train.lr=0.003"],
    "no_dropout": ["model.dropout=0.0"],
    "pooled_head": ["model.head=pooled"],
    "no_flip": ["train.augment=none"],
    "group_norm": ["model.norm=group"],
    "sgd": ["train.optimizer=sgd", "train.lr=0.01"],
    # The attention and the head (the base variant has no attention and the concat head).
    "sigmoid": ["model.attention=sigmoid"],  # the paper's classifier
    "pooled_softmax": ["model.head=pooled", "model.attention=softmax"],
    "pooled_gated": ["model.head=pooled", "model.attention=gated"],
    # ... with ImageNet-normalised input instead of per-patch standardisation.
    "encoder_norm+sigmoid": ["model.input_norm=encoder", "model.attention=sigmoid"],
    "encoder_norm+pooled": ["model.input_norm=encoder", "model.head=pooled"],
    "encoder_norm+pooled_sigmoid": [
        "model.input_norm=encoder",
        "model.head=pooled",
        "model.attention=sigmoid",
    ],
    "encoder_norm+pooled_softmax": [
        "model.input_norm=encoder",
        "model.head=pooled",
        "model.attention=softmax",
    ],
    "encoder_norm+pooled_gated": [
        "model.input_norm=encoder",
        "model.head=pooled",
        "model.attention=gated",
    ],
}


def auc_with_ci(labels: np.ndarray, scores: np.ndarray, patients: list[str]) -> dict[str, float]:
    """Test AUC and its patient-bootstrap 95% interval (500 resamples)."""
    auc = binary_metrics(labels, scores)["auc"]
    lo, hi = bootstrap_ci(
        labels, scores, threshold=0.5, groups=patients, n_boot=500, metrics=["auc"]
    )["auc"]
    return {"auc": float(auc), "lo": float(lo), "hi": float(hi)}


def run(
    s: Settings,
    data: Any,
    variant: str,
    budget: int,
    seed: int,
    images_seen: int,
    device: torch.device,
) -> dict[str, Any]:
    """Train one from-scratch classifier in memory; its test AUC and the time it took."""
    c = base_config(s, data, threads=0)
    # The base recipe: no attention, the concatenating head (the classifier of the runs these
    # variants were first measured against), whatever the library's defaults are.
    c.model.attention = "none"
    c.model.head = "concat"
    c.train.seed = seed
    c.train.lr = s.lr
    c = apply_overrides(c, VARIANTS[variant])
    model, _, _ = build_classifier(c, device)
    idx = [i for p in budget_patients(data, budget, seed) for i in data.pool[p]]
    x = torch.from_numpy(data.images[idx]).to(device)
    y = torch.tensor([int(data.records[i].label) for i in idx], device=device)
    counts = torch.bincount(y, minlength=2).float()
    task = FinetuneTask(model, None, device, weight=counts.sum() / (2 * counts.clamp(min=1)))
    steps_per_epoch = max(1, len(idx) // s.batch_size)
    per_epoch = min(len(idx), steps_per_epoch * s.batch_size)
    epochs = max(1, round(images_seen / per_epoch))
    c.train.epochs = epochs
    optimizer = build_optimizer(model, c.train)
    scheduler = build_scheduler(optimizer, c.train, steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(idx), generator=g)
        for k in range(steps_per_epoch):
            b = order[k * s.batch_size : (k + 1) * s.batch_size].to(device)
            out = task.step({"image": x[b], "label": y[b]}, gd)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    scores = []
    with torch.inference_mode():
        test = data.images[data.test_index]
        for lo in range(0, len(test), 128):
            logits = model(torch.from_numpy(test[lo : lo + 128]).to(device))
            scores.append(torch.softmax(logits.float(), -1)[:, 1].cpu().numpy())
    labels = np.array([int(data.records[i].label) for i in data.test_index])
    patients = [data.records[i].patient for i in data.test_index]
    result = auc_with_ci(labels, np.concatenate(scores), patients)
    result.update(
        variant=variant,
        budget=budget,
        seed=seed,
        epochs=epochs,
        train_loss_last=float(out.loss.detach()),
        seconds=round(time.perf_counter() - start, 1),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--images", type=int, default=2000, help="images seen per run")
    parser.add_argument("--test-patients", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=None, help="default: the benchmark's")
    parser.add_argument("--patch-size", type=int, default=None, help="default: the benchmark's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/bench")
    parser.add_argument("--out", default="/tmp/finetune-recipe.json")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args()
    if args.list:
        for name, overrides in VARIANTS.items():
            print(name, overrides)
        return
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    # The transfer benchmark's labeled images (each depends only on the seed and its index),
    # without its unlabeled ones.
    s = replace(
        Settings(), num_unlabeled=0, test_patients=args.test_patients, budgets=tuple(args.budgets)
    )
    if args.image_size is not None:
        s = replace(s, image_size=args.image_size)
    if args.patch_size is not None:
        s = replace(s, patch_size=args.patch_size)
    print(describe_machine(), flush=True)
    data = make_data(s, Path(args.cache))
    results = []
    for variant in args.variants:
        for budget in args.budgets:
            for seed in args.seeds:
                row = run(s, data, variant, budget, seed, args.images, device)
                results.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
