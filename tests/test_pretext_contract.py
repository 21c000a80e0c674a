"""The contract test, run over every registered pretext task (built-ins and installed plugins)."""

from __future__ import annotations

import pytest
import torch

from patchssl.pretext import PretextTask, list_pretexts
from patchssl.pretext.testing import check_pretext_contract, tiny_encoder


@pytest.mark.parametrize("name", list_pretexts())
def test_every_registered_task_honours_the_contract(name: str, device: torch.device) -> None:
    report = check_pretext_contract(name, device=device)
    assert report["name"] == name
    assert report["num_classes"] >= 2


def test_builtins_are_covered() -> None:
    assert {"jigsaw", "rotation", "relative_position"} <= set(list_pretexts())


class _NoGradToHead(PretextTask):
    """Breaks the contract: its head is never used, so it gets no gradient."""

    def __init__(self, encoder, *, tiler=None):
        super().__init__(encoder, tiler=tiler)
        self.num_classes = 2
        self.head = torch.nn.Linear(encoder.out_dim, 2)
        self.unused = torch.nn.Linear(2, 2)

    def make_inputs(self, images, generator):
        patches = self.tiler(images, generator=generator).patches
        return patches, torch.zeros(images.shape[0], dtype=torch.long, device=images.device)

    def compute_logits(self, inputs):
        return self.head(self.encoder(inputs).mean(1))


class _SkipsValidation(_NoGradToHead):
    """Breaks the contract: resizes whatever it gets, hiding wrongly sized batches."""

    def __init__(self, encoder, *, tiler=None):
        super().__init__(encoder, tiler=tiler)
        del self.unused

    def forward(self, images, *, generator=None):
        resized = torch.nn.functional.interpolate(images.float(), size=self.tiler.image_size)
        return super().forward(resized.to(images.dtype), generator=generator)


class _ForgetsConfig(_NoGradToHead):
    """Breaks the contract: a constructor argument missing from config."""

    def __init__(self, encoder, *, tiler=None, width: int = 2):
        super().__init__(encoder, tiler=tiler)
        del self.unused
        self.head = torch.nn.Linear(encoder.out_dim, width)
        self.num_classes = width

    @classmethod
    def example_kwargs(cls):
        return {"width": 3}


@pytest.mark.parametrize(
    ("task_cls", "match"),
    [
        (_NoGradToHead, "get no gradient.*unused"),
        (_SkipsValidation, "wrong size"),
        (_ForgetsConfig, "state dict does not load"),
    ],
)
def test_the_contract_check_catches_broken_tasks(task_cls, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_pretext_contract(task_cls, batch_size=2)


def test_contract_check_accepts_an_encoder_factory() -> None:
    from patchssl.pretext import JigsawPretext

    report = check_pretext_contract(
        JigsawPretext, encoder_factory=lambda: tiny_encoder(patch_size=12, in_chans=1)
    )
    assert report["num_classes"] == 10


def test_contract_with_a_timm_encoder_rebuilt_from_its_config(device: torch.device) -> None:
    # A timm encoder has a config, so the task is rebuilt with pretext_from_config alone.
    report = check_pretext_contract(
        "rotation", encoder_factory=lambda: tiny_encoder(32, backbone="test_resnet"), device=device
    )
    assert report["num_classes"] == 4
