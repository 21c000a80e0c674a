"""Patient-grouped, label-stratified splits; saved splits; overlap between pretraining and test.

Images of one patient look alike (same cervix, same day, same camera), so a split that puts
one patient's images on both sides measures memory, not diagnosis. Every split here is
*grouped* (no group, i.e. patient, on both sides) and *stratified* (each side keeps about the
class proportions of the whole).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchssl._validation import atomic_write, check_int
from patchssl.data.manifest import Record

__all__ = [
    "Overlap",
    "exclude_overlap",
    "file_sha1",
    "find_overlap",
    "grouped_kfold",
    "grouped_stratified_split",
    "kfold_records",
    "load_split",
    "records_from_split",
    "sample_patients",
    "save_split",
    "split_records",
]

SPLIT_FORMAT = "patchssl-split"
SPLIT_FORMAT_VERSION = 1


def _encode(
    labels: Sequence[int] | np.ndarray, groups: Sequence[Hashable] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Hashable]]:
    """Labels -> class codes (n,), groups -> group codes (n,), count matrix (G, C), names."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    n = len(y)
    if n == 0:
        raise ValueError("cannot split an empty set of labels")
    _, y_code = np.unique(y, return_inverse=True)
    if groups is None:
        g_code = np.arange(n)
        names: list[Hashable] = list(range(n))
    else:
        g_list = list(groups)
        if len(g_list) != n:
            raise ValueError(
                f"labels and groups must have the same length; got {n} and {len(g_list)}"
            )
        index: dict[Hashable, int] = {}
        g_code = np.empty(n, dtype=np.int64)
        for i, g in enumerate(g_list):
            g_code[i] = index.setdefault(g, len(index))
        names = list(index)
    counts = np.zeros((len(names), int(y_code.max()) + 1), dtype=np.int64)
    np.add.at(counts, (g_code, y_code), 1)
    return y_code, g_code, counts, names


def _check_class_groups(counts: np.ndarray, labels: np.ndarray, need: int, what: str) -> None:
    classes = np.unique(np.asarray(labels))
    groups_per_class = (counts > 0).sum(axis=0)
    short = [(classes[c].item(), int(k)) for c, k in enumerate(groups_per_class) if k < need]
    if short:
        listed = ", ".join(f"class {c!r} in {k} group(s)" for c, k in short)
        fewer = "lower the number of splits, " if need > 2 else ""
        raise ValueError(
            f"cannot stratify {what}: every class needs at least {need} patient groups, but "
            f"{listed}. Collect more patients of that class, {fewer}merge it with another "
            "class in the label map, or drop its images."
        )


def grouped_stratified_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray | None,
    *,
    test_size: float = 0.2,
    seed: int = 0,
    num_restarts: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices in two, grouped by patient and stratified by label.

    No group lands on both sides. Groups are assigned greedily (larger groups first, ties in
    a seeded random order) to bring every class's test count as close as possible to
    ``test_size`` times its total; the best of ``num_restarts`` random orders is kept, and
    every class is then made present on both sides.

    Args:
        labels: Class of each sample, shape ``(n,)``.
        groups: Group (patient) of each sample, shape ``(n,)``; None means every sample is
            its own group (an ordinary stratified split).
        test_size: Fraction of the samples for the second part, in (0, 1).
        seed: Seed of the random order.
        num_restarts: Random orders tried.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 arrays that partition ``range(n)``.

    Raises:
        ValueError: For ``test_size`` outside (0, 1), fewer than 2 groups, or a class found
            in fewer than 2 groups (it cannot be on both sides).
    """
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}")
    _y_code, g_code, counts, _ = _encode(labels, groups)
    num_groups, _ = counts.shape
    if num_groups < 2:
        raise ValueError(f"a split needs at least 2 patient groups, got {num_groups}")
    _check_class_groups(counts, np.asarray(labels), 2, "a train/test split")
    target = counts.sum(axis=0) * float(test_size)
    sizes = counts.sum(axis=1)
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(max(1, num_restarts)):
        order = rng.permutation(num_groups)
        order = order[np.argsort(-sizes[order], kind="stable")]
        in_test = np.zeros(num_groups, dtype=bool)
        test = np.zeros(counts.shape[1], dtype=np.float64)
        for g in order:
            with_g = test + counts[g]
            if np.abs(with_g - target).sum() < np.abs(test - target).sum():
                in_test[g] = True
                test = with_g
        _ensure_both_sides(in_test, counts)
        cost = float(np.abs(counts[in_test].sum(axis=0) - target).sum())
        if best is None or cost < best[0]:
            best = (cost, in_test.copy())
    assert best is not None
    test_mask = best[1][g_code]
    return np.flatnonzero(~test_mask).astype(np.int64), np.flatnonzero(test_mask).astype(np.int64)


def _ensure_both_sides(in_test: np.ndarray, counts: np.ndarray) -> None:
    """Move the smallest groups so that every class is on both sides (in place)."""
    sizes = counts.sum(axis=1)
    for c in range(counts.shape[1]):
        has_c = counts[:, c] > 0
        for side in (True, False):
            if (has_c & (in_test == side)).any():
                continue
            # No group of class c on this side: move the smallest one over, if that does not
            # empty the other side of class c.
            donors = np.flatnonzero(has_c & (in_test != side))
            if len(donors) < 2:
                continue
            g = donors[np.argmin(sizes[donors])]
            in_test[g] = side


def grouped_kfold(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray | None,
    n_splits: int = 5,
    *,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold cross-validation folds, grouped by patient and stratified by label.

    Uses scikit-learn's ``StratifiedGroupKFold`` with seeded shuffling. Every sample is in
    exactly one test fold; no group is in a fold's train and test parts at once.

    Args:
        labels: Class of each sample, shape ``(n,)``.
        groups: Patient of each sample, shape ``(n,)``, or None (each sample its own group).
        n_splits: Number of folds ``k`` (>= 2).
        seed: Seed of the shuffling.

    Returns:
        ``k`` pairs ``(train_idx, test_idx)`` of sorted int64 arrays.

    Raises:
        ValueError: If ``n_splits < 2``, there are fewer groups than folds, or a class is
            found in fewer groups than folds (some test folds would have none of it).
        TypeError: If ``n_splits`` is not an int.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # deferred: scikit-learn is heavy

    check_int(n_splits, "n_splits", minimum=2)
    y_code, g_code, counts, _ = _encode(labels, groups)
    num_groups = counts.shape[0]
    if num_groups < n_splits:
        raise ValueError(
            f"n_splits={n_splits} folds need at least {n_splits} patient groups, got "
            f"{num_groups}; lower n_splits or add patients"
        )
    _check_class_groups(counts, np.asarray(labels), n_splits, f"{n_splits} folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
    folds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for train, test in splitter.split(np.zeros(len(y_code)), y_code, g_code):
            if len(test) == 0:
                raise ValueError(
                    f"fold assignment left a fold empty ({num_groups} groups, {n_splits} "
                    "folds); lower n_splits"
                )
            folds.append((np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)))
    return folds


def split_records(
    records: Sequence[Record],
    *,
    test_size: float = 0.2,
    val_size: float = 0.0,
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split manifest records into train / (val) / test, grouped by patient.

    Args:
        records: Manifest records (see :func:`patchssl.data.manifest.read_manifest`).
        test_size: Fraction of all records for testing (the paper: 0.2).
        val_size: Fraction of all records for validation, taken from the non-test part;
            0 for no validation split.
        seed: Seed.

    Returns:
        ``{"train": [...], "test": [...]}`` plus ``"val"`` when ``val_size > 0``; record
        order inside each part follows the manifest.
    """
    labels = np.array([r.label for r in records])
    groups = [r.patient for r in records]
    if val_size > 0 and val_size + test_size >= 1.0:
        raise ValueError(f"val_size + test_size must be below 1, got {val_size} + {test_size}")
    train, test = grouped_stratified_split(labels, groups, test_size=test_size, seed=seed)
    val_fraction = val_size / (1.0 - test_size) if val_size > 0 else 0.0
    return _parts(records, labels, groups, train, test, val_fraction, seed + 1)


def _parts(
    records: Sequence[Record],
    labels: np.ndarray,
    groups: list[str],
    train: np.ndarray,
    test: np.ndarray,
    val_fraction: float,
    seed: int,
) -> dict[str, list[Record]]:
    """The records of one split: ``{"train", "test"}``, plus ``"val"`` when asked.

    The validation part, a ``val_fraction`` of ``train``'s records (0: none), is carved out of
    ``train`` by patient with :func:`grouped_stratified_split`.
    """
    parts = {"train": [records[i] for i in train], "test": [records[i] for i in test]}
    if val_fraction > 0:
        sub_tr, sub_val = grouped_stratified_split(
            labels[train], [groups[i] for i in train], test_size=val_fraction, seed=seed
        )
        parts = {
            "train": [records[train[i]] for i in sub_tr],
            "val": [records[train[i]] for i in sub_val],
            "test": parts["test"],
        }
    return parts


def kfold_records(
    records: Sequence[Record],
    *,
    n_splits: int = 5,
    val_size: float = 0.2,
    seed: int = 0,
) -> list[dict[str, list[Record]]]:
    """Cross-validation folds of manifest records: train / val / test, grouped by patient.

    Each fold of :func:`grouped_kfold` is the test part once; a validation part (for the
    decision threshold and the best epoch, never the test part) is carved out of the other
    folds' patients with :func:`grouped_stratified_split`. Every record is tested exactly once.

    Args:
        records: Manifest records (see :func:`patchssl.data.manifest.read_manifest`).
        n_splits: Number of folds ``k`` (>= 2).
        val_size: Fraction of each fold's non-test records for validation, in [0, 1); 0 for
            no validation part.
        seed: Seed of the folds (and, plus one, of the validation parts).

    Returns:
        ``k`` dicts ``{"train": [...], "val": [...], "test": [...]}`` (no ``"val"`` when
        ``val_size`` is 0); record order inside each part follows the manifest.

    Raises:
        ValueError: As :func:`grouped_kfold` and :func:`grouped_stratified_split` (too few
            patients of a class for the folds or the validation part).
    """
    if not 0.0 <= float(val_size) < 1.0:
        raise ValueError(f"val_size must be a fraction in [0, 1), got {val_size!r}")
    labels = np.array([r.label for r in records])
    groups = [r.patient for r in records]
    return [
        _parts(records, labels, groups, train, test, float(val_size), seed + 1)
        for train, test in grouped_kfold(labels, groups, n_splits=n_splits, seed=seed)
    ]


def sample_patients(
    records: Sequence[Record], num_patients: int | None, *, seed: int = 0
) -> list[Record]:
    """Keep the images of ``num_patients`` patients, stratified by label: a label budget.

    Label-efficiency experiments (how good is a model trained on the images of 10, 20, 50
    labeled patients?) cut the *training* part of a split down to a budget of patients, never
    the test part. Whole patients are kept (all of their images or none), and each class keeps
    about its share of the patients (rounded, at least one patient of each class). A patient's
    class is the highest label among its images (CIN2+ if any image is). The choice is seeded.

    Args:
        records: Training records (with ``patient`` and ``label``).
        num_patients: Patients to keep, or None for all (so is any number >= the patients).
        seed: Seed of the choice.

    Returns:
        The kept records, in their original order.

    Raises:
        ValueError: When ``num_patients`` is below the number of classes (one patient of each
            class is needed).

    Example:
        >>> parts = split_records(records, test_size=0.2, val_size=0.1)  # doctest: +SKIP
        >>> parts["train"] = sample_patients(parts["train"], 20, seed=0)  # doctest: +SKIP
    """
    patients: dict[str, int] = {}
    for r in records:
        patients[str(r.patient)] = max(patients.get(str(r.patient), 0), int(r.label))
    if num_patients is None or num_patients >= len(patients):
        return list(records)
    by_class: dict[int, list[str]] = {}
    for pid in sorted(patients):
        by_class.setdefault(patients[pid], []).append(pid)
    if num_patients < len(by_class):
        raise ValueError(
            f"a label budget of {num_patients} patient(s) cannot hold one patient of each of "
            f"the {len(by_class)} classes; give at least {len(by_class)}"
        )
    total = len(patients)
    quota = {c: max(1, round(num_patients * len(p) / total)) for c, p in by_class.items()}
    while sum(quota.values()) > num_patients:  # rounding every class up can overshoot
        largest = max(quota, key=lambda c: quota[c])
        quota[largest] -= 1
    while sum(quota.values()) < num_patients:
        spare = [c for c in quota if quota[c] < len(by_class[c])]
        quota[max(spare, key=lambda c: len(by_class[c]) - quota[c])] += 1
    rng = np.random.default_rng([seed, 17])
    keep: set[str] = set()
    for c, pids in by_class.items():
        chosen = rng.choice(len(pids), size=quota[c], replace=False)
        keep.update(pids[i] for i in chosen)
    return [r for r in records if str(r.patient) in keep]


def save_split(
    path: str | os.PathLike[str],
    split: Mapping[str, Sequence[str | os.PathLike[str] | Record]],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save a split (part name -> image paths) as JSON, atomically, so a run can reuse it.

    Args:
        path: Output ``.json`` file.
        split: For example ``{"train": [...], "val": [...], "test": [...]}``; items are paths
            or :class:`Record` objects (their ``path`` is stored).
        meta: Anything JSON-able to store alongside (seed, sizes, manifest path).

    Returns:
        The written path.

    Raises:
        ValueError: If one image is in two parts.
    """
    parts: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    clashes: list[str] = []
    for name, items in split.items():
        paths = [str(it.path if isinstance(it, Record) else it) for it in items]
        for p in paths:
            if p in owner and owner[p] != name:
                clashes.append(f"{p} ({owner[p]} and {name})")
            owner[p] = name
        parts[name] = paths
    if clashes:
        raise ValueError(
            f"{len(clashes)} image(s) are in two parts of the split: {', '.join(clashes[:5])}"
        )
    payload = {
        "format": SPLIT_FORMAT,
        "format_version": SPLIT_FORMAT_VERSION,
        "parts": parts,
        "counts": {k: len(v) for k, v in parts.items()},
        "meta": dict(meta or {}),
    }
    return _write_json_atomic(Path(path), payload)


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> Path:
    return atomic_write(path, json.dumps(payload, indent=1) + "\n")


def load_split(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Load a split written by :func:`save_split`.

    Args:
        path: The JSON file.

    Returns:
        Part name -> list of image paths (strings). The stored ``meta`` is available with
        ``json.load`` if needed.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a patchssl split file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"split file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise ValueError(f"{path} is not a patchssl split file (no 'format': '{SPLIT_FORMAT}')")
    if data.get("format_version", 0) > SPLIT_FORMAT_VERSION:
        raise ValueError(
            f"split file {path} has format_version {data['format_version']}, newer than this "
            f"patchssl understands ({SPLIT_FORMAT_VERSION}); upgrade patchssl"
        )
    return {str(k): [str(p) for p in v] for k, v in data["parts"].items()}


def records_from_split(
    records: Sequence[Record], split: Mapping[str, Sequence[str | os.PathLike[str]]]
) -> dict[str, list[Record]]:
    """Select the records of each part of a saved split (matched by absolute path).

    Args:
        records: Manifest records.
        split: Part name -> paths (as :func:`load_split` returns).

    Returns:
        Part name -> records, in the split's order.

    Raises:
        KeyError: If the split names images the records do not have (the first few are
            listed): the manifest changed since the split was saved.
    """
    by_path = {os.path.abspath(r.path): r for r in records}
    out: dict[str, list[Record]] = {}
    missing: list[str] = []
    for name, paths in split.items():
        part = []
        for p in paths:
            r = by_path.get(os.path.abspath(p))
            if r is None:
                missing.append(str(p))
            else:
                part.append(r)
        out[name] = part
    if missing:
        raise KeyError(
            f"{len(missing)} image(s) of the saved split are not in the manifest (first: "
            f"{', '.join(missing[:5])}); the manifest changed since the split was saved. "
            "Make a new split, or restore the manifest."
        )
    return out


# -- overlap between pretraining and labeled images --------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """One image that is in both the pretraining set and the labeled set.

    Attributes:
        pretrain: Path in the pretraining set.
        labeled: Path in the labeled set.
        reason: ``"same file"`` (same resolved path) or ``"same content"`` (identical bytes,
            by SHA-1).
    """

    pretrain: Path
    labeled: Path
    reason: Literal["same file", "same content"]


def file_sha1(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """SHA-1 hex digest of a file's bytes."""
    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _sizes(paths: Iterable[Path]) -> dict[Path, int]:
    out = {}
    for p in paths:
        try:
            out[p] = os.stat(p).st_size
        except OSError:
            continue
    return out


def find_overlap(
    pretrain_paths: Iterable[str | os.PathLike[str]],
    labeled_paths: Iterable[str | os.PathLike[str]],
    *,
    by_content: bool = True,
    workers: int = 4,
) -> list[Overlap]:
    """Find images that are both in the pretraining set and in the labeled set.

    Two checks: the same file (equal resolved path, symlinks followed), and, with
    ``by_content``, the same bytes (SHA-1). Only files whose size equals the size of a file
    on the other side are hashed, so the content check costs little. Identical pictures
    stored differently (a resized cache copy against the original, another JPEG quality) are
    not detected: compare like with like (originals with originals).

    Args:
        pretrain_paths: Images used for self-supervised pretraining.
        labeled_paths: Labeled images (especially the test split).
        by_content: Also compare file contents.
        workers: Threads used for hashing.

    Returns:
        The overlaps, sorted by pretraining path; empty if none.
    """
    pre = [Path(p) for p in pretrain_paths]
    lab = [Path(p) for p in labeled_paths]
    pre_real = {p: os.path.realpath(p) for p in pre}
    lab_by_real: dict[str, Path] = {}
    for p in lab:
        lab_by_real.setdefault(os.path.realpath(p), p)
    found: dict[tuple[str, str], Overlap] = {}
    for p, real in pre_real.items():
        if real in lab_by_real:
            found[(real, real)] = Overlap(p, lab_by_real[real], "same file")
    if by_content:
        pre_sizes = _sizes(p for p in pre if pre_real[p] not in lab_by_real)
        lab_sizes = _sizes(lab_by_real.values())
        common = set(pre_sizes.values()) & set(lab_sizes.values())
        pre_c = [p for p, s in pre_sizes.items() if s in common]
        lab_c = [p for p, s in lab_sizes.items() if s in common]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pre_h = dict(zip(pre_c, pool.map(file_sha1, pre_c)))
            lab_h = dict(zip(lab_c, pool.map(file_sha1, lab_c)))
        by_hash: dict[str, Path] = {}
        for p, h in lab_h.items():
            by_hash.setdefault(h, p)
        for p, h in pre_h.items():
            if h in by_hash:
                key = (pre_real[p], os.path.realpath(by_hash[h]))
                found.setdefault(key, Overlap(p, by_hash[h], "same content"))
    return sorted(found.values(), key=lambda o: (str(o.pretrain), str(o.labeled)))


def exclude_overlap(
    pretrain_paths: Iterable[str | os.PathLike[str]], overlaps: Iterable[Overlap]
) -> list[Path]:
    """The pretraining paths without those listed in ``overlaps`` (order kept)."""
    drop = {os.path.realpath(o.pretrain) for o in overlaps}
    return [Path(p) for p in pretrain_paths if os.path.realpath(p) not in drop]
