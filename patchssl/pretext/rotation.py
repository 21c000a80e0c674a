"""Rotation prediction: by how many quarter turns was the image rotated?

An image is turned by 0, 90, 180 or 270 degrees and the network predicts which (a 4-way
classification). To tell which way is up the encoder has to recognise objects and their
usual orientation (Gidaris et al. 2018).

Design choice (how it shares the tiler and encoder): the task tiles the image exactly as the
jigsaw task and the classifier do, turns every tile of an image by that image's rotation
(each tile about its own centre), encodes the tiles with the shared encoder, and averages
the per-tile features before classifying (:class:`~patchssl.pretext.heads.PooledPatchHead`).
Because the head averages over tiles, where each tile sits cannot matter, so this is the
same as rotating the whole image and then tiling it (for a square grid: rotating the image
turns every tile and moves tiles to rotated grid cells, which the average ignores). The
reasons to rotate tiles rather than feed the whole image resized to the patch size:

* the encoder sees what it will see after transfer: patches of ``patch_size`` at the
  image's native scale, not a down-sampled whole image;
* one label per image keeps the contract's ``(B,)`` targets while every tile contributes
  evidence (nine views of the same rotation make a less noisy signal than one);
* predicting each tile's rotation independently would make tiles the unit of the loss, but
  many medical tiles (flat mucosa, background) have no orientation at all; pooling lets the
  informative tiles carry the image.

References:
    Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
    Rotations", ICLR 2018, arXiv:1803.07728.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from patchssl.pretext.base import PatchDefences, PretextTask, random_integers
from patchssl.pretext.heads import PooledPatchHead
from patchssl.pretext.registry import register_pretext

if TYPE_CHECKING:
    from patchssl.tiling import PatchTiler

__all__ = ["RotationPretext", "rotate_quarter_turns"]


def _rotation_maps(size: int, device: torch.device | None = None) -> Tensor:
    """Flat source indices of the four quarter-turn rotations of a ``size x size`` grid.

    Returns:
        Long tensor of shape ``(4, size * size)``: ``rot_k.flatten() = x.flatten()[maps[k]]``
        with ``rot_k = torch.rot90(x, k, dims=(-2, -1))``.
    """
    grid = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([torch.rot90(grid, k, dims=(0, 1)).reshape(-1) for k in range(4)])


def rotate_quarter_turns(patches: Tensor, turns: Tensor, maps: Tensor | None = None) -> Tensor:
    """Rotate every patch of each sample by that sample's number of quarter turns.

    Equivalent to ``torch.rot90(patches[b], turns[b], dims=(-2, -1))`` for every ``b``
    (counter-clockwise as displayed), done as one gather over the batch.

    Args:
        patches: Tensor of shape ``(B, N, C, s, s)`` (square patches), any dtype.
        turns: Long tensor of shape ``(B,)`` with values in ``0..3``.
        maps: Precomputed ``_rotation_maps(s)`` (optional).

    Returns:
        Tensor of shape ``(B, N, C, s, s)``.
    """
    b, n, c, h, w = patches.shape
    if h != w:
        raise ValueError(f"quarter turns need square patches; got {h}x{w}")
    if maps is None:
        maps = _rotation_maps(h, patches.device)
    index = maps.to(patches.device)[turns]  # (B, s*s)
    index = index[:, None, None, :].expand(b, n, c, h * w)
    return patches.reshape(b, n, c, h * w).gather(-1, index).view(b, n, c, h, w)


@register_pretext("rotation")
class RotationPretext(PretextTask):
    """Predict the rotation (0, 90, 180 or 270 degrees) applied to an image's tiles.

    For each image a number of quarter turns ``t`` in ``0..3`` is drawn from ``generator``;
    every tile of that image is rotated by ``t`` quarter turns counter-clockwise (one gather
    for the whole batch), encoded by the shared encoder, passed through a shared per-tile
    layer, averaged over the tiles, and classified into 4 classes. Target: ``t``. See the
    module docstring for why the task rotates tiles and pools them.

    Args:
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        tiler: The tiler (square patches); default
            :func:`patchssl.pretext.default_tiler` for the encoder's patch size.
        hidden_dim: Width of the shared per-tile layer.
        defences: The per-tile shortcut defences: a
            :class:`~patchssl.pretext.PatchDefences`, a mapping of some of its options
            (the rest keep the defaults), or ``None`` for the defaults, every defence off
            (``PatchDefences()``: brightness gradients do not reveal rotation once tiles are
            pooled).
        label_smoothing: Label smoothing of the cross-entropy.

    Shape:
        - Input: ``(B, C, H, W)`` uint8 or float, ``(H, W) == tiler.image_size``.
        - Output: :class:`~patchssl.pretext.PretextOutput` with logits ``(B, 4)`` and targets
          ``(B,)`` (quarter turns, counter-clockwise).

    Raises:
        ValueError: The tiler's patches are not square.

    References:
        Gidaris, Singh & Komodakis, ICLR 2018, arXiv:1803.07728.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        tiler: PatchTiler | None = None,
        hidden_dim: int = 512,
        defences: PatchDefences | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(encoder, tiler=tiler, label_smoothing=label_smoothing)
        h, w = self.tiler.patch_size
        if h != w:
            raise ValueError(
                f"rotation by quarter turns needs square patches; the tiler cuts {h}x{w} "
                f"(build the tiler and encoder with patch_size={min(h, w)})"
            )
        self.num_classes = 4
        self.register_buffer("rotation_maps", _rotation_maps(h), persistent=False)
        self.defences = self.build_defences(defences)
        self.head = PooledPatchHead(int(encoder.out_dim), 4, hidden_dim=hidden_dim)
        self.hidden_dim = hidden_dim

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild the task given the same encoder and tiler."""
        return {
            **super().config,
            "label_smoothing": self.label_smoothing,
            "hidden_dim": self.hidden_dim,
            "defences": self.defences.config,
        }

    @classmethod
    def default_defences(cls) -> PatchDefences:
        """Every defence off: brightness gradients do not reveal rotation once tiles are pooled."""
        return PatchDefences()

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """A narrow head, for the contract test."""
        return {"hidden_dim": 16}

    def make_inputs(
        self, images: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Tile, rotate each image's tiles by its drawn quarter turns, defend.

        Args:
            images: Tensor of shape ``(B, C, H, W)``.
            generator: Source of the jitter, the rotations and colour dropping.

        Returns:
            ``(tiles, targets)``: float tiles ``(B, N, C, h, h)`` and quarter turns ``(B,)``.
        """
        patches = self.tiler(images, generator=generator).patches
        turns = random_integers(4, (patches.shape[0],), generator=generator, device=images.device)
        rotated = rotate_quarter_turns(patches, turns, self.rotation_maps)
        return self.defences(rotated, generator=generator), turns

    def compute_logits(self, inputs: Tensor) -> Tensor:
        """Encode the rotated tiles, pool and classify.

        Args:
            inputs: Float tiles of shape ``(B, N, C, h, h)``.

        Returns:
            Logits of shape ``(B, 4)``.
        """
        return self.head(self._encode(inputs))
