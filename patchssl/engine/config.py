"""Run configuration: dataclasses, YAML/JSON loading and dotted overrides.

A run is described by one :class:`Config` with a section per concern (``data``, ``model``,
``pretext``, ``train``, ``eval``, ``explain``, ``demo``, ``dist``, ``probe``). Every command
reads the sections it needs and ignores the others, so one file can drive a whole study::

    out: runs/cervix
    data: {unlabeled: /data/cervix/unlabeled, manifest: /data/cervix/labeled.csv, image_size: 512}
    model: {backbone: resnet50, patch_size: 153}
    train: {epochs: 30, batch_size: 32, lr: 0.001}

Files are loaded strictly: an unknown key is an error with a did-you-mean hint, and values are
checked against the field types. Command-line flags override the file through dotted paths
(``train.epochs=3``), whose values are parsed as YAML scalars (``3``, ``0.1``, ``true``,
``null``, ``[3, 3]``).

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (the defaults follow its setup: 512 px images, a 3x3 grid of
    153 px patches, a ResNet50 encoder, an 80/20 split).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchssl._validation import atomic_write, did_you_mean

__all__ = [
    "DEFAULT_LR",
    "Config",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "DistConfig",
    "EvalConfig",
    "ExplainConfig",
    "ModelConfig",
    "PretextConfig",
    "ProbeConfig",
    "TrainConfig",
    "apply_overrides",
    "check_ranges",
    "flatten_keys",
    "get_dotted",
    "load_config",
    "merge_dicts",
    "read_config_file",
    "resolve_lr",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration or usage error that the user can fix (the CLI exits with status 2)."""


@dataclass
class DataConfig:
    """Where the images are and how they are split.

    Attributes:
        unlabeled: Folder (searched recursively) of unlabeled images for pretraining.
        manifest: CSV manifest of labeled images (columns: image path, label, and optionally
            patient and visit ids).
        image_root: Folder that relative paths in the manifest start from (default: the
            manifest's folder).
        label_map: How raw labels map to classes (anything
            :meth:`patchssl.data.LabelMap.from_config` accepts): the built-in ``"cervix"``
            (alias ``"cin"``: CIN0/CIN1/normal -> 0, CIN2/CIN3/CIN4 -> 1; bare digits are not
            accepted) or ``"binary"`` (labels already ``0``/``1`` or
            ``negative``/``positive``), a ``"RAW:CLASS,..."`` string, a YAML/JSON file, or a
            mapping ``{raw: class}``. Labels missing from the map are refused and listed.
        path_column: Manifest column with the image path.
        label_column: Manifest column with the raw label.
        patient_column: Manifest column with the patient id (splits are grouped by it).
        visit_column: Manifest column with the visit id (optional).
        image_size: Working image size in pixels (images are resized to a square).
        in_chans: Number of image channels given to the network (3 = RGB, 1 = grayscale).
        split: A saved ``split.json`` to reuse instead of drawing a new split.
        test_size: Share of patients held out for testing (the paper: 0.2).
        val_size: Share of the training patients carved out for validation (threshold choice
            and early stopping).
        pretrain_val_size: Share of unlabeled images held out to monitor pretraining.
        exclude_overlap: Drop unlabeled images that are also labeled evaluation images
            (otherwise the overlap is reported with a warning).
        cache: Output folder of ``patchssl prepare`` (resized copies); default ``<out>/cache``.
        workers: Data-loader worker processes (decoding only); ``null`` (default): chosen
            from the cores this process may use and the device (see
            :func:`patchssl.data.default_workers`); ``patchssl prepare``: all cores.
        max_images: Use at most this many images of each kind (quick trials).
        allow_outside_root: Accept manifest image paths that lead outside the data root
            (``image_root``, default the manifest's folder): absolute paths elsewhere or
            ``../``. Off by default, for every command, so a manifest cannot make a run read
            arbitrary files.
        max_image_pixels: Sets ``PIL.Image.MAX_IMAGE_PIXELS`` for the run: an image of more
            than twice this many pixels is refused at once as a possible decompression bomb,
            before it is decoded (default ``null``: Pillow's 89,478,485, so files above about
            179 megapixels, e.g. 30000 x 30000, are refused). Raise it for whole-slide sized
            files you trust.
    """

    unlabeled: str | None = None
    manifest: str | None = None
    image_root: str | None = None
    label_map: str | dict = "cervix"
    path_column: str = "image"
    label_column: str = "label"
    patient_column: str = "patient"
    visit_column: str = "visit"
    image_size: int = 512
    in_chans: int = 3
    split: str | None = None
    test_size: float = 0.2
    val_size: float = 0.2
    pretrain_val_size: float = 0.05
    exclude_overlap: bool = False
    cache: str | None = None
    workers: int | None = None
    max_images: int | None = None
    allow_outside_root: bool = False
    max_image_pixels: int | None = None


@dataclass
class ModelConfig:
    """The network: shared patch encoder, tiling geometry and classifier head.

    Attributes:
        backbone: timm model name of the shared patch encoder (the paper: ``resnet50``).
        pretrained: ImageNet weights for the encoder: ``true`` (timm's published weights,
            downloaded once into the Hugging Face cache, read from it offline), ``false``
            (random initialisation) or the path of a local ``.safetensors``/``.pth`` file.
        grid: Patches per side (3 = the paper's 3x3 grid).
        patch_size: Patch side in pixels (the paper: 153 px in 512 px images).
        gap: Minimum space in pixels between neighbouring patches (default: the tiler's).
        jitter: Largest random shift of a patch in pixels during training (default: the
            largest the cell allows).
        norm: Normalisation layers of the encoder (``batch``, ``group``, ``sync_batch``...).
        attention: Patch attention of the classifier: ``softmax`` (attention-based
            multiple-instance pooling, Ilse et al. 2018; the default), ``gated``, ``sigmoid``
            (the paper's gate) or ``none``.
        attention_temperature: Divides the attention scores before the sigmoid or softmax
            (1: the paper's gate; below 1, sharper weights).
        attention_entropy: Weight ``lambda >= 0`` of an entropy penalty on the attention
            weights during fine-tuning (the loss adds ``lambda`` times their mean normalised
            entropy, pushing the weight onto fewer patches; entropy minimisation, Grandvalet &
            Bengio 2005; the logged ``train_loss`` includes it). 0 (the default) turns it off.
        head: Classifier head: ``pooled`` (the attention-weighted sum of the patches'
            features, one set of weights for every grid position; the default) or ``concat``
            (the patches' features concatenated in grid order; the paper's). The paper's
            classifier is ``attention: sigmoid`` with ``head: concat``; on the synthetic
            benchmark, whose lesions lie anywhere in the grid, it stays near chance at 32 to
            128 labeled patients where the default finds the lesions (``docs/benchmarks.md``,
            "The classifier that finds the lesion").
        dropout: Dropout probability before the final layer (default 0.5; 0 turns it off).
        num_classes: Number of classes (2 for CIN2+ against CIN0/1).
        init: Pretraining checkpoint to start fine-tuning from; ``null`` trains from scratch.
        input_norm: How the classifier normalises each patch before the encoder: ``auto``
            (the pretraining checkpoint's when fine-tuning from ``init``, so the encoder keeps
            the input it was trained on; else ``encoder``), ``encoder`` (the backbone's mean
            and std) or ``per_patch`` (each patch standardised on its own).
        channels_last: Use the channels-last memory format on the GPU (no-op on the CPU).
    """

    backbone: str = "resnet50"
    pretrained: bool | str = False
    grid: int = 3
    patch_size: int = 153
    gap: int | None = None
    jitter: int | None = None
    norm: str = "batch"
    attention: str = "softmax"
    attention_temperature: float = 1.0
    attention_entropy: float = 0.0
    head: str = "pooled"
    dropout: float = 0.5
    num_classes: int = 2
    init: str | None = None
    input_norm: str = "auto"
    channels_last: bool = True


@dataclass
class PretextConfig:
    """The self-supervised task.

    Attributes:
        name: A registered pretext task (``patchssl pretexts`` lists them; the paper: jigsaw).
        options: Keyword arguments of the task, e.g. ``{num_permutations: 100}`` or
            ``{permutations: perms.pt}`` for jigsaw.
    """

    name: str = "jigsaw"
    options: dict = field(default_factory=dict)


#: The peak learning rate that ``train.lr: null`` (the default) stands for, per command. The
#: jigsaw's pretraining takes a higher rate than fine-tuning: at 1,000 permutations it left
#: chance on held-out photographs far more often at ``3e-3`` than at ``1e-3``, while
#: fine-tuning keeps the rate of every classifier figure in docs/benchmarks.md.
DEFAULT_LR: dict[str, float] = {"pretrain": 3e-3, "finetune": 1e-3}


def resolve_lr(config: Config, command: str) -> Config:
    """``config`` with ``train.lr`` set to the command's default when it is ``None``.

    :func:`patchssl.engine.pretrain` and :func:`patchssl.engine.finetune` call it, so that
    a run's ``config.yaml`` records the rate it trained at.

    Args:
        config: The configuration (not changed).
        command: ``"pretrain"`` or ``"finetune"`` (a key of :data:`DEFAULT_LR`).

    Returns:
        ``config`` itself when ``train.lr`` is set, else a copy with the default filled in.

    Raises:
        ValueError: For a command without a default learning rate.
    """
    if command not in DEFAULT_LR:
        raise ValueError(f"command must be one of {sorted(DEFAULT_LR)}; got {command!r}")
    if config.train.lr is not None:
        return config
    resolved = config.copy()
    resolved.train.lr = DEFAULT_LR[command]
    return resolved


@dataclass
class TrainConfig:
    """Optimisation, precision, schedule, early stopping and logging.

    Attributes:
        epochs: Number of epochs.
        batch_size: Images per step of each process; a run of ``torchrun --nproc_per_node
            N`` steps on ``N * batch_size`` images (see ``global_batch_size``).
        global_batch_size: Images per step over all processes. When set, it replaces
            ``batch_size``: each process takes ``global_batch_size / world_size`` images (it
            must divide), so the optimisation stays the same when the number of processes
            changes (e.g. on resume).
        lr: Peak learning rate; ``null`` (default) takes the command's own
            (:data:`DEFAULT_LR`): ``3e-3`` when pretraining, ``1e-3`` when fine-tuning. At
            ``3e-3`` ``patchssl pretrain`` placed 6.5% of held-out photographs' jigsaw puzzles
            (1,000 permutations) against 2.5% at ``1e-3`` (docs/benchmarks.md, "Jigsaw
            lift-off"). A resumed run keeps the rate its checkpoint trained at.
        min_lr: Learning rate at the end of the cosine schedule.
        optimizer: ``adamw`` or ``sgd``.
        weight_decay: Weight decay.
        momentum: SGD momentum.
        schedule: ``cosine`` (with linear warmup) or ``constant``.
        warmup_epochs: Linear warmup length in epochs (may be fractional).
        amp: Mixed precision on the GPU: ``auto`` (bf16 where supported, else fp16), ``bf16``,
            ``fp16`` or ``none``. A no-op on the CPU.
        compile: Compile the patch encoder with ``torch.compile``: ``false`` (default),
            ``true`` (mode ``default``) or a mode name (``reduce-overhead``,
            ``max-autotune``, ``max-autotune-no-cudagraphs``). The first steps are slow while
            it compiles (about a minute for a ResNet50 on a GPU, minutes on a CPU); then a
            paper-geometry pretraining step ran 1.37x faster on an H200 (docs/benchmarks.md).
        compile_scope: What ``compile`` compiles when pretraining: ``encoder`` (default: the
            shared patch encoder) or ``model`` (the whole pretext task's forward: tiling,
            defences, encoder, head and loss; random draws with a generator stay eager).
            Fine-tuning always compiles the encoder.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``...
        seed: Seed of every random choice; a seeded CPU run repeats exactly.
        class_weights: ``inverse`` (inverse class frequency in the loss) or ``none``.
        augment: Fine-tuning augmentation on the device: ``flip`` (random horizontal and
            vertical flips) or ``none``.
        patience: Early stopping after this many epochs without improvement (0 = off).
        monitor: Validation metric that selects ``best.pt`` and drives early stopping
            (``auto``: ``val_auc`` when fine-tuning, ``val_loss`` when pretraining).
        grad_clip: Clip the gradient norm to this value (``null`` = off).
        max_steps_per_epoch: Stop each epoch after this many steps (quick trials).
        progress: Show progress bars.
        tensorboard: ``auto`` (when installed), ``true`` or ``false``.
        async_checkpoint: Write each epoch's ``last.pt``/``best.pt`` in a background thread
            while the next epoch trains (the tensors are first copied to CPU memory, so the
            files hold the end of their epoch): ``auto`` (default: on a GPU or another
            accelerator, not on the CPU), ``true`` or ``false``. A failed write stops the run
            at the next epoch's end; the run ends only once its checkpoints are written.
        num_threads: CPU threads for torch (``null`` = torch's default).
        resume: Continue the run in ``out`` from its ``last.pt`` (or from the given file).
        overwrite: Start afresh in an ``out`` that already holds a run, removing its
            checkpoints and metrics (without it such a folder is refused).
        encoder_lr_scale: Fine-tuning only: the patch encoder learns at ``lr *
            encoder_lr_scale`` (the new layers at ``lr``), e.g. ``0.1`` to move transferred
            weights less than the new head; in (0, 1] (1 = one rate for all).
        encoder_layer_decay: Fine-tuning only: layer-wise learning-rate decay of the patch
            encoder, in (0, 1] (1 = off). The encoder's layers, from its last block down to
            its stem, learn at ``decay``, ``decay**2``, ... times its rate (``lr *
            encoder_lr_scale``), so that the early, generic layers of a transferred encoder
            move least (Bao et al., BEiT, ICLR 2022; e.g. 0.65 to 0.75). Layers are timm's
            blocks (the backbone's ``group_matcher``).
        freeze_encoder_epochs: Fine-tuning only: the patch encoder is frozen (no gradient)
            for this many first epochs while the new layers warm up, then trained (0 = off;
            single-process runs only).
    """

    epochs: int = 30
    batch_size: int = 32
    global_batch_size: int | None = None
    lr: float | None = None
    min_lr: float = 0.0
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    amp: str = "auto"
    compile: bool | str = False
    compile_scope: str = "encoder"
    device: str = "auto"
    seed: int = 0
    class_weights: str = "inverse"
    augment: str = "flip"
    patience: int = 10
    monitor: str = "auto"
    grad_clip: float | None = None
    max_steps_per_epoch: int | None = None
    progress: bool = True
    tensorboard: bool | str = "auto"
    async_checkpoint: bool | str = "auto"
    num_threads: int | None = None
    resume: bool | str = False
    overwrite: bool = False
    encoder_lr_scale: float = 1.0
    encoder_layer_decay: float = 1.0
    freeze_encoder_epochs: int = 0


@dataclass
class EvalConfig:
    """Evaluation of a fine-tuned classifier.

    Attributes:
        checkpoint: Classifier checkpoint (default: ``<out>/best.pt``).
        threshold: ``youden`` (chosen on the validation split), another criterion of
            :func:`patchssl.metrics.choose_threshold`, or a fixed number.
        target_specificity: Specificity at which the sensitivity is reported.
        n_boot: Bootstrap resamples (by patient) for the 95% confidence intervals.
        ci: Confidence level of the intervals.
    """

    checkpoint: str | None = None
    threshold: str | float = "youden"
    target_specificity: float = 0.9
    n_boot: int = 1000
    ci: float = 0.95


@dataclass
class ExplainConfig:
    """Attention overlays and embedding plots.

    Attributes:
        checkpoint: Classifier checkpoint (default: ``<out>/best.pt``).
        split: Which part of the split to explain (``test``, ``val``, ``train`` or ``all``).
        num_images: Attention overlays to draw (the highest-scoring images first).
        embedding: Also draw the t-SNE plot of the classifier features (the paper's Fig. 4a).
    """

    checkpoint: str | None = None
    split: str = "test"
    num_images: int = 16
    embedding: bool = True


@dataclass
class ProbeConfig:
    """Frozen-feature probes (``patchssl probe``, and the kNN probe during pretraining).

    Attributes:
        checkpoint: The encoder ``patchssl probe`` probes: a pretraining (or fine-tuning)
            checkpoint, or ``none`` for a randomly initialised encoder of the geometry in
            ``model``/``data`` (seeded by ``train.seed``): the baseline.
        manifest: Labeled manifest that ``patchssl pretrain`` probes every ``every`` epochs
            (columns and label map as in ``data``).
        every: With ``manifest``, run the kNN probe during pretraining every this many epochs
            and after the last (0 = off); its AUC is logged as ``probe_knn_auc``.
        test_size: Share of the labeled patients held out to test the probes.
        k: Neighbours of the kNN probe.
        temperature: Temperature of the kNN vote (weights ``exp(cosine similarity / T)``).
        input_norm: How patches are normalised before the frozen encoder: ``auto`` (what the
            checkpoint records; for ``none``, what the configured pretext task would use:
            per-patch for jigsaw), ``per_patch`` or ``encoder`` (its mean/std).
    """

    checkpoint: str | None = None
    manifest: str | None = None
    every: int = 1
    test_size: float = 0.3
    k: int = 20
    temperature: float = 0.07
    input_norm: str = "auto"


@dataclass
class DistConfig:
    """Multi-process training launched with ``torchrun`` (ignored in a single process).

    Attributes:
        backend: Process-group backend: ``auto`` (NCCL on GPUs, gloo on CPUs), ``nccl`` or
            ``gloo``.
        timeout_s: How long a collective operation (gradient averaging, metric reduction,
            barrier) waits for the other processes before failing, so that a process stuck or
            lost cannot hang the others forever.
        find_unused_parameters: Let DistributedDataParallel tolerate parameters that get no
            gradient in a step (slower; only for pretext tasks that skip parts of the model).
    """

    backend: str = "auto"
    timeout_s: float = 1800.0
    find_unused_parameters: bool = False


@dataclass
class DemoConfig:
    """The ``patchssl demo`` run on synthetic data.

    Attributes:
        fast: A much smaller run (about a minute) for tests and smoke checks.
    """

    fast: bool = False


@dataclass
class Config:
    """Everything a command needs. See the section classes for each field.

    Attributes:
        out: Output folder of the run (checkpoints, logs, reports).
        data: Data section.
        model: Model section.
        pretext: Pretext-task section.
        train: Training section.
        eval: Evaluation section.
        explain: Explanation section.
        demo: Demo section.
        dist: Multi-process (torchrun) section.
        probe: Frozen-feature probe section.
    """

    out: str = "runs/patchssl"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able nested dict of the configuration."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Config:
        """Build a configuration from a nested dict, strictly.

        Args:
            data: Nested mapping; missing keys keep their defaults.

        Returns:
            The configuration.

        Raises:
            ConfigError: On unknown keys, values of the wrong type, or values out of range
                (a learning rate that is not a positive finite number, ``workers`` below 0,
                ...; see :func:`check_ranges`).
        """
        config = _build(cls, data or {}, prefix="")
        check_ranges(config)
        return config

    def replace(self, **changes: Any) -> Config:
        """Return a deep copy with top-level fields replaced."""
        copy = self.copy()
        for key, value in changes.items():
            setattr(copy, key, value)
        return copy

    def copy(self) -> Config:
        """Return a deep copy (with the record of the options given, see :meth:`mark_given`)."""
        return Config.from_dict(self.to_dict()).mark_given(self.given)

    @property
    def given(self) -> frozenset[str]:
        """Dotted keys that the user set explicitly (see :meth:`mark_given`)."""
        return getattr(self, "_given", frozenset())

    def mark_given(self, keys: typing.Iterable[str]) -> Config:
        """Record ``keys`` (dotted, e.g. ``"data.image_size"``) as set by the user.

        The command line marks every option that a ``--config`` file, a flag or a ``--set``
        override sets. Settings that a run can take from a checkpoint or a resize cache
        (backbone, tiling, image size, channels, input normalisation) are taken from there
        unless given; see :meth:`is_given`.

        Args:
            keys: Dotted option keys.

        Returns:
            This configuration (for chaining).
        """
        self._given = self.given | frozenset(keys)
        return self

    def is_given(self, key: str) -> bool:
        """Whether the user chose the option ``key`` (dotted).

        True when ``key`` (or a section above it) was marked with :meth:`mark_given`, or when
        its value differs from the default (a configuration built in Python records no marks).

        Args:
            key: Dotted option key, e.g. ``"model.patch_size"``.

        Returns:
            Whether the option was given.
        """
        parts = key.split(".")
        if any(".".join(parts[: i + 1]) in self.given for i in range(len(parts))):
            return True
        return get_dotted(self, key) != get_dotted(Config(), key)


# (section, key) -> (lowest, highest, lowest included, highest included); None: no bound.
# A value that is None where the option allows it is not checked.
_RANGES: dict[tuple[str, str], tuple[float | None, float | None, bool, bool]] = {
    ("train", "lr"): (0.0, None, False, False),
    ("train", "min_lr"): (0.0, None, True, False),
    ("train", "weight_decay"): (0.0, None, True, False),
    ("train", "momentum"): (0.0, 1.0, True, False),
    ("train", "warmup_epochs"): (0.0, None, True, False),
    ("train", "epochs"): (1, None, True, False),
    ("train", "batch_size"): (1, None, True, False),
    ("train", "global_batch_size"): (1, None, True, False),
    ("train", "patience"): (0, None, True, False),
    ("train", "grad_clip"): (0.0, None, False, False),
    ("train", "max_steps_per_epoch"): (1, None, True, False),
    ("train", "num_threads"): (0, None, True, False),
    ("data", "workers"): (0, None, True, False),
    ("data", "image_size"): (1, None, True, False),
    ("data", "in_chans"): (1, None, True, False),
    ("data", "test_size"): (0.0, 1.0, False, False),
    ("data", "val_size"): (0.0, 1.0, True, False),
    ("data", "pretrain_val_size"): (0.0, 1.0, True, False),
    ("data", "max_images"): (1, None, True, False),
    ("data", "max_image_pixels"): (1, None, True, False),
    ("model", "grid"): (1, None, True, False),
    ("model", "patch_size"): (1, None, True, False),
    ("model", "gap"): (0, None, True, False),
    ("model", "jitter"): (0, None, True, False),
    ("model", "dropout"): (0.0, 1.0, True, False),
    ("model", "num_classes"): (2, None, True, False),
    ("eval", "target_specificity"): (0.0, 1.0, True, True),
    ("eval", "n_boot"): (0, None, True, False),
    ("eval", "ci"): (0.0, 1.0, False, False),
    ("explain", "num_images"): (0, None, True, False),
    ("dist", "timeout_s"): (0.0, None, False, False),
}


def check_ranges(config: Config) -> None:
    """Refuse numeric options that are not finite or lie outside their range.

    A NaN or infinite number is refused everywhere; bounds are checked for the options that
    have them (a positive learning rate, ``workers >= 0``, a dropout in ``[0, 1)``...).

    Args:
        config: The configuration to check.

    Raises:
        ConfigError: Naming the option, its value and the range it must lie in.
    """
    for (section, key), (low, high, low_in, high_in) in _RANGES.items():
        value = getattr(getattr(config, section), key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = f"{section}.{key}"
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number; got {value}")
        too_low = low is not None and (value < low if low_in else value <= low)
        too_high = high is not None and (value > high if high_in else value >= high)
        if too_low or too_high:
            left = "" if low is None else f"{'>=' if low_in else '>'} {low}"
            right = "" if high is None else f"{'<=' if high_in else '<'} {high}"
            raise ConfigError(
                f"{name} must be {' and '.join(p for p in (left, right) if p)}; got {value}"
            )


#: A number in exponent notation without a dot (``1e-3``, ``-2E5``), which YAML 1.1 reads as text.
_EXPONENT_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


#: How the messages of :func:`_check_value` name the types of options that allow several.
_TYPE_NAMES: dict[Any, str] = {
    float: "a number",
    int: "an integer",
    str: "a string",
    bool: "true or false",
    type(None): "null",
}


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently coerce) ``value`` against a resolved type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        names = " or ".join(_TYPE_NAMES.get(o, getattr(o, "__name__", str(o))) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the configuration"
        raise ConfigError(f"{where}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown option '{prefix}{key}'.{did_you_mean(str(key), fields)} "
            f"Options of '{prefix.rstrip('.') or 'the top level'}': {', '.join(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML or JSON configuration file and apply dotted overrides.

    Args:
        path: A ``.yaml``/``.yml``/``.json`` file, or ``None`` for the defaults.
        overrides: ``"section.key=value"`` strings applied in order (values parsed as YAML).

    Returns:
        The configuration; the keys of the file and the overrides are marked as given
        (:meth:`Config.mark_given`).

    Raises:
        ConfigError: When the file is missing, unreadable, or holds unknown keys or bad values.
    """
    data = read_config_file(path) if path is not None else {}
    config = Config.from_dict(data).mark_given(flatten_keys(data))
    return apply_overrides(config, overrides)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a nested dict (not yet validated).

    Args:
        path: The file.

    Returns:
        The nested dict.

    Raises:
        ConfigError: When the file is missing or cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (sections merge, values replace).

    Args:
        base: Nested dict.
        update: Nested dict whose values win.

    Returns:
        The merged dict.
    """
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "options":
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' must look like section.key=value (e.g. train.epochs=3)"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """Return a copy of ``config`` with dotted ``key=value`` overrides applied.

    Args:
        config: The configuration to start from (left unchanged).
        overrides: Strings such as ``"train.epochs=3"`` or ``"pretext.options.num_permutations=64"``
            (keys inside a mapping option may be new).

    Returns:
        A new configuration; the overridden keys are marked as given (:meth:`Config.mark_given`).

    Raises:
        ConfigError: On unknown keys or values of the wrong type.
    """
    data = config.to_dict()
    given = set(config.given)
    for text in overrides:
        keys, value = _parse_override(text)
        set_dotted(data, keys, value, text)
        given.add(".".join(keys))
    return Config.from_dict(data).mark_given(given)


def set_dotted(data: dict[str, Any], keys: list[str], value: Any, text: str = "") -> None:
    """Set ``data[k0][k1]...`` to ``value``, refusing unknown sections with a hint.

    Args:
        data: Nested dict (as from :meth:`Config.to_dict`).
        keys: The dotted path split into keys.
        value: New value.
        text: The original override, for error messages.
    """
    node = data
    for depth, key in enumerate(keys[:-1]):
        if key not in node:
            path = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"unknown option '{path}' in '{text}'.{did_you_mean(key, node)} "
                f"Options: {', '.join(node)}"
            )
        if not isinstance(node[key], dict):
            raise ConfigError(f"'{'.'.join(keys[: depth + 1])}' is not a section (in '{text}')")
        node = node[key]
    node[keys[-1]] = value


def get_dotted(config: Config, key: str) -> Any:
    """The value of the dotted option ``key`` (e.g. ``"data.image_size"``) of ``config``.

    Raises:
        ConfigError: For an unknown key.
    """
    node: Any = config
    for part in key.split("."):
        if dataclasses.is_dataclass(node) and hasattr(node, part):
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise ConfigError(f"unknown option '{key}'")
    return node


def flatten_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a nested config dict (``{"data": {"a": 1}}`` -> ``data.a``).

    Mappings inside an option whose value is a mapping (``pretext.options``) count as leaves.
    """
    keys: list[str] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "options" and value:
            keys.extend(flatten_keys(value, f"{dotted}."))
        else:
            keys.append(dotted)
    return keys


def save_config(config: Config, path: str | Path) -> Path:
    """Write the configuration as YAML (or JSON when ``path`` ends in ``.json``).

    Args:
        config: The configuration.
        path: Output file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False)
    return atomic_write(path, text)
