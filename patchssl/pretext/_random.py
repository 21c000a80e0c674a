"""Randomness helpers of the pretext tasks: draw on the generator's device, then move.

Every random choice of a task is drawn from the caller's ``torch.Generator`` where that
generator lives (the CPU by default), so that a seeded CPU generator gives the same draws
whatever device the batch is on. Public through :mod:`patchssl.pretext.base`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_integers", "random_uniform"]


def random_integers(
    high: int,
    size: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Tensor:
    """Uniform integers in ``[0, high)`` drawn from ``generator`` and moved to ``device``.

    The numbers are drawn where the generator lives (the CPU when ``generator`` is None), so
    that a seeded CPU generator gives the same draws whatever device the batch is on.

    Args:
        high: Exclusive upper bound (> 0).
        size: Output shape.
        generator: Source of randomness; None uses torch's global CPU generator.
        device: Where the result goes.

    Returns:
        Long tensor of shape ``size`` on ``device``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out = torch.randint(high, size, generator=generator, device=gen_device)
    return out.to(device, non_blocking=True)


def random_uniform(
    size: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Tensor:
    """Uniform floats in ``[0, 1)`` drawn from ``generator`` and moved to ``device``.

    Args:
        size: Output shape.
        generator: Source of randomness; None uses torch's global CPU generator.
        device: Where the result goes.

    Returns:
        Float32 tensor of shape ``size`` on ``device``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out = torch.rand(size, generator=generator, device=gen_device)
    return out.to(device, non_blocking=True)
