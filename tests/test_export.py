"""TorchScript and ONNX exports give the eager classifier's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchssl.classifier import PatchClassifier
from patchssl.encoder import SharedPatchEncoder
from patchssl.export import export_onnx, export_torchscript
from patchssl.tiling import PatchTiler

# Recent torch releases announce TorchScript's deprecation; loading still works.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def classifier() -> PatchClassifier:
    torch.manual_seed(0)
    encoder = SharedPatchEncoder("test_resnet", patch_size=32)
    tiler = PatchTiler(grid=(2, 3), patch_size=32, image_size=(72, 104), gap=2)
    clf = PatchClassifier(encoder, attention="sigmoid", tiler=tiler, hidden_dim=16)
    # Non-trivial BatchNorm statistics, so that eval-mode export is actually exercised.
    clf.train()
    clf(_images(4, seed=1))
    return clf.eval()


def _images(b: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 72, 104), dtype=torch.uint8, generator=gen)


def test_torchscript_matches_eager(classifier, tmp_path):
    path = export_torchscript(classifier, tmp_path / "clf.pt", _images(1))
    loaded = torch.jit.load(str(path))
    images = _images(3, seed=2)  # another batch size than the example
    with torch.no_grad():
        ref = classifier.forward_with_attention(images)
        logits, weights = loaded(images)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights, ref.weights, rtol=1e-4, atol=1e-5)
    assert not classifier.training


def test_torchscript_float_input(classifier, tmp_path):
    images = _images(2).float() / 255
    path = export_torchscript(classifier, tmp_path / "clf_float.pt", images)
    with torch.no_grad():
        logits, _ = torch.jit.load(str(path))(images)
        torch.testing.assert_close(logits, classifier(images), rtol=1e-4, atol=1e-5)


def test_onnx_matches_eager_with_a_dynamic_batch(classifier, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(classifier, tmp_path / "clf.onnx", image_size=(72, 104))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _images(3, seed=3)
    logits, weights = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = classifier.forward_with_attention(images)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights, ref.weights.numpy(), rtol=1e-4, atol=1e-5)
    assert [o.name for o in session.get_outputs()] == ["logits", "weights"]


def test_export_checks_the_image_size(classifier, tmp_path):
    with pytest.raises(ValueError, match=r"image_size=\(64, 64\) but the classifier's tiler"):
        export_onnx(classifier, tmp_path / "x.onnx", image_size=64)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int; got 0$"):
        export_onnx(classifier, tmp_path / "x.onnx", batch_size=0)
    with pytest.raises(ValueError, match=r"\(B, 3, 72, 104\)"):
        export_torchscript(classifier, tmp_path / "x.pt", torch.zeros(1, 3, 64, 64))
