"""The pretext registry: one name per task, built-ins and plugins found and built the same way.

Built-in tasks register themselves with :func:`register_pretext` when
:mod:`patchssl.pretext` is imported. Third-party packages declare theirs in the
``patchssl.pretexts`` entry-point group of their ``pyproject.toml``::

    [project.entry-points."patchssl.pretexts"]
    flipped_tile = "patchssl_flipped_tile:FlippedTilePretext"

Entry points are read lazily (by :func:`list_pretexts`, and when a name is not registered)
and a plugin is imported only when it is asked for by name, so a broken plugin never breaks
``import patchssl``: :func:`list_pretexts` still lists its name, and asking for it raises a
:class:`PretextPluginError` naming the distribution and the original exception.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

from patchssl._validation import did_you_mean
from patchssl.pretext.base import PretextTask

if TYPE_CHECKING:
    from torch import nn

    from patchssl.tiling import PatchTiler

__all__ = [
    "ENTRY_POINT_GROUP",
    "PretextPluginError",
    "UnknownPretextError",
    "create_pretext",
    "get_pretext_class",
    "list_pretexts",
    "pretext_from_config",
    "register_pretext",
]

#: The entry-point group third-party packages use to ship pretext tasks.
ENTRY_POINT_GROUP = "patchssl.pretexts"

_REGISTRY: dict[str, type[PretextTask]] = {}

T = TypeVar("T", bound=type[PretextTask])


class UnknownPretextError(KeyError):
    """No pretext task has this name (neither registered nor declared by an entry point)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class PretextPluginError(ImportError):
    """A pretext plugin declared through the entry point could not be loaded."""


def register_pretext(name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Class decorator that registers a :class:`PretextTask` subclass under ``name``.

    Example::

        @register_pretext("my_task")
        class MyTask(PretextTask): ...

    Args:
        name: Registry name: lowercase letters, digits and underscores, starting with a letter
            (it appears in configs, checkpoints and on the command line).
        overwrite: Replace a task already registered under ``name`` (otherwise an error).

    Returns:
        The decorator; it sets ``cls.name = name`` and returns the class unchanged.

    Raises:
        ValueError: ``name`` is malformed, or taken and ``overwrite`` is False.
        TypeError: The decorated object is not a PretextTask subclass.
    """
    if not isinstance(name, str) or not name.isidentifier() or not name[0].isalpha():
        raise ValueError(
            f"pretext name must be an identifier-like string (letters, digits, underscores, "
            f"starting with a letter), e.g. 'my_task'; got {name!r}"
        )
    if name != name.lower():
        raise ValueError(f"pretext names are lowercase; use {name.lower()!r} instead of {name!r}")

    def decorator(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, PretextTask)):
            raise TypeError(
                f"@register_pretext({name!r}) decorates PretextTask subclasses; got {cls!r} "
                "(subclass patchssl.pretext.PretextTask)"
            )
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and not overwrite:
            raise ValueError(
                f"pretext {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; choose another name or pass "
                "register_pretext(name, overwrite=True)"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _entry_points() -> dict[str, metadata.EntryPoint]:
    """Entry points of the ``patchssl.pretexts`` group, by name (first one found wins)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _distribution_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    try:
        name = dist.metadata["Name"] or dist.name
    except Exception:  # a malformed METADATA file must not hide the real error
        name = getattr(dist, "name", None) or "?"
    version = getattr(dist, "version", None)
    return f"distribution '{name}'" + (f" {version}" if version else "")


def _load_entry_point(name: str, ep: metadata.EntryPoint) -> type[PretextTask]:
    where = (
        f"{_distribution_label(ep)} (entry point {name} = {ep.value!r} in group "
        f"{ENTRY_POINT_GROUP!r})"
    )
    try:
        obj = ep.load()
    except Exception as err:
        raise PretextPluginError(
            f"pretext {name!r} is provided by {where}, which failed to load: "
            f"{type(err).__name__}: {err}. Reinstall or fix that package, or uninstall it."
        ) from err
    if not (isinstance(obj, type) and issubclass(obj, PretextTask)):
        raise PretextPluginError(
            f"pretext {name!r} from {where} points to {obj!r}, which is not a PretextTask "
            "subclass; the entry point must name the task class"
        )
    # A plugin module usually registers its class with @register_pretext on import; an
    # undecorated class is registered here under the entry point's name.
    if name not in _REGISTRY:
        _REGISTRY[name] = obj
        if not obj.name:
            obj.name = name
    return _REGISTRY[name]


def list_pretexts() -> list[str]:
    """Names of every pretext task: registered ones and those declared by entry points.

    Plugins are not imported (a broken plugin is listed; it fails only when asked for).

    Returns:
        Sorted list of names.
    """
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_pretext_class(name: str) -> type[PretextTask]:
    """The task class registered (or declared by an entry point) under ``name``.

    Args:
        name: Registry name, e.g. ``"jigsaw"``.

    Returns:
        The :class:`PretextTask` subclass.

    Raises:
        UnknownPretextError: (a KeyError) no such name; the message suggests close names.
        PretextPluginError: (an ImportError) the plugin providing ``name`` failed to load.
    """
    cls = _REGISTRY.get(name)
    if cls is not None:
        return cls
    eps = _entry_points()
    if name in eps:
        return _load_entry_point(name, eps[name])
    available = sorted(set(_REGISTRY) | set(eps))
    hint = did_you_mean(name, available, n=3)
    raise UnknownPretextError(
        f"unknown pretext {name!r}.{hint} Available: {', '.join(repr(a) for a in available)}"
    )


def create_pretext(
    name: str,
    *,
    encoder: nn.Module,
    tiler: PatchTiler | None = None,
    **kwargs: Any,
) -> PretextTask:
    """Build the pretext task registered under ``name``.

    Example::

        encoder = SharedPatchEncoder("resnet50", patch_size=153)
        task = create_pretext("jigsaw", encoder=encoder)   # 512 px images, 3x3 tiles
        loss, logits, targets = task(images)                # images (B, 3, 512, 512) uint8

    Args:
        name: Registry name (see :func:`list_pretexts`).
        encoder: The shared patch encoder, ``(B, N, C, h, w) -> (B, N, D)``.
        tiler: The patch tiler; None lets the task build its default from the encoder's
            patch size.
        **kwargs: The task's own keyword arguments.

    Returns:
        The task (an ``nn.Module``).

    Raises:
        UnknownPretextError: No such name (a KeyError with suggestions).
        PretextPluginError: The plugin providing ``name`` failed to load.
    """
    cls = get_pretext_class(name)
    return cls(encoder, tiler=tiler, **kwargs)


def _build_from_config(cls_path: str, config: dict[str, Any]) -> Any:
    module_name, _, attr = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), attr)
    from_config = getattr(cls, "from_config", None)
    return from_config(config) if callable(from_config) else cls(**config)


def pretext_from_config(
    model_config: dict[str, Any],
    *,
    encoder: nn.Module | None = None,
    tiler: PatchTiler | None = None,
) -> PretextTask:
    """Rebuild a task from :attr:`PretextTask.model_config` (a checkpoint's ``model_config``).

    Args:
        model_config: ``{"pretext": name, "pretext_kwargs": {...}, "encoder": {...} | None,
            "tiler": {...}}``.
        encoder: Use this encoder instead of building one from ``model_config["encoder"]``
            (required when the encoder wraps a custom ``nn.Module``, whose config is None).
        tiler: Use this tiler instead of building one from ``model_config["tiler"]``.

    Returns:
        The task, with freshly initialised weights (load the state dict next). Flat patch
        defence options (``per_patch_norm``, ``color_drop``, ...), as older checkpoints hold
        them, are folded into the task's ``defences`` by
        :meth:`PretextTask.fold_defence_options`.

    Raises:
        ValueError: A required part of the config is missing.
    """
    for key in ("pretext", "pretext_kwargs"):
        if key not in model_config:
            raise ValueError(f"model_config has no {key!r} entry; got keys {sorted(model_config)}")
    if encoder is None:
        enc_config = model_config.get("encoder")
        if not enc_config:
            raise ValueError(
                "model_config has no encoder config (the encoder wraps a custom nn.Module); "
                "pass encoder=SharedPatchEncoder(your_backbone, ...)"
            )
        encoder = _build_from_config("patchssl.encoder.SharedPatchEncoder", dict(enc_config))
    if tiler is None and model_config.get("tiler"):
        tiler = _build_from_config("patchssl.tiling.PatchTiler", dict(model_config["tiler"]))
    kwargs = dict(model_config["pretext_kwargs"])
    cls = get_pretext_class(model_config["pretext"])
    fold = getattr(cls, "fold_defence_options", None)
    if fold is not None:  # older checkpoints hold the patch defences as flat options
        kwargs = fold(kwargs)
    return create_pretext(model_config["pretext"], encoder=encoder, tiler=tiler, **kwargs)
