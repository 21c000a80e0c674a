"""patchssl: self-supervised learning on image patches for medical images with few labels.

The flagship method is jigsaw-puzzle pretraining followed by attentive transfer learning
(Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
Dysplasia Diagnosis", JIPS 2021), built from small blocks that can be used on their own.

The top level holds the blocks (tiling, permutations, encoder, attention, classifier, pretext
tasks and their registry, checkpoints) and the version. Evaluation metrics are in
:mod:`patchssl.metrics`, attention overlays and the embedding plot in :mod:`patchssl.explain`,
TorchScript/ONNX export in :mod:`patchssl.export`, frozen-feature probes in
:mod:`patchssl.probe`, data loading in :mod:`patchssl.data` and the training runs in
:mod:`patchssl.engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from patchssl._lazy import lazy_exports
from patchssl._version import __version__

# The names below are imported on first use (PEP 562), so that `import patchssl` and the
# command line's --help stay free of torch; type checkers and the API docs read them here.
if TYPE_CHECKING:
    from patchssl.attention import PatchAttention
    from patchssl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from patchssl.classifier import ClassifierOutput, PatchClassifier, TransferReport
    from patchssl.encoder import SharedPatchEncoder
    from patchssl.permutations import PermutationSet
    from patchssl.pretext import (
        JigsawPretext,
        PretextOutput,
        PretextTask,
        RelativePositionPretext,
        RotationPretext,
        create_pretext,
        list_pretexts,
        register_pretext,
    )
    from patchssl.tiling import PatchTiler, TiledPatches

_EXPORTS: dict[str, str] = {
    "CheckpointError": "patchssl.checkpoint",
    "ClassifierOutput": "patchssl.classifier",
    "JigsawPretext": "patchssl.pretext",
    "PatchAttention": "patchssl.attention",
    "PatchClassifier": "patchssl.classifier",
    "PatchTiler": "patchssl.tiling",
    "PermutationSet": "patchssl.permutations",
    "PretextOutput": "patchssl.pretext",
    "PretextTask": "patchssl.pretext",
    "RelativePositionPretext": "patchssl.pretext",
    "RotationPretext": "patchssl.pretext",
    "SharedPatchEncoder": "patchssl.encoder",
    "TiledPatches": "patchssl.tiling",
    "TransferReport": "patchssl.classifier",
    "create_pretext": "patchssl.pretext",
    "list_pretexts": "patchssl.pretext",
    "load_checkpoint": "patchssl.checkpoint",
    "register_pretext": "patchssl.pretext",
    "save_checkpoint": "patchssl.checkpoint",
}


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

__all__ = [
    "CheckpointError",
    "ClassifierOutput",
    "JigsawPretext",
    "PatchAttention",
    "PatchClassifier",
    "PatchTiler",
    "PermutationSet",
    "PretextOutput",
    "PretextTask",
    "RelativePositionPretext",
    "RotationPretext",
    "SharedPatchEncoder",
    "TiledPatches",
    "TransferReport",
    "__version__",
    "create_pretext",
    "list_pretexts",
    "load_checkpoint",
    "register_pretext",
    "save_checkpoint",
]
