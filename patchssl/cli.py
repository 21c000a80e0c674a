"""The ``patchssl`` command line.

Commands: ``prepare``, ``pretrain``, ``probe``, ``finetune``, ``evaluate``, ``explain``,
``predict``, ``demo``, ``pretexts`` (list the registered pretext tasks) and ``permutations``
(describe or generate a permutation set). Every training command reads a YAML/JSON config
(``--config``), then the common flags (``--epochs``, ``--lr``...), then ``--set
section.key=value`` overrides, in that order. Exit status: 0 on success; 1 when training stops
on a non-finite loss or non-finite weights; 2 on a usage, configuration or data error, a run
folder that is taken, or an operating-system error such as a folder that cannot be written or
a full disk (a one-line message, no traceback; ``--debug`` shows it); 130 when interrupted;
141 when the reader of the output went away (``| head``).

``pretrain`` and ``finetune`` also run under ``torchrun`` (one process per GPU, e.g.
``torchrun --standalone --nproc_per_node 8 -m patchssl pretrain --config run.yaml``; see
``docs/distributed.md``); the other commands run in a single process.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Both are light: the engine package's names load on first use, and its config module needs
# only dataclasses and yaml, so --help and argument errors stay free of torch.
from patchssl import engine
from patchssl._version import __version__
from patchssl.engine.config import (
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    merge_dicts,
    read_config_file,
    set_dotted,
)

__all__ = ["build_parser", "main"]

EPILOG = (
    "Options are applied in this order: defaults < --config file < flags < --set overrides. "
    "See docs/cli.md for every option and example runs."
)


# the config key an option's help names, e.g. "(train.epochs)" or "(config: out)"
_HELP_KEY = re.compile(r"\((?:config: )?(out|[a-z_]+(?:\.[a-z_]+)+)\)")


@functools.cache
def _config_defaults() -> dict[str, Any]:
    """Every config key's default, by its dotted path (``{"train.epochs": 30, ...}``)."""
    flat: dict[str, Any] = {}

    def walk(data: dict[str, Any], prefix: str) -> None:
        for key, value in data.items():
            if isinstance(value, dict) and value and prefix + key != "pretext.options":
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(Config().to_dict(), "")
    return flat


class _Formatter(argparse.HelpFormatter):
    """Show each option's default: its own, or that of the config key it sets.

    Most options default to ``None``, "take the value from the config": their help names the
    config key, and the key's default is shown beside it (``(train.epochs; default: 30)``).
    Switches (``False``), ``--set`` (``[]``) and keys without a default show none.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        default = action.default
        if "default" in help_ or not action.option_strings or default is argparse.SUPPRESS:
            return help_
        if default is None:
            match = _HELP_KEY.search(help_)
            value = _config_defaults().get(match.group(1)) if match else None
            if value is None or value == "" or value == {}:
                return help_
            shown = str(value).replace("%", "%%")
            return help_.replace(match.group(0), f"({match.group(1)}; default: {shown})")
        if default is False or default == []:
            return help_
        return f"{help_} (default: %(default)s)"


class UsageError(Exception):
    """A command-line mistake (exit status 2)."""


# commands that may run under torchrun (several processes); the others refuse it
DISTRIBUTED_COMMANDS = ("pretrain", "finetune")


def _launched_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` set by torchrun, ``(0, 1)`` without it."""
    try:
        return int(os.environ.get("RANK", 0) or 0), int(os.environ.get("WORLD_SIZE", 1) or 1)
    except ValueError:
        return 0, 1


def _done(message: str) -> None:
    """Print the closing line of a command (on rank 0 only under torchrun)."""
    if _launched_rank()[0] == 0:
        print(message)


# ------------------------------------------------------------------------------------ options
_PRETRAINED_WORDS = {"true": True, "false": False}

# Every option that more than one command takes, defined once: flag -> add_argument keywords
# ("aliases": its short forms). A command may reword the help where the option means something
# narrower there (`prepare --workers` resizes images, it loads no batches).
_OPTIONS: dict[str, dict[str, Any]] = {
    "--config": {
        "aliases": ("-c",),
        "metavar": "FILE",
        "help": "YAML or JSON config file (sections data, model, pretext, train, eval, "
        "explain, dist, probe)",
    },
    "--set": {
        "dest": "overrides",
        "action": "append",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "override any config option by its dotted path, e.g. --set train.epochs=3 "
        "--set pretext.options.num_permutations=100 (repeatable; values parsed as YAML)",
    },
    "--out": {
        "aliases": ("-o",),
        "metavar": "DIR",
        "help": "output folder of the run (config: out)",
    },
    "--debug": {"action": "store_true", "help": "show full tracebacks on errors"},
    "--data": {"metavar": "CSV", "help": "labeled manifest (default: the run's)"},
    "--manifest": {"metavar": "CSV", "help": "labeled manifest (data.manifest)"},
    "--checkpoint": {
        "metavar": "FILE",
        "help": "classifier checkpoint (default <out>/best.pt)",
    },
    # devices and loading
    "--device": {"help": "auto, cpu, cuda or cuda:N (train.device)"},
    "--workers": {"type": int, "help": "data-loader worker processes (data.workers)"},
    "--batch-size": {"type": int, "help": "images per step (train.batch_size)"},
    "--amp": {
        "choices": ["auto", "bf16", "fp16", "none"],
        "help": "mixed precision on the GPU (train.amp); ignored on the CPU",
    },
    "--threads": {"type": int, "help": "CPU threads for torch (train.num_threads)"},
    "--no-progress": {
        "action": "store_true",
        "help": "hide progress bars (train.progress=false)",
    },
    # tiling geometry and encoder
    "--backbone": {"help": "timm model name of the patch encoder (model.backbone)"},
    "--pretrained": {
        "type": lambda value: _PRETRAINED_WORDS.get(value.lower(), value),
        "metavar": "true|false|FILE",
        "help": "ImageNet weights of the encoder: true (timm's, downloaded once into the "
        "Hugging Face cache), false, or a local .safetensors/.pth file (model.pretrained)",
    },
    "--image-size": {"type": int, "help": "working image size in px (data.image_size)"},
    "--patch-size": {"type": int, "help": "patch side in px (model.patch_size)"},
    "--grid": {"type": int, "help": "patches per side, 3 = 3x3 (model.grid)"},
    # training
    "--epochs": {"type": int, "help": "number of epochs (train.epochs)"},
    "--lr": {
        "type": float,
        "help": "peak learning rate (train.lr; default 3e-3 pretraining, 1e-3 fine-tuning)",
    },
    "--seed": {"type": int, "help": "seed of every random choice (train.seed)"},
    "--resume": {
        "nargs": "?",
        "const": True,
        "default": None,
        "metavar": "CHECKPOINT",
        "help": "continue the run in --out from its last.pt (or from CHECKPOINT); without "
        "--config, the run's saved config.yaml is used",
    },
    "--overwrite": {
        "action": "store_true",
        "help": "start afresh in an --out that already holds a run, removing its checkpoints "
        "and metrics (train.overwrite); without it such a folder is refused",
    },
    "--patience": {
        "type": int,
        "help": "early stopping patience in epochs, 0 = off (train.patience)",
    },
    # labels
    "--label-map": {
        "help": "raw label -> class: 'cervix' (CIN0/1 -> 0, CIN2+ -> 1), 'binary', "
        "'A:0,B:1' or a YAML/JSON file (data.label_map)",
    },
    "--split": {
        "metavar": "FILE",
        "help": "reuse a saved split.json instead of drawing one (data.split)",
    },
    # manifest columns
    "--image-column": {
        "metavar": "NAME",
        "help": "manifest column of image paths (data.path_column)",
    },
    "--label-column": {
        "metavar": "NAME",
        "help": "manifest column of raw labels (data.label_column)",
    },
    "--patient-column": {
        "metavar": "NAME",
        "help": "manifest column of patient ids, '' for none (data.patient_column)",
    },
    "--visit-column": {
        "metavar": "NAME",
        "help": "manifest column of visit ids, '' for none (data.visit_column)",
    },
}

# the groups of options that commands take together
_RUN_OPTIONS = ("--config", "--set", "--out", "--debug")  # every config-driven command
_DEVICE_OPTIONS = ("--device", "--workers", "--batch-size", "--amp", "--threads", "--no-progress")
_GEOMETRY_OPTIONS = ("--backbone", "--pretrained", "--image-size", "--patch-size", "--grid")
_TRAINING_OPTIONS = ("--epochs", "--lr", "--seed", "--resume", "--overwrite", "--patience")
_COLUMN_OPTIONS = ("--image-column", "--label-column", "--patient-column", "--visit-column")
_LABEL_OPTIONS = ("--label-map", "--split", *_COLUMN_OPTIONS)
_CLASSIFIER_OPTIONS = ("--checkpoint", "--data")  # what evaluate and explain read


def _add_option(p: argparse.ArgumentParser, flag: str, **changes: Any) -> None:
    """Add the shared option ``flag`` to ``p``.

    Args:
        p: A command's parser.
        flag: A key of ``_OPTIONS``.
        changes: ``add_argument`` keywords that this command sets its own way (``help``,
            ``metavar``, ``default``).
    """
    spec = {**_OPTIONS[flag], **changes}
    aliases = spec.pop("aliases", ())
    p.add_argument(flag, *aliases, **spec)


def _add_options(p: argparse.ArgumentParser, *flags: str) -> None:
    """Add the shared options ``flags`` to ``p``, in order, as ``_OPTIONS`` defines them."""
    for flag in flags:
        _add_option(p, flag)


# ---------------------------------------------------------------------------------- commands
def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every command.

    Returns:
        The ``patchssl`` parser with its sub-commands.
    """
    parser = argparse.ArgumentParser(
        prog="patchssl",
        description="Self-supervised learning on image patches (jigsaw puzzles and friends) "
        "with attentive transfer to a classifier, for medical images with few labels.",
        epilog="Start with `patchssl demo` (under 5 minutes on a laptop CPU). "
        "`patchssl COMMAND --help` explains each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"patchssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(
        name: str, help_: str, description: str, epilog: str = EPILOG
    ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_, description=description, epilog=epilog, formatter_class=_Formatter
        )

    p = command(
        "prepare",
        "resize images into a cache, check the manifest, draw the split",
        "Resize a folder of large originals once into <out>/cache (in parallel, resumable, "
        "reporting unreadable files), check a labeled manifest (unknown labels are refused), "
        "draw the patient-grouped split (<out>/split.json) and report labeled evaluation "
        "images that are also in the unlabeled folder.",
    )
    _add_options(p, *_RUN_OPTIONS)
    _add_option(p, "--data", metavar="PATH", help="unlabeled image folder, or a manifest .csv")
    _add_options(p, "--manifest", "--image-size")
    _add_option(p, "--workers", help="parallel resize workers (data.workers)")
    _add_option(p, "--seed", help="seed of the split (train.seed)")
    _add_option(p, "--no-progress", help="hide progress bars")
    _add_options(p, *_LABEL_OPTIONS, "--overwrite")

    p = command(
        "pretrain",
        "self-supervised pretraining on unlabeled images",
        "Pretrain a pretext task (default: the jigsaw puzzle) on a folder of unlabeled images. "
        "Writes config.yaml, metrics.csv, last.pt (every epoch) and best.pt (lowest validation "
        "pretext loss) in --out.",
    )
    _add_options(p, *_RUN_OPTIONS)
    _add_option(p, "--data", metavar="DIR", help="folder of unlabeled images (data.unlabeled)")
    _add_option(
        p,
        "--manifest",
        help="labeled manifest, to detect evaluation images inside the unlabeled folder",
    )
    _add_options(p, *_COLUMN_OPTIONS)
    p.add_argument("--pretext", help="pretext task name, see `patchssl pretexts` (pretext.name)")
    p.add_argument(
        "--permutations",
        metavar="FILE",
        help="jigsaw permutation file (pretext.options.permutations)",
    )
    p.add_argument(
        "--exclude-overlap",
        action="store_true",
        help="leave labeled evaluation images out of pretraining (data.exclude_overlap)",
    )
    p.add_argument(
        "--probe-data",
        metavar="CSV",
        help="labeled manifest: run the kNN probe on it during pretraining and log "
        "probe_knn_auc (probe.manifest)",
    )
    p.add_argument(
        "--probe-every",
        type=int,
        metavar="N",
        help="with --probe-data, probe every N epochs and after the last; 0 = off "
        "(probe.every, default 1)",
    )
    _add_option(p, "--label-map", help=_OPTIONS["--label-map"]["help"] + "; for --manifest")
    _add_option(
        p,
        "--split",
        help="a saved split.json: its val and test images are the ones checked against the "
        "unlabeled folder (data.split)",
    )
    _add_options(p, *_GEOMETRY_OPTIONS, *_TRAINING_OPTIONS, *_DEVICE_OPTIONS)

    p = command(
        "probe",
        "frozen-feature probes: did pretraining help?",
        "Embed the labeled images with a frozen encoder (a pretraining checkpoint, or 'none' "
        "for a randomly initialised encoder of the given geometry: the baseline) and fit a "
        "linear (logistic regression) and a kNN probe on mean-pooled, max-pooled and concatenated "
        "patch features, on a patient-grouped split. Reports AUC and accuracy with bootstrap "
        "intervals that resample patients, and how well a patch's grid position can be read "
        "from its features. Writes probe.json and probe.md in --out.",
    )
    _add_options(p, *_RUN_OPTIONS)
    _add_option(
        p,
        "--checkpoint",
        help="pretraining checkpoint whose encoder is probed, or 'none' for a randomly "
        "initialised encoder of the --backbone/--image-size/--patch-size/--grid geometry "
        "(probe.checkpoint)",
    )
    _add_option(p, "--data", help="labeled manifest, or a folder with labeled.csv (data.manifest)")
    p.add_argument(
        "--test-size",
        type=float,
        help="share of the images (by patient) held out to test the probes (probe.test_size)",
    )
    p.add_argument("--n-boot", type=int, help="bootstrap resamples (eval.n_boot)")
    _add_option(p, "--label-map")
    _add_option(
        p,
        "--split",
        help="a saved split.json: its train and val parts fit the probes, its test part tests "
        "them (data.split; default: a new split of --test-size)",
    )
    _add_options(p, *_GEOMETRY_OPTIONS)
    _add_option(p, "--seed", help="seed of the split and of the random encoder (train.seed)")
    _add_options(p, "--device", "--workers", "--batch-size", "--threads", "--no-progress")

    p = command(
        "finetune",
        "fine-tune the patch-attention classifier on labeled images",
        "Fine-tune a patch classifier from a pretraining checkpoint (--init) or from scratch. "
        "The labeled images are split by patient (train/val/test, saved as split.json); the "
        "val part selects best.pt and drives early stopping; the test part is left for "
        "`patchssl evaluate`.",
    )
    _add_options(p, *_RUN_OPTIONS)
    _add_option(p, "--data", help="labeled manifest, or a folder with labeled.csv")
    p.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="pretraining checkpoint to start from (model.init); omit to train from scratch",
    )
    p.add_argument(
        "--attention",
        choices=["sigmoid", "softmax", "gated", "none"],
        help="patch attention (model.attention; default softmax, the paper: sigmoid)",
    )
    _add_options(p, *_LABEL_OPTIONS, *_GEOMETRY_OPTIONS, *_TRAINING_OPTIONS, *_DEVICE_OPTIONS)

    p = command(
        "evaluate",
        "evaluate a fine-tuned classifier on the test split",
        "Choose the decision threshold on the validation split, then report accuracy, "
        "specificity, sensitivity, precision, AUC, F1, sensitivity at a target specificity and "
        "the confusion matrix on the test split, with bootstrap confidence intervals that "
        "resample patients. Writes eval.json, eval.md and predictions_*.csv.",
    )
    _add_options(p, *_RUN_OPTIONS, *_CLASSIFIER_OPTIONS)
    p.add_argument(
        "--threshold",
        help="'youden', 'f1', 'specificity' (chosen on the val split) or a fixed number",
    )
    p.add_argument("--n-boot", type=int, help="bootstrap resamples (eval.n_boot)")
    p.add_argument("--specificity", type=float, help="target specificity (eval.target_specificity)")
    _add_options(p, *_LABEL_OPTIONS, *_DEVICE_OPTIONS)

    p = command(
        "explain",
        "attention overlays and the t-SNE embedding plot",
        "Draw each patch's attention weight onto the images (patches above the mean weight "
        "outlined; the paper's Fig. 4b), a t-SNE map of the classifier features (Fig. 4a), and "
        "score lesion localisation when the manifest records lesion boxes.",
    )
    _add_options(p, *_RUN_OPTIONS, *_CLASSIFIER_OPTIONS)
    p.add_argument("--part", choices=["train", "val", "test", "all"], help="split part to explain")
    p.add_argument("--num-images", type=int, help="attention overlays to draw")
    _add_options(p, *_LABEL_OPTIONS, *_DEVICE_OPTIONS)

    p = command(
        "predict",
        "predict the class of new images with a fine-tuned checkpoint",
        "Predict the class of every image of a folder (or listed in a CSV) with a fine-tuned "
        "checkpoint, whose geometry and class names it takes. Writes a CSV with one row per "
        "image: its path, the probability of each class (columns named for the classes), the "
        "predicted class at the threshold chosen on the validation split and stored in the "
        "checkpoint (the one `patchssl evaluate` reports), and, for an image that cannot be "
        "read, the reason (also printed).",
        "See docs/own_dataset.md for the whole path from a folder of images to predictions.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="FILE", help="fine-tuned checkpoint (best.pt)"
    )
    p.add_argument(
        "--data", required=True, metavar="PATH", help="folder of images, or a CSV listing them"
    )
    _add_option(
        p, "--out", default="predictions.csv", metavar="CSV", help="predictions file to write"
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="decision threshold on the positive class's probability (default: the one "
        "stored in the checkpoint)",
    )
    p.add_argument(
        "--explain", metavar="DIR", help="also draw each image's attention overlay into DIR"
    )
    p.add_argument(
        "--image-column",
        metavar="NAME",
        help="CSV column of the image paths (default: the fine-tuning manifest's, else 'image')",
    )
    _add_option(p, "--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    _add_option(p, "--batch-size", default=16, help="images per forward pass")
    _add_option(p, "--workers", default=0, help="image-decoding worker processes")
    _add_options(p, "--threads", "--no-progress", "--debug")

    p = command(
        "demo",
        "synthetic end-to-end run: SSL + attention against a baseline",
        "Generate a seeded synthetic cervix-like dataset, pretrain the jigsaw task on its "
        "unlabeled part, fine-tune the attention classifier from the pretrained encoder and "
        "from scratch, evaluate both on held-out patients, and write report.md/report.json "
        "with metrics, confidence intervals, attention overlays, the embedding plot and the "
        "lesion-localisation score.",
        "Options are applied in this order, as in the other commands: the demo's settings "
        "(--fast picks the small ones) < --config file < the flags given on the command line "
        "(--out, --seed, --threads, --device, --no-progress) < --set overrides. "
        "See docs/demo.md.",
    )
    _add_option(p, "--out", help="output folder (default: patchssl-demo)")
    p.add_argument("--fast", action="store_true", help="a much smaller run (about a minute)")
    _add_option(p, "--seed", help="seed of the data and the training (default: 0)")
    _add_option(p, "--threads", help="CPU threads (default: all cores)")
    _add_option(p, "--device", help="auto, cpu or cuda (default: auto)")
    _add_option(p, "--no-progress", help="hide progress bars")
    _add_option(
        p, "--config", help="YAML/JSON file whose options replace the demo's (e.g. model.backbone)"
    )
    _add_option(
        p,
        "--set",
        help="override a demo option by its dotted path, e.g. --set model.backbone=resnet18",
    )
    _add_options(p, "--debug")

    p = command(
        "pretexts",
        "list the registered pretext tasks",
        "List the pretext tasks that `pretrain --pretext NAME` accepts (built-in and plugins "
        "from the 'patchssl.pretexts' entry-point group).",
        "docs/pretext_tasks.md explains how to write one and ship it as a plugin.",
    )
    _add_options(p, "--debug")

    p = command(
        "permutations",
        "describe or generate a jigsaw permutation set",
        "Describe a permutation set (size, fingerprint, Hamming distances) or generate one "
        "with the maximal-Hamming criterion and save it.",
        "Use a generated set with `patchssl pretrain --permutations FILE`. See "
        "docs/permutations.md for the methods.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["describe", "generate"],
        help="describe a set, or generate one",
    )
    p.add_argument(
        "path",
        nargs="?",
        help="describe: a permutation file (default: the shipped 1000x9 set); generate: the "
        "output file (.npy, .pt or .txt)",
    )
    p.add_argument("--num", type=int, default=1000, help="generate: number of permutations")
    p.add_argument("--tiles", type=int, default=9, help="generate: tiles per puzzle (3x3 = 9)")
    p.add_argument(
        "--method",
        default="auto",
        help="generate: auto, max_min or projective",
    )
    _add_option(p, "--seed", default=0, help="generate: seed")
    # for maintainers: regenerate patchssl/assets/permutations_1000x9.* (not in --help)
    p.add_argument("--write-default-asset", action="store_true", help=argparse.SUPPRESS)
    _add_options(p, "--debug")
    return parser


# ----------------------------------------------------------------------------- config assembly
_FLAG_KEYS: dict[str, str] = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "device": "train.device",
    "seed": "train.seed",
    "amp": "train.amp",
    "threads": "train.num_threads",
    "patience": "train.patience",
    "workers": "data.workers",
    "image_size": "data.image_size",
    "manifest": "data.manifest",
    "label_map": "data.label_map",
    "split": "data.split",
    "image_column": "data.path_column",
    "label_column": "data.label_column",
    "patient_column": "data.patient_column",
    "visit_column": "data.visit_column",
    "backbone": "model.backbone",
    "pretrained": "model.pretrained",
    "patch_size": "model.patch_size",
    "grid": "model.grid",
    "init": "model.init",
    "attention": "model.attention",
    "pretext": "pretext.name",
    "n_boot": "eval.n_boot",
    "specificity": "eval.target_specificity",
    "num_images": "explain.num_images",
    "part": "explain.split",
    "test_size": "probe.test_size",
    "probe_data": "probe.manifest",
    "probe_every": "probe.every",
}


def _config_from_args(args: argparse.Namespace) -> Any:
    """Defaults < --config < flags < --set."""
    config_file = args.config
    out = getattr(args, "out", None)
    if config_file is None and getattr(args, "resume", None) and out:
        saved = Path(out) / "config.yaml"
        if saved.is_file():
            config_file = saved
    config = load_config(config_file)
    data = config.to_dict()
    given = set(config.given)

    def put(key: str, value: Any) -> None:
        set_dotted(data, key.split("."), value, key)
        given.add(key)

    if out:
        put("out", out)
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            put(key, value)
    if getattr(args, "data", None):
        path = Path(args.data)
        if args.command == "pretrain":
            put("data.unlabeled", args.data)
        elif args.command == "prepare":
            put("data.manifest" if path.suffix.lower() == ".csv" else "data.unlabeled", args.data)
        else:
            put("data.manifest", args.data)
    if getattr(args, "permutations", None):
        options = dict(data["pretext"]["options"])
        options["permutations"] = args.permutations
        put("pretext.options", options)
    if getattr(args, "exclude_overlap", False):
        put("data.exclude_overlap", True)
    if getattr(args, "no_progress", False):
        put("train.progress", False)
    if getattr(args, "resume", None) is not None:
        put("train.resume", args.resume)
    if getattr(args, "overwrite", False):
        put("train.overwrite", True)
    if getattr(args, "checkpoint", None):
        where = {"evaluate": "eval", "probe": "probe"}.get(args.command, "explain")
        put(f"{where}.checkpoint", args.checkpoint)
    threshold = getattr(args, "threshold", None)
    if threshold is not None:
        try:
            put("eval.threshold", float(threshold))
        except ValueError:
            put("eval.threshold", threshold)
    try:
        config = Config.from_dict(data).mark_given(given)
    except ConfigError as err:
        raise ConfigError(f"{err} (from the command-line flags)") from err
    return apply_overrides(config, args.overrides)


# ------------------------------------------------------------------------------------ handlers
def _training_outputs(result: Any) -> str:
    return f"{result.out_dir} (best: {result.best_checkpoint})"


# The commands that run the engine function of the same name on the assembled config, and where
# each one's result says its outputs went.
_ENGINE_OUTPUTS: dict[str, Callable[[Any], Any]] = {
    "prepare": lambda result: result.out_dir,
    "pretrain": _training_outputs,
    "finetune": _training_outputs,
    "evaluate": lambda result: result.json_path.parent,
    "explain": lambda result: result.out_dir,
}


def _cmd_engine(args: argparse.Namespace) -> None:
    result = getattr(engine, args.command)(_config_from_args(args))
    _done(f"outputs written to {_ENGINE_OUTPUTS[args.command](result)}")


def _cmd_probe(args: argparse.Namespace) -> None:
    from patchssl.engine.probing import GEOMETRY_KEYS  # deferred: loads torch (--help stays light)

    # geometry flags given with a checkpoint must agree with it (they are checked, not applied)
    expect = {key: getattr(args, key) for key in GEOMETRY_KEYS if getattr(args, key) is not None}
    result = engine.probe(_config_from_args(args), expect=expect)
    _done(f"outputs written to {result.out_dir}")


def _cmd_predict(args: argparse.Namespace) -> None:
    import torch  # deferred: loads torch (--help stays light)

    from patchssl.engine.prediction import predict_images

    if args.threads:
        torch.set_num_threads(args.threads)
    result = predict_images(
        args.checkpoint,
        args.data,
        threshold=args.threshold,
        device=args.device or "auto",
        batch_size=args.batch_size,
        workers=args.workers,
        image_column=args.image_column,
        explain=args.explain,
        progress=not args.no_progress,
    )
    path = result.write_csv(args.out)
    for image, reason in result.failed:
        print(f"patchssl predict: cannot read {image}: {reason}", file=sys.stderr)
    good = len(result.rows) - len(result.failed)
    threshold = "" if result.threshold is None else f" at threshold {result.threshold:.4g}"
    print(f"threshold: {result.threshold_source}")
    if result.overlays:
        print(f"{len(result.overlays)} attention overlays written to {args.explain}")
    if not good:
        raise UsageError(f"none of the {len(result.rows)} images could be read (reasons in {path})")
    failed = f", {len(result.failed)} unreadable (listed in it)" if result.failed else ""
    print(f"{good} images predicted{threshold}{failed}; outputs written to {path}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from patchssl.engine.demo import demo_config  # deferred: loads torch (--help stays light)

    config = demo_config(
        out=args.out or "patchssl-demo",
        fast=args.fast,
        seed=0 if args.seed is None else args.seed,
        threads=args.threads,
        device=args.device or "auto",
        progress=not args.no_progress,
    )
    if args.config:
        config = Config.from_dict(merge_dicts(config.to_dict(), read_config_file(args.config)))
        # flags given on the command line win over the file, as in every other command
        if args.out is not None:
            config.out = args.out
        if args.seed is not None:
            config.train.seed = args.seed
        if args.threads is not None:
            config.train.num_threads = args.threads
        if args.device is not None:
            config.train.device = args.device
        if args.no_progress:
            config.train.progress = False
    if args.overrides:
        config = apply_overrides(config, args.overrides)
    result = engine.run_demo(config)
    print(f"outputs written to {result.out_dir} (report: {result.report_md})")


def _cmd_pretexts(args: argparse.Namespace) -> None:
    # deferred: loads torch (--help stays light)
    from patchssl.pretext import get_pretext_class, list_pretexts

    for name in list_pretexts():
        try:
            cls = get_pretext_class(name)
            doc = (cls.__doc__ or "").strip().splitlines()
            summary = doc[0] if doc else ""
        except Exception as err:  # a broken plugin must not hide the others
            summary = f"(cannot load: {err})"
        print(f"{name:20s} {summary}")


def _stat(value: Any) -> str:
    """A statistic for printing; ``n/a`` where it does not exist (no pairs in a set of one)."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _cmd_permutations(args: argparse.Namespace) -> None:
    from patchssl.permutations import PermutationSet, _write_default_asset  # deferred: torch

    if args.write_default_asset:
        print(_write_default_asset())
        return
    if args.action is None:
        raise UsageError("permutations needs an action: describe or generate")
    try:
        if args.action == "describe":
            if args.path:
                perms = PermutationSet.load(args.path)
                where = str(args.path)
            else:
                perms = PermutationSet.default()
                where = "the shipped default set"
            print(f"permutation set: {where}")
            for key, value in perms.describe().items():
                print(f"  {key}: {_stat(value)}")
            return
        if not args.path:
            raise UsageError("permutations generate needs an output file, e.g. perms.npy")
        perms = PermutationSet.generate(args.num, args.tiles, method=args.method, seed=args.seed)
    except ValueError as err:  # a malformed file, or --num/--tiles/--method out of range
        raise UsageError(str(err)) from err
    Path(args.path).parent.mkdir(parents=True, exist_ok=True)
    perms.save(args.path)
    stats = perms.describe()
    plural = "s" if perms.num_permutations > 1 else ""
    print(
        f"generated {perms.num_permutations} permutation{plural} of {perms.num_tiles} tiles "
        f"(min Hamming {_stat(stats['min_hamming'])}, mean {_stat(stats['mean_hamming'])}, "
        f"fingerprint {perms.fingerprint}); written to {args.path}"
    )


_HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    **dict.fromkeys(_ENGINE_OUTPUTS, _cmd_engine),
    "probe": _cmd_probe,
    "predict": _cmd_predict,
    "demo": _cmd_demo,
    "pretexts": _cmd_pretexts,
    "permutations": _cmd_permutations,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your input" (exit 2, no traceback)."""
    from patchssl.checkpoint import CheckpointError  # deferred: loads torch (--help stays light)
    from patchssl.data import ManifestError

    errors: list[type[BaseException]] = [
        UsageError,
        ConfigError,
        CheckpointError,
        ManifestError,
        FileNotFoundError,
        ImportError,
    ]
    try:
        from patchssl.pretext import UnknownPretextError

        errors.append(UnknownPretextError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``patchssl`` command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success; 1 training stopped on a non-finite loss or weights; 2
        usage, configuration or data error, a taken run folder, or an operating-system error
        (permissions, full disk); 130 interrupted; 141 closed output pipe.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    debug = bool(getattr(args, "debug", False))
    # Imported only now, after parsing, and inside the handlers: these defer torch, so that
    # --help and argument errors answer at once.
    from patchssl.engine.loop import NonFiniteLossError

    user_errors = _user_errors()
    rank, world = _launched_rank()
    name = f"patchssl {args.command}" + (f" (rank {rank})" if world > 1 else "")
    if world > 1 and args.command not in DISTRIBUTED_COMMANDS:
        print(
            f"{name}: error: '{args.command}' runs in one process; start it with "
            f"`python -m patchssl {args.command} ...` (torchrun is for "
            f"{' and '.join(DISTRIBUTED_COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    try:
        _HANDLERS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
    except user_errors as err:
        if debug:
            traceback.print_exc()
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        if debug:
            traceback.print_exc()
        print(f"{name}: stopped: {err}", file=sys.stderr)
        return 1

    except KeyboardInterrupt:
        print(
            f"{name}: interrupted; continue with --resume (the last "
            "completed epoch's checkpoint is kept)",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        # the reader went away (`patchssl pretexts | head -1`): stop quietly, like other tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as err:  # a folder that cannot be written, a full disk...
        if err.errno is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {_os_error_message(err)}", file=sys.stderr)
        return 2
    return 0


def _os_error_message(err: OSError) -> str:
    """One line for an operating-system error: what failed, where, and what to do."""
    reason = err.strerror or os.strerror(err.errno or 0)
    where = f": {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = (
            "free some space or choose another --out; checkpoints are written atomically, so "
            "those already there are whole (continue with --resume)"
        )
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a folder you can write with --out, or change its permissions"
    else:
        hint = "check the file or folder named here"
    return f"{reason}{where}; {hint}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
