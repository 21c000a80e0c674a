"""A seeded synthetic cervix-like dataset, for the demo, the tests and the examples.

Real colposcopy images cannot be shipped, so :func:`make_synthetic_cervix` draws look-alikes
with numpy (vectorised, no per-pixel Python loops; about 2 ms per 192 px image):

* a round pink cervix (slightly elliptical, irregular rim, dome shading, mottled texture) at
  a varying position and scale, on dark red vaginal walls;
* the external os, a dark slit near the centre, inside a redder, grainy transformation zone;
* speculum blades (grey metal with a bright reflection stripe) at the top and bottom, with
  shadows cast onto the tissue, and a vignette;
* an illumination gradient, a colour cast, sensor noise and a slight blur;
* specular highlights: small (1-3 px), saturated, sharp-edged white spots;
* on positive images, an acetowhite-like lesion: a larger (about a sixth of the cervix
  radius, tens of pixels at 192 px), matte, semi-opaque, irregular white patch. Its bounding
  box is recorded. Highlights and lesions differ by size (a few pixels against tens), by
  saturation (pure white against a whitened tissue colour) and by edge (sharp against soft
  and irregular).

Where lesions lie: so that attention maps can be scored at every patch position of the 3x3
grid, a patient's lesion centre (:func:`lesion_center`) is put in a grid cell drawn uniformly
from the nine, at a point uniform over the part of that cell allowed by ``_LESION_SPANS``
(the middle third whole; the outer thirds within [0.12, 0.27] and [0.73, 0.88] of the image
side, clear of the image edge and the speculum and a little away from the middle patch) and
within 0.85 cervix radii of the cervix centre. Over 2,000 drawn patients each cell held 10.0% to
12.6% of the lesion centres. With 128 px images and 32 px patches the middle patch overlaps 33%
of the lesion boxes and a patch drawn at random 21% (300 rendered images); every lesion
overlaps at least one patch. The cervix is large (radius 0.36-0.46 of the image side, centre
within 0.46-0.54), as a colposcope frames it, and is enlarged when a corner point would
otherwise fall off it. Real lesions cluster around the transformation zone; this generator
spreads them on purpose and keeps the rest of the layout (os near the centre, speculum at top
and bottom). The drawn lesion spreads around its centre and moves a little from shot to shot
(camera position and zoom).

The label is per patient: a positive patient's images all show its lesion (same place on
the cervix, slightly moved with the camera); a negative patient's show none. Images of one
patient share the cervix geometry, colour and lesion, with small per-shot changes (camera
position, zoom, light, highlights, speculum), as several shots of one colposcopy visit would.

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (the task: CIN2+ against CIN0/1 from cervix images).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from patchssl._validation import atomic_write, check_int

__all__ = [
    "CervixImage",
    "CervixParams",
    "SyntheticDataset",
    "lesion_center",
    "make_synthetic_cervix",
    "render_cervix",
    "sample_cervix_params",
]

GENERATOR_VERSION = 2
#: How far from the cervix centre a lesion centre may lie, in cervix radii.
_LESION_REACH = 0.85
#: Where lesion centres go along either axis in the three cells of a 3x3 grid (image
#: fractions): the whole middle cell; the outer cells without their outer edge (off the
#: cervix, under the speculum) and without a margin of 0.04 next to the middle cell, so that a
#: lesion of an outer cell seldom reaches into the middle patch.
_LESION_SPANS = ((0.12, 0.27), (1.0 / 3.0, 2.0 / 3.0), (0.73, 0.88))
MANIFEST_COLUMNS = (
    "image",
    "label",
    "patient",
    "visit",
    "lesion_x0",
    "lesion_y0",
    "lesion_x1",
    "lesion_y1",
)


@dataclass(frozen=True)
class CervixParams:
    """The geometry and colour of one synthetic cervix (one patient).

    Lengths are fractions of the image side (``cx``, ``cy``, ``radius``, blades) or of the
    cervix radius (os, transformation zone, lesion). Angles are in radians.
    """

    cx: float
    cy: float
    radius: float
    aspect: float
    angle: float
    rim_phase: tuple[float, float]
    rim_amp: tuple[float, float]
    tissue_rgb: tuple[float, float, float]
    wall_rgb: tuple[float, float, float]
    os_dx: float
    os_dy: float
    os_width: float
    os_ratio: float
    os_angle: float
    zone_radius: float
    zone_strength: float
    zone_phase: tuple[float, float]
    blade_top: float
    blade_bottom: float
    blade_curve: float
    metal_gray: float
    lesion_angle: float
    lesion_dist: float
    lesion_radius: float
    lesion_opacity: float
    lesion_blobs: tuple[tuple[float, float, float], ...]
    texture_seed: int


class CervixImage(NamedTuple):
    """One rendered image.

    Attributes:
        image: uint8 array of shape ``(H, W, 3)``.
        lesion_box: ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive) when a lesion was
            drawn, else None.
        lesion_mask: float32 array ``(H, W)`` in [0, 1], the lesion's opacity (zeros
            without a lesion).
    """

    image: np.ndarray
    lesion_box: tuple[int, int, int, int] | None
    lesion_mask: np.ndarray


@dataclass(frozen=True)
class SyntheticDataset:
    """Where :func:`make_synthetic_cervix` wrote what.

    Attributes:
        root: Output folder.
        unlabeled_dir: Folder of unlabeled PNGs (for pretraining).
        labeled_dir: Folder of labeled PNGs.
        manifest: ``labeled.csv`` (columns image, label, patient, visit, lesion_x0,
            lesion_y0, lesion_x1, lesion_y1; raw labels ``CIN0`` .. ``CIN3``, to be read
            with :data:`patchssl.data.manifest.CERVIX_LABEL_MAP`).
        info: ``synthetic_info.json`` (settings and counts).
        num_unlabeled: Unlabeled images.
        num_labeled: Labeled images.
        num_positive: Labeled images of positive (CIN2+) patients.
        num_patients: Labeled patients.
    """

    root: Path
    unlabeled_dir: Path
    labeled_dir: Path
    manifest: Path
    info: Path
    num_unlabeled: int
    num_labeled: int
    num_positive: int
    num_patients: int


# -- drawing helpers -----------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Smooth random field(s) of about unit variance, shape ``(channels, size, size)``.

    A ``(cells + 1) x (cells + 1)`` grid of normal values upsampled with Pillow's bicubic
    filter (single-threaded C, deterministic, and free of BLAS thread contention).
    """
    grid = rng.standard_normal((channels, cells + 1, cells + 1), dtype=np.float32)
    out = np.empty((channels, size, size), dtype=np.float32)
    for c in range(channels):
        im = Image.fromarray(grid[c], mode="F")
        out[c] = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))
    return out


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _harmonics(
    u: np.ndarray,
    v: np.ndarray,
    rho: np.ndarray,
    amp: tuple[float, float],
    phase: tuple[float, float],
) -> np.ndarray:
    """``amp0 * sin(2 t + phase0) + amp1 * sin(3 t + phase1)`` with ``t = atan2(v, u)``.

    Computed from ``cos t = u / rho`` and ``sin t = v / rho`` (no arctan2, which is slow).
    """
    inv = 1.0 / np.maximum(rho, np.float32(1e-6))
    c, s = u * inv, v * inv
    cos2, sin2 = c * c - s * s, 2.0 * c * s
    cos3, sin3 = c * (4.0 * c * c - 3.0), s * (3.0 - 4.0 * s * s)
    return amp[0] * (sin2 * float(np.cos(phase[0])) + cos2 * float(np.sin(phase[0]))) + amp[1] * (
        sin3 * float(np.cos(phase[1])) + cos3 * float(np.sin(phase[1]))
    )


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur along the first two axes (edges replicated).

    Kept instead of ``scipy.ndimage.convolve1d`` (``mode="nearest"``): that differs by up to
    3e-5 in float32 (measured on a 128 px image), enough to flip a rounded pixel, and a seed
    must draw byte-identical datasets across versions.
    """
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    v = (p[:-2] + 2.0 * p[1:-1] + p[2:]) * 0.25
    return (v[:, :-2] + 2.0 * v[:, 1:-1] + v[:, 2:]) * 0.25


# -- parameters ----------------------------------------------------------------------------------


def _cell_span(index: int) -> tuple[float, float]:
    """Where a lesion centre may go along one axis in grid cell ``index`` (0, 1 or 2).

    See :data:`_LESION_SPANS`.
    """
    return _LESION_SPANS[index]


def sample_cervix_params(rng: np.random.Generator) -> CervixParams:
    """Draw one synthetic patient's cervix: geometry, colours, speculum and (possible) lesion.

    The lesion geometry is drawn for every patient; :func:`render_cervix` draws it only when
    asked (``lesion=True``).

    Args:
        rng: NumPy generator (``np.random.default_rng(seed)``).

    Returns:
        The parameters.
    """
    u = rng.uniform
    base = np.array([208.0, 118.0, 126.0]) + rng.normal(0.0, [10.0, 10.0, 9.0])
    wall = np.array([110.0, 38.0, 44.0]) + rng.normal(0.0, [12.0, 6.0, 6.0])
    n_blobs = int(rng.integers(3, 7))
    blobs = tuple(
        (float(rng.normal(0.0, 0.45)), float(rng.normal(0.0, 0.45)), float(u(0.35, 0.65)))
        for _ in range(n_blobs)
    )
    cx, cy, radius = float(u(0.46, 0.54)), float(u(0.46, 0.54)), float(u(0.36, 0.46))
    os_dx, os_dy = float(rng.normal(0.0, 0.07)), float(rng.normal(0.0, 0.07))
    # The lesion: a cell of the 3x3 grid drawn uniformly, then a point of that cell, uniform
    # over its part in _LESION_SPANS that lies well inside the cervix (within _LESION_REACH
    # radii of its centre). When that part is too small, the point of the span nearest the
    # centre is taken and the cervix is enlarged to hold it.
    row, col = divmod(int(rng.integers(9)), 3)
    lo_x, hi_x = _cell_span(col)
    lo_y, hi_y = _cell_span(row)
    for _ in range(64):
        tx, ty = float(u(lo_x, hi_x)), float(u(lo_y, hi_y))
        if np.hypot(tx - cx, ty - cy) <= _LESION_REACH * radius:
            break
    else:
        tx, ty = float(np.clip(cx, lo_x, hi_x)), float(np.clip(cy, lo_y, hi_y))
        radius = max(radius, float(np.hypot(tx - cx, ty - cy)) / _LESION_REACH)
    lx, ly = tx - (cx + os_dx * radius), ty - (cy + os_dy * radius)  # from the os
    return CervixParams(
        cx=cx,
        cy=cy,
        radius=radius,
        aspect=float(u(0.85, 1.12)),
        angle=float(u(-0.5, 0.5)),
        rim_phase=(float(u(0, 2 * np.pi)), float(u(0, 2 * np.pi))),
        rim_amp=(float(u(0.0, 0.05)), float(u(0.0, 0.03))),
        tissue_rgb=tuple(float(v) for v in np.clip(base, 0, 255)),
        wall_rgb=tuple(float(v) for v in np.clip(wall, 0, 255)),
        os_dx=os_dx,
        os_dy=os_dy,
        os_width=float(u(0.10, 0.20)),
        os_ratio=float(u(0.25, 0.6)),
        os_angle=float(u(-0.4, 0.4)),
        zone_radius=float(u(0.28, 0.5)),
        zone_strength=float(u(0.15, 0.6)),
        zone_phase=(float(u(0, 2 * np.pi)), float(u(0, 2 * np.pi))),
        blade_top=float(u(0.02, 0.08)),
        blade_bottom=float(u(0.92, 0.98)),
        blade_curve=float(u(0.1, 0.25)),
        metal_gray=float(u(140.0, 190.0)),
        lesion_angle=float(np.arctan2(ly, lx)),
        lesion_dist=float(np.hypot(lx, ly) / radius),
        lesion_radius=float(u(0.14, 0.2)),
        lesion_opacity=float(u(0.5, 0.7)),
        lesion_blobs=blobs,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def lesion_center(params: CervixParams) -> tuple[float, float]:
    """Where the lesion of ``params`` is centred, as fractions of the image side.

    The centre of the blobs that make the lesion; the drawn lesion spreads around it (about a
    sixth of the cervix radius, irregularly) and is clipped to the cervix.

    Args:
        params: A patient's cervix (from :func:`sample_cervix_params`).

    Returns:
        ``(x, y)`` in [0, 1] image fractions (``x`` to the right, ``y`` down); the 3x3 grid
        cell that holds it is ``(int(3 * y), int(3 * x))`` (row, column).
    """
    r = params.radius
    x = params.cx + r * (params.os_dx + params.lesion_dist * float(np.cos(params.lesion_angle)))
    y = params.cy + r * (params.os_dy + params.lesion_dist * float(np.sin(params.lesion_angle)))
    return x, y


def _shot(params: CervixParams, rng: np.random.Generator) -> CervixParams:
    """Small per-shot changes of one patient's cervix (camera position, zoom, speculum)."""
    return replace(
        params,
        cx=params.cx + float(rng.normal(0.0, 0.025)),
        cy=params.cy + float(rng.normal(0.0, 0.025)),
        radius=params.radius * float(rng.uniform(0.93, 1.07)),
        angle=params.angle + float(rng.normal(0.0, 0.08)),
        blade_top=float(np.clip(params.blade_top + rng.normal(0.0, 0.02), 0.0, 0.25)),
        blade_bottom=float(np.clip(params.blade_bottom + rng.normal(0.0, 0.02), 0.75, 1.0)),
        lesion_opacity=float(np.clip(params.lesion_opacity + rng.normal(0.0, 0.04), 0.2, 0.8)),
    )


# -- rendering -----------------------------------------------------------------------------------


def render_cervix(
    rng: np.random.Generator,
    size: int = 192,
    *,
    lesion: bool = False,
    params: CervixParams | None = None,
) -> CervixImage:
    """Render one synthetic cervix image in memory.

    Args:
        rng: NumPy generator for everything that changes from shot to shot (light,
            highlights, noise); also draws ``params`` when they are not given.
        size: Image side ``S`` in pixels (>= 32).
        lesion: Draw the acetowhite lesion and return its box.
        params: The patient's cervix (from :func:`sample_cervix_params`); None draws one.

    Returns:
        A :class:`CervixImage`: ``image`` uint8 ``(S, S, 3)``, ``lesion_box`` ``(x0, y0, x1,
        y1)`` or None, ``lesion_mask`` float32 ``(S, S)``.

    Example:
        >>> out = render_cervix(np.random.default_rng(0), 96, lesion=True)
        >>> out.image.shape, out.lesion_box is not None
        ((96, 96, 3), True)
    """
    check_int(size, "size", minimum=32)
    p = params if params is not None else sample_cervix_params(rng)
    s = float(size)
    f32 = np.float32
    tex = np.random.default_rng(p.texture_seed)  # the patient's own tissue texture
    coords = np.arange(size, dtype=f32) + f32(0.5)
    yy, xx = coords[:, None], coords[None, :]  # broadcast to (S, S) on use

    # Background: dark red vaginal walls with soft folds.
    wall = np.array(p.wall_rgb, dtype=f32)
    folds = _smooth_noise(tex, size, 5)[0]
    img = wall * (f32(0.8) + f32(0.18) * folds)[..., None]

    # Cervix: rotated ellipse with an irregular rim, dome shading and mottled colour.
    cx, cy, r = p.cx * s, p.cy * s, p.radius * s
    ca, sa = float(np.cos(p.angle)), float(np.sin(p.angle))
    dx, dy = xx - cx, yy - cy
    asq = float(np.sqrt(p.aspect))
    u = (dx * ca + dy * sa) * (1.0 / (r * asq))
    v = (dy * ca - dx * sa) * (asq / r)
    rho = np.sqrt(u * u + v * v)
    rim = f32(1.0) + _harmonics(u, v, rho, p.rim_amp, p.rim_phase)
    d = rho / rim
    edge = 2.0 / r
    cervix = _smoothstep(1.0 + edge, 1.0 - edge, d)
    dome = f32(0.68) + f32(0.32) * np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))
    mottle = _smooth_noise(tex, size, 9, channels=2)
    # Mostly brightness, a little hue (red against blue), never green blotches.
    tint_field = np.stack([mottle[1], np.zeros_like(mottle[1]), -mottle[1]], axis=-1)
    tissue = np.array(p.tissue_rgb, dtype=f32)
    tissue_img = (
        tissue
        * (f32(1.0) + f32(0.05) * mottle[0][..., None] + f32(0.025) * tint_field)
        * dome[..., None]
    )

    # Transformation zone around the os: redder and grainy, with an irregular outline.
    ox, oy = cx + p.os_dx * r, cy + p.os_dy * r
    odx, ody = xx - ox, yy - oy
    orho = np.sqrt(odx * odx + ody * ody)
    zr = (p.zone_radius * r) * (f32(1.0) + _harmonics(odx, ody, orho, (0.18, 0.1), p.zone_phase))
    zd = orho / zr
    grain = _smooth_noise(tex, size, max(8, size // 6))[0]
    zone = _smoothstep(1.15, 0.6, zd) * (f32(p.zone_strength) * (f32(0.75) + f32(0.25) * grain))
    zone_rgb = np.array([170.0, 50.0, 60.0], dtype=f32)
    zone = np.clip(zone, 0.0, 1.0)[..., None]
    tissue_img = tissue_img * (f32(1.0) - zone) + zone_rgb * (dome[..., None] * zone)

    # Acetowhite lesion: union of soft blobs, thresholded -> irregular, matte, whitish patch.
    lesion_mask = np.zeros((size, size), dtype=f32)
    if lesion:
        lr = p.lesion_radius * r
        lx = ox + p.lesion_dist * r * float(np.cos(p.lesion_angle))
        ly = oy + p.lesion_dist * r * float(np.sin(p.lesion_angle))
        reach = 3.0 * lr
        y0, y1 = max(0, int(ly - reach)), min(size, int(ly + reach) + 1)
        x0, x1 = max(0, int(lx - reach)), min(size, int(lx + reach) + 1)
        if y1 > y0 and x1 > x0:
            wy, wx = yy[y0:y1], xx[:, x0:x1]
            field = np.zeros((y1 - y0, x1 - x0), dtype=f32)
            for bx, by, bs in p.lesion_blobs:
                inv = 1.0 / (2.0 * (bs * lr) ** 2)
                ex = (wx - (lx + bx * lr)) ** 2
                ey = (wy - (ly + by * lr)) ** 2
                field += np.exp(-(ex + ey) * inv)
            rough = _smooth_noise(tex, size, max(8, size // 7))[0][y0:y1, x0:x1]
            speck = _smooth_noise(tex, size, max(8, size // 8))[0][y0:y1, x0:x1]
            win = _smoothstep(0.45, 0.8, field + f32(0.25) * rough) * cervix[y0:y1, x0:x1]
            win *= f32(0.85) + f32(0.15) * speck
            lesion_mask[y0:y1, x0:x1] = np.clip(win, 0.0, 1.0)
        white = np.array([232.0, 220.0, 218.0], dtype=f32)
        alpha = (f32(p.lesion_opacity) * lesion_mask)[..., None]
        tissue_img = tissue_img * (f32(1.0) - alpha) + white * (dome[..., None] * alpha)

    # The os: a dark slit with a darker core.
    oc, osn = float(np.cos(p.os_angle)), float(np.sin(p.os_angle))
    ow = p.os_width * r
    ou = (odx * oc + ody * osn) * (1.0 / ow)
    ov = (ody * oc - odx * osn) * (1.0 / (ow * p.os_ratio))
    od = np.sqrt(ou * ou + ov * ov)
    os_mask = _smoothstep(1.3, 0.5, od)[..., None]
    os_rgb = np.array([88.0, 24.0, 34.0], dtype=f32)
    tissue_img = tissue_img * (f32(1.0) - os_mask) + os_rgb * os_mask
    tissue_img *= (f32(1.0) - f32(0.3) * _smoothstep(2.5, 0.0, od))[..., None]

    c3 = cervix[..., None]
    img = img * (f32(1.0) - c3) + tissue_img * c3

    # Speculum blades (top and bottom) and the shadows they cast on the tissue.
    xc = (xx - s / 2.0) * (1.0 / s)  # (1, S)
    tint = np.array([1.0, 1.0, 1.04], dtype=f32)
    shade = np.ones((size, size), dtype=f32)
    layers = []
    for edge_y, sign in ((p.blade_top * s, 1.0), (p.blade_bottom * s, -1.0)):
        # The blade's edge bows into the view: y = edge_y + sign * curve * S * (1 - 4 x^2) / 4.
        by = edge_y + sign * p.blade_curve * s * 0.25 * (f32(1.0) - f32(4.0) * xc * xc)
        dist = (yy - by) * f32(sign)  # (S, S); > 0 on the tissue side of the edge
        shade *= f32(1.0) - f32(0.55) * np.exp(-np.clip(dist, 0.0, None) * f32(1.0 / (0.05 * s)))
        rows = np.flatnonzero((dist < 1.0).any(axis=1))
        if len(rows) == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        dd = dist[r0:r1]
        on_blade = _smoothstep(0.8, -0.8, dd)[..., None]
        depth = np.clip(-dd * f32(1.0 / (0.25 * s)), 0.0, 1.0)
        stripe = np.exp(-((-dd - f32(0.05 * s)) ** 2) * f32(1.0 / (2 * (0.015 * s) ** 2)))
        gray = f32(p.metal_gray) * (f32(1.0) - f32(0.25) * depth)
        gray = gray * (f32(0.9) + f32(0.1) * np.cos(f32(6.0) * xc)) + f32(70.0) * stripe
        layers.append((r0, r1, on_blade, np.clip(gray, 0.0, 255.0)[..., None] * tint))
    img *= shade[..., None]
    for r0, r1, on_blade, metal in layers:
        img[r0:r1] = img[r0:r1] * (f32(1.0) - on_blade) + metal * on_blade

    # Light: a gradient in a random direction and a vignette around the light's centre.
    phi = rng.uniform(0.0, 2.0 * np.pi)
    g = rng.uniform(0.05, 0.25) / s
    grad = f32(1.0) + (xx - s / 2) * f32(g * np.cos(phi)) + (yy - s / 2) * f32(g * np.sin(phi))
    lx0, ly0 = s * rng.uniform(0.4, 0.6), s * rng.uniform(0.4, 0.6)
    vig = f32(1.0) - f32(rng.uniform(0.35, 0.65) / (0.5 * s * s)) * (
        (xx - lx0) ** 2 + (yy - ly0) ** 2
    )
    img *= (np.clip(grad * vig, 0.2, 1.3) * f32(rng.uniform(0.9, 1.1)))[..., None]

    # Specular highlights: small, saturated, sharp; on the wet tissue and on the metal.
    spec = np.zeros((size, size), dtype=f32)
    n_spots = int(rng.integers(4, 14))
    rad = r * np.sqrt(rng.uniform(0.0, 0.9, n_spots))
    ang = rng.uniform(0.0, 2.0 * np.pi, n_spots)
    n_metal = int(rng.integers(1, 4))
    sx = np.concatenate([cx + rad * np.cos(ang), rng.uniform(0.1, 0.9, n_metal) * s])
    edges = np.where(rng.uniform(size=n_metal) < 0.5, p.blade_top - 0.03, p.blade_bottom + 0.03)
    sy = np.concatenate([cy + rad * np.sin(ang), edges * s])
    scale = size / 192.0
    sig_a = rng.uniform(0.5, 1.3, len(sx)) * scale
    sig_b = sig_a * rng.uniform(1.0, 2.2, len(sx))
    rot = rng.uniform(0.0, np.pi, len(sx))
    for x_, y_, a_, b_, t_ in zip(sx, sy, sig_a, sig_b, rot):
        half = int(np.ceil(3.0 * b_)) + 1
        ya, yb = max(0, int(y_) - half), min(size, int(y_) + half + 1)
        xa, xb = max(0, int(x_) - half), min(size, int(x_) + half + 1)
        if ya >= yb or xa >= xb:
            continue
        ddx, ddy = xx[:, xa:xb] - float(x_), yy[ya:yb] - float(y_)
        ct, st = float(np.cos(t_)), float(np.sin(t_))
        q = ((ddx * ct + ddy * st) * f32(1.0 / b_)) ** 2 + (
            (ddy * ct - ddx * st) * f32(1.0 / a_)
        ) ** 2
        np.maximum(spec[ya:yb, xa:xb], np.exp(f32(-0.5) * q), out=spec[ya:yb, xa:xb])
    spec = np.clip(spec * f32(1.6), 0.0, 1.0)[..., None]
    img = img * (f32(1.0) - spec) + f32(255.0) * spec

    # Camera: colour cast, slight blur, sensor noise.
    img *= rng.normal(1.0, 0.04, 3).astype(f32)
    img = _blur3(img)
    img += rng.standard_normal(img.shape, dtype=f32) * f32(rng.uniform(1.0, 3.0))
    out = np.clip(img + f32(0.5), 0, 255).astype(np.uint8)

    box = None
    if lesion:
        ys, xs = np.nonzero(lesion_mask > 0.1)
        if len(xs):
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return CervixImage(out, box, lesion_mask)


# -- dataset -------------------------------------------------------------------------------------


def _save_png(array: np.ndarray, path: Path) -> None:
    # No fsync: the images are regenerated from the seed, and a sync per image adds about
    # 10-15% to the write (512 px PNGs, 2-core x86-64 CPU).
    image = Image.fromarray(array)
    atomic_write(path, lambda fh: image.save(fh, format="PNG", compress_level=1), fsync=False)


def make_synthetic_cervix(
    out_dir: str | os.PathLike[str],
    *,
    num_unlabeled: int = 200,
    num_patients: int = 40,
    images_per_patient: int = 3,
    image_size: int = 192,
    positive_fraction: float = 0.4,
    seed: int = 0,
    progress: bool = True,
) -> SyntheticDataset:
    """Write a seeded synthetic cervix-like dataset of PNG files and a CSV manifest.

    Layout::

        out_dir/unlabeled/u00000.png ...         # for self-supervised pretraining
        out_dir/labeled/P000_0.png ...           # patient P000, shots 0, 1, ...
        out_dir/labeled.csv                      # image,label,patient,visit,lesion_x0,...
        out_dir/synthetic_info.json              # settings and counts

    Labels are per patient: a ``positive_fraction`` of the patients (rounded; at least one
    of each class when there are two or more patients) are positive, with raw label
    ``CIN2`` or ``CIN3`` and a lesion on every image; the others are ``CIN0`` or ``CIN1``
    without lesion. Lesion boxes (``x0, y0, x1, y1`` in pixels, ``x1``/``y1`` exclusive) are
    filled for positive rows only. All of a patient's images belong to visit ``"1"``.
    Unlabeled images come from other patients, with lesions at the same rate (not recorded).

    Every image depends only on ``seed`` and its own index, not on the counts (image
    ``u00007`` is the same whatever ``num_unlabeled``).

    Args:
        out_dir: Output folder (created; existing files with the same names are replaced).
        num_unlabeled: Unlabeled images (>= 0).
        num_patients: Labeled patients (>= 0).
        images_per_patient: Images per labeled patient (>= 1).
        image_size: Side of the square images in pixels (>= 32).
        positive_fraction: Share of positive patients, in [0, 1].
        seed: Seed.
        progress: Show a progress bar.

    Returns:
        A :class:`SyntheticDataset` with the paths and counts.
    """
    from tqdm.auto import tqdm  # deferred: a display library

    for name, value, low in (
        ("num_unlabeled", num_unlabeled, 0),
        ("num_patients", num_patients, 0),
        ("images_per_patient", images_per_patient, 1),
        ("image_size", image_size, 32),
    ):
        check_int(value, name, minimum=low)
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}")
    start = time.perf_counter()
    root = Path(out_dir)
    unl_dir, lab_dir = root / "unlabeled", root / "labeled"
    unl_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)

    num_pos = round(positive_fraction * num_patients)
    if num_patients >= 2 and 0.0 < positive_fraction < 1.0:
        num_pos = min(max(num_pos, 1), num_patients - 1)
    order = np.random.default_rng([seed, 0]).permutation(num_patients)
    positive = np.zeros(num_patients, dtype=bool)
    positive[order[:num_pos]] = True

    total = num_unlabeled + num_patients * images_per_patient
    bar = tqdm(
        total=total, desc="synthetic", unit="img", disable=not progress or not sys.stderr.isatty()
    )
    for i in range(num_unlabeled):
        rng = np.random.default_rng([seed, 3, i])
        has_lesion = bool(rng.uniform() < positive_fraction)
        _save_png(
            render_cervix(rng, image_size, lesion=has_lesion).image, unl_dir / f"u{i:05d}.png"
        )
        bar.update(1)

    rows: list[dict[str, Any]] = []
    for pid in range(num_patients):
        prng = np.random.default_rng([seed, 1, pid])
        params = sample_cervix_params(prng)
        is_pos = bool(positive[pid])
        grade = (
            ("CIN2", "CIN3")[int(prng.integers(2))]
            if is_pos
            else ("CIN0", "CIN1")[int(prng.integers(2))]
        )
        for k in range(images_per_patient):
            rng = np.random.default_rng([seed, 2, pid, k])
            shot = _shot(params, rng) if k > 0 else params
            out = render_cervix(rng, image_size, lesion=is_pos, params=shot)
            name = f"P{pid:03d}_{k}.png"
            _save_png(out.image, lab_dir / name)
            box = out.lesion_box if is_pos else None
            rows.append(
                {
                    "image": f"labeled/{name}",
                    "label": grade,
                    "patient": f"P{pid:03d}",
                    "visit": "1",
                    "lesion_x0": "" if box is None else box[0],
                    "lesion_y0": "" if box is None else box[1],
                    "lesion_x1": "" if box is None else box[2],
                    "lesion_y1": "" if box is None else box[3],
                }
            )
            bar.update(1)
    bar.close()

    manifest = root / "labeled.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(MANIFEST_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(manifest, text.getvalue())

    num_positive_images = int(positive.sum()) * images_per_patient
    info = root / "synthetic_info.json"
    payload = {
        "generator": "patchssl.data.synthetic.make_synthetic_cervix",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_unlabeled": num_unlabeled,
        "num_patients": num_patients,
        "images_per_patient": images_per_patient,
        "positive_fraction": positive_fraction,
        "num_labeled": len(rows),
        "num_positive_images": num_positive_images,
        "num_positive_patients": int(positive.sum()),
        "label_map": "cervix (CIN0, CIN1 -> 0 negative; CIN2, CIN3 -> 1 positive)",
        "label_level": "patient",
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write(info, json.dumps(payload, indent=1) + "\n")
    return SyntheticDataset(
        root=root,
        unlabeled_dir=unl_dir,
        labeled_dir=lab_dir,
        manifest=manifest,
        info=info,
        num_unlabeled=num_unlabeled,
        num_labeled=len(rows),
        num_positive=num_positive_images,
        num_patients=num_patients,
    )
