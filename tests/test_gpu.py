"""The training engine on a CUDA GPU: mixed precision, channels_last, portable checkpoints.

Skipped unless pytest runs with ``--device cuda`` on a machine with a GPU (see conftest.py);
the same code paths on the CPU are covered by the other engine tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from patchssl import JigsawPretext, PatchClassifier, PatchTiler, PermutationSet, SharedPatchEncoder
from patchssl.checkpoint import load_checkpoint
from patchssl.engine import evaluate, finetune, pretrain
from patchssl.engine.testing import make_tiny_dataset, tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), num_unlabeled=16, num_patients=12)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_engine_trains_with_mixed_precision_and_checkpoints_load_on_the_cpu(
    data, tmp_path, device, amp
):
    config = tiny_config(data, tmp_path / "pre", epochs=1)
    config.train.device = str(device)
    config.train.amp = amp
    config.model.channels_last = True
    pre = pretrain(config)
    assert all(math.isfinite(r["train_loss"]) for r in pre.history)

    ckpt = load_checkpoint(pre.best_checkpoint)  # map_location="cpu": no GPU needed to read it
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    clf = PatchClassifier.from_pretrained(pre.best_checkpoint)  # rebuilt on the CPU
    assert clf.transfer_report.loaded > 0

    ft_config = tiny_config(data, tmp_path / "ft", epochs=1)
    ft_config.train.device = str(device)
    ft_config.train.amp = amp
    ft_config.model.init = str(pre.best_checkpoint)
    ft = finetune(ft_config)
    assert all(math.isfinite(r["train_loss"]) for r in ft.history)
    auc = evaluate(ft_config).test.metrics["auc"]
    assert 0.0 <= auc <= 1.0  # defined: the grouped split puts both classes in the test part


def test_bf16_jigsaw_step_matches_fp32(device):
    torch.manual_seed(0)
    encoder = SharedPatchEncoder("resnet18", patch_size=32, channels_last=True)
    task = JigsawPretext(encoder, PermutationSet.generate(16, seed=0), PatchTiler(3, 32, 112))
    task = task.to(device).eval()  # no dropout: two passes see the same network
    images = torch.randint(0, 256, (8, 3, 112, 112), dtype=torch.uint8, device=device)
    losses = []
    for dtype in (None, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)  # same tiles and permutations in both passes
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = task(images, generator=gen)
        assert out.logits.shape == (8, 16)
        losses.append(out.loss.float().item())
    assert all(math.isfinite(v) for v in losses)
    # bf16 keeps about 3 significant digits: the two losses agree to a few percent.
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_a_pretraining_step_never_waits_for_the_device(device, generator_device):
    # torch raises on any host-device synchronisation while the debug mode is "error".
    encoder = SharedPatchEncoder("resnet18", patch_size=32, channels_last=True)
    task = JigsawPretext(encoder, PermutationSet.generate(100, seed=0), PatchTiler(3, 32, 112))
    task = task.to(device).train()
    images = torch.randint(0, 256, (8, 3, 112, 112), dtype=torch.uint8, device=device)
    gen = torch.Generator(device=generator_device).manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        task(images, generator=gen).loss.backward()  # warm-up (cuDNN, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = task(images, generator=gen).loss
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(task.steps_taken) == 4
