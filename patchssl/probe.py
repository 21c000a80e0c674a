"""Frozen-feature probes: did pretraining make the encoder's features more useful?

A probe freezes the patch encoder, embeds every labeled image once (eval-mode tiling, no
jitter, the input normalisation the encoder was trained with) and fits two cheap classifiers
on the frozen features, on a patient-grouped train/test split:

* a **linear probe**: logistic regression on standardised features (Alain & Bengio 2016;
  the standard evaluation of self-supervised features, Kolesnikov et al. 2019);
* a **kNN probe**: the ``k = 20`` nearest training images by cosine similarity, each voting
  for its class with weight ``exp(similarity / T)``, ``T = 0.07`` (Wu et al. 2018; the
  monitor of DINO, Caron et al. 2021). The score of an image is the positive class's share
  of the vote.

Each runs on three poolings of the per-patch features ``(M, N, D)``
(:func:`pool_patch_features`): the mean over patches ``(M, D)``, the maximum over patches
``(M, D)`` (per feature: what the strongest patch shows, as in multiple-instance learning,
Ilse et al. 2018; a lesion on one of nine patches is diluted ninefold by the mean) and the
concatenation ``(M, N * D)`` (which keeps where each patch was, as the paper's classifier
does). AUC and accuracy on the test images get 95% bootstrap intervals that resample
patients (:func:`patchssl.metrics.bootstrap_ci`).

The same probe on a randomly initialised encoder of the same geometry is the baseline: the
gain of pretraining is the difference between the two, on the same test images
(:func:`compare_probes`). A further diagnostic, :func:`position_probe`, asks how well a
patch's grid position can be read from its frozen features alone (an ``N``-way logistic
regression; chance ``1/N``): when even a random encoder reads it far above chance, the jigsaw
puzzle can be solved from layout cues (vignetting, the lens edge) rather than from content.

This module uses the building blocks (encoder, tiler, metrics, splits) only; the command
``patchssl probe`` and the probe during ``patchssl pretrain`` are in :mod:`patchssl.engine`.

References:
    Alain & Bengio, "Understanding intermediate layers using linear classifier probes",
    arXiv:1610.01644, 2016. Kolesnikov, Zhai & Beyer, "Revisiting Self-Supervised Visual
    Representation Learning", CVPR 2019 (arXiv:1901.09005). Wu, Xiong, Yu & Lin,
    "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018
    (arXiv:1805.01978). Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
    Learning", ICML 2018 (arXiv:1802.04712). Caron et al., "Emerging Properties in
    Self-Supervised Vision Transformers", ICCV 2021 (arXiv:2104.14294). Noroozi & Favaro,
    "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles", ECCV 2016
    (arXiv:1603.09246).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from patchssl._validation import check_int, look_up
from patchssl.checkpoint import CheckpointError, load_checkpoint
from patchssl.classifier import INPUT_NORMS, PatchClassifier, checkpoint_input_norm
from patchssl.data import grouped_stratified_split, make_loader
from patchssl.metrics import PairedDifference, binary_metrics, bootstrap_ci, paired_difference
from patchssl.pretext.base import standardize_patches

__all__ = [
    "PatchEmbeddings",
    "ProbeResult",
    "compare_probes",
    "embed_images",
    "encoder_from_checkpoint",
    "knn_predict_proba",
    "pool_patch_features",
    "position_probe",
    "probe_encoder",
    "probe_features",
]

METHODS: tuple[str, ...] = ("linear", "knn")
POOLINGS: tuple[str, ...] = ("mean", "max", "concat")


def pool_patch_features(features: np.ndarray, pooling: str) -> np.ndarray:
    """Pool each image's patch features into one vector for a probe.

    Args:
        features: Array of shape ``(M, N, D)``: ``N`` patch features per image.
        pooling: ``"mean"`` (over the patches), ``"max"`` (per feature, over the patches)
            or ``"concat"`` (in grid order).

    Returns:
        Array of shape ``(M, D)`` for ``"mean"`` and ``"max"``, ``(M, N * D)`` for
        ``"concat"``.

    Raises:
        ValueError: For another ``pooling`` or features that are not 3-D.

    Example:
        >>> pool_patch_features(np.arange(12.0).reshape(1, 3, 4), "max").tolist()
        [[8.0, 9.0, 10.0, 11.0]]
    """
    feats = np.asarray(features)
    if feats.ndim != 3:
        raise ValueError(f"features must have shape (M, N, D); got {feats.shape}")
    if pooling == "mean":
        return feats.mean(axis=1)
    if pooling == "max":
        return feats.max(axis=1)
    if pooling == "concat":
        return feats.reshape(feats.shape[0], -1)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")


# --------------------------------------------------------------------------------------------
# The encoder and how it was fed
# --------------------------------------------------------------------------------------------
def encoder_from_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
) -> tuple[nn.Module, nn.Module, str]:
    """Rebuild the patch encoder, the tiler and the input normalisation of a checkpoint.

    A pretraining checkpoint (``patchssl pretrain``) gives its pretext task's encoder; a
    fine-tuned one (``patchssl finetune``) its classifier's. The weights are loaded strictly
    (:meth:`patchssl.classifier.PatchClassifier.from_pretrained` /
    :meth:`~patchssl.classifier.PatchClassifier.from_checkpoint`).

    Args:
        checkpoint: The file, or its loaded dictionary.

    Returns:
        ``(encoder, tiler, input_norm)``: a :class:`patchssl.encoder.SharedPatchEncoder` and a
        :class:`patchssl.tiling.PatchTiler` (both in eval mode, on the CPU) and ``"per_patch"``
        or ``"encoder"``.

    Raises:
        CheckpointError: A file that is not a patchssl checkpoint, or weights that do not fit.
        FileNotFoundError: The file does not exist.
    """
    payload = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    kind = payload.get("kind")
    if kind == "pretrain":
        model = PatchClassifier.from_pretrained(payload, attention=None)
    elif kind == "finetune":
        model = PatchClassifier.from_checkpoint(payload)
    else:
        raise CheckpointError(
            f"{checkpoint if not isinstance(checkpoint, Mapping) else 'the checkpoint'} has kind "
            f"{kind!r}; the probe needs a pretraining or fine-tuning checkpoint of patchssl"
        )
    if model.tiler is None:  # pragma: no cover - patchssl checkpoints always record a tiler
        raise CheckpointError("the checkpoint records no tiling geometry (model_config.tiler)")
    # from_pretrained reads the checkpoint's input_norm (model_config["input_norm"], or the
    # pretext's per_patch_norm in older checkpoints); a fine-tuned classifier records its own
    return model.encoder.eval(), model.tiler.eval(), model.input_norm


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------
@dataclass
class PatchEmbeddings:
    """Frozen per-patch features of a set of images.

    Attributes:
        features: Float32 array of shape (M, N, D): ``M`` readable images, ``N`` patches each,
            ``D`` features per patch.
        labels: Labels of shape (M,) (``-1`` where unknown).
        groups: Patient id of each image (M,) (the image's own index where unknown).
        indices: Index of each image in the input (M,) (unreadable images leave gaps).
        paths: Image paths (M,) (empty strings where unknown).
        failed: ``(path, reason)`` of images that could not be read (not in the arrays).
    """

    features: np.ndarray
    labels: np.ndarray
    groups: list[Hashable]
    indices: np.ndarray
    paths: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _batches(
    images: Any, labels: Any, groups: Any, batch_size: int
) -> tuple[Iterable[dict[str, Any]], int | None]:
    """Turn a tensor, a dataset or an iterable of batches into batches of dicts."""
    if torch.is_tensor(images):
        if images.ndim != 4:
            raise ValueError(
                f"images must have shape (M, C, H, W); got {tuple(images.shape)}. Add a batch "
                "dimension with images.unsqueeze(0) for a single image."
            )
        m = int(images.shape[0])
        y = None if labels is None else np.asarray(labels).reshape(-1)
        g = None if groups is None else list(groups)
        for name, values in (("labels", y), ("groups", g)):
            if values is not None and len(values) != m:
                raise ValueError(f"{name} has {len(values)} entries but there are {m} images")

        def gen() -> Iterable[dict[str, Any]]:
            for lo in range(0, m, batch_size):
                hi = min(m, lo + batch_size)
                batch: dict[str, Any] = {"image": images[lo:hi], "index": torch.arange(lo, hi)}
                if y is not None:
                    batch["label"] = torch.as_tensor(y[lo:hi])
                if g is not None:
                    batch["patient"] = g[lo:hi]
                yield batch

        return gen(), math.ceil(m / batch_size)
    if labels is not None or groups is not None:
        raise ValueError(
            "labels and groups are read from the dataset's items ('label', 'patient'); pass them "
            "only with a tensor of images"
        )
    if isinstance(images, torch.utils.data.Dataset) and hasattr(images, "__len__"):
        loader = make_loader(images, batch_size)
        return loader, len(loader)
    return images, (len(images) if hasattr(images, "__len__") else None)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def embed_images(
    encoder: nn.Module,
    images: Tensor | torch.utils.data.Dataset | Iterable[dict[str, Any]],
    *,
    tiler: nn.Module,
    input_norm: str = "encoder",
    labels: Sequence[int] | np.ndarray | None = None,
    groups: Sequence[Hashable] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> PatchEmbeddings:
    """Embed images with a frozen encoder: eval-mode tiling, no jitter, no gradients.

    The encoder and tiler are put in eval mode for the pass and given back in the mode they
    were in (so this can run in the middle of training).

    Args:
        encoder: A :class:`patchssl.encoder.SharedPatchEncoder` (or any module mapping
            ``(B, N, C, h, w)`` to ``(B, N, D)``; with ``input_norm="per_patch"`` it must
            accept ``normalized=True``).
        images: uint8 images of shape (M, C, H, W); or a dataset whose items are dicts with
            ``"image"`` (and ``"label"``, ``"patient"``), e.g.
            :class:`patchssl.data.ManifestDataset`; or an iterable of such collated batches
            (a loader from :func:`patchssl.data.make_loader`).
        tiler: The :class:`patchssl.tiling.PatchTiler` of the encoder's training.
        input_norm: ``"per_patch"`` (each patch standardised on its own with
            :func:`patchssl.pretext.base.standardize_patches`, then
            ``encoder(patches, normalized=True)``) or ``"encoder"`` (the encoder's own
            mean/std).
        labels: Labels (M,), only with a tensor of images.
        groups: Patient ids (M,), only with a tensor of images.
        batch_size: Images per forward pass (tensor or dataset input).
        device: Where to run (default: the encoder's device).
        progress: Wraps the iterable of batches, e.g. a progress bar.

    Returns:
        The :class:`PatchEmbeddings` (features on the CPU, float32).

    Raises:
        ValueError: For an unknown ``input_norm`` or inconsistent inputs.
    """
    look_up(input_norm, INPUT_NORMS, "input_norm")
    check_int(batch_size, "batch_size")
    device = torch.device(device) if device is not None else _device_of(encoder)
    batches, _ = _batches(images, labels, groups, batch_size)
    if progress is not None:
        batches = progress(batches)
    modes = (encoder.training, tiler.training)
    encoder.eval()
    tiler.eval()
    feats: list[Tensor] = []
    ys: list[Tensor] = []
    gs: list[Hashable] = []
    idx: list[Tensor] = []
    seen = 0
    paths: list[str] = []
    failed: list[tuple[str, str]] = []
    try:
        for batch in batches:
            failed.extend(batch.get("failed") or [])
            x = batch["image"]
            if x.shape[0] == 0:
                continue
            n = int(x.shape[0])
            patches = tiler(x.to(device, non_blocking=True), jitter=False).patches
            if input_norm == "per_patch":
                floats = patches.float() / 255.0 if patches.dtype == torch.uint8 else patches
                out = encoder(standardize_patches(floats), normalized=True)
            else:
                out = encoder(patches)
            feats.append(out.float().cpu())
            label = batch.get("label")
            ys.append(
                torch.as_tensor(label).long().cpu()
                if label is not None
                else torch.full((n,), -1, dtype=torch.long)
            )
            index = batch.get("index")
            if index is None:  # number the images in the order they come
                index = torch.arange(seen, seen + n)
            index = torch.as_tensor(index).long().cpu()
            seen += n
            idx.append(index)
            patient = batch.get("patient")
            if patient is None:
                patient = [int(i) for i in torch.as_tensor(index)]
            gs.extend(patient)
            paths.extend(str(p) for p in batch.get("path", [""] * n))
    finally:
        encoder.train(modes[0])
        tiler.train(modes[1])
    if not feats:
        raise ValueError(
            "no image could be embedded"
            + (
                f" ({len(failed)} unreadable, e.g. {failed[0][0]}: {failed[0][1]})"
                if failed
                else ""
            )
        )
    return PatchEmbeddings(
        features=torch.cat(feats).numpy(),
        labels=torch.cat(ys).numpy().astype(np.int64),
        groups=gs,
        indices=torch.cat(idx).numpy(),
        paths=paths,
        failed=failed,
    )


# --------------------------------------------------------------------------------------------
# Classifiers on frozen features
# --------------------------------------------------------------------------------------------
def knn_predict_proba(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted k-nearest-neighbour class probabilities under cosine similarity.

    Each test vector finds its ``k`` most similar training vectors (cosine similarity
    ``s``); each neighbour votes for its class with weight ``exp(s / temperature)``, and the
    votes are normalised to sum to one. With ``k = 20`` and ``temperature = 0.07`` this is
    the kNN monitor of Wu et al. (2018) and DINO (Caron et al. 2021). It equals scikit-learn's
    ``KNeighborsClassifier(k, metric="cosine", weights=lambda d: np.exp(-d / temperature))``
    (the cosine distance is ``1 - s``, and the constant factor cancels).

    Args:
        train_features: Shape (M_train, F).
        train_labels: Integer classes, shape (M_train,).
        test_features: Shape (M_test, F).
        k: Neighbours (capped at ``M_train``).
        temperature: Softness of the vote (smaller: the nearest neighbours count more).
        num_classes: Number of classes ``K`` (default ``max(train_labels) + 1``).

    Returns:
        Probabilities of shape (M_test, K).

    Raises:
        ValueError: For empty inputs, mismatched widths or a non-positive ``k``/``temperature``.

    References:
        Wu et al., CVPR 2018 (arXiv:1805.01978), Sec. 3.4. Caron et al., ICCV 2021
        (arXiv:2104.14294), the 20-NN evaluation.
    """
    train = np.asarray(train_features, dtype=np.float64)
    test = np.asarray(test_features, dtype=np.float64)
    y = np.asarray(train_labels).astype(np.int64).reshape(-1)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"features must be (M_train, F) and (M_test, F); got {train.shape} and {test.shape}"
        )
    if train.shape[0] == 0 or train.shape[0] != y.shape[0]:
        raise ValueError(f"{train.shape[0]} training vectors but {y.shape[0]} labels")
    check_int(k, "k")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    classes = int(num_classes) if num_classes is not None else int(y.max()) + 1

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sim = unit(test) @ unit(train).T  # (M_test, M_train)
    k = min(k, train.shape[0])
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (M_test, k)
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
    votes = np.zeros((test.shape[0], classes))
    np.add.at(votes, (np.arange(test.shape[0])[:, None], y[nearest]), weights)
    return votes / votes.sum(axis=1, keepdims=True)


def _linear_model(max_iter: int, seed: int) -> Any:
    # deferred: scikit-learn takes about a second to import
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))


def _fit_predict(model: Any, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple:
    """Fit, predict probabilities, and say whether the solver converged."""
    from sklearn.exceptions import ConvergenceWarning  # deferred: scikit-learn is slow to import

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.predict_proba(x_test), converged


def _figure(value: float, ci: tuple[float, float] | None) -> dict[str, Any]:
    """``{"value": x, "ci": [lo, hi]}`` (``None`` for undefined numbers)."""

    def clean(x: float) -> float | None:
        return float(x) if x is not None and math.isfinite(float(x)) else None

    return {"value": clean(value), "ci": None if ci is None else [clean(ci[0]), clean(ci[1])]}


def _score_figures(
    y: np.ndarray,
    scores: np.ndarray,
    groups: Sequence[Hashable],
    n_boot: int,
    alpha: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    point = binary_metrics(y, scores, 0.5)
    ci: dict[str, tuple[float, float]] | None = None
    if n_boot > 0:
        ci = bootstrap_ci(
            y,
            scores,
            threshold=0.5,
            groups=np.asarray([str(g) for g in groups]),
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            metrics=("auc", "accuracy"),
        )
    return {
        "auc": _figure(point["auc"], ci["auc"] if ci else None),
        "accuracy": _figure(point["accuracy"], ci["accuracy"] if ci else None),
    }


def position_probe(
    features: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, Any]:
    """How well each patch's grid position can be read from its frozen features.

    An ``N``-way logistic regression (on standardised features) learns the position index of
    every patch of the training images and is scored on every patch of the test images.
    Chance is ``1/N``. A jigsaw network needs the positions of the patches; if a randomly
    initialised encoder already reads them well, the puzzle can be solved from where a
    patch was cut (lighting falloff, lens edge, a gap that is too small) instead of from what
    it shows (Noroozi & Favaro 2016, Sec. 3.2), and pretraining may learn little else.

    Args:
        features: Per-patch features of shape (M, N, D).
        train_idx: Image indices of the training images.
        test_idx: Image indices of the test images (no patient of the training images).
        groups: Patient id of each image (M,); the interval then resamples patients.
        n_boot: Bootstrap resamples for the interval (0: none).
        alpha: 1 - confidence level.
        seed: Seed of the bootstrap and the solver.
        max_iter: Iterations of the logistic regression solver.

    Returns:
        ``{"accuracy": {"value", "ci"}, "chance": 1/N, "num_positions": N, "train_patches",
        "test_patches", "converged"}``.

    References:
        Noroozi & Favaro, ECCV 2016 (arXiv:1603.09246). Doersch, Gupta & Efros, ICCV 2015
        (arXiv:1505.05192), Sec. 3.1 (trivial shortcuts of patch-position tasks).
    """
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 3:
        raise ValueError(f"features must have shape (M, N, D); got {feats.shape}")
    m, n, d = feats.shape
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    x_train = feats[train_idx].reshape(-1, d)
    y_train = np.tile(np.arange(n), len(train_idx))
    x_test = feats[test_idx].reshape(-1, d)
    y_test = np.tile(np.arange(n), len(test_idx))
    probs, converged = _fit_predict(_linear_model(max_iter, seed), x_train, y_train, x_test)
    correct = (probs.argmax(axis=1) == y_test).astype(np.float64)
    ci = None
    if n_boot > 0:
        # the accuracy of "correct" against labels that are all 1 is the share of correct
        # patches; every patch carries its image's patient, so patients are resampled
        patient = np.asarray([str(g) for g in (groups if groups is not None else range(m))])
        ci = bootstrap_ci(
            np.ones_like(correct, dtype=np.int64),
            correct,
            threshold=0.5,
            groups=np.repeat(patient[test_idx], n),
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            metrics=("accuracy",),
        )["accuracy"]
    return {
        "accuracy": _figure(float(correct.mean()), ci),
        "chance": 1.0 / n,
        "num_positions": n,
        "train_patches": int(x_train.shape[0]),
        "test_patches": int(x_test.shape[0]),
        "converged": converged,
    }


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """What a probe measured (see :func:`probe_features`).

    Attributes:
        scores: ``{(method, pooling): {"auc": {"value", "ci"}, "accuracy": {...}}}`` with
            method ``"linear"``/``"knn"`` and pooling ``"mean"``/``"max"``/``"concat"``.
        position: The :func:`position_probe` result, or ``None``.
        counts: ``images``, ``patients``, ``positives``, ``train_images``, ``test_images``,
            ``train_patients``, ``test_patients``, ``num_patches``, ``feature_dim``.
        settings: ``k``, ``temperature``, ``test_size``, ``seed``, ``n_boot``, ``ci``,
            ``threshold``, ``split`` and whatever the caller adds (``input_norm``, the
            checkpoint...).
        test_index: Indices (into the probed images) of the test images, shape (M_test,).
        test_labels: Their labels (M_test,).
        test_groups: Their patients (M_test,).
        test_scores: ``{(method, pooling): positive-class scores (M_test,)}``.
        converged: ``{(method, pooling): bool}``: whether the logistic regression converged
            (kNN entries are always ``True``).
    """

    scores: dict[tuple[str, str], dict[str, Any]]
    position: dict[str, Any] | None
    counts: dict[str, int]
    settings: dict[str, Any]
    test_index: np.ndarray
    test_labels: np.ndarray
    test_groups: list[Hashable]
    test_scores: dict[tuple[str, str], np.ndarray]
    converged: dict[tuple[str, str], bool] = field(default_factory=dict)

    def get(self, method: str, pooling: str = "mean", metric: str = "auc") -> float | None:
        """The point value of ``metric`` (``"auc"``/``"accuracy"``) for one probe."""
        return self.scores[(method, pooling)][metric]["value"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``probe.json``.

        ``linear`` and ``knn`` at the top level use mean-pooled features (``"pooling":
        "mean"``); ``max`` and ``concat`` hold the same two for max-pooled and concatenated
        features; every figure is ``{"value": x, "ci": [lo, hi]}`` (``ci`` ``null`` without
        bootstrap).
        """
        out: dict[str, Any] = {"pooling": "mean"}
        for method in METHODS:
            if (method, "mean") in self.scores:
                out[method] = self.scores[(method, "mean")]
        for pooling in POOLINGS[1:]:
            found = {m: self.scores[(m, pooling)] for m in METHODS if (m, pooling) in self.scores}
            if found:
                out[pooling] = found
        if self.position is not None:
            out["position"] = self.position
        out["counts"] = dict(self.counts)
        out["settings"] = dict(self.settings)
        out["converged"] = {f"{m}/{p}": bool(c) for (m, p), c in self.converged.items()}
        return out

    def to_markdown(self, title: str = "Frozen-feature probe") -> str:
        """A small Markdown report: one row per probe, AUC and accuracy with their intervals."""

        def cell(fig: Mapping[str, Any]) -> str:
            value = fig.get("value")
            if value is None:
                return "n/a"
            ci = fig.get("ci")
            if not ci or ci[0] is None:
                return f"{100 * value:.1f}"
            return f"{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

        c, s = self.counts, self.settings
        level = round(100 * float(s.get("ci", 0.95)))
        lines = [
            f"# {title}",
            "",
            f"{c['images']} images of {c['patients']} patients; fitted on {c['train_images']} "
            f"images ({c['train_patients']} patients), tested on {c['test_images']} images "
            f"({c['test_patients']} patients). {c['num_patches']} patches of "
            f"{c['feature_dim']} features per image.",
            "",
            "| Probe | Pooling | AUC (%) | Accuracy (%) |",
            "|:---|:---|---:|---:|",
        ]
        names = {"linear": "linear (logistic regression)", "knn": f"kNN (k={s.get('k')})"}
        for pooling in POOLINGS:
            for method in METHODS:
                if (method, pooling) in self.scores:
                    fig = self.scores[(method, pooling)]
                    lines.append(
                        f"| {names[method]} | {pooling} | {cell(fig['auc'])} | "
                        f"{cell(fig['accuracy'])} |"
                    )
        lines += [
            "",
            f"Values in percent with {level}% bootstrap intervals resampled by patient "
            f"({s.get('n_boot')} resamples); accuracy at a score of 0.5.",
        ]
        if self.position is not None:
            p = self.position
            lines += [
                "",
                f"Position diagnostic: a patch's grid position is read from its frozen features "
                f"with {cell(p['accuracy'])}% accuracy ({p['num_positions']} positions, chance "
                f"{100 * p['chance']:.1f}%).",
            ]
        return "\n".join(lines) + "\n"


def _check_binary(labels: np.ndarray) -> None:
    values = sorted({int(v) for v in np.unique(labels)})
    if not set(values) <= {0, 1} or len(values) < 2:
        raise ValueError(
            f"the probe needs binary labels with both classes (0 and 1); got {values}. Check "
            "the label map (e.g. CIN0/1 -> 0, CIN2+ -> 1) and that both classes are present."
        )


def probe_features(
    features: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[Hashable] | None = None,
    *,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    test_size: float = 0.3,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    poolings: Sequence[str] = POOLINGS,
    position: bool = True,
    k: int = 20,
    temperature: float = 0.07,
    n_boot: int = 1000,
    alpha: float = 0.05,
    max_iter: int = 1000,
) -> ProbeResult:
    """Linear and kNN probes (and the position diagnostic) on frozen per-patch features.

    The images are split by patient (:func:`patchssl.data.grouped_stratified_split`: no
    patient on both sides, classes in about the same proportion) unless ``split`` is given.
    The linear probe is ``make_pipeline(StandardScaler(), LogisticRegression())`` of
    scikit-learn; the kNN probe is :func:`knn_predict_proba`. The score of a test image is
    its probability of class 1; accuracy counts a score of at least 0.5 as positive.

    Args:
        features: Per-patch features of shape (M, N, D).
        labels: Binary labels (M,) (1 = positive).
        groups: Patient id of each image (M,); ``None`` treats every image as its own
            patient (only right when no patient has two images).
        split: ``(train_idx, test_idx)`` to use instead of drawing one.
        test_size: Share of the images (by patient) held out for testing.
        seed: Seed of the split, the bootstrap and the solvers.
        methods: Which of ``"linear"``, ``"knn"`` to run.
        poolings: Which of ``"mean"``, ``"max"`` (features (M, D)) and ``"concat"``
            (features (M, N * D)) to run (:func:`pool_patch_features`).
        position: Also run :func:`position_probe`.
        k: Neighbours of the kNN probe.
        temperature: Temperature of the kNN vote.
        n_boot: Bootstrap resamples (by patient) for the intervals; 0 skips them.
        alpha: 1 - confidence level.
        max_iter: Iterations of the logistic regression solver.

    Returns:
        The :class:`ProbeResult`.

    Raises:
        ValueError: For labels that are not binary with both classes, mismatched shapes, a
            split with a patient on both sides, or too few patients of a class to split.
    """
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 3:
        raise ValueError(f"features must have shape (M, N, D); got {feats.shape}")
    m, n, d = feats.shape
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if y.shape[0] != m:
        raise ValueError(f"{m} images but {y.shape[0]} labels")
    _check_binary(y)
    g: list[Hashable] = list(range(m)) if groups is None else list(groups)
    if len(g) != m:
        raise ValueError(f"{m} images but {len(g)} patient ids")
    for name, chosen, allowed in (("methods", methods, METHODS), ("poolings", poolings, POOLINGS)):
        unknown = [x for x in chosen if x not in allowed]
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; choose from {allowed}")
    if split is None:
        train_idx, test_idx = grouped_stratified_split(y, g, test_size=test_size, seed=seed)
        how = f"patient-grouped, stratified, test_size={test_size}, seed={seed}"
    else:
        train_idx, test_idx = (np.asarray(s, dtype=np.int64) for s in split)
        how = "given"
    shared = {g[i] for i in train_idx} & {g[i] for i in test_idx}
    if shared:
        raise ValueError(
            f"{len(shared)} patient(s) have images on both sides of the split, e.g. "
            f"{sorted(map(str, shared))[:3]}; a probe must test on unseen patients"
        )
    _check_binary(y[train_idx])
    test_groups = [g[i] for i in test_idx]
    scores: dict[tuple[str, str], dict[str, Any]] = {}
    test_scores: dict[tuple[str, str], np.ndarray] = {}
    converged: dict[tuple[str, str], bool] = {}
    for pooling in poolings:
        x = pool_patch_features(feats, pooling)
        for method in methods:
            if method == "linear":
                probs, ok = _fit_predict(
                    _linear_model(max_iter, seed), x[train_idx], y[train_idx], x[test_idx]
                )
            else:
                probs = knn_predict_proba(
                    x[train_idx], y[train_idx], x[test_idx], k=k, temperature=temperature
                )
                ok = True
            s = probs[:, 1]
            test_scores[(method, pooling)] = s
            converged[(method, pooling)] = ok
            scores[(method, pooling)] = _score_figures(
                y[test_idx], s, test_groups, n_boot, alpha, seed
            )
    pos = None
    if position:
        pos = position_probe(
            feats,
            train_idx,
            test_idx,
            groups=g,
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            max_iter=max_iter,
        )
    counts = {
        "images": m,
        "patients": len(set(g)),
        "positives": int(y.sum()),
        "train_images": len(train_idx),
        "test_images": len(test_idx),
        "train_patients": len({g[i] for i in train_idx}),
        "test_patients": len(set(test_groups)),
        "num_patches": n,
        "feature_dim": d,
    }
    settings = {
        "k": k,
        "temperature": temperature,
        "test_size": test_size if split is None else None,
        "split": how,
        "seed": seed,
        "n_boot": n_boot,
        "ci": 1.0 - alpha,
        "threshold": 0.5,
        "max_iter": max_iter,
    }
    return ProbeResult(
        scores=scores,
        position=pos,
        counts=counts,
        settings=settings,
        test_index=np.asarray(test_idx, dtype=np.int64),
        test_labels=y[test_idx],
        test_groups=test_groups,
        test_scores=test_scores,
        converged=converged,
    )


def probe_encoder(
    encoder_or_checkpoint: nn.Module | str | os.PathLike[str] | Mapping[str, Any],
    images: Tensor | torch.utils.data.Dataset | Iterable[dict[str, Any]],
    labels: Sequence[int] | np.ndarray | None = None,
    groups: Sequence[Hashable] | None = None,
    *,
    tiler: nn.Module | None = None,
    input_norm: str | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    **options: Any,
) -> ProbeResult:
    """Embed labeled images with a frozen encoder and probe the features.

    Example::

        from patchssl.probe import probe_encoder
        pretrained = probe_encoder("runs/ssl/best.pt", dataset)   # a ManifestDataset
        print(pretrained.get("knn"), pretrained.get("linear"))

    Args:
        encoder_or_checkpoint: A checkpoint (path or loaded dict; the encoder, tiler and
            input normalisation come from it, see :func:`encoder_from_checkpoint`), a
            pretext task (:class:`patchssl.pretext.PretextTask`: its encoder, tiler and
            normalisation), or a patch encoder (then give ``tiler``).
        images: uint8 images (M, C, H, W) with ``labels`` and ``groups``, or a dataset /
            iterable of batches whose items carry ``"label"`` and ``"patient"``.
        labels: Labels (M,), with a tensor of images.
        groups: Patient ids (M,), with a tensor of images.
        tiler: The tiler (required for a bare encoder; overrides the checkpoint's otherwise).
        input_norm: ``"per_patch"`` or ``"encoder"`` (default: what the checkpoint or task
            records; ``"encoder"`` for a bare encoder).
        batch_size: Images per forward pass.
        device: Where to embed (default: the encoder's device).
        progress: Wraps the batches, e.g. a progress bar.
        **options: Keyword arguments of :func:`probe_features` (``test_size``, ``seed``,
            ``k``, ``n_boot``...).

    Returns:
        The :class:`ProbeResult`; ``settings["input_norm"]`` records the normalisation and
        ``counts["unreadable"]`` the images that could not be read.
    """
    if isinstance(encoder_or_checkpoint, (str, os.PathLike, Mapping)):
        encoder, ckpt_tiler, ckpt_norm = encoder_from_checkpoint(encoder_or_checkpoint)
        if device is not None:
            encoder = encoder.to(device)
    elif isinstance(encoder_or_checkpoint, nn.Module):
        module = encoder_or_checkpoint
        if hasattr(module, "encoder") and hasattr(module, "model_config"):  # a pretext task
            encoder, ckpt_tiler = module.encoder, module.tiler
            ckpt_norm = checkpoint_input_norm(module.model_config)
        else:
            encoder, ckpt_tiler, ckpt_norm = module, None, "encoder"
    else:
        raise TypeError(
            "encoder_or_checkpoint must be a checkpoint path or dict, a pretext task or a patch "
            f"encoder; got {type(encoder_or_checkpoint).__name__}"
        )
    tiler = tiler if tiler is not None else ckpt_tiler
    if tiler is None:
        raise ValueError(
            "a bare encoder needs its tiler: probe_encoder(encoder, images, tiler=PatchTiler(...))"
        )
    norm = input_norm or ckpt_norm
    emb = embed_images(
        encoder,
        images,
        tiler=tiler,
        input_norm=norm,
        labels=labels,
        groups=groups,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    result = probe_features(emb.features, emb.labels, emb.groups, **options)
    result.settings["input_norm"] = norm
    result.counts["unreadable"] = len(emb.failed)
    return result


def compare_probes(
    a: ProbeResult,
    b: ProbeResult,
    *,
    method: str = "knn",
    pooling: str = "mean",
    metric: str = "auc",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedDifference:
    """Probe ``a`` minus probe ``b`` on the same test images, resampling patients jointly.

    Both probes must have tested the same images (same data, split and seed: e.g. a
    pretrained and a random encoder probed with the same settings). The difference, its
    interval and its verdict are those of :func:`patchssl.metrics.paired_difference` on the
    two probes' test scores (threshold 0.5 for accuracy, as in the probe itself).

    Args:
        a: The probe of one encoder (e.g. the pretrained one).
        b: The probe of the other (e.g. a random initialisation of the same geometry).
        method: ``"linear"`` or ``"knn"``.
        pooling: ``"mean"``, ``"max"`` or ``"concat"``.
        metric: ``"auc"`` or ``"accuracy"``.
        n_boot: Bootstrap resamples.
        alpha: 1 - confidence level.
        seed: Bootstrap seed.

    Returns:
        A :class:`patchssl.metrics.PairedDifference` (``value``, ``ci``, ``verdict``).

    Raises:
        ValueError: When the two probes did not test the same images.
    """
    if not np.array_equal(a.test_index, b.test_index) or not np.array_equal(
        a.test_labels, b.test_labels
    ):
        raise ValueError(
            "the two probes tested different images; probe both encoders on the same data with "
            "the same split settings (test_size, seed)"
        )
    key = (method, pooling)
    thresholds = {"threshold_a": 0.5, "threshold_b": 0.5} if metric != "auc" else {}
    return paired_difference(
        a.test_labels,
        a.test_scores[key],
        b.test_scores[key],
        groups=np.asarray([str(g) for g in a.test_groups]),
        metric=metric,
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
        **thresholds,
    )
