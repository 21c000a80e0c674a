"""The built-in tasks' maths, each fast path against a slow reference written here."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from patchssl.permutations import PermutationSet
from patchssl.pretext import (
    DIRECTIONS,
    JigsawPretext,
    PatchDefences,
    RelativePositionPretext,
    RotationPretext,
    create_pretext,
    default_tiler,
    pretext_from_config,
)
from patchssl.pretext.base import channel_jitter, random_grayscale, standardize_patches
from patchssl.pretext.heads import (
    PatchConcatHead,
    PermutationAssignmentHead,
    PermutationRelationHead,
    PooledPatchHead,
    sized_from_width,
)
from patchssl.pretext.rotation import rotate_quarter_turns
from patchssl.pretext.testing import tiny_encoder
from patchssl.tiling import PatchTiler


class Recorder(nn.Module):
    """An encoder that remembers what it was given and returns each patch's top-left pixel."""

    def __init__(self, in_chans: int = 1, patch_size: int = 4) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = (patch_size, patch_size)
        self.out_dim = in_chans
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: Tensor | None = None

    def forward(self, patches: Tensor, *, normalized: bool = False) -> Tensor:
        self.seen = patches.detach().clone()
        return patches[..., 0, 0].float() * self.scale


def tile_index_images(tiler: PatchTiler, batch: int, channels: int = 1) -> Tensor:
    """Images whose every tile is constant, equal to the tile's row-major index."""
    tiles = torch.arange(tiler.num_patches, dtype=torch.uint8).view(1, -1, 1, 1, 1)
    tiles = tiles.expand(batch, -1, channels, *tiler.patch_size)
    return tiler.assemble(tiles.contiguous(), fill=200)


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- jigsaw
def test_jigsaw_target_is_the_permutation_applied(device: torch.device) -> None:
    tiler = PatchTiler(grid=3, patch_size=4, image_size=15)
    perms = PermutationSet.generate(24, 9, seed=3)
    encoder = Recorder()
    task = JigsawPretext(  # image-level turns off: this checks the shuffle alone
        encoder,
        perms,
        tiler,
        hidden_dim=4,
        concat_dim=4,
        defences=PatchDefences(),
        flip=False,
        rot90=False,
    ).to(device)
    images = tile_index_images(tiler, batch=64).to(device)
    out = task(images, generator=g(0))
    seen = (encoder.seen * 255).round().long()  # (B, 9, 1, 4, 4): tile indices after shuffling
    assert (seen == seen[..., :1, :1, :1]).all()  # tiles stay whole
    order = seen[:, :, 0, 0, 0].cpu()  # order[b, k] = source tile at position k
    table = perms.permutations
    for b in range(images.shape[0]):
        applied = table[out.targets[b].item()]
        assert torch.equal(order[b], applied)
        # Undo it: putting position k back at tile perm[k] gives the tiles in order.
        restored = torch.empty_like(order[b])
        restored[applied] = order[b]
        assert torch.equal(restored, torch.arange(9))
    assert len(set(out.targets.tolist())) > 10  # draws vary over the batch


def test_jigsaw_shuffle_matches_a_per_sample_loop() -> None:
    task = JigsawPretext(tiny_encoder(), PermutationSet.generate(10, 9, seed=0))
    patches = torch.randn(5, 9, 3, 2, 2)
    shuffled, index = task.shuffle(patches, generator=g(4))
    for b in range(5):
        perm = task.permutation_set[int(index[b])]
        for k in range(9):
            assert torch.equal(shuffled[b, k], patches[b, perm[k]])


def test_jigsaw_draws_repeat_with_the_seed_and_follow_it() -> None:
    task = JigsawPretext(tiny_encoder(), PermutationSet.generate(50, 9, seed=0)).eval()
    images = torch.randint(0, 256, (8, 3, *task.tiler.image_size), dtype=torch.uint8)
    a = task.predict(images, generator=g(1)).targets
    b = task.predict(images, generator=g(1)).targets
    c = task.predict(images, generator=g(2)).targets
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_jigsaw_defaults_and_validation() -> None:
    encoder = tiny_encoder(patch_size=16)
    task = create_pretext("jigsaw", encoder=encoder)
    assert task.num_classes == 1000 and task.permutation_set == PermutationSet.default()
    assert task.config["permutations"] == "default"
    assert task.permutation_fingerprint == PermutationSet.default().fingerprint
    assert task.tiler.grid == (3, 3) and task.tiler.patch_size == (16, 16)
    assert task.tiler.image_size == (54, 54)  # ceil(3 * 16 * 512 / 459)
    assert default_tiler(153).image_size == (512, 512)  # the paper's geometry
    # per-tile normalisation off (it removes what a finding changes), random grayscale on
    assert not task.defences.per_patch_norm and task.defences.color_drop == "grayscale"
    assert task.image_defences.flip and task.image_defences.rot90
    assert task.image_defences.crop_scale is None
    assert isinstance(task.head, PermutationRelationHead) and task.config["head"] == "relation"
    assert task.curriculum == 64 and task.curriculum_steps == 200
    assert (task.config["hidden_dim"], task.config["concat_dim"]) == sized_from_width(
        encoder.out_dim
    )
    with pytest.raises(ValueError, match="shuffles 9 tiles but the tiler cuts 4 patches"):
        JigsawPretext(encoder, tiler=PatchTiler(grid=2, patch_size=16, image_size=40))
    with pytest.raises(ValueError, match="tiler cuts 20x20 patches but the encoder.*16x16"):
        JigsawPretext(encoder, tiler=PatchTiler(grid=3, patch_size=20, image_size=64))
    with pytest.raises(TypeError, match="PermutationSet"):
        JigsawPretext(encoder, permutations=3.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="color_drop"):
        JigsawPretext(encoder, defences={"color_drop": "sepia"})


def test_jigsaw_config_carries_a_custom_set_and_rebuilds(tmp_path) -> None:
    perms = PermutationSet.generate(6, 4, seed=1)
    tiler = PatchTiler(grid=2, patch_size=16, image_size=40, gap=2)
    task = JigsawPretext(tiny_encoder(), perms, tiler, hidden_dim=8, concat_dim=8)
    assert task.config["permutations"] == perms.permutations.tolist()
    rebuilt = pretext_from_config(task.model_config, encoder=tiny_encoder())
    assert rebuilt.permutation_fingerprint == perms.fingerprint
    assert rebuilt.tiler.config == tiler.config
    perms.save(tmp_path / "p.txt")
    from_path = JigsawPretext(tiny_encoder(), str(tmp_path / "p.txt"), tiler)
    assert from_path.permutation_fingerprint == perms.fingerprint


@pytest.mark.parametrize(
    ("build", "exc", "pattern"),
    [
        (
            lambda: PatchConcatHead(0, 8, 2),
            ValueError,
            r"^num_patches must be a positive int; got 0$",
        ),
        (lambda: PatchConcatHead(4, 8, 2, concat_dim=-1), ValueError, r"^concat_dim must be"),
        (lambda: PooledPatchHead(8.0, 2), TypeError, r"^in_dim must be a positive int; got float"),
        (lambda: PooledPatchHead(8, 2, hidden_dim=True), TypeError, r"^hidden_dim must be a pos"),
        (
            lambda: PermutationAssignmentHead(4, 8, [[0, 1, 2, 3]], hidden_dim=0),
            ValueError,
            r"^hidden_dim must be a positive int; got 0$",
        ),
        (
            lambda: PermutationRelationHead(4, 8, [[0, 1, 2, 3]], (2, 2), pair_dim=0),
            ValueError,
            r"^pair_dim must be a positive int; got 0$",
        ),
        (
            lambda: PermutationRelationHead(4, 8, [[0, 1, 2, 3]], (2, 2), dropout=1.0),
            ValueError,
            r"^dropout must be in \[0, 1\)",
        ),
    ],
)
def test_heads_name_the_bad_size(build, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        build()


def test_pretext_from_config_needs_an_encoder_for_custom_modules() -> None:
    task = create_pretext("rotation", encoder=tiny_encoder())
    with pytest.raises(ValueError, match="pass encoder=SharedPatchEncoder"):
        pretext_from_config(task.model_config)
    with pytest.raises(ValueError, match="no 'pretext' entry"):
        pretext_from_config({"encoder": None})


# --------------------------------------------------------------------------- defences
def test_standardize_matches_reference() -> None:
    x = torch.rand(2, 3, 3, 5, 6)
    out = standardize_patches(x, eps=1e-5)
    for b in range(2):
        for n in range(3):
            for c in range(3):
                p = x[b, n, c]
                ref = (p - p.mean()) / (p.std(unbiased=False) + 1e-5)
                torch.testing.assert_close(out[b, n, c], ref)
    flat = standardize_patches(torch.full((1, 1, 1, 4, 4), 0.7))
    assert torch.isfinite(flat).all() and flat.abs().max() < 0.05  # eps keeps flat patches ~0


def test_random_grayscale_turns_the_drawn_patches_gray() -> None:
    x = torch.rand(4, 9, 3, 5, 5)
    assert torch.equal(random_grayscale(x, 0.0, generator=g(0)), x)
    out = random_grayscale(x, 0.5, generator=g(0))
    gray = (out[:, :, :1] == out).all(dim=(2, 3, 4))
    mask = torch.rand((4, 9), generator=g(0)) < 0.5  # the same draw, made here
    assert torch.equal(gray, mask)
    luma = 0.299 * x[:, :, 0] + 0.587 * x[:, :, 1] + 0.114 * x[:, :, 2]
    torch.testing.assert_close(out[:, :, 0][mask], luma[mask])
    assert torch.equal(out[~mask], x[~mask])


def test_channel_jitter_matches_a_per_patch_loop() -> None:
    x = torch.rand(2, 3, 3, 6, 7)
    out = channel_jitter(x, 2, generator=g(5))
    shifts = torch.randint(5, (2, 2, 3, 3, 1), generator=g(5)) - 2  # same draw, made here
    for b in range(2):
        for n in range(3):
            for c in range(3):
                dy, dx = int(shifts[0, b, n, c, 0]), int(shifts[1, b, n, c, 0])
                ref = torch.empty(6, 7)
                for y in range(6):
                    for xx in range(7):
                        ref[y, xx] = x[b, n, c, min(max(y - dy, 0), 5), min(max(xx - dx, 0), 6)]
                assert torch.equal(out[b, n, c], ref)
    assert not torch.equal(out, x)


def test_color_jitter_matches_torchvision_per_image() -> None:
    from torchvision.transforms.v2 import functional as TF

    from patchssl.pretext.defences import color_jitter

    x = 0.3 + 0.3 * torch.rand(5, 3, 6, 6)  # mid-range: no value is clipped on the way
    out = color_jitter(x, 0.4, generator=g(7))
    factors = 0.6 + 0.8 * torch.rand((5, 3), generator=g(7))  # the same draw, made here
    for i in range(5):
        b, c, s = factors[i].tolist()
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), s)
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=0)
    assert torch.equal(color_jitter(x, 0.0, generator=g(7)), x)
    gray = color_jitter(torch.rand(3, 1, 4, 4), 1.0, generator=g(8))  # one channel works
    assert gray.shape == (3, 1, 4, 4) and gray.min() >= 0 and gray.max() <= 1
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        color_jitter(x, 1.2)
    with pytest.raises(ValueError, match=r"flatten\(0, 1\)"):
        color_jitter(x[None], 0.4)  # (B, N, C, h, w) patches


def test_defences_colour_drop_only_in_training() -> None:
    defences = PatchDefences(color_drop="both", color_drop_prob=1.0)
    x = torch.randint(0, 256, (2, 4, 3, 6, 6), dtype=torch.uint8)
    trained = defences.train()(x, generator=g(0))
    assert (trained[:, :, :1] == trained).all()  # all gray
    evaluated = defences.eval()(x, generator=g(0))
    torch.testing.assert_close(evaluated, x.float() / 255)
    one_channel = torch.rand(1, 2, 1, 6, 6)
    assert torch.equal(defences.train()(one_channel, generator=g(0)), one_channel)


def test_per_patch_norm_reaches_the_encoder_normalised() -> None:
    tiler = PatchTiler(grid=3, patch_size=4, image_size=15)
    encoder = Recorder(in_chans=3)
    task = JigsawPretext(
        encoder, PermutationSet.generate(5, 9), tiler, defences=PatchDefences(per_patch_norm=True)
    ).eval()
    task(torch.rand(2, 3, 15, 15), generator=g(0))
    means = encoder.seen.mean(dim=(-2, -1))
    stds = encoder.seen.std(dim=(-2, -1), unbiased=False)
    torch.testing.assert_close(means, torch.zeros_like(means), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds, torch.ones_like(stds), atol=1e-3, rtol=0)


class PlainEncoder(nn.Module):
    """An encoder whose forward takes no ``normalized`` argument (any nn.Module will do)."""

    in_chans, patch_size, out_dim = 1, (4, 4), 1

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, patches: Tensor) -> Tensor:
        return patches.float().mean(dim=(-3, -2, -1))[..., None] * self.scale


@pytest.mark.parametrize("name", ["jigsaw", "rotation", "relative_position"])
def test_encoder_told_normalized_only_after_per_patch_norm(name: str) -> None:
    tiler = PatchTiler(grid=3, patch_size=4, image_size=15)
    kwargs: dict = {"hidden_dim": 4}
    if name == "jigsaw":
        kwargs["permutations"] = PermutationSet.generate(5, 9, seed=0)
    images = torch.randint(0, 256, (2, 1, 15, 15), dtype=torch.uint8)
    flags: list[bool] = []

    class Flagged(Recorder):
        def forward(self, patches: Tensor, *, normalized: bool = False) -> Tensor:
            flags.append(normalized)
            return super().forward(patches)

    task = create_pretext(
        name, encoder=Flagged(), tiler=tiler, defences=PatchDefences(per_patch_norm=True), **kwargs
    )
    task(images, generator=g(0))
    assert flags == [True]
    # Without per-patch normalisation the encoder is called plainly.
    task = create_pretext(
        name, encoder=PlainEncoder(), tiler=tiler, defences=PatchDefences(), **kwargs
    )
    assert torch.isfinite(task(images, generator=g(0)).loss)


# --------------------------------------------------------------------------- rotation
def test_rotate_quarter_turns_matches_rot90() -> None:
    x = torch.randint(0, 256, (6, 2, 3, 5, 5), dtype=torch.uint8)
    turns = torch.tensor([0, 1, 2, 3, 1, 3])
    out = rotate_quarter_turns(x, turns)
    for b in range(6):
        assert torch.equal(out[b], torch.rot90(x[b], int(turns[b]), dims=(-2, -1)))
    with pytest.raises(ValueError, match="square"):
        rotate_quarter_turns(torch.zeros(1, 1, 1, 2, 3), torch.zeros(1, dtype=torch.long))


def test_rotation_target_is_the_rotation_applied(device: torch.device) -> None:
    tiler = PatchTiler(grid=2, patch_size=4, image_size=8, jitter=0)
    encoder = Recorder()
    task = RotationPretext(encoder, tiler=tiler, hidden_dim=4).to(device)
    images = torch.zeros(16, 1, 8, 8, dtype=torch.uint8, device=device)
    images[:, :, 0, 0] = images[:, :, 0, 4] = images[:, :, 4, 0] = images[:, :, 4, 4] = 255
    out = task(images, generator=g(0))
    seen = encoder.seen.cpu()  # (B, 4, 1, 4, 4): the marked corner moved by the rotation
    corner = {0: (0, 0), 1: (3, 0), 2: (3, 3), 3: (0, 3)}  # rot90 counter-clockwise
    for b in range(16):
        y, x = corner[int(out.targets[b])]
        assert (seen[b, :, 0, y, x] == 1).all() and seen[b, :, 0].sum() == 4
    assert len(set(out.targets.tolist())) == 4
    wide = Recorder()
    wide.patch_size = (4, 6)
    with pytest.raises(ValueError, match="square patches"):
        RotationPretext(wide, tiler=PatchTiler(grid=2, patch_size=(4, 6), image_size=14))


# --------------------------------------------------------------------------- relative position
def _check_pairs(task: RelativePositionPretext, pairs: Tensor, directions: Tensor) -> None:
    cols = task.tiler.grid[1]
    for (anchor, neighbour), d in zip(pairs.tolist(), directions.tolist()):
        dr, dc = DIRECTIONS[d]
        assert (neighbour // cols - anchor // cols, neighbour % cols - anchor % cols) == (dr, dc)


def test_relative_position_centre_anchor_on_3x3() -> None:
    task = RelativePositionPretext(tiny_encoder())
    assert task.anchors == "centre" and task.num_classes == 8
    pairs, directions = task.sample_pairs(400, generator=g(0))
    assert (pairs[:, 0] == 4).all()
    _check_pairs(task, pairs, directions)
    counts = torch.bincount(directions, minlength=8)
    assert counts.min() > 25  # balanced classes: 50 expected each


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (3, 5), (2, 3)])
def test_relative_position_all_anchors_on_other_grids(grid: tuple[int, int]) -> None:
    tiler = PatchTiler(grid=grid, patch_size=16, image_size=(grid[0] * 18, grid[1] * 18))
    task = RelativePositionPretext(tiny_encoder(), tiler=tiler, anchors="all")
    pairs, directions = task.sample_pairs(3000, generator=g(1))
    _check_pairs(task, pairs, directions)
    # Every valid (anchor, direction) pair is drawn: compare with an enumeration made here.
    rows, cols = grid
    expected = {
        (r * cols + c, d)
        for r in range(rows)
        for c in range(cols)
        for d, (dr, dc) in enumerate(DIRECTIONS)
        if 0 <= r + dr < rows and 0 <= c + dc < cols
    }
    assert set(zip(pairs[:, 0].tolist(), directions.tolist())) == expected
    assert torch.bincount(directions, minlength=8).min() > 250


def test_relative_position_target_matches_the_tiles_encoded(device: torch.device) -> None:
    tiler = PatchTiler(grid=3, patch_size=4, image_size=15)
    encoder = Recorder()
    task = RelativePositionPretext(
        encoder, tiler=tiler, anchors="all", defences=PatchDefences()
    ).to(device)
    out = task(tile_index_images(tiler, 32).to(device), generator=g(2))
    seen = (encoder.seen[:, :, 0, 0, 0] * 255).round().long().cpu()  # (B, 2) tile indices
    _check_pairs(task, seen, out.targets.cpu())


def test_relative_position_validation() -> None:
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="at least 2x2"):
        RelativePositionPretext(enc, tiler=PatchTiler(grid=(1, 3), patch_size=16, image_size=54))
    with pytest.raises(ValueError, match="use anchors='all'"):
        RelativePositionPretext(
            enc, tiler=PatchTiler(grid=2, patch_size=16, image_size=36), anchors="centre"
        )
    with pytest.raises(ValueError, match="anchors must be one of"):
        RelativePositionPretext(enc, anchors="corner")
    task = RelativePositionPretext(enc, tiler=PatchTiler(grid=4, patch_size=16, image_size=72))
    assert task.anchors == "all"


# --------------------------------------------------------------------------- defences argument
JIGSAW_DEFENCES = {
    "per_patch_norm": False,
    "color_drop": "grayscale",
    "color_drop_prob": 0.3,
    "channel_shift": 2,
}
RELATIVE_POSITION_DEFENCES = {**JIGSAW_DEFENCES, "per_patch_norm": True}
OFF_DEFENCES = {
    "per_patch_norm": False,
    "color_drop": None,
    "color_drop_prob": 0.3,
    "channel_shift": 2,
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("jigsaw", JIGSAW_DEFENCES),
        ("relative_position", RELATIVE_POSITION_DEFENCES),
        ("rotation", OFF_DEFENCES),
    ],
)
def test_each_task_keeps_its_default_defences(name: str, expected: dict) -> None:
    tiler = PatchTiler(grid=3, patch_size=4, image_size=15)
    kwargs: dict = {"hidden_dim": 4}
    if name == "jigsaw":
        kwargs["permutations"] = PermutationSet.generate(5, 9, seed=0)
    task = create_pretext(name, encoder=Recorder(), tiler=tiler, **kwargs)
    assert task.defences.config == expected
    assert task.config["defences"] == expected
    assert task.model_config["input_norm"] == (
        "per_patch" if expected["per_patch_norm"] else "encoder"
    )
    # A given PatchDefences is used as is; a mapping replaces only the options it names.
    given = PatchDefences(color_drop="channel_jitter", channel_shift=1)
    assert (
        create_pretext(name, encoder=Recorder(), tiler=tiler, defences=given, **kwargs).defences
        is given
    )
    task = create_pretext(
        name, encoder=Recorder(), tiler=tiler, defences={"color_drop_prob": 0.9}, **kwargs
    )
    assert task.defences.config == {**expected, "color_drop_prob": 0.9}
    # The saved config rebuilds the same defences.
    rebuilt = type(task)(Recorder(), tiler=tiler, **task.config)
    assert rebuilt.defences.config == task.defences.config
    with pytest.raises(TypeError, match="PatchDefences, a mapping"):
        create_pretext(name, encoder=Recorder(), tiler=tiler, defences=True, **kwargs)
    with pytest.raises(ValueError, match=r"unknown patch defence option\(s\) \['gray'\]"):
        create_pretext(name, encoder=Recorder(), tiler=tiler, defences={"gray": 1}, **kwargs)
    with pytest.raises(TypeError, match="per_patch_norm"):  # the flat keyword is gone
        create_pretext(name, encoder=Recorder(), tiler=tiler, per_patch_norm=False, **kwargs)


def test_flat_defence_options_fold_onto_the_task_defaults() -> None:
    folded = JigsawPretext.fold_defence_options({"per_patch_norm": True, "hidden_dim": 8})
    assert folded["hidden_dim"] == 8 and "per_patch_norm" not in folded
    assert folded["defences"].config == {**JIGSAW_DEFENCES, "per_patch_norm": True}
    folded = RotationPretext.fold_defence_options(
        {"defences": {"color_drop": "both"}, "channel_shift": 3}
    )
    assert folded["defences"].config == {**OFF_DEFENCES, "color_drop": "both", "channel_shift": 3}
    assert JigsawPretext.fold_defence_options({"hidden_dim": 8}) == {"hidden_dim": 8}
    with pytest.raises(ValueError, match="either flat or in 'defences'"):
        JigsawPretext.fold_defence_options({"defences": PatchDefences(), "color_drop": None})


def test_old_checkpoint_with_flat_defence_options_rebuilds() -> None:
    from patchssl.classifier import checkpoint_input_norm

    tiler = PatchTiler(grid=3, patch_size=16, image_size=54)
    task = JigsawPretext(tiny_encoder(), PermutationSet.generate(5, 9, seed=0), tiler=tiler)
    model_config = task.model_config
    kwargs = dict(model_config["pretext_kwargs"])
    kwargs.update(kwargs.pop("defences"))  # the layout before tasks took ``defences``
    kwargs["per_patch_norm"] = True  # patchssl 0.1.0's default: a checkpoint keeps its own
    kwargs["color_drop"] = "channel_jitter"
    del model_config["input_norm"]  # older still: no recorded input_norm either
    old = {**model_config, "pretext_kwargs": kwargs}
    rebuilt = pretext_from_config(old, encoder=tiny_encoder())
    assert rebuilt.defences.config == {
        **JIGSAW_DEFENCES,
        "per_patch_norm": True,
        "color_drop": "channel_jitter",
    }
    rebuilt.load_state_dict(task.state_dict())
    assert rebuilt.model_config["input_norm"] == "per_patch"
    assert checkpoint_input_norm(old) == "per_patch"
    assert checkpoint_input_norm(
        {**old, "pretext_kwargs": {**kwargs, "per_patch_norm": False}}
    ) == ("encoder")
    new = {key: value for key, value in task.model_config.items() if key != "input_norm"}
    assert checkpoint_input_norm(new) == "encoder"  # the nested defences mapping
    on = JigsawPretext(
        tiny_encoder(), task.permutation_set, tiler=tiler, defences={"per_patch_norm": True}
    ).model_config
    on.pop("input_norm")
    assert checkpoint_input_norm(on) == "per_patch"


def test_engine_reads_flat_and_nested_defence_options() -> None:
    from patchssl.engine.config import Config, ConfigError
    from patchssl.engine.pretraining import build_pretext
    from patchssl.engine.probing import _pretext_input_norm

    config = Config()
    config.model.backbone, config.model.patch_size = "test_resnet", 32
    config.pretext.options = {"num_permutations": 5, "per_patch_norm": True}
    task = build_pretext(config, torch.device("cpu"))
    assert task.defences.config == {**JIGSAW_DEFENCES, "per_patch_norm": True}
    assert task.model_config["input_norm"] == "per_patch" == _pretext_input_norm(config)
    config.pretext.options = {"num_permutations": 5, "defences": {"color_drop": None}}
    task = build_pretext(config, torch.device("cpu"))
    assert task.defences.config == {**JIGSAW_DEFENCES, "color_drop": None}
    assert _pretext_input_norm(config) == "encoder"
    config.pretext.options = {"num_permutations": 5, "defences": {"per_patch_norm": True}}
    assert _pretext_input_norm(config) == "per_patch"
    config.pretext.name = "rotation"
    config.pretext.options = {}
    assert _pretext_input_norm(config) == "encoder"
    config.pretext.name = "jigsaw"
    for options in ({"defences": {"gray": 1}}, {"defences": {"gray": 1}, "per_patch_norm": True}):
        config.pretext.options = {"num_permutations": 5, **options}
        with pytest.raises(
            ConfigError, match=r"pretext.*unknown patch defence option\(s\) \['gray'\]"
        ):
            build_pretext(config, torch.device("cpu"))


def test_resume_accepts_a_checkpoint_with_flat_defence_options() -> None:
    from patchssl.engine.checkpointing import check_compatible
    from patchssl.engine.config import ConfigError

    tiler = PatchTiler(grid=3, patch_size=16, image_size=54)
    task = JigsawPretext(tiny_encoder(), PermutationSet.generate(5, 9, seed=0), tiler=tiler)
    kwargs = dict(task.model_config["pretext_kwargs"])
    kwargs.update(kwargs.pop("defences"))  # the layout before tasks took ``defences``
    old = {"kind": "pretrain", "model_config": {**task.model_config, "pretext_kwargs": kwargs}}
    check_compatible(old, kind="pretrain", model_config=task.model_config, fingerprint=None)
    kwargs["per_patch_norm"] = True  # a checkpoint of another recipe is still refused
    with pytest.raises(ConfigError, match=r"pretext_kwargs\.defences\.per_patch_norm"):
        check_compatible(old, kind="pretrain", model_config=task.model_config, fingerprint=None)
