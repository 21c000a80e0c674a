"""Process-group helpers: multi-process training launched with ``torchrun``.

The engine runs in one process unless it is launched by ``torchrun`` (or
``python -m torch.distributed.run``), which starts one process per device and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`distributed_session`
then initialises the process group from that environment (NCCL on GPUs, gloo on CPUs), each
process trains on ``cuda:LOCAL_RANK`` with its own shard of the data, the model is wrapped in
``DistributedDataParallel`` (:func:`wrap_model`) and the group is destroyed at the end.

Everything that writes (checkpoints, logs, progress bars, reports, ``split.json``) is gated by
:func:`is_main_process`, so rank 0 alone writes; every metric summed over batches goes through
:func:`reduce_sums`, so the logged numbers cover the whole data set, not one shard. patchssl
never starts processes itself.

References:
    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
    VLDB 2020 (DistributedDataParallel).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from patchssl.engine.config import ConfigError
from patchssl.engine.device import resolve_device

if TYPE_CHECKING:
    from patchssl.engine.config import Config

__all__ = [
    "all_gather_objects",
    "any_process",
    "barrier",
    "broadcast_object",
    "distributed_session",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_world_size",
    "local_rank",
    "process_device",
    "reduce_sums",
    "resolve_backend",
    "shard",
    "sync_buffers",
    "unwrap_model",
    "wrap_model",
]

T = TypeVar("T")

BACKENDS: tuple[str, ...] = ("auto", "nccl", "gloo")


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


def launched_world_size() -> int:
    """Number of processes that the launcher started (``WORLD_SIZE``; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """Rank of this process on its machine (``LOCAL_RANK``; 0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from err


def resolve_backend(backend: str, device: torch.device) -> str:
    """Choose the process-group backend.

    Args:
        backend: ``"auto"`` (NCCL when training on CUDA, gloo otherwise), ``"nccl"`` or
            ``"gloo"``.
        device: Training device of this process.

    Returns:
        ``"nccl"`` or ``"gloo"``.

    Raises:
        ConfigError: For an unknown name, NCCL without CUDA, or a backend that this torch
            build lacks.
    """
    name = str(backend).lower()
    if name not in BACKENDS:
        raise ConfigError(f"dist.backend must be one of {', '.join(BACKENDS)}; got '{backend}'")
    if name == "auto":
        name = "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl":
        if device.type != "cuda":
            raise ConfigError(
                f"dist.backend=nccl needs CUDA devices, but this run trains on {device}; "
                "use dist.backend=gloo (or auto) on the CPU"
            )
        if not dist.is_nccl_available():
            raise ConfigError("this torch build has no NCCL; use dist.backend=gloo")
    elif not dist.is_gloo_available():
        raise ConfigError("this torch build has no gloo backend; use dist.backend=nccl on GPUs")
    return name


def process_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for CUDA when launched by torchrun.

    Args:
        device: The configured device (``cuda`` without an index picks the local rank's GPU).

    Returns:
        The device, made current for CUDA.

    Raises:
        ConfigError: When an explicit CUDA index disagrees with ``LOCAL_RANK``, or the machine
            has fewer GPUs than processes.
    """
    if device.type != "cuda" or launched_world_size() <= 1:
        return device
    local = local_rank()
    if device.index is not None and device.index != local:
        raise ConfigError(
            f"train.device={device} but this process has LOCAL_RANK={local}: with torchrun "
            "each process uses cuda:LOCAL_RANK; give --device cuda (or auto)"
        )
    count = torch.cuda.device_count()
    if local >= count:
        raise ConfigError(
            f"LOCAL_RANK={local} but this machine has {count} GPU(s): start at most {count} "
            "processes per node (--nproc_per_node)"
        )
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    return device


def init_distributed(
    *, backend: str = "auto", timeout_s: float = 1800.0, device: torch.device | None = None
) -> bool:
    """Initialise the process group from the torchrun environment, when there is one.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a process group already exists (a
    user script may have created its own).

    Args:
        backend: ``"auto"``, ``"nccl"`` or ``"gloo"`` (see :func:`resolve_backend`).
        timeout_s: How long a collective operation waits for the other processes before
            failing (so that an error on one rank cannot hang the others forever).
        device: Training device (chooses the backend; default: CPU).

    Returns:
        Whether this call created the process group (the caller then destroys it).

    Raises:
        ConfigError: On an incomplete torchrun environment or an unusable backend.
    """
    world = launched_world_size()
    if world <= 1 or is_distributed():
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node 2 -m patchssl pretrain ...)"
        )
    if timeout_s <= 0:
        raise ConfigError(f"dist.timeout_s must be positive; got {timeout_s}")
    name = resolve_backend(backend, device if device is not None else torch.device("cpu"))
    dist.init_process_group(
        backend=name,
        init_method="env://",
        world_size=world,
        rank=_env_int("RANK", 0),
        timeout=datetime.timedelta(seconds=float(timeout_s)),
    )
    return True


@contextlib.contextmanager
def distributed_session(config: Config) -> Iterator[bool]:
    """Run a block inside the process group described by the torchrun environment.

    Outside torchrun (or with one process) this does nothing. Otherwise the group is created
    from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` with ``config.dist.backend``
    and ``config.dist.timeout_s``, CUDA processes are bound to ``cuda:LOCAL_RANK``, and the
    group is destroyed when the block ends, also after an error.

    Args:
        config: Run configuration (``dist`` section and ``train.device``).

    Yields:
        Whether the run is distributed (more than one process).
    """
    device = resolve_device(config.train.device)
    if launched_world_size() > 1:
        device = process_device(device)
    created = init_distributed(
        backend=config.dist.backend, timeout_s=config.dist.timeout_s, device=device
    )
    try:
        if created and is_main_process():
            # printed here, not by engine.logging.echo: logging sits above this module
            print(
                f"[patchssl] distributed run: {get_world_size()} processes "
                f"(backend {dist.get_backend()}, timeout {config.dist.timeout_s:g} s); "
                "rank 0 writes the outputs",
                flush=True,
            )
        yield is_distributed() and get_world_size() > 1
    finally:
        if created and is_distributed():
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_sums(sums: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum per-process accumulators over all processes.

    Every process must call it (it is a collective operation when distributed).

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
        values = values.to(_collective_device())
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.cpu()
    return {n: float(v) for n, v in zip(names, values.tolist())}


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective operation when distributed).

    Args:
        flag: This process's value.

    Returns:
        The logical OR over all processes.
    """
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    """Wait until every process gets here (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send a picklable object from rank ``src`` to every process.

    Args:
        obj: The object on ``src`` (ignored elsewhere).
        src: Sending rank.

    Returns:
        ``src``'s object on every process.
    """
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """Collect one picklable object from every process, in rank order.

    Args:
        obj: This process's object.

    Returns:
        A list of ``world_size`` objects (``[obj]`` when not distributed).
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th item from ``rank``.

    Shards are disjoint and together hold every item once (no padding), so metrics reduced
    over them are exactly the metrics of the whole sequence.

    Args:
        items: The full sequence (the same on every process).
        rank: Rank (default: this process's).
        world_size: Number of processes (default: the group's).

    Returns:
        ``items[rank::world_size]`` as a list.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(items[rank::world_size])


def wrap_model(
    model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False
) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when distributed (else return it).

    The wrapper broadcasts rank 0's parameters and buffers at construction, averages
    gradients over processes during ``backward`` and broadcasts rank 0's buffers (batch-norm
    statistics) before each forward.

    Args:
        model: The module, already on ``device``.
        device: This process's device.
        find_unused_parameters: Let DDP tolerate parameters that get no gradient in a step
            (slower; only for tasks that skip parts of the model).

    Returns:
        The wrapped module, or ``model`` itself in a single process.
    """
    if not is_distributed() or get_world_size() == 1:
        return model

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(
        model,
        device_ids=ids,
        find_unused_parameters=find_unused_parameters,
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``torch.compile``) wrapper."""
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. batch-norm running statistics) to every process.

    Args:
        model: The (unwrapped) module, identical in structure on every process.
        src: Rank whose buffers win.
    """
    if not is_distributed() or get_world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=src)
