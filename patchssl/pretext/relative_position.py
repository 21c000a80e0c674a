"""Relative patch position: where does the second tile sit relative to the first?

Two tiles are taken from an image, an anchor and one of its 8 neighbours, and the network
predicts the neighbour's direction (an 8-way classification). Doersch et al. (2015) argue
that this needs an understanding of objects and their parts: a tile of a wheel lies below a
tile of a car door.

References:
    Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
    Prediction", ICCV 2015, arXiv:1505.05192.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from patchssl.pretext.base import PatchDefences, PretextTask, random_integers, random_uniform
from patchssl.pretext.heads import PatchConcatHead
from patchssl.pretext.registry import register_pretext

if TYPE_CHECKING:
    from patchssl.tiling import PatchTiler

__all__ = ["DIRECTIONS", "RelativePositionPretext"]

#: The 8 classes: ``(d_row, d_col)`` from the anchor to the neighbour, row-major around the
#: anchor (0 = up-left, 1 = up, 2 = up-right, 3 = left, 4 = right, 5 = down-left, 6 = down,
#: 7 = down-right), as in Doersch et al.'s Figure 2.
DIRECTIONS: tuple[tuple[int, int], ...] = (
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
)

_ANCHORS = ("centre", "all")


def _anchor_tables(grid: tuple[int, int], anchors: str) -> tuple[Tensor, Tensor, Tensor]:
    """Valid anchors per direction.

    Returns:
        ``(anchor_table, neighbour_table, counts)``: long tensors of shape ``(8, M)``,
        ``(8, M)`` and ``(8,)``. Row ``d`` lists (padded by repetition) the row-major indices
        of the anchors whose neighbour in direction ``d`` lies in the grid, and those
        neighbours; ``counts[d]`` how many there are.
    """
    rows, cols = grid
    if anchors == "centre":
        candidates = [(rows // 2, cols // 2)]
    else:
        candidates = [(r, c) for r in range(rows) for c in range(cols)]
    per_dir: list[list[tuple[int, int]]] = []
    for dr, dc in DIRECTIONS:
        pairs = []
        for r, c in candidates:
            nr, nc = r + dr, c + dc
            if 0 <= nr < rows and 0 <= nc < cols:
                pairs.append((r * cols + c, nr * cols + nc))
        per_dir.append(pairs)
    width = max(len(p) for p in per_dir)
    anchor = torch.zeros(8, width, dtype=torch.long)
    neighbour = torch.zeros(8, width, dtype=torch.long)
    for d, pairs in enumerate(per_dir):
        padded = [pairs[i % len(pairs)] for i in range(width)]
        anchor[d] = torch.tensor([a for a, _ in padded])
        neighbour[d] = torch.tensor([n for _, n in padded])
    counts = torch.tensor([len(p) for p in per_dir], dtype=torch.long)
    return anchor, neighbour, counts


@register_pretext("relative_position")
class RelativePositionPretext(PretextTask):
    """Predict in which of 8 directions a tile lies relative to an anchor tile.

    For each image a direction ``d`` is drawn uniformly from ``generator`` (so the 8 classes
    are balanced), then an anchor uniformly among the tiles that have a neighbour in that
    direction. The anchor and its neighbour are picked from the tiled batch with one gather,
    encoded by the shared encoder, and classified by Doersch et al.'s pair head: a layer
    shared by both tiles (``D -> hidden_dim``, ReLU), concatenation (anchor first),
    ``fc -> ReLU -> fc`` to 8 classes. Target: ``d`` (see :data:`DIRECTIONS`).

    ``anchors="centre"`` (the paper's setting, the default for grids with a central tile such
    as 3x3) always uses the central tile as anchor; ``"all"`` (the default for grids without
    one, e.g. 2x2 or 4x4) uses any tile. Only the two selected tiles are encoded.

    Shortcut defences as in the paper: the tiler's gap and jitter, per-tile normalisation
    and colour dropping (Doersch et al. drop colour channels against chromatic aberration;
    here random grayscale by default, or channel jitter).

    Args:
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        tiler: The tiler (at least 2x2); default :func:`patchssl.pretext.default_tiler`.
        anchors: ``"centre"``, ``"all"`` or None (centre when the grid has odd rows and
            columns, at least 3 each; else all).
        hidden_dim: Width of the shared per-tile layer.
        concat_dim: Width of the layer after the concatenation.
        dropout: Dropout before the last layer.
        defences: The per-tile shortcut defences: a
            :class:`~patchssl.pretext.PatchDefences`, a mapping of some of its options
            (the rest keep the defaults), or ``None`` for the defaults,
            ``PatchDefences(per_patch_norm=True, color_drop="grayscale", color_drop_prob=0.3)``.
        label_smoothing: Label smoothing of the cross-entropy.

    Shape:
        - Input: ``(B, C, H, W)`` uint8 or float, ``(H, W) == tiler.image_size``.
        - Output: :class:`~patchssl.pretext.PretextOutput` with logits ``(B, 8)`` and targets
          ``(B,)``.

    Raises:
        ValueError: A grid smaller than 2x2, ``anchors="centre"`` on a grid without a central
            tile with 8 neighbours, or an unknown ``anchors``.

    References:
        Doersch, Gupta & Efros, ICCV 2015, arXiv:1505.05192.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        tiler: PatchTiler | None = None,
        anchors: str | None = None,
        hidden_dim: int = 512,
        concat_dim: int = 1024,
        dropout: float = 0.0,
        defences: PatchDefences | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(encoder, tiler=tiler, label_smoothing=label_smoothing)
        rows, cols = self.tiler.grid
        if rows < 2 or cols < 2:
            raise ValueError(
                f"relative position needs a grid of at least 2x2 tiles (8 directions); the "
                f"tiler's grid is {rows}x{cols}"
            )
        has_centre = rows % 2 == 1 and cols % 2 == 1 and rows >= 3 and cols >= 3
        if anchors is None:
            anchors = "centre" if has_centre else "all"
        if anchors not in _ANCHORS:
            raise ValueError(f"anchors must be one of {_ANCHORS} or None; got {anchors!r}")
        if anchors == "centre" and not has_centre:
            raise ValueError(
                f"anchors='centre' needs a grid with a central tile (odd rows and columns, at "
                f"least 3x3); the grid is {rows}x{cols}: use anchors='all'"
            )
        self.anchors = anchors
        self.num_classes = len(DIRECTIONS)
        anchor_table, neighbour_table, counts = _anchor_tables((rows, cols), anchors)
        self.register_buffer("anchor_table", anchor_table, persistent=False)
        self.register_buffer("neighbour_table", neighbour_table, persistent=False)
        self.register_buffer("anchor_counts", counts, persistent=False)
        self.defences = self.build_defences(defences)
        self.head = PatchConcatHead(
            2,
            int(encoder.out_dim),
            self.num_classes,
            hidden_dim=hidden_dim,
            concat_dim=concat_dim,
            dropout=dropout,
        )
        self._head_config = {"hidden_dim": hidden_dim, "concat_dim": concat_dim, "dropout": dropout}

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild the task given the same encoder and tiler."""
        return {
            **super().config,
            "label_smoothing": self.label_smoothing,
            "anchors": self.anchors,
            **self._head_config,
            "defences": self.defences.config,
        }

    @classmethod
    def default_defences(cls) -> PatchDefences:
        """Per-tile normalisation and grayscale colour dropping with probability 0.3."""
        return PatchDefences(per_patch_norm=True, color_drop="grayscale", color_drop_prob=0.3)

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """A narrow head, for the contract test."""
        return {"hidden_dim": 16, "concat_dim": 32}

    def sample_pairs(
        self, batch: int, *, generator: torch.Generator | None = None, device: Any = None
    ) -> tuple[Tensor, Tensor]:
        """Draw a direction and an anchor per image.

        Args:
            batch: ``B``.
            generator: Source of randomness (drawn on its device, CPU by default).
            device: Where the results go (default: the task's buffers' device).

        Returns:
            ``(pairs, directions)``: long tensors of shape ``(B, 2)`` (row-major tile indices
            of the anchor and its neighbour) and ``(B,)`` (values in ``0..7``).
        """
        device = self.anchor_table.device if device is None else device
        directions = random_integers(8, (batch,), generator=generator, device=device)
        u = random_uniform((batch,), generator=generator, device=device)
        counts = self.anchor_counts.to(device)[directions]
        slot = (u * counts).long().clamp_(max=self.anchor_table.shape[1] - 1)
        slot = torch.minimum(slot, counts - 1)
        anchor = self.anchor_table.to(device)[directions, slot]
        neighbour = self.neighbour_table.to(device)[directions, slot]
        return torch.stack([anchor, neighbour], dim=1), directions

    def make_inputs(
        self, images: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Tile, pick an (anchor, neighbour) pair per image, defend.

        Args:
            images: Tensor of shape ``(B, C, H, W)``.
            generator: Source of the jitter, the pairs and colour dropping.

        Returns:
            ``(pair_tiles, targets)``: float tiles of shape ``(B, 2, C, h, w)`` (anchor first)
            and directions of shape ``(B,)``.
        """
        patches = self.tiler(images, generator=generator).patches
        batch = patches.shape[0]
        pairs, directions = self.sample_pairs(batch, generator=generator, device=images.device)
        rows = torch.arange(batch, device=images.device)[:, None]
        selected = patches[rows, pairs]  # (B, 2, C, h, w)
        return self.defences(selected, generator=generator), directions

    def compute_logits(self, inputs: Tensor) -> Tensor:
        """Encode the two tiles and classify the direction.

        Args:
            inputs: Float tiles of shape ``(B, 2, C, h, w)``.

        Returns:
            Logits of shape ``(B, 8)``.
        """
        return self.head(self._encode(inputs))
