"""Export a :class:`~patchssl.classifier.PatchClassifier` to TorchScript or ONNX for deployment.

The exported model takes whole images ``(B, C, H, W)`` of the tiler's ``image_size`` (uint8
by default, or float in [0, 1]) and returns ``(logits (B, num_classes), weights (B, N))``. It
is the classifier in evaluation mode: patches at their centre placement, no dropout, batch
norm with running statistics. The centre crops are written as fixed slices, which both
formats handle everywhere (the training-time gather of the tiler is not needed at
inference).

ONNX goes through the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``),
which handles every timm family the encoder supports and a dynamic batch axis; it needs
``pip install "patchssl[onnx]"``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from patchssl._optional import require
from patchssl._validation import check_int
from patchssl.classifier import PatchClassifier

__all__ = ["export_onnx", "export_torchscript"]


class _Deployable(nn.Module):
    """Images -> (logits, weights), with the tiler's centre crops as fixed slices."""

    def __init__(self, classifier: PatchClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        boxes = classifier.tiler.centre_boxes(torch.device("cpu")).tolist()
        self.boxes = [tuple(int(v) for v in box) for box in boxes]  # (x0, y0, x1, y1)
        self.image_size = tuple(classifier.tiler.image_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        patches = torch.stack([images[:, :, y0:y1, x0:x1] for x0, y0, x1, y1 in self.boxes], 1)
        out = self.classifier.forward_patches(patches)
        return out.logits, out.weights


def _example(classifier: PatchClassifier, batch_size: int, dtype: torch.dtype) -> Tensor:
    device = next(classifier.parameters()).device
    h, w = classifier.tiler.image_size
    shape = (batch_size, classifier.encoder.in_chans, h, w)
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
    return torch.rand(shape, generator=gen).to(device=device, dtype=dtype)


def _check_images(classifier: PatchClassifier, images: Tensor) -> None:
    h, w = classifier.tiler.image_size
    c = classifier.encoder.in_chans
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
        raise ValueError(
            f"example images must have shape (B, {c}, {h}, {w}) (the tiler's image_size); got "
            f"{tuple(images.shape)}"
        )


def export_torchscript(
    classifier: PatchClassifier,
    path: str | os.PathLike[str],
    example_images: Tensor | None = None,
) -> Path:
    """Trace the classifier (in eval mode) to a TorchScript file.

    Args:
        classifier: The model to export; it is put in eval mode (and left there).
        path: Destination ``.pt`` file; load it with ``torch.jit.load(path)``.
        example_images: ``(B, C, H, W)`` images to trace with; their dtype (uint8 or float) is
            the dtype the exported model expects. Default: one random uint8 image.

    Returns:
        The path written. The traced module maps images ``(B, C, H, W)`` to
        ``(logits (B, num_classes), weights (B, N))``; any batch size works.
    """
    classifier.eval()
    if example_images is None:
        example_images = _example(classifier, 1, torch.uint8)
    _check_images(classifier, example_images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # Recent torch releases announce TorchScript's deprecation; it still traces and loads.
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(_Deployable(classifier).eval(), (example_images,))
    traced.save(str(path))
    return path


def export_onnx(
    classifier: PatchClassifier,
    path: str | os.PathLike[str],
    *,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    opset: int = 17,
    input_dtype: torch.dtype = torch.uint8,
) -> Path:
    """Export the classifier (in eval mode) to an ONNX file.

    The graph has one input ``images`` ``(B, C, H, W)`` and two outputs ``logits``
    ``(B, num_classes)`` and ``weights`` ``(B, N)``. Run it with onnxruntime:
    ``session.run(None, {"images": images_numpy})``.

    Args:
        classifier: The model to export; it is put in eval mode (and left there).
        path: Destination ``.onnx`` file.
        image_size: The input size; must equal the tiler's ``image_size`` (given as a check;
            default: the tiler's).
        batch_size: Batch size of the traced example (and the fixed batch size when
            ``dynamic_batch=False``).
        dynamic_batch: Make the batch axis dynamic.
        opset: ONNX opset version.
        input_dtype: ``torch.uint8`` (images 0..255, default) or a float dtype (images in
            [0, 1]).

    Returns:
        The path written.

    Raises:
        ImportError: onnx is not installed (``pip install "patchssl[onnx]"``).
        ValueError: ``image_size`` differs from the tiler's, or ``batch_size < 1``.
        TypeError: ``batch_size`` is not an int.
    """
    require("onnx", extra="onnx", feature="ONNX export")
    tiler_size = tuple(classifier.tiler.image_size)
    if image_size is not None:
        asked = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if asked != tiler_size:
            raise ValueError(
                f"image_size={asked} but the classifier's tiler was built for {tiler_size}; the "
                "exported model takes images of the tiler's size"
            )
    check_int(batch_size, "batch_size")
    classifier.eval()
    example = _example(classifier, batch_size, input_dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}, "weights": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            _Deployable(classifier).eval(),
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits", "weights"],
            dynamic_axes=axes if dynamic_batch else None,
            opset_version=opset,
            dynamo=False,
        )
    return path
