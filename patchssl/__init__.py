"""patchssl: self-supervised learning on image patches for medical images with few labels.

The flagship method is jigsaw-puzzle pretraining followed by attentive transfer learning
(Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
Dysplasia Diagnosis", JIPS 2021), built from small blocks that can be used on their own.
"""

from __future__ import annotations

__version__ = "0.1.0"

from patchssl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchssl.explain import attention_grid, draw_attention, lesion_hit_rate, plot_embedding
from patchssl.metrics import (
    EvaluationReport,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    evaluate_predictions,
    format_table,
    sensitivity_at_specificity,
)
from patchssl.permutations import PermutationSet
from patchssl.tiling import PatchTiler, TiledPatches

__all__ = [
    "CheckpointError",
    "EvaluationReport",
    "PatchTiler",
    "PermutationSet",
    "TiledPatches",
    "__version__",
    "attention_grid",
    "binary_metrics",
    "bootstrap_ci",
    "choose_threshold",
    "draw_attention",
    "evaluate_predictions",
    "format_table",
    "lesion_hit_rate",
    "load_checkpoint",
    "plot_embedding",
    "save_checkpoint",
    "sensitivity_at_specificity",
]
