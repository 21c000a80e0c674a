"""SharedPatchEncoder: one small model per timm family, options, weights files, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from patchssl.encoder import SharedPatchEncoder

# One small representative per family users pick (the real-size names are in the docs table,
# produced by benchmarks/backbone_table.py).
FAMILIES = {
    "resnet": "test_resnet",
    "vgg": "vgg11",
    "densenet": "densenet121-tiny",
    "efficientnet": "test_efficientnet",
    "mobilenetv3": "mobilenetv3_small_050",
    "regnet": "regnetx_002",
    "convnext": "test_convnext",
    "vit": "test_vit",
}
PATCH = 32
# The smallest registered DenseNet is densenet121; shrink its blocks to keep CPU tests fast.
TINY = {"densenet121-tiny": ("densenet121", {"block_config": (1, 1, 1, 1), "growth_rate": 8})}


@pytest.fixture(scope="module")
def encoders() -> dict[str, SharedPatchEncoder]:
    cache: dict[str, SharedPatchEncoder] = {}

    def get(name: str) -> SharedPatchEncoder:
        if name not in cache:
            torch.manual_seed(0)
            timm_name, kwargs = TINY.get(name, (name, {}))
            cache[name] = SharedPatchEncoder(timm_name, patch_size=PATCH, **kwargs)
        return cache[name]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_forward_backward(encoders, family, device):
    enc = encoders(FAMILIES[family]).to(device).train()
    gen = torch.Generator().manual_seed(1)
    patches = torch.randint(0, 256, (2, 4, 3, PATCH, PATCH), dtype=torch.uint8, generator=gen)
    feats = enc(patches.to(device))
    assert feats.shape == (2, 4, enc.out_dim)
    assert torch.isfinite(feats).all()
    enc.zero_grad()
    feats.square().mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    enc.cpu()


def test_width_is_head_hidden_size_when_it_differs(encoders):
    enc = encoders("mobilenetv3_small_050")
    assert enc.backbone.num_features == 288
    assert enc.out_dim == enc.backbone.head_hidden_size == 1024


def test_vgg_average_pools_its_feature_map(encoders):
    enc = encoders("vgg11").eval()
    assert enc.out_dim == enc.backbone.num_features == 512
    assert not any(n.startswith("pre_logits") for n, _ in enc.backbone.named_parameters())
    x = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        got = enc(x)
        ref = enc.backbone.forward_features((x[0] - enc.mean) / enc.std).mean(dim=(2, 3))
    torch.testing.assert_close(got[0], ref)


def test_fold_matches_one_patch_at_a_time(encoders):
    enc = encoders("test_resnet").eval()
    patches = torch.rand(2, 3, 3, PATCH, PATCH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = enc(patches)
        for b in range(2):
            for n in range(3):
                x = (patches[b, n][None] - enc.mean) / enc.std
                ref = enc.backbone.forward_head(enc.backbone.forward_features(x), pre_logits=True)
                torch.testing.assert_close(got[b, n], ref[0], rtol=1e-4, atol=1e-5)


def test_encode_flat_matches_the_patch_forward(encoders):
    enc = encoders("test_resnet").eval()
    patches = torch.rand(2, 3, 3, PATCH, PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        folded = enc(patches)
        flat = enc.encode_flat(patches.flatten(0, 1))
    assert flat.shape == (6, enc.out_dim)
    torch.testing.assert_close(flat.view(2, 3, -1), folded)
    with pytest.raises(ValueError, match=r"flat batch of shape \(M, 3, h, w\)"):
        enc.encode_flat(patches)


def test_uint8_float_and_prenormalised_inputs_agree(encoders):
    enc = encoders("test_convnext").eval()
    u8 = torch.randint(0, 256, (1, 2, 3, PATCH, PATCH), dtype=torch.uint8)
    with torch.no_grad():
        a = enc(u8)
        b = enc(u8.float() / 255)
        c = enc((u8.float() / 255 - enc.mean) / enc.std, normalized=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert enc.mean.flatten().tolist() == pytest.approx(list(enc.backbone.pretrained_cfg["mean"]))


def test_bad_input_shapes_say_what_was_expected(encoders):
    enc = encoders("test_resnet")
    with pytest.raises(ValueError, match=r"\(B, N, 3, h, w\).*got \(2, 3, 32, 32\)"):
        enc(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, N, 3, h, w\).*got \(1, 2, 1, 32, 32\)"):
        enc(torch.rand(1, 2, 1, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        enc(torch.ones(1, 1, 3, 32, 32, dtype=torch.int64))


def test_patch_too_small_fails_at_construction_with_reason():
    with pytest.raises(ValueError, match="at least 32 px; got 16x16"):
        SharedPatchEncoder("test_resnet", patch_size=16)
    with pytest.raises(ValueError, match="16x16 px tokens.*multiple.*got 40x40.*32 or 48"):
        SharedPatchEncoder("test_vit", patch_size=40)


def test_custom_module_too_small_fails_by_dry_run():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(8), nn.MaxPool2d(8))
    with pytest.raises(ValueError, match="cannot encode 16x16 px patches"):
        SharedPatchEncoder(net, patch_size=16)


def test_unknown_backbone_suggests_names():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet5'.*Did you mean"):
        SharedPatchEncoder("resnet5")


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"in_chans": 0}, ValueError, r"^in_chans must be a positive int; got 0$"),
        ({"in_chans": True}, TypeError, r"^in_chans must be a positive int; got bool True$"),
        ({"norm_groups": 2.0}, TypeError, r"^norm_groups must be a positive int; got float"),
        (
            {"norm": "grop"},
            ValueError,
            r"unknown norm 'grop'; choose one of \['batch', .*\]\. Did you mean 'group'\?",
        ),
        ({"patch_size": (32, 0)}, ValueError, r"^patch_size must be positive; got \(32, 0\)$"),
        ({"patch_size": "32"}, TypeError, r"^patch_size must be an int or a pair of ints"),
    ],
)
def test_bad_arguments_are_named_with_the_fix(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        SharedPatchEncoder("test_resnet", **{"patch_size": 32, **kwargs})


def test_hub_names_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match="architecture name.*pretrained="):
        SharedPatchEncoder("hf-hub:timm/resnet50.a1_in1k")


# pretrained=True goes through timm and huggingface_hub, which read HF_HUB_CACHE and
# HF_HUB_OFFLINE when imported: each case runs in a fresh interpreter with its environment.
_HUB_SCRIPT = """
import sys, torch
from huggingface_hub import try_to_load_from_cache
from patchssl.encoder import SharedPatchEncoder
repo, weights = sys.argv[1], sys.argv[2]
print("cached:", try_to_load_from_cache(repo, "model.safetensors"))
enc = SharedPatchEncoder("test_resnet", pretrained=True, patch_size=32)
state = enc.backbone.state_dict()
from safetensors.torch import load_file
source = load_file(weights)
assert not any(k.startswith("fc.") for k in state), sorted(state)
for key, value in source.items():
    if not key.startswith("fc."):
        torch.testing.assert_close(state[key], value, msg=key)
print("loaded", len(state))
"""


def _run_offline(cache, *args):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pretrained_true_reads_the_hugging_face_cache_offline(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(6)
    hub_id = timm.get_pretrained_cfg("test_resnet").hf_hub_id  # timm/test_resnet.r160_in1k
    source = timm.create_model("test_resnet")  # with its 1000-class classifier, as published
    revision = "0" * 40
    repo = tmp_path / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    weights = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    done = _run_offline(tmp_path / "hub", hub_id, str(weights))
    assert done.returncode == 0, done.stderr
    assert f"cached: {weights}" in done.stdout  # huggingface_hub itself finds the file
    assert "loaded" in done.stdout


def test_pretrained_true_offline_without_cache_says_what_to_do(tmp_path):
    hub_id = timm.get_pretrained_cfg("test_resnet").hf_hub_id
    done = _run_offline(tmp_path / "empty", hub_id, "unused")
    assert done.returncode != 0
    assert "cached: None" in done.stdout
    assert "could not load the published weights of timm backbone 'test_resnet'" in done.stderr
    assert str(tmp_path / "empty") in done.stderr  # the cache directory is named
    assert "pretrained='/path/to/weights.safetensors'" in done.stderr


def test_pretrained_true_needs_a_timm_name():
    with pytest.raises(ValueError, match="needs a timm model name"):
        SharedPatchEncoder(nn.Conv2d(3, 4, 3), pretrained=True, patch_size=16)


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        SharedPatchEncoder("test_resnet", pretrained=missing, patch_size=32)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=7)  # with a classifier to drop
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    enc = SharedPatchEncoder("test_resnet", pretrained=path, patch_size=32)
    target = enc.backbone.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("fc."):
            assert key not in target
        else:
            torch.testing.assert_close(target[key], value, msg=key)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("test_convnext", num_classes=0).state_dict(), path)
    with pytest.raises(ValueError, match="could not load the weights file .*convnext.pth"):
        SharedPatchEncoder("test_resnet", pretrained=path, patch_size=32)


def test_grayscale_in_chans_and_adapted_weights(tmp_path):
    torch.manual_seed(4)
    source = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    enc = SharedPatchEncoder("test_resnet", in_chans=1, patch_size=32, pretrained=path)
    rgb_mean = source.pretrained_cfg["mean"]
    assert enc.mean.flatten().tolist() == pytest.approx([sum(rgb_mean) / 3])
    # timm adapts a 3-channel stem to 1 channel by summing over the input channels.
    torch.testing.assert_close(
        enc.backbone.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True)
    )
    feats = enc(torch.rand(2, 3, 1, 32, 32))
    assert feats.shape == (2, 3, enc.out_dim)
    with pytest.raises(ValueError, match="mean has 3 values but the encoder takes in_chans=1"):
        SharedPatchEncoder("test_resnet", in_chans=1, patch_size=32, mean=(0.5, 0.5, 0.5))


def _twin(name: str, **kwargs) -> tuple[SharedPatchEncoder, SharedPatchEncoder]:
    torch.manual_seed(5)
    plain = SharedPatchEncoder(name, patch_size=32)
    other = SharedPatchEncoder(name, patch_size=32, **kwargs)
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_channels_last_gives_the_same_features():
    plain, fast = _twin("test_resnet", channels_last=True)
    assert fast.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    plain, ckpt = _twin("test_resnet", grad_checkpointing=True)
    assert ckpt.backbone.grad_checkpointing and not plain.backbone.grad_checkpointing
    x = torch.rand(2, 2, 3, 32, 32)
    plain.train()(x).sum().backward()
    ckpt.train()(x).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_grad_checkpointing_unsupported_is_an_error():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        SharedPatchEncoder(net, patch_size=16, grad_checkpointing=True)


def test_freeze_all_and_last_stages():
    enc = SharedPatchEncoder("test_resnet", patch_size=32, freeze="all")
    assert not any(p.requires_grad for p in enc.parameters())
    enc = SharedPatchEncoder("test_resnet", patch_size=32, freeze=1)
    for name, p in enc.backbone.named_parameters():
        assert p.requires_grad == name.startswith("layer4"), name
    enc = SharedPatchEncoder("test_resnet", patch_size=32, freeze=2)
    for name, p in enc.backbone.named_parameters():
        assert p.requires_grad == name.startswith(("layer3", "layer4")), name
    # Frozen BatchNorm layers keep their running statistics in training mode.
    enc.train()
    assert not enc.backbone.bn1.training and not enc.backbone.layer1[0].bn1.training
    assert enc.backbone.layer4[0].bn1.training
    before = enc.backbone.bn1.running_mean.clone()
    enc(torch.rand(2, 2, 3, 32, 32))
    torch.testing.assert_close(enc.backbone.bn1.running_mean, before)


def test_freeze_keeps_layers_after_the_last_stage_trainable(encoders):
    enc = SharedPatchEncoder("mobilenetv3_small_050", patch_size=32, freeze=1)
    trainable = {n.split(".")[0] for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"blocks", "conv_head"}
    last = max(int(n.split(".")[1]) for n, _ in enc.backbone.named_parameters() if "blocks." in n)
    for name, p in enc.backbone.named_parameters():
        if name.startswith("blocks."):
            assert p.requires_grad == (int(name.split(".")[1]) == last), name


@pytest.mark.parametrize("freeze", [0, 9, "some", True])
def test_bad_freeze_is_explained(freeze):
    with pytest.raises(ValueError, match="freeze"):
        SharedPatchEncoder("test_resnet", patch_size=32, freeze=freeze)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_group_norm_replaces_every_batch_norm(name):
    enc = SharedPatchEncoder(name, patch_size=32, norm="group")
    assert not any(isinstance(m, _BatchNorm) for m in enc.modules())
    groups = [m for m in enc.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and all(m.num_channels % m.num_groups == 0 for m in groups)
    assert all(m.num_groups == 32 for m in groups if m.num_channels % 32 == 0)
    if name == "test_efficientnet":  # timm's BatchNormAct2d: the activation must survive
        assert any(not isinstance(getattr(m, "act", nn.Identity()), nn.Identity) for m in groups)
    # Works for a single patch in training mode, where BatchNorm could not.
    out = enc.train()(torch.rand(1, 1, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_group_norm_keeps_activation_outputs():
    torch.manual_seed(6)
    enc = SharedPatchEncoder("test_efficientnet", patch_size=32, norm="group").eval()
    # Slow reference for one converted layer: group norm, then the carried activation.
    layer = next(m for m in enc.modules() if isinstance(m, nn.GroupNorm) and hasattr(m, "act"))
    x = torch.randn(2, layer.num_channels, 5, 5)
    ref = layer.act(nn.functional.group_norm(x, layer.num_groups, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), ref)


def test_sync_and_frozen_batch_norm():
    sync = SharedPatchEncoder("test_resnet", patch_size=32, norm="sync_batch")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in sync.modules())
    with torch.no_grad():
        assert sync.eval()(torch.rand(1, 2, 3, 32, 32)).shape == (1, 2, sync.out_dim)
    frozen = SharedPatchEncoder("test_resnet", patch_size=32, norm="frozen_batch")
    assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
    assert frozen.train()(torch.rand(1, 2, 3, 32, 32)).shape == (1, 2, frozen.out_dim)


def test_config_round_trip_is_json_able():
    enc = SharedPatchEncoder("test_resnet", patch_size=(32, 48), in_chans=1, norm="group")
    config = json.loads(json.dumps(enc.config))
    again = SharedPatchEncoder.from_config(config)
    assert again.config == enc.config
    again.load_state_dict(enc.state_dict())  # same parameter names and shapes
    assert again.patch_size == (32, 48) and again.out_dim == enc.out_dim


def test_custom_module_out_dim_inferred_or_checked():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
    enc = SharedPatchEncoder(net, patch_size=16)
    assert enc.out_dim == 6 and enc.config is None
    x = torch.rand(2, 3, 3, 16, 16)
    with torch.no_grad():
        ref = net((x.flatten(0, 1) - enc.mean) / enc.std).mean(dim=(2, 3)).view(2, 3, 6)
        torch.testing.assert_close(enc(x), ref)
    with pytest.raises(ValueError, match="out_dim=5 was given but the backbone returns 6"):
        SharedPatchEncoder(net, patch_size=16, out_dim=5)
