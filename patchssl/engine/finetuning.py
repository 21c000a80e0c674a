"""Fine-tuning the patch-attention classifier on labeled images (``patchssl finetune``).

The classifier reuses a pretrained encoder (``model.init``: a checkpoint of ``patchssl
pretrain``, loaded with :meth:`patchssl.classifier.PatchClassifier.from_pretrained`) or starts
from scratch (the paper's baseline). Patches are reweighted by attention (``model.attention``;
the paper's sigmoid gate, or none), concatenated and classified. The labeled images are split
by patient (train / val / test, saved as ``split.json``); training uses the train part, the val
part selects ``best.pt`` (by ``val_auc``) and drives early stopping, and the test part is left
for :func:`patchssl.engine.evaluate`.

Launched with ``torchrun --nproc_per_node N -m patchssl finetune ...``, the run trains with
DistributedDataParallel on per-process shards of the training part; rank 0 alone computes the
validation metrics on the whole val part (the others wait for its result, so that
``best.pt`` and early stopping follow the same numbers everywhere) and writes every output.

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (Sections 3.2-3.3, Table 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchssl.checkpoint import CheckpointError, check_compatible, load_checkpoint
from patchssl.classifier import PatchClassifier
from patchssl.engine.checkpointing import model_entries
from patchssl.engine.common import (
    as_config,
    build_encoder,
    build_tiler,
    compile_encoder,
    prepare_run,
    say,
    write_json,
)
from patchssl.engine.config import Config, ConfigError, resolve_lr
from patchssl.engine.data import (
    check_labels,
    find_eval_overlap,
    labeled_dataset,
    labeled_records,
    make_split,
    training_loaders,
    write_split,
)
from patchssl.engine.device import resolve_amp, resolve_compile
from patchssl.engine.distributed import (
    broadcast_object,
    distributed_session,
    get_world_size,
    is_main_process,
)
from patchssl.engine.evaluation import choose_val_threshold, predict
from patchssl.engine.logging import echo
from patchssl.engine.loop import StepOutput, Trainer, TrainingResult, build_scheduler
from patchssl.engine.pretraining import pretext_options
from patchssl.engine.run_dir import run_folder, start_run
from patchssl.engine.seeding import derive_seed
from patchssl.engine.settings import (
    MIN_VALIDATION_IMAGES,
    label_info,
    resolve_settings,
)
from patchssl.metrics import binary_metrics
from patchssl.permutations import PermutationSet

__all__ = [
    "FinetuneTask",
    "build_classifier",
    "class_weights",
    "finetune",
]


def _attention(config: Config) -> str | None:
    value = config.model.attention
    return None if value in (None, "", "none", "None", "off") else value


def classifier_model_config(model: nn.Module) -> dict[str, Any]:
    """The ``model_config`` of a classifier checkpoint: encoder, tiler and classifier configs."""
    own = getattr(model, "model_config", None)
    if isinstance(own, dict):
        return own
    return {
        "encoder": getattr(model.encoder, "config", None),
        "tiler": model.tiler.config,
        "classifier": model.config,
    }


def build_classifier(config: Config, device: torch.device) -> tuple[nn.Module, str | None, dict]:
    """Build the classifier, from the pretraining checkpoint ``model.init`` or from scratch.

    Args:
        config: Run configuration.
        device: Target device.

    Returns:
        ``(classifier on device, permutation fingerprint of the pretraining or None,
        transfer report dict)``.

    Raises:
        ConfigError: When the checkpoint is missing, not a pretraining checkpoint, or was made
            with another backbone, tiling, image size or permutation set than this run asks for.
    """
    m = config.model
    torch.manual_seed(derive_seed(config.train.seed, "init"))
    kwargs: dict[str, Any] = {
        "head": m.head,
        "dropout": m.dropout,
        "attention_temperature": m.attention_temperature,
        "attention_entropy": m.attention_entropy,
    }
    if m.input_norm != "auto":
        kwargs["input_norm"] = m.input_norm
    attention = _attention(config)
    if not m.init:
        encoder = build_encoder(config, device)
        tiler = build_tiler(config)
        try:
            model = PatchClassifier(encoder, m.num_classes, attention, tiler=tiler, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot build the classifier: {err}") from err
        return model.to(device), None, {}
    path = Path(m.init)
    try:
        ckpt = load_checkpoint(path, kind="pretrain")
    except (FileNotFoundError, CheckpointError) as err:
        raise ConfigError(f"model.init: {err}") from err
    tiler = build_tiler(config)
    wanted_fp = _expected_fingerprint(config)
    try:
        check_compatible(
            ckpt,
            source=str(path),
            permutations_fingerprint=wanted_fp,
            encoder={"backbone": m.backbone, "in_chans": config.data.in_chans},
            tiler=tiler.config,
        )
    except CheckpointError as err:
        raise ConfigError(f"cannot fine-tune from this checkpoint: {err}") from err
    options = {"channels_last": True} if (m.channels_last and device.type == "cuda") else None
    try:
        model = PatchClassifier.from_pretrained(
            ckpt,
            num_classes=m.num_classes,
            attention=attention,
            backbone=m.backbone,
            tiler=tiler,
            encoder_options=options,
            **kwargs,
        )
    except (CheckpointError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"cannot fine-tune from {path}: {err}") from err
    report = getattr(model, "transfer_report", None)
    report_dict: dict[str, Any] = {}
    if report is not None:
        if getattr(report, "source", "x") is None:
            report.source = str(path)
        report_dict = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else {}
        summary = getattr(report, "summary", None)
        if callable(summary):
            say(summary())
    report_dict["source"] = str(path)
    return model.to(device), ckpt.get("permutations_fingerprint"), report_dict


def _expected_fingerprint(config: Config) -> str | None:
    """Fingerprint of the permutation set named in ``pretext.options``, if any."""
    options = config.pretext.options
    if "num_permutations" in options:
        perm_set = pretext_options(config, config.model.grid**2)["permutations"]
        return perm_set.fingerprint
    perms = options.get("permutations")
    if not isinstance(perms, str) or not perms or perms == "default":
        return None

    try:
        return PermutationSet.load(perms).fingerprint
    except (OSError, ValueError) as err:
        raise ConfigError(f"pretext.options.permutations: {err}") from err


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (K * n_c)`` (1 for balanced classes).

    Args:
        labels: Integer labels of shape (n,).
        num_classes: Number of classes K.

    Returns:
        Float tensor of shape (K,); a class absent from ``labels`` gets weight 0.

    Raises:
        ConfigError: When a label is outside ``[0, K)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"labels must lie in [0, {num_classes}); got values {sorted(set(labels.tolist()))}"
        )
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, labels.size / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def random_flips(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip each image horizontally and/or vertically with probability 1/2 each, on its device.

    Args:
        images: Tensor of shape (B, C, H, W).
        generator: Source of the random choices (on the images' device).

    Returns:
        Tensor of shape (B, C, H, W).
    """
    b = images.shape[0]
    draws = torch.rand((b, 2), generator=generator, device=images.device) < 0.5
    h = draws[:, 0].view(b, 1, 1, 1)
    v = draws[:, 1].view(b, 1, 1, 1)
    images = torch.where(h, images.flip(-1), images)
    return torch.where(v, images.flip(-2), images)


class FinetuneTask:
    """The :class:`~patchssl.engine.loop.TrainingTask` of fine-tuning.

    Args:
        model: The :class:`patchssl.classifier.PatchClassifier`.
        val_loader: Loader of the validation part (or ``None``).
        device: Device of the model.
        weight: Class weights of the loss, shape (K,) (or ``None``).
        augment: ``"flip"`` or ``"none"``.
        amp_dtype: Autocast dtype (``None`` = float32).
        fingerprint: Permutation fingerprint of the pretraining (recorded in checkpoints).
        freeze_encoder_steps: Optimisation steps at the start during which the patch encoder
            gets no gradient (its parameters skip the update); 0 = never frozen.
        skipped: Collects unreadable validation files.
        labels: What the classes are (``{"class_names": [...], "label_map": {...}}``),
            recorded in checkpoints as ``model_config["labels"]``.
        threshold: Criterion (or fixed number) of the decision threshold chosen on the val
            part at every validation (``val_threshold``, stored with the checkpoint), and the
            target specificity of the ``specificity`` criterion.
    """

    kind = "finetune"

    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[dict[str, Any]] | None,
        device: torch.device,
        *,
        weight: torch.Tensor | None = None,
        augment: str = "flip",
        amp_dtype: torch.dtype | None = None,
        fingerprint: str | None = None,
        skipped: Any = None,
        freeze_encoder_steps: int = 0,
        labels: dict[str, Any] | None = None,
        threshold: tuple[str | float, float] = ("youden", 0.9),
    ) -> None:
        if augment not in ("flip", "none"):
            raise ConfigError(f"train.augment must be 'flip' or 'none'; got '{augment}'")
        self.model = model
        self.train_model: nn.Module = model
        self.val_loader = val_loader
        self.device = device
        self.weight = weight.to(device) if weight is not None else None
        self.augment = augment
        self.amp_dtype = amp_dtype
        self.fingerprint = fingerprint
        self.skipped = skipped
        self.freeze_encoder_steps = int(freeze_encoder_steps)
        self.steps_done = 0
        self.labels = labels
        self.threshold = threshold

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the class weights, computed in float32."""
        return F.cross_entropy(logits.float(), labels, weight=self.weight)

    def step(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepOutput:
        """One step on ``batch["image"]`` (B, C, H, W) uint8 and ``batch["label"]`` (B,).

        The loss is the cross-entropy plus the model's ``aux_loss`` when it has one (the
        attention's entropy penalty, ``model.attention_entropy``), computed in the forward.
        """
        images = batch["image"]
        if self.augment == "flip":
            images = random_flips(images, generator)
        frozen = self.steps_done < self.freeze_encoder_steps
        for param in self.model.encoder.parameters():
            param.requires_grad_(not frozen)  # a frozen parameter gets no grad: no update
        self.steps_done += 1
        logits = self.train_model(images, generator=generator)
        labels = batch["label"]
        loss = self.loss(logits, labels)
        aux = getattr(self.model, "aux_loss", None)  # the attention's entropy penalty, if on
        if aux is not None:
            loss = loss + aux.float()
        correct = (logits.detach().argmax(-1) == labels).sum()
        return StepOutput(loss, int(labels.shape[0]), correct)

    def validate(self, epoch: int) -> dict[str, float]:
        """``val_loss``, ``val_acc`` (at probability 0.5) and ``val_auc`` on the val part.

        In a multi-process run rank 0 evaluates the whole val part (the AUC needs every
        prediction) while the others wait, and every process receives its numbers.
        """
        if self.val_loader is None:
            return {}
        if get_world_size() > 1:
            return broadcast_object(self._validate() if is_main_process() else {})
        return self._validate()

    def _validate(self) -> dict[str, float]:
        pred = predict(
            self.model,
            self.val_loader,
            self.device,
            amp_dtype=self.amp_dtype,
            loss_fn=self.loss,
            skipped=self.skipped,
        )
        self.model.train()
        if pred.labels.size == 0:
            return {}
        row = {
            "val_loss": pred.loss,
            "val_acc": float((pred.probs.argmax(1) == pred.labels).mean()),
        }
        if pred.probs.shape[1] == 2:
            metrics = binary_metrics(pred.labels, pred.scores, 0.5)
            row["val_auc"] = float(metrics["auc"])
            threshold = choose_val_threshold(pred.labels, pred.scores, *self.threshold)
            if threshold is not None:
                row["val_threshold"] = threshold
        return row

    def checkpoint_info(self) -> dict[str, Any]:
        """The classifier's ``model_config`` (with ``labels``) and the permutation fingerprint."""
        model_config = classifier_model_config(self.model)
        if self.labels is not None:
            model_config = {**model_config, "labels": self.labels}
        return model_entries(model_config, self.fingerprint)


def _check_schedule(config: Config) -> None:
    """Refuse bad encoder rates or frozen epochs (``train.encoder_*``) before any work.

    Raises:
        ConfigError: A scale or decay outside (0, 1], a negative or non-integer number of
            epochs, or a frozen warm-up in a multi-process run.
    """
    t = config.train
    scale = t.encoder_lr_scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 < scale <= 1.0:
        raise ConfigError(
            f"train.encoder_lr_scale must be in (0, 1] (e.g. 0.1: the encoder learns 10x "
            f"slower than the new layers); got {scale!r}"
        )
    decay = t.encoder_layer_decay
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 < decay <= 1.0:
        raise ConfigError(
            f"train.encoder_layer_decay must be in (0, 1] (e.g. 0.7: each encoder layer "
            f"learns at 0.7x the rate of the one above it; 1 = off); got {decay!r}"
        )
    epochs = t.freeze_encoder_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"train.freeze_encoder_epochs must be an integer >= 0; got {epochs!r}")
    if epochs and get_world_size() > 1:
        raise ConfigError(
            "train.freeze_encoder_epochs needs a single-process run (a frozen encoder leaves "
            "DistributedDataParallel without its gradients); set it to 0 under torchrun"
        )


def _encoder_layer_ids(encoder: nn.Module) -> tuple[dict[int, int], int]:
    """Number the layers of a patch encoder from its input (0) to its last block.

    The layers are timm's: the backbone's ``group_matcher(coarse=False)`` (stem, then one
    group per block) read by :func:`timm.models.group_parameters`, as timm's own layer-wise
    decay (:func:`timm.optim.param_groups_layer_decay`) reads them. A backbone without a
    ``group_matcher`` is numbered by its top-level children in order. Parameters of the
    encoder outside its backbone go with its last layer.

    Args:
        encoder: A :class:`~patchssl.SharedPatchEncoder` (or any module; its ``backbone``
            attribute is numbered when it has one).

    Returns:
        ``(ids, num_layers)``: ``id(parameter) -> layer`` for every parameter of
        ``encoder``, and the number of layers.
    """
    from timm.models import group_parameters  # deferred: timm is heavy to import

    backbone = getattr(encoder, "backbone", encoder)
    if hasattr(backbone, "group_matcher"):
        by_name = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        # timm numbers the groups it found; renumber them 0, 1, ... in order
        order = {layer: i for i, layer in enumerate(sorted(set(by_name.values())))}
        ids = {id(p): order[by_name[n]] for n, p in backbone.named_parameters()}
    else:
        ids = {id(p): 0 for p in backbone.parameters(recurse=False)}  # its own: the input end
        children = [c for c in backbone.children() if any(True for _ in c.parameters())]
        for i, child in enumerate(children):
            ids.update({id(p): i for p in child.parameters()})
    num_layers = max(ids.values(), default=-1) + 1
    for p in encoder.parameters():
        ids.setdefault(id(p), max(num_layers - 1, 0))
    return ids, max(num_layers, 1)


def _scale_encoder_lr(trainer: Trainer, encoder: nn.Module, scale: float, decay: float) -> None:
    """Give the encoder's parameters a lower learning rate than the other layers.

    The encoder learns at ``scale`` times the rate of the new layers, and with layer-wise
    decay its layer ``i`` of ``L`` (:func:`_encoder_layer_ids`; ``L - 1`` is the last block) at
    ``scale * decay ** (L - i)``. Rebuilds ``trainer.optimizer`` with each parameter group
    split by rate (same weight decay) and ``trainer.scheduler`` on it, so that the warm-up and
    cosine schedule scale every rate alike. Call it before training starts (or before
    resuming: the saved optimizer state then matches the new groups).

    Args:
        trainer: A :class:`~patchssl.engine.loop.Trainer` that has not stepped yet.
        encoder: The module whose parameters learn slower (the patch encoder).
        scale: Factor in (0, 1] of the whole encoder.
        decay: Layer-wise decay in (0, 1] (1: every encoder layer at ``scale``).
    """
    if scale == 1.0 and decay == 1.0:
        return
    layer, num_layers = _encoder_layer_ids(encoder)
    groups = []
    for group in trainer.optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        options = {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
        by_factor: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            factor = 1.0
            if id(p) in layer:
                factor = scale * decay ** (num_layers - layer[id(p)])
            by_factor.setdefault(factor, []).append(p)
        # the new layers first, then the encoder from its last block down to its stem
        for factor in sorted(by_factor, reverse=True):
            groups.append({**options, "params": by_factor[factor], "lr": base * factor})
    # Every group carries all its options, so the constructor's defaults matter only for lr.
    trainer.optimizer = type(trainer.optimizer)(groups, lr=trainer.train.lr)
    trainer.scheduler = build_scheduler(trainer.optimizer, trainer.train, trainer.steps_per_epoch)


def finetune(
    config: Config | dict[str, Any] | str | Path | None,
    *,
    callbacks: Iterable[Callable[..., None]] = (),
) -> TrainingResult:
    """Fine-tune a patch classifier on the labeled images of ``data.manifest``.

    Writes ``config.yaml``, ``split.json``, ``metrics.csv``, ``last.pt``, ``best.pt`` (best
    ``val_auc``), ``transfer.json`` (which weights came from the pretraining) and skipped-file
    reports in ``config.out``. Under ``torchrun`` the process group is set up from the
    environment and destroyed at the end, and rank 0 alone writes.

    Args:
        config: The run configuration (``data.manifest`` is required; ``model.init`` names the
            pretraining checkpoint, or ``null`` to train from scratch).
        callbacks: Called as ``callback(trainer, epoch, row)`` after each epoch.

    Returns:
        The :class:`~patchssl.engine.loop.TrainingResult`.

    Raises:
        ConfigError: On invalid settings, unknown labels, a mismatched checkpoint, or an ``out``
            that holds another run (without ``train.resume``/``train.overwrite``) or is in
            use by another run (see :mod:`patchssl.engine.run_dir`); nothing is written
            then.
        NonFiniteLossError: When the loss becomes NaN or infinite (``last.pt`` is kept).
    """
    config = finetune_settings(as_config(config))
    with distributed_session(config), run_folder(config):
        return _finetune(config, callbacks)


def finetune_settings(config: Config) -> Config:
    """``config`` with the settings of the pretraining checkpoint ``model.init`` and the cache.

    ``train.lr`` left at ``None`` becomes fine-tuning's default (:func:`resolve_lr`).

    The backbone, tiling, image size, channels and input normalisation come from
    ``model.init`` (and the image size from ``data.cache``) unless given; a given option that
    disagrees is refused (see :func:`patchssl.engine.settings.resolve_settings`).

    Raises:
        ConfigError: On a missing or non-pretraining ``model.init``, or options that
            disagree with it.
    """
    checkpoint = None
    if config.model.init:
        try:
            checkpoint = load_checkpoint(config.model.init, kind="pretrain")
        except (FileNotFoundError, CheckpointError) as err:
            raise ConfigError(f"model.init: {err}") from err
    resolved = resolve_settings(
        config, checkpoint=checkpoint, source=str(config.model.init), fit_patches=not checkpoint
    )
    return resolve_lr(resolved, "finetune")


def _finetune(config: Config, callbacks: Iterable[Callable[..., None]]) -> TrainingResult:
    """The body of :func:`finetune`, inside the process group (if any)."""
    train_cfg = config.train
    records = labeled_records(config)
    check_labels(config, records)
    out, device = prepare_run(config, save=False)  # every output: once everything is checked
    compile_mode = resolve_compile(train_cfg.compile)  # refuse a bad value before any work
    _check_schedule(config)
    origin = f"from {config.model.init}" if config.model.init else "from scratch"
    say(
        f"fine-tuning {config.model.backbone} (attention: {config.model.attention}) {origin} "
        f"on {device}; output: {out}"
    )
    parts = make_split(config, records, out, save=False)
    warn_small_validation(parts["val"], config.model.num_classes)
    train_records = parts["train"]
    if not train_records:
        raise ConfigError("the training part of the split is empty; use more labeled images")
    labels = np.array([r.label for r in train_records])
    weight = None
    if train_cfg.class_weights == "inverse":
        weight = class_weights(labels, config.model.num_classes)
        say(f"class weights (inverse frequency): {[round(w, 3) for w in weight.tolist()]}")
    elif train_cfg.class_weights != "none":
        raise ConfigError(
            f"train.class_weights must be 'inverse' or 'none'; got '{train_cfg.class_weights}'"
        )

    train_set = labeled_dataset(config, train_records)
    val_set = labeled_dataset(config, parts["val"]) if parts["val"] else None
    loader, sampler, val_loader = training_loaders(config, train_set, val_set, device)

    model, fingerprint, transfer = build_classifier(config, device)
    compile_encoder(model.encoder, compile_mode)
    amp_dtype, _ = resolve_amp(train_cfg.amp, device)
    task = FinetuneTask(
        model,
        val_loader,
        device,
        weight=weight,
        augment=train_cfg.augment,
        amp_dtype=amp_dtype,
        fingerprint=fingerprint,
        labels=label_info(config),
        threshold=(config.eval.threshold, config.eval.target_specificity),
    )
    monitor = train_cfg.monitor
    if monitor == "auto":
        val_labels = {r.label for r in parts["val"]}
        monitor = (
            "val_auc" if len(val_labels) == 2 and config.model.num_classes == 2 else "val_loss"
        )
    trainer = Trainer(task, config, loader, sampler, device, monitor=monitor, callbacks=callbacks)
    task.skipped = trainer.skipped
    _scale_encoder_lr(
        trainer,
        model.encoder,
        float(train_cfg.encoder_lr_scale),
        float(train_cfg.encoder_layer_decay),
    )
    task.freeze_encoder_steps = train_cfg.freeze_encoder_epochs * trainer.steps_per_epoch
    if (
        train_cfg.encoder_lr_scale != 1.0
        or train_cfg.encoder_layer_decay != 1.0
        or train_cfg.freeze_encoder_epochs
    ):
        say(
            f"encoder: learning rate x{train_cfg.encoder_lr_scale}, layer-wise decay "
            f"{train_cfg.encoder_layer_decay}, frozen for the first "
            f"{train_cfg.freeze_encoder_epochs} epoch(s)"
        )
    if train_cfg.resume:
        path = Path(train_cfg.resume) if isinstance(train_cfg.resume, str) else out / "last.pt"
        trainer.resume_from(path)
        task.steps_done = trainer.global_step
    start_run(config)
    write_split(config, parts, out)
    if transfer:
        write_json(out / "transfer.json", transfer)
    if config.model.init:
        _warn_pretrain_overlap(config, parts, out)
    result = trainer.fit()
    say(f"fine-tuning done: checkpoints {result.last_checkpoint} and {result.best_checkpoint}")
    return result


def warn_small_validation(val: list[Any], num_classes: int) -> bool:
    """Warn when the validation part is too small to choose ``best.pt`` and the threshold.

    With a handful of images the AUC reaches 1.0 by chance and the chosen threshold swings;
    with one class there is no AUC and no threshold at all.

    Args:
        val: The validation records.
        num_classes: Number of classes of the classifier.

    Returns:
        Whether a warning was printed.
    """
    if not val:
        return False  # the trainer says that best.pt follows the training loss
    classes = len({r.label for r in val})
    if len(val) >= MIN_VALIDATION_IMAGES and classes >= min(2, num_classes):
        return False
    echo(
        f"warning: the validation split has {len(val)} image(s) of {classes} class(es): too "
        f"few to choose best.pt and the decision threshold reliably (under "
        f"{MIN_VALIDATION_IMAGES} images, or a class missing); use more labeled images or a "
        "larger --set data.val_size=..., and compare best.pt with last.pt",
        err=True,
    )
    return True


def _warn_pretrain_overlap(config: Config, parts: dict[str, list[Any]], out: Path) -> None:
    """Warn when val/test images were also in the pretraining folder of ``model.init``."""
    try:
        saved = load_checkpoint(config.model.init).get("config") or {}
    except Exception:  # the checkpoint is checked properly later
        return
    saved_data = saved.get("data") or {}
    unlabeled = saved_data.get("unlabeled")
    if saved_data.get("exclude_overlap") and saved_data.get("manifest") == config.data.manifest:
        return  # the pretraining already left these images out
    if not unlabeled or not Path(unlabeled).is_dir():
        return
    probe = config.copy()
    probe.data.unlabeled = unlabeled
    evaluation = [r.path for k in ("val", "test") for r in parts.get(k, [])]
    find_eval_overlap(probe, evaluation, out_dir=out, after_pretraining=True)
