"""Checkpoint files: atomic writes, safe loads, and the checks that catch a mismatch.

A patchssl checkpoint is a plain dictionary saved with :func:`torch.save`: state dicts
(tensors) plus a JSON-able description of what produced them. It is loaded with
``torch.load(..., weights_only=True)``, so opening a checkpoint never runs code from the file.

Keys written by the training engine:

========================== ==============================================================
``format``                 ``"patchssl"``
``format_version``         integer, currently 1
``library_version``        the patchssl version that wrote it
``kind``                   ``"pretrain"`` or ``"finetune"``
``model_config``           how to rebuild the model: ``encoder``, ``tiler`` and
                           ``pretext``/``pretext_kwargs`` or ``classifier`` configs
``permutations_fingerprint`` content hash of the jigsaw permutation set, or ``None``
``model``                  the model's ``state_dict``
``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``epoch``, ``step``, ``config`` ...
``checksum``               ``{"algorithm": "sha256", "value": ...}`` over every other entry
                           (see :func:`payload_checksum`), written by :func:`save_checkpoint`
                           and verified by :func:`load_checkpoint`
========================== ==============================================================

Checkpoints are written with the permissions of any other file the user creates (``0o666``
less the process's umask, usually ``0o644``), not the ``0o600`` of a bare temporary file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchssl._validation import atomic_write, default_file_mode, plain
from patchssl._version import __version__

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "check_compatible",
    "copy_checkpoint",
    "default_file_mode",
    "load_checkpoint",
    "payload_checksum",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_CHECKSUM_KEY = "checksum"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not match what it is loaded into."""


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write a checkpoint atomically, with a checksum of its contents.

    The payload is written to a temporary file in the same folder, flushed to disk, then
    renamed over ``path`` in one step: a crash or a full disk mid-write leaves the previous
    file intact, never a truncated one. A ``checksum`` entry (:func:`payload_checksum`) lets
    :func:`load_checkpoint` detect bits changed on disk afterwards. The file gets the
    permissions of any new file (``0o666`` less the umask).

    Args:
        path: Destination file (its folder is created if needed).
        payload: A mapping of tensors, state dicts and JSON-able values. ``format``,
            ``format_version`` and ``library_version`` are filled in when absent.

    Returns:
        The path written.
    """
    path = Path(path)
    data = dict(payload)
    data.setdefault("format", "patchssl")
    data.setdefault("format_version", FORMAT_VERSION)
    data.setdefault("library_version", __version__)
    data.pop(_CHECKSUM_KEY, None)
    data[_CHECKSUM_KEY] = {"algorithm": "sha256", "value": payload_checksum(data)}
    return atomic_write(path, lambda handle: torch.save(data, handle))


def copy_checkpoint(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Copy a checkpoint file atomically (as :func:`save_checkpoint` writes one).

    The bytes of ``source`` are copied, so its checksum travels with them and nothing is
    serialised or hashed again: the engine writes ``best.pt`` this way from the ``last.pt`` of
    the same epoch.

    Args:
        source: An existing checkpoint file.
        path: Destination file.

    Returns:
        The path written.
    """
    with open(source, "rb") as src:
        return atomic_write(path, lambda handle: shutil.copyfileobj(src, handle, 1 << 24))


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    kind: str | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by patchssl, safely.

    Args:
        path: The checkpoint file.
        map_location: Where tensors are loaded (default CPU).
        kind: If given (``"pretrain"`` or ``"finetune"``), refuse a checkpoint of another kind.

    Returns:
        The checkpoint dictionary (without its ``checksum`` entry).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is truncated or corrupt (including contents that do not
            match the stored checksum), was not written by patchssl, was written by a newer
            format version, or is of the wrong kind. Checkpoints written before checksums
            existed load without the check.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {err}. The file is truncated, corrupt, or not a "
            "PyTorch checkpoint; if training was interrupted, use the previous checkpoint "
            "(patchssl writes checkpoints atomically, so last.pt/best.pt are whole)."
        ) from err
    if not isinstance(data, dict) or data.get("format") != "patchssl":
        raise CheckpointError(
            f"{path} is not a patchssl checkpoint (no 'format': 'patchssl' entry). To start from "
            "plain backbone weights, pass them as SharedPatchEncoder(..., pretrained=path) instead."
        )
    version = data.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this patchssl "
            f"understands ({FORMAT_VERSION}); upgrade patchssl (it was written by "
            f"{data.get('library_version', 'an unknown version')})."
        )
    stored = data.pop(_CHECKSUM_KEY, None)
    if stored is not None:
        value = stored.get("value") if isinstance(stored, dict) else None
        if not isinstance(value, str) or payload_checksum(data) != value:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its contents do not match the sha256 checksum "
                "stored when it was written (bits changed on disk or in a copy). Use another "
                "copy of the file, or the run's other checkpoint (last.pt / best.pt)."
            )
    if kind is not None and data.get("kind") != kind:
        raise CheckpointError(
            f"{path} is a {data.get('kind', 'unknown')!r} checkpoint; a {kind!r} checkpoint is "
            "needed here (pretraining checkpoints come from `patchssl pretrain`, fine-tuned "
            "ones from `patchssl finetune`)."
        )
    return data


def payload_checksum(payload: Mapping[str, Any]) -> str:
    """The sha256 of a checkpoint payload, over its entries in a deterministic order.

    Keys are visited in sorted order at every depth; a tensor contributes its dtype, shape
    and raw bytes (on the CPU), a NumPy array likewise, any other value its ``repr``. Lists
    and tuples hash alike (a payload read back may hold either). The ``checksum`` entry
    itself is left out.

    Args:
        payload: A checkpoint dictionary.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != _CHECKSUM_KEY})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` (see :func:`payload_checksum`)."""
    if isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            digest.update(repr(key).encode() + b":")
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
            digest.update(b",")
        digest.update(b"]")
    elif torch.is_tensor(value):
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())  # its buffer, not a copy
    elif isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    else:
        digest.update(repr(value).encode())


def check_compatible(
    checkpoint: Mapping[str, Any],
    *,
    source: str,
    permutations_fingerprint: str | None = None,
    encoder: Mapping[str, Any] | None = None,
    tiler: Mapping[str, Any] | None = None,
    pretext: str | None = None,
) -> None:
    """Refuse a checkpoint that was made with another permutation set, backbone or geometry.

    Only the arguments that are given are compared.

    Args:
        checkpoint: A dictionary from :func:`load_checkpoint`.
        source: How to name the checkpoint in messages (usually its path).
        permutations_fingerprint: The fingerprint of the permutation set in use.
        encoder: The encoder config in use; ``backbone`` and ``in_chans`` are compared.
        tiler: The tiler config in use; ``grid``, ``patch_size`` and ``image_size`` are
            compared.
        pretext: The pretext task name in use.

    Raises:
        CheckpointError: On the first disagreement, naming both values.
    """
    config = checkpoint.get("model_config") or {}
    theirs = checkpoint.get("permutations_fingerprint")
    if permutations_fingerprint is not None and theirs not in (None, permutations_fingerprint):
        raise CheckpointError(
            f"{source} was trained with permutation set {theirs}, but the set in use is "
            f"{permutations_fingerprint}: the puzzle classes would not mean the same thing. "
            "Use the permutation file that the run was started with, or start a new run."
        )
    if pretext is not None and config.get("pretext") not in (None, pretext):
        raise CheckpointError(
            f"{source} was trained with pretext task {config.get('pretext')!r}, not {pretext!r}."
        )
    pairs = (
        ("encoder", encoder, ("backbone", "in_chans")),
        ("tiler", tiler, ("grid", "patch_size", "image_size")),
    )
    for section, ours, keys in pairs:
        if ours is None:
            continue
        stored = config.get(section) or {}
        for key in keys:
            if key in stored and key in ours and plain(stored[key]) != plain(ours[key]):
                raise CheckpointError(
                    f"{source} was trained with {section} {key}={stored[key]!r}, but "
                    f"{key}={ours[key]!r} is in use. Use the same {key} as the checkpoint, or "
                    "start from scratch."
                )
