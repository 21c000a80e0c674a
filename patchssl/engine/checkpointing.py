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

:class:`CheckpointWriter` writes the engine's ``last.pt`` and ``best.pt``, in a background
thread when ``train.async_checkpoint`` asks for it (:func:`resolve_async_checkpoint`), so that
serialising, hashing and syncing a checkpoint overlap the next epoch's training.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import Any

import torch

# the module, not its functions: a write goes through its current save_checkpoint and
# copy_checkpoint (the robustness tests replace them to simulate crashes)
from patchssl import checkpoint as checkpoint_io
from patchssl._validation import plain
from patchssl._version import __version__
from patchssl.checkpoint import FORMAT_VERSION, CheckpointError
from patchssl.checkpoint import check_compatible as check_transfer
from patchssl.engine.config import ConfigError
from patchssl.engine.logging import echo
from patchssl.pretext import PatchDefences, PretextPluginError, get_pretext_class

__all__ = [
    "CheckpointWriter",
    "check_compatible",
    "checkpoint_payload",
    "config_differences",
    "model_entries",
    "resolve_async_checkpoint",
    "snapshot_payload",
    "write_checkpoint",
]

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
        if action == "resume" and any(p.startswith("pretext_kwargs.") for p in problems):
            hint += (
                "; to resume it, set the checkpoint's values in pretext.options (e.g. "
                "--set pretext.options.head=assignment for a jigsaw run of the assignment head)"
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


def resolve_async_checkpoint(value: bool | str, device: torch.device) -> bool:
    """Whether ``train.async_checkpoint`` writes checkpoints in the background on ``device``.

    Args:
        value: ``auto`` (in the background on an accelerator, where the device would
            otherwise sit idle while the host writes; in the training thread on the CPU),
            ``true`` or ``false``.
        device: The training device.

    Returns:
        ``True`` to write in a background thread.

    Raises:
        ConfigError: On any other value.
    """
    text = str(value).strip().lower()
    if text == "auto":
        return device.type != "cpu"
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(
        f"train.async_checkpoint must be auto, true or false; got {value!r} (auto writes "
        "checkpoints in a background thread on a GPU and in the training thread on the CPU)"
    )


def snapshot_payload(payload: Any) -> Any:
    """A copy of a checkpoint payload that later training cannot change.

    :func:`copy.deepcopy`, with every tensor found in nested dicts, lists and tuples copied
    to CPU memory (a CPU tensor is cloned too: the optimizer updates parameters in place),
    keeping its dtype, shape and strides. Like ``deepcopy``, it keeps containers' types and
    attributes (a ``state_dict``'s ``_metadata``) and what the payload shares (the epoch's
    metrics are also the last row of the history). Distinct tensors that are views of one
    memory are copied separately (they load with the same values).

    Args:
        payload: A checkpoint payload (:func:`checkpoint_payload`) or any part of one.

    Returns:
        The snapshot, to write with :func:`patchssl.checkpoint.save_checkpoint`.
    """
    memo: dict[int, Any] = {}
    for tensor in _tensors(payload):
        if id(tensor) not in memo:
            memo[id(tensor)] = tensor.detach().to("cpu", copy=True)
    return copy.deepcopy(payload, memo)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested dicts, lists and tuples."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def write_checkpoint(
    path: str | os.PathLike[str],
    payload: dict[str, Any],
    best: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``payload`` to ``path`` and, if asked, copy that file to ``best``.

    Both go through :mod:`patchssl.checkpoint` (atomic, with a checksum); the copy of the
    same epoch's file serialises and hashes nothing again.

    Args:
        path: The checkpoint (``last.pt``).
        payload: Its payload.
        best: Where to copy it (``best.pt``), or ``None``.
    """
    checkpoint_io.save_checkpoint(path, payload)
    if best is not None:
        checkpoint_io.copy_checkpoint(path, best)


class CheckpointWriter:
    """Writes a run's checkpoints, in one background thread or in the caller's.

    In the background, at most one write is in flight: :meth:`submit` first waits for the
    write before it, then takes a snapshot of the payload in CPU memory
    (:func:`snapshot_payload`), so that training may go on changing the live tensors, and
    hands it to a worker thread that runs :func:`write_checkpoint` (serialising, hashing,
    syncing, renaming) while the caller goes on. A write that failed is raised in the
    caller's thread by the next :meth:`submit`, :meth:`wait` or :meth:`close`, with the
    file named in its message (an ``OSError`` gets the checkpoint as its ``filename`` when
    it has none; any other exception a note). Otherwise :meth:`submit` writes at once.

    Args:
        background: Write in a worker thread (``train.async_checkpoint``,
            :func:`resolve_async_checkpoint`).
    """

    def __init__(self, background: bool) -> None:
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Future[None], Path] | None = None
        self._error: BaseException | None = None

    def submit(
        self,
        path: str | os.PathLike[str],
        payload: dict[str, Any],
        best: str | os.PathLike[str] | None = None,
    ) -> None:
        """Write ``payload`` to ``path`` (and copy it to ``best``), after the write before.

        Args:
            path: The checkpoint (``last.pt``).
            payload: Its payload; in the background, it is copied before this returns.
            best: Where to copy the file once written (``best.pt``), or ``None``.

        Raises:
            BaseException: The error of the previous write, if it failed (nothing new is
                written then); in the caller's thread, that of this write.
        """
        self.wait()
        if not self.background:
            write_checkpoint(path, payload, best)
            return
        snapshot = snapshot_payload(payload)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="patchssl-checkpoint")
        future = self._executor.submit(write_checkpoint, path, snapshot, best)
        self._pending = (future, Path(path))

    def wait(self, *, raise_errors: bool = True) -> None:
        """Block until the write in flight (if any) is on disk.

        Args:
            raise_errors: Raise the error of a failed write (once). With ``False`` it is
                kept for the next call that raises.

        Raises:
            BaseException: The error of the write, naming its file.
        """
        if self._pending is not None:
            future, path = self._pending
            wait_for([future])  # an interrupt here leaves the write pending (and running)
            self._pending = None
            error = future.exception()
            if error is not None:
                self._error = _name_file(error, path)
        if raise_errors and self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self, error: BaseException | None = None) -> None:
        """Wait for the write in flight, then stop the worker thread.

        Args:
            error: The exception that is ending the run, if any: a failed write does not
                replace it, it is reported in a warning instead.

        Raises:
            BaseException: Without ``error``, the error of a failed write.
        """
        try:
            self.wait(raise_errors=error is None)
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
        failed, self._error = self._error, None
        if failed is not None:
            echo(f"warning: a checkpoint could not be written either: {failed}", err=True)


def _name_file(error: BaseException, path: Path) -> BaseException:
    """``error`` of a background write, with ``path`` named in its message."""
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
        error.filename = str(path)  # "[Errno 28] No space left on device: '.../last.pt'"
    elif isinstance(error, Exception) and hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(f"while writing the checkpoint {path} in the background")
    return error
