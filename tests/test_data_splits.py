from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchssl.data.manifest import Record
from patchssl.data.splits import (
    exclude_overlap,
    find_overlap,
    grouped_kfold,
    grouped_stratified_split,
    kfold_records,
    load_split,
    records_from_split,
    sample_patients,
    save_split,
    split_records,
)


def _dataset(num_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patients with 1..4 images each; the label is per patient (as in the flagship data)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, num_groups)
    group_labels = rng.integers(0, 2, num_groups)
    group_labels[:4] = [0, 1, 0, 1]
    groups = np.repeat(np.arange(num_groups), sizes)
    return group_labels[groups], groups


@settings(max_examples=40, deadline=None)
@given(
    num_groups=st.integers(4, 60),
    seed=st.integers(0, 10_000),
    test_size=st.floats(0.1, 0.5),
)
def test_split_partitions_without_group_leak(num_groups: int, seed: int, test_size: float) -> None:
    labels, groups = _dataset(num_groups, seed)
    train, test = grouped_stratified_split(labels, groups, test_size=test_size, seed=seed)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert not set(groups[train]) & set(groups[test])
    if (np.bincount(labels) >= 2).all() and min(len(set(groups[labels == c])) for c in (0, 1)) >= 2:
        # Every class on both sides whenever two groups of it exist.
        assert set(labels[train]) == set(labels[test]) == {0, 1}


def test_split_ratio_and_stratification_close() -> None:
    labels, groups = _dataset(300, 1)
    _train, test = grouped_stratified_split(labels, groups, test_size=0.2, seed=0)
    assert abs(len(test) / len(labels) - 0.2) < 0.02
    assert abs(labels[test].mean() - labels.mean()) < 0.03
    again = grouped_stratified_split(labels, groups, test_size=0.2, seed=0)
    assert np.array_equal(again[1], test)
    other = grouped_stratified_split(labels, groups, test_size=0.2, seed=1)
    assert not np.array_equal(other[1], test)


def test_ungrouped_split() -> None:
    labels = np.array([0] * 50 + [1] * 50)
    _train, test = grouped_stratified_split(labels, None, test_size=0.2)
    assert len(test) == 20 and labels[test].sum() == 10


def test_split_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="test_size must be a fraction"):
        grouped_stratified_split([0, 1], [0, 1], test_size=1.5)
    with pytest.raises(ValueError, match="at least 2 patient groups"):
        grouped_stratified_split([0, 1, 0], ["a", "a", "a"])
    with pytest.raises(ValueError, match=r"class 1 in 1 group.*Collect more patients"):
        grouped_stratified_split([0, 0, 0, 1, 1], ["a", "b", "c", "d", "d"])
    with pytest.raises(ValueError, match="same length"):
        grouped_stratified_split([0, 1], ["a"])


@settings(max_examples=25, deadline=None)
@given(num_groups=st.integers(10, 50), seed=st.integers(0, 1000), k=st.integers(2, 5))
def test_kfold_covers_every_sample_once_without_leak(num_groups: int, seed: int, k: int) -> None:
    labels, groups = _dataset(num_groups, seed)
    if min(len(set(groups[labels == c])) for c in (0, 1)) < k:
        with pytest.raises(ValueError, match="patient groups"):
            grouped_kfold(labels, groups, k, seed=seed)
        return
    folds = grouped_kfold(labels, groups, k, seed=seed)
    assert len(folds) == k
    tests = np.concatenate([t for _, t in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(labels)))  # each sample tested once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(labels)


def test_kfold_errors() -> None:
    with pytest.raises(ValueError, match="at least 5 patient groups, got 3"):
        grouped_kfold([0, 1, 0], ["a", "b", "c"], 5)
    with pytest.raises(ValueError, match=r"^n_splits must be an int >= 2; got 1$"):
        grouped_kfold([0, 1], ["a", "b"], 1)
    labels = [0] * 10 + [1] * 2
    with pytest.raises(ValueError, match=r"class 1 in 2 group.*lower the number of splits"):
        grouped_kfold(labels, list(range(12)), 3)


def _records(n: int) -> list[Record]:
    return [
        Record(path=Path(f"/data/{i}.png"), label=(i // 3) % 2, raw_label="x", patient=str(i // 3))
        for i in range(n)
    ]


def test_split_records_with_val_and_save_load(tmp_path: Path) -> None:
    recs = _records(90)
    parts = split_records(recs, test_size=0.2, val_size=0.1, seed=0)
    assert set(parts) == {"train", "val", "test"}
    assert sum(len(v) for v in parts.values()) == 90
    patients = {k: {r.patient for r in v} for k, v in parts.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    path = save_split(tmp_path / "split.json", parts, meta={"seed": 0})
    loaded = load_split(path)
    assert loaded["test"] == [str(r.path) for r in parts["test"]]
    again = records_from_split(recs, loaded)
    assert again == parts
    with pytest.raises(KeyError, match="manifest changed"):
        records_from_split(recs[:10], loaded)


def test_save_split_refuses_double_membership_and_load_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in two parts"):
        save_split(tmp_path / "s.json", {"train": ["a", "b"], "test": ["b"]})
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a patchssl split file"):
        load_split(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "none.json")


def test_find_overlap_by_path_and_content(tmp_path: Path) -> None:
    pre, lab = tmp_path / "pre", tmp_path / "lab"
    pre.mkdir()
    lab.mkdir()
    for i in range(4):
        (pre / f"u{i}.png").write_bytes(bytes([i]) * 100)
    (lab / "copy.png").write_bytes(bytes([2]) * 100)  # same bytes as pre/u2.png
    (lab / "same_size_other.png").write_bytes(bytes([9]) * 100)
    (lab / "link.png").symlink_to(pre / "u1.png")  # same file by resolved path
    shutil.copy(pre / "u3.png", lab / "u3_copy.png")
    pretrain = sorted(pre.iterdir())
    labeled = sorted(lab.iterdir())
    found = find_overlap(pretrain, labeled)
    got = {(o.pretrain.name, o.labeled.name, o.reason) for o in found}
    assert got == {
        ("u1.png", "link.png", "same file"),
        ("u2.png", "copy.png", "same content"),
        ("u3.png", "u3_copy.png", "same content"),
    }
    by_path_only = find_overlap(pretrain, labeled, by_content=False)
    assert [o.reason for o in by_path_only] == ["same file"]
    kept = exclude_overlap(pretrain, found)
    assert [p.name for p in kept] == ["u0.png"]
    assert find_overlap(pretrain[:1], labeled) == []


# --------------------------------------------------------------------------- cross-validation
def test_kfold_records_tests_every_record_once_and_validates_on_other_patients() -> None:
    recs = _records(120)  # 40 patients of 3 images, alternating labels
    folds = kfold_records(recs, n_splits=4, val_size=0.25, seed=2)
    assert len(folds) == 4
    tested = [r for f in folds for r in f["test"]]
    assert sorted(str(r.path) for r in tested) == sorted(str(r.path) for r in recs)
    for fold in folds:
        assert sum(len(v) for v in fold.values()) == len(recs)  # train + val + test = all
        patients = {k: {r.patient for r in v} for k, v in fold.items()}
        assert not patients["train"] & patients["val"]
        assert not (patients["train"] | patients["val"]) & patients["test"]
        assert {r.label for r in fold["val"]} == {0, 1}
        # about a quarter of the non-test patients validate (10 patients of 3 images)
        assert abs(len(patients["val"]) - 0.25 * (40 - len(patients["test"]))) <= 2
        # the test parts are grouped_kfold's, record order is the manifest's
        assert fold["test"] == sorted(fold["test"], key=recs.index)
    labels = [r.label for r in recs]
    expected = grouped_kfold(labels, [r.patient for r in recs], n_splits=4, seed=2)
    assert [[recs[i] for i in test] for _, test in expected] == [f["test"] for f in folds]
    no_val = kfold_records(recs, n_splits=4, val_size=0.0, seed=2)
    assert set(no_val[0]) == {"train", "test"}
    assert no_val[0]["test"] == folds[0]["test"]
    with pytest.raises(ValueError, match="val_size"):
        kfold_records(recs, n_splits=4, val_size=1.0)


# ------------------------------------------------------------------------------ label budget
def _patients(num_pos: int, num_neg: int, per: int = 2) -> list[Record]:
    """``per`` images of each patient ``p<i>``; the first ``num_pos`` patients positive."""
    return [
        Record(Path(f"/data/p{i}_{k}.png"), int(i < num_pos), "x", f"p{i}")
        for i in range(num_pos + num_neg)
        for k in range(per)
    ]


def test_sample_patients_keeps_whole_patients_and_the_class_balance() -> None:
    recs = _patients(num_pos=12, num_neg=18)
    kept = sample_patients(recs, 10, seed=3)
    patients = {r.patient for r in kept}
    assert len(patients) == 10
    # Reference: every image of a kept patient is kept, in order, and none of the others.
    assert kept == [r for r in recs if r.patient in patients]
    assert len({r.patient for r in kept if r.label == 1}) == round(10 * 12 / 30)
    assert sample_patients(recs, 10, seed=3) == kept  # seeded
    assert any(sample_patients(recs, 10, seed=s) != kept for s in range(4, 8))
    assert sample_patients(recs, None, seed=3) == recs
    assert sample_patients(recs, 100, seed=3) == recs
    with pytest.raises(ValueError, match="at least 2"):
        sample_patients(recs, 1, seed=0)


def test_sample_patients_keeps_one_patient_of_a_rare_class() -> None:
    recs = _patients(num_pos=1, num_neg=29)
    kept = sample_patients(recs, 4, seed=0)
    assert {r.label for r in kept} == {0, 1}
    assert len({r.patient for r in kept}) == 4


def test_sample_patients_classes_a_patient_by_its_highest_label() -> None:
    # p0 has a negative and a positive image: a positive patient, so it is the one kept.
    recs = [*_patients(num_pos=0, num_neg=5), Record(Path("/data/p0_x.png"), 1, "x", "p0")]
    for seed in range(5):  # classed by another image's label, p0 would often be left out
        kept = sample_patients(recs, 2, seed=seed)
        assert [r for r in kept if r.patient == "p0"] == [r for r in recs if r.patient == "p0"]
