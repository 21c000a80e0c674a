"""The permutation curriculum on the test suite's real-photograph jigsaw: what leaves chance.

The puzzle of ``tests/test_pretext_learning.py`` (crops of scikit-image's retina and
immunohistochemistry photographs, each turned or mirrored; trained on the left half of each
photograph, scored on crops of the right halves, never trained on; 3x3 tiles of 28 px, 2 px
apart, in 96 px crops; the test's small CNN; Adam with a one-cycle schedule at 3e-3, batch
32, one thread), with the library's jigsaw otherwise, at each curriculum given: ``START:STEPS``
draws the first ``START`` permutations of the set at step 0 and grows geometrically to all K
over ``STEPS`` steps (``none``: all K from the start). The held-out puzzle accuracy is scored
over all K permutations (eval mode, centred tiles) five times per run::

    python benchmarks/bench_jigsaw_curriculum.py --curricula 64:200 10:200 64:1000 10:1000 4:1000
    python benchmarks/bench_jigsaw_curriculum.py --curricula 10:1000 --no-per-patch-norm
    python benchmarks/bench_jigsaw_curriculum.py --encoder resnet10t --curricula 10:1000

``--encoder`` takes a timm name instead of the small CNN (tiles of 32 px, crops resampled to
104 px).

References:
    Noroozi & Favaro, ECCV 2016, arXiv:1603.09246; Bengio et al., "Curriculum learning",
    ICML 2009.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import describe_machine
from bench_jigsaw_liftoff import fit_size
from test_pretext_learning import IMAGE, Photographs, _small_cnn  # the test's puzzle

from patchssl.encoder import SharedPatchEncoder
from patchssl.permutations import PermutationSet
from patchssl.pretext import JigsawPretext
from patchssl.tiling import PatchTiler


def parse_curriculum(text: str) -> tuple[int | None, int]:
    """``"10:1000"`` -> ``(10, 1000)``; ``"none"`` -> ``(None, 0)``."""
    if text.lower() == "none":
        return None, 0
    start, _, steps = text.partition(":")
    return int(start), int(steps)


def run(
    curriculum: str,
    *,
    steps: int,
    per_patch_norm: bool,
    encoder_name: str | None,
    num_permutations: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Train one jigsaw; its held-out and seen accuracy over all K, five times."""
    start, growth = parse_curriculum(curriculum)
    torch.manual_seed(seed)
    photos = Photographs()
    held = photos.batch(400, torch.Generator().manual_seed(123), held_out=True)
    seen = photos.batch(400, torch.Generator().manual_seed(321), held_out=False)
    if encoder_name is None:
        encoder = SharedPatchEncoder(_small_cnn(), patch_size=28)
        tiler = PatchTiler(grid=3, patch_size=28, image_size=IMAGE, gap=2)
    else:
        encoder = SharedPatchEncoder(encoder_name, patch_size=32)
        tiler = PatchTiler(grid=3, patch_size=32, image_size=104, gap=2)

    perms = (
        PermutationSet.default()
        if num_permutations == 1000
        else PermutationSet.generate(num_permutations, 9, method="max_min", seed=0)
    )
    task = JigsawPretext(
        encoder,
        perms,
        tiler,
        curriculum=start,
        curriculum_steps=growth,
        defences={"per_patch_norm": per_patch_norm},
    )
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(seed)
    log, losses, t0 = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        task.train()
        loss = task(
            fit_size(task, photos.batch(32, generator, held_out=False)), generator=generator
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if step % max(1, steps // 5) == 0 or step == steps:
            active = task.active_permutations
            task.eval()
            row = {
                "step": step,
                "active": active,
                "loss": round(float(torch.stack(losses[-50:]).mean()), 3),
                "held_out_acc": task.accuracy(
                    fit_size(task, held), generator=torch.Generator().manual_seed(1)
                ),
                "seen_acc": task.accuracy(
                    fit_size(task, seen), generator=torch.Generator().manual_seed(1)
                ),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            log.append(row)
            print(json.dumps({"curriculum": curriculum, **row}), flush=True)
    return {"log": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curricula", nargs="+", default=["64:200", "10:1000"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num-permutations", type=int, default=1000)
    parser.add_argument(
        "--no-per-patch-norm",
        action="store_true",
        help="tiles keep their brightness and colour (the jigsaw's default since 0.2)",
    )
    parser.add_argument("--encoder", default=None, help="a timm name instead of the small CNN")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/jigsaw-curriculum.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_machine(), flush=True)
    results: dict[str, Any] = {"args": vars(args), "machine": describe_machine()}
    for curriculum in args.curricula:
        results[curriculum] = run(
            curriculum,
            steps=args.steps,
            per_patch_norm=not args.no_per_patch_norm,
            encoder_name=args.encoder,
            num_permutations=args.num_permutations,
        )
        Path(args.out).write_text(json.dumps(results, indent=1))  # as it goes
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
