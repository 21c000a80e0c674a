"""The pretext contract test, reusable by third-party packages.

patchssl runs :func:`check_pretext_contract` over every registered task; a plugin package
can run the same checks on its own task in its test suite::

    from patchssl.pretext.testing import check_pretext_contract
    from my_package import MyTask

    def test_my_task_honours_the_contract():
        check_pretext_contract(MyTask)             # uses MyTask.example_kwargs()

The task is built around a tiny encoder (:func:`tiny_encoder`: a two-layer CNN on 16 px patches)
with the task's :meth:`~patchssl.pretext.PretextTask.example_kwargs` and its default tiler.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from patchssl.encoder import SharedPatchEncoder
from patchssl.pretext.base import PretextOutput, PretextTask
from patchssl.pretext.registry import get_pretext_class, pretext_from_config
from patchssl.tiling import PatchTiler

__all__ = ["check_pretext_contract", "tiny_encoder"]


def tiny_encoder(
    patch_size: int = 16, in_chans: int = 3, *, backbone: str | None = None
) -> nn.Module:
    """A small, fast encoder for contract tests.

    By default a two-layer CNN (3x3 convolutions with stride 2, batch norm, ReLU; 16
    features, about 1,500 parameters) wrapped in :class:`patchssl.encoder.SharedPatchEncoder`;
    it has no ``config`` (custom module), so tasks are rebuilt around a fresh one. Pass a timm
    name (e.g. ``backbone="test_resnet"``, 32 px patches at least) for an encoder that
    rebuilds from its config.

    Args:
        patch_size: Patch side in px.
        in_chans: Channels.
        backbone: A timm model name instead of the small CNN.

    Returns:
        A :class:`patchssl.encoder.SharedPatchEncoder`.
    """
    if backbone is not None:
        return SharedPatchEncoder(backbone, patch_size=patch_size, in_chans=in_chans)
    cnn = nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
    )
    return SharedPatchEncoder(cnn, patch_size=patch_size, in_chans=in_chans)


def _fail(task_cls: type, message: str) -> AssertionError:
    return AssertionError(f"{task_cls.__name__} breaks the pretext contract: {message}")


def _run(task: PretextTask, images: torch.Tensor, seed: int) -> PretextOutput:
    return task(images, generator=torch.Generator().manual_seed(seed))


def check_pretext_contract(
    task_cls: type[PretextTask] | str,
    *,
    encoder_factory: Callable[[], nn.Module] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
    **kwargs: Any,
) -> dict[str, Any]:
    """Build a task with small settings and check everything the contract promises.

    Checks, in order:

    1. it is a :class:`PretextTask` with an integer ``num_classes >= 2``;
    2. in training mode, ``task(images, generator=...)`` returns a :class:`PretextOutput`
       with a finite scalar loss that requires grad, finite logits of shape
       ``(*targets.shape, num_classes)``, long targets in ``[0, num_classes)``; backward
       gives finite gradients that reach the encoder and every other trainable parameter;
    3. the images are validated (a wrongly sized batch raises ``ValueError``);
    4. in eval mode, the same generator seed gives the same targets and logits, and float
       images in ``[0, 1]`` give the same result as uint8 ones;
    5. ``config`` and ``model_config`` are JSON-able; a task rebuilt from them (encoder from
       its config when it has one, else the same encoder factory), loaded with the state
       dict (strict, all weights under ``encoder.*`` for the encoder), gives the same
       outputs; ``permutation_fingerprint`` is None or a string.

    Args:
        task_cls: The task class, or its registry name.
        encoder_factory: Builds a fresh encoder; default :func:`tiny_encoder`.
        device: Where to run.
        batch_size: Images per batch (at least 2, for batch normalisation).
        **kwargs: Task keyword arguments; they update ``task_cls.example_kwargs()``.

    Returns:
        A small report: ``{"name", "num_classes", "loss", "num_parameters"}``.

    Raises:
        AssertionError: With a message naming the broken promise.
    """
    if isinstance(task_cls, str):
        task_cls = get_pretext_class(task_cls)
    if not (isinstance(task_cls, type) and issubclass(task_cls, PretextTask)):
        raise TypeError(f"task_cls must be a PretextTask subclass or a name; got {task_cls!r}")
    device = torch.device(device)
    factory = encoder_factory or tiny_encoder
    task_kwargs = {**task_cls.example_kwargs(), **kwargs}

    torch.manual_seed(0)
    task = task_cls(factory(), **task_kwargs).to(device)

    # 1. identity
    if not isinstance(task.num_classes, int) or task.num_classes < 2:
        raise _fail(task_cls, f"num_classes must be an int >= 2; got {task.num_classes!r}")
    if not isinstance(task.encoder, nn.Module):
        raise _fail(task_cls, "the encoder must be stored as the 'encoder' attribute")

    # 2. training step
    in_chans = int(task.encoder.in_chans)
    h, w = task.tiler.image_size
    images = torch.randint(
        0, 256, (batch_size, in_chans, h, w), generator=torch.Generator().manual_seed(0)
    ).to(device=device, dtype=torch.uint8)
    task.train()
    out = _run(task, images, seed=1)
    if not isinstance(out, PretextOutput):
        raise _fail(task_cls, f"forward must return a PretextOutput; got {type(out).__name__}")
    loss, logits, targets = out
    if loss.ndim != 0 or not torch.isfinite(loss):
        raise _fail(task_cls, f"the loss must be a finite scalar; got {loss}")
    if not loss.requires_grad:
        raise _fail(task_cls, "the loss does not require grad in training mode")
    if targets.dtype != torch.long or targets.shape[0] != batch_size:
        raise _fail(task_cls, f"targets must be long (B, ...); got {targets.dtype} {targets.shape}")
    if int(targets.min()) < 0 or int(targets.max()) >= task.num_classes:
        raise _fail(task_cls, f"targets out of [0, {task.num_classes}): {targets.tolist()}")
    if tuple(logits.shape) != (*targets.shape, task.num_classes):
        raise _fail(task_cls, f"logits shape {tuple(logits.shape)} for targets {targets.shape}")
    if not torch.isfinite(logits).all():
        raise _fail(task_cls, "the logits are not finite")
    loss.backward()
    missing, nonfinite = [], []
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            missing.append(name)
        elif not torch.isfinite(param.grad).all():
            nonfinite.append(name)
    if nonfinite:
        raise _fail(task_cls, f"non-finite gradients in {nonfinite[:5]}")
    encoder_grads = [
        p.grad for p in task.encoder.parameters() if p.requires_grad and p.grad is not None
    ]
    if not encoder_grads or all(float(g.abs().sum()) == 0.0 for g in encoder_grads):
        raise _fail(task_cls, "no gradient reaches the encoder")
    head_missing = [n for n in missing if not n.startswith("encoder.")]
    if head_missing:
        raise _fail(task_cls, f"trainable parameters get no gradient: {head_missing[:5]}")
    task.zero_grad(set_to_none=True)

    # 3. validation is not bypassed
    try:
        task(images[..., : h - 1, :], generator=torch.Generator().manual_seed(0))
    except ValueError:
        pass
    else:
        raise _fail(task_cls, "forward accepted images of the wrong size (keep the base forward)")

    # 4. determinism and input scaling in eval mode
    task.eval()
    with torch.no_grad():
        first = _run(task, images, seed=2)
        second = _run(task, images, seed=2)
        as_float = _run(task, images.float() / 255.0, seed=2)
    if not torch.equal(first.targets, second.targets):
        raise _fail(task_cls, "the same generator seed gave different targets")
    if not torch.allclose(first.logits, second.logits, atol=1e-5, rtol=1e-4):
        raise _fail(task_cls, "the same generator seed gave different logits in eval mode")
    if not torch.equal(first.targets, as_float.targets) or not torch.allclose(
        first.logits, as_float.logits, atol=1e-4, rtol=1e-3
    ):
        raise _fail(task_cls, "float images in [0, 1] and uint8 images disagree")

    # 5. config and state dict round trip
    try:
        config = json.loads(json.dumps(task.config))
        model_config = json.loads(json.dumps(task.model_config))
    except (TypeError, ValueError) as err:
        raise _fail(task_cls, f"config is not JSON-able: {err}") from err
    fingerprint = task.permutation_fingerprint
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise _fail(task_cls, f"permutation_fingerprint must be None or str; got {fingerprint!r}")
    state = task.state_dict()
    if not any(key.startswith("encoder.") for key in state):
        raise _fail(task_cls, "the state dict has no 'encoder.*' keys")
    torch.manual_seed(123)  # a different initialisation, so that loading must matter
    if task.name and model_config.get("encoder"):
        rebuilt = pretext_from_config(model_config)
        if type(rebuilt) is not task_cls:
            raise _fail(task_cls, f"its name {task.name!r} resolves to {type(rebuilt).__name__}")
    else:
        rebuilt = task_cls(factory(), tiler=PatchTiler(**model_config["tiler"]), **config)
    rebuilt = rebuilt.to(device)
    if rebuilt.config != config:
        raise _fail(task_cls, f"config changed on rebuild: {config} -> {rebuilt.config}")
    try:
        rebuilt.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _fail(task_cls, f"the state dict does not load into a rebuilt task: {err}") from err
    rebuilt.eval()
    with torch.no_grad():
        again = _run(rebuilt, images, seed=2)
    if not torch.equal(first.targets, again.targets) or not torch.allclose(
        first.logits, again.logits, atol=1e-5, rtol=1e-4
    ):
        raise _fail(task_cls, "a task rebuilt from its config and state dict gives other outputs")
    if rebuilt.permutation_fingerprint != fingerprint:
        raise _fail(task_cls, "permutation_fingerprint changed on rebuild")

    return {
        "name": task.name,
        "num_classes": task.num_classes,
        "loss": float(loss.detach()),
        "num_parameters": sum(p.numel() for p in task.parameters()),
    }
