"""Tiny datasets and configurations for smoke tests of the engine (seconds on a CPU).

Example::

    from patchssl.engine import pretrain
    from patchssl.engine.testing import make_tiny_dataset, tiny_config

    data = make_tiny_dataset("tmp/data")
    result = pretrain(tiny_config(data, "tmp/run"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchssl.data import make_synthetic_cervix
from patchssl.engine.config import Config

__all__ = ["TINY_CLI_ARGS", "make_tiny_dataset", "tiny_config"]

#: Command-line options that make ``patchssl pretrain``/``finetune`` train in seconds on a CPU:
#: timm's ``test_resnet`` on 3x3 patches of 32 px in 96 px images, batches of 8, no loader
#: workers, no progress bars or TensorBoard.
TINY_CLI_ARGS: list[str] = [
    "--backbone", "test_resnet", "--image-size", "96", "--patch-size", "32",
    "--batch-size", "8", "--workers", "0", "--no-progress",
    "--set", "train.tensorboard=false",
]  # fmt: skip


def make_tiny_dataset(
    root: str | Path,
    *,
    num_unlabeled: int = 24,
    num_patients: int = 16,
    images_per_patient: int = 2,
    image_size: int = 96,
    seed: int = 0,
) -> Any:
    """Write a small synthetic cervix-like dataset (:func:`patchssl.data.make_synthetic_cervix`).

    Args:
        root: Output folder.
        num_unlabeled: Unlabeled images.
        num_patients: Labeled patients.
        images_per_patient: Images per patient.
        image_size: Image side in pixels.
        seed: Seed.

    Returns:
        The :class:`patchssl.data.SyntheticDataset`.
    """
    return make_synthetic_cervix(
        root,
        num_unlabeled=num_unlabeled,
        num_patients=num_patients,
        images_per_patient=images_per_patient,
        image_size=image_size,
        positive_fraction=0.4,
        seed=seed,
        progress=False,
    )


def tiny_config(
    data: Any,
    out: str | Path,
    *,
    backbone: str = "test_resnet",
    image_size: int = 96,
    patch_size: int = 32,
    epochs: int = 2,
) -> Config:
    """A configuration that trains in seconds on :func:`make_tiny_dataset` data.

    Args:
        data: The dataset from :func:`make_tiny_dataset` (or anything with ``unlabeled_dir``
            and ``manifest``).
        out: Output folder.
        backbone: timm backbone (``test_resnet`` is a 0.4 M-parameter ResNet).
        image_size: Image side in pixels (must match the data).
        patch_size: Patch side in pixels (a 3x3 grid must fit).
        epochs: Epochs of every training run.

    Returns:
        The configuration.
    """
    config = Config()
    config.out = str(out)
    config.data.unlabeled = str(data.unlabeled_dir)
    config.data.manifest = str(data.manifest)
    config.data.image_size = image_size
    config.data.workers = 0
    config.data.test_size = 0.25
    config.data.val_size = 0.3
    config.model.backbone = backbone
    config.model.patch_size = patch_size
    config.pretext.options = {"num_permutations": 8}
    config.train.epochs = epochs
    config.train.batch_size = 8
    config.train.warmup_epochs = 0.5
    config.train.patience = 0
    config.train.progress = False
    config.train.tensorboard = "false"
    config.eval.n_boot = 50
    config.explain.num_images = 2
    return config
