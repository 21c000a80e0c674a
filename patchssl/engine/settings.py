"""Settings that carry forward: from a checkpoint or a resize cache into the next command.

A run that starts from a checkpoint (``finetune --init``, ``evaluate``, ``explain``,
``predict``) or reads a resize cache (``data.cache``, written by ``patchssl prepare``) takes the
settings that give the weights or the cached images their meaning from there: the backbone,
the grid, the patch size, the gap, the image size, the channels and the input normalisation
(:data:`CARRIED`). An option the user gives (on the command line, in a config file, or a value
other than the default in a configuration built in Python; see
:meth:`patchssl.engine.config.Config.is_given`) must agree: every disagreement is listed in one
error, with the flag that set it.

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (a 3x3 grid of 153 px patches in 512 px images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from patchssl.classifier import checkpoint_input_norm
from patchssl.data import LabelMap, ManifestError
from patchssl.data.prepare import INDEX_NAME
from patchssl.engine.common import build_tiler, say
from patchssl.engine.config import Config, ConfigError, get_dotted, set_dotted
from patchssl.tiling import paper_image_size

__all__ = [
    "CARRIED",
    "MIN_VALIDATION_IMAGES",
    "cache_settings",
    "checkpoint_class_names",
    "checkpoint_settings",
    "fitting_patch_size",
    "label_info",
    "label_names",
    "resolve_settings",
]

#: Fewer validation images than this cannot choose a checkpoint reliably (a warning says so).
MIN_VALIDATION_IMAGES = 20

#: The options a checkpoint or a cache decides, and the flag that sets each one (``None``:
#: ``--set KEY=VALUE`` only).
CARRIED: dict[str, str | None] = {
    "model.backbone": "--backbone",
    "model.grid": "--grid",
    "model.patch_size": "--patch-size",
    "model.gap": None,
    "data.image_size": "--image-size",
    "data.in_chans": None,
    "model.input_norm": None,
}


def _side(value: Any, what: str, source: str) -> int | None:
    """An int from a stored ``int`` or square ``[h, w]``; ``None`` when absent."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and int(value[0]) == int(value[1]):
            return int(value[0])
        raise ConfigError(
            f"{source} has a non-square {what} {list(value)}, which the command line cannot "
            "express; use the Python API (patchssl.PatchClassifier.from_checkpoint)"
        )
    return int(value)


def checkpoint_settings(checkpoint: dict[str, Any], source: str = "the checkpoint") -> dict:
    """The :data:`CARRIED` options recorded in a pretraining or fine-tuning checkpoint.

    Args:
        checkpoint: A loaded checkpoint (:func:`patchssl.checkpoint.load_checkpoint`).
        source: How to name it in messages.

    Returns:
        ``{dotted key: value}`` for the options it records.
    """
    model_config = checkpoint.get("model_config") or {}
    classifier = model_config.get("classifier") or {}
    encoder = model_config.get("encoder") or classifier.get("encoder") or {}
    tiler = model_config.get("tiler") or classifier.get("tiler") or {}
    found: dict[str, Any] = {
        "model.backbone": encoder.get("backbone"),
        "data.in_chans": encoder.get("in_chans"),
        "model.grid": _side(tiler.get("grid"), "grid", source),
        "model.patch_size": _side(
            tiler.get("patch_size", encoder.get("patch_size")), "patch size", source
        ),
        "model.gap": _side(tiler.get("gap"), "gap", source),
        "data.image_size": _side(tiler.get("image_size"), "image size", source),
    }
    if checkpoint.get("kind") == "finetune":
        found["model.input_norm"] = classifier.get("input_norm")
    elif model_config:
        found["model.input_norm"] = checkpoint_input_norm(model_config)
    return {k: v for k, v in found.items() if v is not None}


def cache_settings(cache: str | Path) -> dict[str, Any]:
    """The image size and channels that ``patchssl prepare`` recorded in a resize cache.

    Reads the index (``patchssl_prepare.json``) of the cache's ``unlabeled`` and ``labeled``
    folders.

    Args:
        cache: The ``data.cache`` folder.

    Returns:
        ``{"data.image_size": S, "data.in_chans": C}`` (empty when nothing is recorded).

    Raises:
        ConfigError: When the two folders were prepared at different settings.
    """
    root = Path(cache)
    found: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for part in ("unlabeled", "labeled"):
        index = root / part / INDEX_NAME
        if not index.is_file():
            continue
        try:
            settings = json.loads(index.read_text(encoding="utf-8")).get("settings") or {}
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"data.cache: cannot read {index}: {err}") from err
        values = {
            "data.image_size": _side(settings.get("image_size"), "image size", str(index)),
            "data.in_chans": settings.get("channels"),
        }
        for key, value in values.items():
            if value is None:
                continue
            if key in found and found[key] != value:
                raise ConfigError(
                    f"data.cache: {origin[key]} and {index} were prepared with different "
                    f"{key} ({found[key]} and {value}); prepare both at one size"
                )
            found[key], origin[key] = value, index
    return found


def fitting_patch_size(image_size: int, grid: int = 3) -> int:
    """The largest patch side whose paper-proportion image fits in ``image_size``.

    The inverse of :func:`patchssl.tiling.paper_image_size`: 512 px gives 153 px patches (the
    paper's 3x3 grid), 128 px gives 38 px.

    Args:
        image_size: Image side in pixels.
        grid: Patches per side.

    Returns:
        The patch side in pixels (at least 1).
    """
    patch = max(1, image_size * 459 // (512 * grid) + 1)
    while patch > 1 and paper_image_size(patch, grid)[0] > image_size:
        patch -= 1
    return patch


def _describe(key: str) -> str:
    flag = CARRIED.get(key)
    return f"{key} ({flag})" if flag else key


def resolve_settings(
    config: Config,
    *,
    checkpoint: dict[str, Any] | None = None,
    source: str = "the checkpoint",
    cache: bool = True,
    fit_patches: bool = False,
    note: bool = True,
) -> Config:
    """Take the :data:`CARRIED` options from a checkpoint and the resize cache unless given.

    Every option is looked up in the user's choices (:meth:`Config.is_given`), the checkpoint
    and the cache (``data.cache``, when it holds a prepared index); when they disagree the
    run is refused with every difference listed. An option that only a source records is
    taken from it, and a one-line note says so.

    Args:
        config: The run configuration (left unchanged).
        checkpoint: A loaded checkpoint whose settings the run must keep, or ``None``.
        source: How to name the checkpoint (usually its path).
        cache: Also read the settings of ``data.cache``.
        fit_patches: When the patch size is neither given nor recorded and the default
            patches do not fit the image size, use :func:`fitting_patch_size` (a run that
            builds a new model: pretraining, fine-tuning from scratch).
        note: Print which settings were taken from where.

    Returns:
        A copy of ``config`` with the settings filled in.

    Raises:
        ConfigError: Listing every option on which the user, the checkpoint and the cache
            disagree.
    """
    config = config.copy()
    sources: list[tuple[str, dict[str, Any]]] = []
    if checkpoint is not None:
        sources.append((f"checkpoint {source}", checkpoint_settings(checkpoint, source)))
    if cache and config.data.cache and Path(config.data.cache).is_dir():
        sources.append((f"cache {config.data.cache}", cache_settings(config.data.cache)))
    problems: list[str] = []
    adopted: dict[str, list[str]] = {}
    data = config.to_dict()
    for key in CARRIED:
        values = [(name, found[key]) for name, found in sources if key in found]
        mine = get_dotted(config, key)
        if config.is_given(key) and mine not in (None, "auto"):  # None, auto: "the default"
            values.insert(0, ("given", mine))
        if not values:
            continue
        if len({json.dumps(v) for _, v in values}) > 1:
            problems.append(
                f"{_describe(key)}: "
                + ", ".join(
                    f"given {value!r}" if name == "given" else f"{name} has {value!r}"
                    for name, value in values
                )
            )
            continue
        name, value = values[0]
        if name != "given" and mine != value:
            set_dotted(data, key.split("."), value, key)
            adopted.setdefault(name, []).append(f"{key}={value}")
    if problems:
        listing = "\n  - ".join(problems)
        raise ConfigError(
            f"these options disagree with what the run starts from:\n  - {listing}\n"
            "Leave an option out to take it from the checkpoint or the cache (they record "
            "what the weights and the images were made with), or start from a checkpoint or "
            "a cache made with the value you want."
        )
    resolved = Config.from_dict(data).mark_given(config.given)
    for name, keys in adopted.items() if note else ():
        say(f"from the {name}: {', '.join(keys)}")
    recorded = any("model.patch_size" in found for _, found in sources)
    if fit_patches and not recorded and not resolved.is_given("model.patch_size"):
        _fit_patches(resolved)
    return resolved


def _fit_patches(config: Config) -> None:
    """Shrink the default patch size to the image size when the default does not fit."""
    try:
        build_tiler(config)
        return
    except ConfigError:
        pass
    size, grid = config.data.image_size, config.model.grid
    patch = fitting_patch_size(size, grid)
    config.model.patch_size = patch
    say(
        f"patch size {patch} px: the default does not fit {size} px images "
        f"({grid}x{grid} grid in the paper's proportions; --patch-size to choose)"
    )


def label_names(label_map: Any) -> list[str]:
    """The name of each class of a :class:`patchssl.data.LabelMap`, in index order.

    A map whose classes have no names of their own (``"benign:0,malignant:1"``: names ``"0"``,
    ``"1"``) names each class by its raw labels (``benign``, ``malignant``; ``A/B`` when two
    map to one class).

    Args:
        label_map: The label map.

    Returns:
        One name per class.
    """
    names = [str(n) for n in label_map.class_names]
    if names != [str(k) for k in range(len(names))]:
        return names
    raw: dict[int, list[str]] = {}
    for label, k in label_map.mapping.items():
        raw.setdefault(int(k), []).append(str(label))
    return ["/".join(raw.get(k, [str(k)])) for k in range(len(names))]


def label_info(config: Config) -> dict[str, Any] | None:
    """What the classes of a run are, for its checkpoints (``model_config["labels"]``).

    Args:
        config: The run configuration (``data.label_map``).

    Returns:
        ``{"class_names": [...], "label_map": {...}}``, or ``None`` when the map cannot be
        read (the manifest reader reports that).
    """
    try:
        label_map = LabelMap.from_config(config.data.label_map)
    except (ManifestError, OSError):
        return None
    return {"class_names": label_names(label_map), "label_map": label_map.config}


def checkpoint_class_names(checkpoint: dict[str, Any], num_classes: int) -> list[str]:
    """The class names of a fine-tuned checkpoint: recorded, or from its run's label map.

    Args:
        checkpoint: A loaded fine-tuning checkpoint.
        num_classes: Number of classes of its classifier.

    Returns:
        ``num_classes`` names (``"class k"`` where none is known).
    """
    labels = (checkpoint.get("model_config") or {}).get("labels") or {}
    names = labels.get("class_names")
    if not names:
        saved = (checkpoint.get("config") or {}).get("data") or {}
        if "label_map" in saved:
            info = label_info(Config.from_dict({"data": {"label_map": saved["label_map"]}}))
            names = info["class_names"] if info else None
    if not names or len(names) != num_classes:
        return [f"class {k}" for k in range(num_classes)]
    return [str(n) for n in names]
