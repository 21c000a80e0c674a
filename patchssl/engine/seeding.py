"""Seeds, generators and RNG state capture for reproducible (and resumable) runs.

Randomness in a run comes from three places: the order in which images are drawn (a
``torch.Generator`` owned by the sampler), the random choices made on the device during a step
(patch jitter, permutation choice, dropout), and Python's ``random`` module in third-party code.
The engine reseeds all of them at the start of every epoch from ``(seed, epoch, rank)``, so an
epoch's randomness does not depend on how the run got there: a run resumed at an epoch boundary
repeats an uninterrupted one exactly, and each process of a distributed run draws differently
but reproducibly.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

__all__ = [
    "capture_rng_state",
    "derive_seed",
    "make_generator",
    "restore_rng_state",
    "seed_everything",
]


def derive_seed(seed: int, *parts: int | str) -> int:
    """Derive a well-mixed 63-bit seed from a base seed and labels.

    Args:
        seed: Base seed of the run.
        *parts: Labels such as an epoch number, a rank or a purpose (``"data"``, ``"model"``).

    Returns:
        A non-negative integer seed, stable across platforms and Python versions.
    """
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(
    seed: int, *parts: int | str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """Return a ``torch.Generator`` seeded with :func:`derive_seed`.

    Args:
        seed: Base seed.
        *parts: Labels mixed into the seed.
        device: Device of the generator.

    Returns:
        The seeded generator.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *parts))
    return generator


def seed_everything(seed: int, *parts: int | str) -> int:
    """Seed torch (CPU and CUDA) and Python's ``random`` from ``seed`` and labels.

    numpy's global RNG is left alone: patchssl never uses it.

    Args:
        seed: Base seed.
        *parts: Labels (e.g. the epoch and rank) mixed into the seed.

    Returns:
        The derived seed that was set.
    """
    value = derive_seed(seed, *parts)
    torch.manual_seed(value)
    random.seed(value)
    return value


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Capture the RNG states that a checkpoint stores.

    Args:
        generators: Named generators owned by the run (e.g. the data-order generator).

    Returns:
        A dict loadable with ``torch.load(weights_only=True)``: ``torch`` (ByteTensor),
        ``cuda`` (list of ByteTensors, empty without CUDA), ``python`` (``random``'s state as
        a tensor and its gauss value) and ``generators``.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    """Restore the states captured by :func:`capture_rng_state`.

    Args:
        state: The captured states.
        generators: Named generators to restore in place (names missing from ``state`` are
            left alone).
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    python = state.get("python")
    if python:
        internal = tuple(int(v) for v in python["state"].tolist())
        random.setstate((python["version"], internal, python["gauss"]))
    for name, generator in (generators or {}).items():
        saved = state.get("generators", {}).get(name)
        if saved is not None:
            generator.set_state(saved)
