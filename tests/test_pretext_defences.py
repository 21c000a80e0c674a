"""Image-level defences: shapes, seeded draws, what each symmetry and crop does, eval passes."""

from __future__ import annotations

import pytest
import torch

from patchssl.pretext import ImageDefences, JigsawPretext, PatchDefences
from patchssl.pretext.base import ImageDefences as ImageDefencesFromBase
from patchssl.pretext.base import PatchDefences as PatchDefencesFromBase
from patchssl.pretext.defences import ImageTransform
from patchssl.pretext.testing import tiny_encoder


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int = 6, size: int = 12, channels: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)


def reference_symmetry(image: torch.Tensor, k: int) -> torch.Tensor:
    """The documented meaning of symmetry k: rot90 by k % 4, then a width flip if k >= 4."""
    out = torch.rot90(image, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


def test_old_import_path_still_works() -> None:
    assert PatchDefencesFromBase is PatchDefences and ImageDefencesFromBase is ImageDefences


def test_shapes_dtype_and_seeded_draws(device: torch.device) -> None:
    defences = ImageDefences(crop_scale=(0.3, 1.0), flip=True, rot90=True).to(device).train()
    x = images().to(device)
    a = defences(x, generator=g(0))
    b = defences(x, generator=g(0))
    c = defences(x, generator=g(1))
    assert a.shape == x.shape and a.dtype == torch.float32 and a.device == x.device
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("flip,rot90", [(True, False), (False, True), (True, True)])
def test_each_symmetry_moves_content_as_stated(flip: bool, rot90: bool) -> None:
    defences = ImageDefences(flip=flip, rot90=rot90).train()
    x = images(batch=64)
    draws = defences.sample(64, generator=g(3))
    out = defences.apply(x, draws)
    allowed = {(True, False): {0, 2, 4, 6}, (False, True): {0, 1, 2, 3}}.get(
        (flip, rot90), set(range(8))
    )
    seen = set(draws.symmetry.tolist())
    assert seen == allowed  # every allowed symmetry is drawn, no other
    assert torch.equal(draws.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(64, 4))
    for b in range(64):
        expected = reference_symmetry(x[b].float() / 255, int(draws.symmetry[b]))
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=0)
    # Drawn from the same generator, forward gives what sample + apply gave, but exactly and
    # in the input's dtype (no resampling without a crop).
    exact = defences(x, generator=g(3))
    assert exact.dtype == torch.uint8
    for b in range(64):
        assert torch.equal(exact[b], reference_symmetry(x[b], int(draws.symmetry[b])))
    torch.testing.assert_close(exact.float() / 255, out, atol=1e-4, rtol=0)


def test_exact_symmetries_match_rot90_for_every_dtype_and_shape(device: torch.device) -> None:
    from patchssl.pretext.defences import apply_symmetries

    for shape, allowed in (((8, 2, 5, 5), range(8)), ((4, 3, 4, 6), (0, 2, 4, 6))):
        symmetry = torch.tensor(list(allowed)).to(device)
        for dtype in (torch.uint8, torch.float32):
            x = torch.randint(0, 256, (len(symmetry), *shape[1:])).to(device, dtype)
            out = apply_symmetries(x, symmetry)
            assert out.dtype == dtype and out.shape == x.shape
            for b, k in enumerate(symmetry.tolist()):
                assert torch.equal(out[b], reference_symmetry(x[b], k))
            # the module keeps the table on its device (no copy from the host in a step)
            module = ImageDefences(flip=True, rot90=True).to(device)
            assert module._symmetry_steps.device == x.device
            assert torch.equal(apply_symmetries(x, symmetry, table=module._symmetry_steps), out)


def test_crop_takes_the_stated_box() -> None:
    # Ramps are resampled exactly by bilinear interpolation: output pixel j of a crop spanning
    # [a, b] (fractions of W = 8 px) reads the input at a * 8 + (j + 0.5) * (b - a) - 0.5 px.
    coords = torch.arange(8.0) / 10
    x = torch.stack([coords.expand(8, 8), coords[:, None].expand(8, 8)])[:, None]  # x-, y-ramp
    defences = ImageDefences(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0)).train()
    boxes = torch.tensor([[0.25, 0.0, 0.75, 0.5], [0.0, 0.4, 0.5, 0.9]])  # (x0, y0, x1, y1)
    out = defences.apply(x, ImageTransform(torch.zeros(2, dtype=torch.long), boxes))
    j = torch.arange(8.0)
    torch.testing.assert_close(out[0, 0], ((1.75 + 0.5 * j) / 10).expand(8, 8))  # along x
    torch.testing.assert_close(out[1, 0], ((2.95 + 0.5 * j) / 10)[:, None].expand(8, 8))
    drawn = defences.sample(500, generator=g(0)).boxes
    area = (drawn[:, 2] - drawn[:, 0]) * (drawn[:, 3] - drawn[:, 1])
    torch.testing.assert_close(area, torch.full((500,), 0.25))
    assert float(drawn.min()) >= 0.0 and float(drawn.max()) <= 1.0
    assert drawn[:, 0].std() > 0.1  # positions vary


def test_eval_mode_and_no_options_leave_images_untouched() -> None:
    x = images()
    assert ImageDefences(crop_scale=(0.5, 1.0), flip=True, rot90=True).eval()(x) is x
    assert ImageDefences().train()(x, generator=g(0)) is x


def test_validation_and_non_square_images() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        ImageDefences(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="crop_scale"):
        ImageDefences(crop_scale=(0.8, 0.5))
    with pytest.raises(ValueError, match="crop_ratio"):
        ImageDefences(crop_ratio=(2.0, 1.0))
    x = torch.randint(0, 256, (32, 3, 8, 12), dtype=torch.uint8)
    flips = ImageDefences(flip=True).train()(x, generator=g(0))  # flips keep the shape
    assert flips.shape == x.shape
    turns = ImageDefences(rot90=True).train()  # non-square images: half turns only
    assert set(turns.sample(64, generator=g(0), square=False).symmetry.tolist()) == {0, 2}
    turned = turns(x, generator=g(0))
    assert turned.shape == x.shape
    for b in range(32):
        assert any(torch.equal(turned[b], reference_symmetry(x[b], k)) for k in (0, 2))
    with pytest.raises(ValueError, match="quarter turns need square images"):
        turns.apply(x, ImageTransform(torch.ones(32, dtype=torch.long), torch.rand(32, 4)))


def test_jigsaw_turns_images_in_training_only() -> None:
    task = JigsawPretext(tiny_encoder(16), hidden_dim=8, concat_dim=8)
    assert task.image_defences.flip and task.image_defences.rot90  # the defaults
    x = images(batch=4, size=task.tiler.image_size[0])
    task.eval()
    a = task.make_inputs(x, g(0))[0]
    task.train()
    b = task.make_inputs(x, g(0))[0]
    off = JigsawPretext(tiny_encoder(16), hidden_dim=8, concat_dim=8, flip=False, rot90=False)
    c = off.train().make_inputs(x, g(0))[0]
    assert a.shape == b.shape == c.shape
    assert not torch.allclose(b, c)  # the same draws, but turned images
