"""The generic training loop shared by pretraining and fine-tuning.

:class:`Trainer` owns everything that does not depend on the task: device placement, the
optimizer and the warmup-cosine schedule, mixed precision (autocast bf16/fp16, a GradScaler for
fp16), gradient clipping, per-epoch reseeding, progress bars with loss and throughput,
``metrics.csv``/TensorBoard, skipped-file reports, ``last.pt``/``best.pt`` checkpoints written
atomically, early stopping, resuming, and stopping cleanly on a non-finite loss. A task supplies
a :class:`TrainingTask`: the model, what one step computes, how to validate, and what a
checkpoint must record to rebuild the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

# the module, not its functions: a checkpoint is written through the module's current
# save_checkpoint/copy_checkpoint (the robustness tests replace them to simulate crashes)
from patchssl import checkpoint as checkpoint_io
from patchssl.engine.checkpointing import (
    CheckpointWriter,
    check_compatible,
    checkpoint_payload,
    resolve_async_checkpoint,
)
from patchssl.engine.config import DEFAULT_LR, Config, ConfigError, TrainConfig, resolve_lr
from patchssl.engine.device import (  # re-exported: they lived here before
    autocast_context,
    move_batch,
    resolve_amp,
    resolve_compile,
    resolve_device,
)
from patchssl.engine.distributed import (
    all_gather_objects,
    any_process,
    get_rank,
    get_world_size,
    is_main_process,
    reduce_sums,
    sync_buffers,
    unwrap_model,
    wrap_model,
)
from patchssl.engine.logging import MetricsLogger, SkippedFiles, echo, progress
from patchssl.engine.seeding import (
    capture_rng_state,
    make_generator,
    restore_rng_state,
    seed_everything,
)

__all__ = [
    "NonFiniteLossError",
    "StepOutput",
    "Trainer",
    "TrainingResult",
    "TrainingTask",
    "autocast_context",
    "build_optimizer",
    "build_scheduler",
    "describe_batch",
    "move_batch",
    "per_process_batch_size",
    "resolve_amp",
    "resolve_compile",
    "resolve_device",
]


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss; the last good checkpoint was kept."""


class StepOutput(NamedTuple):
    """What one training or validation step reports.

    Attributes:
        loss: Scalar mean loss of the batch (with grad during training).
        count: Number of images in the batch.
        correct: Number of correctly classified images (``None`` when not applicable).
    """

    loss: Tensor
    count: int
    correct: Tensor | int | None = None


class TrainingTask(Protocol):
    """What a training run plugs into :class:`Trainer`.

    Attributes:
        model: The module being trained (its ``state_dict`` goes into the checkpoints).
        kind: ``"pretrain"`` or ``"finetune"`` (stored in the checkpoint).
        train_model: The module that :meth:`step` calls: ``model`` itself, or the
            ``DistributedDataParallel`` wrapper that :class:`Trainer` puts here in a
            multi-process run (so that gradients are averaged over the processes).
            Validation and checkpoints use ``model``.
    """

    model: nn.Module
    kind: str
    train_model: nn.Module

    def step(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepOutput:
        """Compute the loss of one batch already on the device (through ``train_model``)."""
        ...

    def validate(self, epoch: int) -> dict[str, float]:
        """Return validation metrics named ``val_*`` (empty dict when there is no validation)."""
        ...

    def checkpoint_info(self) -> dict[str, Any]:
        """Return ``model_config`` and ``permutations_fingerprint`` for the checkpoint.

        Build it with :func:`patchssl.engine.checkpointing.model_entries`.
        """
        ...


def per_process_batch_size(train: TrainConfig, world_size: int | None = None) -> int:
    """Images per step of each process: ``batch_size``, or ``global_batch_size / world_size``.

    Args:
        train: Training section of the configuration.
        world_size: Number of processes (default: the process group's).

    Returns:
        The per-process batch size.

    Raises:
        ConfigError: When ``global_batch_size`` does not divide by the number of processes,
            or a size is not positive.
    """
    world = get_world_size() if world_size is None else int(world_size)
    if train.global_batch_size is None:
        if train.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1; got {train.batch_size}")
        return int(train.batch_size)
    total = int(train.global_batch_size)
    if total < 1 or total % world:
        raise ConfigError(
            f"train.global_batch_size={total} must be a positive multiple of the number of "
            f"processes ({world}); use {max(world, total - total % world)} or set "
            "train.batch_size (per process) instead"
        )
    return total // world


def describe_batch(per_process: int, world_size: int | None = None) -> str:
    """``"8 images per step (4 per process x 2 processes)"`` for the start-of-run message."""
    world = get_world_size() if world_size is None else int(world_size)
    noun = "process" if world == 1 else "processes"
    return f"{per_process * world} images per step ({per_process} per process x {world} {noun})"


@dataclass
class TrainingResult:
    """Summary of a finished (or stopped) training run.

    Attributes:
        out_dir: Run folder.
        last_checkpoint: ``last.pt``.
        best_checkpoint: ``best.pt`` (the epoch with the best monitored metric).
        best_metric: Best value of the monitored metric.
        best_epoch: Epoch (0-based) of ``best.pt``.
        monitor: Name of the monitored metric.
        epochs_run: Epochs completed in total (including those before a resume).
        stopped_early: Whether early stopping ended the run.
        skipped_files: Number of distinct unreadable files skipped.
        history: One dict per completed epoch.
    """

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path
    best_metric: float | None
    best_epoch: int | None
    monitor: str
    epochs_run: int
    stopped_early: bool = False
    skipped_files: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov), without weight decay on biases and normalisation parameters.

    timm's factories do the work: :func:`timm.optim.param_groups_weight_decay` splits the
    parameters that require grad (1-D tensors and biases get no weight decay) and
    :func:`timm.optim.create_optimizer_v2` builds the optimizer.

    AdamW is fused (``fused=True``) when every parameter is a floating CUDA tensor.

    Args:
        model: Module to optimise (only parameters that require grad).
        train: Training section of the configuration (``optimizer``, ``lr``,
            ``weight_decay``, ``momentum``).

    Returns:
        The optimizer, with two parameter groups: the decayed weights, then the rest
        (``weight_decay`` 0).

    Raises:
        ConfigError: For an optimizer other than ``adamw`` and ``sgd``.
    """
    from timm.optim import create_optimizer_v2  # deferred: timm is heavy to import

    name = train.optimizer.lower()
    if name not in ("adamw", "sgd"):
        raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd'; got '{train.optimizer}'")
    lr = _peak_lr(train)
    groups = _weight_decay_groups(model, train.weight_decay)
    extra: dict[str, Any] = {}
    params = [p for group in groups for p in group["params"]]
    if name == "adamw" and params and all(p.is_cuda and p.is_floating_point() for p in params):
        # One fused kernel for the whole update on CUDA (torch's fused AdamW needs every
        # parameter on CUDA and floating); torch's default (foreach) elsewhere.
        extra["fused"] = True
    return create_optimizer_v2(
        groups,
        opt=name,
        lr=lr,
        weight_decay=train.weight_decay,
        momentum=train.momentum,
        **extra,
    )


def _peak_lr(train: TrainConfig) -> float:
    """``train.lr``, refusing ``None`` (a command's default that no command has filled in)."""
    if train.lr is None:
        raise ConfigError(
            "train.lr is None (the command's default): set it, e.g. train.lr=1e-3, or pass "
            "the configuration through patchssl.engine.config.resolve_lr(config, 'pretrain') "
            "(or 'finetune')"
        )
    return float(train.lr)


def _weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups of ``model``: decayed weights, then biases and 1-D parameters.

    The split is :func:`timm.optim.param_groups_weight_decay`'s. The two groups are always
    present and in this order, whatever ``weight_decay`` (timm lists the no-decay group first
    and merges the two when the decay is 0), so that an optimizer state saved by an earlier
    run loads group by group into the optimizer of its resumed run.

    Args:
        model: The module (only parameters that require grad are listed).
        weight_decay: The decay of the first group.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest,
        "weight_decay": 0.0}]``.
    """
    from timm.optim import param_groups_weight_decay  # deferred: timm is heavy to import

    decayed: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    # a non-zero decay, so that timm splits; the groups' decays are set below
    for group in param_groups_weight_decay(model, weight_decay=1.0):
        (decayed if group["weight_decay"] else rest).extend(group["params"])
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    steps_per_epoch: int,
    *,
    step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to ``min_lr`` (or a constant rate), stepped per batch.

    The same rates as torch's ``SequentialLR(LinearLR, CosineAnnealingLR)``, written as one
    ``LambdaLR`` whose factor is a function of the step alone, so that a resumed run whose
    ``epochs`` or steps per epoch changed is put at the right rate by building it anew at
    that step.

    Args:
        optimizer: The optimizer.
        train: Training section (``schedule``, ``warmup_epochs``, ``epochs``, ``lr``, ``min_lr``).
        steps_per_epoch: Optimizer steps per epoch.
        step: The step the schedule starts at (0 for a new run; the optimizer must then have
            been scheduled before, as on resume, so that its groups hold ``initial_lr``).

    Returns:
        A ``LambdaLR`` scheduler.
    """
    if train.schedule not in ("cosine", "constant"):
        raise ConfigError(f"train.schedule must be 'cosine' or 'constant'; got '{train.schedule}'")
    total = max(1, train.epochs * steps_per_epoch)
    warmup = min(total, round(train.warmup_epochs * steps_per_epoch))
    lr = _peak_lr(train)
    floor = train.min_lr / lr if lr > 0 else 0.0
    cosine = train.schedule == "cosine"

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


def _non_finite_advice(last_path: Path) -> str:
    """What is kept and what to try, for the messages of a non-finite stop."""
    kept = (
        f"The last good checkpoint is kept at {last_path}."
        if last_path.is_file()
        else "No checkpoint had been written yet."
    )
    return (
        f"{kept} Try a lower learning rate (--lr), gradient clipping (--set "
        "train.grad_clip=1.0) or --amp none."
    )


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return True
    if math.isnan(value):
        return False
    return value < best if mode == "min" else value > best


def monitor_mode(name: str) -> str:
    """``"min"`` for losses and error rates, ``"max"`` for everything else."""
    return "min" if ("loss" in name or "error" in name) else "max"


class _StepAccumulator:
    """Per-epoch sums of the training steps, kept on the device until they are read.

    Reading a value from an accelerator makes the host wait for every queued kernel; the
    loop reads these only every ``Trainer.check_every`` steps and at the end of the epoch, so
    that the host queues the next steps while the device computes.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device)
        self.loss = zero.clone()  # sum of loss * images
        self.correct = zero.clone()
        self.count = 0
        self.scored = 0
        self.seen = 0
        self._last = zero.clone()
        # (loss, batch index, global step) of the first non-finite loss; index -1: none yet
        self._bad = torch.full((3,), -1.0, device=device)

    def add(
        self, loss: Tensor, n: int, correct: Tensor | int | None, index: int, step: int
    ) -> None:
        """Add one step: its loss, images, correct predictions, batch index and global step."""
        value = loss.detach().float()
        newly = (~torch.isfinite(value)) & (self._bad[1] < 0)
        here = torch.stack([value, value.new_full((), index), value.new_full((), step)])
        self._bad = torch.where(newly, here, self._bad)
        if n:
            self.loss = self.loss + value * n
            self.count += n
            self.seen += n
            self._last = value
            if correct is not None:
                self.correct = self.correct + correct
                self.scored += n

    def first_bad(self) -> tuple[float, int, int] | None:
        """``(loss, batch index, global step)`` of the first non-finite loss, or ``None``."""
        value, index, step = self._bad.tolist()
        if index < 0:
            return None
        return value, int(index), int(step)

    @property
    def last_loss(self) -> float:
        """The loss of the last step with images (reads the device)."""
        return float(self._last)

    def totals(self) -> dict[str, float]:
        """The sums as Python floats (reads the device)."""
        loss, correct = torch.stack([self.loss, self.correct.float()]).tolist()
        return {
            "loss": loss,
            "count": float(self.count),
            "correct": correct,
            "scored": float(self.scored),
        }


class Trainer:
    """Runs epochs of a :class:`TrainingTask` with checkpoints, logs and early stopping.

    Args:
        task: The task (model, step, validation, checkpoint info).
        config: The run configuration (``train`` section and ``out``).
        loader: Training data loader yielding collated dicts with ``"image"`` (B, C, H, W)
            uint8 and ``"failed"`` (list of ``(path, reason)``).
        sampler: The loader's sampler, told the epoch before each epoch (``set_epoch``).
        device: Training device.
        monitor: Metric selecting ``best.pt`` (e.g. ``"val_auc"``); an epoch that ties the
            best value replaces ``best.pt`` when its ``val_loss`` is lower.
        out_dir: Run folder (default: ``config.out``).
        callbacks: Called as ``callback(trainer, epoch, row)`` after each epoch's checkpoint
            is taken (a place for custom logging or for stopping the run by raising). With
            ``train.async_checkpoint`` (the default on a GPU), ``last.pt`` and ``best.pt`` may
            still be being written then: a callback that reads them calls
            :meth:`wait_for_checkpoints` first.
    """

    def __init__(
        self,
        task: TrainingTask,
        config: Config,
        loader: Iterable[dict[str, Any]],
        sampler: Any,
        device: torch.device,
        *,
        monitor: str,
        out_dir: str | Path | None = None,
        callbacks: Iterable[Callable[[Trainer, int, dict[str, Any]], None]] = (),
    ) -> None:
        self.task = task
        if config.train.lr is None and task.kind in DEFAULT_LR:  # the task's own default rate
            config = resolve_lr(config, task.kind)
        self.config = config
        self.train = config.train
        self.loader = loader
        # (epoch, the loader's iterator for it), started before the epoch before validated
        self._ahead: tuple[int, Iterator[Any]] | None = None
        self.sampler = sampler
        self.device = device
        self.monitor = monitor
        self.mode = monitor_mode(monitor)
        self.out_dir = Path(out_dir if out_dir is not None else config.out)
        self.callbacks = list(callbacks)
        if device.type == "cuda":
            # Every training batch has the same shape: cuDNN times its kernels once per
            # shape and keeps the fastest (bench_throughput measures the step this way).
            torch.backends.cudnn.benchmark = True
        self.amp_dtype, note = resolve_amp(self.train.amp, device)
        if note:
            echo(f"note: {note}")
        self.model = unwrap_model(task.model)
        self.world_size = get_world_size()
        self.train_module: nn.Module = self.model
        if self.world_size > 1:
            if not hasattr(task, "train_model"):
                raise TypeError(
                    f"{type(task).__name__} has no 'train_model' attribute: a task trained in "
                    "several processes must call self.train_model (the DDP wrapper) in step()"
                )
            self.train_module = wrap_model(
                self.model, device, find_unused_parameters=config.dist.find_unused_parameters
            )
            task.train_model = self.train_module
        self.optimizer = build_optimizer(self.model, self.train)
        steps = len(loader)  # type: ignore[arg-type]
        if self.train.max_steps_per_epoch:
            steps = min(steps, self.train.max_steps_per_epoch)
        self.batch_size = int(getattr(loader, "batch_size", None) or self.train.batch_size)
        if steps == 0:
            raise ConfigError(
                f"no training batches: {len(sampler)} image(s) per process with "
                f"batch_size={self.batch_size}"
            )
        self.steps_per_epoch = steps
        self.scheduler = build_scheduler(self.optimizer, self.train, steps)
        self.scaler = torch.amp.GradScaler(
            device.type if device.type == "cuda" else "cpu",
            enabled=self.amp_dtype == torch.float16,
        )
        self.start_epoch = 0
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.skipped = SkippedFiles(self.out_dir)
        self.last_path = self.out_dir / "last.pt"
        self.best_path = self.out_dir / "best.pt"
        self.data_generator = getattr(sampler, "generator", None)
        self._template: dict[str, Tensor] | None = None
        #: Steps between checks of the loss for NaN/inf (each check makes the host wait for
        #: the device). 1 on the CPU (free there: a step ends when its work does), where a
        #: non-finite loss is caught before its backward pass; 32 on accelerators, where the
        #: steps between two checks are already applied when one is caught (the run stops
        #: and nothing of the epoch is saved, so no checkpoint holds their weights).
        self.check_every = 1 if device.type == "cpu" else 32
        # last.pt/best.pt, written in a background thread with train.async_checkpoint
        self._checkpoints = CheckpointWriter(
            resolve_async_checkpoint(self.train.async_checkpoint, device)
        )

    # ----------------------------------------------------------------------------- checkpoints
    def _generators(self) -> dict[str, torch.Generator]:
        return (
            {"data": self.data_generator}
            if isinstance(self.data_generator, torch.Generator)
            else {}
        )

    def payload(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint payload of the end of ``epoch`` (keys: :mod:`patchssl.checkpoint`).

        The layout is :func:`patchssl.engine.checkpointing.checkpoint_payload`'s.
        """
        return checkpoint_payload(
            self.task.kind,
            self.task.checkpoint_info(),
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=capture_rng_state(self._generators()),
            epoch=epoch,
            step=self.global_step,
            config=self.config.to_dict(),
            metrics=metrics,
            trainer={
                "monitor": self.monitor,
                "best_metric": self.best_metric,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
                "history": self.history,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world_size,
                "batch_size": self.batch_size,
            },
        )

    def wait_for_checkpoints(self) -> None:
        """Block until the checkpoints submitted so far are written (``last.pt``, ``best.pt``).

        With ``train.async_checkpoint`` an epoch's checkpoints are written in a background
        thread while the next epoch trains; a callback that reads them calls this first.
        :meth:`fit` returns (or raises) only once they are written.

        Raises:
            OSError: Or any other error of a write that failed, naming its file.
        """
        self._checkpoints.wait()

    def resume_from(self, path: str | Path) -> None:
        """Load ``last.pt`` (or ``path``) and continue after its epoch.

        Every process loads the same file. A run may resume with another number of processes
        (or another batch size): the data order of each epoch depends only on the seed and
        the epoch, and when the number of steps per epoch changed, the learning-rate schedule
        is moved to the same point of the run (the start of the next epoch) instead of
        counting the old steps.

        Raises:
            ConfigError: When the checkpoint is missing or belongs to another model
                (backbone, pretext task, permutation set, tiling...).
        """
        path = Path(path)
        self.wait_for_checkpoints()
        if not path.is_file():
            raise ConfigError(f"cannot resume: no checkpoint at {path}")
        ckpt = checkpoint_io.load_checkpoint(path)
        info = self.task.checkpoint_info()
        check_compatible(
            ckpt,
            kind=self.task.kind,
            model_config=info["model_config"],
            fingerprint=info.get("permutations_fingerprint"),
            action="resume",
            source=str(path),
        )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt.get("rng", {}), self._generators())
        state = ckpt.get("trainer", {})
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt["step"])
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.history = list(state.get("history", []))
        self._restore_best(ckpt, path)
        echo(f"resumed from {path} (epoch {self.start_epoch} of {self.train.epochs})")
        saved_world = int(state.get("world_size", 1))
        saved_batch = state.get("batch_size")
        if saved_batch is not None:
            before = int(saved_batch) * saved_world
            now = self.batch_size * self.world_size
            if saved_world != self.world_size or before != now:
                hint = " (train.global_batch_size keeps it constant)" if before != now else ""
                echo(
                    f"note: the checkpoint was trained with "
                    f"{describe_batch(int(saved_batch), saved_world)}; this run uses "
                    f"{describe_batch(self.batch_size, self.world_size)}{hint}"
                )
        saved_steps = state.get("steps_per_epoch")
        if saved_steps is not None and int(saved_steps) != self.steps_per_epoch:
            self._move_schedule(self.start_epoch * self.steps_per_epoch)

    def _move_schedule(self, step: int) -> None:
        """Put the learning-rate schedule at ``step`` (after a change of steps per epoch)."""
        self.scheduler = build_scheduler(
            self.optimizer, self.train, self.steps_per_epoch, step=step
        )

    def _placeholder_batch(self) -> dict[str, Any]:
        """A one-image batch whose loss is multiplied by 0 (see :meth:`train_epoch`)."""
        if self._template is not None:
            return self._template
        data = self.config.data
        size = (1, data.in_chans, data.image_size, data.image_size)
        zeros = torch.zeros(1, dtype=torch.long, device=self.device)
        return {
            "image": torch.zeros(size, dtype=torch.uint8, device=self.device),
            "label": zeros,
            "index": zeros,
        }

    def _gather_skipped(self) -> None:
        """Merge every process's unreadable files, so that rank 0's report lists them all."""
        for entries in all_gather_objects(dict(self.skipped.entries)):
            for key, entry in entries.items():
                mine = self.skipped.entries.setdefault(
                    key, {"path": entry["path"], "reason": entry["reason"], "seen": []}
                )
                for where in entry.get("seen", []):
                    if where not in mine["seen"]:
                        mine["seen"].append(where)

    def check_finite(self, epoch: int, row: dict[str, Any]) -> None:
        """Refuse to checkpoint non-finite weights, optimizer state or losses.

        Called by every process right before the checkpoints of ``epoch`` are written (the
        weights are the same on every process, so all stop together). It looks at the
        model's parameters and buffers and the optimizer's state, whatever the training step
        checked, so no NaN or infinity ever reaches ``last.pt`` or ``best.pt``.

        Args:
            epoch: 0-based epoch number.
            row: The epoch's metrics (``train_loss``, ``val_loss`` are checked).

        Raises:
            NonFiniteLossError: Naming the loss or the first tensors that are not finite.
        """
        problems = [
            f"{key}={row[key]}"
            for key in ("train_loss", "val_loss")
            if key in row and not math.isfinite(float(row[key]))
        ]
        tensors = {
            f"weight {name}": t
            for name, t in self.model.state_dict().items()
            if t.is_floating_point()
        }
        for index, state in enumerate(self.optimizer.state.values()):
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    tensors[f"optimizer state {key} of parameter {index}"] = value
        if tensors:
            flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).cpu()
            if not bool(flags.all()):
                bad = [name for name, ok in zip(tensors, flags.tolist()) if not ok]
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                problems.append(f"non-finite values in {', '.join(bad[:3])}{more}")
        if not problems:
            return
        raise NonFiniteLossError(
            f"non-finite training state at the end of epoch {epoch + 1} "
            f"({'; '.join(problems)}); training stopped and nothing was saved for this epoch. "
            + _non_finite_advice(self.last_path)
        )

    def _check_images_seen(self, epoch: int) -> None:
        """Stop a run whose epoch trained on no image at all (every file unreadable)."""
        if getattr(self, "images_seen", 1) > 0:
            return
        entries = list(self.skipped.entries.values())
        shown = "; ".join(f"{e['path']} ({e['reason']})" for e in entries[:5])
        more = f"; ... and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise ConfigError(
            f"epoch {epoch + 1} trained on no image: none of the {len(entries)} training "
            f"image(s) could be read ({shown}{more}); nothing was saved. Check the files "
            f"(the list is in {self.out_dir / 'skipped_files.txt'})."
        )

    def _restore_best(self, ckpt: dict[str, Any], source: Path) -> None:
        """Make ``best.pt`` match the best epoch that the resumed checkpoint records.

        ``last.pt`` is written before ``best.pt``; a run killed between the two leaves a
        ``last.pt`` that names its own epoch as the best while ``best.pt`` is older or
        missing. That ``last.pt`` holds exactly what ``best.pt`` should (the same payload),
        so it is copied there.
        """
        if not is_main_process() or self.best_epoch is None:
            return
        current = None
        if self.best_path.is_file():
            try:
                current = checkpoint_io.load_checkpoint(self.best_path).get("epoch")
            except checkpoint_io.CheckpointError:
                current = None
        if current == self.best_epoch:
            return
        if int(ckpt["epoch"]) == self.best_epoch:
            checkpoint_io.save_checkpoint(self.best_path, ckpt)
            echo(
                f"note: {self.best_path} did not hold the best epoch ({self.best_epoch + 1}) "
                f"recorded in {source} (the run was stopped between the two writes); "
                "restored it from that checkpoint"
            )
            return
        echo(
            f"warning: {self.best_path} does not hold the best epoch ({self.best_epoch + 1}) "
            f"recorded in {source} and cannot be rebuilt from it; it will be written again "
            "when the monitored metric next improves",
            err=True,
        )

    def _save(self, epoch: int, metrics: dict[str, Any], *, best: bool) -> None:
        """Write ``last.pt`` of ``epoch`` and, when ``best``, copy it to ``best.pt`` (main process).

        The copy has the same payload: nothing is serialised or hashed twice. With
        ``train.async_checkpoint`` both are written in the background (the payload is copied
        to CPU memory first); the write before is waited for.
        """
        if is_main_process():
            best_path = self.best_path if best else None
            self._checkpoints.submit(self.last_path, self.payload(epoch, metrics), best_path)

    def _check_finite(self, acc: _StepAccumulator, epoch: int, distributed: bool) -> None:
        """Stop on a non-finite loss among the steps accumulated so far (one host sync).

        Raises:
            NonFiniteLossError: Naming the first such step, on every process together.
        """
        bad = acc.first_bad()
        # all processes stop together (one leaving alone would hang the others)
        if not (any_process(bad is not None) if distributed else bad is not None):
            return
        self._checkpoints.wait(raise_errors=False)  # the message says whether last.pt exists
        if bad is not None:
            value, index, step = bad
            where = f"epoch {epoch + 1}, step {index + 1} of the epoch (global step {step + 1})"
            value_text = str(value) + (f" on rank {get_rank()}" if distributed else "")
        else:
            where = f"epoch {epoch + 1}"
            value_text = "on another process"
        raise NonFiniteLossError(
            f"non-finite loss ({value_text}) at {where}; training stopped. "
            + _non_finite_advice(self.last_path)
        )

    # ---------------------------------------------------------------------------------- epochs
    def _epoch_batches(self, epoch: int) -> Iterator[Any]:
        """The loader's iterator for ``epoch``: the one started ahead, or a new one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch:
            return ahead[1]
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        return iter(self.loader)

    def _start_epoch_ahead(self, epoch: int) -> None:
        """Set the loader's workers to work on ``epoch`` while the epoch before is validated.

        Called before the validation and checkpoints of the epoch before, so that the first
        batches of ``epoch`` wait for the step instead of the step for them. Only with worker
        processes (nothing runs ahead without them); the batches are the same as when the
        iterator is made at the epoch's start (the sampler's order depends on the epoch alone,
        the workers' seeds on the loader's generator).
        """
        if epoch >= self.train.epochs or getattr(self.loader, "num_workers", 0) == 0:
            return
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._ahead = (epoch, iter(self.loader))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Run one epoch of optimisation.

        Args:
            epoch: 0-based epoch number.

        Returns:
            ``train_loss``, ``train_acc`` (when the task reports it), ``lr``, ``images_per_s``,
            each over all processes.

        Raises:
            NonFiniteLossError: On a NaN or infinite loss on any process (nothing is saved
                for this epoch).
        """
        rank = get_rank()
        seed_everything(self.train.seed, "epoch", epoch, "rank", rank)
        generator = make_generator(self.train.seed, "step", epoch, "rank", rank, device=self.device)
        self.train_module.train()
        distributed = self.world_size > 1
        bar = progress(
            self._epoch_batches(epoch),
            total=self.steps_per_epoch,
            desc=f"{self.task.kind} epoch {epoch + 1}/{self.train.epochs}",
            enabled=self.train.progress,
        )
        start = time.perf_counter()
        seen = 0
        taken = 0  # optimizer steps of this epoch (the same on every process)
        # Device-side accumulators: the host never waits for the device between checks.
        acc = _StepAccumulator(self.device)
        for index, batch in enumerate(bar):
            if index >= self.steps_per_epoch:
                break
            failed = batch.get("failed") or []
            if failed:
                self.skipped.add(failed, where=f"{self.task.kind} epoch {epoch + 1}")
            placeholder = batch.get("image") is None or len(batch["image"]) == 0
            if placeholder and not distributed:
                continue
            if placeholder:
                # Every process must take part in every step (gradient averaging is a
                # collective operation): a process whose whole batch was unreadable steps on
                # a stand-in image with a zero loss, contributing a zero gradient.
                # torch's Join([ddp]) does not replace it: a rank that skips the batch would
                # shadow only DDP's collectives, not this loop's any_process() check, which
                # sits between DDP's forward and backward ones (a JoinHook runs whole, so it
                # cannot shadow it there). With 2 gloo processes the check met a joined
                # rank's gradient all-reduce and aborted ("Received data size doesn't match
                # expected size"). Join also adds an all-reduce to every step.
                batch = self._placeholder_batch()
            else:
                batch = move_batch(batch, self.device)
                if self._template is None and distributed:
                    self._template = {
                        k: v[:1].clone() for k, v in batch.items() if torch.is_tensor(v)
                    }
            # A stand-in's forward must not move the batch-norm statistics (rank 0's become
            # everyone's): they are put back after its backward (which reads them).
            kept = [
                (b, b.detach().clone())
                for m in (self.model.modules() if placeholder else ())
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for b in m.buffers(recurse=False)
            ]
            with autocast_context(self.device, self.amp_dtype):
                out = self.task.step(batch, generator)
            loss = out.loss * 0.0 if placeholder else out.loss
            n = 0 if placeholder else int(out.count)
            acc.add(loss, n, None if placeholder else out.correct, index, self.global_step)
            taken += 1
            if taken % self.check_every == 0:
                # Before the backward pass: with check_every=1 (the CPU default) a
                # non-finite loss never reaches the weights.
                self._check_finite(acc, epoch, distributed)
                if hasattr(bar, "set_postfix") and acc.seen:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(loss=f"{acc.last_loss:.4f}", img_s=f"{seen / elapsed:.1f}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            for buffer, value in kept:
                buffer.copy_(value)
            if self.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1
            seen += n
        # The steps since the last check; nothing of this epoch is saved before it.
        self._check_finite(acc, epoch, distributed)
        if hasattr(bar, "close"):
            bar.close()
        elapsed = max(time.perf_counter() - start, 1e-9)
        totals = reduce_sums({**acc.totals(), "seen": float(seen)})
        self.images_seen = int(totals["seen"])  # 0: every training image was unreadable
        row: dict[str, float] = {
            "train_loss": totals["loss"] / max(totals["count"], 1.0),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "images_per_s": totals["seen"] / elapsed,
            "epoch_time_s": elapsed,
        }
        if totals["scored"] > 0:
            row["train_acc"] = totals["correct"] / totals["scored"]
        return row

    def _breaks_tie(self, value: float, row: dict[str, Any]) -> bool:
        """Whether an epoch that ties the best monitored value has a lower ``val_loss``.

        A small validation split saturates a metric such as the AUC (1.0 after one epoch);
        without a tie-break ``best.pt`` would stay the barely trained first epoch.
        """
        if self.best_metric is None or value != self.best_metric or "val_loss" not in row:
            return False
        best = next((r for r in self.history if r.get("epoch") == (self.best_epoch or 0) + 1), {})
        loss, best_loss = row["val_loss"], best.get("val_loss")
        return best_loss is not None and math.isfinite(loss) and float(loss) < float(best_loss)

    def fit(self) -> TrainingResult:
        """Train from ``start_epoch`` to ``train.epochs``, with checkpoints and early stopping.

        It returns or raises only once every checkpoint it took is written, also those
        written in the background (``train.async_checkpoint``).

        Returns:
            The :class:`TrainingResult`.

        Raises:
            NonFiniteLossError: On a non-finite loss (``last.pt`` keeps the last good epoch).
            OSError: When a checkpoint cannot be written (full disk...), naming the file.
        """
        if is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(
            self.out_dir,
            tensorboard=self.train.tensorboard,
            resume_epoch=self.start_epoch if self.start_epoch > 0 else None,
        )
        stopped_early = False
        try:
            if self.start_epoch >= self.train.epochs:
                echo(f"nothing to do: the run already has {self.start_epoch} epoch(s)")
            for epoch in range(self.start_epoch, self.train.epochs):
                row: dict[str, Any] = {"epoch": epoch + 1}
                row.update(self.train_epoch(epoch))
                self._check_images_seen(epoch)
                self._start_epoch_ahead(epoch + 1)  # its loading overlaps what follows
                if self.world_size > 1:
                    sync_buffers(self.model)  # rank 0's batch-norm statistics everywhere
                val = self.task.validate(epoch)
                row.update(val)
                if self.world_size > 1:
                    self._gather_skipped()
                row["step"] = self.global_step
                row["skipped"] = len(self.skipped)
                self._checkpoints.wait()  # the epoch before: its last.pt, for the checks' messages
                self.check_finite(epoch, row)  # nothing non-finite is ever checkpointed
                monitored = row.get(self.monitor)
                if monitored is None:
                    fallback = "train_loss"
                    if epoch == self.start_epoch:
                        echo(f"note: '{self.monitor}' is not available; best.pt follows {fallback}")
                    monitored, mode = row[fallback], "min"
                else:
                    mode = self.mode
                improved = _better(float(monitored), self.best_metric, mode)
                improved = improved or self._breaks_tie(float(monitored), row)
                if improved:
                    self.best_metric = float(monitored)
                    self.best_epoch = epoch
                    self.bad_epochs = 0
                else:
                    self.bad_epochs += 1
                self.history.append(row)
                logger.log(row, step=self.global_step)
                self._save(epoch, row, best=improved)
                echo(_format_row(row, self.train.epochs, improved))
                self.skipped.report(f"epoch {epoch + 1}")
                for callback in self.callbacks:
                    callback(self, epoch, row)
                if self.train.patience and self.bad_epochs >= self.train.patience:
                    echo(
                        f"early stopping: {self.monitor} did not improve for "
                        f"{self.bad_epochs} epoch(s); best {self.best_metric:.4g} at epoch "
                        f"{(self.best_epoch or 0) + 1}"
                    )
                    stopped_early = True
                    break
        except BaseException as err:
            self._checkpoints.close(err)  # the write taken is finished; err is not replaced
            raise
        finally:
            logger.close()
            self.skipped.write()
        self._checkpoints.close()  # returns once every checkpoint is written
        return TrainingResult(
            out_dir=self.out_dir,
            last_checkpoint=self.last_path,
            best_checkpoint=self.best_path,
            best_metric=self.best_metric,
            best_epoch=self.best_epoch,
            monitor=self.monitor,
            epochs_run=len(self.history),
            stopped_early=stopped_early,
            skipped_files=len(self.skipped),
            history=self.history,
        )


def _format_row(row: dict[str, Any], epochs: int, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key, value in row.items():
        if key in ("epoch", "step", "epoch_time_s", "skipped"):
            continue
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
    if row.get("skipped"):
        parts.append(f"skipped={row['skipped']}")
    if improved:
        parts.append("(best)")
    return "  ".join(parts)
