"""Grid geometry and batched patch extraction.

:class:`PatchTiler` cuts a batch of images into a rows x cols grid of square (or
rectangular) patches with space between them, on whatever device the images live, in one
gather over the whole batch: no Python loop over images or patches. It is the first step of
every patch-based pretext task and of :class:`~patchssl.classifier.PatchClassifier`.

References:
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016 (arXiv:1603.09246): 3x3 tiles with a random gap, so that the puzzle
    cannot be solved from edges that touch.

    Chae, Zimmermann, Kim & Kim, "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis", JIPS 17(3), 2021: 512 x 512 images, 3x3 patches of 153 px.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from patchssl._validation import as_pair

__all__ = ["PatchTiler", "TiledPatches", "default_tiler", "paper_image_size"]

# The paper's geometry (Chae et al., JIPS 2021): a 3x3 grid of 153 px patches in 512 px images.
_PAPER_IMAGE, _PAPER_PATCHES = 512, 3 * 153


class TiledPatches(NamedTuple):
    """The output of :class:`PatchTiler`.

    Attributes:
        patches: Tensor of shape ``(B, N, C, h, w)``, same dtype and device as the images;
            ``N = rows * cols``, numbered row-major.
        boxes: Long tensor of shape ``(B, N, 4)``: each patch's ``(x0, y0, x1, y1)`` in image
            pixels (``x1``/``y1`` exclusive), so that attention can be drawn back onto the image.
    """

    patches: Tensor
    boxes: Tensor


class PatchTiler(nn.Module):
    """Cut images into a grid of patches, with a gap and optional random jitter.

    The image is divided into ``rows x cols`` equal cells (``cell = image_size // rows`` per
    axis, the grid centred in the image). Each patch lies inside its cell; ``gap`` pixels are
    always kept between neighbouring patches; in training mode each patch is shifted at random
    by up to ``jitter`` pixels from the centre of its cell (per patch, per axis), in evaluation
    mode (``tiler.eval()``) it sits at the centre. The module has no parameters; it follows the
    train/eval mode of the model it sits in.

    The paper's geometry is the default: a 512 px image, 3x3 cells of 170 px, patches of
    153 px, so up to 17 px of space between patches and up to 8 px of jitter.

    Args:
        grid: Number of patches per axis, an int or ``(rows, cols)``.
        patch_size: Patch side in pixels, an int or ``(h, w)``.
        image_size: Image side in pixels, an int or ``(H, W)``. Images given to
            :meth:`forward` must have this size (resize them first, e.g. with
            ``patchssl prepare``).
        gap: Minimum space in pixels kept between neighbouring patches, whatever the jitter
            (default 0: with full jitter, neighbours may touch).
        jitter: Largest random shift (px) of a patch from the centre of its cell. ``None``
            (default) uses the largest shift that the cell and ``gap`` allow; ``0`` disables
            jitter.

    Raises:
        ValueError: If the patches plus gaps do not fit in the image, or ``jitter`` is larger
            than the cell allows. The message names the numbers.

    Example:
        >>> tiler = PatchTiler(grid=3, patch_size=64, image_size=224)
        >>> images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
        >>> patches, boxes = tiler(images)
        >>> patches.shape, boxes.shape
        (torch.Size([2, 9, 3, 64, 64]), torch.Size([2, 9, 4]))
    """

    def __init__(
        self,
        grid: int | tuple[int, int] = (3, 3),
        patch_size: int | tuple[int, int] = 153,
        image_size: int | tuple[int, int] = 512,
        *,
        gap: int = 0,
        jitter: int | None = None,
    ) -> None:
        super().__init__()
        self.grid = as_pair(grid, "grid")
        self.patch_size = as_pair(patch_size, "patch_size")
        self.image_size = as_pair(image_size, "image_size")
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"gap must be a non-negative int (pixels); got {gap!r}")
        self.gap = gap

        starts: list[Tensor] = []
        room: list[int] = []  # the largest jitter each axis allows
        cells: list[int] = []
        axis_names = ("rows", "cols")
        for axis in range(2):
            n, p, size = self.grid[axis], self.patch_size[axis], self.image_size[axis]
            need = n * p + (n - 1) * gap
            if need > size:
                dim = "height" if axis == 0 else "width"
                raise ValueError(
                    f"{n} patches of {p} px plus gaps of {gap} px need at least {need} px of "
                    f"image {dim}; got {size}. Use a larger image_size, a smaller patch_size "
                    f"or fewer {axis_names[axis]}."
                )
            cell = size // n
            # Inside its cell a patch keeps gap/2 from each cell border (rounded so that two
            # neighbours always keep `gap` between them) and sits centred in what is left.
            low, high = gap // 2, cell - (gap - gap // 2) - p
            if high >= low:
                centre = (low + high) // 2
                margin = (size - n * cell) // 2
                starts.append(margin + torch.arange(n) * cell + centre)
                room.append(min(centre - low, high - centre))
            else:
                # Equal cells are a pixel or two short: lay the patches at an exact pitch of
                # patch + gap (the check above guarantees that fits), with no room to jitter.
                cell = p + gap
                margin = (size - need) // 2
                starts.append(margin + torch.arange(n) * cell)
                room.append(0)
            cells.append(cell)
        self._cell = tuple(cells)
        max_jitter = min(room)
        if jitter is None:
            jitter = max_jitter
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise ValueError(f"jitter must be a non-negative int (pixels) or None; got {jitter!r}")
        if jitter > max_jitter:
            raise ValueError(
                f"jitter={jitter} px does not fit: cells of {self._cell[0]}x{self._cell[1]} px "
                f"holding patches of {self.patch_size[0]}x{self.patch_size[1]} px with a gap of "
                f"{gap} px leave room for at most {max_jitter} px. Lower jitter or gap, or use a "
                "smaller patch_size."
            )
        self.jitter = jitter

        # Top-left corner of each patch at centre placement: (N, 2) as (y, x), row-major.
        origin = torch.stack(torch.meshgrid(starts[0], starts[1], indexing="ij"), dim=-1)
        origin = origin.reshape(-1, 2)
        self.register_buffer("_origin", origin.long(), persistent=False)
        self.register_buffer("_offsets_y", torch.arange(self.patch_size[0]), persistent=False)
        self.register_buffer("_offsets_x", torch.arange(self.patch_size[1]), persistent=False)

    @property
    def num_patches(self) -> int:
        """Number of patches per image, ``rows * cols``."""
        return self.grid[0] * self.grid[1]

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this tiler with ``PatchTiler(**config)``."""
        return {
            "grid": list(self.grid),
            "patch_size": list(self.patch_size),
            "image_size": list(self.image_size),
            "gap": self.gap,
            "jitter": self.jitter,
        }

    def extra_repr(self) -> str:
        """Geometry shown in ``repr(tiler)``."""
        return (
            f"grid={self.grid}, patch_size={self.patch_size}, image_size={self.image_size}, "
            f"gap={self.gap}, jitter={self.jitter}"
        )

    def centre_boxes(self, device: torch.device | str | None = None) -> Tensor:
        """Boxes of the patches at centre placement.

        Args:
            device: Device of the result (default: the tiler's buffers' device).

        Returns:
            Long tensor of shape ``(N, 4)``: ``(x0, y0, x1, y1)`` per patch, row-major.
        """
        y0, x0 = self._origin[:, 0], self._origin[:, 1]
        boxes = torch.stack([x0, y0, x0 + self.patch_size[1], y0 + self.patch_size[0]], dim=-1)
        return boxes if device is None else boxes.to(device)

    def _corners(self, batch: int, device: torch.device, jitter: bool, generator: Any) -> Tensor:
        origin = self._origin.to(device).expand(batch, -1, -1)
        if not jitter or self.jitter == 0:
            return origin
        shift = torch.randint(
            -self.jitter,
            self.jitter + 1,
            (batch, self.num_patches, 2),
            generator=generator,
            device=generator.device if generator is not None else "cpu",
        )
        return origin + shift.to(device, non_blocking=True)  # no wait for the device's queue

    def forward(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        jitter: bool | None = None,
    ) -> TiledPatches:
        """Cut a batch of images into patches.

        Args:
            images: Tensor of shape ``(B, C, H, W)`` with ``(H, W) == image_size``; any dtype
                (uint8 or float) and any device.
            generator: Source of the jitter; a CPU generator works for images on any device,
                a generator on the images' device avoids a copy. ``None`` uses the global RNG.
            jitter: Whether to shift patches at random. ``None`` (default): in training mode
                only.

        Returns:
            :class:`TiledPatches` with ``patches`` of shape ``(B, N, C, h, w)`` (same dtype
            and device as ``images``) and ``boxes`` of shape ``(B, N, 4)``.

        Raises:
            ValueError: If ``images`` is not 4-D or its size differs from ``image_size``.
        """
        if images.ndim != 4:
            raise ValueError(
                f"PatchTiler expects images of shape (B, C, H, W); got {tuple(images.shape)}. "
                "Add a batch dimension with images.unsqueeze(0) for a single image."
            )
        batch, _, height, width = images.shape
        if (height, width) != self.image_size:
            raise ValueError(
                f"PatchTiler was built for {self.image_size[0]}x{self.image_size[1]} images; got "
                f"{height}x{width}. Resize the images first (patchssl.data.load_image(..., "
                "image_size=...) or `patchssl prepare`), or build the tiler with "
                f"image_size=({height}, {width})."
            )
        use_jitter = self.training if jitter is None else jitter
        corners = self._corners(batch, images.device, use_jitter, generator)  # (B, N, 2)
        ph, pw = self.patch_size
        # A view of every possible window, (B, C, H - ph + 1, W - pw + 1, ph, pw), costs no copy;
        # one advanced index on its two window axes gathers all patches of the batch at once,
        # copying whole patch rows (much faster than indexing every pixel).
        windows = images.unfold(2, ph, 1).unfold(3, pw, 1)
        b = torch.arange(batch, device=images.device)[:, None]
        patches = windows[b, :, corners[..., 0], corners[..., 1]]  # (B, N, C, ph, pw)
        y0, x0 = corners[..., 0], corners[..., 1]
        boxes = torch.stack([x0, y0, x0 + self.patch_size[1], y0 + self.patch_size[0]], dim=-1)
        return TiledPatches(patches, boxes)

    def assemble(
        self,
        patches: Tensor,
        boxes: Tensor | None = None,
        *,
        fill: float = 0.0,
    ) -> Tensor:
        """Place patches back into an image, for visualisation.

        Args:
            patches: Tensor of shape ``(B, N, C, h, w)``.
            boxes: Long tensor of shape ``(B, N, 4)`` or ``(N, 4)`` as returned by
                :meth:`forward`; default: centre placement.
            fill: Value of the pixels that no patch covers (the gaps).

        Returns:
            Tensor of shape ``(B, C, H, W)``, same dtype and device as ``patches``.
        """
        if patches.ndim != 5 or patches.shape[1] != self.num_patches:
            raise ValueError(
                f"assemble expects patches of shape (B, {self.num_patches}, C, "
                f"{self.patch_size[0]}, {self.patch_size[1]}); got {tuple(patches.shape)}"
            )
        batch, n, channels = patches.shape[:3]
        if tuple(patches.shape[3:]) != self.patch_size:
            raise ValueError(
                f"assemble expects {self.patch_size[0]}x{self.patch_size[1]} patches; got "
                f"{patches.shape[3]}x{patches.shape[4]}"
            )
        device = patches.device
        if boxes is None:
            boxes = self.centre_boxes(device)
        boxes = boxes.to(device).expand(batch, n, 4)
        rows = boxes[..., 1, None] + self._offsets_y.to(device)  # (B, N, h)
        cols = boxes[..., 0, None] + self._offsets_x.to(device)  # (B, N, w)
        image = patches.new_full((batch, channels, *self.image_size), fill)
        b = torch.arange(batch, device=device)[:, None, None, None]
        image[b, :, rows[..., :, None], cols[..., None, :]] = patches.permute(0, 1, 3, 4, 2)
        return image


def paper_image_size(
    patch_size: int | tuple[int, int], grid: int | tuple[int, int] = (3, 3)
) -> tuple[int, int]:
    """The image size that keeps the paper's proportions for a patch size and grid.

    Chae et al. cut 512 px images into a 3x3 grid of 153 px patches, which leaves about 17 px
    per cell for the gap and the jitter. This keeps that ratio for any patch size and grid:
    ``H = ceil(rows * h * 512 / 459)`` and ``W = ceil(cols * w * 512 / 459)``, so 153 px
    patches give 512 px images and 64 px patches 215 px images. Every default geometry in
    patchssl (pretext tasks, the classifier, the command line) comes from this function, so
    a task and a classifier built with their defaults accept the same images.

    Args:
        patch_size: Patch side ``h`` (or ``(h, w)``).
        grid: ``rows`` (square grid) or ``(rows, cols)``.

    Returns:
        ``(H, W)``.

    References:
        Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
        Dysplasia Diagnosis", JIPS 17(3), 2021.
    """
    ph, pw = as_pair(patch_size, "patch_size")
    rows, cols = as_pair(grid, "grid")
    return (
        -(-rows * ph * _PAPER_IMAGE // _PAPER_PATCHES),
        -(-cols * pw * _PAPER_IMAGE // _PAPER_PATCHES),
    )


def default_tiler(
    patch_size: int | tuple[int, int],
    grid: int | tuple[int, int] = (3, 3),
    image_size: int | tuple[int, int] | None = None,
) -> PatchTiler:
    """The tiler every block builds when none is given: the paper's geometry, scaled.

    The image size is :func:`paper_image_size` unless given; the gap and jitter are
    :class:`PatchTiler`'s defaults.

    Args:
        patch_size: Patch side ``h`` (or ``(h, w)``), normally the encoder's.
        grid: ``rows`` (square grid) or ``(rows, cols)``.
        image_size: Override the image size ``H`` (or ``(H, W)``).

    Returns:
        A :class:`PatchTiler`.

    Example:
        >>> default_tiler(153).image_size
        (512, 512)
    """
    if image_size is None:
        image_size = paper_image_size(patch_size, grid)
    return PatchTiler(grid=grid, patch_size=patch_size, image_size=image_size)
