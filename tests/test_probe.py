"""Frozen-feature probes: numbers equal scikit-learn's, patient-grouped splits, CLI and pretrain."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from patchssl.checkpoint import load_checkpoint
from patchssl.cli import main
from patchssl.data import grouped_stratified_split
from patchssl.encoder import SharedPatchEncoder
from patchssl.engine.config import Config
from patchssl.engine.testing import make_tiny_dataset
from patchssl.pretext.base import standardize_patches
from patchssl.probe import (
    compare_probes,
    embed_images,
    encoder_from_checkpoint,
    knn_predict_proba,
    pool_patch_features,
    position_probe,
    probe_encoder,
    probe_features,
)
from patchssl.tiling import PatchTiler

TINY = [
    "--image-size",
    "96",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--no-progress",
    "--threads",
    "1",
]
GEOMETRY = ["--backbone", "test_resnet", "--patch-size", "32"]


def _sklearn_knn(k: int, temperature: float) -> KNeighborsClassifier:
    # exp(cos_sim / T) = exp(1 / T) * exp(-cos_dist / T): the same vote once normalised
    return KNeighborsClassifier(
        n_neighbors=k,
        metric="cosine",
        algorithm="brute",
        weights=lambda d: np.exp(-d / temperature),
    )


def _features(seed: int = 0, m: int = 48, n: int = 4, d: int = 6):
    """Features with some class signal, labels, and two images per patient."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(m // 2), 2)
    labels = (patients % 2).astype(np.int64)  # a patient's images share its label
    feats = rng.normal(size=(m, n, d)).astype(np.float32)
    feats[:, :, 0] += 1.5 * labels[:, None]
    return feats, labels, [f"P{p:03d}" for p in patients]


# ----------------------------------------------------------------------------------- kNN
def test_knn_equals_sklearn_weighted_cosine_knn():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(40, 7)), rng.normal(size=(15, 7))
    y = rng.integers(0, 2, 40)
    ours = knn_predict_proba(train, y, test, k=9, temperature=0.07)
    theirs = _sklearn_knn(9, 0.07).fit(train, y).predict_proba(test)
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
    # k beyond the training set: every training vector votes
    everyone = knn_predict_proba(train[:5], y[:5], test, k=20)
    np.testing.assert_allclose(
        everyone, _sklearn_knn(5, 0.07).fit(train[:5], y[:5]).predict_proba(test)
    )


def test_knn_refuses_bad_arguments():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="k must be"):
        knn_predict_proba(x, [0, 1, 0], x, k=0)
    with pytest.raises(ValueError, match="features must be"):
        knn_predict_proba(x, [0, 1, 0], np.zeros((3, 4)))


# ------------------------------------------------------------------------------ the probe
def test_probe_figures_equal_sklearn_fitted_directly_on_the_same_features():
    feats, labels, groups = _features()
    result = probe_features(feats, labels, groups, test_size=0.3, seed=3, n_boot=50)
    train, test = grouped_stratified_split(labels, groups, test_size=0.3, seed=3)
    np.testing.assert_array_equal(result.test_index, test)
    pooled = {
        "mean": feats.mean(axis=1),
        "max": feats.max(axis=1),
        "concat": feats.reshape(len(feats), -1),
    }
    assert set(pooled) == {p for _, p in result.scores}
    for pooling, x in pooled.items():
        models = {
            "linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            "knn": _sklearn_knn(20, 0.07),
        }
        for method, model in models.items():
            scores = model.fit(x[train], labels[train]).predict_proba(x[test])[:, 1]
            np.testing.assert_allclose(result.test_scores[(method, pooling)], scores, atol=1e-6)
            figures = result.scores[(method, pooling)]
            assert figures["auc"]["value"] == pytest.approx(roc_auc_score(labels[test], scores))
            accuracy = accuracy_score(labels[test], (scores >= 0.5).astype(int))
            assert figures["accuracy"]["value"] == pytest.approx(accuracy)
            lo, hi = figures["auc"]["ci"]
            assert lo <= figures["auc"]["value"] <= hi
    # the class signal is there: the mean-pooled linear probe finds it
    assert result.get("linear") > 0.8


def test_max_pooling_keeps_a_finding_on_one_patch_that_the_mean_dilutes():
    # positives differ from negatives on one patch of nine, at a random place
    rng = np.random.default_rng(0)
    m, n, d = 200, 9, 8
    feats = rng.normal(size=(m, n, d)).astype(np.float32)
    labels = np.arange(m) % 2
    where = rng.integers(n, size=m)
    feats[labels == 1, where[labels == 1], 0] += 4.0
    mean, top = pool_patch_features(feats, "mean"), pool_patch_features(feats, "max")
    assert mean.shape == top.shape == (m, d)
    assert pool_patch_features(feats, "concat").shape == (m, n * d)
    np.testing.assert_array_equal(top, feats.max(axis=1))
    result = probe_features(feats, labels, None, seed=0, n_boot=0, position=False)
    assert result.get("linear", "max") > result.get("linear", "mean") + 0.1
    with pytest.raises(ValueError, match="unknown pooling 'median'"):
        pool_patch_features(feats, "median")
    with pytest.raises(ValueError, match=r"shape \(M, N, D\)"):
        pool_patch_features(feats[0], "max")


@pytest.mark.parametrize("seed", range(5))
def test_the_split_never_puts_a_patient_on_both_sides(seed):
    feats, labels, groups = _features(seed)
    result = probe_features(feats, labels, groups, seed=seed, n_boot=0, position=False)
    test = set(result.test_index.tolist())
    train_patients = {groups[i] for i in range(len(groups)) if i not in test}
    assert train_patients.isdisjoint(result.test_groups)
    c = result.counts
    assert c["train_images"] + c["test_images"] == c["images"] == len(groups)
    assert c["train_patients"] + c["test_patients"] == c["patients"]


def test_a_given_split_with_a_shared_patient_is_refused():
    feats, labels, groups = _features()
    train, test = np.arange(0, 30), np.arange(29, 48)  # images 28 and 29 are one patient
    with pytest.raises(ValueError, match="both sides"):
        probe_features(feats, labels, groups, split=(train, test))


def test_labels_must_be_binary_with_both_classes():
    feats, _, groups = _features()
    with pytest.raises(ValueError, match="binary"):
        probe_features(feats, np.zeros(len(groups), dtype=int), groups)
    with pytest.raises(ValueError, match="binary"):
        probe_features(feats, np.arange(len(groups)) % 3, groups)


def test_position_probe_reads_encoded_positions_and_not_noise():
    rng = np.random.default_rng(0)
    m, n, d = 40, 9, 12
    groups = np.repeat(np.arange(20), 2)
    train, test = np.arange(0, 28), np.arange(28, 40)
    noise = rng.normal(size=(m, n, d))
    encoded = noise.copy()
    encoded[:, np.arange(n), np.arange(n)] += 5.0  # feature j lights up at position j
    readable = position_probe(encoded, train, test, groups=groups, n_boot=100)
    blind = position_probe(noise, train, test, groups=groups, n_boot=100)
    assert readable["chance"] == pytest.approx(1 / 9) and readable["num_positions"] == 9
    assert readable["accuracy"]["value"] > 0.95
    assert blind["accuracy"]["value"] < 0.35
    assert readable["test_patches"] == len(test) * n
    lo, hi = blind["accuracy"]["ci"]
    assert lo <= blind["accuracy"]["value"] <= hi


def test_comparing_a_probe_with_itself_gives_zero():
    feats, labels, groups = _features()
    a = probe_features(feats, labels, groups, n_boot=0, position=False)
    diff = compare_probes(a, a, n_boot=100)
    assert diff.value == 0.0 and tuple(diff.ci) == (0.0, 0.0)
    assert diff.verdict == "no difference detectable at this size"
    other = next(
        r
        for seed in range(1, 20)
        if not np.array_equal(
            (
                r := probe_features(feats, labels, groups, seed=seed, n_boot=0, position=False)
            ).test_index,
            a.test_index,
        )
    )
    with pytest.raises(ValueError, match="different images"):
        compare_probes(a, other)


# ------------------------------------------------------------------------------ embedding
@pytest.mark.parametrize("norm", ["per_patch", "encoder"])
def test_embedding_uses_eval_tiling_and_the_chosen_normalisation(norm):
    torch.manual_seed(0)
    encoder = SharedPatchEncoder("test_resnet", patch_size=32)
    tiler = PatchTiler(grid=3, patch_size=32, image_size=108)  # 4 px of jitter room
    images = torch.randint(0, 256, (6, 3, 108, 108), dtype=torch.uint8)
    encoder.train()
    tiler.train()  # must not jitter, and must come back in training mode
    emb = embed_images(encoder, images, tiler=tiler, input_norm=norm, batch_size=4)
    assert encoder.training and tiler.training
    encoder.eval()
    with torch.no_grad():
        patches = tiler(images, jitter=False).patches
        if norm == "per_patch":
            expected = encoder(standardize_patches(patches.float() / 255.0), normalized=True)
        else:
            expected = encoder(patches)
    assert emb.features.shape == (6, 9, encoder.out_dim)
    np.testing.assert_allclose(emb.features, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(emb.indices, np.arange(6))


def test_probe_encoder_on_tensors_needs_a_tiler_for_a_bare_encoder():
    encoder = SharedPatchEncoder("test_resnet", patch_size=32)
    images = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)
    with pytest.raises(ValueError, match="tiler"):
        probe_encoder(encoder, images, [0, 1, 0, 1], ["a", "b", "c", "d"])


# ------------------------------------------------------------------- engine and command line
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), num_unlabeled=12, num_patients=16)


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A 3-epoch pretraining that probes the labeled images every 2 epochs."""
    out = tmp_path_factory.mktemp("pretrain")
    args = ["pretrain", "--data", str(data.unlabeled_dir), "--out", str(out), "--epochs", "3"]
    args += ["--probe-data", str(data.manifest), "--probe-every", "2", *GEOMETRY, *TINY]
    args += ["--set", "train.tensorboard=false", "--set", "pretext.options.num_permutations=8"]
    assert main(args) == 0
    return out


def test_pretrain_logs_the_knn_probe_every_n_epochs_and_at_the_end(pretrained, capsys):
    with (pretrained / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["probe_knn_auc"] != "" for row in rows] == [False, True, True]
    for row in rows[1:]:
        assert 0.0 <= float(row["probe_knn_auc"]) <= 1.0
    ckpt = load_checkpoint(pretrained / "last.pt")
    assert "probe_knn_auc" in ckpt["metrics"]


def test_the_random_baseline_is_the_encoder_pretraining_starts_from(data, tmp_path):
    from patchssl.engine.pretraining import build_pretext
    from patchssl.engine.probing import load_probe_encoder

    config = Config()
    config.data.image_size = 96
    config.model.backbone = "test_resnet"
    config.model.patch_size = 32
    config.pretext.options = {"num_permutations": 8}
    config.train.seed = 5
    config.probe.checkpoint = "none"
    encoder, _, norm, info = load_probe_encoder(config, torch.device("cpu"))
    start = build_pretext(config, torch.device("cpu")).encoder.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, start[key])
    assert norm == "encoder"  # the jigsaw task's default: no per-tile normalisation
    assert info["grid"] == 3 and info["image_size"] == 96


def test_the_checkpoint_path_probes_the_checkpoints_encoder(pretrained):
    ckpt = load_checkpoint(pretrained / "best.pt")
    encoder, tiler, norm = encoder_from_checkpoint(pretrained / "best.pt")
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, ckpt["model"][f"encoder.{key}"])
    assert norm == "encoder"
    assert not encoder.training and not tiler.training
    assert list(tiler.image_size) == [96, 96]


def test_probe_command_end_to_end_writes_probe_json(data, pretrained, tmp_path):
    out = tmp_path / "probe"
    args = ["probe", "--checkpoint", str(pretrained / "best.pt"), "--data", str(data.manifest)]
    args += ["--out", str(out), "--n-boot", "50", *TINY]
    proc = subprocess.run(
        [sys.executable, "-m", "patchssl", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "probe.json").read_text())
    assert report["pooling"] == "mean"
    figures = [report["linear"], report["knn"]]
    figures += [
        report[pooling][method] for pooling in ("max", "concat") for method in ("linear", "knn")
    ]
    for probe in figures:
        assert set(probe) == {"auc", "accuracy"}
        for fig in probe.values():
            assert set(fig) == {"value", "ci"} and len(fig["ci"]) == 2
            assert 0.0 <= fig["value"] <= 1.0
    assert report["position"]["chance"] == pytest.approx(1 / 9)
    counts = report["counts"]
    assert counts["images"] == 32 and counts["patients"] == 16
    assert counts["train_images"] + counts["test_images"] == 32
    assert report["settings"]["input_norm"] == "encoder"
    assert "| kNN (k=20) | mean |" in (out / "probe.md").read_text()


def test_probe_command_random_encoder_and_saved_split(data, tmp_path, capsys):
    from patchssl.data import read_manifest, save_split, split_records

    records = read_manifest(data.manifest, label_map="cervix")
    parts = split_records(records, test_size=0.25, val_size=0.2, seed=1)
    save_split(tmp_path / "split.json", parts)
    out = tmp_path / "random"
    args = ["probe", "--checkpoint", "none", "--data", str(data.manifest), "--out", str(out)]
    args += ["--split", str(tmp_path / "split.json"), "--n-boot", "20", *GEOMETRY, *TINY]
    assert main(args) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["counts"]["test_images"] == len(parts["test"])
    assert report["counts"]["train_images"] == len(parts["train"]) + len(parts["val"])
    assert report["settings"]["encoder"].startswith("random initialisation")


def test_probe_refuses_geometry_flags_that_contradict_the_checkpoint(data, pretrained, capsys):
    args = ["probe", "--checkpoint", str(pretrained / "best.pt"), "--data", str(data.manifest)]
    args += ["--backbone", "resnet18", "--patch-size", "48", "--grid", "3", *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "backbone: the checkpoint has 'test_resnet'" in err
    assert "patch_size: the checkpoint has 32" in err
    assert "grid" not in err.split("(")[1].split(")")[0]  # --grid 3 agrees
    assert "Traceback" not in err


def test_probe_without_an_encoder_is_a_usage_error(data, tmp_path, capsys):
    assert main(["probe", "--data", str(data.manifest), "--out", str(tmp_path)]) == 2
    assert "--checkpoint none" in capsys.readouterr().err
