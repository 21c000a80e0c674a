"""Pretext tasks: the plugin contract, the registry, and the built-in tasks.

Every task, built-in or from a third-party package, is found, built and trained the same way::

    from patchssl.pretext import create_pretext, list_pretexts

    list_pretexts()                      # ['jigsaw', 'relative_position', 'rotation', ...]
    task = create_pretext("jigsaw", encoder=encoder)
    loss, logits, targets = task(images, generator=generator)

Built-in tasks:

* ``"jigsaw"`` (:class:`JigsawPretext`): which permutation shuffled the tiles
  (Noroozi & Favaro 2016; Chae et al. 2021).
* ``"rotation"`` (:class:`RotationPretext`): by how much the image was turned
  (Gidaris, Singh & Komodakis 2018).
* ``"relative_position"`` (:class:`RelativePositionPretext`): where a tile sits relative to
  its neighbour (Doersch, Gupta & Efros 2015).
* ``"tile_contrast"`` (:class:`TileContrastPretext`): which view of the batch was cut from
  the same tile (SimCLR's NT-Xent between tiles; Chen et al. 2020).
* ``"image_contrast"`` (:class:`ImageContrastPretext`): which image of the batch another view
  (crop, then tiles pooled) was cut from (SimCLR's NT-Xent between images of patches).

Write your own by subclassing :class:`PretextTask`; see ``docs/pretext_tasks.md``.
"""

from __future__ import annotations

from patchssl.pretext.base import PretextOutput, PretextTask, default_tiler
from patchssl.pretext.contrast import ImageContrastPretext, TileContrastPretext
from patchssl.pretext.defences import ImageDefences, PatchDefences
from patchssl.pretext.heads import (
    PatchConcatHead,
    PermutationAssignmentHead,
    PermutationRelationHead,
    PooledPatchHead,
)
from patchssl.pretext.jigsaw import JigsawPretext
from patchssl.pretext.registry import (
    ENTRY_POINT_GROUP,
    PretextPluginError,
    UnknownPretextError,
    create_pretext,
    get_pretext_class,
    list_pretexts,
    pretext_from_config,
    register_pretext,
)
from patchssl.pretext.relative_position import DIRECTIONS, RelativePositionPretext
from patchssl.pretext.rotation import RotationPretext

__all__ = [
    "DIRECTIONS",
    "ENTRY_POINT_GROUP",
    "ImageContrastPretext",
    "ImageDefences",
    "JigsawPretext",
    "PatchConcatHead",
    "PatchDefences",
    "PermutationAssignmentHead",
    "PermutationRelationHead",
    "PooledPatchHead",
    "PretextOutput",
    "PretextPluginError",
    "PretextTask",
    "RelativePositionPretext",
    "RotationPretext",
    "TileContrastPretext",
    "UnknownPretextError",
    "create_pretext",
    "default_tiler",
    "get_pretext_class",
    "list_pretexts",
    "pretext_from_config",
    "register_pretext",
]
