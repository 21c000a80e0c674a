"""Argument checks and atomic file writes shared by every patchssl module.

One helper per idea, so that the same mistake gets the same message wherever it is made
(the role MONAI's ``ensure_tuple_rep`` and ``look_up_option`` play there):

- :func:`as_pair`: an int or an ``(h, w)`` pair of positive ints, bools refused;
- :func:`check_int`: an int (not a bool) of at least ``minimum``;
- :func:`look_up` / :func:`did_you_mean`: a name among fixed choices, with the closest match
  suggested;
- :func:`plain`: a nested value with tuples turned into lists, so that a config read back
  from JSON compares equal to the live one;
- :func:`atomic_write`: write a file so that a crash never leaves a truncated one under its
  name (unique temporary ``.<name>.<random>.tmp`` in the same folder, flush and ``fsync``,
  ``os.replace``, cleanup on failure, mode ``0o666`` less the umask). The run-folder cleanup
  (:mod:`patchssl.engine.run_dir`) removes such temporaries left by a killed run.

This module imports nothing from patchssl, so every other module may use it.
"""

from __future__ import annotations

import difflib
import numbers
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "as_pair",
    "atomic_write",
    "check_int",
    "default_file_mode",
    "did_you_mean",
    "look_up",
    "plain",
]


def _is_int(value: object) -> bool:
    # numbers.Integral covers NumPy's ints without importing NumPy (the CLI's help stays light)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Turn an int or an ``(h, w)`` pair into a pair of positive ints.

    Args:
        value: ``s`` for ``(s, s)``, or a sequence of two ints (NumPy ints accepted).
        name: The argument's name, for messages.

    Returns:
        ``(h, w)`` as Python ints.

    Raises:
        TypeError: For a bool, or anything that is not an int or a sequence of ints.
        ValueError: For a sequence of another length than 2, or a side below 1.
    """
    if _is_int(value):
        pair = (int(value), int(value))  # type: ignore[arg-type]
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) != 2:
            raise ValueError(
                f"{name} must be an int or a pair of ints (height, width); got {value!r}"
            )
        if not all(_is_int(v) for v in value):
            raise TypeError(f"{name} must hold ints; got {value!r}")
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (height, width); got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive; got {value!r}")
    return pair


def check_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Check that ``value`` is an int (not a bool) of at least ``minimum``.

    Args:
        value: The value to check (NumPy ints accepted).
        name: The argument's name, for messages.
        minimum: The smallest value allowed (default 1: a positive int).

    Returns:
        ``value`` as a Python int.

    Raises:
        TypeError: If ``value`` is not an int (bools are refused).
        ValueError: If ``value < minimum``.
    """
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if not _is_int(value):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__} {value!r}")
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return int(value)  # type: ignore[call-overload]


def did_you_mean(value: object, choices: Iterable[object], *, n: int = 1) -> str:
    """The sentence `` Did you mean 'x'?`` for the choices closest to ``value``, or ``""``.

    Args:
        value: What was given.
        choices: The accepted values (compared as strings).
        n: At most this many suggestions, closest first (``Did you mean 'a', 'b' or 'c'?``).

    Returns:
        The suggestion, with a leading space, or an empty string when nothing is close.
    """
    names = [str(c) for c in choices if c is not None]
    close = [f"'{c}'" for c in difflib.get_close_matches(str(value), names, n=n)]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" Did you mean {listed}?"


def look_up(value: Any, choices: Iterable[Any], what: str, *, note: str = "") -> Any:
    """Return ``value`` if it is one of ``choices``, else raise naming them and the closest.

    Args:
        value: What was given.
        choices: The accepted values (``None`` may be one of them).
        what: What the value is, for the message (``"attention mode"``).
        note: An extra sentence appended to the message.

    Returns:
        ``value``.

    Raises:
        ValueError: ``unknown <what> 'x'; choose one of [...]. Did you mean 'y'?``.
    """
    options = list(choices)
    if value in options:
        return value
    message = f"unknown {what} {value!r}; choose one of {options}.{did_you_mean(value, options)}"
    raise ValueError(message + (f" {note}" if note else ""))


def plain(value: Any) -> Any:
    """``value`` with every tuple turned into a list, at any depth (dict keys kept).

    A config stored in a checkpoint or a JSON file holds lists where the live one holds
    tuples; compare ``plain(a) == plain(b)``.
    """
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def default_file_mode() -> int:
    """The permissions of a new file: ``0o666`` less the process's umask (usually ``0o644``).

    Temporary files from :func:`tempfile.mkstemp` are ``0o600``; a file renamed into place
    from one gets this mode instead, like any file the user creates.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str | Callable[[IO[bytes]], object],
    *,
    fsync: bool = True,
    temp_name: str | None = None,
) -> Path:
    """Write a file atomically: a crash or a full disk leaves the previous file, never half.

    The contents go to a unique temporary file ``.<name>.<random>.tmp`` in the same folder
    (created if needed), are flushed and (by default) synced to disk, and the file is renamed
    over ``path`` with :func:`os.replace`; the folder is synced too where the platform allows
    it. On any failure the temporary file is removed and the error re-raised. The file gets
    the permissions of any new file (:func:`default_file_mode`), not ``0o600``.

    Args:
        path: Destination file.
        data: The bytes, or text (written as UTF-8), or a function that writes to the open
            binary file handle it is given.
        fsync: Sync the file and its folder to disk before returning (default). ``False``
            keeps the rename atomic but skips the syncs, for caches that can be rebuilt.
        temp_name: A fixed name for the temporary file, in the same folder, instead of a
            unique one: a leftover of a killed run is then overwritten by the next write of
            the same file. Only for files that one writer at a time writes.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temp_name is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:
        tmp = str(path.parent / temp_name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows it."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
