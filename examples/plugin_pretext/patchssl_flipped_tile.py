"""Find the mirrored tile: an example pretext task shipped as a patchssl plugin.

One tile of each image is mirrored left-right; the network sees all tiles in place and says
which one (an N-way classification for N tiles). Telling a mirrored tile from the others
needs the encoder to know which way structures in the image usually face (vessels leaving
the optic disc, glands in tissue, text), without any label.

The package reaches patchssl only through its ``pyproject.toml`` entry point::

    [project.entry-points."patchssl.pretexts"]
    flipped_tile = "patchssl_flipped_tile:FlippedTilePretext"

after which ``create_pretext("flipped_tile", encoder=...)`` and
``patchssl pretrain --pretext flipped_tile`` work like the built-in tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from patchssl.pretext import PatchConcatHead, PatchDefences, PretextTask
from patchssl.pretext.base import random_integers

__all__ = ["FlippedTilePretext"]


class FlippedTilePretext(PretextTask):
    """Predict which of the N tiles of an image was mirrored left-right.

    Args:
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        tiler: The tiler; default from the encoder's patch size (3x3 tiles).
        hidden_dim: Width of the shared per-tile layer of the head.
        concat_dim: Width of the layer after the concatenation.
        defences: The per-tile shortcut defences (a ``PatchDefences``, a mapping of some of
            its options, or ``None``: per-tile normalisation, see :meth:`default_defences`).

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: logits ``(B, N)``, targets ``(B,)`` (the mirrored tile's row-major index).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        tiler: Any = None,
        hidden_dim: int = 256,
        concat_dim: int = 512,
        defences: PatchDefences | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(encoder, tiler=tiler)  # the base validates and builds the tiler
        self.num_classes = self.tiler.num_patches
        self.defences = self.build_defences(defences)
        self.head = PatchConcatHead(
            self.num_classes,
            encoder.out_dim,
            self.num_classes,
            hidden_dim=hidden_dim,
            concat_dim=concat_dim,
        )
        self.hidden_dim, self.concat_dim = hidden_dim, concat_dim

    @property
    def config(self) -> dict[str, Any]:
        return {
            "hidden_dim": self.hidden_dim,
            "concat_dim": self.concat_dim,
            "defences": self.defences.config,
        }

    @classmethod
    def default_defences(cls) -> PatchDefences:
        """Per-tile normalisation (mirroring a tile flips no brightness gradient)."""
        return PatchDefences(per_patch_norm=True)

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        return {"hidden_dim": 8, "concat_dim": 16}

    def make_inputs(self, images: Tensor, generator: torch.Generator | None):
        patches = self.tiler(images, generator=generator).patches  # (B, N, C, h, w)
        b, n = patches.shape[:2]
        targets = random_integers(n, (b,), generator=generator, device=images.device)
        chosen = torch.arange(n, device=images.device) == targets[:, None]  # (B, N)
        mirrored = torch.where(chosen[:, :, None, None, None], patches.flip(-1), patches)
        return self.defences(mirrored, generator=generator), targets

    def compute_logits(self, inputs: Tensor) -> Tensor:
        features = self.encoder(inputs, normalized=self.defences.normalizes)
        return self.head(features)
