"""patchssl: self-supervised learning on image patches for medical images with few labels.

The flagship method is jigsaw-puzzle pretraining followed by attentive transfer learning
(Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
Dysplasia Diagnosis", JIPS 2021), built from small blocks that can be used on their own.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
