"""patchssl: self-supervised learning on image patches for medical images with few labels.

The flagship method is jigsaw-puzzle pretraining followed by attentive transfer learning
(Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
Dysplasia Diagnosis", JIPS 2021), built from small blocks that can be used on their own.
"""

from __future__ import annotations

__version__ = "0.1.0"

from patchssl.attention import PatchAttention
from patchssl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchssl.classifier import ClassifierOutput, PatchClassifier, TransferReport
from patchssl.encoder import SharedPatchEncoder
from patchssl.explain import attention_grid, draw_attention, lesion_hit_rate, plot_embedding
from patchssl.export import export_onnx, export_torchscript
from patchssl.metrics import (
    EvaluationReport,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    clopper_pearson_ci,
    evaluate_predictions,
    format_table,
    sensitivity_at_specificity,
)
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
from patchssl.probe import (
    ProbeResult,
    compare_probes,
    knn_predict_proba,
    position_probe,
    probe_encoder,
    probe_features,
)
from patchssl.tiling import PatchTiler, TiledPatches

__all__ = [
    "CheckpointError",
    "ClassifierOutput",
    "EvaluationReport",
    "JigsawPretext",
    "PatchAttention",
    "PatchClassifier",
    "PatchTiler",
    "PermutationSet",
    "PretextOutput",
    "PretextTask",
    "ProbeResult",
    "RelativePositionPretext",
    "RotationPretext",
    "SharedPatchEncoder",
    "TiledPatches",
    "TransferReport",
    "__version__",
    "attention_grid",
    "binary_metrics",
    "bootstrap_ci",
    "choose_threshold",
    "clopper_pearson_ci",
    "compare_probes",
    "create_pretext",
    "draw_attention",
    "evaluate_predictions",
    "export_onnx",
    "export_torchscript",
    "format_table",
    "knn_predict_proba",
    "lesion_hit_rate",
    "list_pretexts",
    "load_checkpoint",
    "plot_embedding",
    "position_probe",
    "probe_encoder",
    "probe_features",
    "register_pretext",
    "save_checkpoint",
    "sensitivity_at_specificity",
]
