from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from patchssl.engine.checkpointing import check_compatible, config_differences
from patchssl.engine.config import (
    DEFAULT_LR,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    merge_dicts,
    resolve_lr,
    save_config,
)
from patchssl.engine.device import resolve_amp, resolve_compile, resolve_device
from patchssl.engine.finetuning import class_weights, random_flips
from patchssl.engine.loop import build_optimizer, build_scheduler
from patchssl.engine.seeding import capture_rng_state, derive_seed, restore_rng_state


def test_yaml_and_json_files_load_with_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "out: runs/x\ntrain: {epochs: 3, lr: 0.01}\nmodel:\n  backbone: resnet18\n"
    )
    (tmp_path / "a.json").write_text(
        json.dumps({"train": {"epochs": 4}, "data": {"image_size": 64}})
    )
    c = load_config(tmp_path / "a.yaml", ["train.epochs=5", "pretext.options.num_permutations=64"])
    assert (c.out, c.train.epochs, c.train.lr, c.model.backbone) == ("runs/x", 5, 0.01, "resnet18")
    assert c.pretext.options == {"num_permutations": 64}
    j = load_config(tmp_path / "a.json")
    assert (j.train.epochs, j.data.image_size) == (4, 64)


def test_save_config_round_trip(tmp_path):
    c = apply_overrides(Config(), ["train.epochs=7", "data.label_map={CIN0: 0, CIN3: 1}"])
    for name in ("c.yaml", "c.json"):
        save_config(c, tmp_path / name)
        assert load_config(tmp_path / name) == c


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "Did you mean 'epochs'"),
        ("trian.epochs=3", "Did you mean 'train'"),
        ("train.epochs=three", "expected an integer"),
        ("train.progress=maybe", "expected true or false"),
        ("train.lr=[1]", "expected a number"),
        ("noequals", "section.key=value"),
    ],
)
def test_bad_overrides_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


def test_unknown_key_in_file_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: {backbone: resnet18, atention: sigmoid}\n")
    with pytest.raises(ConfigError, match="model.atention.*Did you mean 'attention'"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_values_are_coerced_sensibly():
    c = apply_overrides(Config(), ["train.lr=1", "eval.threshold=0.3", "train.resume=true"])
    assert isinstance(c.train.lr, float) and c.train.lr == 1.0
    assert c.eval.threshold == 0.3 and c.train.resume is True
    c = apply_overrides(c, ["eval.threshold=f1", "model.gap=null"])
    assert c.eval.threshold == "f1" and c.model.gap is None


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("3E-4", 3e-4), ("+2e1", 20.0)])
def test_exponent_numbers_without_a_dot_are_numbers(text, value):
    # YAML 1.1 reads these as text; a user typing train.lr=1e-3 means the number
    c = apply_overrides(Config(), [f"train.lr={text}", f"train.grad_clip={text}"])
    assert isinstance(c.train.lr, float) and c.train.lr == value
    assert c.train.grad_clip == value
    with pytest.raises(ConfigError, match="train.lr must be > 0"):  # a number, out of range
        apply_overrides(Config(), ["train.lr=-1e-3"])


@pytest.mark.parametrize("text", ["1e", "e-3", "1e-3x", "one"])
def test_text_that_is_not_a_number_is_still_refused(text):
    with pytest.raises(ConfigError, match="train.lr"):
        apply_overrides(Config(), [f"train.lr={text}"])


def test_the_learning_rate_defaults_to_each_commands_own():
    config = Config()
    assert config.train.lr is None
    assert resolve_lr(config, "pretrain").train.lr == DEFAULT_LR["pretrain"] == 3e-3
    assert resolve_lr(config, "finetune").train.lr == DEFAULT_LR["finetune"] == 1e-3
    assert config.train.lr is None  # not changed in place
    chosen = apply_overrides(Config(), ["train.lr=1e-4"])
    assert resolve_lr(chosen, "pretrain") is chosen and chosen.train.lr == 1e-4
    with pytest.raises(ValueError, match="pretrain"):
        resolve_lr(config, "evaluate")


def test_an_optimizer_built_without_a_learning_rate_says_how_to_give_one():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="resolve_lr"):
        build_optimizer(model, Config().train)
    optimizer = build_optimizer(model, resolve_lr(Config(), "finetune").train)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]


def test_merge_dicts_merges_sections_and_replaces_options():
    base = {"train": {"epochs": 1, "lr": 0.1}, "pretext": {"options": {"a": 1}}}
    merged = merge_dicts(base, {"train": {"epochs": 2}, "pretext": {"options": {"b": 2}}})
    assert merged == {"train": {"epochs": 2, "lr": 0.1}, "pretext": {"options": {"b": 2}}}


def test_warmup_cosine_schedule_matches_reference():
    c = Config()
    c.train.epochs, c.train.lr, c.train.min_lr, c.train.warmup_epochs = 4, 0.1, 0.01, 1.0
    steps = 5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=c.train.lr)
    sched = build_scheduler(opt, c.train, steps)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    # Reference: torch's own warmup-then-cosine composition on a second optimizer.
    warm, total = 5, 20
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=c.train.lr)
    lr_mod = torch.optim.lr_scheduler
    ref = lr_mod.SequentialLR(
        ref_opt,
        [
            lr_mod.LinearLR(ref_opt, start_factor=1 / warm, total_iters=warm - 1),
            lr_mod.CosineAnnealingLR(ref_opt, T_max=total - warm, eta_min=c.train.min_lr),
        ],
        milestones=[warm],
    )
    expected = []
    for _ in range(20):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert seen == pytest.approx(expected)

    # Built anew at a step (a resume whose steps per epoch changed), it continues the same
    # rates through the public API.
    again = build_scheduler(opt, c.train, steps, step=12)
    assert again.get_last_lr()[0] == pytest.approx(expected[12])
    assert opt.param_groups[0]["lr"] == pytest.approx(expected[12])


def test_inverse_frequency_class_weights():
    labels = np.array([0, 0, 0, 1])
    w = class_weights(labels, 2)
    # reference: n / (K * n_c)
    assert w.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    assert class_weights(np.array([0, 1]), 2).tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match="labels must lie"):
        class_weights(np.array([0, 2]), 2)


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = capture_rng_state({"data": gen})
    expected = (torch.rand(3), random.random(), torch.rand(2, generator=gen))
    torch.rand(7)
    random.random()
    torch.rand(4, generator=gen)
    restore_rng_state(state, {"data": gen})
    again = (torch.rand(3), random.random(), torch.rand(2, generator=gen))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert torch.equal(expected[2], again[2])
    assert derive_seed(0, "a") == derive_seed(0, "a") != derive_seed(0, "b")


def test_amp_and_device_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == (None, None)
    dtype, note = resolve_amp("bf16", cpu)
    assert dtype is None and "GPU only" in note
    with pytest.raises(ConfigError, match="train.amp"):
        resolve_amp("fp8", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_random_flips_match_reference():
    images = torch.arange(2 * 1 * 3 * 3).reshape(2, 1, 3, 3)
    gen = torch.Generator().manual_seed(0)
    out = random_flips(images, gen)
    draws = torch.rand((2, 2), generator=torch.Generator().manual_seed(0)) < 0.5
    for i in range(2):
        ref = images[i]
        if draws[i, 0]:
            ref = ref.flip(-1)
        if draws[i, 1]:
            ref = ref.flip(-2)
        assert torch.equal(out[i], ref)


def test_checkpoint_compatibility_lists_every_difference():
    saved = {
        "kind": "pretrain",
        "permutations_fingerprint": "aaaa",
        "model_config": {
            "pretext": "jigsaw",
            "encoder": {"backbone": "resnet18", "channels_last": False},
            "tiler": {"grid": [3, 3], "patch_size": [32, 32]},
        },
    }
    same = {
        "pretext": "jigsaw",
        "encoder": {"backbone": "resnet18", "channels_last": True},
        "tiler": {"grid": (3, 3), "patch_size": [32, 32]},
    }
    check_compatible(saved, kind="pretrain", model_config=same, fingerprint="aaaa")
    other = {**same, "pretext": "rotation", "encoder": {"backbone": "resnet34"}}
    with pytest.raises(ConfigError) as err:
        check_compatible(saved, kind="pretrain", model_config=other, fingerprint="bbbb")
    text = str(err.value)
    assert "permutation set" in text and "resnet34" in text and "rotation" in text
    assert config_differences({"a": [1, 2]}, {"a": (1, 2)}) == []
    assert config_differences({"a": [[3, 3]]}, {"a": ((3, 3),)}) == []


def test_resume_check_shares_the_transfer_check_of_the_permutation_set():
    """The resume check names the file and words the permutation mismatch like a transfer."""
    from patchssl.checkpoint import CheckpointError
    from patchssl.checkpoint import check_compatible as check_transfer

    saved = {"kind": "pretrain", "permutations_fingerprint": "aaaa", "model_config": {}}
    with pytest.raises(CheckpointError) as transfer:
        check_transfer(saved, source="run/last.pt", permutations_fingerprint="bbbb")
    with pytest.raises(ConfigError) as resume:
        check_compatible(
            saved, kind="pretrain", model_config={}, fingerprint="bbbb", source="run/last.pt"
        )
    text = str(resume.value)
    assert text.startswith("cannot resume run/last.pt: it does not match this run")
    assert str(transfer.value) in text
    assert "drop --resume" in text
    # the permutation set is not compared when either side has none
    check_compatible(saved, kind="pretrain", model_config={}, fingerprint=None)
    unknown = {**saved, "permutations_fingerprint": None}
    check_compatible(unknown, kind=None, model_config={}, fingerprint="bbbb")


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (False, None),
        ("false", None),
        ("none", None),
        (True, "default"),
        ("true", "default"),
        ("reduce-overhead", "reduce-overhead"),
        ("Max-Autotune", "max-autotune"),
    ],
)
def test_compile_setting(value, mode):
    assert resolve_compile(value) == mode


def test_unknown_compile_mode_says_what_is_accepted():
    with pytest.raises(
        ConfigError, match="train.compile must be true, false or a torch.compile mode"
    ):
        resolve_compile("fastest")


def test_model_pretrained_file_reaches_the_encoder(tmp_path):
    import timm

    from patchssl.engine.common import build_encoder

    torch.manual_seed(7)
    path = tmp_path / "weights.pth"
    source = timm.create_model("test_resnet")
    torch.save(source.state_dict(), path)
    config = load_config(
        None,
        ["model.backbone=test_resnet", "model.patch_size=32", f"model.pretrained={path}"],
    )
    assert config.model.pretrained == str(path)
    encoder = build_encoder(config, torch.device("cpu"))
    torch.testing.assert_close(encoder.backbone.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(ConfigError, match="expected true or false or a string"):
        load_config(None, ["model.pretrained=3"])
