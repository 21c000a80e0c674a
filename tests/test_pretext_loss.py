"""Label smoothing of the pretext tasks' cross-entropy, checked through a task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from patchssl.permutations import PermutationSet
from patchssl.pretext import JigsawPretext
from patchssl.pretext.testing import tiny_encoder


def _smoothed_ce(logits: list[list[float]], targets: list[int], eps: float) -> float:
    """Cross-entropy against (1 - eps) one-hot + eps / K, written out term by term."""
    total = 0.0
    for row, target in zip(logits, targets):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        k = len(row)
        total -= sum(((1 - eps) * (j == target) + eps / k) * log_p[j] for j in range(k))
    return total / len(targets)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_compute_loss_smooths_labels_on_known_logits(eps: float) -> None:
    task = JigsawPretext(tiny_encoder(), PermutationSet.generate(4, 9, seed=0), label_smoothing=eps)
    logits = [[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, -2.0, 1.0], [1.0, 1.0, 1.0, -4.0]]
    targets = [0, 3, 2]
    loss = task.compute_loss(torch.tensor(logits), torch.tensor(targets))
    assert loss.item() == pytest.approx(_smoothed_ce(logits, targets, eps), rel=1e-6)
    expected = F.cross_entropy(torch.tensor(logits), torch.tensor(targets), label_smoothing=eps)
    torch.testing.assert_close(loss, expected)


def test_forward_loss_is_the_smoothed_cross_entropy_of_its_logits() -> None:
    torch.manual_seed(0)
    encoder = tiny_encoder()
    smooth = JigsawPretext(encoder, PermutationSet.generate(6, 9, seed=0), label_smoothing=0.3)
    plain = JigsawPretext(encoder, PermutationSet.generate(6, 9, seed=0))
    plain.load_state_dict(smooth.state_dict())
    smooth.eval()
    plain.eval()
    images = torch.randint(0, 256, (5, 3, *smooth.tiler.image_size), dtype=torch.uint8)
    out = smooth(images, generator=torch.Generator().manual_seed(1))
    ref = plain(images, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.targets, ref.targets)
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits, out.targets, label_smoothing=0.3)
    )
    torch.testing.assert_close(ref.loss, F.cross_entropy(ref.logits, ref.targets))
    assert not torch.isclose(out.loss, ref.loss)
    assert smooth.config["label_smoothing"] == 0.3
