"""Contrast between views: which tile (or image) of the batch is another view of this one?

Two pretexts share the views, the projection head and the loss (NT-Xent):

* :class:`TileContrastPretext` (``tile_contrast``) contrasts tiles: the other tiles of the
  same image are negatives, so it asks what sets a tile apart, within its image as much as
  across images;
* :class:`ImageContrastPretext` (``image_contrast``) contrasts whole images: two views of an
  image (crops of the whole image, then tiled), each the mean (or maximum) of its tiles'
  features, must find each other among the batch's images. It asks what sets one image apart
  from another, which is where an image-level label such as CIN2+ lives.

The tile contrast in detail: every tile of every image is seen twice, each time through an
independent random crop (a share of the tile's area, resized back to the tile's size) and one
of the eight turns and mirrorings of the square. Both views go through the shared encoder and
a small projection MLP; the task is to pick, among the ``2 * B * N - 1`` other views of the
batch, the one cut from the same tile (the normalised temperature-scaled cross-entropy,
NT-Xent, of SimCLR, between tiles instead of whole images).

Why tiles: unlike the jigsaw and relative position, the answer cannot come from where a
tile sits in the image (the other tiles of the same image are negatives like any other), so
the encoder must describe what a tile shows, its texture, edges and colour. Colour changes
are off by default (``color_jitter=0``): in the medical images this library is for, a colour
or brightness change is often the finding itself (an acetowhite lesion is a whitening).
``color_jitter`` scales each view's brightness, contrast and saturation by its own factors
(SimCLR's distortion without the hue shift): a global cast or exposure changes, a region
lighter than its surroundings stays lighter. On the synthetic cervix benchmark a strength
of 0.4 made the frozen features a little better in the linear probe than none at 32 labeled
patients, with no difference detectable at 8, 16, 64 and 128 (docs/benchmarks.md).

The number of candidates grows with the batch: :attr:`num_classes` is ``2 * B * N`` for the
last batch seen (``2 * N`` before the first), and chance is ``1 / (2 * B * N - 1)``.

References:
    Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020, arXiv:2002.05709.
    Azizi et al., "Big Self-Supervised Models Advance Medical Image Classification", ICCV
    2021, arXiv:2101.05224 (contrastive pretraining on medical images).
    Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018
    (an image as a bag of patches, pooled).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchssl.pretext.base import PatchDefences, PretextTask, random_integers, random_uniform
from patchssl.pretext.defences import apply_symmetries, color_jitter, unit_float
from patchssl.pretext.registry import register_pretext

if TYPE_CHECKING:
    from patchssl.tiling import PatchTiler

__all__ = ["ImageContrastPretext", "TileContrastPretext"]

#: Which views :class:`TileContrastPretext` tells a view apart from.
TILE_NEGATIVES = ("all", "same_position")


@register_pretext("tile_contrast")
class TileContrastPretext(PretextTask):
    """Match two random views of every tile among all the views of a batch (NT-Xent).

    Each of the ``B * N`` tiles is cropped twice at random (``min_scale`` to 1 of its area,
    aspect kept, resized back with ``torchvision.ops.roi_align``) and turned or mirrored by
    one of the eight symmetries of the square (``symmetries=True``, square patches). The
    ``2 * B * N`` views are encoded by the shared encoder and projected (``Linear -> ReLU ->
    Linear`` to ``proj_dim``, L2-normalised); the logits of a view are its cosine
    similarities to every view divided by ``temperature``, its own masked out, and the target
    is the index of the other view of its tile.

    Args:
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        tiler: The tiler; default :func:`patchssl.pretext.default_tiler` for the encoder's
            patch size.
        proj_dim: Output width of the projection head (SimCLR's 128).
        hidden_dim: Width of its hidden layer (``None``: the encoder's feature width).
        temperature: Temperature of the similarities, in (0, 1] (SimCLR: 0.1 to 0.5).
        min_scale: Smallest share of a tile's area a view keeps, in (0, 1] (1: the whole
            tile, views differ only by their symmetry).
        symmetries: Turn and mirror each view by a random symmetry of the square.
        color_jitter: Strength of the colour distortion of each view
            (:func:`~patchssl.pretext.defences.color_jitter`: brightness, contrast and
            saturation each scaled by its own factor in ``[1 - s, 1 + s]``), in ``[0, 1]``;
            0 turns it off.
        negatives: Which views a view is told apart from: ``"all"`` (every other view of
            the batch, the other tiles of its own image included) or ``"same_position"``
            (the views of the tiles at the same grid position in the batch's images, so that
            where a tile sits never tells it apart: what differs is what the images show
            there).
        defences: The per-tile defences applied to both views: a
            :class:`~patchssl.pretext.PatchDefences`, a mapping of some of its options, or
            ``None`` for the defaults, every defence off (colour is a feature here).
        label_smoothing: Label smoothing of the cross-entropy.

    Shape:
        - Input: ``(B, C, H, W)`` uint8 or float, ``(H, W) == tiler.image_size``.
        - Output: :class:`~patchssl.pretext.PretextOutput` with logits ``(B, 2N, 2BN)``
          (view ``v`` of tile ``n`` of image ``b`` is row ``[b, v * N + n]`` and candidate
          ``v * B * N + b * N + n``) and targets ``(B, 2N)``; with
          ``negatives="same_position"`` logits ``(B, 2N, 2B)`` (candidate ``v * B + b``
          among the views of position ``n``).

    Raises:
        ValueError: A width below 1, a temperature or ``min_scale`` outside (0, 1], a
            ``color_jitter`` outside [0, 1], an unknown ``negatives``, or
            ``symmetries=True`` with patches that are not square.

    Example:
        >>> import torch
        >>> from patchssl import SharedPatchEncoder
        >>> from patchssl.pretext import TileContrastPretext
        >>> task = TileContrastPretext(SharedPatchEncoder("resnet18", patch_size=32))
        >>> out = task(torch.rand(2, 3, 108, 108))
        >>> out.logits.shape, out.targets.shape
        (torch.Size([2, 18, 36]), torch.Size([2, 18]))

    References:
        Chen et al., ICML 2020, arXiv:2002.05709; Azizi et al., ICCV 2021, arXiv:2101.05224.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        tiler: PatchTiler | None = None,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.2,
        min_scale: float = 0.4,
        symmetries: bool = True,
        color_jitter: float = 0.0,
        negatives: str = "all",
        defences: PatchDefences | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(encoder, tiler=tiler, label_smoothing=label_smoothing)
        if negatives not in TILE_NEGATIVES:
            raise ValueError(f"negatives must be one of {TILE_NEGATIVES}; got {negatives!r}")
        for name, value in (("proj_dim", proj_dim), ("hidden_dim", hidden_dim)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name, value in (("temperature", temperature), ("min_scale", min_scale)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and 0.0 < float(value) <= 1.0):
                raise ValueError(f"{name} must be in (0, 1]; got {value!r}")
        number = isinstance(color_jitter, (int, float)) and not isinstance(color_jitter, bool)
        if not (number and 0.0 <= float(color_jitter) <= 1.0):
            raise ValueError(
                f"color_jitter must be in [0, 1] (0: off, 0.4: brightness, contrast and "
                f"saturation each scaled by 0.6 to 1.4); got {color_jitter!r}"
            )
        h, w = self.tiler.patch_size
        if symmetries and h != w:
            raise ValueError(
                f"symmetries=True turns tiles by quarter turns, which needs square patches; "
                f"the tiler cuts {h}x{w} (use symmetries=False or square patches)"
            )
        width = int(encoder.out_dim)
        hidden = width if hidden_dim is None else hidden_dim
        self.head = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim)
        )
        self.defences = self.build_defences(defences)
        self.proj_dim, self.hidden_dim = proj_dim, hidden_dim
        self.temperature, self.min_scale = float(temperature), float(min_scale)
        self.symmetries = bool(symmetries)
        self.color_jitter = float(color_jitter)
        self.negatives = negatives
        # 2 * B * N (2 * B for same_position) once a batch is seen
        self.num_classes = 2 * self.tiler.num_patches if negatives == "all" else 2

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild the task given the same encoder and tiler."""
        return {
            **super().config,
            "label_smoothing": self.label_smoothing,
            "proj_dim": self.proj_dim,
            "hidden_dim": self.hidden_dim,
            "temperature": self.temperature,
            "min_scale": self.min_scale,
            "symmetries": self.symmetries,
            "color_jitter": self.color_jitter,
            "negatives": self.negatives,
            "defences": self.defences.config,
        }

    @property
    def chance(self) -> float:
        """Accuracy of uniform guessing among the other views, ``1 / (num_classes - 1)``."""
        return 1.0 / float(self.num_classes - 1)

    @classmethod
    def default_defences(cls) -> PatchDefences:
        """Every defence off: a tile's colour and brightness are what it shows."""
        return PatchDefences()

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """A narrow projection, for the contract test."""
        return {"proj_dim": 8, "hidden_dim": 16}

    def _view(self, tiles: Tensor, generator: torch.Generator | None) -> Tensor:
        """One random view of each tile: a crop resized back, a symmetry, the colour jitter.

        Args:
            tiles: Float tensor of shape ``(M, C, h, w)``.
            generator: Source of the crops and symmetries.

        Returns:
            Float tensor of shape ``(M, C, h, w)``.
        """
        from torchvision.ops import roi_align  # deferred: torchvision is heavy to import

        m, _, h, w = tiles.shape
        draws = random_uniform((m, 3), generator=generator, device=tiles.device)
        side = math.sqrt(self.min_scale) + (1.0 - math.sqrt(self.min_scale)) * draws[:, 0]
        x0 = (1.0 - side) * draws[:, 1] * w
        y0 = (1.0 - side) * draws[:, 2] * h
        index = torch.arange(m, device=tiles.device, dtype=tiles.dtype)
        boxes = torch.stack([index, x0, y0, x0 + side * w, y0 + side * h], dim=1)
        views = roi_align(tiles, boxes.to(tiles.dtype), (h, w), aligned=True)
        if self.symmetries:
            turn = random_integers(8, (m,), generator=generator, device=tiles.device)
            views = apply_symmetries(views, turn)
        return color_jitter(views, self.color_jitter, generator=generator)

    def make_inputs(
        self, images: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Tile, draw two views of every tile, defend.

        Args:
            images: Tensor of shape ``(B, C, H, W)``.
            generator: Source of the jitter, the crops and the symmetries.

        Returns:
            ``(views, targets)``: float views ``(2B, N, C, h, w)`` (the first views of the
            ``B`` images, then the second ones) and targets ``(B, 2N)``.
        """
        patches = self.tiler(images, generator=generator).patches  # (B, N, C, h, w)
        b, n = patches.shape[:2]
        tiles = unit_float(patches.flatten(0, 1))
        first, second = self._view(tiles, generator), self._view(tiles, generator)
        views = torch.cat([first, second]).view(2 * b, n, *tiles.shape[1:])
        # candidates: all 2BN views, or the 2B views of each position
        m = b * n if self.negatives == "all" else b
        rows = torch.arange(2 * m, device=images.device)
        other = (rows + m) % (2 * m)
        if self.negatives == "all":
            targets = other.view(2, b, n).permute(1, 0, 2).reshape(b, 2 * n)
        else:  # the same for every position
            targets = other.view(2, b, 1).permute(1, 0, 2).expand(b, 2, n).reshape(b, 2 * n)
        self.num_classes = 2 * m
        return self.defences(views, generator=generator), targets

    def compute_logits(self, inputs: Tensor) -> Tensor:
        """Encode and project the views; cosine similarities over the temperature.

        Args:
            inputs: Float views of shape ``(2B, N, C, h, w)``.

        Returns:
            Float32 logits of shape ``(B, 2N, 2BN)`` (``(B, 2N, 2B)`` with
            ``negatives="same_position"``), each view's own similarity masked.
        """
        two_b, n = inputs.shape[:2]
        features = self._encode(inputs)  # (2B, N, D)
        z = F.normalize(self.head(features.flatten(0, 1)).float(), dim=-1)  # (2BN, P)
        b = two_b // 2
        if self.negatives == "same_position":
            similarity = self._similarities(z.view(two_b, n, -1).transpose(0, 1))  # (N, 2B, 2B)
            return similarity.view(n, 2, b, two_b).permute(2, 1, 0, 3).reshape(b, 2 * n, two_b)
        similarity = self._similarities(z)  # (2BN, 2BN)
        return similarity.view(2, b, n, 2 * b * n).permute(1, 0, 2, 3).reshape(b, 2 * n, -1)

    def _similarities(self, z: Tensor) -> Tensor:
        """Cosine similarities over the temperature, each view's own masked out.

        Args:
            z: L2-normalised projections of shape ``(..., M, P)``.

        Returns:
            Float tensor of shape ``(..., M, M)``; the diagonal is -1e4 (finite, so that label
            smoothing stays finite).
        """
        similarity = z @ z.transpose(-1, -2) / self.temperature
        own = torch.eye(z.shape[-2], dtype=torch.bool, device=z.device)
        return similarity.masked_fill(own, -1e4)


#: How :class:`ImageContrastPretext` pools an image's tile features.
IMAGE_POOLS = ("mean", "max")


@register_pretext("image_contrast")
class ImageContrastPretext(TileContrastPretext):
    """Match two random views of every image among the batch's views (NT-Xent on pooled tiles).

    Each image is cropped twice at random (``min_scale`` to 1 of its area, aspect kept,
    resized back to ``tiler.image_size``), turned or mirrored by one of the eight symmetries
    of the square (``symmetries=True``, square images) and colour-jittered; each view is then
    tiled and its ``N`` tiles encoded by the shared encoder. A view's feature is the mean (or
    maximum) of its tile features, projected (``Linear -> ReLU -> Linear`` to ``proj_dim``,
    L2-normalised); the logits of a view are its cosine similarities to the ``2B`` views over
    ``temperature``, its own masked out, and the target is the other view of its image
    (SimCLR's task, with the image seen as the bag of patches the classifier sees).

    Unlike :class:`TileContrastPretext`, colour jitter is on by default: without it the
    overall colour and exposure of an image tell its two views apart from the others.

    Args:
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        tiler: The tiler; default :func:`patchssl.pretext.default_tiler` for the encoder's
            patch size.
        proj_dim: Output width of the projection head (SimCLR's 128).
        hidden_dim: Width of its hidden layer (``None``: the encoder's feature width).
        temperature: Temperature of the similarities, in (0, 1] (SimCLR: 0.1 to 0.5).
        min_scale: Smallest share of the image's area a view keeps, in (0, 1].
        symmetries: Turn and mirror each view by a random symmetry of the square.
        color_jitter: Strength of the colour distortion of each view
            (:func:`~patchssl.pretext.defences.color_jitter`), in ``[0, 1]``; 0 turns it off.
        pool: How a view's tile features become one: ``"mean"`` or ``"max"`` (per feature).
        defences: The per-tile defences applied to the tiles of both views (as
            :class:`TileContrastPretext`; default every defence off).
        label_smoothing: Label smoothing of the cross-entropy.

    Shape:
        - Input: ``(B, C, H, W)`` uint8 or float, ``(H, W) == tiler.image_size``.
        - Output: :class:`~patchssl.pretext.PretextOutput` with logits ``(B, 2, 2B)`` (view
          ``v`` of image ``b`` is row ``[b, v]`` and candidate ``v * B + b``) and targets
          ``(B, 2)``.

    Raises:
        ValueError: A width below 1, a temperature or ``min_scale`` outside (0, 1], a
            ``color_jitter`` outside [0, 1], an unknown ``pool``, or ``symmetries=True``
            with images that are not square.

    Example:
        >>> import torch
        >>> from patchssl import SharedPatchEncoder
        >>> from patchssl.pretext import ImageContrastPretext
        >>> task = ImageContrastPretext(SharedPatchEncoder("resnet18", patch_size=32))
        >>> out = task(torch.rand(4, 3, 108, 108))
        >>> out.logits.shape, out.targets.shape
        (torch.Size([4, 2, 8]), torch.Size([4, 2]))

    References:
        Chen et al., ICML 2020, arXiv:2002.05709; Azizi et al., ICCV 2021, arXiv:2101.05224;
        Ilse et al., ICML 2018, arXiv:1802.04712.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        tiler: PatchTiler | None = None,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.2,
        min_scale: float = 0.5,
        symmetries: bool = True,
        color_jitter: float = 0.4,
        pool: str = "mean",
        defences: PatchDefences | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if pool not in IMAGE_POOLS:
            raise ValueError(f"pool must be one of {IMAGE_POOLS}; got {pool!r}")
        super().__init__(
            encoder,
            tiler=tiler,
            proj_dim=proj_dim,
            hidden_dim=hidden_dim,
            temperature=temperature,
            min_scale=min_scale,
            symmetries=False,  # checked below on the image, not the tile
            color_jitter=color_jitter,
            defences=defences,
            label_smoothing=label_smoothing,
        )
        h, w = self.tiler.image_size
        if symmetries and h != w:
            raise ValueError(
                f"symmetries=True turns images by quarter turns, which needs square images; "
                f"the tiler takes {h}x{w} (use symmetries=False or a square image_size)"
            )
        self.symmetries = bool(symmetries)
        self.pool = pool
        self.num_classes = 2  # 2 * B once a batch is seen

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild the task given the same encoder and tiler."""
        config = {**super().config, "pool": self.pool}
        del config["negatives"]  # the other images of the batch: nothing to choose
        return config

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """A narrow projection, for the contract test."""
        return {"proj_dim": 8, "hidden_dim": 16}

    def make_inputs(
        self, images: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Draw two views of every image, tile them, defend.

        Args:
            images: Tensor of shape ``(B, C, H, W)``.
            generator: Source of the crops, symmetries, jitter and tiling.

        Returns:
            ``(views, targets)``: float tiles of the views ``(2B, N, C, h, w)`` (the first
            views of the ``B`` images, then the second ones) and targets ``(B, 2)``.
        """
        b = images.shape[0]
        pixels = unit_float(images)
        views = torch.cat([self._view(pixels, generator), self._view(pixels, generator)])
        patches = self.tiler(views, generator=generator).patches  # (2B, N, C, h, w)
        rows = torch.arange(2 * b, device=images.device)
        targets = ((rows + b) % (2 * b)).view(2, b).t().contiguous()
        self.num_classes = 2 * b
        return self.defences(patches, generator=generator), targets

    def compute_logits(self, inputs: Tensor) -> Tensor:
        """Encode the tiles, pool each view, project; cosine similarities over the temperature.

        Args:
            inputs: Float tiles of the views, shape ``(2B, N, C, h, w)``.

        Returns:
            Float32 logits of shape ``(B, 2, 2B)``, each view's own similarity masked.
        """
        two_b = inputs.shape[0]
        features = self._encode(inputs)  # (2B, N, D)
        pooled = features.mean(1) if self.pool == "mean" else features.amax(1)
        z = F.normalize(self.head(pooled).float(), dim=-1)  # (2B, P)
        return self._similarities(z).view(2, two_b // 2, two_b).transpose(0, 1)
