"""Shared benchmark helpers: machine description and timing with warm-up and medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
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
