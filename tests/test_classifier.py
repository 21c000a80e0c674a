"""PatchClassifier: heads and attention, slow reference, transfer from checkpoints, errors."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

from patchssl.attention import weight_entropy
from patchssl.checkpoint import CheckpointError, save_checkpoint
from patchssl.classifier import ClassifierOutput, PatchClassifier, TransferReport
from patchssl.encoder import SharedPatchEncoder
from patchssl.permutations import PermutationSet
from patchssl.pretext import JigsawPretext, PatchDefences, create_pretext
from patchssl.tiling import PatchTiler, paper_image_size

PATCH = 32


def _encoder(**kwargs) -> SharedPatchEncoder:
    torch.manual_seed(0)
    return SharedPatchEncoder("test_resnet", patch_size=PATCH, **kwargs)


def _tiler() -> PatchTiler:
    return PatchTiler(grid=(2, 2), patch_size=PATCH, image_size=80, gap=4)


def _images(b: int = 2, size: int = 80, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="module")
def encoder() -> SharedPatchEncoder:
    return _encoder()


@pytest.mark.parametrize("head", ["concat", "pooled"])
@pytest.mark.parametrize("attention", ["sigmoid", "softmax", "gated", None])
def test_shapes_and_slow_reference(encoder, head, attention, device):
    torch.manual_seed(1)
    clf = PatchClassifier(  # a copy: the module-scoped encoder stays on the CPU for other tests
        copy.deepcopy(encoder),
        num_classes=3,
        attention=attention,
        tiler=_tiler(),
        head=head,
        hidden_dim=8,
    )
    clf = clf.to(device).eval()
    images = _images().to(device)
    with torch.no_grad():
        out = clf.forward_with_attention(images)
        logits = clf(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    torch.testing.assert_close(logits, out.logits)
    assert out.logits.shape == (2, 3) and out.weights.shape == (2, 4)
    assert out.features.shape == (2, 8 * 4 if head == "concat" else 8)
    if attention is None:
        assert torch.equal(out.weights, torch.ones(2, 4, device=device))
    # Slow reference: one image and one patch at a time, with the modules' own layers. On a GPU
    # both sides run in true fp32 (no TF32 convolutions), so the fp32 tolerances hold there too.
    no_tf32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    with torch.no_grad(), no_tf32:
        out = clf.forward_with_attention(images)
        for b in range(2):
            boxes = clf.tiler.centre_boxes().tolist()
            hs = []
            for x0, y0, x1, y1 in boxes:
                patch = images[b : b + 1, None, :, y0:y1, x0:x1]
                hs.append(clf.patch_fc(clf.encoder(patch))[0, 0])
            h = torch.stack(hs)  # (N, hidden)
            a = torch.ones(4, device=device) if attention is None else clf.attention(h[None])[1][0]
            g = a[:, None] * h
            f = g.flatten() if head == "concat" else g.sum(0)
            torch.testing.assert_close(out.weights[b], a, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.features[b], f, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.logits[b], clf.fc(f), rtol=1e-4, atol=1e-5)


def test_forward_and_forward_patches_agree(encoder):
    clf = PatchClassifier(encoder, tiler=_tiler(), hidden_dim=8).eval()
    images = _images()
    with torch.no_grad():
        a = clf.forward_with_attention(images)
        b = clf.forward_patches(clf.tiler(images).patches)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_timm_model_contract(encoder):
    torch.manual_seed(0)
    clf = PatchClassifier(copy.deepcopy(encoder), num_classes=3, tiler=_tiler(), hidden_dim=8)
    clf.eval()
    images = _images()
    with torch.no_grad():
        feats = clf.forward_features(images)
        assert feats.shape == (2, 4, 8)
        logits = clf.forward_head(feats)
        torch.testing.assert_close(logits, clf(images))
        pooled = clf.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, 8)  # the default pooled head: hidden_dim
        torch.testing.assert_close(clf.get_classifier()(pooled), logits)
    assert clf.get_classifier() is clf.fc
    clf.reset_classifier(5)
    assert clf.num_classes == 5 and clf(images).shape == (2, 5)
    assert clf.config["num_classes"] == 5
    clf.reset_classifier(0)  # timm: 0 classes leaves the pooled features
    with torch.no_grad():
        torch.testing.assert_close(clf(images), pooled)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        clf.reset_classifier(-1)
    out = clf.forward_with_attention(images)
    assert isinstance(out, ClassifierOutput)


@pytest.mark.parametrize("attention", ["sigmoid", "softmax"])
def test_backward_reaches_encoder_attention_and_head(encoder, attention):
    clf = PatchClassifier(encoder, attention=attention, tiler=_tiler(), hidden_dim=8).train()
    clf.zero_grad()
    logits = clf(_images())
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    params = dict(clf.named_parameters())
    names = ["encoder.backbone.conv1.0.weight", "patch_fc.0.weight", "fc.weight"]
    names += [n for n in params if n.startswith("attention.")]  # every attention parameter
    assert any(n.startswith("attention.") for n in names)
    for name in names:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def _recorder(store: list[torch.Tensor]):
    def hook(module, args, kwargs):
        store.append(args[0])

    return hook


def test_jitter_only_when_asked(encoder):
    tiler = PatchTiler(grid=(2, 2), patch_size=PATCH, image_size=96, jitter=8)
    images = _images(size=96)
    centre = tiler.eval()(images).patches
    for flag in (False, True):
        clf = PatchClassifier(encoder, tiler=tiler, dropout=0.0, jitter_in_training=flag)
        clf.train()
        seen: list[torch.Tensor] = []
        handle = clf.encoder.register_forward_pre_hook(_recorder(seen), with_kwargs=True)
        clf(images, generator=torch.Generator().manual_seed(0))
        handle.remove()
        assert torch.equal(seen[0], centre) != flag


def test_default_tiler_keeps_the_paper_proportions(encoder):
    clf = PatchClassifier(encoder)
    assert clf.tiler.grid == (3, 3) and clf.tiler.patch_size == (PATCH, PATCH)
    assert clf.tiler.image_size == paper_image_size(PATCH)


@pytest.mark.parametrize(
    ("pretext", "patch"),
    [
        *[(name, p) for name in ("jigsaw", "rotation", "relative_position") for p in (32, 64)],
        ("jigsaw", (32, 48)),  # rotation needs square patches
        ("relative_position", (32, 48)),
    ],
)
def test_default_pretext_and_classifier_accept_the_same_images(pretext, patch):
    # Every default geometry comes from one function: a task and a classifier built with their
    # defaults around the same encoder take the same images.
    torch.manual_seed(0)
    enc = SharedPatchEncoder("test_resnet", patch_size=patch)
    kwargs = {"permutations": PermutationSet.generate(4, 9, seed=0)} if pretext == "jigsaw" else {}
    task = create_pretext(pretext, encoder=enc, **kwargs)
    clf = PatchClassifier(task.encoder, hidden_dim=8).eval()
    assert clf.tiler.config == task.tiler.config
    size = task.tiler.image_size
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    task(images, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert clf(images).shape == (2, 2)


def test_transfer_keeps_the_encoders_input(tmp_path):
    # The pretext feeds its encoder per-patch standardised tiles; the classifier built from its
    # checkpoint must feed the encoder the same input for the same patch.
    torch.manual_seed(0)
    enc = SharedPatchEncoder("test_resnet", patch_size=PATCH)
    task = JigsawPretext(
        enc, PermutationSet.generate(4, 9, seed=0), defences=PatchDefences(per_patch_norm=True)
    ).eval()
    assert task.model_config["input_norm"] == "per_patch"
    payload = {
        "model": task.state_dict(),
        "kind": "pretrain",
        "model_config": task.model_config,
        "permutations_fingerprint": task.permutation_fingerprint,
    }
    path = save_checkpoint(tmp_path / "p.pt", payload)
    clf = PatchClassifier.from_pretrained(path).eval()
    assert clf.input_norm == "per_patch" and clf.config["input_norm"] == "per_patch"
    images = _images(1, size=task.tiler.image_size[0])
    seen_task: list = []
    seen_clf: list = []
    h1 = task.encoder.register_forward_pre_hook(_recorder(seen_task), with_kwargs=True)
    h2 = clf.encoder.register_forward_pre_hook(_recorder(seen_clf), with_kwargs=True)
    with torch.no_grad():
        identity = torch.arange(9)[None]  # the permutation that keeps the tiles in place
        tiles = task.tiler(images).patches[:, identity[0]]
        task.compute_logits(task.defences(tiles))
        clf(images)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(seen_clf[0], seen_task[0])
    # Overriding it feeds the encoder's own normalisation instead (uint8 patches as they are).
    plain = PatchClassifier.from_pretrained(path, input_norm="encoder").eval()
    seen: list = []
    handle = plain.encoder.register_forward_pre_hook(_recorder(seen), with_kwargs=True)
    with torch.no_grad():
        plain(images)
    handle.remove()
    assert seen[0].dtype == torch.uint8
    with pytest.raises(ValueError, match="unknown input_norm"):
        PatchClassifier(enc, input_norm="imagenet")


def test_argument_errors(encoder):
    with pytest.raises(ValueError, match="cuts 40x40 px patches but the encoder .* 32x32"):
        PatchClassifier(encoder, tiler=PatchTiler(grid=2, patch_size=40, image_size=96))
    with pytest.raises(ValueError, match="Did you mean 'softmax'"):
        PatchClassifier(encoder, attention="softmx", tiler=_tiler())
    with pytest.raises(ValueError, match="unknown head"):
        PatchClassifier(encoder, head="max", tiler=_tiler())
    with pytest.raises(TypeError, match="SharedPatchEncoder"):
        PatchClassifier(nn.Linear(2, 2))
    clf = PatchClassifier(encoder, tiler=_tiler())
    with pytest.raises(ValueError, match=r"\(B, 4, C, h, w\) for a 2x2 grid; got \(1, 9"):
        clf.forward_patches(torch.rand(1, 9, 3, PATCH, PATCH))


def test_config_round_trip(encoder):
    clf = PatchClassifier(encoder, attention="gated", head="pooled", tiler=_tiler(), hidden_dim=8)
    config = json.loads(json.dumps(clf.config))
    again = PatchClassifier.from_config(config)
    again.load_state_dict(clf.state_dict())
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images), clf.eval()(images))


def test_attention_temperature_reaches_the_gate_and_round_trips(encoder):
    kw = dict(attention="sigmoid", tiler=_tiler(), hidden_dim=8)
    clf = PatchClassifier(encoder, **kw, attention_temperature=0.25)
    assert clf.attention.temperature == 0.25
    plain = PatchClassifier(encoder, **kw)
    plain.load_state_dict(clf.state_dict())
    images = _images()
    with torch.no_grad():
        feats = clf.eval().forward_features(images)
        scores = clf.attention.logits(feats)  # before the temperature
        weights = clf.forward_with_attention(images).weights
        torch.testing.assert_close(weights, torch.sigmoid(scores / 0.25))
        # the same weights at T = 1 give the plain sigmoid: T changes the weights, nothing else
        torch.testing.assert_close(
            plain.eval().forward_with_attention(images).weights, torch.sigmoid(scores)
        )
    again = PatchClassifier.from_config(json.loads(json.dumps(clf.config)))
    assert again.attention.temperature == 0.25
    for bad in (0, -1.0, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="attention_temperature must be a finite number > 0"):
            PatchClassifier(encoder, tiler=_tiler(), attention=None, attention_temperature=bad)


def test_attention_entropy_reaches_the_gate_and_round_trips(encoder):
    clf = PatchClassifier(encoder, tiler=_tiler(), hidden_dim=8, attention_entropy=0.5)
    assert clf.attention.entropy_weight == 0.5 and clf.aux_loss is None
    images = _images()
    out = clf.train().forward_with_attention(images)
    expected = 0.5 * weight_entropy(out.weights.detach()).mean()
    torch.testing.assert_close(clf.aux_loss.detach(), expected)
    clf.train()(images)  # the plain forward sets it too (the training loop's call)
    assert clf.aux_loss is not None
    with torch.no_grad():
        clf.eval()(images)
    assert clf.aux_loss is None
    config = json.loads(json.dumps(clf.config))
    assert config["attention_entropy"] == 0.5
    assert PatchClassifier.from_config(config).attention.entropy_weight == 0.5
    # a config written before the option existed rebuilds with the penalty off
    del config["attention_entropy"]
    assert PatchClassifier.from_config(config).attention_entropy == 0.0
    # no attention: nothing to penalise
    none = PatchClassifier(encoder, tiler=_tiler(), attention=None, attention_entropy=0.5)
    none.train()(images)
    assert none.aux_loss is None
    for bad in (-1.0, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="attention_entropy must be a finite number >= 0"):
            PatchClassifier(encoder, tiler=_tiler(), attention=None, attention_entropy=bad)


# ---------------------------------------------------------------- transfer


class _TinyPretext(nn.Module):
    """Stands in for a pretext task: an ``encoder`` attribute and a head of its own."""

    def __init__(self, encoder: SharedPatchEncoder, tiler: PatchTiler) -> None:
        super().__init__()
        self.encoder = encoder
        self.tiler = tiler
        self.head = nn.Linear(encoder.out_dim * tiler.num_patches, 5)


def _pretrain_payload(encoder: SharedPatchEncoder, tiler: PatchTiler) -> dict:
    task = _TinyPretext(encoder, tiler)
    # Make BatchNorm statistics non-trivial so that their transfer is visible.
    task.train()
    task.encoder(tiler(_images(size=tiler.image_size[0])).patches)
    return {
        "kind": "pretrain",
        "model": task.state_dict(),
        "model_config": {
            "pretext": "jigsaw",
            "pretext_kwargs": {"num_permutations": 5},
            "encoder": encoder.config,
            "tiler": tiler.config,
        },
        "permutations_fingerprint": "0123456789abcdef",
    }


@pytest.fixture(scope="module")
def pretrain_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "pretrain.pt"
    payload = _pretrain_payload(_encoder(), _tiler())
    save_checkpoint(path, payload)
    return path, payload


def test_from_pretrained_loads_exactly_the_encoder(pretrain_file, caplog):
    path, payload = pretrain_file
    with caplog.at_level(logging.INFO, logger="patchssl.classifier"):
        clf = PatchClassifier.from_pretrained(
            path, num_classes=2, attention="softmax", hidden_dim=8
        )
    stored = payload["model"]
    encoder_keys = [k for k in stored if k.startswith("encoder.")]
    own = clf.state_dict()
    for key in encoder_keys:
        assert torch.equal(own[key], stored[key]), key
    assert clf.tiler.config == payload["model_config"]["tiler"]
    report = clf.transfer_report
    assert isinstance(report, TransferReport)
    assert report.loaded == len(encoder_keys)
    assert report.ignored_keys == ["head.weight", "head.bias"]
    assert set(report.new_keys) == {k for k in own if not k.startswith("encoder.")}
    assert report.permutations_fingerprint == "0123456789abcdef" and report.pretext == "jigsaw"
    assert report.source == str(path)
    assert any(f"loaded {len(encoder_keys)} encoder tensors" in r.message for r in caplog.records)


def test_from_pretrained_accepts_a_dict_and_runtime_options(pretrain_file):
    _, payload = pretrain_file
    payload = {**payload, "format": "patchssl"}
    clf = PatchClassifier.from_pretrained(payload, encoder_options={"freeze": "all"})
    assert clf.transfer_report.source is None
    assert not any(p.requires_grad for p in clf.encoder.parameters())
    assert all(p.requires_grad for p in clf.fc.parameters())
    with pytest.raises(CheckpointError, match="norm='batch'; norm='group' has other weights"):
        PatchClassifier.from_pretrained(payload, encoder_options={"norm": "group"})
    with pytest.raises(ValueError, match="'in_chans' cannot change after pretraining"):
        PatchClassifier.from_pretrained(payload, encoder_options={"in_chans": 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "resnet18"}, "backbone 'test_resnet' but backbone='resnet18' was asked"),
        ({"patch_size": 64}, r"patch_size \(32, 32\) but patch_size=\(64, 64\) was asked"),
        ({"in_chans": 1}, "in_chans 3 but in_chans=1 was asked"),
        (
            {"tiler": PatchTiler(grid=2, patch_size=48, image_size=120)},
            "pretrained with 32x32 px patches but the tiler given cuts 48x48",
        ),
    ],
)
def test_from_pretrained_refuses_mismatches(pretrain_file, kwargs, message):
    path, _ = pretrain_file
    with pytest.raises(CheckpointError, match=message):
        PatchClassifier.from_pretrained(path, **kwargs)


def test_from_pretrained_allows_another_grid(pretrain_file):
    path, _ = pretrain_file
    tiler = PatchTiler(grid=3, patch_size=PATCH, image_size=107)
    clf = PatchClassifier.from_pretrained(path, tiler=tiler, hidden_dim=8)
    assert clf.num_patches == 9


def test_not_a_checkpoint_and_wrong_kinds(tmp_path, pretrain_file):
    path, payload = pretrain_file
    plain = tmp_path / "plain.pth"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a patchssl checkpoint"):
        PatchClassifier.from_pretrained(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        PatchClassifier.from_pretrained(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        PatchClassifier.from_pretrained(tmp_path / "missing.pt")
    with pytest.raises(
        CheckpointError, match="use PatchClassifier.from_pretrained|from_pretrained"
    ):
        PatchClassifier.from_checkpoint(path)
    clf = PatchClassifier.from_pretrained(path, hidden_dim=8)
    finetune = tmp_path / "finetune.pt"
    save_checkpoint(
        finetune,
        {"kind": "finetune", "model": clf.state_dict(), "model_config": {"classifier": clf.config}},
    )
    with pytest.raises(CheckpointError, match=r"fine-tuned .*from_checkpoint"):
        PatchClassifier.from_pretrained(finetune)
    broken = {**payload, "format": "patchssl"}
    broken["model"] = {k: v for k, v in payload["model"].items() if "layer4" not in k}
    with pytest.raises(CheckpointError, match="encoder weights .* do not fit: missing"):
        PatchClassifier.from_pretrained(broken)


def test_from_checkpoint_restores_a_finetuned_classifier(tmp_path, pretrain_file):
    path, _ = pretrain_file
    clf = PatchClassifier.from_pretrained(path, attention="gated", head="pooled", hidden_dim=8)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    finetune = tmp_path / "best.pt"
    save_checkpoint(
        finetune,
        {"kind": "finetune", "model": clf.state_dict(), "model_config": {"classifier": clf.config}},
    )
    again = PatchClassifier.from_checkpoint(finetune)
    assert again.config == clf.config
    images = _images()
    with torch.no_grad():
        a, b = clf.eval()(images), again.eval()(images)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_custom_encoder_needs_to_be_passed(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    encoder = SharedPatchEncoder(net, patch_size=PATCH)
    payload = _pretrain_payload(encoder, _tiler())
    payload["format"] = "patchssl"
    with pytest.raises(CheckpointError, match="custom nn.Module.*encoder=my_encoder"):
        PatchClassifier.from_pretrained(payload)
    fresh = SharedPatchEncoder(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        patch_size=PATCH,
    )
    clf = PatchClassifier.from_pretrained(payload, encoder=fresh, hidden_dim=8)
    torch.testing.assert_close(clf.encoder.backbone[1].running_mean, net[1].running_mean)


def _bags(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of 3x3 cells of 32 px: a tinted noisy background; positives hold one bright
    12 px square in a random cell (the finding). Returns images, labels and finding cells."""
    base = torch.rand(n, 3, 1, 1, generator=gen) * 80 + 90
    images = base + torch.randn(n, 3, 96, 96, generator=gen) * 12
    labels = torch.randint(0, 2, (n,), generator=gen)
    cells = torch.randint(0, 9, (n,), generator=gen)
    for i in range(n):
        if labels[i]:
            r, c = divmod(int(cells[i]), 3)
            y, x = 32 * r + 10, 32 * c + 10
            images[i, :, y : y + 12, x : x + 12] = 235.0
    return images.clamp(0, 255).to(torch.uint8), labels, cells


def test_default_classifier_learns_to_point_its_attention_at_the_finding() -> None:
    # The default classifier (softmax attention pooling) learns a finding that can lie in any
    # cell and puts its top weight on that cell: the weights follow the tiler's row-major
    # cells and select by content. A behaviour test on an easy task, not a benchmark figure
    # (docs/benchmarks.md compares the classifiers).
    torch.manual_seed(0)
    encoder = SharedPatchEncoder("test_resnet", patch_size=32)
    tiler = PatchTiler(grid=(3, 3), patch_size=32, image_size=96, gap=0, jitter=0)
    clf = PatchClassifier(encoder, tiler=tiler, hidden_dim=16, dropout=0.0)
    assert clf.attention_mode == "softmax" and clf.head == "pooled"
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    clf.train()
    for _ in range(120):
        images, labels, _ = _bags(32, gen)
        loss = nn.functional.cross_entropy(clf(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, labels, cells = _bags(128, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = clf.eval().forward_with_attention(images)
    pos = labels == 1
    accuracy = (out.logits.argmax(1) == labels).float().mean().item()
    pointed = (out.weights[pos].argmax(1) == cells[pos]).float().mean().item()
    assert accuracy > 0.9, accuracy
    assert pointed > 0.8, pointed  # chance: 1/9
