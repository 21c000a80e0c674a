"""patchssl: self-supervised learning on image patches for medical images with few labels.

The flagship method is jigsaw-puzzle pretraining followed by attentive transfer learning
(Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
Dysplasia Diagnosis", JIPS 2021), built from small blocks that can be used on their own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from patchssl._version import __version__

# The names below are imported on first use (PEP 562), so that `import patchssl` and the
# command line's --help stay free of torch; type checkers and the API docs read them here.
if TYPE_CHECKING:
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

_EXPORTS: dict[str, str] = {
    "CheckpointError": "patchssl.checkpoint",
    "ClassifierOutput": "patchssl.classifier",
    "EvaluationReport": "patchssl.metrics",
    "JigsawPretext": "patchssl.pretext",
    "PatchAttention": "patchssl.attention",
    "PatchClassifier": "patchssl.classifier",
    "PatchTiler": "patchssl.tiling",
    "PermutationSet": "patchssl.permutations",
    "PretextOutput": "patchssl.pretext",
    "PretextTask": "patchssl.pretext",
    "ProbeResult": "patchssl.probe",
    "RelativePositionPretext": "patchssl.pretext",
    "RotationPretext": "patchssl.pretext",
    "SharedPatchEncoder": "patchssl.encoder",
    "TiledPatches": "patchssl.tiling",
    "TransferReport": "patchssl.classifier",
    "attention_grid": "patchssl.explain",
    "binary_metrics": "patchssl.metrics",
    "bootstrap_ci": "patchssl.metrics",
    "choose_threshold": "patchssl.metrics",
    "clopper_pearson_ci": "patchssl.metrics",
    "compare_probes": "patchssl.probe",
    "create_pretext": "patchssl.pretext",
    "draw_attention": "patchssl.explain",
    "evaluate_predictions": "patchssl.metrics",
    "export_onnx": "patchssl.export",
    "export_torchscript": "patchssl.export",
    "format_table": "patchssl.metrics",
    "knn_predict_proba": "patchssl.probe",
    "lesion_hit_rate": "patchssl.explain",
    "list_pretexts": "patchssl.pretext",
    "load_checkpoint": "patchssl.checkpoint",
    "plot_embedding": "patchssl.explain",
    "position_probe": "patchssl.probe",
    "probe_encoder": "patchssl.probe",
    "probe_features": "patchssl.probe",
    "register_pretext": "patchssl.pretext",
    "save_checkpoint": "patchssl.checkpoint",
    "sensitivity_at_specificity": "patchssl.metrics",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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
