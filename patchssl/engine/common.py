"""Pieces shared by the engine's runs: setup, model building from a config, output folders."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from patchssl._validation import atomic_write
from patchssl.encoder import SharedPatchEncoder
from patchssl.engine.config import Config, ConfigError, load_config, save_config
from patchssl.engine.device import resolve_device
from patchssl.engine.distributed import get_world_size, is_main_process, process_device
from patchssl.engine.logging import echo
from patchssl.tiling import PatchTiler

__all__ = [
    "as_config",
    "build_encoder",
    "build_tiler",
    "compile_encoder",
    "prepare_run",
    "write_json",
]


def as_config(config: Config | dict[str, Any] | str | Path | None) -> Config:
    """Accept a :class:`Config`, a nested dict, a YAML/JSON path or ``None`` (defaults).

    Args:
        config: The configuration in any of these forms.

    Returns:
        A (copied) :class:`Config`.
    """
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config.copy()
    if isinstance(config, dict):
        return Config.from_dict(config)
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise ConfigError(
        f"expected a Config, a dict or a config file path; got {type(config).__name__}"
    )


def prepare_run(config: Config, *, save: bool = True) -> tuple[Path, torch.device]:
    """Set threads, the image size limit, the device; create the output folder.

    ``data.max_image_pixels``, when set, becomes ``PIL.Image.MAX_IMAGE_PIXELS``.

    Args:
        config: The run configuration.
        save: Write ``<out>/config.yaml`` with the resolved configuration.

    Returns:
        ``(out_dir, device)``; under ``torchrun`` a CUDA device is this process's
        ``cuda:LOCAL_RANK``.
    """
    if config.train.num_threads:
        if config.train.num_threads < 1:
            raise ConfigError(f"train.num_threads must be >= 1; got {config.train.num_threads}")
        torch.set_num_threads(config.train.num_threads)
    if config.data.max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = int(config.data.max_image_pixels)
    device = process_device(resolve_device(config.train.device))
    out = Path(config.out)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        if save:
            save_config(config, out / "config.yaml")
    return out, device


def _tiler_kwargs(config: Config) -> dict[str, Any]:
    model, data = config.model, config.data
    kwargs: dict[str, Any] = {
        "grid": model.grid,
        "patch_size": model.patch_size,
        "image_size": data.image_size,
    }
    if model.gap is not None:
        kwargs["gap"] = model.gap
    if model.jitter is not None:
        kwargs["jitter"] = model.jitter
    return kwargs


def build_tiler(config: Config) -> Any:
    """Build the :class:`patchssl.tiling.PatchTiler` described by ``config.model``/``data``.

    Raises:
        ConfigError: When the patches do not fit in the image (the tiler's message).
    """
    try:
        return PatchTiler(**_tiler_kwargs(config))
    except ValueError as err:
        raise ConfigError(f"model/data geometry: {err}") from err


def compile_encoder(
    encoder: torch.nn.Module,
    mode: str | None,
    *,
    model: torch.nn.Module | None = None,
    scope: str = "encoder",
) -> None:
    """Compile ``encoder`` (or the whole ``model``) in place; weights and keys stay as they are.

    Args:
        encoder: The patch encoder of the model being trained.
        mode: A ``torch.compile`` mode from :func:`patchssl.engine.device.resolve_compile`
            (``train.compile``); ``None`` does nothing.
        model: The whole module whose forward a training step calls (the pretext task).
        scope: ``"encoder"`` or ``"model"`` (``train.compile_scope``; ``"model"`` needs
            ``model``).

    Raises:
        ConfigError: For another ``scope``.
    """
    if scope not in ("encoder", "model"):
        raise ConfigError(f"train.compile_scope must be 'encoder' or 'model'; got {scope!r}")
    if mode is None:
        return
    if scope == "model" and model is not None:
        model.compile(mode=mode)
        what = "pretext task (tiling, defences, encoder, head, loss)"
    else:
        encoder.compile(mode=mode)
        what = "patch encoder"
    say(f"{what} compiled with torch.compile (mode '{mode}'); the first steps are slow")


def build_encoder(config: Config, device: torch.device) -> Any:
    """Build the :class:`patchssl.encoder.SharedPatchEncoder` described by ``config.model``.

    ``channels_last`` is applied on the GPU only (on the CPU it is a no-op and a note says so).

    Raises:
        ConfigError: For an unknown backbone or invalid options (the encoder's message), or
            ``model.norm=sync_batch`` in a multi-process run on the CPU (torch's SyncBatchNorm
            needs GPUs).
    """
    model = config.model
    if model.norm == "sync_batch" and device.type == "cpu" and get_world_size() > 1:
        raise ConfigError(
            "model.norm=sync_batch needs GPUs (torch's SyncBatchNorm has no CPU kernel); "
            "on the CPU use model.norm=group, whose statistics do not depend on the batch"
        )
    channels_last = bool(model.channels_last and device.type == "cuda")
    kwargs: dict[str, Any] = {
        "pretrained": model.pretrained,
        "in_chans": config.data.in_chans,
        "patch_size": model.patch_size,
        "norm": model.norm,
    }
    if channels_last:
        kwargs["channels_last"] = True
    try:
        return SharedPatchEncoder(model.backbone, **kwargs)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ConfigError(f"cannot build encoder '{model.backbone}': {err}") from err


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON (NaN and infinities as ``null``) atomically on the main process.

    Args:
        path: Output file.
        data: JSON-able data (tuples become lists, paths strings).

    Returns:
        The path.
    """
    path = Path(path)
    if not is_main_process():
        return path

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        if torch.is_tensor(value):
            return clean(value.tolist())
        if hasattr(value, "item") and callable(value.item):
            return clean(value.item())
        return value

    return atomic_write(path, json.dumps(clean(data), indent=2) + "\n")


def say(message: str) -> None:
    """Print a progress message of a run (``patchssl: ...``)."""
    echo(f"[patchssl] {message}")
