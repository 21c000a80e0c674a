from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from patchssl.explain import (
    HIGHLIGHT_COLOR,
    LESION_COLOR,
    PATCH_OUTLINE_COLOR,
    attention_grid,
    draw_attention,
    lesion_hit_rate,
    plot_embedding,
)
from patchssl.metrics import VERDICTS


def _grid_boxes(size: int = 120, rows: int = 3, patch: int = 36) -> np.ndarray:
    cell = size // rows
    off = (cell - patch) // 2
    return np.array(
        [
            [c * cell + off, r * cell + off, c * cell + off + patch, r * cell + off + patch]
            for r in range(rows)
            for c in range(rows)
        ]
    )


def _border_pixels(arr: np.ndarray, box: np.ndarray, inset: int = 0) -> list[tuple[int, ...]]:
    """Colours at the middle of the four borders of a box (x1/y1 exclusive)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    points = [(x0 + inset, cy), (x1 - 1 - inset, cy), (cx, y0 + inset), (cx, y1 - 1 - inset)]
    return [tuple(int(c) for c in arr[y, x]) for x, y in points]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["tensor_uint8", "tensor_float", "array_hwc"])
def test_overlay_outlines_exactly_the_patches_above_the_mean(seed: int, layout: str) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 200, size=(120, 120, 3), dtype=np.uint8)
    image = {
        "tensor_uint8": torch.from_numpy(pixels).permute(2, 0, 1),
        "tensor_float": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        "array_hwc": pixels,
    }[layout]
    boxes = _grid_boxes()
    weights = rng.random(9)
    out = draw_attention(image, torch.from_numpy(boxes), torch.from_numpy(weights), min_size=0)
    assert out.size == (120, 120) and out.mode == "RGB"
    arr = np.asarray(out)
    above = weights > weights.mean()
    assert 0 < above.sum() < 9
    for box, hot in zip(boxes, above):
        colours = _border_pixels(arr, box) + _border_pixels(arr, box, inset=1)
        if hot:
            assert all(c == HIGHLIGHT_COLOR for c in colours), (box, colours)
        else:
            assert all(c == PATCH_OUTLINE_COLOR for c in _border_pixels(arr, box)), box
            assert all(c != HIGHLIGHT_COLOR for c in colours), box


def test_equal_weights_outline_nothing_and_weights_are_printed() -> None:
    image = np.full((120, 120, 3), 128, dtype=np.uint8)
    boxes = _grid_boxes()
    arr = np.asarray(draw_attention(image, boxes, np.full(9, 0.5), min_size=0))
    assert not np.all(arr == HIGHLIGHT_COLOR, axis=-1).any()
    # The printed weight leaves white text on a black label in the centre of each patch.
    x0, y0, x1, y1 = boxes[4]
    centre = arr[y0:y1, x0:x1].reshape(-1, 3)
    assert (centre == 0).all(axis=1).any() and (centre == 255).all(axis=1).any()
    plain = np.asarray(
        draw_attention(image, boxes, np.full(9, 0.5), min_size=0, show_weights=False)
    )
    assert not (plain[y0:y1, x0:x1] == 0).all(axis=-1).any()


def test_lesion_box_is_drawn_and_missing_one_is_skipped() -> None:
    image = np.full((120, 120, 3), 128, dtype=np.uint8)
    boxes, weights = _grid_boxes(), np.linspace(0, 1, 9)
    arr = np.asarray(draw_attention(image, boxes, weights, lesion_box=[50, 50, 75, 75], min_size=0))
    assert tuple(arr[50, 51]) == LESION_COLOR
    none = np.asarray(draw_attention(image, boxes, weights, lesion_box=[math.nan] * 4, min_size=0))
    assert not np.all(none == LESION_COLOR, axis=-1).any()


def test_small_images_are_enlarged_and_titles_add_a_band() -> None:
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    boxes = np.array([[0, 0, 32, 32], [32, 32, 64, 64]])
    out = draw_attention(image, boxes, [0.1, 0.9])  # default min_size=256 -> factor 4
    assert out.size == (256, 256)
    assert tuple(np.asarray(out)[200, 128]) == HIGHLIGHT_COLOR  # left border of the 2nd box
    titled = draw_attention(image, boxes, [0.1, 0.9], title="y=1 p=0.90")
    assert titled.width == 256 and titled.height > 256


def test_saving_creates_files(tmp_path) -> None:
    image = torch.randint(0, 256, (3, 120, 120), dtype=torch.uint8)
    path = tmp_path / "a" / "b" / "overlay.png"
    out = draw_attention(image, _grid_boxes(), torch.rand(9), path=path)
    assert path.is_file()
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == out.size

    images = torch.randint(0, 256, (3, 3, 120, 120), dtype=torch.uint8)
    sheet_path = tmp_path / "sheet" / "grid.png"
    sheet = attention_grid(
        images,
        _grid_boxes(),
        torch.rand(3, 9),
        sheet_path,
        lesion_boxes=[[10, 10, 50, 50], [math.nan] * 4, [0, 0, 120, 120]],
        ncols=2,
        tile_size=64,
        padding=4,
    )
    assert sheet_path.is_file()
    assert sheet.size == (2 * 64 + 3 * 4, 2 * 64 + 3 * 4)


def test_bad_shapes_are_explained() -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        draw_attention(image, np.array([[0, 0, 8, 8], [8, 8, 16, 16]]), [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        draw_attention(image, np.zeros((2, 3)), [0.1, 0.2])
    with pytest.raises(ValueError, match="x1 > x0"):
        draw_attention(image, np.array([[8, 0, 0, 8]]), [0.1])
    with pytest.raises(ValueError, match="weights must be"):
        attention_grid([image, image], np.array([[0, 0, 8, 8]]), np.zeros((3, 1)), None)


@pytest.mark.parametrize("m", [5, 200])
def test_embedding_tsne_shapes_and_file(tmp_path, m: int) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(m) % 2
    features = torch.from_numpy(rng.normal(size=(m, 12)) + 3.0 * labels[:, None])
    path = tmp_path / "plots" / f"tsne_{m}.png"
    coords = plot_embedding(features, torch.from_numpy(labels), path, seed=1)
    assert coords.shape == (m, 2) and np.isfinite(coords).all()
    assert path.is_file()
    with Image.open(path) as saved:
        assert saved.format == "PNG"
    if m == 5:
        again = plot_embedding(features, labels, tmp_path / "again.png", seed=1)
        np.testing.assert_allclose(coords, again)


def test_embedding_pca_matches_numpy(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)) * np.array([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    coords = plot_embedding(x, rng.integers(0, 3, 30), tmp_path / "pca.png", method="pca")
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:2].T
    np.testing.assert_allclose(np.abs(coords), np.abs(ref), atol=1e-9)
    # One-dimensional features still give two columns.
    assert plot_embedding(x[:, :1], np.zeros(30), tmp_path / "p1.png", method="pca").shape == (
        30,
        2,
    )


def test_embedding_argument_errors(tmp_path) -> None:
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="method"):
        plot_embedding(x, np.zeros(5), tmp_path / "e.png", method="umap")
    with pytest.raises(ValueError, match="perplexity"):
        plot_embedding(x, np.zeros(5), tmp_path / "e.png", perplexity=5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        plot_embedding(x, np.zeros(4), tmp_path / "e.png")


def _intersection(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def _slow_hit_rate(boxes, weights, lesions, labels) -> dict:
    hits = count = 0
    fractions = []
    for i in range(len(labels)):
        lesion = [float(v) for v in lesions[i]]
        if labels[i] != 1 or any(math.isnan(v) for v in lesion):
            continue
        if lesion[2] <= lesion[0] or lesion[3] <= lesion[1]:
            continue
        count += 1
        ws = list(weights[i])
        tops = [k for k, v in enumerate(ws) if v == max(ws)]  # a tie shares the hit
        overlaps = [_intersection(box, lesion) > 0 for box in boxes[i]]
        hits += sum(overlaps[k] for k in tops) / len(tops)
        fractions.append(sum(overlaps) / len(overlaps))
    return {
        "hits": hits,
        "count": count,
        "hit_rate": hits / count if count else math.nan,
        "chance": sum(fractions) / count if count else math.nan,
    }


@pytest.mark.parametrize("seed", range(4))
def test_lesion_hit_rate_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b, n = 40, 9
    xy = rng.integers(0, 100, size=(b, n, 2))
    wh = rng.integers(1, 30, size=(b, n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(float)
    weights = rng.integers(0, 4, size=(b, n)) / 4.0  # ties: a tied image shares its hit
    lxy = rng.integers(0, 100, size=(b, 2))
    lesions = np.concatenate([lxy, lxy + rng.integers(0, 40, size=(b, 2))], axis=-1).astype(float)
    lesions[rng.random(b) < 0.2] = np.nan  # no recorded lesion
    labels = rng.integers(0, 2, b)
    with pytest.warns(UserWarning, match="highest attention weight shared"):
        fast = lesion_hit_rate(
            torch.from_numpy(boxes), torch.from_numpy(weights), lesions, torch.from_numpy(labels),
            per_image=True,
        )  # fmt: skip
    slow = _slow_hit_rate(boxes, weights, lesions, labels)
    assert fast["hits"] == pytest.approx(slow["hits"]) and fast["count"] == slow["count"]
    assert fast["hit_rate"] == pytest.approx(slow["hit_rate"])
    assert fast["chance"] == pytest.approx(slow["chance"])
    assert fast["n_images"] == b
    # The per-image values are those the rates average, over the counted images in order.
    each = fast["per_image"]
    assert each["counted"].sum() == fast["count"] == len(each["hit"])
    assert each["hit"].sum() == pytest.approx(slow["hits"])
    assert each["chance"].mean() == pytest.approx(slow["chance"])
    assert each["centre_patch"].mean() == pytest.approx(fast["centre_patch_rate"])
    with pytest.warns(UserWarning, match="highest attention weight shared"):
        assert "per_image" not in lesion_hit_rate(boxes, weights, lesions, labels, n_boot=0)


def test_lesion_hit_rate_shared_boxes_and_edge_cases() -> None:
    boxes = _grid_boxes()  # (9, 4) shared by every image
    weights = np.zeros((3, 9))
    weights[0, 4] = weights[1, 0] = weights[2, 4] = 1.0
    lesions = np.array([[50, 50, 70, 70], [50, 50, 70, 70], [50, 50, 70, 70]], dtype=float)
    out = lesion_hit_rate(boxes, weights, lesions, [1, 1, 0])
    assert (out["hits"], out["count"]) == (1, 2)
    assert out["hit_rate"] == 0.5
    assert out["chance"] == pytest.approx(1 / 9)
    # Touching edges (zero-area intersection) is not an overlap.
    touching = lesion_hit_rate(boxes[:1], [[1.0]], [[boxes[0][2], 0, 100, 100]], [1])
    assert touching["hits"] == 0 and touching["count"] == 1
    none = lesion_hit_rate(boxes, weights, np.full((3, 4), np.nan), [1, 1, 1], per_image=True)
    assert none["count"] == 0 and math.isnan(none["hit_rate"]) and math.isnan(none["chance"])
    assert none["per_image"]["hit"].shape == (0,) and not none["per_image"]["counted"].any()


def test_lesion_hit_rate_warns_on_tied_top_weights_and_shares_the_hit() -> None:
    boxes = _grid_boxes()  # 3 x 3, middle patch index 4
    lesion = np.array([[10, 10, 30, 30]], dtype=float)  # inside patch 0 only
    flat = np.ones((1, 9))  # a saturated gate: every weight 1.0
    with pytest.warns(UserWarning, match=r"1 of 1 counted images"):
        out = lesion_hit_rate(boxes, flat, lesion, [1], n_boot=50)
    assert out["ties"] == 1
    # Not the first maximum (patch 0, on the lesion), but the share of tied patches on it.
    assert out["hit_rate"] == pytest.approx(1 / 9) == pytest.approx(out["chance"])
    # Weights equal within the tolerance tie; a larger gap does not.
    near = np.full((1, 9), 0.5)
    near[0, 3] += 1e-9
    with pytest.warns(UserWarning):
        assert lesion_hit_rate(boxes, near, lesion, [1], n_boot=0)["ties"] == 1
    near[0, 3] += 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clear = lesion_hit_rate(boxes, near, lesion, [1], n_boot=0)
    assert clear["ties"] == 0 and clear["hit_rate"] == 0.0
    with pytest.warns(UserWarning):
        wide = lesion_hit_rate(boxes, near, lesion, [1], n_boot=0, tie_tolerance=0.1)
    assert wide["ties"] == 1


def _direct_baselines(boxes, lesions):
    """Middle patch and chance hits per image, written out patch by patch."""
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in boxes]
    mx = sum(c[0] for c in centres) / len(centres)
    my = sum(c[1] for c in centres) / len(centres)
    dist = [math.hypot(cx - mx, cy - my) for cx, cy in centres]
    middle = dist.index(min(dist))
    mid, frac = [], []
    for lesion in lesions:
        overlaps = [_intersection(box, lesion) > 0 for box in boxes]
        mid.append(float(overlaps[middle]))
        frac.append(sum(overlaps) / len(boxes))
    return middle, mid, frac


def test_lesion_hit_rate_baselines_intervals_and_selectivity() -> None:
    rng = np.random.default_rng(0)
    boxes = _grid_boxes()
    b = 30
    lxy = rng.integers(0, 120, size=(b, 2))
    lesions = np.concatenate([lxy, lxy + rng.integers(5, 60, size=(b, 2))], axis=-1).astype(float)
    weights = rng.random((b, 9))
    groups = np.repeat(np.arange(10), 3)
    out = lesion_hit_rate(boxes, weights, lesions, np.ones(b), groups=groups, n_boot=400)
    middle, mid, frac = _direct_baselines(boxes.tolist(), lesions.tolist())
    assert middle == 4 and out["centre_patch"] == 4
    assert out["centre_patch_rate"] == pytest.approx(np.mean(mid))
    assert out["chance"] == pytest.approx(np.mean(frac))
    for key in ("hit_rate", "centre_patch", "chance"):
        value = out[key if key != "centre_patch" else "centre_patch_rate"]
        lo, hi = out[f"{key}_ci"]
        assert lo <= value <= hi and lo < hi, key
    assert out["vs_centre"]["value"] == pytest.approx(out["hit_rate"] - out["centre_patch_rate"])
    assert out["vs_centre"]["verdict"] in (*VERDICTS, "undefined")
    # Selectivity, directly: mean range and mean normalised entropy of w / sum(w).
    p = weights / weights.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1) / math.log(9)
    sel = out["selectivity"]
    assert sel["weight_range"] == pytest.approx((weights.max(1) - weights.min(1)).mean())
    assert sel["weight_entropy"] == pytest.approx(entropy.mean())
    one_hot = lesion_hit_rate(boxes, np.eye(9)[[4, 4]], lesions[:2], [1, 1], n_boot=0)
    assert one_hot["selectivity"] == pytest.approx({"weight_range": 1.0, "weight_entropy": 0.0})


def test_lesion_hit_rate_all_hits_gets_an_exact_interval() -> None:
    boxes = _grid_boxes()
    lesions = np.tile([[10, 10, 30, 30]], (6, 1)).astype(float)  # patch 0 only
    weights = np.tile(np.eye(9)[0], (6, 1))  # always the lesion's patch
    groups = ["a", "a", "b", "b", "c", "c"]
    out = lesion_hit_rate(boxes, weights, lesions, np.ones(6), groups=groups, n_boot=200)
    assert out["hit_rate"] == 1.0 and out["ci_method"]["hit_rate"] == "exact"
    # Exact over the 3 patients, not the 6 images: lower bound 0.025 ** (1 / 3).
    assert out["hit_rate_ci"] == pytest.approx((0.025 ** (1 / 3), 1.0))
    assert out["centre_patch_rate"] == 0.0
    assert out["centre_patch_ci"] == pytest.approx((0.0, 1 - 0.025 ** (1 / 3)))
    # Every image beats the middle patch, but 3 patients cannot show it: 2 L - 1 < 0.
    assert out["vs_centre"]["ci"][0] == pytest.approx(2 * 0.025 ** (1 / 3) - 1)
    assert out["vs_centre"]["verdict"] == "no difference detectable at this size"
