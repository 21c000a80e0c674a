from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchssl.data.manifest import CERVIX_LABEL_MAP, read_manifest
from patchssl.data.synthetic import (
    lesion_center,
    make_synthetic_cervix,
    render_cervix,
    sample_cervix_params,
)


def test_render_is_seeded_and_shaped() -> None:
    a = render_cervix(np.random.default_rng(5), 96, lesion=True)
    b = render_cervix(np.random.default_rng(5), 96, lesion=True)
    c = render_cervix(np.random.default_rng(6), 96, lesion=True)
    assert a.image.shape == (96, 96, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and a.lesion_box == b.lesion_box
    assert not np.array_equal(a.image, c.image)
    neg = render_cervix(np.random.default_rng(5), 96, lesion=False)
    assert neg.lesion_box is None and neg.lesion_mask.max() == 0


def test_lesion_box_bounds_the_whitened_area() -> None:
    rng = np.random.default_rng(0)
    params = sample_cervix_params(rng)
    with_lesion = render_cervix(np.random.default_rng(1), 128, lesion=True, params=params)
    without = render_cervix(np.random.default_rng(1), 128, lesion=False, params=params)
    x0, y0, x1, y1 = with_lesion.lesion_box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    # Same shot with and without the lesion: the lesion brightens only inside its box.
    diff = with_lesion.image.astype(int).sum(-1) - without.image.astype(int).sum(-1)
    inside = diff[y0:y1, x0:x1]
    outside = diff.copy()
    outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = 0  # 1 px: the camera blur
    assert inside.mean() > 15 and np.abs(outside).max() <= 6


def test_lesion_differs_from_specular_highlights() -> None:
    # Highlights are saturated (near 255 in all channels) and small; lesions are neither.
    with_highlights = 0
    for seed in range(5):
        out = render_cervix(np.random.default_rng(seed), 192, lesion=True)
        saturated = (out.image.min(-1) > 245).sum()
        with_highlights += saturated > 0
        lesion_px = (out.lesion_mask > 0.25).sum()
        assert lesion_px > 3 * saturated / 2, seed  # also: the lesion is there (> 0 px)
        lesion_rgb = out.image[out.lesion_mask > 0.5]
        assert lesion_rgb.size > 0 and np.median(lesion_rgb.min(-1)) < 235, seed
    assert with_highlights > 0  # the comparison is not vacuous: some shots have highlights


def test_lesions_fall_in_every_grid_cell() -> None:
    # Parameters only (no rendering): where the lesion centres of 450 patients fall on the 3x3
    # grid. Uniform cells give 1/9 each; a middle-heavy generator would fail the 0.3 bound.
    counts = np.zeros((3, 3))
    for i in range(450):
        x, y = lesion_center(sample_cervix_params(np.random.default_rng([11, i])))
        assert 0.0 < x < 1.0 and 0.0 < y < 1.0
        counts[int(3 * y), int(3 * x)] += 1
    share = counts / counts.sum()
    assert share.max() <= 0.3, share
    assert share.min() > 0.0, share
    assert share[[0, 0, 2, 2], [0, 2, 0, 2]].sum() > 0.2  # corners get about 4/9


def test_drawn_lesion_sits_around_its_centre() -> None:
    # The rendered lesion is where lesion_center says (within a fraction of a cell), in every
    # cell, corners included: it is not clipped away by the cervix rim or hidden by the blades.
    for i in range(9):
        rng = np.random.default_rng([12, i])
        params = sample_cervix_params(rng)
        out = render_cervix(rng, 96, lesion=True, params=params)
        assert out.lesion_box is not None
        ys, xs = np.nonzero(out.lesion_mask > 0.1)
        x, y = lesion_center(params)
        assert abs((xs.mean() + 0.5) / 96 - x) < 0.12 and abs((ys.mean() + 0.5) / 96 - y) < 0.12


def test_bad_size() -> None:
    with pytest.raises(ValueError, match=r"^size must be an int >= 32; got 16$"):
        render_cervix(np.random.default_rng(0), 16)


def test_dataset_files_manifest_and_reproducibility(tmp_path: Path) -> None:
    kw = dict(num_unlabeled=4, num_patients=5, images_per_patient=2, image_size=64, progress=False)
    info = make_synthetic_cervix(tmp_path / "a", seed=3, **kw)
    assert info.num_unlabeled == 4 and info.num_labeled == 10 and info.num_patients == 5
    assert sorted(p.name for p in info.unlabeled_dir.iterdir()) == [
        f"u{i:05d}.png" for i in range(4)
    ]
    with open(info.manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "image",
        "label",
        "patient",
        "visit",
        "lesion_x0",
        "lesion_y0",
        "lesion_x1",
        "lesion_y1",
    ]
    positives = {r["patient"] for r in rows if r["label"] in ("CIN2", "CIN3")}
    assert len(positives) == 2  # round(0.4 * 5), label per patient
    for r in rows:
        box = [r[f"lesion_{k}"] for k in ("x0", "y0", "x1", "y1")]
        if r["patient"] in positives:
            x0, y0, x1, y1 = map(int, box)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        else:
            assert r["label"] in ("CIN0", "CIN1") and box == ["", "", "", ""]
    with Image.open(tmp_path / "a" / rows[0]["image"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    recs = read_manifest(info.manifest, label_map=CERVIX_LABEL_MAP)
    assert sum(r.label for r in recs) == info.num_positive == 4
    meta = json.loads(info.info.read_text())
    assert meta["seed"] == 3 and meta["num_labeled"] == 10

    again = make_synthetic_cervix(tmp_path / "b", seed=3, **kw)
    for rel in ["unlabeled/u00002.png", rows[3]["image"]]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert info.manifest.read_text() == again.manifest.read_text()
    other = make_synthetic_cervix(tmp_path / "c", seed=4, **kw)
    assert (tmp_path / "a/unlabeled/u00000.png").read_bytes() != (
        other.unlabeled_dir / "u00000.png"
    ).read_bytes()


def test_images_of_one_patient_are_alike() -> None:
    # Averaged over 6 patients: a single pair can be swamped by one shot's light and speculum.
    from patchssl.data.synthetic import _shot

    same, other = [], []
    for i in range(6):
        params = sample_cervix_params(np.random.default_rng(2 * i))
        stranger = sample_cervix_params(np.random.default_rng(2 * i + 1))
        a = render_cervix(np.random.default_rng(100 + i), 64, params=params).image.astype(float)
        shot = _shot(params, np.random.default_rng(200 + i))
        b = render_cervix(np.random.default_rng(200 + i), 64, params=shot).image
        c = render_cervix(np.random.default_rng(300 + i), 64, params=stranger).image
        same.append(np.abs(a - b).mean())
        other.append(np.abs(a - c).mean())
    assert np.mean(same) < np.mean(other)


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive_fraction"):
        make_synthetic_cervix(tmp_path, positive_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match=r"^images_per_patient must be a positive int; got 0$"):
        make_synthetic_cervix(tmp_path, images_per_patient=0, progress=False)
