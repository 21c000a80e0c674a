"""The pretext registry and the base contract's checks, with a tiny encoder defined here."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from patchssl.pretext import (
    PretextOutput,
    PretextTask,
    UnknownPretextError,
    create_pretext,
    get_pretext_class,
    list_pretexts,
    register_pretext,
)
from patchssl.pretext import registry as registry_module
from patchssl.tiling import PatchTiler


class TinyEncoder(nn.Module):
    """(B, N, C, h, w) -> (B, N, D): mean colour per patch through a linear layer."""

    def __init__(self, in_chans: int = 3, patch_size: int = 8, dim: int = 4) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = (patch_size, patch_size)
        self.out_dim = dim
        self.proj = nn.Linear(in_chans, dim)

    def forward(self, patches: Tensor, *, normalized: bool = False) -> Tensor:
        x = patches.float() / 255.0 if patches.dtype == torch.uint8 else patches
        return self.proj(x.mean(dim=(-2, -1)))


class MeanTask(PretextTask):
    """Predict whether the first tile is brighter than the second (2 classes)."""

    def __init__(self, encoder: nn.Module, *, tiler: PatchTiler | None = None, width: int = 3):
        super().__init__(encoder, tiler=tiler)
        self.num_classes = 2
        self.width = width
        self.head = nn.Linear(encoder.out_dim * 2, 2)

    def make_inputs(self, images, generator):
        patches = self.tiler(images, generator=generator).patches[:, :2]
        targets = patches[:, 0].float().mean((1, 2, 3)) > patches[:, 1].float().mean((1, 2, 3))
        return patches, targets.long()

    def compute_logits(self, inputs):
        return self.head(self.encoder(inputs).flatten(1))

    @property
    def config(self):
        return {**super().config, "width": self.width}


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An isolated copy of the registry (registrations in a test do not leak)."""
    copy = dict(registry_module._REGISTRY)
    monkeypatch.setattr(registry_module, "_REGISTRY", copy)
    return copy


def test_builtins_are_registered() -> None:
    names = list_pretexts()
    assert names == sorted(names)
    for name in ("jigsaw", "rotation", "relative_position"):
        assert name in names
        assert get_pretext_class(name).name == name


def test_register_create_and_name(registry: dict) -> None:
    cls = register_pretext("mean_task")(MeanTask)
    assert cls is MeanTask and MeanTask.name == "mean_task"
    assert "mean_task" in list_pretexts()
    task = create_pretext("mean_task", encoder=TinyEncoder(), width=5)
    assert isinstance(task, MeanTask) and task.width == 5
    assert task.tiler.patch_size == (8, 8)  # default tiler built from the encoder's patch size
    images = torch.randint(0, 256, (3, 3, *task.tiler.image_size), dtype=torch.uint8)
    out = task(images, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, PretextOutput)
    assert out.logits.shape == (3, 2) and out.targets.shape == (3,)
    assert task.model_config["pretext"] == "mean_task"
    assert task.model_config["pretext_kwargs"] == {"width": 5}


def test_duplicate_name_is_an_error_unless_overwrite(registry: dict) -> None:
    register_pretext("dup_task")(MeanTask)

    class Other(MeanTask):
        pass

    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_pretext("dup_task")(Other)
    register_pretext("dup_task", overwrite=True)(Other)
    assert get_pretext_class("dup_task") is Other
    # Registering the same class twice under its name is harmless (module re-import).
    register_pretext("dup_task")(Other)


def test_register_rejects_non_tasks_and_bad_names(registry: dict) -> None:
    with pytest.raises(TypeError, match="PretextTask subclass"):
        register_pretext("not_a_task")(nn.Linear)
    for bad in ("", "1abc", "has space", "dash-name", "Jigsaw"):
        with pytest.raises(ValueError):
            register_pretext(bad)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(KeyError) as info:
        create_pretext("jigsw", encoder=TinyEncoder())
    assert isinstance(info.value, UnknownPretextError)
    message = str(info.value)
    assert message.startswith("unknown pretext 'jigsw'. Did you mean 'jigsaw'? Available: ")
    assert "'rotation'" in message and "'relative_position'" in message
    with pytest.raises(KeyError, match="unknown pretext 'zzzzzz'. Available: "):
        get_pretext_class("zzzzzz")


def _task() -> MeanTask:
    return MeanTask(TinyEncoder(), tiler=PatchTiler(grid=2, patch_size=8, image_size=20))


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.zeros(3, 20, 20, dtype=torch.uint8), ValueError, r"\(B, C, H, W\).*unsqueeze"),
        (torch.zeros(1, 3, 20, 20, dtype=torch.int32), TypeError, "uint8.*floating"),
        (torch.zeros(1, 1, 20, 20), ValueError, "3 channel.*in_chans=1"),
        (torch.zeros(1, 20, 20, 3), ValueError, "channels-last"),
        (torch.zeros(1, 3, 24, 20), ValueError, "20x20.*24x20.*image_size"),
        (torch.zeros(0, 3, 20, 20), ValueError, "empty batch"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_forward_validates_images(images, error, match) -> None:
    with pytest.raises(error, match=match):
        _task()(images)


def test_forward_checks_device() -> None:
    images = torch.zeros(1, 3, 20, 20, device="meta")
    with pytest.raises(RuntimeError, match="images are on meta but the task is on cpu"):
        _task()(images)


def test_float_and_uint8_images_are_accepted() -> None:
    task = _task().eval()
    u8 = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    out_u8 = task(u8, generator=torch.Generator().manual_seed(1))
    out_f = task(u8.float() / 255, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out_u8.logits, out_f.logits, atol=1e-5, rtol=1e-5)


class BrokenTask(MeanTask):
    def __init__(self, encoder, *, tiler=None, fault: str = "int_targets"):
        super().__init__(encoder, tiler=tiler)
        self.fault = fault

    def make_inputs(self, images, generator):
        patches, targets = super().make_inputs(images, generator)
        if self.fault == "int_targets":
            targets = targets.int()
        if self.fault == "targets_batch":
            targets = targets[:1]
        return patches, targets

    def compute_logits(self, inputs):
        logits = super().compute_logits(inputs)
        return logits[:, :1] if self.fault == "logits_classes" else logits

    def compute_loss(self, logits, targets):
        if self.fault == "loss_shape":
            return torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return super().compute_loss(logits, targets)


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        ("int_targets", "long targets; got torch.int32"),
        ("logits_classes", r"logits of shape \(2, 2\).*got \(2, 1\)"),
        ("loss_shape", r"scalar tensor; got \(2,\)"),
    ],
)
def test_forward_checks_what_the_subclass_returns(fault: str, match: str) -> None:
    task = BrokenTask(TinyEncoder(), tiler=PatchTiler(grid=2, patch_size=8, image_size=20))
    task.fault = fault
    with pytest.raises((TypeError, ValueError), match=match):
        task(torch.zeros(2, 3, 20, 20))


def test_targets_batch_mismatch_is_reported() -> None:
    task = BrokenTask(TinyEncoder(), tiler=PatchTiler(grid=2, patch_size=8, image_size=20))
    task.fault = "targets_batch"
    with pytest.raises(ValueError, match=r"targets of shape \(B, \.\.\.\) with B = 2; got \(1,\)"):
        task(torch.zeros(2, 3, 20, 20))


def test_encoder_without_patch_size_needs_a_tiler() -> None:
    encoder = TinyEncoder()
    del encoder.patch_size
    with pytest.raises(ValueError, match="pass tiler=PatchTiler"):
        MeanTask(encoder)
    with pytest.raises(TypeError, match="nn.Module"):
        MeanTask("resnet50")  # type: ignore[arg-type]


def test_accuracy_and_predict_do_not_track_gradients() -> None:
    task = _task().eval()
    images = torch.rand(4, 3, 20, 20)
    out = task.predict(images, generator=torch.Generator().manual_seed(0))
    assert not out.loss.requires_grad
    acc = task.accuracy(images, generator=torch.Generator().manual_seed(0))
    expected = (out.logits.argmax(-1) == out.targets).float().mean().item()
    assert acc == pytest.approx(expected)
    assert task.chance == 0.5
