"""Devices, mixed precision and compilation: the configured names turned into torch objects.

The lowest layer of the engine (it needs only the configuration), so that the training loop,
the distributed helpers and the run functions can all use it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from patchssl.engine.config import ConfigError

__all__ = [
    "COMPILE_MODES",
    "autocast_context",
    "move_batch",
    "resolve_amp",
    "resolve_compile",
    "resolve_device",
]


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda[:i]``/``mps`` into a device, refusing unavailable ones.

    Args:
        name: The configured device.

    Returns:
        The device.

    Raises:
        ConfigError: When CUDA is asked for but not available, or the name is invalid.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"train.device: invalid device '{name}' ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={name!r}, but CUDA is not available on this machine; use --device cpu"
        )
    return device


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_compile(value: bool | str | None) -> str | None:
    """The ``torch.compile`` mode that ``train.compile`` asks for.

    Args:
        value: ``False``/``"false"``/``"none"`` (off), ``True``/``"true"`` (mode
            ``default``) or one of :data:`COMPILE_MODES`.

    Returns:
        The mode, or ``None`` when compilation is off.

    Raises:
        ConfigError: On any other value.
    """
    if value is None or value is False:
        return None
    text = str(value).strip().lower()
    if text in ("false", "none", "off", "no"):
        return None
    if text in ("true", "on", "yes"):
        return "default"
    if text in COMPILE_MODES:
        return text
    raise ConfigError(
        f"train.compile must be true, false or a torch.compile mode "
        f"({', '.join(COMPILE_MODES)}); got {value!r}"
    )


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """Choose the autocast dtype.

    Args:
        amp: ``auto``, ``bf16``, ``fp16`` or ``none``.
        device: Training device.

    Returns:
        ``(dtype or None, note or None)``; the note explains a no-op (e.g. on the CPU).

    Raises:
        ConfigError: On an unknown value.
    """
    amp = str(amp).lower()
    options = ("auto", "bf16", "fp16", "none")
    if amp not in options:
        raise ConfigError(f"train.amp must be one of {', '.join(options)}; got '{amp}'")
    if amp == "none":
        return None, None
    if device.type != "cuda":
        note = None
        if amp != "auto":
            note = (
                f"mixed precision ({amp}) is used on the GPU only; training in float32 on {device}"
            )
        return None, note
    if amp == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    return (torch.bfloat16 if amp == "bf16" else torch.float16), None


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """Autocast on ``device`` with ``dtype``, or a null context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a collated batch to ``device`` (non-blocking)."""
    return {
        k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
    }
