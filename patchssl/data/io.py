"""Image decoding: any file Pillow reads, to an 8-bit ``(C, H, W)`` tensor at the working size.

Every image goes through the same steps, so that a folder of mixed files (JPEG photographs,
16-bit PNG scans, palette GIFs, RGBA screenshots) gives consistent tensors:

1. decode: a JPEG already at the working size (the resize cache of ``patchssl prepare``) with
   ``torchvision.io.decode_jpeg`` (libjpeg-turbo, no copy after decoding); anything else with
   Pillow (for a JPEG much larger than the working size, the decoder's DCT scaling skips
   most of the work);
2. apply the EXIF orientation tag (phone and camera photographs are often stored sideways);
3. convert to 8-bit RGB (or grayscale with ``channels=1``), see :func:`to_8bit`;
4. resize to the working size with an antialiased bilinear filter, see :func:`resize_image`.

A file that cannot be read raises :class:`ImageReadError`, naming the path and the reason.
Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed: a truncated file is an
error, not a silently grey-filled image. Pillow's decompression-bomb guard
(``Image.MAX_IMAGE_PIXELS``, about 89 megapixels by default; twice that is refused) is kept:
a cervix photograph (about 2800 x 1900 = 5.3 megapixels) is far below it. Raise
``PIL.Image.MAX_IMAGE_PIXELS`` yourself (in a run's config: ``data.max_image_pixels``) for
whole-slide sized files.

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (every image resized to 512 x 512 before tiling).
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from patchssl._validation import as_pair

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESIZE_MODES",
    "ImageReadError",
    "is_image_file",
    "load_image",
    "load_pil_image",
    "normalize_size",
    "pil_to_tensor",
    "resize_image",
    "to_8bit",
]

#: File name extensions (lower case) that folder scans pick up by default.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".webp",
    ".gif",
)

#: The resize modes :func:`resize_image` understands.
RESIZE_MODES: tuple[str, ...] = ("stretch", "pad", "center_crop")

ResizeMode = Literal["stretch", "pad", "center_crop"]
SizeLike = int | Sequence[int]

# EXIF orientations 5..8 swap width and height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


class ImageReadError(OSError):
    """An image file could not be read or decoded.

    Subclass of :class:`OSError`, so code that already catches Pillow's ``OSError`` keeps
    working. The message names the path and the reason.

    Args:
        path: The file that failed.
        reason: Why, in words (for example ``"image file is truncated"``).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot read image {self.path}: {self.reason}")

    def __str__(self) -> str:
        return f"cannot read image {self.path}: {self.reason}"

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[str, str]]:
        # Keep the exception picklable across process pools.
        return (type(self), (self.path, self.reason))


def normalize_size(image_size: SizeLike, name: str = "image_size") -> tuple[int, int]:
    """Turn an int or an ``(H, W)`` pair into a validated ``(H, W)`` tuple of positive ints.

    Args:
        image_size: ``S`` for ``S x S`` or ``(H, W)``.
        name: The argument name used in error messages.

    Returns:
        ``(H, W)``.

    Raises:
        ValueError: If a side is not a positive integer or the pair has the wrong length.
        TypeError: If ``image_size`` is neither an int nor a sequence of two ints.
    """
    return as_pair(image_size, name)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def _check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map an integer or float array to uint8 by the range its mode implies."""
    if mode.startswith("I;16"):
        # Unsigned 16-bit: use the full 0..65535 range (not clipping at 255).
        return (array.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "F":
        a = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(a)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    # "I": 32-bit signed integers. Files that fit in 0..65535 are 16-bit data (older Pillow
    # and some TIFF writers use "I" for them); anything else is min-max scaled.
    a = array.astype(np.int64)
    lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
    if lo >= 0 and hi <= 255 and array.dtype == np.uint8:
        return array.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return (a >> 8).astype(np.uint8)
    if hi > lo:
        return ((a - lo) * 255 // (hi - lo)).astype(np.uint8)
    return np.zeros(a.shape, dtype=np.uint8)


def to_8bit(image: Image.Image, channels: int = 3) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB (``channels=3``) or grayscale (``channels=1``).

    Conversions:

    * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's own conversion.
    * ``LA``, ``RGBA``, ``PA`` and palette images with a transparent colour: composited over
      black (a fully transparent pixel becomes black, a half transparent one half as bright),
      so hidden colour under transparent pixels never leaks into the tensor.
    * ``I;16`` (16-bit PNG/TIFF): scaled by the full 16-bit range (``value >> 8``), not clipped.
    * ``I`` (32-bit integer): values within 0..65535 are treated as 16-bit data (``>> 8``);
      other ranges are min-max scaled to 0..255.
    * ``F`` (32-bit float): values within [0, 1] are multiplied by 255; other ranges are
      min-max scaled; NaN and infinities become 0.

    Args:
        image: A decoded Pillow image (any mode).
        channels: 3 for RGB, 1 for grayscale (ITU-R 601-2 luma, as Pillow computes it).

    Returns:
        A Pillow image in mode ``"RGB"`` or ``"L"``.

    Raises:
        ValueError: For a mode that cannot be converted.
    """
    _check_channels(channels)
    target = "RGB" if channels == 3 else "L"
    mode = image.mode
    if mode == target:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = Image.fromarray(_scale_to_uint8(np.asarray(image), mode), mode="L")
        return gray if target == "L" else gray.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        return image.convert(target)
    if mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        # Composite over opaque black: colour * alpha / 255 (premultiplied alpha, rounded).
        with_alpha = image.convert("RGBA" if mode.startswith("RGB") else "LA")
        array = np.asarray(with_alpha).astype(np.uint16)
        color, alpha = array[..., :-1], array[..., -1:]
        premultiplied = ((color * alpha + 127) // 255).astype(np.uint8)
        if premultiplied.shape[-1] == 1:
            return Image.fromarray(premultiplied[..., 0], mode="L").convert(target)
        return Image.fromarray(premultiplied, mode="RGB").convert(target)
    try:
        return image.convert(target)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert image mode {mode!r} to {target}: {err}") from err


def resize_image(
    image: Image.Image,
    image_size: SizeLike,
    resize: ResizeMode | str = "stretch",
    *,
    fill: int = 0,
) -> Image.Image:
    """Resize a Pillow image to ``image_size`` with an antialiased bilinear filter.

    Modes:

    * ``"stretch"`` (the paper's): every image to exactly ``H x W``, aspect ratio ignored.
    * ``"pad"`` (letterbox): scale to fit inside ``H x W`` keeping the aspect ratio, centre,
      fill the borders with ``fill``.
    * ``"center_crop"``: scale to cover ``H x W`` keeping the aspect ratio, cut the centre.

    Images smaller than the working size are upscaled (bilinear), never padded in
    ``"stretch"`` mode.

    Args:
        image: Pillow image (``RGB`` or ``L``).
        image_size: ``S`` or ``(H, W)``.
        resize: One of :data:`RESIZE_MODES`.
        fill: Border value for ``"pad"`` (0 = black).

    Returns:
        A Pillow image of size ``W x H`` (Pillow's ``size`` is ``(W, H)``).
    """
    _check_resize(resize)
    h, w = normalize_size(image_size)
    src_w, src_h = image.size
    bilinear = Image.Resampling.BILINEAR
    if resize == "stretch":
        if (src_w, src_h) == (w, h):
            return image
        return image.resize((w, h), bilinear)
    if resize == "pad":
        scale = min(w / src_w, h / src_h)
        new_w = max(1, min(w, round(src_w * scale)))
        new_h = max(1, min(h, round(src_h * scale)))
        scaled = (
            image if (new_w, new_h) == (src_w, src_h) else image.resize((new_w, new_h), bilinear)
        )
        if (new_w, new_h) == (w, h):
            return scaled
        canvas = Image.new(image.mode, (w, h), fill if image.mode == "L" else (fill,) * 3)
        canvas.paste(scaled, ((w - new_w) // 2, (h - new_h) // 2))
        return canvas
    # center_crop: resize the covering box straight from the source region (one resample).
    scale = max(w / src_w, h / src_h)
    crop_w, crop_h = w / scale, h / scale
    left, top = (src_w - crop_w) / 2.0, (src_h - crop_h) / 2.0
    return image.resize((w, h), bilinear, box=(left, top, left + crop_w, top + crop_h))


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, Image.DecompressionBombError):
        return (
            f"{text} (larger than twice PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}; "
            "raise PIL.Image.MAX_IMAGE_PIXELS, or data.max_image_pixels in a run's config, "
            "if you trust the file)"
        )
    if isinstance(err, UnidentifiedImageError):
        return "not an image file Pillow can identify (corrupt, or not an image)"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, SyntaxError | EOFError | struct.error) or "truncated" in text.lower():
        # Pillow's parsers signal a broken file this way (e.g. "Truncated File Read").
        return f"corrupt or truncated file ({text})"
    return text


def load_pil_image(
    path: str | os.PathLike[str],
    image_size: SizeLike | None = None,
    *,
    channels: int = 3,
    resize: ResizeMode | str = "stretch",
) -> Image.Image:
    """Decode, orient, convert and resize one image file; return a Pillow image.

    Same steps as :func:`load_image`, without the tensor conversion (used by the resize
    cache, which writes Pillow images back to disk).

    Args:
        path: Image file.
        image_size: ``S``, ``(H, W)`` or None to keep the decoded size.
        channels: 3 (RGB) or 1 (grayscale).
        resize: One of :data:`RESIZE_MODES`.

    Returns:
        A Pillow image in mode ``"RGB"`` or ``"L"``.

    Raises:
        ImageReadError: If the file is missing, not an image, corrupt or truncated.
    """
    _check_channels(channels)
    _check_resize(resize)
    size = None if image_size is None else normalize_size(image_size)
    _check_regular_file(path)
    try:
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG":
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                h, w = size
                if orientation in _TRANSPOSING_ORIENTATIONS:
                    h, w = w, h
                # DCT scaling: decode at >= the requested size, up to 8x faster.
                want = (w, h) if resize == "stretch" else (max(w, h), max(w, h))
                im.draft(im.mode, want)
            im.load()
            image = ImageOps.exif_transpose(im)
            image = to_8bit(image, channels)
    except ImageReadError:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        struct.error,
        Image.DecompressionBombError,
    ) as err:
        raise ImageReadError(path, _reason(err)) from err
    except Exception as err:  # third-party plugins raise anything
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from err
    if size is not None:
        image = resize_image(image, size, resize)
    return image


def _check_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ImageReadError` unless ``path`` is a regular file (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise ImageReadError(path, _reason(err)) from err
    if not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            raise ImageReadError(path, "is a directory, not a file")
        raise ImageReadError(path, "not a regular file (a FIFO, socket or device)")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert an ``RGB`` or ``L`` Pillow image to a uint8 tensor, with one copy.

    The pixels are copied once out of Pillow's buffer, in Pillow's ``(H, W, C)`` order, and
    the tensor is a ``(C, H, W)`` view of them (channels-last strides, as
    ``torchvision.io.decode_jpeg`` returns): :func:`collate_skip_failed
    <patchssl.data.datasets.collate_skip_failed>` stacks such views into a channels-last
    batch without transposing. Call ``.contiguous()`` for a channels-first copy.

    Args:
        image: Pillow image in mode ``"RGB"`` or ``"L"``.

    Returns:
        Tensor of shape ``(C, H, W)``, dtype uint8, ``C`` = 3 or 1.
    """
    # torchvision's pil_to_tensor copies Pillow's buffer once and returns the (C, H, W) view.
    # deferred: torchvision takes seconds to import; `import patchssl.data` stays quick
    from torchvision.transforms.functional import pil_to_tensor as _pil_to_tensor

    return _pil_to_tensor(image)


_JPEG_SIGNATURE = b"\xff\xd8\xff"


def _decode_jpeg_at_size(
    path: str | os.PathLike[str], size: tuple[int, int] | None, channels: int
) -> torch.Tensor | None:
    """Decode a JPEG that needs no resizing with ``torchvision.io.decode_jpeg``, or ``None``.

    The fast path of :func:`load_image` (1.0x ``decode_jpeg`` itself, against about 1.7x
    for Pillow's decode and conversion). It only takes files whose header (read by Pillow,
    which keeps the decompression-bomb guard) says baseline or progressive 8-bit ``RGB`` or
    ``L``, no EXIF rotation, and the working size already; anything else, and any file
    ``decode_jpeg`` cannot decode, returns ``None`` so that the Pillow path decodes it or
    raises its :class:`ImageReadError` (the same messages as before).
    """
    try:
        with open(path, "rb") as f:
            if f.read(3) != _JPEG_SIGNATURE:
                return None
            f.seek(0)
            data = bytearray(f.read())
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            if size is not None and im.size != (size[1], size[0]):
                return None
            if channels == 1 and im.mode != "L":
                return None  # Pillow's luma weights, not libjpeg's
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
        from torchvision.io import ImageReadMode, decode_jpeg  # deferred: torchvision is slow

        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        with warnings.catch_warnings():
            # torchvision >= 0.29 says its decoders will move to torchcodec; when they are
            # gone, the import fails and Pillow decodes everything again.
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=mode)
    except Exception:  # the Pillow path reports the reason, or decodes what libjpeg refused
        return None


def load_image(
    path: str | os.PathLike[str],
    image_size: SizeLike | None = None,
    *,
    channels: int = 3,
    resize: ResizeMode | str = "stretch",
) -> torch.Tensor:
    """Read one image file as a uint8 tensor at the working size.

    Decodes with Pillow, applies the EXIF orientation, converts to 8-bit RGB (see
    :func:`to_8bit` for grayscale, alpha, palette, CMYK, 16-bit and float files) and resizes
    with an antialiased bilinear filter (see :func:`resize_image`). Images smaller than the
    working size are upscaled. A JPEG already at the working size, upright, RGB or
    grayscale (what ``patchssl prepare`` writes) is decoded by ``torchvision.io.decode_jpeg``
    instead, with the same pixels (both use libjpeg-turbo) in 0.6x the time.

    Args:
        path: Image file (PNG, JPEG, TIFF, BMP, WebP, GIF, ...).
        image_size: ``S`` for ``S x S``, ``(H, W)``, or None to keep the decoded size.
        channels: 3 (RGB) or 1 (grayscale).
        resize: ``"stretch"`` (paper: aspect ratio ignored), ``"pad"`` (letterbox, black
            borders) or ``"center_crop"``.

    Returns:
        Tensor of shape ``(C, H, W)``, dtype uint8 (0..255), a view of ``(H, W, C)`` memory
        (channels-last strides, no transposing copy; ``.contiguous()`` makes one).

    Raises:
        ImageReadError: If the file is missing, not an image, corrupt or truncated; the
            message names the path and the reason.
        ValueError: For an invalid ``channels``, ``resize`` or ``image_size``.

    Example:
        >>> img = load_image("cervix_0001.jpg", 512)  # doctest: +SKIP
        >>> img.shape, img.dtype  # doctest: +SKIP
        (torch.Size([3, 512, 512]), torch.uint8)
    """
    _check_channels(channels)
    _check_resize(resize)
    size = None if image_size is None else normalize_size(image_size)
    _check_regular_file(path)  # before any open: a FIFO would block the reader forever
    fast = _decode_jpeg_at_size(path, size, channels)
    if fast is not None:
        return fast
    return pil_to_tensor(load_pil_image(path, size, channels=channels, resize=resize))


def is_image_file(
    path: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> bool:
    """Whether ``path`` has one of ``extensions`` (case-insensitive) and is not hidden.

    Hidden files (starting with ``.``, such as macOS ``._name.jpg`` resource forks) are
    never images.
    """
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(tuple(e.lower() for e in extensions))
