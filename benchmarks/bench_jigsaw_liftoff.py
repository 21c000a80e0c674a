"""Jigsaw lift-off on real photographs: which lever gets the 1,000-way puzzle off chance.

Trains :class:`patchssl.pretext.JigsawPretext` (resnet10t, 3x3 tiles of 32 px cut from 128 px
crops, batch 32, the engine's optimizer and warmup-cosine schedule) on random crops of
scikit-image's bundled photographs, and reports the held-out puzzle accuracy (eval mode: centred
tiles, every one of the K permutations) on crops of photographs never seen in training. Each
lever is one variant of the configuration; run them one at a time (one thread, a few minutes
each)::

    python benchmarks/bench_jigsaw_liftoff.py --variants old_defaults defaults
    python benchmarks/bench_jigsaw_liftoff.py --list
    python benchmarks/bench_jigsaw_liftoff.py --synthetic --variants defaults
    python benchmarks/bench_jigsaw_liftoff.py --position --variants defaults no_image_defences
    python benchmarks/bench_jigsaw_liftoff.py --timing
    python benchmarks/bench_jigsaw_liftoff.py --variants defaults --head assignment
    python benchmarks/bench_jigsaw_liftoff.py --engine 3369 --steps 300   # patchssl pretrain

``--head`` runs every variant with that jigsaw head (the tables measured before the relation
head became the default ran with ``assignment``). ``--engine CROPS`` runs ``patchssl pretrain``
itself, with its defaults, on CROPS training crops saved as PNG files, and scores its last
checkpoint on the same held-out crops. ``--lr`` sets the learning rate of the engine and of
every variant that does not name its own (default: the library's pretraining rate, 3e-3 since
2026-11-28; the tables measured before ran at ``--lr 1e-3``).

``--position`` adds the position diagnostic (``--position-only``: for a random encoder
alone): a 9-way logistic regression on frozen per-patch features (centred tiles of unshuffled
images) predicts each tile's place in the grid, fitted on crops of the training photographs and
scored on crops of the held-out ones (on synthetic data, on held-out images), for a randomly
initialised encoder and for the encoder after pretraining, each fed its tiles as the first
variant's task feeds them (standardised per tile or not). The images are shown plain and as
the image-level defences turn them (flips and quarter turns, random resized crops), to measure
how much the layout still gives away.

References:
    Noroozi & Favaro, ECCV 2016, arXiv:1603.09246.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine

from patchssl.encoder import SharedPatchEncoder
from patchssl.engine.config import DEFAULT_LR, TrainConfig
from patchssl.engine.loop import build_optimizer, build_scheduler
from patchssl.permutations import PermutationSet
from patchssl.pretext import JigsawPretext
from patchssl.pretext.defences import ImageDefences, PatchDefences, standardize_patches
from patchssl.tiling import PatchTiler

PHOTOS = [
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "cell",
    "clock",
    "coins",
    "stereo_motorcycle",
]
HELD_OUT = ("chelsea", "coins", "gravel", "retina")  # never seen in training
IMAGE, PATCH, BATCH = 128, 32, 32

# The levers. Each is (JigsawPretext kwargs, encoder kwargs, TrainConfig overrides) on top of
# the library's current defaults; "old_defaults" is the recipe before the fix.
# patchssl 0.1.0's default patch defences (per-tile normalisation on): the "defaults" rows
# of the tables measured before 0.2 (docs/benchmarks.md).
PER_PATCH_NORM = PatchDefences(per_patch_norm=True, color_drop="grayscale", color_drop_prob=0.3)
OLD = {
    "head": "concat",
    "hidden_dim": 512,
    "concat_dim": 1024,
    "curriculum": None,
    "flip": False,
    "rot90": False,
    "defences": PER_PATCH_NORM,
}
# The jigsaw's 0.1.0 patch defences with one of them off.
NO_PER_PATCH_NORM = PatchDefences(per_patch_norm=False, color_drop="grayscale", color_drop_prob=0.3)
NO_COLOR_DEFENCES = PatchDefences(per_patch_norm=True, color_drop=None, channel_shift=0)
# Neither: each tile keeps its brightness and colour, so colour continuity between tiles is left.
NO_PATCH_DEFENCES = PatchDefences(per_patch_norm=False, color_drop=None, channel_shift=0)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "old_defaults": (OLD, {}, {}),
    "defaults+per_patch_norm": ({"defences": PER_PATCH_NORM}, {}, {}),
    "old+curriculum": ({**OLD, "curriculum": 64}, {}, {}),
    "old+sgd": (OLD, {}, {"optimizer": "sgd", "lr": 0.01}),
    "old+group_norm": (OLD, {"norm": "group"}, {}),
    "old+no_per_patch_norm": ({**OLD, "defences": NO_PER_PATCH_NORM}, {}, {}),
    "concat_sized": ({**OLD, "hidden_dim": None, "concat_dim": None}, {}, {}),
    "concat_sized+curriculum": (
        {**OLD, "hidden_dim": None, "concat_dim": None, "curriculum": 64},
        {},
        {},
    ),
    "assignment": ({"curriculum": None, "flip": False, "rot90": False}, {}, {}),
    "assignment+curriculum": ({"flip": False, "rot90": False}, {}, {}),
    "assignment+sgd": (
        {"curriculum": None, "flip": False, "rot90": False},
        {},
        {"optimizer": "sgd", "lr": 0.01},
    ),
    "defaults": ({}, {}, {}),
    # The default head before the relation head (0.2.0.dev0 until 2026-11-27): --head assignment
    # runs every variant with it, as the tables measured before the change did.
    "assignment_head": ({"head": "assignment"}, {}, {}),
    "no_curriculum": ({"curriculum": None}, {}, {}),
    "no_image_defences": ({"flip": False, "rot90": False}, {}, {}),
    "defaults+crop": ({"crop_scale": (0.5, 1.0)}, {}, {}),
    "defaults+flip_only": ({"rot90": False}, {}, {}),
    "defaults+crop25": ({"crop_scale": (0.25, 1.0)}, {}, {}),
    "defaults+lr3e-3": ({}, {}, {"lr": 3e-3}),
    "defaults+lr3e-4": ({}, {}, {"lr": 3e-4}),
    "defaults+sgd": ({}, {}, {"optimizer": "sgd", "lr": 0.01}),
    "defaults+sgd0.1": ({}, {}, {"optimizer": "sgd", "lr": 0.1}),
    "defaults+group_norm": ({}, {"norm": "group"}, {}),
    "defaults+no_color_defences": ({"defences": NO_COLOR_DEFENCES}, {}, {}),
    "defaults+no_per_patch_norm": ({"defences": NO_PER_PATCH_NORM}, {}, {}),
    "defaults+slow_curriculum": ({"curriculum_steps": 1000}, {}, {}),
    # The curriculum from the set's first 10 permutations (the puzzle the test suite's small
    # jigsaw learns within 100 steps), growing to all K over 1,000 or 300 steps.
    "defaults+curriculum10": ({"curriculum": 10, "curriculum_steps": 1000}, {}, {}),
    "defaults+curriculum10_fast": ({"curriculum": 10, "curriculum_steps": 300}, {}, {}),
    "defaults+per_patch_norm+curriculum10": (
        {"curriculum": 10, "curriculum_steps": 1000, "defences": PER_PATCH_NORM},
        {},
        {},
    ),
    # ... with tiles 2 px apart at most (104 px images: cells of 34 px), as in the test suite's
    # real-photograph jigsaw.
    "defaults+curriculum10+small_gap": (
        {"curriculum": 10, "curriculum_steps": 1000, "_tiler": {"image_size": 104}},
        {},
        {},
    ),
    "defaults+per_patch_norm+curriculum10+small_gap": (
        {
            "curriculum": 10,
            "curriculum_steps": 1000,
            "defences": PER_PATCH_NORM,
            "_tiler": {"image_size": 104},
        },
        {},
        {},
    ),
    # The tiling: "_tiler" holds PatchTiler options; images are resampled to its image_size.
    # 128 px: cells of 42 px, 10 px of room around each 32 px tile (jittered in training);
    # 104 px: cells of 34 px, 2 px of room; 96 px: tiles edge to edge, no gap, no jitter.
    "defaults+no_jitter": ({"_tiler": {"jitter": 0}}, {}, {}),
    "defaults+small_gap": ({"_tiler": {"image_size": 104}}, {}, {}),
    "defaults+no_gap": ({"_tiler": {"image_size": 96}}, {}, {}),
    "no_image_defences+no_gap": (
        {"flip": False, "rot90": False, "_tiler": {"image_size": 96}},
        {},
        {},
    ),
    "defaults+no_gap+no_per_patch_norm": (
        {"_tiler": {"image_size": 96}, "defences": NO_PER_PATCH_NORM},
        {},
        {},
    ),
    "flip_only+small_gap": ({"rot90": False, "_tiler": {"image_size": 104}}, {}, {}),
    # Continuity between tiles: no per-tile normalisation and no colour defences, with the
    # default gap or tiles edge to edge, with and without the image-level defences.
    "defaults+no_patch_defences": ({"defences": NO_PATCH_DEFENCES}, {}, {}),
    "defaults+no_gap+no_patch_defences": (
        {"_tiler": {"image_size": 96}, "defences": NO_PATCH_DEFENCES},
        {},
        {},
    ),
    "no_image_defences+no_gap+no_patch_defences": (
        {
            "flip": False,
            "rot90": False,
            "_tiler": {"image_size": 96},
            "defences": NO_PATCH_DEFENCES,
        },
        {},
        {},
    ),
}


# ------------------------------------------------------------------------------------- data
def _load_photos(cache: str | None = None) -> dict[str, torch.Tensor]:
    """Each photograph as (1, 3, H, W) float 0..255, shorter side resampled to 384 px.

    With ``cache`` (a ``.npz`` file), the photographs are read from it when it exists and
    written to it otherwise, so that a machine without scikit-image's data can run this.
    """
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as saved:
            return {name: torch.from_numpy(saved[name]).float() for name in PHOTOS}
    from skimage import data

    out = {}
    for name in PHOTOS:
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        img = np.asarray(img, dtype=np.float32)
        if img.max() <= 1.0:
            img = img * 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        x = torch.from_numpy(img[..., :3].copy()).permute(2, 0, 1)[None]
        scale = 384 / min(x.shape[-2:])
        size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
        out[name] = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache, **{k: v.round().clamp(0, 255).to(torch.uint8).numpy() for k, v in out.items()}
        )
        return _load_photos(cache)  # the same values on both paths
    return out


def _crops(
    source: torch.Tensor,
    n: int,
    generator: torch.Generator,
    box: tuple[float, float, float, float] | None = None,
) -> torch.Tensor:
    """``n`` random square crops (side 128..256 px of the 384 px photograph) -> uint8 128 px.

    ``box`` (x0, y0, x1, y1 in px): the crops lie inside it, their side clipped to it. The
    draws come from the CPU ``generator``; the crops are made on ``source``'s device.
    """
    _, _, h, w = source.shape
    bx0, by0, bx1, by1 = box if box is not None else (0.0, 0.0, float(w), float(h))
    r = torch.rand(3, n, generator=generator)
    side = 128 + r[0] * (min(256.0, bx1 - bx0, by1 - by0) - 128)
    x0, y0 = bx0 + r[1] * (bx1 - bx0 - side), by0 + r[2] * (by1 - by0 - side)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h
    theta[:, 0, 2] = (x0 + side / 2) / w * 2 - 1
    theta[:, 1, 2] = (y0 + side / 2) / h * 2 - 1
    grid = F.affine_grid(theta.to(source.device), [n, 3, IMAGE, IMAGE], align_corners=False)
    out = F.grid_sample(source.expand(n, -1, -1, -1), grid, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _half(photo: torch.Tensor, right: bool) -> tuple[float, float, float, float]:
    """The left or right half of ``photo`` as a crop box."""
    h, w = photo.shape[-2:]
    return (w / 2, 0.0, float(w), float(h)) if right else (0.0, 0.0, w / 2, float(h))


class Photographs:
    """Random crops of the training photographs; a fixed set of held-out crops.

    ``held_out="photographs"``: four photographs (:data:`HELD_OUT`) are never trained on.
    ``held_out="regions"``: every photograph is trained on its left half and scored on its
    right half (unseen regions of seen photographs; crops of 128 to 192 px).
    """

    def __init__(
        self,
        held_out_per_photo: int = 80,
        device: str = "cpu",
        cache: str | None = None,
        held_out: str = "photographs",
    ) -> None:
        if held_out not in ("photographs", "regions"):
            raise ValueError(f"held_out must be 'photographs' or 'regions'; got {held_out!r}")
        self.photos = {k: v.to(device) for k, v in _load_photos(cache).items()}
        g = torch.Generator().manual_seed(1234)
        self.boxes: dict[str, tuple[float, float, float, float] | None]
        if held_out == "photographs":
            self.train_names = [n for n in PHOTOS if n not in HELD_OUT]
            self.held_out_names: tuple[str, ...] | None = HELD_OUT
            self.boxes = dict.fromkeys(PHOTOS)
            self.held_out = torch.cat(
                [_crops(self.photos[n], held_out_per_photo, g) for n in HELD_OUT]
            )
        else:
            self.train_names = list(PHOTOS)
            self.held_out_names = None
            self.boxes = {n: _half(self.photos[n], right=False) for n in PHOTOS}
            per_photo = max(1, held_out_per_photo * len(HELD_OUT) // len(PHOTOS))
            self.held_out = torch.cat(
                [_crops(self.photos[n], per_photo, g, _half(self.photos[n], True)) for n in PHOTOS]
            )
        self.seen = torch.cat(
            [_crops(self.photos[n], 20, g, self.boxes[n]) for n in self.train_names]
        )

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        which = torch.randint(len(self.train_names), (n,), generator=generator)
        parts = [
            _crops(
                self.photos[self.train_names[i]],
                int((which == i).sum()),
                generator,
                self.boxes[self.train_names[i]],
            )
            for i in range(len(self.train_names))
            if (which == i).any()
        ]
        return torch.cat(parts)


class Synthetic:
    """Synthetic cervix images (patchssl.data.synthetic), 128 px; the last 320 held out."""

    def __init__(self, n_train: int = 1600, n_held: int = 320, device: str = "cpu") -> None:
        from patchssl.data.synthetic import render_cervix

        rng = np.random.default_rng(0)
        imgs = [render_cervix(rng, IMAGE).image for _ in range(n_train + n_held)]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().to(device)
        self.train, self.held_out = x[:n_train], x[n_train:]
        self.seen = self.train[:240]

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        which = torch.randint(len(self.train), (n,), generator=generator)
        return self.train[which.to(self.train.device)]


# ------------------------------------------------------------------------------------- runs
def build(
    variant: str,
    num_permutations: int,
    seed: int,
    device: str = "cpu",
    head: str | None = None,
) -> JigsawPretext:
    """The variant's task; ``head`` overrides its jigsaw head (``None``: the variant's own)."""
    task_kw, enc_kw, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    encoder = SharedPatchEncoder("resnet10t", patch_size=PATCH, **enc_kw)
    perms = (
        PermutationSet.default()
        if num_permutations == 1000
        else PermutationSet.generate(num_permutations, 9, seed=0)
    )
    task_kw = dict(task_kw)
    if head is not None:
        task_kw["head"] = head
    tiler = PatchTiler(
        grid=3, patch_size=PATCH, **{"image_size": IMAGE, **task_kw.pop("_tiler", {})}
    )
    return JigsawPretext(encoder, perms, tiler, **task_kw).to(device)


def fit_size(task: JigsawPretext, images: torch.Tensor) -> torch.Tensor:
    """``images`` (uint8, ``IMAGE`` px) resampled to the size the task's tiler cuts."""
    size = task.tiler.image_size
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def puzzle_hits(task: JigsawPretext, images: torch.Tensor) -> torch.Tensor:
    """Whether each image's puzzle is solved (bool, one per image; seeded draws)."""
    task.eval()
    g = torch.Generator(images.device).manual_seed(7)
    hits = [
        task.predict(fit_size(task, images[i : i + 64]), generator=g)
        for i in range(0, len(images), 64)  # centred tiles, all K permutations
    ]
    task.train()
    return torch.cat([(h.logits.argmax(-1) == h.targets) for h in hits]).cpu()


def puzzle_accuracy(task: JigsawPretext, images: torch.Tensor) -> float:
    return float(puzzle_hits(task, images).float().mean())


def hits_by_photograph(hits: torch.Tensor, data: Any) -> dict[str, int] | None:
    """Held-out ``hits`` summed per held-out photograph (``None`` unless whole photographs are
    held out)."""
    if getattr(data, "held_out_names", None) is None:
        return None
    per_photo = hits.view(len(data.held_out_names), -1)
    return {name: int(h.sum()) for name, h in zip(data.held_out_names, per_photo, strict=True)}


def train(
    task: JigsawPretext,
    data: Any,
    variant: str,
    steps: int,
    seed: int,
    batch: int = BATCH,
    log_every: int = 100,
    lr: float | None = None,
) -> list[dict]:
    overrides = VARIANTS[variant][2]
    # the variant's own rate, else ``lr``, else the library's pretraining rate
    rate = lr if lr is not None else DEFAULT_LR["pretrain"]
    cfg = TrainConfig(epochs=1, warmup_epochs=20 / steps, **{"lr": rate, **overrides})
    optimizer = build_optimizer(task, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    g = torch.Generator().manual_seed(seed)  # the data's draws, on the CPU
    device = next(task.parameters()).device
    g_task = torch.Generator(device).manual_seed(seed)  # the task's, on its device
    log, losses, start = [], [], time.perf_counter()
    task.train()
    for step in range(1, steps + 1):
        out = task(fit_size(task, data.batch(batch, g).to(device)), generator=g_task)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(out.loss.detach())
        if step % log_every == 0 or step == steps:
            row = {
                "step": step,
                "lr": cfg.lr,  # the peak rate
                "loss": float(torch.stack(losses[-100:]).mean()),
                "active": task.active_permutations,
                "held_out_acc": puzzle_accuracy(task, data.held_out),
                "seconds": round(time.perf_counter() - start, 1),
            }
            log.append(row)
            print(json.dumps(row), flush=True)
    return log


# ----------------------------------------------------------------------- the engine itself
def engine_run(
    data: Any, steps: int, seed: int, crops: int, workdir: str, lr: float | None = None
) -> dict[str, Any]:
    """``patchssl pretrain`` with its defaults on ``crops`` training crops saved as PNG files.

    The crops are drawn once (seed ``seed``) from the training photographs and written to
    ``workdir/unlabeled``; the engine then pretrains resnet10t on them (128 px images, 3x3
    tiles of 32 px, batch 32, everything else the library's defaults, including its 5%
    held-out images and early stopping) for as many epochs as ``steps`` steps take, and its
    last checkpoint is scored on the held-out crops. ``lr``: ``train.lr`` (``None``: the
    library's pretraining default).
    """
    import math

    from PIL import Image

    from patchssl.checkpoint import load_checkpoint
    from patchssl.engine import pretrain
    from patchssl.engine.config import Config
    from patchssl.pretext import pretext_from_config

    root = Path(workdir)
    unlabeled = root / "unlabeled"
    unlabeled.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, crops, 256):
        batch = data.batch(min(256, crops - start), g).cpu()
        for i, image in enumerate(batch):
            path = unlabeled / f"crop_{start + i:05d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    config = Config()
    config.out = str(root / "run")
    config.data.unlabeled = str(unlabeled)
    config.data.image_size = IMAGE
    config.model.backbone = "resnet10t"
    config.model.patch_size = PATCH
    config.train.batch_size = BATCH
    config.train.seed = seed
    config.train.lr = lr
    config.train.overwrite = True
    config.train.progress = False
    config.train.tensorboard = "false"
    train_images = crops - math.ceil(crops * config.data.pretrain_val_size)
    per_epoch = math.ceil(train_images / BATCH)
    config.train.epochs = math.ceil(steps / per_epoch)
    start = time.perf_counter()
    result = pretrain(config)
    seconds = time.perf_counter() - start
    checkpoint = load_checkpoint(result.last_checkpoint, kind="pretrain")
    task = pretext_from_config(checkpoint["model_config"])
    task.load_state_dict(checkpoint["model"])
    hits = puzzle_hits(task, data.held_out)
    out = {
        "crops": crops,
        "epochs_run": len(result.history),
        "steps": int(task.steps_taken),
        "held_out_acc": float(hits.float().mean()),
        "seen_acc": puzzle_accuracy(task, data.seen),
        "held_out_hits_by_photograph": hits_by_photograph(hits, data),
        "val_acc_last": result.history[-1].get("val_acc"),
        "seconds": round(seconds, 1),
        "config": {
            "head": task.config["head"],
            "epochs": config.train.epochs,
            "lr": yaml.safe_load((Path(config.out) / "config.yaml").read_text())["train"]["lr"],
        },
    }
    print(json.dumps(out), flush=True)
    return out


# ------------------------------------------------------------------------- position diagnostic
@torch.no_grad()
def patch_features(
    encoder: SharedPatchEncoder, images: torch.Tensor, per_patch: bool = False
) -> np.ndarray:
    """Frozen per-patch features of centred tiles: (B, 9, D), as the jigsaw feeds them.

    ``per_patch``: each tile standardised on its own (a jigsaw with per-tile normalisation,
    patchssl 0.1.0's default), else the encoder's own input normalisation.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    tiler = PatchTiler(grid=3, patch_size=PATCH, image_size=IMAGE).eval()
    feats = []
    for i in range(0, len(images), 64):
        x = images[i : i + 64].to(device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        patches = tiler(x).patches
        if per_patch:
            patches = standardize_patches(patches)
        feats.append(encoder(patches, normalized=per_patch).float().cpu())
    return torch.cat(feats).numpy()


def position_accuracy(
    encoder: SharedPatchEncoder, fit: torch.Tensor, test: torch.Tensor, per_patch: bool = False
) -> float:
    """9-way logistic regression of a tile's place from its features; held-out accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def xy(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        f = patch_features(encoder, images, per_patch)
        return f.reshape(-1, f.shape[-1]), np.tile(np.arange(9), len(f))

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    clf.fit(*xy(fit))
    x, y = xy(test)
    return float((clf.predict(x) == y).mean())


#: Image-level defence settings the position diagnostic shows the images under.
DEFENCE_SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "flip+rot90": {"flip": True, "rot90": True},
    "crop(0.25-1)": {"crop_scale": (0.25, 1.0)},
    "crop(0.25-1)+flip+rot90": {"crop_scale": (0.25, 1.0), "flip": True, "rot90": True},
}


def defended(images: torch.Tensor, setting: dict[str, Any], seed: int) -> torch.Tensor:
    """The images as the image-level defences ``setting`` turn them in training."""
    d = ImageDefences(**setting).train()
    return d(images, generator=torch.Generator(images.device).manual_seed(seed))


def position_report(task: JigsawPretext, data: Any, label: str) -> dict:
    """Position accuracy of ``task``'s encoder's features (its input) under each setting."""
    fit, test = data.seen, data.held_out
    per_patch = task.defences.per_patch_norm
    row: dict[str, Any] = {"encoder": label, "per_patch_input": per_patch}
    for name, setting in DEFENCE_SETTINGS.items():
        row[name] = position_accuracy(
            task.encoder, defended(fit, setting, 1), defended(test, setting, 2), per_patch
        )
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------------- timing
def timing(repeats: int = 7, inner: int = 5) -> dict:
    """Median step time: the jigsaw task against a bare backbone with a linear head."""
    import statistics

    torch.manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, IMAGE, IMAGE), dtype=torch.uint8)
    tiler = PatchTiler(grid=3, patch_size=PATCH, image_size=IMAGE)

    def bare_step_fn(flat: bool):
        enc = SharedPatchEncoder("resnet10t", patch_size=PATCH)
        width = enc.out_dim * (9 if flat else 1)
        head = torch.nn.Linear(width, 1000)
        opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3)
        target = torch.randint(1000, (BATCH,))

        def step() -> None:
            x = standardize_patches(tiler(images).patches.float() / 255.0)
            f = enc(x, normalized=True)
            f = f.flatten(1) if flat else f.mean(1)
            loss = F.cross_entropy(head(f), target)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step, sum(p.numel() for p in head.parameters())

    def task_step_fn(kw: dict):
        task = JigsawPretext(
            SharedPatchEncoder("resnet10t", patch_size=PATCH),
            tiler=PatchTiler(grid=3, patch_size=PATCH, image_size=IMAGE),
            **kw,
        )
        opt = torch.optim.AdamW(task.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)

        def step() -> None:
            loss = task(images, generator=g).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step, sum(p.numel() for p in task.head.parameters())

    cases = {
        "bare_mean_linear": bare_step_fn(False),
        "bare_concat_linear": bare_step_fn(True),
        "jigsaw_defaults": task_step_fn({}),
        "jigsaw_assignment_head": task_step_fn({"head": "assignment"}),
        "jigsaw_old_head": task_step_fn({"head": "concat", "hidden_dim": 512, "concat_dim": 1024}),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn, _ in cases.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleaved, so that load changes hit every case alike
        for name, (fn, _) in cases.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    base = times["bare_mean_linear"]
    out = {}
    for name, (_, params) in cases.items():
        ratios = [a / b for a, b in zip(times[name], base, strict=True)]
        out[name] = {
            "median_s": round(statistics.median(times[name]), 4),
            "ratio_to_bare_mean_linear": round(statistics.median(ratios), 3),
            "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "head_params": params,
        }
        print(json.dumps({name: out[name]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["defaults"], choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-permutations", type=int, default=1000)
    parser.add_argument("--synthetic", action="store_true", help="synthetic cervix images")
    parser.add_argument("--position", action="store_true", help="add the position diagnostic")
    parser.add_argument("--timing", action="store_true", help="step time against a bare model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=BATCH, help="puzzles per step")
    parser.add_argument("--log-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--photos", default=None, help="a .npz cache of the photographs")
    parser.add_argument(
        "--held-out",
        default="photographs",
        choices=["photographs", "regions"],
        help="score on photographs never trained on, or on the unseen right half of each",
    )
    parser.add_argument(
        "--head",
        default=None,
        choices=["relation", "assignment", "concat"],
        help="the jigsaw head of every variant (default: the variant's own, else the "
        "library's); the tables measured before the relation head ran with 'assignment'",
    )
    parser.add_argument(
        "--engine",
        type=int,
        default=0,
        metavar="CROPS",
        help="run `patchssl pretrain` itself (its defaults) on CROPS saved training crops for "
        "--steps steps, and score its last checkpoint (instead of the variants)",
    )
    parser.add_argument("--workdir", default="/tmp/jigsaw-liftoff-engine", help="for --engine")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of --engine and of every variant that names none (default: the "
        "library's pretraining rate, 3e-3; 1e-3 before 2026-11-28: --lr 1e-3 repeats the "
        "tables of that time)",
    )
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument(
        "--position-only", action="store_true", help="position diagnostic of a random encoder"
    )
    parser.add_argument("--out", default="/tmp/jigsaw-liftoff.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.list:
        for name, spec in VARIANTS.items():
            print(name, spec)
        return
    print(describe_machine(), flush=True)
    results: dict[str, Any] = {"args": vars(args), "machine": describe_machine()}
    if args.timing:
        results["timing"] = timing()
    else:
        data = (
            Synthetic(device=args.device)
            if args.synthetic
            else Photographs(device=args.device, cache=args.photos, held_out=args.held_out)
        )
        if args.engine:
            results["engine"] = engine_run(
                data, args.steps, args.seed, args.engine, args.workdir, lr=args.lr
            )
            Path(args.out).write_text(json.dumps(results, indent=1))
            print(f"wrote {args.out}")
            return
        if args.position or args.position_only:
            random_task = build(
                args.variants[0], args.num_permutations, args.seed, args.device, args.head
            )
            results["position_random"] = position_report(random_task, data, "random")
        for variant in [] if args.position_only else args.variants:
            print(f"== {variant}", flush=True)
            task = build(variant, args.num_permutations, args.seed, args.device, args.head)
            log = train(
                task, data, variant, args.steps, args.seed, args.batch, args.log_every, args.lr
            )
            entry: dict[str, Any] = {
                "log": log,
                "seen_acc": puzzle_accuracy(task, data.seen),
                "held_out_hits_by_photograph": hits_by_photograph(
                    puzzle_hits(task, data.held_out), data
                ),
            }
            print(json.dumps({"variant": variant, **entry, "log": None}), flush=True)
            if args.position:
                entry["position"] = position_report(task, data, variant)
            results[variant] = entry
            Path(args.out).write_text(json.dumps(results, indent=1))  # as it goes
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
