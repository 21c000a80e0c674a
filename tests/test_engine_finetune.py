"""Fine-tuning, evaluation and explanation runs on tiny synthetic data."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from patchssl.checkpoint import load_checkpoint
from patchssl.data import read_manifest, save_split
from patchssl.engine import Config, ConfigError, evaluate, explain, finetune, pretrain
from patchssl.engine.data import find_eval_overlap, unlabeled_dataset
from patchssl.engine.testing import make_tiny_dataset, tiny_config
from patchssl.metrics import binary_metrics, choose_threshold


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), num_unlabeled=12, num_patients=16)


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    return pretrain(tiny_config(data, tmp_path_factory.mktemp("pre"), epochs=1))


@pytest.fixture(scope="module")
def finetuned(data, pretrained, tmp_path_factory):
    config = tiny_config(data, tmp_path_factory.mktemp("ft"))
    config.model.init = str(pretrained.best_checkpoint)
    return finetune(config)


def _patients(data) -> dict[str, str]:
    records = read_manifest(data.manifest, label_map="cervix")
    return {str(r.path): r.patient for r in records}


def test_finetune_from_pretraining_writes_a_classifier(finetuned):
    out = finetuned.out_dir
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["kind"] == "finetune" and "classifier" in ckpt["model_config"]
    assert ckpt["permutations_fingerprint"]  # provenance of the pretraining
    transfer = json.loads((out / "transfer.json").read_text())
    assert transfer["loaded"] > 0 and transfer["pretext"] == "jigsaw"
    assert [r["epoch"] for r in finetuned.history] == [1, 2]
    assert {"val_loss", "val_acc", "val_auc"} <= set(finetuned.history[0])


def test_finetuning_records_and_trains_at_its_default_learning_rate(finetuned):
    import yaml

    saved = yaml.safe_load((finetuned.out_dir / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3  # train.lr left at None: fine-tuning's default
    ckpt = load_checkpoint(finetuned.out_dir / "last.pt")
    assert ckpt["scheduler"]["base_lrs"] == [1e-3, 1e-3]


def test_split_is_grouped_by_patient_and_saved(data, finetuned):
    parts = json.loads((finetuned.out_dir / "split.json").read_text())["parts"]
    assert set(parts) == {"train", "val", "test"}
    patient = _patients(data)
    sides = {name: {patient[p] for p in paths} for name, paths in parts.items()}
    assert not sides["train"] & sides["test"]
    assert not sides["train"] & sides["val"]
    assert not sides["val"] & sides["test"]
    assert sum(len(v) for v in parts.values()) == len(patient)


def test_saved_split_is_reused(data, finetuned, tmp_path):
    config = tiny_config(data, tmp_path, epochs=1)
    config.data.split = str(finetuned.out_dir / "split.json")
    finetune(config)
    old = json.loads((finetuned.out_dir / "split.json").read_text())["parts"]
    new = json.loads((tmp_path / "split.json").read_text())["parts"]
    assert old == new


def test_split_with_patient_leakage_is_refused(data, finetuned, tmp_path):
    parts = json.loads((finetuned.out_dir / "split.json").read_text())["parts"]
    leaked = dict(parts)
    patient = _patients(data)
    victim = parts["test"][0]
    sibling = next(p for p in patient if patient[p] == patient[victim] and p != victim)
    leaked["test"] = [p for p in parts["test"] if p != sibling]
    leaked["train"] = [*[p for p in parts["train"] if p != sibling], sibling]
    save_split(tmp_path / "leaky.json", leaked)
    config = tiny_config(data, tmp_path / "run", epochs=1)
    config.data.split = str(tmp_path / "leaky.json")
    with pytest.raises(ConfigError, match="patient leakage"):
        finetune(config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backbone": "test_efficientnet"}, "backbone"),
        ({"num_permutations": 10}, "permutation set"),
        ({"patch_size": 30}, "patch_size"),
    ],
)
def test_finetune_refuses_a_mismatched_checkpoint(data, pretrained, tmp_path, change, message):
    config = tiny_config(data, tmp_path, epochs=1)
    config.model.init = str(pretrained.best_checkpoint)
    if "backbone" in change:
        config.model.backbone = change["backbone"]
    if "num_permutations" in change:
        config.pretext.options = {"num_permutations": change["num_permutations"]}
    if "patch_size" in change:
        config.model.patch_size = change["patch_size"]
    with pytest.raises(ConfigError, match=message):
        finetune(config)


def test_finetune_refuses_a_finetune_checkpoint_as_init(data, finetuned, tmp_path):
    config = tiny_config(data, tmp_path, epochs=1)
    config.model.init = str(finetuned.best_checkpoint)
    with pytest.raises(ConfigError, match="pretrain"):
        finetune(config)


def test_unknown_labels_are_refused_and_listed(data, tmp_path):
    rows = data.manifest.read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("label")
    broken = [rows[0]]
    for i, row in enumerate(rows[1:]):
        cells = row.split(",")
        if i < 2:
            cells[col] = "CIN9"
        broken.append(",".join(cells))
    manifest = data.root / "broken.csv"
    manifest.write_text("\n".join(broken) + "\n")
    config = tiny_config(data, tmp_path, epochs=1)
    config.data.manifest = str(manifest)
    with pytest.raises(ConfigError, match="CIN9"):
        finetune(config)


def test_scratch_finetune_without_attention(data, tmp_path):
    config = tiny_config(data, tmp_path, epochs=1)
    config.model.attention = "none"
    config.train.class_weights = "none"
    result = finetune(config)
    ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["model_config"]["classifier"]["attention"] is None
    assert ckpt["permutations_fingerprint"] is None
    assert not (tmp_path / "transfer.json").exists()


def _eval_config(out) -> Config:
    """Only the output folder: data, split and geometry come from the checkpoint's run."""
    config = Config()
    config.out = str(out)
    config.data.workers = 0
    config.train.progress = False
    config.eval.n_boot = 50
    config.explain.num_images = 2
    return config


def _read_predictions(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows])


def test_evaluate_chooses_the_threshold_on_validation(finetuned, tmp_path):
    config = _eval_config(tmp_path)
    config.eval.checkpoint = str(finetuned.best_checkpoint)
    result = evaluate(config)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "eval.md").read_text().count("|") > 10
    y_val, s_val = _read_predictions(tmp_path / "predictions_val.csv")
    y_test, s_test = _read_predictions(tmp_path / "predictions_test.csv")
    # slow reference: the threshold comes from the validation predictions only
    expected = choose_threshold(y_val, s_val, criterion="youden")
    assert report["threshold"] == pytest.approx(expected, abs=1e-6)
    assert 0 < y_test.sum() < len(y_test)  # the grouped split puts both classes in the test part
    ref = binary_metrics(y_test, s_test, report["threshold"])
    for key in ("accuracy", "specificity", "sensitivity"):
        assert report["test"]["metrics"][key] == pytest.approx(ref[key], abs=1e-6), key
    assert report["test"]["resampled_by"] == "patient"
    assert set(report["test"]["ci"]) >= {"accuracy", "specificity", "sensitivity", "precision"}
    assert result.test.counts["n"] == len(y_test)


def test_fixed_threshold_option(finetuned, tmp_path):
    config = _eval_config(tmp_path)
    config.eval.checkpoint = str(finetuned.best_checkpoint)
    config.eval.threshold = 0.25
    assert evaluate(config).threshold == 0.25


def test_explain_draws_overlays_and_embedding(finetuned, tmp_path):
    config = _eval_config(tmp_path)
    config.explain.checkpoint = str(finetuned.best_checkpoint)
    config.explain.split = "all"
    result = explain(config)
    assert len(result.overlays) == 2 and all(p.is_file() for p in result.overlays)
    assert result.grid.is_file() and result.embedding.is_file()
    assert result.lesion is not None and result.lesion["count"] > 0
    assert 0.0 <= result.lesion["hit_rate"] <= 1.0
    saved = json.loads(result.json_path.read_text())
    assert saved["lesion_localisation"]["count"] == result.lesion["count"]


def test_explain_without_matplotlib_skips_only_the_plot(finetuned, tmp_path, monkeypatch, capsys):
    from patchssl import _optional

    available = _optional.is_available
    monkeypatch.setattr(_optional, "is_available", lambda m: m != "matplotlib" and available(m))
    config = _eval_config(tmp_path)
    config.explain.checkpoint = str(finetuned.best_checkpoint)
    result = explain(config)
    assert result.embedding is None and "matplotlib is missing" in capsys.readouterr().out
    assert result.overlays and all(p.is_file() for p in result.overlays)
    assert json.loads(result.json_path.read_text())["embedding"] is None


def test_overlap_between_pretraining_and_labeled_images(data, tmp_path, capsys):
    folder = tmp_path / "unlabeled"
    shutil.copytree(data.unlabeled_dir, folder)
    labeled = sorted(data.labeled_dir.glob("*.png"))[:2]
    for path in labeled:
        shutil.copy(path, folder / f"copy_{path.name}")
    config = tiny_config(data, tmp_path / "run")
    config.data.unlabeled = str(folder)
    overlaps = find_eval_overlap(config)
    assert {o.labeled.name for o in overlaps} == {p.name for p in labeled}
    assert "warning" in capsys.readouterr().err
    assert (tmp_path / "run" / "overlap.json").is_file()
    before = len(unlabeled_dataset(config))
    after = len(unlabeled_dataset(config, exclude=[o.pretrain for o in overlaps]))
    assert before - after == 2


def test_a_refused_pretraining_writes_no_overlap_list(data, tmp_path):
    # The overlap check runs before the run's last checks; its list is written only once the
    # run may write, so a refused run leaves the folder as it was.
    folder = tmp_path / "unlabeled"
    shutil.copytree(data.unlabeled_dir, folder)
    labeled = sorted(data.labeled_dir.glob("*.png"))[0]
    shutil.copy(labeled, folder / f"copy_{labeled.name}")
    config = tiny_config(data, tmp_path / "run", epochs=1)
    config.data.unlabeled = str(folder)
    config.pretext.name = "jigsw"  # refused when the task is built, after the overlap check
    with pytest.raises(ConfigError, match="unknown pretext"):
        pretrain(config)
    assert not (tmp_path / "run" / "overlap.json").exists()
    config.pretext.name = "jigsaw"
    pretrain(config)
    assert (tmp_path / "run" / "overlap.json").is_file()


def test_frozen_encoder_warmup_and_slower_encoder(data, pretrained, tmp_path):
    import torch

    from patchssl.checkpoint import load_checkpoint as load

    init = load(pretrained.best_checkpoint)["model"]
    enc_init = {k[len("encoder.") :]: v for k, v in init.items() if k.startswith("encoder.")}
    config = tiny_config(data, tmp_path, epochs=1)
    config.model.init = str(pretrained.best_checkpoint)
    config.train.freeze_encoder_epochs = 1
    config.train.encoder_lr_scale = 0.1
    result = finetune(config)
    state = load(result.last_checkpoint)["model"]
    moved = [k for k, v in enc_init.items() if v.is_floating_point() and "running" not in k]
    assert moved
    for key in moved:  # one frozen epoch: no encoder weight moved
        assert torch.equal(state[f"encoder.{key}"], enc_init[key]), key
    groups = load(result.last_checkpoint)["optimizer"]["param_groups"]
    lrs = {g["initial_lr"] for g in groups}  # the peak rates (the cosine ends at 0)
    assert len(lrs) == 2 and min(lrs) == pytest.approx(0.1 * max(lrs))


def test_layer_wise_decay_rates(data, pretrained, tmp_path):
    import torch

    from patchssl.engine.finetuning import _encoder_layer_ids

    config = tiny_config(data, tmp_path, epochs=1)
    config.model.init = str(pretrained.best_checkpoint)
    config.train.encoder_lr_scale = 0.5
    config.train.encoder_layer_decay = 0.5
    result = finetune(config)
    ckpt = load_checkpoint(result.last_checkpoint)
    groups = ckpt["optimizer"]["param_groups"]
    peak = max(g["initial_lr"] for g in groups)  # the new layers' rate
    from patchssl.engine.finetuning import build_classifier  # the same model, to count layers

    model, _, _ = build_classifier(config, torch.device("cpu"))
    _, num_layers = _encoder_layer_ids(model.encoder)
    assert num_layers >= 3
    want = {peak} | {peak * 0.5 * 0.5**k for k in range(1, num_layers + 1)}
    got = {g["initial_lr"] for g in groups}
    assert sorted(got) == pytest.approx(sorted(want))
    # every parameter is in one group, the same number as the model holds
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_encoder_layer_ids_follow_timm_blocks():
    from torch import nn

    from patchssl import SharedPatchEncoder
    from patchssl.engine.finetuning import _encoder_layer_ids

    encoder = SharedPatchEncoder("resnet18")
    ids, num_layers = _encoder_layer_ids(encoder)
    backbone = encoder.backbone
    assert num_layers == 9  # the stem and 8 basic blocks
    assert ids[id(backbone.conv1.weight)] == 0
    assert ids[id(backbone.layer1[0].conv1.weight)] == 1
    assert ids[id(backbone.layer4[1].conv2.weight)] == 8
    assert len(ids) == len(list(encoder.parameters()))
    # a module without timm's group_matcher: its top-level children in order
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ids, num_layers = _encoder_layer_ids(plain)
    assert num_layers == 2
    assert ids[id(plain[0].weight)] == 0 and ids[id(plain[2].bias)] == 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("encoder_lr_scale", 0.0, "encoder_lr_scale must be in"),
        ("encoder_lr_scale", 2.0, "encoder_lr_scale must be in"),
        ("encoder_layer_decay", 0.0, "encoder_layer_decay must be in"),
        ("encoder_layer_decay", 1.5, "encoder_layer_decay must be in"),
        ("freeze_encoder_epochs", -1, "freeze_encoder_epochs must be an integer"),
    ],
)
def test_bad_schedule_options(data, tmp_path, key, value, message):
    config = tiny_config(data, tmp_path, epochs=1)
    setattr(config.train, key, value)
    with pytest.raises(ConfigError, match=message):
        finetune(config)


@pytest.mark.parametrize(
    ("key", "value", "attribute", "bad", "invalid", "message"),
    [
        ("attention_temperature", 0.5, "temperature", "warm", 0.0, "attention_temperature"),
        (
            "attention_entropy",
            0.2,
            "entropy_weight",
            "strong",
            -0.1,
            "attention_entropy must be a finite number >= 0",
        ),
    ],
)
def test_model_attention_options_reach_the_classifier(
    data, pretrained, tmp_path, key, value, attribute, bad, invalid, message
):
    import torch

    from patchssl.engine.config import apply_overrides
    from patchssl.engine.finetuning import build_classifier

    config = apply_overrides(tiny_config(data, tmp_path), [f"model.{key}={value}"])
    scratch, _, _ = build_classifier(config, torch.device("cpu"))
    assert getattr(scratch.attention, attribute) == value
    config.model.init = str(pretrained.best_checkpoint)
    transferred, _, _ = build_classifier(config, torch.device("cpu"))
    assert getattr(transferred.attention, attribute) == value
    with pytest.raises(ConfigError):
        apply_overrides(config, [f"model.{key}={bad}"])
    setattr(config.model, key, invalid)
    with pytest.raises((ConfigError, ValueError), match=message):
        build_classifier(config, torch.device("cpu"))


def _mean_weight_entropy(checkpoint, data) -> float:
    import torch

    from patchssl.attention import weight_entropy
    from patchssl.data import load_image
    from patchssl.engine.evaluation import load_classifier

    model, _ = load_classifier(checkpoint, torch.device("cpu"))
    records = read_manifest(data.manifest, label_map="cervix")
    images = torch.stack([load_image(r.path, 96) for r in records])
    with torch.no_grad():
        weights = model.eval().forward_with_attention(images).weights
    return float(weight_entropy(weights).mean())


def test_attention_entropy_penalty_sharpens_the_weights(data, tmp_path):
    entropies = {}
    for lam in (0.0, 10.0):
        config = tiny_config(data, tmp_path / str(lam), epochs=3)
        config.model.attention_entropy = lam
        # near-uniform weights are where the entropy is flattest (zero gradient at the
        # maximum): a few steps need a larger step size to move away from it (not so large
        # that the gate saturates at 1 everywhere, which is flat again)
        config.train.lr = 0.01
        result = finetune(config)
        ckpt = load_checkpoint(result.last_checkpoint)
        assert ckpt["model_config"]["classifier"]["attention_entropy"] == lam  # rebuilds
        entropies[lam] = _mean_weight_entropy(result.last_checkpoint, data)
    assert entropies[10.0] < entropies[0.0] - 0.1, entropies
