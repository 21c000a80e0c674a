"""Run logs: console messages, progress bars, ``metrics.csv``, TensorBoard and skipped files.

Everything here writes only on the main process (see :mod:`patchssl.engine.distributed`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from patchssl import _optional
from patchssl._validation import atomic_write
from patchssl.engine.distributed import is_main_process

__all__ = ["MetricsLogger", "SkippedFiles", "echo", "progress", "stderr_is_terminal"]

T = TypeVar("T")


def echo(message: str, *, err: bool = False) -> None:
    """Print a message on the main process (flushed at once, so logs show progress live).

    Args:
        message: Text to print.
        err: Print to stderr instead of stdout.
    """
    if is_main_process():
        print(message, file=sys.stderr if err else sys.stdout, flush=True)


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where progress bars belong)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm progress bar on the main process, on a terminal.

    When stderr is not a terminal (redirected to a file, a pipe, a job log), no bar is drawn:
    its carriage-return updates would fill the log, and the runs print one line per epoch
    anyway.

    Args:
        iterable: What to iterate over.
        total: Number of items, when ``len`` does not know it.
        desc: Label of the bar.
        enabled: ``False`` returns the iterable unchanged.

    Returns:
        An iterator; the tqdm object (with ``set_postfix``) when a bar is shown.
    """
    if not enabled or not is_main_process() or not stderr_is_terminal():
        return iter(iterable)
    from tqdm.auto import tqdm  # deferred: a display library, only for a terminal

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


class MetricsLogger:
    """One row per epoch (or evaluation) to ``metrics.csv``, and to TensorBoard when available.

    The CSV keeps every column seen so far; when a new column appears the file is rewritten
    with the wider header, so rows stay aligned. Resuming a run keeps the rows already written
    up to the resumed epoch.

    Args:
        out_dir: Run folder.
        tensorboard: ``"auto"`` (use it when ``tensorboard`` is installed), ``"true"``/``True``
            (require it) or ``"false"``/``False``.
        resume_epoch: When resuming, the number of completed epochs: rows with a (1-based)
            ``epoch`` above it are dropped (they belong to the interrupted attempt); ``None``
            starts a new file.
        filename: CSV file name.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tensorboard: str | bool = "auto",
        resume_epoch: int | None = None,
        filename: str = "metrics.csv",
    ) -> None:
        self.path = Path(out_dir) / filename
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self.writer = None
        self.enabled = is_main_process()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or [])
                for row in reader:
                    try:
                        if int(float(row.get("epoch", 0))) > resume_epoch:
                            continue
                    except ValueError:
                        pass
                    self.rows.append(dict(row))
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()
        mode = str(tensorboard).lower()
        if mode in ("true", "auto") and (mode == "true" or _optional.is_available("tensorboard")):
            _optional.require("tensorboard", extra="tensorboard", feature="TensorBoard logging")
            from torch.utils.tensorboard import SummaryWriter  # deferred: optional, heavy

            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def _rewrite(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, text.getvalue())

    def log(self, row: dict[str, Any], *, step: int | None = None) -> None:
        """Append a row (numbers are rounded to 6 significant digits in the CSV).

        Args:
            row: Column name to value; ``epoch`` and ``step`` columns come first.
            step: Global step for TensorBoard (default: ``row["step"]`` or ``row["epoch"]``).
        """
        if not self.enabled:
            return
        clean = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()}
        new = [k for k in clean if k not in self.columns]
        self.rows.append(clean)
        if new or not self.path.exists():
            self.columns.extend(new)
            self._rewrite()
        else:
            with self.path.open("a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(
                    clean
                )
        if self.writer is not None:
            at = step if step is not None else int(row.get("step", row.get("epoch", 0)))
            for key, value in clean.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, at)
            self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SkippedFiles:
    """Collects images that could not be read, to report them instead of stopping.

    Args:
        out_dir: Where ``skipped_files.txt`` and ``skipped_files.json`` are written.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.entries: dict[str, dict[str, Any]] = {}
        self.count = 0

    def add(self, failed: Iterable[tuple[str, str]], *, where: str = "") -> int:
        """Record failed files of one batch.

        Args:
            failed: ``(path, reason)`` pairs as reported by the collate function.
            where: Context such as ``"pretrain epoch 3"``.

        Returns:
            How many were added.
        """
        added = 0
        for path, reason in failed:
            key = str(path)
            entry = self.entries.setdefault(key, {"path": key, "reason": str(reason), "seen": []})
            if where and where not in entry["seen"]:
                entry["seen"].append(where)
            added += 1
        self.count += added
        return added

    def __len__(self) -> int:
        return len(self.entries)

    def write(self) -> Path | None:
        """Write the report files (only when something was skipped).

        Returns:
            The path of the text report, or ``None`` when nothing was skipped.
        """
        if not self.entries or not is_main_process():
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        txt = self.out_dir / "skipped_files.txt"
        lines = [f"{e['path']}\t{e['reason']}" for e in self.entries.values()]
        txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (self.out_dir / "skipped_files.json").write_text(
            json.dumps(list(self.entries.values()), indent=2) + "\n", encoding="utf-8"
        )
        return txt

    def report(self, context: str) -> None:
        """Print a summary and write the report files, when anything was skipped.

        Args:
            context: What was running (e.g. ``"epoch 3"``).
        """
        if not self.entries:
            return
        path = self.write()
        shown = list(self.entries.values())[:5]
        echo(
            f"warning: {len(self.entries)} unreadable image(s) skipped so far ({context}); "
            f"list in {path}",
            err=True,
        )
        for entry in shown:
            echo(f"  skipped {entry['path']}: {entry['reason']}", err=True)
        if len(self.entries) > len(shown):
            echo(f"  ... and {len(self.entries) - len(shown)} more", err=True)
