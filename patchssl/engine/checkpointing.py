"""Checks that a checkpoint belongs to the model a run is about to build.

A checkpoint records how its model was built (``model_config``: pretext task and its options,
encoder, tiler, classifier) and the permutation set's fingerprint. Resuming or transferring
from a checkpoint of another backbone, pretext task, tiling or permutation set would silently
train something else, so it is refused with a message that names each difference.
"""

from __future__ import annotations

from typing import Any

from patchssl.engine.config import ConfigError

__all__ = ["check_compatible", "config_differences"]

# Keys that describe run-time behaviour rather than the weights' meaning; they may change on resume.
_IGNORED = {"pretrained", "channels_last", "grad_checkpointing", "freeze", "jitter"}


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """List the dotted keys whose values differ between two nested configs.

    Args:
        saved: Config stored in the checkpoint.
        current: Config of the run being set up.
        prefix: Dotted prefix for the messages.

    Returns:
        Lines ``"key: checkpoint has X, this run has Y"``.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        lines: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            if key in _IGNORED:
                continue
            name = f"{prefix}{key}"
            if key not in saved:
                continue  # a newer option with its default; not a mismatch
            if key not in current:
                continue
            lines.extend(config_differences(saved[key], current[key], f"{name}."))
        return lines
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        if list(saved) == list(current):
            return []
    elif saved == current:
        return []
    return [f"{prefix.rstrip('.')}: checkpoint has {saved!r}, this run has {current!r}"]


def check_compatible(
    checkpoint: dict[str, Any],
    *,
    kind: str | None,
    model_config: dict[str, Any],
    fingerprint: str | None,
    action: str = "resume",
    sections: tuple[str, ...] | None = None,
) -> None:
    """Refuse a checkpoint that does not match the model of this run.

    Args:
        checkpoint: Loaded checkpoint payload.
        kind: Expected ``kind`` (``"pretrain"``/``"finetune"``) or ``None`` to accept any.
        model_config: The ``model_config`` this run would write.
        fingerprint: This run's permutation-set fingerprint (``None`` when not applicable).
        action: Verb for the message (``"resume"``, ``"fine-tune from"``).
        sections: Only compare these top-level sections of ``model_config`` (default: all).

    Raises:
        ConfigError: Naming every difference and how to proceed.
    """
    problems: list[str] = []
    saved_kind = checkpoint.get("kind")
    if kind is not None and saved_kind != kind:
        problems.append(f"kind: checkpoint is a '{saved_kind}' checkpoint, this run is '{kind}'")
    saved_fp = checkpoint.get("permutations_fingerprint")
    if fingerprint is not None and saved_fp is not None and saved_fp != fingerprint:
        problems.append(
            f"permutation set: checkpoint fingerprint {saved_fp}, this run's {fingerprint} "
            "(a different set of permutations gives the classes different meanings)"
        )
    saved_model = checkpoint.get("model_config") or {}
    keys = sections if sections is not None else tuple(model_config)
    for key in keys:
        if key in saved_model and key in model_config:
            problems.extend(config_differences(saved_model[key], model_config[key], f"{key}."))
    if problems:
        listing = "\n  - ".join(problems)
        hint = (
            "use a new output folder (--out) or drop --resume to start afresh"
            if action == "resume"
            else "use a checkpoint trained with the same backbone, tiling and permutation set"
        )
        raise ConfigError(
            f"cannot {action} this checkpoint: it does not match this run:\n  - {listing}\n{hint}"
        )
