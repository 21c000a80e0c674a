from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchssl.tiling import PatchTiler


def reference_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Slow, obviously correct: one slice per image and per patch."""
    out = []
    for b in range(images.shape[0]):
        row = []
        for x0, y0, x1, y1 in boxes[b].tolist():
            row.append(images[b, :, y0:y1, x0:x1])
        out.append(torch.stack(row))
    return torch.stack(out)


def test_paper_geometry_defaults():
    tiler = PatchTiler()
    assert tiler.grid == (3, 3)
    assert tiler.patch_size == (153, 153)
    assert tiler.image_size == (512, 512)
    assert tiler.num_patches == 9
    boxes = tiler.centre_boxes()
    # 170 px cells, centred 153 px patches: 17 px between neighbours.
    assert boxes[1, 0] - boxes[0, 2] == 17
    assert tiler.jitter == 8


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    patch=st.integers(2, 12),
    gap=st.integers(0, 5),
    extra=st.integers(0, 9),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    jitter=st.booleans(),
)
def test_patches_disjoint_inside_rowmajor_and_equal_to_reference(
    rows, cols, patch, gap, extra, batch, seed, jitter
):
    height = rows * patch + (rows - 1) * gap + extra
    width = cols * patch + (cols - 1) * gap + extra // 2
    tiler = PatchTiler((rows, cols), patch, (height, width), gap=gap)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    patches, boxes = tiler(images, generator=gen, jitter=jitter)
    assert patches.shape == (batch, rows * cols, 3, patch, patch)
    assert patches.dtype == torch.uint8
    # inside the image
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] >= 0).all()
    assert (boxes[..., 2] <= width).all() and (boxes[..., 3] <= height).all()
    # equal to slicing
    assert torch.equal(patches, reference_crops(images, boxes))
    # row-major: patch k sits in row k // cols, col k % cols, and neighbours keep the gap
    grid_boxes = boxes.view(batch, rows, cols, 4)
    if cols > 1:
        assert (grid_boxes[:, :, 1:, 0] - grid_boxes[:, :, :-1, 2] >= gap).all()
    if rows > 1:
        assert (grid_boxes[:, 1:, :, 1] - grid_boxes[:, :-1, :, 3] >= gap).all()
    # disjoint: painting each patch once covers exactly N * h * w pixels
    cover = torch.zeros(batch, height, width, dtype=torch.int32)
    for b in range(batch):
        for x0, y0, x1, y1 in boxes[b].tolist():
            cover[b, y0:y1, x0:x1] += 1
    assert cover.max() <= 1


def test_eval_mode_is_centred_and_deterministic():
    tiler = PatchTiler(3, 16, 64).eval()
    images = torch.rand(2, 3, 64, 64)
    a = tiler(images)
    b = tiler(images)
    assert torch.equal(a.boxes, b.boxes)
    assert torch.equal(a.boxes[0], tiler.centre_boxes())
    assert torch.equal(a.boxes[1], tiler.centre_boxes())


def test_jitter_is_seeded_and_bounded():
    tiler = PatchTiler(3, 16, 64, jitter=2).train()
    images = torch.rand(4, 3, 64, 64)
    one = tiler(images, generator=torch.Generator().manual_seed(1)).boxes
    two = tiler(images, generator=torch.Generator().manual_seed(1)).boxes
    other = tiler(images, generator=torch.Generator().manual_seed(2)).boxes
    assert torch.equal(one, two)
    assert not torch.equal(one, other)
    shift = (one - tiler.centre_boxes()).abs()
    assert shift.max() <= 2 and shift.max() > 0


def test_float_and_device(device):
    tiler = PatchTiler(2, 8, 20).to(device)
    images = torch.rand(2, 1, 20, 20, device=device)
    patches, boxes = tiler(images, generator=torch.Generator().manual_seed(0))
    assert patches.device.type == device.type and patches.dtype == torch.float32
    assert torch.equal(patches.cpu(), reference_crops(images.cpu(), boxes.cpu()))


def test_assemble_inverts_extraction():
    tiler = PatchTiler(3, 10, 36, gap=2)
    images = torch.rand(2, 3, 36, 36)
    patches, boxes = tiler(images, generator=torch.Generator().manual_seed(0))
    canvas = tiler.assemble(patches, boxes, fill=-1.0)
    covered = canvas != -1.0
    assert torch.equal(canvas[covered], images[covered])
    assert covered.sum() == 2 * 3 * 9 * 10 * 10
    again = tiler.assemble(patches)
    assert again.shape == images.shape


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(grid=(3, 3), patch_size=200, image_size=512), "need at least 600 px"),
        (dict(grid=3, patch_size=160, image_size=500, gap=11), "need at least 502 px"),
        (dict(grid=3, patch_size=153, image_size=512, jitter=9), "at most 8 px"),
        (dict(grid=0, patch_size=10, image_size=64), "grid must be positive"),
        (dict(grid=3, patch_size=10, image_size=64, gap=-1), "gap must be"),
        (dict(grid=(3, 3, 3), patch_size=10, image_size=64), "pair"),
    ],
)
def test_invalid_geometry_fails_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PatchTiler(**kwargs)


def test_wrong_input_shape_says_how_to_fix():
    tiler = PatchTiler(3, 16, 64)
    with pytest.raises(ValueError, match="unsqueeze"):
        tiler(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="Resize the images first"):
        tiler(torch.rand(1, 3, 70, 64))


def test_config_round_trip():
    tiler = PatchTiler((2, 3), (10, 12), (40, 50), gap=2, jitter=1)
    clone = PatchTiler(**tiler.config)
    assert clone.config == tiler.config
    assert torch.equal(clone.centre_boxes(), tiler.centre_boxes())


def test_image_smaller_than_grid_is_refused():
    with pytest.raises(ValueError, match="3 patches of 64 px"):
        PatchTiler(3, 64, 128)
