"""Heads that turn per-patch features into pretext predictions.

Two shapes of head cover the built-in tasks:

* :class:`PatchConcatHead`, the head of the context-free network of Noroozi & Favaro (2016)
  and of the pair network of Doersch et al. (2015): one fully connected layer shared by
  every patch, the patch outputs concatenated in position order (so the head knows which
  feature came from which position), then two fully connected layers to the classes.
* :class:`PooledPatchHead`: the same shared per-patch layer, then an average over the
  patches (so the arrangement of the patches cannot matter), then a classifier.

References:
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016, arXiv:1603.09246.
    Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
    Prediction", ICCV 2015, arXiv:1505.05192.
    Chae, Zimmermann, Kim & Kim, "Attentive Transfer Learning via Self-supervised Learning
    for Cervical Dysplasia Diagnosis", JIPS 17(3), 2021.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PatchConcatHead", "PooledPatchHead"]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")


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
        _check_positive(
            num_patches=num_patches,
            in_dim=in_dim,
            num_classes=num_classes,
            hidden_dim=hidden_dim,
            concat_dim=concat_dim,
        )
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
        if features.ndim != 3 or features.shape[1] != self.num_patches:
            raise ValueError(
                f"PatchConcatHead expects features of shape (B, {self.num_patches}, D); got "
                f"{tuple(features.shape)}"
            )
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
        _check_positive(in_dim=in_dim, num_classes=num_classes, hidden_dim=hidden_dim)
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
