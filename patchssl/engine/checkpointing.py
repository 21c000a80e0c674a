"""The engine's checkpoints: what a payload holds, and whether one can be resumed.

A checkpoint records how its model was built (``model_config``: pretext task and its options,
encoder, tiler, classifier) and the permutation set's fingerprint. Resuming from a checkpoint
of another backbone, pretext task, tiling or permutation set would silently train something
else, so it is refused with a message that names each difference.

Two checks exist on purpose, and they compare different things:

- :func:`patchssl.checkpoint.check_compatible` (public) guards a *transfer*: fine-tuning from
  a pretraining checkpoint legitimately builds a different model, so only what gives the
  weights their meaning is compared (permutation set, pretext name, backbone and channels,
  tiling geometry).
- :func:`check_compatible` here guards a *resume*: the run continues the very same model, so
  the checkpoint's kind and its whole ``model_config`` are compared (except run-time switches
  such as ``channels_last``), and every difference is listed at once. The permutation set,
  the one check both share, is delegated to the public function.
"""

from __future__ import annotations

from typing import Any

from patchssl._validation import plain
from patchssl._version import __version__
from patchssl.checkpoint import FORMAT_VERSION, CheckpointError
from patchssl.checkpoint import check_compatible as check_transfer
from patchssl.engine.config import ConfigError
from patchssl.pretext import PatchDefences, PretextPluginError, get_pretext_class

__all__ = ["check_compatible", "checkpoint_payload", "config_differences", "model_entries"]

# Keys that describe run-time behaviour rather than the weights' meaning; they may change on resume.
_IGNORED = {"pretrained", "channels_last", "grad_checkpointing", "freeze", "jitter"}


def model_entries(
    model_config: dict[str, Any], permutations_fingerprint: str | None
) -> dict[str, Any]:
    """The checkpoint entries that describe the model (a task's ``checkpoint_info``).

    Args:
        model_config: How to rebuild the model (pretext task or classifier, encoder, tiler).
        permutations_fingerprint: Content hash of the jigsaw permutation set the weights were
            trained with (for a classifier: that of its pretraining), or ``None``.

    Returns:
        ``{"model_config": ..., "permutations_fingerprint": ...}``.
    """
    return {"model_config": model_config, "permutations_fingerprint": permutations_fingerprint}


def checkpoint_payload(kind: str, info: dict[str, Any], **state: Any) -> dict[str, Any]:
    """Assemble a training checkpoint (the keys listed in :mod:`patchssl.checkpoint`).

    Args:
        kind: ``"pretrain"`` or ``"finetune"``.
        info: The task's :func:`model_entries` (``model_config`` and, optionally,
            ``permutations_fingerprint``).
        **state: The rest of the payload: ``model``, ``optimizer``, ``scheduler``,
            ``scaler``, ``rng``, ``epoch``, ``step``, ``config``, ``metrics``, ``trainer``.

    Returns:
        The payload for :func:`patchssl.checkpoint.save_checkpoint`.
    """
    return {
        "format": "patchssl",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "kind": kind,
        "model_config": info["model_config"],
        "permutations_fingerprint": info.get("permutations_fingerprint"),
        **state,
    }


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """List the dotted keys whose values differ between two nested configs.

    Lists and tuples compare equal when their items do (a config read back from JSON holds
    lists where the live one holds tuples). Keys present on one side only are not differences
    (an option added by a newer version, with its default), nor are run-time switches.

    Args:
        saved: Config stored in the checkpoint.
        current: Config of the run being set up.
        prefix: Dotted prefix for the messages.

    Returns:
        Lines ``"key: checkpoint has X, this run has Y"``.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        lines: list[str] = []
        for key in sorted(set(saved) & set(current), key=str):
            if key in _IGNORED:
                continue
            lines.extend(config_differences(saved[key], current[key], f"{prefix}{key}."))
        return lines
    saved, current = plain(saved), plain(current)
    if saved == current:
        return []
    key = prefix.rstrip(".")
    if isinstance(saved, list) and isinstance(current, list) and max(len(saved), len(current)) > 8:
        # a long table (a permutation set): its size and first differing row, not every row
        first = next(
            (i for i, (a, b) in enumerate(zip(saved, current)) if a != b),
            min(len(saved), len(current)),
        )
        theirs = saved[first] if first < len(saved) else "no row"
        ours = current[first] if first < len(current) else "no row"
        return [
            f"{key}: checkpoint has {len(saved)} rows, this run has {len(current)}; first "
            f"difference at row {first}: checkpoint has {theirs!r}, this run has {ours!r}"
        ]
    return [f"{key}: checkpoint has {saved!r}, this run has {current!r}"]


def check_compatible(
    checkpoint: dict[str, Any],
    *,
    kind: str | None,
    model_config: dict[str, Any],
    fingerprint: str | None,
    action: str = "resume",
    sections: tuple[str, ...] | None = None,
    source: str = "the checkpoint",
) -> None:
    """Refuse a checkpoint that does not match the model of this run.

    Args:
        checkpoint: Loaded checkpoint payload.
        kind: Expected ``kind`` (``"pretrain"``/``"finetune"``) or ``None`` to accept any.
        model_config: The ``model_config`` this run would write.
        fingerprint: This run's permutation-set fingerprint (``None`` when not applicable).
        action: Verb for the message (``"resume"``, ``"fine-tune from"``).
        sections: Only compare these top-level sections of ``model_config`` (default: all).
        source: How to name the checkpoint in messages (usually its path).

    Raises:
        ConfigError: Naming every difference and how to proceed.
    """
    problems: list[str] = []
    saved_kind = checkpoint.get("kind")
    if kind is not None and saved_kind != kind:
        problems.append(f"kind: checkpoint is a '{saved_kind}' checkpoint, this run is '{kind}'")
    try:  # the permutation set is checked exactly as for a transfer
        check_transfer(checkpoint, source=source, permutations_fingerprint=fingerprint)
    except CheckpointError as err:
        problems.append(str(err))
    saved_model = _current_layout(checkpoint.get("model_config") or {})
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
            f"cannot {action} {source}: it does not match this run:\n  - {listing}\n{hint}"
        )


def _current_layout(model_config: dict[str, Any]) -> dict[str, Any]:
    """``model_config`` with flat patch defence options (older checkpoints) nested as today."""
    kwargs = model_config.get("pretext_kwargs")
    if not isinstance(kwargs, dict) or not any(key in kwargs for key in PatchDefences.KEYS):
        return model_config
    try:
        cls = get_pretext_class(str(model_config.get("pretext")))
    except (KeyError, PretextPluginError):  # the pretext name is compared (and reported) anyway
        return model_config
    fold = getattr(cls, "fold_defence_options", None)
    if fold is None:
        return model_config
    try:
        folded = fold(kwargs)
    except (TypeError, ValueError):  # leave it as saved: the differences are then listed
        return model_config
    folded["defences"] = folded["defences"].config
    return {**model_config, "pretext_kwargs": folded}
