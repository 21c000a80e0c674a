"""A weight-sharing patch encoder over any timm backbone (or any ``nn.Module``).

Every patch of every image goes through the same backbone: patches ``(B, N, C, h, w)`` are folded
into one batch ``(B * N, C, h, w)``, encoded in a single call, pooled to one vector each and
unfolded to ``(B, N, D)``. This is the shared ("siamese") encoder of the context-free network of
Noroozi & Favaro (2016) and of the attentive transfer model of Chae et al. (2021).

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." Journal of Information Processing Systems 17(3), 2021.

    Noroozi, Favaro. "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles." ECCV 2016, arXiv:1603.09246.

    Wu, He. "Group Normalization." ECCV 2018, arXiv:1803.08494.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from patchssl._validation import as_pair, check_int, did_you_mean, look_up

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMS", "SharedPatchEncoder"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Normalisation layers the encoder can use (see :class:`SharedPatchEncoder`).
NORMS: tuple[str, ...] = ("batch", "group", "sync_batch", "frozen_batch")

_LOCAL_FILE_HELP = (
    "Without internet access, download the weights once on a machine that has it (for example "
    "the 'model.safetensors' file of the model's page on the Hugging Face hub, or any "
    "timm/torchvision .pth state dict) and pass the local file: "
    "SharedPatchEncoder({name!r}, pretrained='/path/to/weights.safetensors') "
    "(or a .pth/.pt/.bin file; on the command line --pretrained FILE)."
)


def _channel_stats(
    values: Sequence[float] | float | None,
    default: Sequence[float],
    in_chans: int,
    what: str,
) -> tuple[float, ...]:
    """Resolve a per-channel mean or std to exactly ``in_chans`` values."""
    if values is None:
        default = tuple(float(v) for v in default)
        if len(default) == in_chans:
            return default
        # A pretrained statistic for RGB does not fit other channel counts: use its average.
        avg = sum(default) / len(default)
        return (avg,) * in_chans
    if isinstance(values, (int, float)):
        values = (float(values),)
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * in_chans
    if len(values) != in_chans:
        raise ValueError(
            f"{what} has {len(values)} values but the encoder takes in_chans={in_chans} channels; "
            f"give one value per channel (or a single value for all)"
        )
    if what == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive; got {values}")
    return values


def _to_group_norm(module: nn.Module, max_groups: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` (timm's ``BatchNormAct2d`` included) with GroupNorm."""
    if isinstance(module, nn.BatchNorm2d):
        channels = module.num_features
        groups = math.gcd(channels, max_groups)
        if hasattr(module, "act") or hasattr(module, "drop"):
            from timm.layers import GroupNormAct  # deferred: timm is slow to import

            new: nn.Module = GroupNormAct(
                channels, groups, eps=module.eps, affine=module.affine, apply_act=False
            )
            new.act = getattr(module, "act", nn.Identity())
            new.drop = getattr(module, "drop", nn.Identity())
        else:
            new = nn.GroupNorm(groups, channels, eps=module.eps, affine=module.affine)
        if module.affine:
            # Keep the learned scale and shift (for example from pretrained weights).
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        new = new.to(device=module.weight.device if module.affine else None)
        return new
    for name, child in module.named_children():
        converted = _to_group_norm(child, max_groups)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class SharedPatchEncoder(nn.Module):
    """One backbone applied with shared weights to every patch: ``(B, N, C, h, w) -> (B, N, D)``.

    The backbone is a timm model name (built with ``timm.create_model(name, pretrained=...,
    num_classes=0, in_chans=in_chans, ...)``) or any ``nn.Module``. Patches are folded into the
    batch, encoded once and pooled, so that batch normalisation sees the ``B * N`` patches of
    the same images together, as in the paper's ResNet.

    Pooling and width ``D = out_dim``:

    * timm backbones: ``forward_head(forward_features(x), pre_logits=True)``, so ``out_dim`` is
      ``head_hidden_size`` when the model has one (MobileNetV3's 1x1 ``conv_head`` makes it
      differ from ``num_features``), else ``num_features``.
    * VGG: timm's VGG puts a 4096-wide 7x7 convolution (``ConvMlp``, about 100 M parameters)
      before its classifier, designed for 224 px inputs. It is removed; the encoder global
      average pools ``forward_features`` instead, so ``out_dim = num_features = 512`` and 32 px
      patches suffice (the paper's VGG16 at 153 px works).
    * Any other ``nn.Module``: its output ``(M, D)`` is used as is and ``(M, D, h', w')`` is
      global average pooled; ``out_dim`` is found by a dry run at ``patch_size`` unless given.

    Every backbone is checked at construction with a dry run on one patch, so a backbone that
    cannot work at ``patch_size`` fails there with the reason (its total stride, or the token
    size of a vision transformer). Vision transformers get ``img_size=patch_size`` (or use
    ``dynamic_img_size=True`` if passed in ``timm_kwargs``).

    Input scaling: uint8 patches are divided by 255, float patches are taken to be in [0, 1];
    both are then normalised with ``(x - mean) / std`` unless ``forward(..., normalized=True)``.

    Normalisation layers (``norm``):

    * ``"batch"`` (default, the paper's): BatchNorm over the ``B * N`` patches of the batch.
    * ``"group"``: every ``BatchNorm2d`` becomes ``GroupNorm`` with ``gcd(C, norm_groups)``
      groups (32 groups, Wu & He 2018, whenever ``C`` is a multiple of 32); learned scale and
      shift are kept. For small batches, where batch statistics are noisy.
    * ``"sync_batch"``: ``SyncBatchNorm`` (statistics over all GPUs of a DDP run).
    * ``"frozen_batch"``: BatchNorm with fixed statistics and affine (timm's
      ``FrozenBatchNorm2d``), for fine-tuning pretrained weights with tiny batches.

    Freezing (``freeze``): ``"all"`` freezes every backbone parameter; an int ``k`` leaves the
    last ``k`` stages trainable and freezes the stem and the earlier stages. Stages are timm's
    coarse parameter groups (``group_matcher(coarse=True)``): ResNet ``layer1..4``, ConvNeXt
    ``stages.0..3``, EfficientNet/MobileNet ``blocks.i``, ViT one group per transformer block;
    layers after the last stage (final norm, MobileNetV3's ``conv_head``) stay trainable with an
    int. BatchNorm layers whose parameters are frozen also keep their running statistics
    (they stay in eval mode when the encoder is put in training mode).

    Args:
        backbone: a timm model name (``"resnet50"``, ``"vgg16"``, ``"vit_small_patch16_224"``,
            ...) or an ``nn.Module`` mapping ``(M, C, h, w)`` to ``(M, D)`` or
            ``(M, D, h', w')``.
        pretrained: ``False`` (random initialisation), ``True`` (the timm model's published
            weights, as ``timm.create_model(name, pretrained=True)``: downloaded once from the
            Hugging Face hub, then read from its cache, also offline with
            ``HF_HUB_OFFLINE=1``) or the path of a local weights file (``.safetensors``,
            ``.pth``, ``.pt``, ``.bin``, read with ``weights_only=True``). Either way timm
            applies its per-model conversions (for example ViT position embeddings resized to
            ``patch_size`` and the first convolution adapted to ``in_chans``). The classifier
            weights are dropped; any other missing or unexpected key of a file is an error.
        in_chans: channels of the patches (1 for grayscale).
        patch_size: patch height and width in pixels, an int or ``(h, w)``.
        norm: one of ``"batch"``, ``"group"``, ``"sync_batch"``, ``"frozen_batch"``.
        norm_groups: the most groups a ``norm="group"`` layer gets.
        channels_last: run the backbone in ``torch.channels_last`` memory format.
        grad_checkpointing: trade compute for memory with timm's ``set_grad_checkpointing``
            (an error if the backbone does not support it).
        freeze: ``None``, ``"all"`` or the number of last stages left trainable.
        mean: per-channel mean (one value or ``in_chans`` values); default the timm model's
            ``pretrained_cfg`` mean (ImageNet for custom modules), averaged over RGB when
            ``in_chans != 3``.
        std: per-channel standard deviation, resolved like ``mean``.
        drop_path_rate: stochastic depth rate passed to timm (only when > 0).
        out_dim: the feature width of a custom ``nn.Module`` (skips the inference); must not
            be given for timm names.
        **timm_kwargs: further keyword arguments for ``timm.create_model`` (JSON-able values
            keep the encoder rebuildable from its ``config``).

    Shape:
        - Input: ``(B, N, C, h, w)`` uint8 (0..255) or float (0..1).
        - Output: ``(B, N, D)`` with ``D = out_dim``.

    Raises:
        ValueError: unknown timm name, a weights file of another architecture, a patch size
            the backbone cannot encode, an unknown ``norm``, an invalid ``freeze``,
            unsupported grad checkpointing, a non-positive ``in_chans``, ``norm_groups`` or
            ``patch_size``.
        TypeError: ``in_chans`` or ``norm_groups`` not an int, ``patch_size`` not an int or
            a pair of ints.
        FileNotFoundError: ``pretrained`` names a file that does not exist.
        RuntimeError: ``pretrained=True`` and the weights can be neither downloaded nor found
            in the Hugging Face cache (the message names the cache and the local-file way).

    References:
        Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
        Dysplasia Diagnosis", JIPS 2021 (weight-sharing ResNet50 / VGG16 over 153 px patches).
        Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
        Puzzles", ECCV 2016. Wu & He, "Group Normalization", ECCV 2018.

    Example:
        >>> enc = SharedPatchEncoder("resnet18", patch_size=64)
        >>> enc(torch.zeros(2, 9, 3, 64, 64, dtype=torch.uint8)).shape
        torch.Size([2, 9, 512])
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        *,
        pretrained: bool | str | Path = False,
        in_chans: int = 3,
        patch_size: int | Sequence[int] = 153,
        norm: str = "batch",
        norm_groups: int = 32,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        freeze: str | int | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        drop_path_rate: float = 0.0,
        out_dim: int | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        in_chans = check_int(in_chans, "in_chans")
        look_up(norm, NORMS, "norm")
        norm_groups = check_int(norm_groups, "norm_groups")
        if drop_path_rate < 0 or drop_path_rate >= 1:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        self.patch_size: tuple[int, int] = as_pair(patch_size, "patch_size")
        self.in_chans = in_chans
        self.norm = norm
        self.norm_groups = norm_groups
        self.channels_last = bool(channels_last)
        self.grad_checkpointing = bool(grad_checkpointing)
        self.drop_path_rate = float(drop_path_rate)
        self._timm_kwargs = dict(timm_kwargs)
        self._pool_spatial = False  # global average pool forward_features (VGG, custom 4-D)
        self.freeze: str | int | None = None
        self.min_patch_size: tuple[int, int] | None = None

        resolved = self._check_pretrained(pretrained, backbone)

        if isinstance(backbone, str):
            if out_dim is not None:
                raise ValueError(
                    "out_dim is only for custom nn.Module backbones; a timm model's width is "
                    "read from the model (head_hidden_size or num_features)"
                )
            self.backbone_name: str | None = backbone
            self.backbone = self._create_timm(backbone, resolved)
            default_mean = self.backbone.pretrained_cfg.get("mean") or IMAGENET_MEAN
            default_std = self.backbone.pretrained_cfg.get("std") or IMAGENET_STD
        elif isinstance(backbone, nn.Module):
            if timm_kwargs:
                raise TypeError(
                    f"timm keyword arguments {sorted(timm_kwargs)} only apply to timm model "
                    "names, not to a custom nn.Module backbone"
                )
            self.backbone_name = None
            self.backbone = backbone
            if isinstance(resolved, Path):
                self._load_custom_weights(resolved)
            default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
        else:
            raise TypeError(
                f"backbone must be a timm model name or an nn.Module; got {type(backbone).__name__}"
            )
        self._where = repr(self.backbone_name) if self.backbone_name else type(backbone).__name__

        self._check_min_size()
        self._convert_norm()

        resolved_mean = _channel_stats(mean, default_mean, in_chans, "mean")
        resolved_std = _channel_stats(std, default_std, in_chans, "std")
        self.mean_values = resolved_mean
        self.std_values = resolved_std
        self.register_buffer(
            "mean", torch.tensor(resolved_mean).view(1, in_chans, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(resolved_std).view(1, in_chans, 1, 1), persistent=False
        )

        self.out_dim: int = self._dry_run(out_dim)

        if self.grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._apply_freeze(freeze)
        self.freeze = freeze
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

        if self.backbone_name is not None and not _json_able(self._timm_kwargs):
            logger.warning(
                "SharedPatchEncoder(%r): timm keyword arguments %s are not JSON-able, so this "
                "encoder has no config and cannot be rebuilt from a checkpoint",
                self.backbone_name,
                sorted(self._timm_kwargs),
            )

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_pretrained(
        pretrained: bool | str | Path | None, backbone: str | nn.Module
    ) -> bool | Path:
        """``False``, ``True`` (timm's hub weights) or the checked path of a local file."""
        if pretrained is False or pretrained is None:
            return False
        name = backbone if isinstance(backbone, str) else "<your backbone>"
        if pretrained is True:
            if not isinstance(backbone, str):
                raise ValueError(
                    "pretrained=True loads a timm model's published weights, so it needs a timm "
                    "model name; for a custom nn.Module pass the path of its weights file"
                )
            return True
        if not isinstance(pretrained, (str, Path)):
            raise TypeError(
                f"pretrained must be True, False or the path of a weights file; got {pretrained!r}"
            )
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights file not found: {str(path)!r}. "
                + _LOCAL_FILE_HELP.format(name=name)
            )
        return path

    def _create_timm(self, name: str, pretrained: bool | Path) -> nn.Module:
        # deferred: timm takes seconds to import; encoders over a plain nn.Module never need it
        import timm
        from timm.models import get_pretrained_cfg, load_state_dict

        if ":" in name:
            raise ValueError(
                f"backbone {name!r} names a hub or directory source; give the architecture name "
                "(for example 'resnet50' or 'resnet50.a1_in1k') with pretrained=True for its "
                "published weights, or pretrained='/path/to/file' for a local file"
            )
        if not timm.is_model(name):
            extra = did_you_mean(name, timm.list_models(), n=3)
            raise ValueError(
                f"unknown timm backbone {name!r}.{extra} See timm.list_models() for the names."
            )
        cfg = get_pretrained_cfg(name)
        kwargs: dict[str, Any] = dict(self._timm_kwargs)
        kwargs.update(in_chans=self.in_chans, num_classes=0, pretrained=pretrained is not False)
        if self.drop_path_rate > 0:
            kwargs["drop_path_rate"] = self.drop_path_rate
        # timm's rule: a model whose input size is fixed (vision transformers and friends)
        # takes img_size; give it the patch size.
        fixed = cfg is not None and cfg.fixed_input_size
        if fixed and "img_size" not in kwargs and not kwargs.get("dynamic_img_size", False):
            kwargs["img_size"] = self.patch_size
        if isinstance(pretrained, Path):
            # The file is read here rather than through pretrained_cfg_overlay=dict(file=...),
            # whose torch.load is weights_only=True only from timm 1.0.26 on.
            state = load_state_dict(str(pretrained), weights_only=True)
            classifiers = (cfg.classifier if cfg is not None else None) or ()
            for head in (classifiers,) if isinstance(classifiers, str) else classifiers:
                state.pop(f"{head}.weight", None)
                state.pop(f"{head}.bias", None)
            # Without the classifier on both sides, timm loads the rest strictly (and still
            # applies the model's own conversions, e.g. the stem adapted to in_chans).
            kwargs["pretrained_cfg_overlay"] = {
                "state_dict": state,
                "num_classes": 0,
                "label_offset": 0,
            }
        elif pretrained:
            # Keep the published classifier while loading, so that timm loads strictly, and
            # remove it afterwards.
            kwargs.pop("num_classes")
        try:
            model = timm.create_model(name, **kwargs)
        except TypeError as err:
            bad = re.search(r"unexpected keyword argument '(\w+)'", str(err))
            if bad:
                raise ValueError(
                    f"timm backbone {name!r} does not accept the option {bad.group(1)!r} "
                    f"(given through SharedPatchEncoder's keyword arguments)"
                ) from err
            raise
        except (RuntimeError, ValueError, KeyError, AssertionError) as err:
            if isinstance(pretrained, Path):
                raise ValueError(
                    f"could not load the weights file {str(pretrained)!r} into timm "
                    f"backbone {name!r} (in_chans={self.in_chans}): {err}. The file must hold "
                    "a state dict of this architecture; only classifier weights may be missing "
                    "or extra."
                ) from err
            if pretrained is not True:
                raise
            raise self._hub_error(name, cfg, err) from err
        except OSError as err:  # the hub's errors when offline or without a cached copy
            if pretrained is not True:
                raise
            raise self._hub_error(name, cfg, err) from err
        if pretrained is True:
            model.reset_classifier(0)
        if pretrained is not False:
            logger.info("loaded pretrained weights for %r from %s", name, pretrained)

        from timm.models.vgg import VGG

        if isinstance(model, VGG):
            # The ConvMlp pre-logits (7x7 conv, 4096 wide) is made for 224 px inputs; average
            # pool the feature map instead (see the class docstring).
            model.pre_logits = nn.Identity()
            self._pool_spatial = True
        return model

    @staticmethod
    def _hub_error(name: str, cfg: Any, err: BaseException) -> RuntimeError:
        """The error for ``pretrained=True`` weights that could neither be downloaded nor found."""
        from huggingface_hub import constants  # deferred: timm's dependency, for this message only

        source = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or "none"
        return RuntimeError(
            f"could not load the published weights of timm backbone {name!r} (source: "
            f"{source}): {type(err).__name__}: {err}. timm downloads them once from the Hugging "
            f"Face hub and then reads them from its cache, {constants.HF_HUB_CACHE} (set "
            "HF_HUB_CACHE to move it; with HF_HUB_OFFLINE=1 only the cache is read). "
            + _LOCAL_FILE_HELP.format(name=name)
        )

    def _load_custom_weights(self, path: Path) -> None:
        from timm.models import load_state_dict  # deferred: timm is slow to import

        state = load_state_dict(str(path), weights_only=True)
        result = self.backbone.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"weights file {str(path)!r} does not fit the custom backbone "
                f"{type(self.backbone).__name__}: missing keys {result.missing_keys[:10]}, "
                f"unexpected keys {result.unexpected_keys[:10]}"
            )
        logger.info("loaded weights for %s from %s", type(self.backbone).__name__, path)

    def _check_min_size(self) -> None:
        """Fail early, with the reason, when the patch size is too small for the backbone."""
        h, w = self.patch_size
        model = self.backbone
        embed = getattr(model, "patch_embed", None)
        token = getattr(embed, "patch_size", None)
        if token is not None and not callable(token):
            th, tw = as_pair(tuple(token) if not isinstance(token, int) else token, "token size")
            self.min_patch_size = (th, tw)
            if h < th or w < tw:
                raise ValueError(
                    f"backbone {self._where} cuts its input into {th}x{tw} px tokens, so it "
                    f"needs patches of at least {th}x{tw} px; got {h}x{w}"
                )
            pad = getattr(embed, "dynamic_img_pad", False)
            if not pad and (h % th or w % tw):
                raise ValueError(
                    f"backbone {self._where} cuts its input into {th}x{tw} px tokens, so "
                    f"patch_size must be a multiple of that; got {h}x{w} (use "
                    f"{(h // th) * th} or {(h // th + 1) * th} px patches, or pass "
                    "dynamic_img_pad=True)"
                )
            return
        info = getattr(model, "feature_info", None)
        reductions: list[int] = []
        if isinstance(info, list):
            reductions = [
                int(f["reduction"]) for f in info if isinstance(f, dict) and "reduction" in f
            ]
        if reductions:
            stride = max(reductions)
            self.min_patch_size = (stride, stride)
            if h < stride or w < stride:
                raise ValueError(
                    f"backbone {self._where} downsamples by {stride} (its total stride), so it "
                    f"needs patches of at least {stride} px; got {h}x{w}"
                )

    def _convert_norm(self) -> None:
        if self.norm == "group":
            self.backbone = _to_group_norm(self.backbone, self.norm_groups)
        elif self.norm == "sync_batch":
            from timm.layers import convert_sync_batchnorm  # deferred: timm is slow to import

            self.backbone = convert_sync_batchnorm(self.backbone)
        elif self.norm == "frozen_batch":
            from timm.layers import freeze_batch_norm_2d  # deferred: timm is slow to import

            self.backbone = freeze_batch_norm_2d(self.backbone)

    def _dry_run(self, out_dim: int | None) -> int:
        """Encode one random patch to check the patch size and find (or verify) ``out_dim``."""
        h, w = self.patch_size
        was_training = self.training
        self.eval()
        x = torch.rand(1, 1, self.in_chans, h, w, generator=torch.Generator().manual_seed(0))
        param = next(self.backbone.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        try:
            with torch.no_grad():
                feats = self._encode(x.flatten(0, 1), normalized=False)
        except Exception as err:
            minimum = ""
            if self.min_patch_size is not None:
                minimum = f" (smallest patch by its strides: {self.min_patch_size[0]} px)"
            raise ValueError(
                f"backbone {self._where} cannot encode {h}x{w} px patches with "
                f"in_chans={self.in_chans}{minimum}: {type(err).__name__}: {err}"
            ) from err
        finally:
            self.train(was_training)
        if feats.ndim != 2 or feats.shape[0] != 1:
            raise ValueError(
                f"backbone {self._where} must return (M, D) or (M, D, h', w') features; a dry "
                f"run on one {h}x{w} patch gave shape {tuple(feats.shape)}"
            )
        found = int(feats.shape[1])
        if out_dim is not None and out_dim != found:
            raise ValueError(
                f"out_dim={out_dim} was given but the backbone returns {found} features"
            )
        if self.backbone_name is not None:
            expected = getattr(self.backbone, "head_hidden_size", None)
            if self._pool_spatial or expected is None:
                expected = getattr(self.backbone, "num_features", found)
            if expected != found:  # pragma: no cover - a timm contract change
                logger.warning(
                    "timm backbone %r announces %s features but returns %s; using %s",
                    self.backbone_name,
                    expected,
                    found,
                    found,
                )
        return found

    def _stage_groups(self) -> tuple[list[list[str]], list[str]]:
        """Split backbone parameter names into ordered stages and 'after the last stage'."""
        matcher_fn = getattr(self.backbone, "group_matcher", None)
        if matcher_fn is None:
            raise ValueError(
                f"freeze=<int> needs a backbone with timm's group_matcher() to find its stages; "
                f"{self._where} has none. Use freeze='all', or set requires_grad yourself"
            )
        from timm.models import group_parameters  # deferred: timm is slow to import

        matcher = matcher_fn(coarse=True)
        groups = group_parameters(self.backbone, matcher)
        patterns: list[re.Pattern[str]] = []
        stem: re.Pattern[str] | None = None
        if isinstance(matcher, dict):
            for key, spec in matcher.items():
                if spec is None:
                    continue
                specs = [s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]
                patterns += [re.compile(s) for s in specs]
                if key == "stem" and isinstance(spec, str):
                    stem = re.compile(spec)
        stages: list[list[str]] = []
        tail: list[str] = []
        for gid in sorted(groups):
            names = groups[gid]
            unmatched = [n for n in names if patterns and not any(p.match(n) for p in patterns)]
            if unmatched and len(unmatched) == len(names):
                tail += names
                continue
            if stem is not None and all(stem.match(n) for n in names):
                continue  # the stem is never a trainable 'last stage'
            stages.append(names)
        return stages, tail

    def _apply_freeze(self, freeze: str | int | None) -> None:
        if freeze is None:
            return
        if freeze == "all":
            self.backbone.requires_grad_(False)
            return
        if isinstance(freeze, bool) or not isinstance(freeze, int):
            raise ValueError(
                f"freeze must be None, 'all' or the number of last stages left trainable; got "
                f"{freeze!r}"
            )
        stages, tail = self._stage_groups()
        if not 1 <= freeze <= len(stages):
            raise ValueError(
                f"freeze={freeze} but backbone {self._where} has {len(stages)} stages; give "
                f"1..{len(stages)} (last stages left trainable), or freeze='all'"
            )
        trainable = {n for names in stages[-freeze:] for n in names} | set(tail)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name in trainable)

    # ------------------------------------------------------------------ public API
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn timm's gradient checkpointing on or off.

        Raises:
            ValueError: the backbone does not support it.
        """
        fn = getattr(self.backbone, "set_grad_checkpointing", None)
        if fn is None:
            raise ValueError(
                f"backbone {self._where} has no set_grad_checkpointing(); use a timm model "
                "that supports it, or grad_checkpointing=False"
            )
        try:
            fn(enable)
        except (AssertionError, NotImplementedError) as err:
            raise ValueError(
                f"backbone {self._where} does not support gradient checkpointing; use "
                "grad_checkpointing=False"
            ) from err
        self.grad_checkpointing = bool(enable)

    def train(self, mode: bool = True) -> SharedPatchEncoder:
        """Set training mode; BatchNorm layers with frozen parameters stay in eval mode."""
        super().train(mode)
        if mode and self.freeze is not None:
            for module in self.backbone.modules():
                weight = getattr(module, "weight", None)
                if (
                    isinstance(module, _BatchNorm)
                    and weight is not None
                    and not weight.requires_grad
                ):
                    module.eval()
        return self

    def _encode(self, x: Tensor, normalized: bool) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0
        elif x.is_floating_point():
            x = x.to(self.mean.dtype)
        else:
            raise TypeError(f"patches must be uint8 (0..255) or float (0..1); got dtype {x.dtype}")
        if not normalized:
            x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model = self.backbone
        if self.backbone_name is None:
            feats = model(x)
            if feats.ndim == 4:
                feats = feats.mean(dim=(2, 3))
            return feats
        feats = model.forward_features(x)
        if self._pool_spatial:
            return feats.mean(dim=(2, 3))
        return model.forward_head(feats, pre_logits=True)

    def encode_flat(self, images: Tensor, *, normalized: bool = False) -> Tensor:
        """Encode a flat batch of patches (or whole images a pretext task feeds directly).

        Args:
            images: ``(M, C, h, w)`` uint8 (0..255) or float (0..1).
            normalized: the input is already normalised with ``mean``/``std``.

        Returns:
            Features of shape ``(M, D)``.
        """
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a flat batch of shape (M, {self.in_chans}, h, w); got "
                f"{tuple(images.shape)}"
            )
        return self._encode(images, normalized)

    def forward(self, patches: Tensor, *, normalized: bool = False) -> Tensor:
        """Encode every patch with the shared backbone.

        Args:
            patches: ``(B, N, C, h, w)`` uint8 (0..255) or float (0..1).
            normalized: the patches are already normalised with ``mean``/``std`` (skip it).

        Returns:
            Pooled features of shape ``(B, N, D)``, ``D = out_dim``.

        Raises:
            ValueError: wrong number of dimensions or channels.
        """
        if patches.ndim != 5 or patches.shape[2] != self.in_chans:
            h, w = self.patch_size
            raise ValueError(
                f"expected patches of shape (B, N, {self.in_chans}, h, w) (for example (B, N, "
                f"{self.in_chans}, {h}, {w})); got {tuple(patches.shape)}"
            )
        b, n = patches.shape[0], patches.shape[1]
        feats = self._encode(patches.flatten(0, 1), normalized)
        return feats.reshape(b, n, feats.shape[-1])

    @property
    def config(self) -> dict[str, Any] | None:
        """JSON-able arguments that rebuild this encoder (``SharedPatchEncoder(**config)``).

        ``None`` for a custom ``nn.Module`` backbone (or non-JSON-able timm keyword arguments):
        such an encoder cannot be rebuilt from a checkpoint, only reloaded into an instance
        built by the user. ``pretrained`` is not part of it: a checkpoint carries the weights.
        """
        if self.backbone_name is None or not _json_able(self._timm_kwargs):
            return None
        h, w = self.patch_size
        return {
            "backbone": self.backbone_name,
            "in_chans": self.in_chans,
            "patch_size": h if h == w else [h, w],
            "norm": self.norm,
            "norm_groups": self.norm_groups,
            "channels_last": self.channels_last,
            "grad_checkpointing": self.grad_checkpointing,
            "freeze": self.freeze,
            "mean": list(self.mean_values),
            "std": list(self.std_values),
            "drop_path_rate": self.drop_path_rate,
            **self._timm_kwargs,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SharedPatchEncoder:
        """Rebuild an encoder (randomly initialised) from :attr:`config`."""
        if config is None:
            raise ValueError(
                "this encoder was built around a custom nn.Module and has no config; build it "
                "yourself and load its weights"
            )
        return cls(**config)

    def extra_repr(self) -> str:
        """One line with backbone, channels, patch size, width, norm and freezing."""
        h, w = self.patch_size
        return (
            f"backbone={self._where}, in_chans={self.in_chans}, patch_size=({h}, {w}), "
            f"out_dim={self.out_dim}, norm={self.norm!r}, freeze={self.freeze!r}"
        )
