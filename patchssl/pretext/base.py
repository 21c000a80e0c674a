"""The pretext-task contract: what every self-supervised task shares, checked in one place.

A pretext task turns a batch of unlabeled images into inputs and targets it can make up
itself (which permutation shuffled the tiles, which way the image was turned, where one
patch sits relative to another), and learns to predict them. :class:`PretextTask` owns
everything tasks have in common, in the manner of a base loss that validates and a subclass
that computes:

* ``forward`` validates the images once (shape, dtype, channels, size, device), then calls
  the subclass's :meth:`~PretextTask.make_inputs`, :meth:`~PretextTask.compute_logits` and
  :meth:`~PretextTask.compute_loss`, and checks what they return;
* the ``encoder`` (attribute name fixed, so that checkpoints hold ``encoder.*`` keys that a
  classifier can load) and the ``tiler``;
* the ``config`` needed to rebuild the task, ``predict`` and ``accuracy`` helpers.

The shared shortcut defences (normalising each patch on its own, colour dropping, and the
image-level crops, flips and turns) live in :mod:`patchssl.pretext.defences` as
:class:`PatchDefences` and :class:`ImageDefences`, so that every task can use them; both are
also importable from here.

References:
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016, arXiv:1603.09246.
    Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
    Prediction", ICCV 2015, arXiv:1505.05192.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchssl._validation import as_pair
from patchssl.pretext._random import random_integers, random_uniform

# The defences live in patchssl.pretext.defences; these names stay importable from here.
from patchssl.pretext.defences import COLOR_DROP_MODES as COLOR_DROP_MODES
from patchssl.pretext.defences import ImageDefences as ImageDefences
from patchssl.pretext.defences import PatchDefences as PatchDefences
from patchssl.pretext.defences import channel_jitter as channel_jitter
from patchssl.pretext.defences import random_grayscale as random_grayscale
from patchssl.pretext.defences import standardize_patches as standardize_patches
from patchssl.tiling import PatchTiler, default_tiler

__all__ = [
    "COLOR_DROP_MODES",
    "PatchDefences",
    "PretextOutput",
    "PretextTask",
    "default_tiler",
    "random_integers",
    "random_uniform",
]


class PretextOutput(NamedTuple):
    """What a pretext task returns for one batch.

    Attributes:
        loss: Scalar tensor (differentiable in training).
        logits: Tensor of shape ``(B, num_classes)`` (or ``(B, ..., num_classes)`` for tasks
            with several predictions per image).
        targets: Long tensor of shape ``(B,)`` (or ``(B, ...)``, matching ``logits``) with
            values in ``[0, num_classes)``.
    """

    loss: Tensor
    logits: Tensor
    targets: Tensor


# --------------------------------------------------------------------------------------------
# The contract.
# --------------------------------------------------------------------------------------------
class PretextTask(nn.Module):
    """Base class of every pretext task: the base checks, the subclass computes.

    A subclass implements three methods and one property:

    * :meth:`make_inputs` ``(images, generator) -> (inputs, targets)``: tile, transform and
      label a batch (random choices from ``generator``, batched, on the images' device);
    * :meth:`compute_logits` ``(inputs) -> logits``: encoder and head;
    * :meth:`compute_loss` ``(logits, targets) -> loss`` (optional; the default is
      cross-entropy with :attr:`label_smoothing`);
    * :attr:`config`: the JSON-able keyword arguments that rebuild the task given the same
      encoder and tiler (``type(task)(encoder, tiler=tiler, **task.config)``); extend
      ``super().config``.

    and sets :attr:`num_classes` in ``__init__``. It may also override :meth:`example_kwargs`
    (small settings for the contract test, :func:`patchssl.pretext.testing.check_pretext_contract`)
    and :attr:`permutation_fingerprint`.

    The base owns ``encoder`` (a :class:`patchssl.encoder.SharedPatchEncoder` or anything
    with ``in_chans`` and ``forward((B, N, C, h, w)) -> (B, N, D)``; the attribute name is
    fixed so that checkpoints hold ``encoder.*`` keys) and ``tiler`` (a
    :class:`patchssl.tiling.PatchTiler`, which follows the task's ``train()``/``eval()``: jitter
    in training, centred patches in eval). :meth:`forward` checks the images (4-D
    ``(B, C, H, W)``, uint8 or floating, ``C == encoder.in_chans``, ``(H, W) ==
    tiler.image_size``, on the parameters' device) and what the subclass returns (integer
    targets with a batch dimension ``B``, logits of shape ``(*targets.shape, num_classes)``,
    a scalar loss).

    Args:
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        tiler: The patch tiler. Subclasses build a default (:func:`default_tiler`) when None.
        label_smoothing: Label smoothing of the default cross-entropy loss, in ``[0, 1)``.

    Attributes:
        name: Registry name, set by :func:`patchssl.pretext.register_pretext`.
        num_classes: Number of classes the task predicts (set by the subclass).
    """

    name: ClassVar[str] = ""
    num_classes: int

    def __init__(
        self,
        encoder: nn.Module,
        *,
        tiler: PatchTiler | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder must be an nn.Module (e.g. patchssl.SharedPatchEncoder); "
                f"got {type(encoder).__name__}"
            )
        if not hasattr(encoder, "in_chans"):
            raise TypeError(
                f"encoder {type(encoder).__name__} has no 'in_chans' attribute; wrap the "
                "backbone in patchssl.SharedPatchEncoder(backbone, in_chans=...)"
            )
        if tiler is None:
            patch_size = getattr(encoder, "patch_size", None)
            if patch_size is None:
                raise ValueError(
                    f"tiler=None needs the encoder's patch size, but "
                    f"{type(encoder).__name__} has no 'patch_size'; pass "
                    "tiler=PatchTiler(grid=..., patch_size=..., image_size=...)"
                )
            tiler = default_tiler(patch_size)
        enc_patch = getattr(encoder, "patch_size", None)
        if enc_patch is not None and as_pair(enc_patch, "patch_size") != tuple(tiler.patch_size):
            eh, ew = as_pair(enc_patch, "patch_size")
            th, tw = tiler.patch_size
            raise ValueError(
                f"the tiler cuts {th}x{tw} patches but the encoder was built for {eh}x{ew}; "
                f"build the encoder with patch_size=({th}, {tw}) or the tiler with "
                f"patch_size=({eh}, {ew})"
            )
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        self.encoder = encoder
        self.tiler = tiler
        self.label_smoothing = float(label_smoothing)

    # ---- hooks a subclass writes ------------------------------------------------------------
    def make_inputs(self, images: Tensor, generator: torch.Generator | None) -> tuple[Any, Tensor]:
        """Turn a validated batch into the task's inputs and targets.

        Args:
            images: Tensor of shape ``(B, C, H, W)``, uint8 or float, on the task's device.
            generator: Source of every random choice (None: torch's global generator).

        Returns:
            ``(inputs, targets)``: whatever :meth:`compute_logits` takes, and a long tensor of
            shape ``(B,)`` (or ``(B, ...)``) on the images' device.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_inputs()")

    def compute_logits(self, inputs: Any) -> Tensor:
        """Encode the inputs and apply the head.

        Args:
            inputs: What :meth:`make_inputs` returned.

        Returns:
            Tensor of shape ``(B, num_classes)`` (or ``(*targets.shape, num_classes)``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_logits()")

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy (with :attr:`label_smoothing`), averaged over every prediction.

        Args:
            logits: Tensor of shape ``(B, ..., num_classes)``.
            targets: Long tensor of shape ``(B, ...)``.

        Returns:
            Scalar tensor.
        """
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            label_smoothing=self.label_smoothing,
        )

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild the task given the same encoder and tiler.

        ``type(task)(encoder, tiler=tiler, **task.config)`` builds an equivalent task, so the
        dict holds exactly the task's own constructor arguments (every one a subclass's
        ``__init__`` accepts and that differs from instance to instance). The base
        contributes nothing: a task that exposes ``label_smoothing`` adds it itself.
        """
        return {}

    @classmethod
    def default_defences(cls) -> PatchDefences:
        """The patch defences the task uses when built with ``defences=None``.

        The base returns :class:`PatchDefences` with every option off; a task with other
        defaults (jigsaw: per-patch normalisation and grayscale colour dropping) overrides it.
        """
        return PatchDefences()

    @classmethod
    def build_defences(cls, defences: PatchDefences | Mapping[str, Any] | None) -> PatchDefences:
        """The :class:`PatchDefences` a task's ``defences`` argument stands for.

        Args:
            defences: ``None`` (the task's :meth:`default_defences`), a
                :class:`PatchDefences` (used as is), or a mapping of some of its options (the
                :attr:`PatchDefences.config` form, as ``task.config`` saves it), which replace
                those of :meth:`default_defences`.

        Returns:
            A :class:`PatchDefences`.

        Raises:
            TypeError: Anything else.
            ValueError: An unknown option or an invalid value in a mapping.
        """
        if defences is None:
            return cls.default_defences()
        if isinstance(defences, PatchDefences):
            return defences
        if isinstance(defences, Mapping):
            return cls.default_defences().updated(defences)
        raise TypeError(
            "defences must be a PatchDefences, a mapping of its options or None; got "
            f"{type(defences).__name__}"
        )

    @classmethod
    def fold_defence_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Turn the flat defence options of configs and old checkpoints into ``defences``.

        ``pretext.options`` and checkpoints written before tasks took a ``defences`` argument
        hold :attr:`PatchDefences.KEYS` (``per_patch_norm``, ``color_drop``, ...) as flat
        keyword arguments. This folds them, and a nested ``defences`` mapping, into one
        ``defences=PatchDefences(...)`` that starts from the task's
        :meth:`default_defences`, so that a config naming one option keeps the task's
        defaults for the others.

        Args:
            options: Keyword arguments for the task's constructor.

        Returns:
            A new dict: the other options unchanged, plus ``defences`` when any defence
            option was given.

        Raises:
            ValueError: An unknown key in a nested ``defences`` mapping, an invalid value,
                or a :class:`PatchDefences` instance together with flat keys.
        """
        out = dict(options)
        flat = {key: out.pop(key) for key in PatchDefences.KEYS if key in out}
        if not flat:
            return out
        nested = out.get("defences")
        if isinstance(nested, PatchDefences):
            raise ValueError(
                f"give the defence options {sorted(flat)} either flat or in 'defences', not both"
            )
        if nested is not None and not isinstance(nested, Mapping):
            raise ValueError(
                f"defences must be a mapping of {list(PatchDefences.KEYS)}; got {nested!r}"
            )
        out["defences"] = cls.build_defences({**(nested or {}), **flat})
        return out

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """Small constructor settings for the contract test (override in subclasses).

        :func:`patchssl.pretext.testing.check_pretext_contract` builds the task with these
        keyword arguments around a tiny encoder (a few thousand parameters, 16-32 px patches),
        so they should keep heads small and avoid anything slow.
        """
        return {}

    # ---- what the base owns -----------------------------------------------------------------
    @property
    def permutation_fingerprint(self) -> str | None:
        """Content hash of the task's permutation set (None for tasks without one)."""
        return None

    @property
    def model_config(self) -> dict[str, Any]:
        """The checkpoint's ``model_config`` layout: pretext name and kwargs, encoder and tiler.

        Returns:
            ``{"pretext": name, "pretext_kwargs": config, "encoder": encoder.config or None,
            "tiler": tiler.config, "input_norm": "per_patch" or "encoder"}``; rebuild with
            :func:`patchssl.pretext.pretext_from_config`. ``input_norm`` says how the encoder's
            inputs were normalised (each patch standardised on its own, or the encoder's mean
            and std), so that a classifier built from the checkpoint feeds the encoder the
            same kind of input.
        """
        defences = getattr(self, "defences", None)
        per_patch = defences is not None and defences.normalizes
        return {
            "pretext": self.name,
            "pretext_kwargs": self.config,
            "encoder": getattr(self.encoder, "config", None),
            "tiler": self.tiler.config,
            "input_norm": "per_patch" if per_patch else "encoder",
        }

    def _encode(self, patches: Tensor) -> Tensor:
        """Encode patches, telling the encoder to skip its normalisation if the defences did it.

        A task that sets ``self.defences`` (a :class:`PatchDefences`) with per-patch
        normalisation gets ``encoder(patches, normalized=True)``; otherwise the encoder is
        called plainly, so any module with ``forward((B, N, C, h, w))`` works.

        Args:
            patches: Float tensor of shape ``(B, N, C, h, w)``.

        Returns:
            Tensor of shape ``(B, N, D)``.
        """
        defences = getattr(self, "defences", None)
        if defences is not None and defences.normalizes:
            return self.encoder(patches, normalized=True)
        return self.encoder(patches)

    def _param_device(self) -> torch.device | None:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return None

    def validate_images(self, images: Tensor) -> None:
        """Check a batch of images against the encoder, the tiler and the task's device.

        Args:
            images: Tensor of shape ``(B, C, H, W)``, uint8 (0..255) or float (0..1).

        Raises:
            TypeError: Not a tensor, or a dtype other than uint8 or floating.
            ValueError: Wrong number of dimensions, channels or size, or an empty batch.
            RuntimeError: Images on another device than the task.
        """
        task = type(self).__name__
        if not isinstance(images, Tensor):
            raise TypeError(f"{task} expects a torch.Tensor of images; got {type(images).__name__}")
        if images.ndim != 4:
            hint = " (add a batch dimension: images.unsqueeze(0))" if images.ndim == 3 else ""
            raise ValueError(
                f"{task} expects images of shape (B, C, H, W); got {images.ndim}-D shape "
                f"{tuple(images.shape)}{hint}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(
                f"{task} expects uint8 (0..255) or floating (0..1) images; got {images.dtype} "
                "(convert with images.to(torch.uint8) or images.float() / 255)"
            )
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError(f"{task} got an empty batch (B = 0)")
        in_chans = int(self.encoder.in_chans)
        if c != in_chans:
            hint = (
                " (channels-last input? use images.permute(0, 3, 1, 2))"
                if images.shape[-1] == in_chans
                else ""
            )
            raise ValueError(
                f"{task}: the encoder takes {in_chans} channel(s) but the images have {c} "
                f"(shape {tuple(images.shape)}){hint}; convert the images or build the encoder "
                f"with in_chans={c}"
            )
        expected = as_pair(self.tiler.image_size, "image_size")
        if (h, w) != expected:
            raise ValueError(
                f"{task}: the tiler expects {expected[0]}x{expected[1]} (H x W) images; got "
                f"{h}x{w}. Resize the images (e.g. patchssl.data load_image(path, image_size=...)) "
                f"or build the tiler with image_size=({h}, {w})"
            )
        device = self._param_device()
        if device is not None and images.device != device:
            raise RuntimeError(
                f"{task}: the images are on {images.device} but the task is on {device}; "
                f"move one of them (images.to({str(device)!r}) or task.to({str(images.device)!r}))"
            )

    def _check_targets(self, batch: int, targets: Tensor) -> None:
        task = type(self).__name__
        if not isinstance(targets, Tensor) or targets.dtype != torch.long:
            got = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
            raise TypeError(f"{task}.make_inputs must return long targets; got {got}")
        if targets.ndim < 1 or targets.shape[0] != batch:
            raise ValueError(
                f"{task}.make_inputs must return targets of shape (B, ...) with B = {batch}; "
                f"got {tuple(targets.shape)}"
            )

    def _check_logits(self, logits: Tensor, targets: Tensor) -> None:
        expected = (*targets.shape, int(self.num_classes))
        if not isinstance(logits, Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"{type(self).__name__}.compute_logits must return logits of shape {expected} "
                f"(targets shape + num_classes); got {got}"
            )

    def _check_loss(self, loss: Tensor) -> None:
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"{type(self).__name__}.compute_loss must return a scalar tensor; got {got}"
            )

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> PretextOutput:
        """Validate, make inputs and targets, predict, and score.

        Args:
            images: Tensor of shape ``(B, C, H, W)``, uint8 (0..255) or float (0..1), on the
                task's device, ``C == encoder.in_chans`` and ``(H, W) == tiler.image_size``.
            generator: Source of every random choice (tiling jitter, the task's draws). A
                seeded CPU generator repeats exactly, whatever device the task is on.

        Returns:
            :class:`PretextOutput` ``(loss, logits, targets)``: scalar loss, logits of shape
            ``(B, num_classes)``, long targets of shape ``(B,)``.
        """
        self.validate_images(images)
        inputs, targets = self.make_inputs(images, generator)
        self._check_targets(images.shape[0], targets)
        logits = self.compute_logits(inputs)
        self._check_logits(logits, targets)
        loss = self.compute_loss(logits, targets)
        self._check_loss(loss)
        return PretextOutput(loss, logits, targets)

    @torch.no_grad()
    def predict(self, images: Tensor, *, generator: torch.Generator | None = None) -> PretextOutput:
        """:meth:`forward` without gradients, in the task's current train/eval mode.

        Args:
            images: Tensor of shape ``(B, C, H, W)``.
            generator: Source of randomness.

        Returns:
            :class:`PretextOutput` (no autograd graph).
        """
        return self(images, generator=generator)

    @torch.no_grad()
    def accuracy(self, images: Tensor, *, generator: torch.Generator | None = None) -> float:
        """Fraction of predictions (argmax of the logits) equal to the targets.

        Call ``task.eval()`` first for held-out figures (centred tiles, no colour dropping).

        Args:
            images: Tensor of shape ``(B, C, H, W)``.
            generator: Source of randomness (seed it for a repeatable figure).

        Returns:
            Accuracy in ``[0, 1]``; chance is ``1 / num_classes``.
        """
        out = self(images, generator=generator)
        return float((out.logits.argmax(dim=-1) == out.targets).float().mean().item())

    @property
    def chance(self) -> float:
        """Accuracy of uniform guessing, ``1 / num_classes``."""
        return 1.0 / float(self.num_classes)

    def extra_repr(self) -> str:
        """Name and number of classes, shown in ``repr(task)``."""
        return f"name={self.name!r}, num_classes={getattr(self, 'num_classes', '?')}"
