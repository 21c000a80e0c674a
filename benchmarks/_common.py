"""Shared benchmark helpers: machine description and timing with warm-up and medians."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Where benchmark results are written by default (git-ignored).
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """The machine and library versions, printed with every figure."""
    import numpy
    import timm

    import patchssl

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "patchssl": patchssl.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> str:
    """One line naming the machine, for tables and logs."""
    m = machine()
    where = m.get("gpu") or f"{m['processor']} ({m['cpu_count']} cores)"
    return (
        f"{where}; {m['platform']}; python {m['python']}, torch {m['torch']}, "
        f"timm {m['timm']}, patchssl {m['patchssl']}; {m['date']}"
    )


def sync(device: torch.device | str) -> None:
    """Wait for queued device work, so timings measure work rather than launches."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    iters: int = 5,
    repeats: int = 3,
) -> float:
    """Median over ``repeats`` of the mean seconds per call over ``iters`` calls, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def save_results(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write results as JSON with the machine description."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))
    return path


# --------------------------------------------------------------------------------------------
# Additions for the throughput and data-loading benchmarks (issue 7).
# --------------------------------------------------------------------------------------------
def add_common_args(parser: Any, *, default_out: str) -> None:
    """The flags every benchmark script takes: --device, --quick, --out, --threads."""
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when present, else cpu)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="the smallest settings: seconds, for smoke tests"
    )
    parser.add_argument("--out", default=default_out, help="where the JSON results go")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def pick_device(name: str | None) -> torch.device:
    """``name`` as a device, or cuda when present, else cpu."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    return device


@dataclass
class Timing:
    """What :func:`measure` found: the median and every sample, in seconds per call."""

    median_s: float
    samples: list[float]
    iters: int
    first_call_s: float  # the first warm-up call alone (includes torch.compile's compilation)


def measure(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 3,
    min_time: float = 1.0,
    max_iters: int = 50,
) -> Timing:
    """Like :func:`timeit`, with the number of iterations chosen so that a repeat lasts
    about ``min_time`` seconds (from the last warm-up call), and every sample kept."""
    first = 0.0
    last = 0.0
    for i in range(max(1, warmup)):
        start = time.perf_counter()
        fn()
        sync(device)
        last = time.perf_counter() - start
        if i == 0:
            first = last
    iters = max(1, min(max_iters, math.ceil(min_time / max(last, 1e-6))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / iters)
    return Timing(statistics.median(samples), samples, iters, first)


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    min_time: float = 1.0,
    max_iters: int = 50,
) -> dict[str, Timing]:
    """Time several functions with their repeats interleaved (A B C A B C ...).

    On a shared machine the load drifts; interleaving gives every function the same share
    of it, so that the ratios of the medians hold even when the absolute figures move.
    """
    iters: dict[str, int] = {}
    first: dict[str, float] = {}
    for name, fn in fns.items():
        last = 0.0
        for i in range(max(1, warmup)):
            start = time.perf_counter()
            fn()
            sync(device)
            last = time.perf_counter() - start
            if i == 0:
                first[name] = last
        iters[name] = max(1, min(max_iters, math.ceil(min_time / max(last, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / iters[name])
    return {
        name: Timing(statistics.median(samples[name]), samples[name], iters[name], first[name])
        for name in fns
    }


def _rss_bytes() -> tuple[int, str]:
    """The process's resident set size now, and how it was read."""
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss), "psutil RSS"
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm RSS"
    except (OSError, ValueError, AttributeError):
        import resource

        # ru_maxrss is the peak so far (KiB on Linux, bytes on macOS), not the current size.
        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def _release_freed_memory() -> None:
    """Give memory freed by earlier runs back to the OS (glibc ``malloc_trim``), so that the
    RSS growth of the next block counts what it allocates instead of reusing freed pages."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory while the block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's peak of live tensors).
    CPU: the process's resident set size sampled every ``interval`` seconds by a thread
    (psutil when installed, else ``/proc/self/statm``; ``ru_maxrss`` as a last resort), after
    handing freed heap pages back to the OS (glibc ``malloc_trim``).
    ``peak_mib`` is the absolute peak; ``step_mib`` is the peak minus what was held when
    the block started (with the model and inputs already built: activations, gradients,
    optimizer state and workspace).
    """

    def __init__(self, device: torch.device | str, interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.method = ""
        self.peak_mib = float("nan")
        self.step_mib = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._base = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes()[0])

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            _release_freed_memory()
            self._base, self.method = _rss_bytes()
            self._peak = self._base
            if self.method != "ru_maxrss":
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, _rss_bytes()[0])
        self.peak_mib = peak / 2**20
        self.step_mib = (peak - self._base) / 2**20


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as a Markdown table (floats with 3 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def save_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as CSV (the union of their keys as columns), next to the JSON."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if not isinstance(v, (list, dict))})
    return path
