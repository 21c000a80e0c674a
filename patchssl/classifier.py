"""The patch-attention classifier, and transfer from a pretraining checkpoint.

``PatchClassifier`` = :class:`~patchssl.tiling.PatchTiler` (cut the image) ->
:class:`~patchssl.encoder.SharedPatchEncoder` (one vector per patch) -> a fully connected layer
per patch -> :class:`~patchssl.attention.PatchAttention` (one weight per patch) -> a head
(concatenation, the paper's; or a weighted sum) -> logits. It follows timm's model contract:
``model(x)`` returns logits, with ``forward_features``, ``forward_head``, ``get_classifier`` and
``reset_classifier``; the attention weights and the features the last layer sees come from
:meth:`PatchClassifier.forward_with_attention`.

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." Journal of Information Processing Systems 17(3), 2021.

    Ilse, Tomczak, Welling. "Attention-based Deep Multiple Instance Learning." ICML 2018.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from patchssl._validation import as_pair, check_int, look_up
from patchssl.attention import (
    ATTENTION_MODES,
    PatchAttention,
    _check_entropy_weight,
    _check_temperature,
)
from patchssl.checkpoint import CheckpointError, load_checkpoint
from patchssl.encoder import SharedPatchEncoder
from patchssl.pretext.base import standardize_patches
from patchssl.tiling import PatchTiler, default_tiler

__all__ = [
    "HEADS",
    "INPUT_NORMS",
    "ClassifierOutput",
    "PatchClassifier",
    "TransferReport",
    "checkpoint_input_norm",
]

logger = logging.getLogger(__name__)

#: The heads :class:`PatchClassifier` offers.
HEADS: tuple[str, ...] = ("concat", "pooled")

#: How :class:`PatchClassifier` normalises each patch before the encoder: with the encoder's
#: mean and std (``"encoder"``), or each channel of each patch by its own mean and std
#: (``"per_patch"``, what a pretext task with per-tile normalisation feeds its encoder).
INPUT_NORMS: tuple[str, ...] = ("encoder", "per_patch")

# Encoder options that may differ between pretraining and fine-tuning: they change how the
# encoder runs, not which weights it has.
_RUNTIME_OPTIONS = ("freeze", "grad_checkpointing", "channels_last", "drop_path_rate")
_SAME_WEIGHT_NORMS = ("batch", "sync_batch")


class ClassifierOutput(NamedTuple):
    """What :meth:`PatchClassifier.forward_with_attention` returns.

    Attributes:
        logits: ``(B, num_classes)`` class scores (before softmax).
        weights: ``(B, N)`` attention weight of each patch (all ones with ``attention=None``).
        features: ``(B, F)`` the features the final layer sees (before dropout): ``F = N *
            hidden_dim`` for ``head="concat"``, ``hidden_dim`` for ``head="pooled"``. For
            embedding plots (t-SNE, Fig. 4a of the paper).
    """

    logits: Tensor
    weights: Tensor
    features: Tensor


@dataclass
class TransferReport:
    """What :meth:`PatchClassifier.from_pretrained` took from the checkpoint.

    Attributes:
        source: The checkpoint path (``None`` when a dictionary was given).
        loaded: Number of encoder tensors loaded (every ``encoder.*`` entry).
        new_keys: Classifier entries that start from scratch (per-patch layer, attention, head).
        ignored_keys: Checkpoint entries not used (the pretext task's head).
        pretext: The pretext task the encoder was trained with.
        permutations_fingerprint: The jigsaw permutation set's hash, if any.
    """

    source: str | None
    loaded: int
    new_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    pretext: str | None = None
    permutations_fingerprint: str | None = None

    def summary(self) -> str:
        """One line for logs."""
        where = self.source or "<checkpoint dict>"
        perms = (
            f", permutations {self.permutations_fingerprint}"
            if self.permutations_fingerprint
            else ""
        )
        return (
            f"transfer from {where} (pretext {self.pretext!r}{perms}): loaded {self.loaded} "
            f"encoder tensors, {len(self.new_keys)} new, {len(self.ignored_keys)} ignored"
        )


class PatchClassifier(nn.Module):
    """Encoder, per-patch layer, attention and head: the paper's attentive transfer model.

    For patches ``x_1..x_N`` of an image (cut by ``tiler``), with ``E`` the shared encoder:

        g_n = ReLU(W_p E(x_n) + b_p)                  per-patch layer, shared, (hidden_dim,)
        (g_n', a_n) = PatchAttention(g_1..g_N)         g_n' = a_n g_n
        head="concat":  f = [g_1'; ...; g_N']          (N * hidden_dim,)  the paper's
        head="pooled":  f = sum_n g_n'                 (hidden_dim,)      Ilse et al.'s pooling
        logits = W_o dropout(f) + b_o

    ``attention=None`` sets every ``a_n = 1`` (the weights returned are all ones): the "no
    attention" ablation. ``head="pooled"`` goes naturally with ``"softmax"``/``"gated"``
    attention (a weighted mean); ``"concat"`` keeps each patch's place in the grid.

    The defaults, ``attention="softmax"`` with ``head="pooled"``, are attention-based
    multiple-instance pooling (Ilse et al. 2018): one classifier for every grid position, fed
    the patches in proportion to their weights, so a lesion trains the same weights wherever it
    lies and the weights must pick it out. The paper's classifier is ``attention="sigmoid",
    head="concat"``. On the synthetic benchmark, whose lesions lie anywhere in the grid, the
    paper's classifier stays near chance at 32 to 128 labeled patients while the defaults find
    the lesions and point their top weight at them (``docs/benchmarks.md``, "The classifier
    that finds the lesion").

    The model follows timm's contract, so that tools written for timm models (captum,
    torchmetrics loops, export wrappers) take it as it is: ``model(x)`` returns logits,
    :meth:`forward_features` the per-patch features ``g_n`` before attention,
    :meth:`forward_head` attention, pooling and the last layer, :meth:`get_classifier` and
    :meth:`reset_classifier` the last layer. :meth:`forward_with_attention` returns the logits
    with the attention weights and the pooled features (for overlays and embedding plots).

    Args:
        encoder: The shared patch encoder.
        num_classes: Number of classes (2: CIN2+ against CIN0/1 in the paper).
        attention: ``"softmax"`` (the default), ``"gated"``, ``"sigmoid"`` (the paper's) or
            ``None``.
        tiler: How images are cut. Its ``patch_size`` must equal the encoder's. Default:
            :func:`patchssl.tiling.default_tiler`, a 3x3 grid in the paper's proportions
            (512 px images for 153 px patches), the same default the pretext tasks use.
        head: ``"pooled"`` (the default) or ``"concat"`` (the paper's).
        hidden_dim: Width of the per-patch layer.
        dropout: Dropout before the final layer.
        attention_hidden_dim: Width of ``V``/``U`` in the softmax attention modes.
        attention_temperature: ``T > 0`` dividing the attention scores before the sigmoid or
            softmax (1: the paper's gate; below 1, sharper weights). See
            :class:`~patchssl.attention.PatchAttention`.
        attention_entropy: ``lambda >= 0`` of the entropy penalty on the attention weights in
            training (0: off): the attention's ``entropy_weight``, whose term
            :attr:`aux_loss` returns (see :class:`~patchssl.attention.PatchAttention`).
            Ignored with ``attention=None`` (the weights are constant).
        jitter_in_training: Let the tiler jitter patches in training mode (default ``False``:
            centre placement always; evaluation mode never jitters).
        input_norm: How each patch is normalised before the encoder: ``"encoder"`` (the
            encoder's mean and std, e.g. ImageNet's) or ``"per_patch"`` (each channel of each
            patch standardised by its own mean and std, as a pretext with per-tile
            normalisation does: the relative-position task by default, the jigsaw with
            ``per_patch_norm=True``).
            :meth:`from_pretrained` takes the checkpoint's, so that the transferred encoder sees
            the kind of input it was trained on.

    Shape:
        - ``forward``: images ``(B, C, H, W)`` -> logits ``(B, num_classes)``.
        - ``forward_features``: images ``(B, C, H, W)`` -> patch features
          ``(B, N, hidden_dim)``.
        - ``forward_head``: patch features ``(B, N, hidden_dim)`` -> logits
          ``(B, num_classes)``, or pooled features ``(B, F)`` with ``pre_logits=True``.
        - ``forward_with_attention``: images ``(B, C, H, W)`` -> :class:`ClassifierOutput`.
        - ``forward_patches``: patches ``(B, N, C, h, w)`` -> :class:`ClassifierOutput`.

    References:
        Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
        Dysplasia Diagnosis", JIPS 2021. Ilse, Tomczak & Welling, "Attention-based Deep
        Multiple Instance Learning", ICML 2018.

    Example:
        >>> enc = SharedPatchEncoder("resnet18", patch_size=64)
        >>> clf = PatchClassifier(enc, num_classes=2).eval()
        >>> images = torch.zeros(1, 3, *clf.tiler.image_size, dtype=torch.uint8)
        >>> clf(images).shape
        torch.Size([1, 2])
        >>> clf.forward_with_attention(images).weights.shape
        torch.Size([1, 9])
    """

    transfer_report: TransferReport | None

    def __init__(
        self,
        encoder: SharedPatchEncoder,
        num_classes: int = 2,
        attention: str | None = "softmax",
        *,
        tiler: PatchTiler | None = None,
        head: str = "pooled",
        hidden_dim: int = 256,
        dropout: float = 0.5,
        attention_hidden_dim: int = 128,
        attention_temperature: float = 1.0,
        attention_entropy: float = 0.0,
        jitter_in_training: bool = False,
        input_norm: str = "encoder",
    ) -> None:
        super().__init__()
        if not isinstance(encoder, SharedPatchEncoder):
            raise TypeError(
                "encoder must be a SharedPatchEncoder (wrap your backbone with "
                f"SharedPatchEncoder(backbone)); got {type(encoder).__name__}"
            )
        check_int(num_classes, "num_classes")
        check_int(hidden_dim, "hidden_dim")
        look_up(attention, (*ATTENTION_MODES, None), "attention")
        look_up(head, HEADS, "head")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        look_up(
            input_norm,
            INPUT_NORMS,
            "input_norm",
            note="('per_patch' for an encoder pretrained with per-patch normalisation)",
        )
        if tiler is None:
            tiler = default_tiler(encoder.patch_size)
        elif not isinstance(tiler, PatchTiler):
            raise TypeError(f"tiler must be a PatchTiler; got {type(tiler).__name__}")
        if tuple(tiler.patch_size) != tuple(encoder.patch_size):
            raise ValueError(
                f"the tiler cuts {tiler.patch_size[0]}x{tiler.patch_size[1]} px patches but the "
                f"encoder was built for {encoder.patch_size[0]}x{encoder.patch_size[1]} px; use "
                "the same patch_size for both"
            )
        self.encoder = encoder
        self.tiler = tiler
        self.num_classes = num_classes
        self.num_patches = tiler.num_patches
        self.attention_mode = attention
        self.head = head
        self.hidden_dim = hidden_dim
        self.dropout_p = float(dropout)
        self.attention_hidden_dim = attention_hidden_dim
        self.attention_temperature = _check_temperature(
            attention_temperature, "attention_temperature"
        )
        self.attention_entropy = _check_entropy_weight(attention_entropy, "attention_entropy")
        self.jitter_in_training = bool(jitter_in_training)
        self.input_norm = input_norm
        self.transfer_report = None

        self.patch_fc = nn.Sequential(nn.Linear(encoder.out_dim, hidden_dim), nn.ReLU())
        self.attention = (
            PatchAttention(
                hidden_dim,
                self.num_patches,
                attention,
                attention_hidden_dim,
                temperature=attention_temperature,
                entropy_weight=self.attention_entropy,
            )
            if attention is not None
            else None
        )
        self.feature_dim = hidden_dim * (self.num_patches if head == "concat" else 1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Cut images with the tiler and classify them.

        Args:
            images: ``(B, C, H, W)`` uint8 (0..255) or float (0..1), ``(H, W)`` the tiler's
                ``image_size``.
            generator: Source of the tiler's jitter (training with ``jitter_in_training``).

        Returns:
            Logits of shape ``(B, num_classes)`` (before softmax).
        """
        return self.forward_head(self.forward_features(images, generator=generator))

    def forward_features(
        self, images: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Tile, encode and project each patch: the features before attention.

        Args:
            images: ``(B, C, H, W)`` uint8 or float, ``(H, W)`` the tiler's ``image_size``.
            generator: Source of the tiler's jitter (training with ``jitter_in_training``).

        Returns:
            Per-patch features ``g_n`` of shape ``(B, N, hidden_dim)``, in the tiler's
            row-major patch order.
        """
        jitter = self.training and self.jitter_in_training
        patches = self.tiler(images, generator=generator, jitter=jitter).patches
        return self.patch_features(patches)

    def patch_features(self, patches: Tensor, *, normalized: bool = False) -> Tensor:
        """Encode and project patches already cut (``input_norm`` applied unless ``normalized``).

        Args:
            patches: ``(B, N, C, h, w)`` uint8 (0..255) or float (0..1), ``N`` the tiler's
                number of patches in its row-major order.
            normalized: The patches are already normalised as ``input_norm`` says.

        Returns:
            Tensor of shape ``(B, N, hidden_dim)``.
        """
        if patches.ndim != 5 or patches.shape[1] != self.num_patches:
            raise ValueError(
                f"expected patches of shape (B, {self.num_patches}, C, h, w) for a "
                f"{self.tiler.grid[0]}x{self.tiler.grid[1]} grid; got {tuple(patches.shape)}"
            )
        if self.input_norm == "per_patch" and not normalized:
            x = patches.float() / 255.0 if patches.dtype == torch.uint8 else patches
            patches, normalized = standardize_patches(x), True
        return self.patch_fc(self.encoder(patches, normalized=normalized))

    def _attend(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if features.ndim != 3 or features.shape[1] != self.num_patches:
            raise ValueError(
                f"expected patch features of shape (B, {self.num_patches}, {self.hidden_dim}); "
                f"got {tuple(features.shape)}"
            )
        if self.attention is not None:
            features, weights = self.attention(features)
        else:
            weights = features.new_ones(features.shape[:2])
        pooled = features.flatten(1) if self.head == "concat" else features.sum(dim=1)
        return self.fc(self.dropout(pooled)), weights, pooled

    @property
    def aux_loss(self) -> Tensor | None:
        """The attention's entropy penalty of the last forward in training mode (a scalar).

        ``None`` without attention, with ``attention_entropy=0`` or after a forward in
        evaluation mode. A training loop adds it to the loss (the fine-tuning engine does).
        """
        return None if self.attention is None else self.attention.aux_loss

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Attention, pooling and the last layer, as timm's ``forward_head``.

        Args:
            features: Per-patch features ``(B, N, hidden_dim)`` from :meth:`forward_features`.
            pre_logits: Return the pooled features the last layer sees instead of the logits.

        Returns:
            Logits ``(B, num_classes)``, or with ``pre_logits`` the pooled features ``(B, F)``
            (``F = N * hidden_dim`` for ``head="concat"``, ``hidden_dim`` for ``"pooled"``).
        """
        logits, _, pooled = self._attend(features)
        return pooled if pre_logits else logits

    def forward_with_attention(
        self, images: Tensor, *, generator: torch.Generator | None = None
    ) -> ClassifierOutput:
        """Classify images and return the attention weights and pooled features too.

        Args:
            images: ``(B, C, H, W)`` uint8 or float, ``(H, W)`` the tiler's ``image_size``.
            generator: Source of the tiler's jitter (training with ``jitter_in_training``).

        Returns:
            :class:`ClassifierOutput` with logits ``(B, num_classes)``, weights ``(B, N)`` and
            features ``(B, F)``.
        """
        return ClassifierOutput(*self._attend(self.forward_features(images, generator=generator)))

    def forward_patches(self, patches: Tensor, *, normalized: bool = False) -> ClassifierOutput:
        """Classify images given as patches already cut, with weights and features.

        Args:
            patches: ``(B, N, C, h, w)`` uint8 or float, ``N`` the tiler's number of patches
                in its row-major order.
            normalized: The patches are already normalised as ``input_norm`` says.

        Returns:
            :class:`ClassifierOutput` (see :meth:`forward_with_attention`).
        """
        return ClassifierOutput(*self._attend(self.patch_features(patches, normalized=normalized)))

    def get_classifier(self) -> nn.Module:
        """The last layer (``nn.Linear(F, num_classes)``), as timm's ``get_classifier``."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last layer by a new one with ``num_classes`` outputs (timm's contract).

        The encoder, per-patch layer and attention keep their weights.

        Args:
            num_classes: Number of outputs of the new layer; ``0`` makes the last layer an
                identity, so that ``model(x)`` returns the pooled features ``(B, F)``.
        """
        check_int(num_classes, "num_classes", minimum=0)
        ref = next(self.patch_fc.parameters())
        self.fc = (
            nn.Linear(self.feature_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.num_classes = num_classes

    # ------------------------------------------------------------------ configs
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able description that rebuilds this classifier with :meth:`from_config`.

        ``config["encoder"]`` is ``None`` for an encoder around a custom ``nn.Module``.
        """
        return {
            "encoder": self.encoder.config,
            "tiler": self.tiler.config,
            "num_classes": self.num_classes,
            "attention": self.attention_mode,
            "head": self.head,
            "hidden_dim": self.hidden_dim,
            "dropout": self.dropout_p,
            "attention_hidden_dim": self.attention_hidden_dim,
            "attention_temperature": self.attention_temperature,
            "attention_entropy": self.attention_entropy,
            "jitter_in_training": self.jitter_in_training,
            "input_norm": self.input_norm,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PatchClassifier:
        """Rebuild a (randomly initialised) classifier from :attr:`config`."""
        config = dict(config)
        encoder_config = config.pop("encoder", None)
        if encoder_config is None:
            raise ValueError(
                "this classifier's encoder was built around a custom nn.Module, which a config "
                "cannot rebuild; build the encoder yourself, then PatchClassifier(encoder, ...) "
                "and load_state_dict"
            )
        tiler_config = config.pop("tiler", None)
        encoder = SharedPatchEncoder.from_config(encoder_config)
        tiler = PatchTiler(**tiler_config) if tiler_config is not None else None
        return cls(encoder, tiler=tiler, **config)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        num_classes: int = 2,
        attention: str | None = "softmax",
        *,
        backbone: str | None = None,
        in_chans: int | None = None,
        patch_size: int | tuple[int, int] | None = None,
        tiler: PatchTiler | None = None,
        encoder: SharedPatchEncoder | None = None,
        encoder_options: Mapping[str, Any] | None = None,
        input_norm: str | None = None,
        **kwargs: Any,
    ) -> PatchClassifier:
        """Build a classifier around the encoder of a pretraining checkpoint.

        The encoder and tiler are rebuilt from the checkpoint's ``model_config`` and the
        ``encoder.*`` weights are loaded strictly (``weights_only=True``); the per-patch
        layer, attention and head start from scratch; the pretext head is ignored. What was
        loaded is in ``classifier.transfer_report`` and logged in one line.

        Args:
            checkpoint: A pretraining checkpoint file (``kind="pretrain"``) written by
                patchssl, or its loaded dictionary.
            num_classes: Number of classes.
            attention: ``"softmax"`` (the default), ``"gated"``, ``"sigmoid"`` (the paper's) or
                ``None``.
            backbone: If given, must equal the checkpoint's backbone (a safety check).
            in_chans: If given, must equal the checkpoint's channels.
            patch_size: If given, must equal the checkpoint's patch size.
            tiler: The tiler to use (default: the checkpoint's). Its patch size must equal the
                checkpoint's; its grid may differ (the encoder sees single patches).
            encoder: An encoder built by the user, needed when the checkpoint's encoder was a
                custom ``nn.Module`` (its config is ``None``); the weights are loaded into it.
            encoder_options: Options that may change at fine-tuning time: ``freeze``,
                ``grad_checkpointing``, ``channels_last``, ``drop_path_rate``, and ``norm``
                between ``"batch"`` and ``"sync_batch"``.
            input_norm: ``"encoder"`` or ``"per_patch"``; default: the checkpoint's (how the
                pretext normalised the encoder's input), so that transfer keeps the input.
            **kwargs: Further :class:`PatchClassifier` arguments (``head``, ``hidden_dim``,
                ``dropout``, ``attention_hidden_dim``, ``jitter_in_training``).

        Returns:
            The classifier, with ``transfer_report`` set.

        Raises:
            CheckpointError: Not a patchssl checkpoint, not a pretraining one, a disagreement
                with ``backbone``/``in_chans``/``patch_size``/``tiler`` (both values named),
                or encoder weights that do not fit.
            FileNotFoundError: The file does not exist.
        """
        payload, source = _read(checkpoint)
        where = source or "the checkpoint"
        kind = payload.get("kind")
        if kind == "finetune":
            raise CheckpointError(
                f"{where} is a fine-tuned classifier checkpoint (kind 'finetune'); restore it "
                "with PatchClassifier.from_checkpoint(...). from_pretrained starts from a "
                "pretraining checkpoint (kind 'pretrain', from `patchssl pretrain`)."
            )
        if kind != "pretrain":
            raise CheckpointError(
                f"{where} has kind {kind!r}; from_pretrained needs a pretraining checkpoint "
                "(kind 'pretrain')"
            )
        model_config = payload.get("model_config") or {}
        state = payload.get("model")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{where} has no 'model' state dict")
        enc_config = model_config.get("encoder")
        tiler_config = model_config.get("tiler")

        # --- the user's expectations against the checkpoint
        if enc_config is not None:
            _expect(where, "backbone", enc_config.get("backbone"), backbone)
            _expect(where, "in_chans", enc_config.get("in_chans"), in_chans)
            ckpt_patch = as_pair(enc_config["patch_size"], "patch_size")
        elif tiler_config is not None:
            ckpt_patch = as_pair(tiler_config["patch_size"], "patch_size")
        else:
            ckpt_patch = None
        if patch_size is not None and ckpt_patch is not None:
            _expect(where, "patch_size", ckpt_patch, as_pair(patch_size, "patch_size"))
        if tiler is not None and ckpt_patch is not None and tuple(tiler.patch_size) != ckpt_patch:
            raise CheckpointError(
                f"{where} was pretrained with {ckpt_patch[0]}x{ckpt_patch[1]} px patches but "
                f"the tiler given cuts {tiler.patch_size[0]}x{tiler.patch_size[1]} px patches"
            )

        # --- the encoder
        options = dict(encoder_options or {})
        if encoder is None:
            if enc_config is None:
                raise CheckpointError(
                    f"{where} holds an encoder built around a custom nn.Module (its config is "
                    "None), which cannot be rebuilt from the file; build the same encoder and "
                    "pass it: PatchClassifier.from_pretrained(path, encoder=my_encoder)"
                )
            encoder = SharedPatchEncoder(**_with_options(where, enc_config, options))
        else:
            if options:
                raise ValueError(
                    "encoder_options only apply when the encoder is rebuilt from the "
                    "checkpoint; set them on the encoder you pass"
                )
            if enc_config is not None:
                _expect(where, "backbone", enc_config.get("backbone"), encoder.backbone_name)
                _expect(where, "in_chans", enc_config.get("in_chans"), encoder.in_chans)
                _expect(where, "patch_size", ckpt_patch, tuple(encoder.patch_size))
        encoder_state = {
            k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")
        }
        if not encoder_state:
            raise CheckpointError(
                f"{where} has no 'encoder.*' weights; was it written by a patchssl pretext task?"
            )
        _load_strict(encoder, encoder_state, where, "encoder")

        # --- the tiler and the classifier
        if tiler is None and tiler_config is not None:
            tiler = PatchTiler(**tiler_config)
        if input_norm is None:
            input_norm = checkpoint_input_norm(model_config)
        classifier = cls(
            encoder, num_classes, attention, tiler=tiler, input_norm=input_norm, **kwargs
        )
        report = TransferReport(
            source=source,
            loaded=len(encoder_state),
            new_keys=[k for k in classifier.state_dict() if not k.startswith("encoder.")],
            ignored_keys=[k for k in state if not k.startswith("encoder.")],
            pretext=model_config.get("pretext"),
            permutations_fingerprint=payload.get("permutations_fingerprint"),
        )
        classifier.transfer_report = report
        logger.info(report.summary())
        return classifier

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        *,
        map_location: str | torch.device = "cpu",
    ) -> PatchClassifier:
        """Restore a fine-tuned classifier (``kind="finetune"``) saved by patchssl.

        The checkpoint holds ``model`` (the classifier's ``state_dict``) and
        ``model_config["classifier"]`` (its :attr:`config`). The classifier comes back in
        training mode, as any new module; call ``.eval()`` for inference.

        Args:
            checkpoint: The file, or its loaded dictionary.
            map_location: Where tensors are loaded.

        Raises:
            CheckpointError: Not a patchssl checkpoint, a pretraining one, or weights that do
                not fit the stored config.
        """
        payload, source = _read(checkpoint, map_location=map_location)
        where = source or "the checkpoint"
        kind = payload.get("kind")
        if kind != "finetune":
            hint = (
                " Build a classifier from it with PatchClassifier.from_pretrained(...)."
                if kind == "pretrain"
                else ""
            )
            raise CheckpointError(
                f"{where} is a {kind!r} checkpoint, not a fine-tuned classifier (kind "
                f"'finetune').{hint}"
            )
        config = (payload.get("model_config") or {}).get("classifier")
        if config is None:
            raise CheckpointError(f"{where} has no model_config['classifier'] to rebuild from")
        classifier = cls.from_config(config)
        _load_strict(classifier, payload.get("model") or {}, where, "classifier")
        return classifier.to(map_location)

    def extra_repr(self) -> str:
        """Classes, attention, head and widths."""
        return (
            f"num_classes={self.num_classes}, attention={self.attention_mode!r}, "
            f"head={self.head!r}, hidden_dim={self.hidden_dim}, num_patches={self.num_patches}"
        )


def checkpoint_input_norm(model_config: Mapping[str, Any]) -> str:
    """How a pretraining checkpoint's encoder saw its input: ``"per_patch"`` or ``"encoder"``.

    Reads ``model_config["input_norm"]``; checkpoints written before it was recorded fall back
    on the pretext's ``per_patch_norm`` option (flat, as older tasks saved it, or in its
    ``defences`` mapping).

    Args:
        model_config: The checkpoint's ``model_config``.

    Returns:
        One of :data:`INPUT_NORMS`.
    """
    stored = model_config.get("input_norm")
    if stored in INPUT_NORMS:
        return str(stored)
    kwargs = model_config.get("pretext_kwargs") or {}
    per_patch = kwargs.get("per_patch_norm", (kwargs.get("defences") or {}).get("per_patch_norm"))
    return "per_patch" if per_patch else "encoder"


def _read(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Any], str | None]:
    if isinstance(checkpoint, Mapping):
        if checkpoint.get("format") != "patchssl":
            raise CheckpointError(
                "the dictionary given is not a patchssl checkpoint (no 'format': 'patchssl' entry)"
            )
        return dict(checkpoint), None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a dict; got {type(checkpoint).__name__}")
    return load_checkpoint(checkpoint, map_location=map_location), str(Path(checkpoint))


def _expect(where: str, what: str, stored: Any, asked: Any) -> None:
    if asked is None or stored is None:
        return
    if isinstance(stored, (list, tuple)):
        stored = tuple(stored)
    if isinstance(asked, (list, tuple)):
        asked = tuple(asked)
    if stored != asked:
        raise CheckpointError(
            f"{where} was pretrained with {what} {stored!r} but {what}={asked!r} was asked for; "
            f"leave {what} out to take the checkpoint's, or use a checkpoint pretrained with it"
        )


def _with_options(where: str, config: Mapping[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    merged = dict(config)
    for key, value in options.items():
        if key == "norm":
            if value not in _SAME_WEIGHT_NORMS or merged.get("norm") not in _SAME_WEIGHT_NORMS:
                raise CheckpointError(
                    f"{where} was pretrained with norm={merged.get('norm')!r}; norm={value!r} "
                    f"has other weights. Only {list(_SAME_WEIGHT_NORMS)} are interchangeable"
                )
        elif key not in _RUNTIME_OPTIONS:
            raise ValueError(
                f"encoder option {key!r} cannot change after pretraining (it changes the "
                f"weights); allowed: {[*_RUNTIME_OPTIONS, 'norm']}"
            )
        merged[key] = value
    return merged


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], where: str, what: str) -> None:
    try:
        result = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"the {what} weights of {where} do not fit: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"the {what} weights of {where} do not fit: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
