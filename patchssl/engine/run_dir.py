"""Protection of a run folder: no silent replacement, one writer at a time, no leftovers.

Every command that writes a run folder (``prepare``, ``pretrain``, ``finetune``) enters
:func:`run_folder` before it reads any data, and calls :func:`start_run` once everything has
been checked (config, data, checkpoints), right before it writes its first output:

- a folder that already holds a training run (``last.pt``, ``best.pt`` or ``metrics.csv``)
  is refused, unless the run is continued (``train.resume``, ``--resume``) or replaced on
  purpose (``train.overwrite``, ``--overwrite``: its checkpoints and metrics are removed by
  :func:`start_run`);
- an exclusive lock (:func:`fcntl.flock` on ``<out>/.patchssl.lock``) is held while the
  command runs, so a second run into the same folder is refused at once instead of
  interleaving its rows and checkpoints with the first. The lock file is removed when the
  command ends; the kernel releases the lock when the process ends, however it ends, so a
  lock file left by a killed run never blocks the next one (it is reported and taken over);
- temporary files left by an interrupted atomic write (``.last.pt.*.tmp``,
  ``config.yaml.tmp``...) are removed;
- a refused run leaves nothing behind: a folder it created is removed again.

Under ``torchrun`` the main process does all of this and tells the others the outcome.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from patchssl.engine.config import Config, ConfigError, save_config
from patchssl.engine.distributed import broadcast_object, is_distributed, is_main_process
from patchssl.engine.logging import echo

__all__ = ["LOCK_NAME", "RUN_FILES", "run_folder", "start_run"]

#: Files whose presence means that a folder holds a training run.
RUN_FILES: tuple[str, ...] = ("last.pt", "best.pt", "metrics.csv")

#: The lock file held while a command writes the folder.
LOCK_NAME = ".patchssl.lock"

# endings of the outputs whose temporary copies an interrupted atomic write can leave
_OUTPUT_SUFFIXES = (".pt", ".json", ".yaml", ".csv", ".txt")


@contextlib.contextmanager
def run_folder(config: Config) -> Iterator[Path]:
    """Check, lock and tidy the run folder ``config.out`` for the duration of a command.

    Args:
        config: The run configuration (``out``, ``train.resume``, ``train.overwrite``).

    Yields:
        The run folder (created if needed).

    Raises:
        ConfigError: When the folder holds a run and neither ``train.resume`` nor
            ``train.overwrite`` is set, when both are set, or when another process holds
            the folder's lock. Nothing has been written then.
        OSError: When the folder cannot be created or written (permissions, full disk).
    """
    out = Path(config.out)
    problem, created, handle = None, False, None
    if is_main_process():
        try:
            problem = _refusal(out, bool(config.train.resume), bool(config.train.overwrite))
            if problem is None:
                created = not out.exists()
                out.mkdir(parents=True, exist_ok=True)
                handle, problem = _lock(out)
                if problem is None:
                    _remove_leftovers(out)
        except OSError as err:
            problem = err
    if is_distributed():
        problem = broadcast_object(problem)
    try:
        if problem is not None:
            raise problem if isinstance(problem, OSError) else ConfigError(problem)
        yield out
    except BaseException:
        if created and handle is not None and not any((out / n).exists() for n in RUN_FILES):
            _remove_created(out)
        raise
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):  # a lock file left behind means: killed
                (out / LOCK_NAME).unlink(missing_ok=True)
            os.close(handle)  # releases the lock
        elif created:
            _remove_created(out)


def start_run(config: Config) -> None:
    """Begin writing the run folder: clear a replaced run, then write ``config.yaml``.

    Call it once every check has passed (config, data, model, a resumed checkpoint), right
    before the first output is written.

    Args:
        config: The run configuration (``train.overwrite`` removes the previous run's
            checkpoints and metrics; ``config.yaml`` records the configuration without it).
    """
    if not is_main_process():
        return
    out = Path(config.out)
    if config.train.overwrite and not config.train.resume:
        removed = [name for name in RUN_FILES if (out / name).is_file()]
        for name in removed:
            (out / name).unlink()
        if removed:
            echo(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")
    saved = config.copy()
    saved.train.overwrite = False  # a one-time action, not part of the run's settings
    save_config(saved, out / "config.yaml")


def _refusal(out: Path, resume: bool, overwrite: bool) -> str | None:
    """Why the folder may not be written, or ``None``."""
    if resume and overwrite:
        return (
            "--resume and --overwrite contradict each other: continue the run in "
            f"{out} (--resume) or replace it (--overwrite), not both"
        )
    if resume or overwrite or not out.is_dir():
        return None
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return None
    return (
        f"{out} already holds a run ({', '.join(found)}); nothing was written. Continue it "
        "with --resume, replace it with --overwrite (its checkpoints and metrics are "
        "removed), or choose another folder with --out"
    )


def _lock(out: Path) -> tuple[int | None, str | None]:
    """Take the folder's lock: ``(file descriptor, None)`` or ``(None, why not)``."""
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"process {holder}" if holder else "another process"
            return None, (
                f"{out} is in use by another patchssl run ({who} holds {path}); wait for it "
                "to finish, or choose another folder with --out"
            )
        try:  # the file may have been removed by a run ending meanwhile: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    previous = _read_pid(fd)
    if previous and previous != os.getpid():
        echo(
            f"note: {path} was left by process {previous}, which is no longer running; "
            "taking it over"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, None


def _read_pid(fd: int) -> int | None:
    """The process id written in a lock file, if any."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _remove_leftovers(out: Path) -> None:
    """Delete temporary files of interrupted atomic writes (``.last.pt.x1y2.tmp``...)."""
    removed = []
    for entry in out.iterdir():
        name = entry.name
        if not name.endswith(".tmp") or not entry.is_file() or entry.is_symlink():
            continue
        stem = name[: -len(".tmp")]
        if name.startswith(".") or stem.endswith(_OUTPUT_SUFFIXES):
            entry.unlink()
            removed.append(name)
    if removed:
        echo(
            f"removed {len(removed)} unfinished temporary file(s) from {out}: {', '.join(removed)}"
        )


def _remove_created(out: Path) -> None:
    """Remove a folder this command created, when it holds nothing but the lock file."""
    with contextlib.suppress(OSError):
        (out / LOCK_NAME).unlink(missing_ok=True)
        out.rmdir()
