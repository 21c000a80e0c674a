"""Process-group helpers: the single place where the engine asks "am I rank 0?" and reduces metrics.

The engine runs in one process today; multi-process training (``torchrun``) plugs in here. Every
write (checkpoints, logs, progress bars, reports) is gated by :func:`is_main_process`, and every
metric that is summed over batches goes through :func:`reduce_sums`, so enabling
DistributedDataParallel only needs the process group, a distributed sampler and the model wrapper.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["get_rank", "get_world_size", "is_distributed", "is_main_process", "reduce_sums"]


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process writes checkpoints, logs, progress bars and reports."""
    return get_rank() == 0


def reduce_sums(sums: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum per-process accumulators over all processes.

    Args:
        sums: Named scalar sums (e.g. ``{"loss_sum": ..., "count": ...}``) of this process.

    Returns:
        The same names with the totals over all processes, as Python floats.
    """
    names = sorted(sums)
    values = torch.tensor(
        [
            float(sums[n].detach().double().item() if torch.is_tensor(sums[n]) else sums[n])
            for n in names
        ],
        dtype=torch.float64,
    )
    if is_distributed():
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        values = values.to(device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.cpu()
    return {n: float(v) for n, v in zip(names, values.tolist())}
