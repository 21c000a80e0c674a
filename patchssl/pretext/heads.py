"""Heads that turn per-patch features into pretext predictions.

Three shapes of head cover the built-in tasks:

* :class:`PatchConcatHead`, the head of the context-free network of Noroozi & Favaro (2016)
  and of the pair network of Doersch et al. (2015): one fully connected layer shared by
  every patch, the patch outputs concatenated in position order (so the head knows which
  feature came from which position), then two fully connected layers to the classes.
* :class:`PooledPatchHead`: the same shared per-patch layer, then an average over the
  patches (so the arrangement of the patches cannot matter), then a classifier.
* :class:`PermutationAssignmentHead`, the jigsaw's default: the context-free network's
  per-tile layer and concatenation, then an ``N x N`` table of scores (how well each tile
  fits each place), and a permutation's logit is the sum of the ``N`` scores it picks. The
  K-way classification is kept, but every puzzle trains every score, so the head learns from
  the first steps even at K = 1,000, and its size does not grow with K.

References:
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016, arXiv:1603.09246.
    Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
    Prediction", ICCV 2015, arXiv:1505.05192.
    Chae, Zimmermann, Kim & Kim, "Attentive Transfer Learning via Self-supervised Learning
    for Cervical Dysplasia Diagnosis", JIPS 17(3), 2021.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from patchssl._validation import check_int

__all__ = [
    "PatchConcatHead",
    "PermutationAssignmentHead",
    "PermutationRelationHead",
    "PooledPatchHead",
    "sized_from_width",
]


def sized_from_width(in_dim: int) -> tuple[int, int]:
    """Default widths of a jigsaw head for an encoder of width ``in_dim``.

    Noroozi & Favaro map each tile's 2,304 pooled AlexNet features to 1,024 (about
    ``D / 2``); with ResNet widths (512 to 2,048) a quarter keeps the head a small share of the
    step. The layer after the concatenation is twice the per-tile width.

    Args:
        in_dim: ``D``, the encoder's feature width.

    Returns:
        ``(hidden_dim, concat_dim)``: ``max(64, D // 4)`` and twice that (128 and 256 for a
        ResNet18, 512 and 1,024 for a ResNet50).
    """
    hidden = max(64, int(in_dim) // 4)
    return hidden, 2 * hidden


def _permutation_head_sizes(
    num_patches: int,
    in_dim: int,
    hidden_dim: int | None,
    second_dim: int | None,
    second_name: str,
    dropout: float,
) -> tuple[int, int]:
    """Checked ``(hidden_dim, second_dim)`` of a permutation head, defaults from the width."""
    default_hidden, default_second = sized_from_width(in_dim)
    hidden = default_hidden if hidden_dim is None else hidden_dim
    second = default_second if second_dim is None else second_dim
    for what, value in (
        ("num_patches", num_patches),
        ("in_dim", in_dim),
        ("hidden_dim", hidden),
        (second_name, second),
    ):
        check_int(value, what)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    return hidden, second


def _permutation_rows(permutations: Tensor, num_patches: int) -> Tensor:
    """``permutations`` as a long ``(K, N)`` tensor, or a ValueError naming the shape wanted."""
    perms = torch.as_tensor(permutations, dtype=torch.long)
    if perms.ndim != 2 or perms.shape[1] != num_patches:
        raise ValueError(
            f"permutations must have shape (K, {num_patches}); got {tuple(perms.shape)}"
        )
    return perms


def _check_features(features: Tensor, num_patches: int, head: str) -> None:
    if features.ndim != 3 or features.shape[1] != num_patches:
        raise ValueError(
            f"{head} expects features of shape (B, {num_patches}, D); got {tuple(features.shape)}"
        )


class PatchConcatHead(nn.Module):
    """Shared per-patch layer, concatenation in position order, two-layer classifier.

    ``(B, N, D) -> Linear(D, hidden) + ReLU per patch -> (B, N * hidden)
    -> Linear(N * hidden, concat) + ReLU + Dropout -> Linear(concat, num_classes)``.

    Args:
        num_patches: ``N``, the number of patches per sample.
        in_dim: ``D``, the encoder's feature width.
        num_classes: Number of outputs.
        hidden_dim: Width of the shared per-patch layer.
        concat_dim: Width of the layer after the concatenation.
        dropout: Dropout probability before the last layer.

    Shape:
        - Input: ``(B, N, D)``.
        - Output: ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_patches: int,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 512,
        concat_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for what, value in (
            ("num_patches", num_patches),
            ("in_dim", in_dim),
            ("num_classes", num_classes),
            ("hidden_dim", hidden_dim),
            ("concat_dim", concat_dim),
        ):
            check_int(value, what)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.num_patches = int(num_patches)
        self.per_patch = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(num_patches * hidden_dim, concat_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(concat_dim, num_classes),
        )

    def forward(self, features: Tensor) -> Tensor:
        """Classify a set of patch features kept in position order.

        Args:
            features: Tensor of shape ``(B, N, D)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        _check_features(features, self.num_patches, "PatchConcatHead")
        return self.classifier(self.per_patch(features).flatten(1))


class PooledPatchHead(nn.Module):
    """Shared per-patch layer, average over the patches, linear classifier.

    ``(B, N, D) -> Linear(D, hidden) + ReLU per patch -> mean over N -> Linear(hidden, classes)``.
    The average makes the prediction independent of where each patch sits.

    Args:
        in_dim: ``D``, the encoder's feature width.
        num_classes: Number of outputs.
        hidden_dim: Width of the shared per-patch layer.

    Shape:
        - Input: ``(B, N, D)``.
        - Output: ``(B, num_classes)``.
    """

    def __init__(self, in_dim: int, num_classes: int, *, hidden_dim: int = 512) -> None:
        super().__init__()
        for what, value in (
            ("in_dim", in_dim),
            ("num_classes", num_classes),
            ("hidden_dim", hidden_dim),
        ):
            check_int(value, what)
        self.per_patch = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """Classify a set of patch features, ignoring their order.

        Args:
            features: Tensor of shape ``(B, N, D)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        if features.ndim != 3:
            raise ValueError(
                f"PooledPatchHead expects features of shape (B, N, D); got {tuple(features.shape)}"
            )
        return self.classifier(self.per_patch(features).mean(dim=1))


class PermutationAssignmentHead(nn.Module):
    """Jigsaw head that scores each permutation as a sum of tile-to-place scores.

    ``(B, N, D) -> Linear(D, hidden) + ReLU per tile -> (B, N * hidden)
    -> Linear(N * hidden, concat) + ReLU + Dropout -> Linear(concat, N * N) -> S (B, N, N)``,
    where ``S[b, k, j]`` scores "the tile shown at position ``k`` is source tile ``j``", and
    ``logits[b, t] = sum_k S[b, k, perms[t, k]]`` for each of the K permutations (one matrix
    product with the permutations' one-hot codes). Subtracting a constant from a row of ``S``
    shifts every logit alike, so the softmax over the K permutations is a product of ``N``
    per-position tile classifiers restricted to the permutation set.

    Unlike :class:`PatchConcatHead`, whose last layer has one weight vector per permutation
    (each trained only by the puzzles that used it, ~1/K of them), every puzzle trains every
    weight here, and the parameter count does not depend on K.

    Args:
        num_patches: ``N``, the number of tiles per image.
        in_dim: ``D``, the encoder's feature width.
        permutations: Long tensor of shape ``(K, N)``; ``perms[t, k]`` is the source tile at
            position ``k`` under permutation ``t``.
        hidden_dim: Width of the shared per-tile layer (default from :func:`sized_from_width`).
        concat_dim: Width of the layer after the concatenation (default: from
            :func:`sized_from_width`).
        dropout: Dropout probability before the last layer.

    Shape:
        - Input: ``(B, N, D)``, tiles in the (shuffled) order shown.
        - Output: ``(B, K)``.

    References:
        Noroozi & Favaro, ECCV 2016, arXiv:1603.09246 (per-tile layer, concatenation, K-way
        classification over a maximal-Hamming permutation set).
    """

    def __init__(
        self,
        num_patches: int,
        in_dim: int,
        permutations: Tensor,
        *,
        hidden_dim: int | None = None,
        concat_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_dim, concat_dim = _permutation_head_sizes(
            num_patches, in_dim, hidden_dim, concat_dim, "concat_dim", dropout
        )
        perms = _permutation_rows(permutations, num_patches)
        n = int(num_patches)
        self.num_patches = n
        self.num_classes = int(perms.shape[0])
        self.per_patch = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(n * hidden_dim, concat_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(concat_dim, n * n),
        )
        # codes[t, k * N + j] = 1 where permutation t puts source tile j at position k.
        codes = torch.zeros(perms.shape[0], n * n)
        codes.scatter_(1, torch.arange(n) * n + perms, 1.0)
        self.register_buffer("codes", codes, persistent=False)

    def scores(self, features: Tensor) -> Tensor:
        """Tile-to-place scores.

        Args:
            features: Tensor of shape ``(B, N, D)``.

        Returns:
            Tensor of shape ``(B, N, N)``: ``[b, k, j]`` scores source tile ``j`` at position
            ``k``.
        """
        _check_features(features, self.num_patches, "PermutationAssignmentHead")
        out = self.classifier(self.per_patch(features).flatten(1))
        return out.view(-1, self.num_patches, self.num_patches)

    def forward(self, features: Tensor) -> Tensor:
        """Score every permutation of the set.

        Args:
            features: Tensor of shape ``(B, N, D)``, tiles in the order shown.

        Returns:
            Logits of shape ``(B, K)``.
        """
        flat = self.scores(features).flatten(1)
        return flat @ self.codes.to(flat.dtype).t()


def _offset_codes(permutations: Tensor, grid: tuple[int, int]) -> tuple[Tensor, int]:
    """One-hot codes of the relative offsets each permutation implies between shown tiles.

    Returns ``(codes, num_offsets)``: ``codes`` of shape ``(K, N * N * O)`` with a one at
    ``(k * N + l) * O + o`` where, under permutation ``t``, the tile shown at ``l`` sits at
    offset ``o`` from the tile shown at ``k`` in the original image (``k != l``), and ``O``
    the number of non-zero offsets ``(dy, dx)`` a ``rows x cols`` grid allows.
    """
    rows, cols = grid
    n = rows * cols
    width = 2 * cols - 1
    num_offsets = (2 * rows - 1) * width - 1
    centre = (rows - 1) * width + (cols - 1)  # the zero offset, left out of the classes
    y, x = permutations // cols, permutations % cols  # (K, N) true place of each shown tile
    dy = y[:, None, :] - y[:, :, None]  # (K, N, N): place of shown l minus place of shown k
    dx = x[:, None, :] - x[:, :, None]
    flat = (dy + rows - 1) * width + (dx + cols - 1)
    offset = torch.where(flat > centre, flat - 1, flat)  # skip the zero offset
    pair = torch.arange(n * n).view(n, n)
    index = (pair * num_offsets)[None] + offset  # (K, N, N)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    codes = torch.zeros(permutations.shape[0], n * n * num_offsets)
    rows_k = torch.arange(permutations.shape[0])[:, None]
    codes[rows_k, index[:, off_diagonal]] = 1.0
    return codes, num_offsets


class PermutationRelationHead(nn.Module):
    """Jigsaw head that scores each permutation by how its tiles sit relative to each other.

    Every ordered pair of shown tiles ``(k, l)`` gets scores over the offsets ``(dy, dx)``
    one tile can have from another in the grid (24 for 3 x 3), from one small network shared
    by all pairs: ``h = ReLU(Linear(D, hidden))`` per tile, ``u_kl = ReLU(A h_k + B h_l + c)``,
    ``R[k, l] = Linear(pair, O)(u_kl)``; a permutation's logit is the sum over the
    ``N (N - 1)`` pairs of the score of the offset it implies (one matrix product with the
    permutations' one-hot offset codes). The head never sees where a tile was shown, only what
    two tiles show, so it cannot answer from a tile's absolute place in the frame (the layout
    of the scene): it must learn which content lies above, below or beside which, and the
    pair network is trained by 72 pairs per puzzle (Doersch et al. 2015's relative-position
    task, summed into the K-way jigsaw).

    Args:
        num_patches: ``N``, the number of tiles per image (``rows * cols``).
        in_dim: ``D``, the encoder's feature width.
        permutations: Long tensor of shape ``(K, N)``; ``perms[t, k]`` is the source tile at
            position ``k`` under permutation ``t`` (source tiles in row-major order).
        grid: ``(rows, cols)`` of the tiling (an int for a square grid).
        hidden_dim: Width of the shared per-tile layer (default from :func:`sized_from_width`).
        pair_dim: Width of the pair layer (default: twice ``hidden_dim``).
        dropout: Dropout probability before the last layer.

    Shape:
        - Input: ``(B, N, D)``, tiles in the (shuffled) order shown.
        - Output: ``(B, K)``.

    References:
        Doersch, Gupta & Efros, ICCV 2015, arXiv:1505.05192 (relative position of two
        patches). Noroozi & Favaro, ECCV 2016, arXiv:1603.09246 (the K-way jigsaw).
    """

    def __init__(
        self,
        num_patches: int,
        in_dim: int,
        permutations: Tensor,
        grid: int | tuple[int, int],
        *,
        hidden_dim: int | None = None,
        pair_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_dim, pair_dim = _permutation_head_sizes(
            num_patches, in_dim, hidden_dim, pair_dim, "pair_dim", dropout
        )
        rows, cols = (grid, grid) if isinstance(grid, int) else (int(v) for v in grid)
        if rows * cols != num_patches:
            raise ValueError(
                f"grid {rows}x{cols} has {rows * cols} cells but num_patches is {num_patches}; "
                "pass the tiler's grid (tiler.grid)"
            )
        perms = _permutation_rows(permutations, num_patches)
        self.num_patches = int(num_patches)
        self.num_classes = int(perms.shape[0])
        self.grid = (rows, cols)
        codes, self.num_offsets = _offset_codes(perms, self.grid)
        self.per_patch = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True))
        self.first = nn.Linear(hidden_dim, pair_dim)  # A h_k + c
        self.second = nn.Linear(hidden_dim, pair_dim, bias=False)  # B h_l
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(pair_dim, self.num_offsets))
        self.register_buffer("codes", codes, persistent=False)

    def scores(self, features: Tensor) -> Tensor:
        """Pair-to-offset scores.

        Args:
            features: Tensor of shape ``(B, N, D)``.

        Returns:
            Tensor of shape ``(B, N, N, O)``: ``[b, k, l, o]`` scores "the tile shown at
            ``l`` lies at offset ``o`` from the tile shown at ``k``" (the diagonal is unused).
        """
        _check_features(features, self.num_patches, "PermutationRelationHead")
        h = self.per_patch(features)
        pair = torch.relu(self.first(h)[:, :, None] + self.second(h)[:, None, :])
        return self.out(pair)

    def forward(self, features: Tensor) -> Tensor:
        """Score every permutation of the set.

        Args:
            features: Tensor of shape ``(B, N, D)``, tiles in the order shown.

        Returns:
            Logits of shape ``(B, K)``, float32 whatever the autocast precision: a logit sums
            ``N (N - 1)`` scores (72 for 3 x 3), more than bfloat16's 8-bit mantissa keeps.
        """
        flat = self.scores(features).flatten(1).float()
        with torch.autocast(device_type=flat.device.type, enabled=False):
            return flat @ self.codes.t()
