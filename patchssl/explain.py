"""Explanations: per-patch attention drawn on the image, feature embeddings, lesion hit rate.

Reproduces the two panels of the paper's Fig. 4:

* :func:`draw_attention` (Fig. 4b) draws every patch's attention weight onto the image and outlines
  the patches whose weight is above the mean weight of the image; :func:`attention_grid` lays
  several such overlays out on one contact sheet.
* :func:`plot_embedding` (Fig. 4a) is a 2-D t-SNE (or PCA) map of the features the classifier's
  last layer sees (``ClassifierOutput.features``), coloured by label.

:func:`lesion_hit_rate` scores whether the attention finds a lesion whose box is known: the share
of positive images whose highest-weight patch overlaps the lesion, next to the rate expected if
the top patch were picked at random.

The overlays use Pillow only; the embedding plot needs matplotlib
(a dependency of patchssl), used through its object-oriented API on an Agg canvas so that no
global matplotlib state (``pyplot``, the backend, rcParams) is touched.

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." Journal of Information Processing Systems 17(3), 2021, Fig. 4.

    van der Maaten, Hinton. "Visualizing Data using t-SNE." JMLR 9, 2008.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from patchssl.metrics import _mean_ci, _verdict, clopper_pearson_ci

__all__ = [
    "HIGHLIGHT_COLOR",
    "LESION_COLOR",
    "PATCH_OUTLINE_COLOR",
    "attention_grid",
    "draw_attention",
    "lesion_hit_rate",
    "plot_embedding",
]

#: Outline of the patches whose weight is above the image's mean weight (RGB).
HIGHLIGHT_COLOR: tuple[int, int, int] = (255, 32, 32)
#: Thin outline of the other patches (RGB).
PATCH_OUTLINE_COLOR: tuple[int, int, int] = (255, 255, 255)
#: Dashed outline of the ground-truth lesion box (RGB).
LESION_COLOR: tuple[int, int, int] = (0, 200, 255)

# Heat tint ramp for normalised weights 0 -> 0.5 -> 1 (blue, yellow, red).
_RAMP = np.array([[49, 54, 149], [255, 255, 191], [215, 48, 39]], dtype=np.float64)
_CLASS_COLORS = ("#2b83ba", "#d7191c", "#1a9641", "#fdae61", "#7b3294", "#636363")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _to_pil(image: Any) -> Image.Image:
    """(C, H, W) tensor, (H, W, C) / (H, W) array or PIL image -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    is_tensor = hasattr(image, "detach")
    a = _to_numpy(image)
    shape = tuple(a.shape)
    if a.ndim == 3:
        channels_first = is_tensor or (a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4))
        if channels_first:
            a = np.moveaxis(a, 0, -1)
        if a.shape[-1] not in (1, 3, 4):
            raise ValueError(
                "image must be (C, H, W) for tensors or (H, W, C) for arrays with C in 1, 3 or 4; "
                f"got shape {shape}"
            )
        a = a[..., :3] if a.shape[-1] == 4 else a
        a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
    elif a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    else:
        raise ValueError(f"image must have 2 or 3 dimensions; got shape {tuple(a.shape)}")
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.round(np.nan_to_num(a.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        a = np.clip(a, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"image must be uint8 (0..255) or float (0..1); got dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _save(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path


def _box_xyxy(box: Any) -> tuple[float, float, float, float] | None:
    """A lesion box as 4 floats, or None when it is missing (non-finite or empty)."""
    if box is None:
        return None
    b = _to_numpy(box).astype(np.float64).reshape(-1)
    if b.shape[0] != 4:
        raise ValueError(f"lesion_box must be (x0, y0, x1, y1); got {b.shape[0]} values")
    if not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
        return None
    return float(b[0]), float(b[1]), float(b[2]), float(b[3])


def _dashed_rectangle(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    color: tuple[int, int, int],
    width: int,
    dash: int,
) -> None:
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1  # exclusive -> inclusive pixel coordinates
    for (ax, ay), (bx, by) in (
        ((x0, y0), (x1, y0)),
        ((x1, y0), (x1, y1)),
        ((x1, y1), (x0, y1)),
        ((x0, y1), (x0, y0)),
    ):
        length = math.hypot(bx - ax, by - ay)
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line(
                [
                    (ax + (bx - ax) * t0, ay + (by - ay) * t0),
                    (ax + (bx - ax) * t1, ay + (by - ay) * t1),
                ],
                fill=color,
                width=width,
            )


# --------------------------------------------------------------------------------------------
# Attention overlays (Fig. 4b)
# --------------------------------------------------------------------------------------------


def draw_attention(
    image: Any,
    boxes: Any,
    weights: Any,
    *,
    path: str | Path | None = None,
    lesion_box: Any = None,
    title: str | None = None,
    show_weights: bool = True,
    tint: float = 0.45,
    min_size: int = 256,
) -> Image.Image:
    """Draw each patch's attention weight on the image; outline the patches above the mean.

    Every patch gets a translucent heat tint (blue for the image's lowest weight, red for its
    highest, more opaque the higher the weight), a thin white outline and its weight printed in
    its centre. Patches whose weight is strictly above the mean weight of the image are outlined
    in :data:`HIGHLIGHT_COLOR`, as in the paper's Fig. 4b (if all weights are equal, none is).
    An optional ground-truth lesion box is drawn dashed in :data:`LESION_COLOR`.

    Images whose short side is below ``min_size`` are first enlarged by an integer factor
    (nearest neighbour, boxes scaled alike) so that the printed weights stay readable. A
    ``title`` adds a band above the image.

    Args:
        image: A (C, H, W) tensor (uint8 0..255 or float 0..1), an (H, W, C) or (H, W) array,
            or a PIL image. C may be 1, 3 or 4 (alpha is dropped).
        boxes: Patch boxes of shape (N, 4), ``(x0, y0, x1, y1)`` in image pixels, x1/y1
            exclusive (``PatchTiler`` boxes for one image).
        weights: Attention weights of shape (N,) (``ClassifierOutput.weights[i]``).
        path: When given, the overlay is saved there as PNG (parent folders are created).
        lesion_box: Optional ``(x0, y0, x1, y1)`` of the recorded lesion; ignored when it holds
            a non-finite value or is empty.
        title: Optional caption drawn in a band above the image.
        show_weights: Print each weight (skipped for a patch too small to hold the text).
        tint: Opacity of the tint of the highest-weight patch, in [0, 1] (0 = no tint).
        min_size: Short side below which the image is enlarged (0 disables it).

    Returns:
        The overlay as an RGB PIL image, of size (W * f, H * f + title band) for the
        enlargement factor f (1 unless the image is smaller than ``min_size``).

    References:
        Chae et al., JIPS 2021, Fig. 4b.
    """
    base = _to_pil(image)
    b = _to_numpy(boxes).astype(np.float64)
    w = _to_numpy(weights).astype(np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4); got {tuple(b.shape)}")
    if w.shape != (b.shape[0],):
        raise ValueError(f"weights must have shape ({b.shape[0]},) to match boxes; got {w.shape}")
    if not (np.isfinite(b).all() and np.isfinite(w).all()):
        raise ValueError("boxes and weights must be finite")
    if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
        raise ValueError("every box needs x1 > x0 and y1 > y0 (x0, y0, x1, y1 order)")
    if not 0.0 <= tint <= 1.0:
        raise ValueError(f"tint must be in [0, 1]; got {tint}")

    factor = 1
    if min_size and min(base.size) < min_size:
        factor = math.ceil(min_size / min(base.size))
        base = base.resize((base.width * factor, base.height * factor), Image.NEAREST)
        b = b * factor
    width, height = base.size
    b = np.round(b).astype(np.int64)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)  # rounding must not empty a box
    lesion = _box_xyxy(lesion_box)
    if lesion is not None:
        lesion = tuple(v * factor for v in lesion)  # type: ignore[assignment]

    spread = float(w.max() - w.min()) if w.size else 0.0
    norm = (w - w.min()) / spread if spread > 0 else np.full_like(w, 0.5)
    above = w > w.mean() if w.size else np.zeros(0, dtype=bool)

    # Translucent heat tint, one rectangle per patch, on a separate layer.
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    ldraw = ImageDraw.Draw(layer)
    for (x0, y0, x1, y1), v in zip(b.tolist(), norm.tolist()):
        seg = min(int(v * 2), 1)
        frac = v * 2 - seg
        rgb = (_RAMP[seg] * (1 - frac) + _RAMP[seg + 1] * frac).round().astype(int)
        alpha = round(255 * tint * (0.25 + 0.75 * v))
        ldraw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(*rgb.tolist(), alpha))
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")

    draw = ImageDraw.Draw(out)
    thick = max(2, round(min(width, height) / 128))
    for (x0, y0, x1, y1), hot in zip(b.tolist(), above.tolist()):
        if not hot:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=PATCH_OUTLINE_COLOR, width=1)
    for (x0, y0, x1, y1), hot in zip(b.tolist(), above.tolist()):
        if hot:  # drawn last so that they win where boxes touch
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=HIGHLIGHT_COLOR, width=thick)
    if lesion is not None:
        _dashed_rectangle(draw, lesion, LESION_COLOR, max(1, thick - 1), dash=max(4, 3 * thick))

    if show_weights and w.size:
        font = _font(max(10, min(width, height) // 28))
        pad = max(2, thick)
        for (x0, y0, x1, y1), v in zip(b.tolist(), w.tolist()):
            text = f"{v:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th = right - left, bottom - top
            if tw + 2 * pad > (x1 - x0) - 2 * thick or th + 2 * pad > (y1 - y0) - 2 * thick:
                continue
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            rect = [
                cx - tw // 2 - pad,
                cy - th // 2 - pad,
                cx + (tw + 1) // 2 + pad,
                cy + (th + 1) // 2 + pad,
            ]
            draw.rectangle(rect, fill=(0, 0, 0))
            draw.text(
                (cx - tw // 2 - left, cy - th // 2 - top), text, fill=(255, 255, 255), font=font
            )

    if title:
        font = _font(max(12, min(width, height) // 24))
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        band = bottom - top + 2 * max(4, thick)
        canvas = Image.new("RGB", (width, height + band), (255, 255, 255))
        canvas.paste(out, (0, band))
        ImageDraw.Draw(canvas).text(
            (max(4, thick), max(4, thick) - top), title, fill=(0, 0, 0), font=font
        )
        out = canvas

    if path is not None:
        _save(out, path)
    return out


def attention_grid(
    images: Any,
    boxes: Any,
    weights: Any,
    path: str | Path | None,
    *,
    lesion_boxes: Any = None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    tile_size: int = 256,
    padding: int = 8,
) -> Image.Image:
    """A contact sheet of several :func:`draw_attention` overlays.

    Args:
        images: B images: a (B, C, H, W) tensor/array or a sequence of anything
            :func:`draw_attention` accepts.
        boxes: Patch boxes, (B, N, 4) or (N, 4) shared by every image.
        weights: Attention weights of shape (B, N).
        path: Where to save the PNG (parent folders are created), or None to only return it.
        lesion_boxes: Optional (B, 4) lesion boxes; rows with nan (no recorded lesion) are
            skipped.
        titles: Optional caption per image (e.g. ``"y=1 p=0.83"``).
        ncols: Tiles per row.
        tile_size: Width of each tile in pixels (height follows the aspect ratio).
        padding: Space between tiles in pixels.

    Returns:
        The sheet as an RGB PIL image.

    References:
        Chae et al., JIPS 2021, Fig. 4b.
    """
    if ncols < 1 or tile_size < 8 or padding < 0:
        raise ValueError(
            f"need ncols >= 1, tile_size >= 8 and padding >= 0; got {ncols}, {tile_size}, {padding}"
        )
    items = (
        list(images) if not hasattr(images, "shape") else [images[i] for i in range(len(images))]
    )
    n_img = len(items)
    if n_img == 0:
        raise ValueError("attention_grid needs at least one image")
    b = _to_numpy(boxes)
    w = _to_numpy(weights)
    if b.ndim == 2:
        b = np.broadcast_to(b, (n_img, *b.shape))
    if b.ndim != 3 or b.shape[0] != n_img:
        raise ValueError(f"boxes must be (N, 4) or ({n_img}, N, 4); got {tuple(b.shape)}")
    if w.ndim != 2 or w.shape[0] != n_img:
        raise ValueError(f"weights must be ({n_img}, N); got {tuple(w.shape)}")
    lesions = None if lesion_boxes is None else _to_numpy(lesion_boxes)
    if lesions is not None and lesions.shape != (n_img, 4):
        raise ValueError(f"lesion_boxes must be ({n_img}, 4); got {tuple(lesions.shape)}")
    if titles is not None and len(titles) != n_img:
        raise ValueError(f"titles must hold {n_img} strings; got {len(titles)}")

    tiles = []
    for i, img in enumerate(items):
        # Resize the image to the tile first so that outlines and text keep a readable size.
        base = _to_pil(img)
        scale = tile_size / base.width
        base = base.resize((tile_size, max(1, round(base.height * scale))), Image.LANCZOS)
        lesion = None if lesions is None else lesions[i].astype(np.float64) * scale
        overlay = draw_attention(
            base,
            b[i].astype(np.float64) * scale,
            w[i],
            lesion_box=lesion,
            title=None if titles is None else titles[i],
            min_size=0,
        )
        tiles.append(overlay)
    ncols = min(ncols, n_img)
    nrows = math.ceil(n_img / ncols)
    cell_h = max(t.height for t in tiles)
    sheet = Image.new(
        "RGB",
        (ncols * tile_size + (ncols + 1) * padding, nrows * cell_h + (nrows + 1) * padding),
        (255, 255, 255),
    )
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        sheet.paste(tile, (padding + c * (tile_size + padding), padding + r * (cell_h + padding)))
    if path is not None:
        _save(sheet, path)
    return sheet


# --------------------------------------------------------------------------------------------
# Embedding plot (Fig. 4a)
# --------------------------------------------------------------------------------------------


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components, padded to two columns for one-dimensional input."""
    from sklearn.decomposition import PCA  # deferred: scikit-learn is slow to import

    coords = PCA(n_components=min(2, x.shape[1]), svd_solver="full").fit_transform(x)
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def plot_embedding(
    features: Any,
    labels: Any,
    path: str | Path,
    *,
    method: str = "tsne",
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    perplexity: float | None = None,
) -> np.ndarray:
    """A 2-D map of classifier features coloured by label, saved as PNG.

    ``method="tsne"`` uses :class:`sklearn.manifold.TSNE` (PCA initialisation, seeded). Its
    perplexity defaults to ``min(30, max(1, (M - 1) / 3))`` so that it stays below the number
    of points and works down to a handful of images. ``method="pca"`` projects on the first two
    principal components (fast, deterministic, linear). For up to 2,000 points t-SNE runs on
    one thread, which is faster than oversubscribing a small machine.

    Args:
        features: Features of shape (M, F): ``ClassifierOutput.features`` stacked over a split.
        labels: Integer labels of shape (M,) (0 = negative, 1 = positive, or more classes).
        path: Where to save the PNG (parent folders are created). Needs matplotlib
            (a dependency of patchssl).
        method: ``"tsne"`` or ``"pca"``.
        seed: Random state of t-SNE (PCA is deterministic).
        class_names: Legend name of each label value (label k gets ``class_names[k]`` when
            there is one, else ``"class k"``), e.g. the label map's
            (:attr:`patchssl.data.LabelMap.class_names`).
        title: Figure title (default: the method and the number of points).
        perplexity: t-SNE perplexity; must be below M.

    Returns:
        The 2-D coordinates, shape (M, 2), float64, in the order of ``features``.

    Raises:
        ImportError: When matplotlib is missing, naming ``patchssl[viz]``.

    References:
        Chae et al., JIPS 2021, Fig. 4a; van der Maaten & Hinton, JMLR 2008.
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f'method must be "tsne" or "pca"; got {method!r}')
    x = _to_numpy(features).astype(np.float64)
    y = _to_numpy(labels)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (M, F); got {tuple(x.shape)}")
    m = x.shape[0]
    if y.shape != (m,):
        raise ValueError(f"labels must have shape ({m},) to match features; got {tuple(y.shape)}")
    if m < 2:
        raise ValueError(f"an embedding needs at least 2 points; got {m}")
    if not np.isfinite(x).all():
        raise ValueError("features contain non-finite values")
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        raise ValueError("labels must be integers")
    y = y.astype(np.int64)

    # Deferred: matplotlib takes about a second to import, and only this function draws with it.
    import matplotlib.backends.backend_agg as agg
    import matplotlib.figure as figure_mod

    if method == "pca":
        coords = _pca_2d(x)
    else:
        from sklearn.manifold import TSNE  # deferred: scikit-learn is slow to import
        from threadpoolctl import threadpool_limits

        perp = min(30.0, max(1.0, (m - 1) / 3.0)) if perplexity is None else float(perplexity)
        if not 0 < perp < m:
            raise ValueError(f"perplexity must be in (0, {m}) for {m} points; got {perp}")
        if x.shape[1] < 2:  # PCA initialisation needs two dimensions
            x = np.pad(x, ((0, 0), (0, 2 - x.shape[1])))
        tsne = TSNE(
            n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed
        )
        with threadpool_limits(limits=1 if m <= 2000 else None):
            coords = tsne.fit_transform(x).astype(np.float64)

    fig = figure_mod.Figure(figsize=(5.0, 4.5), dpi=120)
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k in np.unique(y).tolist():
        sel = y == k
        names = class_names or ()
        name = names[k] if 0 <= k < len(names) else f"class {k}"
        ax.scatter(
            coords[sel, 0],
            coords[sel, 1],
            s=18 if m > 50 else 40,
            alpha=0.8,
            color=_CLASS_COLORS[k % len(_CLASS_COLORS)] if k >= 0 else "#000000",
            edgecolors="none",
            label=f"{name} (n={int(sel.sum())})",
        )
    ax.legend(loc="best", frameon=False, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        title or f"{'t-SNE' if method == 'tsne' else 'PCA'} of classifier features (n={m})"
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return coords


# --------------------------------------------------------------------------------------------
# Lesion hit rate
# --------------------------------------------------------------------------------------------


def lesion_hit_rate(
    boxes: Any,
    weights: Any,
    lesion_boxes: Any,
    labels: Any,
    *,
    groups: Any = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    tie_tolerance: float = 1e-6,
    per_image: bool = False,
) -> dict[str, Any]:
    """How often the highest-weight patch of a positive image overlaps its recorded lesion.

    Only positive images (label 1) with a recorded lesion count; a lesion box is missing when
    it holds a non-finite value (nan in the manifest) or is empty. A patch overlaps the lesion
    when their intersection has positive area.

    A hit rate means little on its own, so two baselines stand beside it, each with an interval:

    * ``chance``: the hit rate of a patch drawn uniformly at random, i.e. the mean over the
      counted images of the fraction of patches that overlap the lesion (1/N when every lesion
      lies inside one patch);
    * ``centre_patch_rate``: the hit rate of always choosing the middle patch (the patch whose
      centre is nearest the centre of the grid), which is hard to beat wherever lesions sit near
      the middle of the image (around the cervical os).

    ``selectivity`` says whether the gate chooses at all: the mean over all images of the
    highest minus the lowest weight (``weight_range``; 0 for a flat gate), and the mean
    normalised entropy of the weights divided by their sum (``weight_entropy``, computed by
    :func:`patchssl.attention.weight_entropy`: 1 when they are all equal, 0 when one patch
    holds all the weight).

    Ties: when several patches share an image's highest weight within ``tie_tolerance`` (a
    saturated sigmoid gate gives 1.0 everywhere), the first maximum would be an arbitrary
    choice. Such an image instead counts the fraction of its tied top patches that overlap the
    lesion (the expected hit of a random tie-break), and a warning gives the number of tied
    images, which is also returned as ``ties``.

    Intervals are percentile bootstrap intervals of the mean over the counted images,
    resampling patients when ``groups`` is given; a rate of exactly 0 or 1 gets the exact
    Clopper-Pearson interval over the units (see :func:`patchssl.metrics.clopper_pearson_ci`).
    ``vs_centre`` and ``vs_chance`` are paired differences (hit rate minus baseline) on the
    same resamples, with a verdict as in :func:`patchssl.metrics.paired_difference`.

    Args:
        boxes: Patch boxes, (B, N, 4) or (N, 4) shared by every image, ``(x0, y0, x1, y1)``
            with x1/y1 exclusive.
        weights: Attention weights of shape (B, N).
        lesion_boxes: Lesion boxes of shape (B, 4); nan rows where no lesion is recorded.
        labels: Labels of shape (B,), 1 = positive.
        groups: Optional patient ids of shape (B,) for the intervals.
        n_boot: Bootstrap resamples of the intervals (0: none).
        alpha: 1 - confidence level.
        seed: Seed of the resampling.
        tie_tolerance: Weights within this of an image's highest weight tie with it.
        per_image: Also return the per-image values behind the rates, for paired comparisons
            across models on the same images (e.g. one model's hits minus another's).

    Returns:
        A dict: ``hit_rate`` (``hits / count``), ``hit_rate_ci``, ``hits`` (a float when
        tied images count fractions), ``count``, ``chance``, ``chance_ci``,
        ``centre_patch`` (its index), ``centre_patch_rate``, ``centre_patch_ci``,
        ``vs_centre`` and ``vs_chance`` (``{"value", "ci", "verdict"}``), ``ties``,
        ``selectivity`` (``{"weight_range", "weight_entropy"}`` over all B images),
        ``ci_method`` (per interval: ``"bootstrap"``, ``"exact"``, ``"degenerate"`` or
        ``"none"``), ``n_images``. Rates and intervals are ``nan`` when no image counts.
        With ``per_image=True`` also ``per_image``: ``counted`` (bool, (B,): the images the
        rates are over) and, over the counted images in order, ``hit`` (the top patch's hit,
        a share on ties), ``centre_patch`` (the middle patch's hit) and ``chance`` (the
        fraction of patches on the lesion), float arrays of shape ``(count,)``.

    References:
        Chae et al., JIPS 2021, Fig. 4b (attention on the lesion). Clopper, Pearson, Biometrika
        26(4), 1934.
    """
    w = _to_numpy(weights).astype(np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must have shape (B, N); got {tuple(w.shape)}")
    n_img, n_patch = w.shape
    b = _to_numpy(boxes).astype(np.float64)
    if b.ndim == 2:
        b = np.broadcast_to(b, (n_img, *b.shape))
    if b.shape != (n_img, n_patch, 4):
        raise ValueError(f"boxes must be ({n_patch}, 4) or ({n_img}, {n_patch}, 4); got {b.shape}")
    les = _to_numpy(lesion_boxes).astype(np.float64)
    if les.shape != (n_img, 4):
        raise ValueError(f"lesion_boxes must have shape ({n_img}, 4); got {tuple(les.shape)}")
    y = _to_numpy(labels)
    if y.shape != (n_img,):
        raise ValueError(f"labels must have shape ({n_img},); got {tuple(y.shape)}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ValueError("weights and boxes must be finite")
    if not float(tie_tolerance) >= 0.0:
        raise ValueError(f"tie_tolerance must be >= 0; got {tie_tolerance}")
    g = None
    if groups is not None:
        g = _to_numpy(groups)
        if g.shape != (n_img,):
            raise ValueError(f"groups must have shape ({n_img},); got {tuple(g.shape)}")

    finite = np.isfinite(les).all(axis=1)
    safe = np.where(finite[:, None], les, 0.0)
    recorded = finite & (safe[:, 2] > safe[:, 0]) & (safe[:, 3] > safe[:, 1])
    counted = (y == 1) & recorded
    # Intersection of every patch with its image's lesion: (B, N).
    ix = np.minimum(b[..., 2], safe[:, None, 2]) - np.maximum(b[..., 0], safe[:, None, 0])
    iy = np.minimum(b[..., 3], safe[:, None, 3]) - np.maximum(b[..., 1], safe[:, None, 1])
    overlap = (ix > 0) & (iy > 0)
    nan = float("nan")
    out: dict[str, Any] = {
        "hit_rate": nan,
        "hit_rate_ci": (nan, nan),
        "hits": 0,
        "count": int(counted.sum()),
        "chance": nan,
        "chance_ci": (nan, nan),
        "centre_patch": None,
        "centre_patch_rate": nan,
        "centre_patch_ci": (nan, nan),
        "vs_centre": {"value": nan, "ci": (nan, nan), "verdict": "undefined"},
        "vs_chance": {"value": nan, "ci": (nan, nan), "verdict": "undefined"},
        "ties": 0,
        "selectivity": {"weight_range": nan, "weight_entropy": nan},
        "ci_method": {},
        "n_images": n_img,
    }
    if per_image:  # filled below where any image counts
        none = np.zeros(0)
        out["per_image"] = {"counted": counted, "hit": none, "centre_patch": none, "chance": none}
    if n_patch == 0 or n_img == 0:
        return out

    # Selectivity of the gate over every image (the entropy: the training penalty's helper).
    import torch

    from patchssl.attention import weight_entropy

    entropy = float(weight_entropy(torch.from_numpy(np.ascontiguousarray(w))).mean())
    out["selectivity"] = {
        "weight_range": float((w.max(axis=1) - w.min(axis=1)).mean()),
        "weight_entropy": entropy if n_patch > 1 else nan,
    }

    # Top patches, with ties: each image scores the share of its tied top patches on the lesion.
    top = w >= w.max(axis=1, keepdims=True) - float(tie_tolerance)
    n_top = top.sum(axis=1)
    hit = (top & overlap).sum(axis=1) / n_top
    # The middle patch: its centre nearest the centre of the grid (first one on a tie).
    cx = (b[..., 0] + b[..., 2]) / 2.0
    cy = (b[..., 1] + b[..., 3]) / 2.0
    dist = np.hypot(cx - cx.mean(axis=1, keepdims=True), cy - cy.mean(axis=1, keepdims=True))
    middle = np.argmin(dist, axis=1)
    middle_hit = overlap[np.arange(n_img), middle].astype(np.float64)
    fraction = overlap.mean(axis=1)
    out["centre_patch"] = int(middle[0]) if np.all(middle == middle[0]) else None
    if per_image:
        out["per_image"] = {
            "counted": counted,
            "hit": hit[counted],
            "centre_patch": middle_hit[counted],
            "chance": fraction[counted],
        }

    count = out["count"]
    if not count:
        return out
    ties = int(((n_top > 1) & counted).sum())
    out["ties"] = ties
    if ties:
        warnings.warn(
            f"lesion_hit_rate: {ties} of {count} counted images have their highest attention "
            f"weight shared by several patches (within tie_tolerance={tie_tolerance}); each "
            "counts the share of its tied top patches that overlap the lesion, not the first "
            "maximum. A saturated or flat gate causes this: see 'selectivity'.",
            UserWarning,
            stacklevel=2,
        )
    gc = g[counted] if g is not None else None
    hits = float(hit[counted].sum())
    out["hits"] = round(hits) if not ties else hits
    out["hit_rate"] = hits / count
    out["chance"] = float(fraction[counted].mean())
    out["centre_patch_rate"] = float(middle_hit[counted].mean())
    ci = {"n_boot": n_boot, "alpha": alpha, "seed": seed}
    for key, values in (
        ("hit_rate", hit[counted]),
        ("chance", fraction[counted]),
        ("centre_patch", middle_hit[counted]),
    ):
        out[f"{key}_ci"], out["ci_method"][key] = _mean_ci(values, gc, **ci)
    for key, base in (("vs_centre", middle_hit), ("vs_chance", fraction)):
        diff = hit[counted] - base[counted]
        d = float(diff[0])
        if np.all(diff == d) and abs(d) == 1.0:
            # Every image hit where the baseline missed (or the reverse): no spread to resample.
            # P(a) - P(b) >= P(a, not b) - P(b, not a) >= 2 L - 1, with L the exact lower bound
            # of P(a, not b) over the units.
            units = np.unique(gc).size if gc is not None else count
            low = 2.0 * clopper_pearson_ci(units, units, float(alpha))[0] - 1.0
            interval, method = ((low, 1.0) if d > 0 else (-1.0, -low)), "exact"
        else:
            interval, method = _mean_ci(diff, gc, **ci)
            if method == "exact":  # every difference 0: _mean_ci's proportion rule is wrong here
                interval, method = (0.0, 0.0), "degenerate"
        out["ci_method"][key] = method
        out[key] = {
            "value": float(diff.mean()),
            "ci": interval,
            "verdict": _verdict(*interval) if method != "none" else "undefined",
        }
    return out
