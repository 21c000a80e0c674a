"""Shortcut defences of the pretext tasks: on whole images before tiling, and on patches.

A network asked where a tile belongs will happily read the answer from cues that say nothing
about what the tile shows. Two kinds of defence, both batched on the device with every random
choice drawn from the caller's generator:

* :class:`ImageDefences`, on the whole image before it is cut: a random resized crop and the
  eight symmetries of the square (flips, quarter turns). When every image has the same
  layout (the sky on top, the cervix in the centre), a single tile tells its absolute place
  in the grid, and the jigsaw puzzle is solved tile by tile without relating tiles to each
  other. Turned and mirrored images keep the puzzle (the tiles of each image still fit
  together) but take the layout away.
* :class:`PatchDefences`, on each tile: per-patch normalisation and colour dropping against
  lighting gradients and chromatic aberration (Noroozi & Favaro 2016; Doersch et al. 2015).

Beside them, :func:`color_jitter` distorts each view's colour for the contrastive tile task
(Chen et al. 2020), where colour must not identify a tile on its own.

References:
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016, arXiv:1603.09246.
    Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
    Prediction", ICCV 2015, arXiv:1505.05192.
    Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
    Rotations", ICLR 2018, arXiv:1803.07728 (quarter turns of whole images).
    Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020, arXiv:2002.05709 (colour distortion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchssl.pretext._random import random_integers, random_uniform

__all__ = [
    "COLOR_DROP_MODES",
    "ImageDefences",
    "ImageTransform",
    "PatchDefences",
    "apply_symmetries",
    "channel_jitter",
    "color_jitter",
    "random_grayscale",
    "standardize_patches",
    "unit_float",
]


def unit_float(images: Tensor) -> Tensor:
    """Pixels in ``[0, 1]`` as floats: uint8 (0..255) divided by 255, floats kept as they are.

    Args:
        images: Tensor of any shape, e.g. ``(B, C, H, W)`` or ``(B, N, C, h, w)``, uint8
            (0..255) or float (0..1).

    Returns:
        A float tensor of the same shape (float32 for uint8 input, else the input itself).
    """
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


#: The colour-dropping modes :class:`PatchDefences` understands.
COLOR_DROP_MODES = ("grayscale", "channel_jitter", "both")

# The symmetries of the square as 2x2 matrices acting on normalised (x, y) output
# coordinates (``grid_sample`` convention): index ``k = r + 4 * f`` is
# ``torch.rot90(image, r, dims=(-2, -1))`` followed, when ``f == 1``, by a flip of the width
# axis (``.flip(-1)``).
_SYMMETRIES = torch.tensor(
    [
        [[1, 0], [0, 1]],
        [[0, -1], [1, 0]],
        [[-1, 0], [0, -1]],
        [[0, 1], [-1, 0]],
        [[-1, 0], [0, 1]],
        [[0, -1], [-1, 0]],
        [[1, 0], [0, -1]],
        [[0, 1], [1, 0]],
    ],
    dtype=torch.float32,
)


# The same symmetries as (transpose, flip of the height axis, flip of the width axis), applied
# in that order: symmetry ``k`` equals ``torch.rot90(x, k % 4, dims=(-2, -1))`` then, for
# ``k >= 4``, ``.flip(-1)`` (checked in the tests).
_SYMMETRY_STEPS = torch.tensor(
    [[0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0], [1, 0, 0]],
    dtype=torch.bool,
)


def apply_symmetries(images: Tensor, symmetry: Tensor, *, table: Tensor | None = None) -> Tensor:
    """Turn and mirror each image of a batch exactly, in its own dtype (no resampling).

    Each of the eight symmetries of the square is an optional transpose followed by optional
    flips of the height and width axes; the batch takes each step with ``torch.where`` on
    per-image flags, so that no value is read on the host and uint8 images stay uint8.

    Args:
        images: Tensor of shape ``(B, C, H, W)``, any dtype.
        symmetry: Long tensor of shape ``(B,)`` in ``[0, 8)`` on the images' device: image
            ``b`` becomes ``torch.rot90(images[b], symmetry[b] % 4, dims=(-2, -1))``, then
            ``.flip(-1)`` when ``symmetry[b] >= 4``. Odd values (quarter turns) need square
            images; the caller checks (see :meth:`ImageDefences.sample`).
        table: The ``(8, 3)`` bool table of steps already on the images' device
            (:class:`ImageDefences` keeps one as a buffer, so that a training step copies
            nothing from the host); default: copied there on each call.

    Returns:
        Tensor of shape ``(B, C, H, W)`` and the images' dtype.
    """
    if table is None:
        table = _SYMMETRY_STEPS.to(images.device)
    steps = table[symmetry][:, :, None, None, None]  # (B, 3, 1, 1, 1)
    out = images
    if images.shape[-2] == images.shape[-1]:
        out = torch.where(steps[:, 0], out.transpose(-2, -1), out)
    out = torch.where(steps[:, 1], out.flip(-2), out)
    return torch.where(steps[:, 2], out.flip(-1), out)


class ImageTransform(NamedTuple):
    """The random draws of :class:`ImageDefences` for one batch.

    Attributes:
        symmetry: Long tensor of shape ``(B,)`` in ``[0, 8)``: image ``b`` becomes
            ``torch.rot90(crop, symmetry[b] % 4, dims=(-2, -1))``, then ``.flip(-1)`` when
            ``symmetry[b] >= 4``.
        boxes: Float tensor of shape ``(B, 4)``: the crop of each image as ``(x0, y0, x1,
            y1)`` fractions of its width and height (``(0, 0, 1, 1)`` without cropping).
    """

    symmetry: Tensor
    boxes: Tensor


class ImageDefences(nn.Module):
    """Batched image-level defences applied before tiling: random resized crop, flips, turns.

    In training each image gets a random crop (area a share of the image drawn uniformly in
    ``crop_scale``, aspect ratio log-uniform in ``crop_ratio``, position uniform) resized back
    to the image size, then one of the symmetries of the square allowed by ``flip`` and
    ``rot90``, all in one ``affine_grid`` + ``grid_sample`` (bilinear) over the batch. Without
    cropping the symmetries are exact moves of pixels (:func:`apply_symmetries`), in the
    images' own dtype: uint8 images stay uint8 (one byte a value instead of four), with no
    resampling. In ``eval()`` mode, or with every option off, the images pass through untouched.

    Why: the jigsaw puzzle should be solved by fitting tiles together, not by reading off each
    tile's absolute place from the scene's usual layout. A random crop moves the content
    within the grid; flips and quarter turns leave a tile's content no telling of its place
    (under all eight symmetries a tile's content can only tell whether it is the centre, an
    edge or a corner tile).

    Args:
        crop_scale: ``(low, high)`` share of the image area kept by the random crop, with
            ``0 < low <= high <= 1``; ``None`` turns cropping off.
        crop_ratio: ``(low, high)`` range of the crop's aspect ratio (width / height),
            sampled log-uniformly; the crop is clipped to the image.
        flip: Random horizontal and vertical flips (each image: identity, either flip, or
            both, i.e. a half turn, with probability 1/4 each without ``rot90``).
        rot90: Random quarter turns. With ``flip``, each of the eight symmetries of the
            square with probability 1/8. Non-square images get half turns only (a quarter
            turn would change their shape).

    Shape:
        - Input: ``(B, C, H, W)``, uint8 (0..255) or floating (0..1).
        - Output: ``(B, C, H, W)``: in training with cropping on, float (float32 for uint8
          input, scaled to 0..1); with flips or turns only, the input's dtype and scale;
          otherwise the input itself.

    Example:
        >>> defences = ImageDefences(crop_scale=(0.5, 1.0), flip=True, rot90=True)
        >>> images = torch.randint(0, 256, (4, 3, 108, 108), dtype=torch.uint8)
        >>> defences(images, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 108, 108])

    References:
        Noroozi & Favaro, ECCV 2016, arXiv:1603.09246 (random crops before tiling).
        Gidaris et al., ICLR 2018, arXiv:1803.07728 (quarter turns).
    """

    def __init__(
        self,
        *,
        crop_scale: tuple[float, float] | list[float] | None = None,
        crop_ratio: tuple[float, float] | list[float] = (3 / 4, 4 / 3),
        flip: bool = False,
        rot90: bool = False,
    ) -> None:
        super().__init__()
        if crop_scale is not None:
            crop_scale = _float_pair(crop_scale, "crop_scale")
            if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
                raise ValueError(
                    "crop_scale must be (low, high) with 0 < low <= high <= 1 (shares of the "
                    f"image area), or None to turn cropping off; got {crop_scale}"
                )
        crop_ratio = _float_pair(crop_ratio, "crop_ratio")
        if not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(
                f"crop_ratio must be (low, high) with 0 < low <= high; got {crop_ratio}"
            )
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.flip = bool(flip)
        self.rot90 = bool(rot90)
        self.register_buffer("_symmetries", _SYMMETRIES.clone(), persistent=False)
        self.register_buffer("_symmetry_steps", _SYMMETRY_STEPS.clone(), persistent=False)

    @property
    def active(self) -> bool:
        """Whether any option is on (the module then transforms images in training)."""
        return self.crop_scale is not None or self.flip or self.rot90

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able)."""
        return {
            "crop_scale": list(self.crop_scale) if self.crop_scale is not None else None,
            "crop_ratio": list(self.crop_ratio),
            "flip": self.flip,
            "rot90": self.rot90,
        }

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    def sample(
        self,
        batch: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        square: bool = True,
    ) -> ImageTransform:
        """Draw the crops and symmetries of a batch (without applying them).

        Args:
            batch: Number of images ``B``.
            generator: Source of randomness (drawn on its device, CPU by default).
            device: Where the draws go.
            square: Whether the images are square. For non-square images ``rot90`` draws
                half turns only (a quarter turn would change the shape).

        Returns:
            An :class:`ImageTransform` with ``symmetry`` ``(B,)`` and ``boxes`` ``(B, 4)``.
        """
        turns = torch.zeros(batch, dtype=torch.long, device=device)
        mirror = torch.zeros(batch, dtype=torch.long, device=device)
        if self.rot90 and square:
            turns = random_integers(4, (batch,), generator=generator, device=device)
        elif self.flip or self.rot90:  # a flip of both axes is a half turn
            turns = 2 * random_integers(2, (batch,), generator=generator, device=device)
        if self.flip:
            mirror = random_integers(2, (batch,), generator=generator, device=device)
        boxes = torch.zeros(batch, 4, device=device)  # made on the device: no copy to wait on
        boxes[:, 2:] = 1.0
        if self.crop_scale is not None:
            u = random_uniform((4, batch), generator=generator, device=device)
            low, high = self.crop_scale
            area = low + (high - low) * u[0]
            log_low, log_high = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
            ratio = torch.exp(log_low + (log_high - log_low) * u[1])
            width = torch.sqrt(area * ratio).clamp(max=1.0)
            height = torch.sqrt(area / ratio).clamp(max=1.0)
            x0 = (1.0 - width) * u[2]
            y0 = (1.0 - height) * u[3]
            boxes = torch.stack([x0, y0, x0 + width, y0 + height], dim=1)
        return ImageTransform(turns + 4 * mirror, boxes)

    def apply(self, images: Tensor, transform: ImageTransform) -> Tensor:
        """Crop, resize and turn a batch as ``transform`` says (one ``grid_sample``).

        Args:
            images: Tensor of shape ``(B, C, H, W)``, uint8 (0..255) or floating (0..1).
            transform: The draws from :meth:`sample`, on the images' device.

        Returns:
            Float tensor of shape ``(B, C, H, W)`` (float32 scaled to 0..1 for uint8 input).

        Raises:
            ValueError: A quarter turn of a non-square image.
        """
        b, _, h, w = images.shape
        if h != w and bool((transform.symmetry % 2 == 1).any()):
            raise ValueError(
                f"quarter turns need square images; got {h}x{w}. Resize the images to a "
                "square (data.image_size does) or build ImageDefences with rot90=False"
            )
        x = unit_float(images)
        boxes = transform.boxes.to(device=x.device, dtype=x.dtype)
        centre = boxes[:, :2] + boxes[:, 2:] - 1.0  # (x0 + x1) / 2 in [-1, 1]
        half = boxes[:, 2:] - boxes[:, :2]  # half sizes in normalised units: (x1 - x0) * 2 / 2
        matrix = self._symmetries.to(x.device, x.dtype)[transform.symmetry.to(x.device)]
        theta = torch.cat([half[:, :, None] * matrix, centre[:, :, None]], dim=2)  # (B, 2, 3)
        grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Apply the defences to a batch of images (training only).

        Args:
            images: Tensor of shape ``(B, C, H, W)``, uint8 (0..255) or floating (0..1).
            generator: Source of every random choice.

        Returns:
            Tensor of shape ``(B, C, H, W)``: in training with cropping on, float (resampled);
            with flips or turns only, the images turned exactly in their own dtype; else
            ``images`` itself.
        """
        if not self.training or not self.active:
            return images
        h, w = images.shape[-2:]
        transform = self.sample(
            images.shape[0], generator=generator, device=images.device, square=h == w
        )
        if self.crop_scale is None:  # symmetries only: exact, no resampling
            return apply_symmetries(images, transform.symmetry, table=self._symmetry_steps)
        return self.apply(images, transform)


def _float_pair(value: Any, what: str) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except TypeError:
        raise ValueError(f"{what} must be a pair of numbers (low, high); got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"{what} must be a pair of numbers (low, high); got {value!r}")
    return pair  # type: ignore[return-value]


class PatchDefences(nn.Module):
    """Batched defences against low-level shortcuts: colour dropping and per-patch normalisation.

    A network asked where a patch belongs will happily read the answer from low-level cues
    instead of learning what the patch shows: vignetting and lighting gradients (a patch's
    mean and contrast), and chromatic aberration (colour fringes that grow towards the lens
    border). Noroozi & Favaro (2016) normalise the mean and standard deviation of each tile
    independently and jitter the colour channels of each tile by a few pixels; Doersch et al.
    (2015) drop colour channels or project colours to gray. This module applies those ideas
    to a whole batch of patches at once, every random choice drawn from the caller's
    generator. Nothing here has parameters.

    Order: convert to float in ``[0, 1]``; in training only, colour dropping; then (always,
    also in eval) per-patch normalisation.

    Args:
        per_patch_norm: Standardise each channel of each patch by its own mean and standard
            deviation. The encoder must then skip its own normalisation
            (``encoder(patches, normalized=True)``), which :attr:`normalizes` tells the task.
        color_drop: ``None`` (off), ``"grayscale"`` (each patch turned gray with probability
            ``color_drop_prob``), ``"channel_jitter"`` (each colour channel of each patch
            shifted by up to ``channel_shift`` px in x and y, edges replicated), or ``"both"``.
            A no-op on one-channel images.
        color_drop_prob: Probability that a patch is turned gray (``"grayscale"``/``"both"``).
        channel_shift: Largest channel shift in px (``"channel_jitter"``/``"both"``).
        eps: Added to the standard deviation in per-patch normalisation.

    Shape:
        - Input: ``(B, N, C, h, w)``, uint8 or floating.
        - Output: ``(B, N, C, h, w)`` float (float32 for uint8 input).

    References:
        Noroozi & Favaro, ECCV 2016, arXiv:1603.09246 (Sec. 3.2).
        Doersch, Gupta & Efros, ICCV 2015, arXiv:1505.05192 (Sec. 3.1).
    """

    #: The constructor's options, as :attr:`config` lists them.
    KEYS: ClassVar[tuple[str, ...]] = (
        "per_patch_norm",
        "color_drop",
        "color_drop_prob",
        "channel_shift",
    )

    def __init__(
        self,
        *,
        per_patch_norm: bool = False,
        color_drop: str | None = None,
        color_drop_prob: float = 0.3,
        channel_shift: int = 2,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if color_drop is not None and color_drop not in COLOR_DROP_MODES:
            raise ValueError(
                f"color_drop must be None or one of {COLOR_DROP_MODES}; got {color_drop!r}"
            )
        if not 0.0 <= float(color_drop_prob) <= 1.0:
            raise ValueError(f"color_drop_prob must be in [0, 1]; got {color_drop_prob}")
        if int(channel_shift) != channel_shift or channel_shift < 0:
            raise ValueError(f"channel_shift must be an int >= 0 (px); got {channel_shift!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.per_patch_norm = bool(per_patch_norm)
        self.color_drop = color_drop
        self.color_drop_prob = float(color_drop_prob)
        self.channel_shift = int(channel_shift)
        self.eps = float(eps)

    @property
    def normalizes(self) -> bool:
        """Whether the output is already standardised (call the encoder with normalized=True)."""
        return self.per_patch_norm

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able)."""
        return {
            "per_patch_norm": self.per_patch_norm,
            "color_drop": self.color_drop,
            "color_drop_prob": self.color_drop_prob,
            "channel_shift": self.channel_shift,
        }

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def updated(self, options: Mapping[str, Any]) -> PatchDefences:
        """A new :class:`PatchDefences` with this one's options, some of them replaced.

        Args:
            options: Some of :attr:`KEYS` (e.g. ``{"per_patch_norm": False}``); the options
                not named keep this module's values.

        Returns:
            A new module (``eps`` kept).

        Raises:
            ValueError: An option :class:`PatchDefences` does not have, or an invalid value.
        """
        unknown = sorted(set(options) - set(self.KEYS))
        if unknown:
            raise ValueError(
                f"unknown patch defence option(s) {unknown}; the options are {list(self.KEYS)}"
            )
        return PatchDefences(**{**self.config, **options}, eps=self.eps)

    def forward(self, patches: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Apply the defences to a batch of patches.

        Args:
            patches: Tensor of shape ``(B, N, C, h, w)``, uint8 (0..255) or float (0..1).
            generator: Source of randomness for colour dropping.

        Returns:
            Float tensor of shape ``(B, N, C, h, w)``.
        """
        x = unit_float(patches)
        channels = x.shape[2]
        if self.training and self.color_drop is not None and channels > 1:
            if self.color_drop in ("channel_jitter", "both") and self.channel_shift > 0:
                x = channel_jitter(x, self.channel_shift, generator=generator)
            if self.color_drop in ("grayscale", "both") and self.color_drop_prob > 0:
                x = random_grayscale(x, self.color_drop_prob, generator=generator)
        if self.per_patch_norm:
            x = standardize_patches(x, eps=self.eps)
        return x


def standardize_patches(patches: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Standardise each channel of each patch by its own mean and standard deviation.

    Args:
        patches: Float tensor of shape ``(B, N, C, h, w)``.
        eps: Added to the standard deviation (flat patches become zeros, not NaN).

    Returns:
        Tensor of shape ``(B, N, C, h, w)``: zero mean, unit variance per (patch, channel).
    """
    mean = patches.mean(dim=(-2, -1), keepdim=True)
    std = patches.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (patches - mean) / (std + eps)


def random_grayscale(
    patches: Tensor, prob: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Turn each patch gray with probability ``prob`` (luma for 3 channels, mean otherwise).

    Args:
        patches: Float tensor of shape ``(B, N, C, h, w)``.
        prob: Probability per patch.
        generator: Source of randomness.

    Returns:
        Tensor of shape ``(B, N, C, h, w)``; gray patches have all channels equal.
    """
    b, n = patches.shape[:2]
    gray = _luma(patches)
    mask = random_uniform((b, n), generator=generator, device=patches.device) < prob
    return torch.where(mask.view(b, n, 1, 1, 1), gray.expand_as(patches), patches)


def channel_jitter(
    patches: Tensor, max_shift: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Shift each colour channel of each patch by up to ``max_shift`` px in x and y.

    Chromatic aberration displaces the colour channels against each other by an amount that
    depends on the position in the frame; random displacements of the same size hide that
    cue. Borders are replicated. Two gathers, no Python loop over the batch.

    Args:
        patches: Float tensor of shape ``(B, N, C, h, w)``.
        max_shift: Largest shift in px; shifts are uniform in ``[-max_shift, max_shift]``.
        generator: Source of randomness.

    Returns:
        Tensor of shape ``(B, N, C, h, w)``: ``out[..., c, y, x] = in[..., c, y - dy, x - dx]``
        with clamped indices.
    """
    b, n, c, h, w = patches.shape
    shifts = random_integers(
        2 * max_shift + 1, (2, b, n, c, 1), generator=generator, device=patches.device
    )
    shifts = shifts - max_shift
    rows = (torch.arange(h, device=patches.device) - shifts[0]).clamp_(0, h - 1)  # (B,N,C,h)
    cols = (torch.arange(w, device=patches.device) - shifts[1]).clamp_(0, w - 1)  # (B,N,C,w)
    out = patches.gather(3, rows.unsqueeze(-1).expand(b, n, c, h, w))
    return out.gather(4, cols.unsqueeze(-2).expand(b, n, c, h, w))


def _luma(images: Tensor) -> Tensor:
    """Gray level of ``(..., C, h, w)`` images: ITU-R 601 luma for 3 channels, else the mean."""
    if images.shape[-3] == 3:  # scalar weights: no constant tensor to copy to the device
        red, green, blue = images.split(1, dim=-3)
        return 0.299 * red + 0.587 * green + 0.114 * blue
    return images.mean(dim=-3, keepdim=True)


def color_jitter(
    images: Tensor, strength: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Scale the brightness, contrast and saturation of each image by its own random factors.

    SimCLR's colour distortion without the hue shift, batched: each of the three factors of
    each image is drawn uniformly from ``[1 - strength, 1 + strength]`` and applied in that
    order (brightness multiplies the pixels; contrast scales them about the image's mean gray
    level; saturation about each pixel's gray level), then the result is clipped to
    ``[0, 1]`` once (torchvision's ``adjust_*`` clip after each step; the two agree wherever
    no intermediate value leaves ``[0, 1]``). A global colour cast or exposure changes, while
    a region lighter than its surroundings (a whitening) stays lighter. Saturation is a no-op
    on one-channel images.

    Args:
        images: Float tensor of shape ``(M, C, h, w)`` with values in ``[0, 1]``.
        strength: Largest relative change, in ``[0, 1]``; 0 returns ``images`` unchanged.
        generator: Source of randomness.

    Returns:
        Tensor of shape ``(M, C, h, w)`` in ``[0, 1]``.

    Raises:
        ValueError: ``strength`` outside ``[0, 1]``, or ``images`` not 4-D (flatten the
            batch and patch dimensions of ``(B, N, C, h, w)`` patches first).

    References:
        Chen et al., "A Simple Framework for Contrastive Learning of Visual
        Representations", ICML 2020, arXiv:2002.05709 (Sec. 3 and Appendix A).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; got {strength!r}")
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape (M, C, h, w); got {tuple(images.shape)} (use "
            "patches.flatten(0, 1) for (B, N, C, h, w) patches)"
        )
    if strength == 0:
        return images
    m = images.shape[0]
    draws = random_uniform((m, 3), generator=generator, device=images.device)
    factors = (1.0 - strength + 2.0 * strength * draws).to(images.dtype).view(m, 3, 1, 1, 1)
    out = images * factors[:, 0]
    mean = _luma(out).mean(dim=(-2, -1), keepdim=True)
    out = (out - mean) * factors[:, 1] + mean
    gray = _luma(out)
    out = gray + (out - gray) * factors[:, 2]
    return out.clamp(0.0, 1.0)
