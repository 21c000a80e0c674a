"""The jigsaw puzzle: which permutation shuffled the tiles? (the paper's pretext task).

Each image is cut into a grid of tiles (3x3 by default), the tiles are reordered by one of K
fixed permutations chosen far apart in Hamming distance, and the network predicts which one
was used (a K-way classification). To solve it the shared encoder must recognise what each
tile shows and where such content sits in an image.

References:
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016, arXiv:1603.09246.
    Chae, Zimmermann, Kim & Kim, "Attentive Transfer Learning via Self-supervised Learning
    for Cervical Dysplasia Diagnosis", JIPS 17(3), 2021 (3x3 tiles of 153 px from 512 px
    cervix images, 1,000 permutations, weight-sharing ResNet50).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from patchssl._validation import check_int, look_up
from patchssl.permutations import PermutationSet
from patchssl.pretext.base import PretextTask, random_integers
from patchssl.pretext.defences import ImageDefences, PatchDefences
from patchssl.pretext.heads import (
    PatchConcatHead,
    PermutationAssignmentHead,
    PermutationRelationHead,
    sized_from_width,
)
from patchssl.pretext.registry import register_pretext

if TYPE_CHECKING:
    from patchssl.tiling import PatchTiler

__all__ = ["JigsawPretext"]

#: The jigsaw heads: ``"relation"`` (:class:`~patchssl.pretext.PermutationRelationHead`, the
#: default: pairs of tiles scored by their offset), ``"assignment"``
#: (:class:`~patchssl.pretext.PermutationAssignmentHead`, tile-to-place scores; the default
#: before the relation head) and ``"concat"`` (:class:`~patchssl.pretext.PatchConcatHead`,
#: one output per permutation, the original context-free network's).
HEADS = ("assignment", "concat", "relation")
#: Default curriculum: permutations drawn at the first step, and steps to reach all K.
CURRICULUM_START = 64
CURRICULUM_STEPS = 200


@lru_cache(maxsize=1)
def _default_fingerprint() -> str:
    return PermutationSet.default().fingerprint


def _as_permutation_set(value: Any) -> PermutationSet:
    if value is None or (isinstance(value, str) and value == "default"):
        return PermutationSet.default()
    if isinstance(value, PermutationSet):
        return value
    if isinstance(value, (str, os.PathLike)):
        return PermutationSet.load(value)
    if isinstance(value, (Tensor, np.ndarray, list, tuple)):
        return PermutationSet(value)
    raise TypeError(
        "permutations must be a PermutationSet, None or 'default' (the shipped 1000x9 set), "
        f"the path of a saved set, or rows of shape (K, N); got {type(value).__name__}"
    )


@register_pretext("jigsaw")
class JigsawPretext(PretextTask):
    """Solve jigsaw puzzles: predict which of K permutations shuffled an image's tiles.

    For each image of the batch a permutation index ``t`` is drawn from ``generator``, the
    tiles are reordered in one gather on the device (``shuffled[b, k] =
    patches[b, perm_t[k]]``, no Python loop over the batch), every tile is encoded with the
    shared encoder, and the head scores the K permutations. The loss is cross-entropy against
    ``t``. Heads (``head``):

    * ``"relation"`` (default, :class:`~patchssl.pretext.PermutationRelationHead`): every
      ordered pair of tiles is scored over the offsets one tile can have from the other, by a
      small network shared by all pairs, and a permutation's logit is the sum of the scores of
      the offsets it implies. It never sees where a tile was shown, so it cannot answer from
      the scene's usual layout, and each puzzle trains it with ``N (N - 1)`` pairs: on
      held-out photographs it lifts the 1,000-way puzzle off chance within 300 steps where
      the other heads stay at chance (docs: Benchmarks, "Jigsaw lift-off").
    * ``"assignment"`` (:class:`~patchssl.pretext.PermutationAssignmentHead`, the default
      before the relation head): an ``N x N`` table of tile-to-place scores from the
      concatenated tiles.
    * ``"concat"`` (:class:`~patchssl.pretext.PatchConcatHead`, patchssl 0.1.0's): Noroozi &
      Favaro's context-free network as in Chae et al., a fully connected layer shared by the
      tiles, the outputs concatenated in position order, then ``fc -> ReLU -> fc`` to K
      classes.

    Defences against shortcuts (ways to solve the puzzle without learning what tiles show),
    each an option:

    * gap and random jitter between tiles, so that edges do not line up: the tiler's ``gap``
      and ``jitter`` (jitter in ``train()`` mode only; tiles are centred in ``eval()``);
    * per-tile normalisation (``defences.per_patch_norm``, off by default): each tile's
      channels standardised by the tile's own mean and standard deviation, so that
      brightness and contrast gradients across the image (vignetting, uneven illumination)
      do not give away position (Noroozi & Favaro 2016). Off by default since it also
      removes the brightness and colour that a finding changes: on the synthetic cervix
      benchmark an encoder pretrained with it transferred at chance, one pretrained without
      it reached AUC 0.62 to 0.72 (docs: Pretext tasks, Benchmarks). The encoder then sees
      its own input normalisation (ImageNet mean and standard deviation), as fine-tuning does.
      Turn it on when the puzzle itself must generalise on real photographs (in the test
      suite's photograph jigsaw it did so only with it) or when brightness is an artefact of
      the camera rather than the finding;
    * colour dropping (``defences.color_drop``): ``"grayscale"`` (default, probability 0.3
      per tile) or ``"channel_jitter"`` (each colour channel shifted by up to
      ``channel_shift`` px) or ``"both"``: against chromatic aberration, whose colour
      fringes point away from the lens centre. Training mode only.

    Args:
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        permutations: The K permutations of the N tiles. ``None`` or ``"default"``: the
            shipped 1000x9 set (:meth:`patchssl.permutations.PermutationSet.default`); also a
            :class:`PermutationSet`, the path of a saved set, or rows of shape ``(K, N)``.
            ``N`` must equal the tiler's number of patches.
        tiler: The tiler; default :func:`patchssl.pretext.default_tiler` for the encoder's
            patch size (3x3 tiles, images about 3.35 patch sides wide: 512 px for 153 px).
        head: ``"relation"``, ``"assignment"`` or ``"concat"`` (see above).
        hidden_dim: Width of the shared per-tile layer (default: from the encoder's width,
            :func:`~patchssl.pretext.heads.sized_from_width`).
        concat_dim: Width of the layer after the concatenation (``"assignment"``,
            ``"concat"``) or of the pair layer (``"relation"``); default twice ``hidden_dim``.
        dropout: Dropout before the last layer.
        curriculum: Permutations (a prefix of the set) drawn at the first training step,
            growing geometrically to all K over ``curriculum_steps`` (see
            :meth:`curriculum_size`); ``None`` draws from all K from the start.
        curriculum_steps: Training steps over which the curriculum grows to K.
        crop_scale: Random resized crop of the whole image before tiling, as ``(low, high)``
            shares of its area (:class:`~patchssl.pretext.ImageDefences`); ``None``: off.
        crop_ratio: Aspect-ratio range of that crop.
        flip: Random flips of the whole image before tiling.
        rot90: Random quarter turns of the whole image before tiling.
        defences: The per-tile shortcut defences (see above): a
            :class:`~patchssl.pretext.PatchDefences`, a mapping of some of its options
            (the rest keep the defaults), or ``None`` for the defaults,
            ``PatchDefences(per_patch_norm=False, color_drop="grayscale", color_drop_prob=0.3)``
            (patchssl 0.1.0 turned per-tile normalisation on: pass ``{"per_patch_norm": True}``).
        label_smoothing: Label smoothing of the cross-entropy.

    Shape:
        - Input: ``(B, C, H, W)`` uint8 or float, ``(H, W) == tiler.image_size``.
        - Output: :class:`~patchssl.pretext.PretextOutput` with logits ``(B, K)`` and targets
          ``(B,)`` (the index of the permutation applied to each image).

    Raises:
        ValueError: The permutations do not shuffle as many tiles as the tiler cuts, or the
            tiler's patch size differs from the encoder's.

    Example:
        >>> encoder = SharedPatchEncoder("resnet18", patch_size=64)
        >>> task = JigsawPretext(encoder, PermutationSet.generate(100, 9))   # 215 px images
        >>> images = torch.randint(0, 256, (8, 3, 215, 215), dtype=torch.uint8)
        >>> loss, logits, targets = task(images, generator=torch.Generator().manual_seed(0))

    References:
        Noroozi & Favaro, ECCV 2016, arXiv:1603.09246. Chae et al., JIPS 17(3), 2021.
    """

    def __init__(
        self,
        encoder: nn.Module,
        permutations: PermutationSet | str | Tensor | list[list[int]] | None = None,
        tiler: PatchTiler | None = None,
        *,
        head: str = "relation",
        hidden_dim: int | None = None,
        concat_dim: int | None = None,
        dropout: float = 0.0,
        curriculum: int | None = CURRICULUM_START,
        curriculum_steps: int = CURRICULUM_STEPS,
        crop_scale: tuple[float, float] | list[float] | None = None,
        crop_ratio: tuple[float, float] | list[float] = (3 / 4, 4 / 3),
        flip: bool = True,
        rot90: bool = True,
        defences: PatchDefences | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(encoder, tiler=tiler, label_smoothing=label_smoothing)
        perm_set = _as_permutation_set(permutations)
        num_patches = self.tiler.num_patches
        if perm_set.num_tiles != num_patches:
            rows, cols = self.tiler.grid
            raise ValueError(
                f"the permutation set shuffles {perm_set.num_tiles} tiles but the tiler cuts "
                f"{num_patches} patches (grid {rows}x{cols}); use "
                f"PermutationSet.generate(K, {num_patches}) or a tiler whose grid has "
                f"{perm_set.num_tiles} cells"
            )
        look_up(head, HEADS, "head")
        if curriculum is not None:
            check_int(curriculum, "curriculum (None: off; else the permutations to start with)")
        check_int(curriculum_steps, "curriculum_steps", minimum=0)
        self.permutation_set = perm_set
        self.num_classes = perm_set.num_permutations
        self.curriculum = None if curriculum is None else int(curriculum)
        self.curriculum_steps = int(curriculum_steps)
        self.register_buffer("permutations", perm_set.permutations.clone(), persistent=False)
        # Training steps taken, for the curriculum (saved, so that a resumed run goes on). The
        # count is kept as a Python int, read without waiting for the device; the buffer mirrors
        # it for the state dict (a fill queued on the device, never read back in training).
        self._steps = 0
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))
        self.image_defences = ImageDefences(
            crop_scale=crop_scale, crop_ratio=crop_ratio, flip=flip, rot90=rot90
        )
        self.defences = self.build_defences(defences)
        width = int(encoder.out_dim)
        default_hidden, default_concat = sized_from_width(width)
        hidden_dim = default_hidden if hidden_dim is None else hidden_dim
        concat_dim = default_concat if concat_dim is None else concat_dim
        self.head: nn.Module
        if head == "assignment":
            self.head = PermutationAssignmentHead(
                num_patches,
                width,
                perm_set.permutations,
                hidden_dim=hidden_dim,
                concat_dim=concat_dim,
                dropout=dropout,
            )
        elif head == "relation":
            self.head = PermutationRelationHead(
                num_patches,
                width,
                perm_set.permutations,
                self.tiler.grid,
                hidden_dim=hidden_dim,
                pair_dim=concat_dim,
                dropout=dropout,
            )
        else:
            self.head = PatchConcatHead(
                num_patches,
                width,
                self.num_classes,
                hidden_dim=hidden_dim,
                concat_dim=concat_dim,
                dropout=dropout,
            )
        self._head_config = {
            "head": head,
            "hidden_dim": hidden_dim,
            "concat_dim": concat_dim,
            "dropout": dropout,
        }

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checkpoints from before the curriculum have no step count: start it at 0.
        state_dict.setdefault(prefix + "steps_taken", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._steps = int(self.steps_taken)

    @torch.compiler.disable
    def _count_step(self) -> None:
        """One training step more: the int, and its mirror in the buffer (no host-device sync)."""
        self._steps += 1
        self.steps_taken.fill_(self._steps)

    @staticmethod
    def curriculum_size(step: int, start: int | None, steps: int, total: int) -> int:
        """How many permutations (a prefix of the set) training draws from at ``step``.

        The count grows geometrically from ``start`` to ``total`` over ``steps`` training
        steps: ``round(start * (total / start) ** (step / steps))``, then stays at ``total``.
        The prefixes of a maximal-Hamming set are themselves well spread, so each stage is a
        proper (easier) puzzle.

        Args:
            step: Training steps taken so far (>= 0).
            start: Permutations at step 0; ``None`` (no curriculum) gives ``total``.
            steps: Length of the growth in steps (0: no curriculum).
            total: ``K``, the size of the set.

        Returns:
            An int in ``[min(start, total), total]``, non-decreasing in ``step``.
        """
        if start is None or steps <= 0 or start >= total or step >= steps:
            return total
        return max(start, min(total, round(start * (total / start) ** (step / steps))))

    @property
    def active_permutations(self) -> int:
        """How many permutations training draws from now (all ``K`` in eval mode)."""
        return self._active()

    @torch.compiler.disable
    def _active(self) -> int:
        # Outside torch.compile's graph: the count reaches it as a plain value (made dynamic
        # after one recompilation) rather than as a module attribute guarded at every step.
        if not self.training:
            return self.num_classes
        return self.curriculum_size(
            self._steps, self.curriculum, self.curriculum_steps, self.num_classes
        )

    @property
    def permutation_fingerprint(self) -> str:
        """The permutation set's content hash (stored in checkpoints to catch a mismatch)."""
        return self.permutation_set.fingerprint

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able kwargs: ``"default"`` for the shipped set, else the permutation rows."""
        if self.permutation_set.fingerprint == _default_fingerprint():
            perms: str | list[list[int]] = "default"
        else:
            perms = self.permutation_set.permutations.tolist()
        return {
            **super().config,
            "label_smoothing": self.label_smoothing,
            "permutations": perms,
            **self._head_config,
            "curriculum": self.curriculum,
            "curriculum_steps": self.curriculum_steps,
            **self.image_defences.config,
            "defences": self.defences.config,
        }

    @classmethod
    def default_defences(cls) -> PatchDefences:
        """Grayscale colour dropping with probability 0.3; no per-tile normalisation."""
        return PatchDefences(per_patch_norm=False, color_drop="grayscale", color_drop_prob=0.3)

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """Ten permutations and a narrow head, for the contract test."""
        return {
            "permutations": PermutationSet.generate(10, 9, seed=0),
            "hidden_dim": 16,
            "concat_dim": 32,
        }

    def shuffle(
        self, patches: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Shuffle each image's tiles by a randomly drawn permutation of the set.

        In training the permutation is drawn from the first :attr:`active_permutations` of
        the set (all of them without a curriculum); in eval mode from all ``K``.

        Args:
            patches: Tensor of shape ``(B, N, C, h, w)``, tiles in row-major order.
            generator: Source of the permutation draws (drawn on its device, CPU by default).

        Returns:
            ``(shuffled, index)``: ``shuffled`` of shape ``(B, N, C, h, w)`` with
            ``shuffled[b, k] = patches[b, permutations[index[b], k]]``, and ``index`` a long
            tensor of shape ``(B,)`` with values in ``[0, K)``.
        """
        batch = patches.shape[0]
        index = random_integers(
            self.active_permutations, (batch,), generator=generator, device=patches.device
        )
        order = self.permutations.to(patches.device)[index]  # (B, N)
        rows = torch.arange(batch, device=patches.device)[:, None]
        return patches[rows, order], index

    def make_inputs(
        self, images: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Turn and crop the images, tile, shuffle and defend.

        Args:
            images: Tensor of shape ``(B, C, H, W)``.
            generator: Source of the crops and turns, the jitter, the permutation draws and
                colour dropping.

        Returns:
            ``(tiles, targets)``: float tiles of shape ``(B, N, C, h, w)`` in shuffled order,
            and the permutation indices, shape ``(B,)``.
        """
        images = self.image_defences(images, generator=generator)
        patches = self.tiler(images, generator=generator).patches
        shuffled, targets = self.shuffle(patches, generator=generator)
        return self.defences(shuffled, generator=generator), targets

    def compute_logits(self, inputs: Tensor) -> Tensor:
        """Encode the shuffled tiles and classify the permutation.

        Args:
            inputs: Float tiles of shape ``(B, N, C, h, w)``.

        Returns:
            Logits of shape ``(B, K)``; in training under the curriculum, the permutations
            not yet drawn get ``-inf`` (the loss is a softmax over the active prefix).
        """
        logits = self.head(self._encode(inputs))
        active = self.active_permutations
        if active < self.num_classes:  # the curriculum's puzzle: a softmax over the prefix
            logits = logits.masked_fill(
                torch.arange(self.num_classes, device=logits.device) >= active, float("-inf")
            )
        if self.training:
            self._count_step()  # one puzzle batch drawn, masked and scored
        return logits
