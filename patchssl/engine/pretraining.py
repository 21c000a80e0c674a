"""Self-supervised pretraining on a folder of unlabeled images (``patchssl pretrain``).

Any registered pretext task can be trained (``pretext.name``; the paper's is ``jigsaw``). The
data loader only decodes images to uint8 tensors; tiling, shuffling and the task's random
choices happen inside the model on the device. A small share of the images
(``data.pretrain_val_size``) is held out to monitor the pretext loss and accuracy, which select
``best.pt`` and drive early stopping.

Launched with ``torchrun --nproc_per_node N -m patchssl pretrain ...``, the run trains with
DistributedDataParallel: each process takes its shard of the images and of the held-out
images, draws its own (seeded) random choices, and rank 0 writes every output
(see ``docs/distributed.md``).

References:
    Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles", ECCV 2016 (arXiv:1603.09246). Chae et al., JIPS 2021 (pretraining on 44,031
    unlabeled cervix images before transfer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchssl.engine.checkpointing import model_entries
from patchssl.engine.common import (
    as_config,
    build_encoder,
    build_tiler,
    compile_encoder,
    prepare_run,
    say,
)
from patchssl.engine.config import Config, ConfigError, resolve_lr
from patchssl.engine.data import (
    find_eval_overlap,
    training_loaders,
    unlabeled_dataset,
    write_overlap,
)
from patchssl.engine.device import autocast_context, move_batch, resolve_amp, resolve_compile
from patchssl.engine.distributed import distributed_session, reduce_sums, shard
from patchssl.engine.logging import echo
from patchssl.engine.loop import StepOutput, Trainer, TrainingResult
from patchssl.engine.probing import PretrainProbe
from patchssl.engine.run_dir import run_folder, start_run
from patchssl.engine.seeding import derive_seed, make_generator
from patchssl.engine.settings import MIN_VALIDATION_IMAGES, resolve_settings
from patchssl.permutations import PermutationSet
from patchssl.pretext import (
    PretextPluginError,
    UnknownPretextError,
    create_pretext,
    get_pretext_class,
)

__all__ = ["PretrainTask", "build_pretext", "pretext_options", "pretrain"]


def build_pretext(config: Config, device: torch.device) -> nn.Module:
    """Build the pretext task (encoder + tiler + head) described by ``config``.

    Args:
        config: Run configuration (``model``, ``data``, ``pretext`` sections).
        device: Where the task's parameters go.

    Returns:
        A :class:`patchssl.pretext.PretextTask` on ``device``.

    Raises:
        ConfigError: For an unknown pretext name, a plugin that fails to load (both name
            ``pretext.name`` and point to ``patchssl pretexts``), or invalid options.
    """
    name = config.pretext.name
    listing = "`patchssl pretexts` lists the installed tasks"
    try:  # resolve the name first: a bad name is reported before any model is built
        get_pretext_class(name)
    except UnknownPretextError as err:
        raise ConfigError(f"pretext.name: {err} ({listing})") from err
    except PretextPluginError as err:
        raise ConfigError(
            f"pretext.name: {err}\nTo use another task, change pretext.name; {listing}."
        ) from err
    tiler = build_tiler(config)
    options = pretext_options(config, tiler.num_patches)
    torch.manual_seed(derive_seed(config.train.seed, "init"))
    encoder = build_encoder(config, device)
    try:
        task = create_pretext(name, encoder=encoder, tiler=tiler, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"pretext '{name}' (pretext.options): {err}") from err
    return task.to(device)


_PERMUTATION_KEYS = ("num_permutations", "permutation_method", "permutation_seed")


def pretext_options(config: Config, num_tiles: int) -> dict[str, Any]:
    """The pretext task's keyword arguments, with the engine's permutation shortcuts resolved.

    ``pretext.options`` may hold ``num_permutations`` (with optional ``permutation_method``
    and ``permutation_seed``) instead of a ``permutations`` file: the set is then generated
    with :meth:`patchssl.permutations.PermutationSet.generate` (seeded, so the same options
    always give the same set, and the checkpoint's fingerprint matches). The patch defence
    options may be given flat (``per_patch_norm: false``) or as a ``defences:`` mapping; flat
    keys are folded into one :class:`patchssl.pretext.PatchDefences` that starts from the
    task's defaults (:meth:`patchssl.pretext.PretextTask.fold_defence_options`).

    Args:
        config: Run configuration.
        num_tiles: Patches per image (``grid * grid``).

    Returns:
        Keyword arguments for :func:`patchssl.pretext.create_pretext`.
    """
    options = dict(config.pretext.options)
    try:
        cls = get_pretext_class(config.pretext.name)
    except (UnknownPretextError, PretextPluginError):  # build_pretext reports a bad name
        cls = None
    fold = getattr(cls, "fold_defence_options", None)
    if fold is not None:  # flat per_patch_norm/color_drop/... keys into one PatchDefences
        try:
            options = fold(options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"pretext.options: {err}") from err
    if "num_permutations" not in options:
        for key in _PERMUTATION_KEYS:
            options.pop(key, None)
        return options
    if "permutations" in options:
        raise ConfigError(
            "pretext.options: give either 'permutations' (a file) or 'num_permutations', not both"
        )

    num = options.pop("num_permutations")
    method = options.pop("permutation_method", "auto")
    seed = options.pop("permutation_seed", 0)
    try:
        options["permutations"] = PermutationSet.generate(
            int(num), num_tiles, method=str(method), seed=int(seed)
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"pretext.options.num_permutations: {err}") from err
    return options


class PretrainTask:
    """The :class:`~patchssl.engine.loop.TrainingTask` of pretraining.

    Args:
        model: The pretext task module.
        val_loader: Loader of held-out unlabeled images (or ``None``); in a multi-process run,
            this process's shard of them (the metrics are summed over the processes).
        device: Device of the model.
        amp_dtype: Autocast dtype for validation (``None`` = float32).
        seed: Run seed (validation draws its random choices from a fixed generator, so the
            validation loss is comparable across epochs).
        skipped: Collects unreadable files.
        probe: Called as ``probe(model, epoch)`` at the end of :meth:`validate`; its metrics
            join the epoch's (see :class:`patchssl.engine.probing.PretrainProbe`).
    """

    kind = "pretrain"

    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[dict[str, Any]] | None,
        device: torch.device,
        *,
        amp_dtype: torch.dtype | None = None,
        seed: int = 0,
        skipped: Any = None,
        probe: Callable[[nn.Module, int], dict[str, float]] | None = None,
    ) -> None:
        self.model = model
        self.train_model: nn.Module = model
        self.val_loader = val_loader
        self.device = device
        self.amp_dtype = amp_dtype
        self.seed = seed
        self.skipped = skipped
        self.probe = probe

    def step(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepOutput:
        """One pretext step on ``batch["image"]`` of shape (B, C, H, W) uint8."""
        out = self.train_model(batch["image"], generator=generator)
        return StepOutput(out.loss, int(batch["image"].shape[0]), _correct(out.logits, out.targets))

    def validate(self, epoch: int) -> dict[str, float]:
        """Pretext loss and accuracy on the held-out images, then the probe when one is set.

        Every process evaluates its shard and the sums are reduced over the processes, so
        the metrics cover each held-out image once (every process must call this).
        """
        metrics = self._validate_pretext()
        if self.probe is not None:
            metrics.update(self.probe(self.model, epoch))
        return metrics

    @torch.no_grad()
    def _validate_pretext(self) -> dict[str, float]:
        """``val_loss`` and ``val_acc`` (centred patches, fixed draws); ``{}`` without images."""
        if self.val_loader is None:
            return {}
        self.model.eval()
        generator = make_generator(self.seed, "validation", device=self.device)
        # Sums stay on the device until the end: no host-device sync per batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in self.val_loader:
            if self.skipped is not None and batch.get("failed"):
                self.skipped.add(batch["failed"], where="pretrain validation")
            if batch["image"].shape[0] == 0:
                continue
            batch = move_batch(batch, self.device)
            with autocast_context(self.device, self.amp_dtype):
                out = self.model(batch["image"], generator=generator)
            n = int(batch["image"].shape[0])
            loss_sum += out.loss.detach().double() * n
            correct += _correct(out.logits, out.targets).double()
            count += n
        self.model.train()
        totals = reduce_sums({"loss": loss_sum, "correct": correct, "count": float(count)})
        if totals["count"] == 0:
            return {}
        return {
            "val_loss": totals["loss"] / totals["count"],
            "val_acc": totals["correct"] / totals["count"],
        }

    def checkpoint_info(self) -> dict[str, Any]:
        """The pretext task's ``model_config`` and permutation fingerprint."""
        return model_entries(self.model.model_config, self.model.permutation_fingerprint)


def _correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct predictions per image: (B, ..., K) logits against (B, ...) targets."""
    hits = (logits.detach().argmax(-1) == targets).float()
    return hits.reshape(hits.shape[0], -1).mean(dim=1).sum()


def pretrain(
    config: Config | dict[str, Any] | str | Path | None,
    *,
    callbacks: Iterable[Callable[..., None]] = (),
) -> TrainingResult:
    """Pretrain a pretext task on unlabeled images and save checkpoints in ``config.out``.

    Writes ``config.yaml``, ``metrics.csv``, ``last.pt`` (every epoch), ``best.pt`` (lowest
    validation pretext loss), ``skipped_files.txt``/``.json`` when images could not be read,
    and ``tensorboard/`` when TensorBoard is installed. Under ``torchrun`` the process group
    is set up from the environment and destroyed at the end, and rank 0 alone writes.

    Args:
        config: The run configuration (``data.unlabeled`` is required).
        callbacks: Called as ``callback(trainer, epoch, row)`` after each epoch.

    Returns:
        The :class:`~patchssl.engine.loop.TrainingResult`.

    Raises:
        ConfigError: On invalid settings or a checkpoint that does not match (resume), or an ``out``
            that holds another run (without ``train.resume``/``train.overwrite``) or is in
            use by another run (see :mod:`patchssl.engine.run_dir`); nothing is written
            then.
        NonFiniteLossError: When the loss becomes NaN or infinite (``last.pt`` is kept).
    """
    config = as_config(config)
    if not config.data.unlabeled:
        raise ConfigError(
            "pretraining needs a folder of unlabeled images: --data DIR (data.unlabeled)"
        )
    config = resolve_lr(resolve_settings(config, fit_patches=True), "pretrain")
    with distributed_session(config), run_folder(config):
        return _pretrain(config, callbacks)


def _pretrain(config: Config, callbacks: Iterable[Callable[..., None]]) -> TrainingResult:
    """The body of :func:`pretrain`, inside the process group (if any)."""
    train_cfg = config.train
    out, device = prepare_run(config, save=False)  # config.yaml: once everything is checked
    compile_mode = resolve_compile(train_cfg.compile)  # refuse a bad value before any work
    say(
        f"pretraining '{config.pretext.name}' with {config.model.backbone} on {device}; "
        f"output: {out}"
    )

    overlaps = find_eval_overlap(config, write=False)  # written once the run may write
    exclude = [o.pretrain for o in overlaps] if config.data.exclude_overlap else None
    dataset = unlabeled_dataset(config, exclude=exclude)
    n = len(dataset)
    share = config.data.pretrain_val_size
    n_val = min(n - 1, max(1, round(n * share))) if share > 0 and n >= 10 else 0
    order = torch.randperm(n, generator=make_generator(train_cfg.seed, "pretrain-val")).tolist()
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    if 0 < n_val < MIN_VALIDATION_IMAGES:
        echo(
            f"warning: the pretraining validation split has {n_val} image(s) "
            f"(data.pretrain_val_size={share} of {n}): too few to choose best.pt reliably "
            f"(under {MIN_VALIDATION_IMAGES}); use more unlabeled images or a larger --set "
            "data.pretrain_val_size=..., and compare best.pt with last.pt",
            err=True,
        )
    train_set = torch.utils.data.Subset(dataset, train_idx)
    say(
        f"{len(train_idx)} training and {len(val_idx)} validation images from "
        f"{config.data.unlabeled}"
    )

    val_set = torch.utils.data.Subset(dataset, shard(val_idx)) if val_idx else None
    loader, sampler, val_loader = training_loaders(config, train_set, val_set, device)

    model = build_pretext(config, device)
    compile_encoder(model.encoder, compile_mode, model=model, scope=train_cfg.compile_scope)
    amp_dtype, _ = resolve_amp(train_cfg.amp, device)
    probe = None
    if config.probe.manifest and config.probe.every:
        probe = PretrainProbe(config, device)
    task = PretrainTask(
        model, val_loader, device, amp_dtype=amp_dtype, seed=train_cfg.seed, probe=probe
    )
    monitor = train_cfg.monitor if train_cfg.monitor != "auto" else "val_loss"
    trainer = Trainer(task, config, loader, sampler, device, monitor=monitor, callbacks=callbacks)
    task.skipped = trainer.skipped
    if train_cfg.resume:
        path = Path(train_cfg.resume) if isinstance(train_cfg.resume, str) else out / "last.pt"
        trainer.resume_from(path)
    start_run(config)
    write_overlap(out, overlaps)
    result = trainer.fit()
    say(f"pretraining done: checkpoints {result.last_checkpoint} and {result.best_checkpoint}")
    return result
