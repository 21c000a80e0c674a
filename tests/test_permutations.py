"""Tests for patchssl.permutations: validation, statistics, files, generation, default set."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchssl import permutations as perm_module
from patchssl.cli import main as cli_main
from patchssl.permutations import PermutationSet

# ---------------------------------------------------------------- slow references


def ref_distances(rows) -> list[int]:
    """Hamming distance of every unordered pair, by plain Python loops."""
    rows = [list(map(int, r)) for r in rows]
    return [
        sum(a != b for a, b in zip(rows[i], rows[j]))
        for i, j in itertools.combinations(range(len(rows)), 2)
    ]


def ref_dist(p, q) -> int:
    return sum(int(a) != int(b) for a, b in zip(p, q))


# ---------------------------------------------------------------- construction and validation


def test_basic_access():
    rows = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1]]
    ps = PermutationSet(rows)
    assert len(ps) == ps.num_permutations == 4
    assert ps.num_tiles == 3
    assert ps.permutations.dtype == torch.int64
    assert ps.permutations.device.type == "cpu"
    assert ps.permutations.tolist() == rows
    assert ps[1].tolist() == [1, 2, 0]
    assert ps[1:3].tolist() == rows[1:3]
    assert ps[torch.tensor([3, 0])].tolist() == [rows[3], rows[0]]
    assert [r.tolist() for r in ps] == rows
    # Copies: mutating what we get back leaves the set (and its hash) unchanged.
    fp = ps.fingerprint
    ps.permutations[0, 0] = 2
    ps[0][0] = 2
    assert ps.permutations.tolist() == rows and ps.fingerprint == fp
    assert "num_permutations=4" in repr(ps) and fp in repr(ps)


def test_accepts_tensor_numpy_list_and_whole_floats():
    rows = [[0, 1], [1, 0]]
    a = PermutationSet(torch.tensor(rows, dtype=torch.int32))
    b = PermutationSet(np.array(rows, dtype=np.uint8))
    c = PermutationSet(rows)
    d = PermutationSet(np.array(rows, dtype=np.float64))
    assert a == b == c == d
    assert hash(a) == hash(d)
    assert a != PermutationSet([[1, 0], [0, 1]])  # order matters


def test_refuses_one_based_with_advice():
    with pytest.raises(ValueError, match=r"1-based.*subtract 1"):
        PermutationSet([[1, 2, 3], [3, 1, 2]])


def test_refuses_duplicates_naming_rows():
    rows = [[0, 1, 2], [1, 2, 0], [0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 1, 2]]
    with pytest.raises(ValueError, match=r"distinct") as info:
        PermutationSet(rows)
    msg = str(info.value)
    assert "[0, 2, 5]" in msg and "[1, 4]" in msg


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([[0, 1, 1], [1, 0, 2]], r"row 0 is not a permutation.*repeated values: \[1\]"),
        ([[0, 1, 2], [0, 1, 3]], r"row 1 is not a permutation.*outside 0\.\.2: \[3\]"),
        ([[0, -1, 2]], r"outside"),
        ([0, 1, 2], r"shape \(K, N\)"),
        ([[[0, 1]]], r"shape \(K, N\)"),
        (np.zeros((0, 3), dtype=np.int64), r"at least one row"),
        ([[0]], r"N >= 2"),
        ([[0, 1.5]], r"whole numbers"),
    ],
)
def test_refuses_invalid(rows, pattern):
    with pytest.raises(ValueError, match=pattern):
        PermutationSet(rows)


@pytest.mark.parametrize("bad", ["0 1 2", 3, np.array([[True, False]]), [["a", "b"]]])
def test_refuses_wrong_types(bad):
    with pytest.raises(TypeError):
        PermutationSet(bad)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize(("k", "n", "seed"), [(2, 2, 0), (7, 4, 1), (40, 6, 2), (30, 10, 3)])
def test_hamming_statistics_match_brute_force(k, n, seed):
    rng = np.random.default_rng(seed)
    pool = {tuple(rng.permutation(n).tolist()) for _ in range(5 * k)}
    rows = sorted(pool)[:k]
    ps = PermutationSet(rows)
    dists = ref_distances(rows)
    assert ps.min_hamming() == min(dists)
    assert ps.mean_hamming() == pytest.approx(sum(dists) / len(dists), abs=1e-12)
    stats = ps.describe()
    assert stats["min_hamming"] == min(dists) and stats["num_tiles"] == n


def test_min_hamming_large_tile_path_matches_brute_force():
    # N * N > 4096 takes the direct-comparison branch.
    rng = np.random.default_rng(0)
    rows = np.stack([rng.permutation(70) for _ in range(6)])
    rows[5] = rows[0]
    rows[5, [0, 1]] = rows[5, [1, 0]]  # distance 2 from row 0
    ps = PermutationSet(rows)
    assert ps.min_hamming() == min(ref_distances(rows)) == 2


def test_single_permutation_statistics():
    ps = PermutationSet([[1, 0, 2]])
    with pytest.raises(ValueError, match="at least 2"):
        ps.min_hamming()
    with pytest.raises(ValueError, match="at least 2"):
        ps.mean_hamming()
    assert ps.describe()["min_hamming"] is None


def test_fingerprint_definition_and_stability():
    rows = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.int64)
    expected = hashlib.sha256(
        np.array([2, 3], dtype="<i8").tobytes() + rows.astype("<i8").tobytes()
    ).hexdigest()[:16]
    assert PermutationSet(rows).fingerprint == expected
    assert PermutationSet(rows.astype(np.int16)).fingerprint == expected
    assert PermutationSet(rows[::-1]).fingerprint != expected
    # Same bytes, other shape: the shape is part of the hash.
    assert perm_module.fingerprint_of(np.zeros((3, 2), dtype=np.int64)) != (
        perm_module.fingerprint_of(np.zeros((2, 3), dtype=np.int64))
    )


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".npy", ".perm"])
def test_save_load_round_trip(tmp_path, suffix):
    ps = PermutationSet.generate(20, 5, method="max_min", seed=3)
    path = tmp_path / f"set{suffix}"
    ps.save(path)
    back = PermutationSet.load(path)
    assert back == ps
    assert back.fingerprint == ps.fingerprint
    if suffix != ".npy":
        assert back.method == "max_min" and back.seed == 3
    if suffix == ".csv":
        assert "," in path.read_text().splitlines()[1]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_load_plain_text_with_commas_comments_and_blank_lines(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("# my set\n0, 1, 2\n\n2,0,1  # a comment\n1 2 0\n")
    assert PermutationSet.load(path).permutations.tolist() == [[0, 1, 2], [2, 0, 1], [1, 2, 0]]


def test_load_validates_and_names_the_file(tmp_path):
    path = tmp_path / "one_based.txt"
    path.write_text("1 2 3\n3 2 1\n")
    with pytest.raises(ValueError, match=r"one_based\.txt.*1-based"):
        PermutationSet.load(path)
    path = tmp_path / "dups.txt"
    path.write_text("0 1 2\n0 1 2\n")
    with pytest.raises(ValueError, match=r"dups\.txt.*rows \[0, 1\]"):
        PermutationSet.load(path)


def test_load_truncated_and_garbage_files(tmp_path):
    ps = PermutationSet.generate(50, 9, seed=0)
    text = tmp_path / "set.txt"
    ps.save(text)
    data = text.read_bytes()
    # Cut mid-row: the short row is named.
    text.write_bytes(data[: data.index(b"\n", len(data) // 2) + 6])  # 3 values
    with pytest.raises(ValueError, match=r"set\.txt:\d+: this row has"):
        PermutationSet.load(text)
    # Cut at a row boundary: the header's count catches it.
    lines = data.decode().splitlines(keepends=True)
    text.write_text("".join(lines[:-5]))
    with pytest.raises(ValueError, match=r"header says 50 permutations but the file holds 45"):
        PermutationSet.load(text)
    # Two rows swapped: still a valid set, but the fingerprint no longer matches the header.
    lines[1], lines[2] = lines[2], lines[1]
    text.write_text("".join(lines))
    with pytest.raises(ValueError, match="fingerprint"):
        PermutationSet.load(text)
    # Binary garbage and non-numeric text.
    text.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"set\.txt.*not a text file"):
        PermutationSet.load(text)
    text.write_text("0 1 two\n")
    with pytest.raises(ValueError, match=r"set\.txt:1: 'two' is not a number"):
        PermutationSet.load(text)
    text.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="empty"):
        PermutationSet.load(text)
    npy = tmp_path / "set.npy"
    ps.save(npy)
    npy.write_bytes(npy.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"set\.npy.*not a readable \.npy"):
        PermutationSet.load(npy)
    with pytest.raises(FileNotFoundError, match="missing"):
        PermutationSet.load(tmp_path / "missing.txt")


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize(
    ("method", "k", "n"),
    [("max_min", 30, 9), ("projective", 30, 9), ("max_min", 20, 12)],
)
def test_generate_is_seeded(method, k, n):
    a = PermutationSet.generate(k, n, method=method, seed=5)
    b = PermutationSet.generate(k, n, method=method, seed=5)
    c = PermutationSet.generate(k, n, method=method, seed=6)
    assert a == b
    assert a != c
    assert a.method == method and a.seed == 5
    assert a.permutations.shape == (k, n)


def test_auto_resolves(monkeypatch):
    assert PermutationSet.generate(10, 9, seed=0).method == "projective"
    assert PermutationSet.generate(10, 9, method="auto", seed=0) == PermutationSet.generate(
        10, 9, method="projective", seed=0
    )
    assert PermutationSet.generate(10, 4, seed=0).method == "max_min"
    # Above the projective code's 1512 rows, auto falls back to max_min (stubbed: it is slow).
    stub = np.array(list(itertools.islice(itertools.permutations(range(9)), 1513)))
    monkeypatch.setattr(perm_module, "_generate_max_min", lambda k, n, rng, nc: stub)
    assert PermutationSet.generate(1513, 9, seed=0).method == "max_min"


def test_max_min_each_step_maximises_the_minimum_distance():
    k, n = 60, 5
    rows = PermutationSet.generate(k, n, method="max_min", seed=2).numpy()
    everything = [tuple(p) for p in itertools.permutations(range(n))]
    for i in range(1, k):
        chosen = {tuple(r) for r in rows[:i].tolist()}

        def key(p, i=i):
            ds = [ref_dist(p, r) for r in rows[:i]]
            return (min(ds), sum(ds))

        best = max(key(p) for p in everything if p not in chosen)
        assert key(tuple(rows[i].tolist())) == best, f"step {i}"


def test_max_min_sampled_candidates():
    ps = PermutationSet.generate(50, 16, method="max_min", seed=0, num_candidates=2000)
    assert ps.min_hamming() >= 12
    with pytest.raises(ValueError, match="num_candidates must be >= num_permutations"):
        PermutationSet.generate(50, 16, method="max_min", num_candidates=10)


def test_projective_group_is_the_permutation_code():
    pgaml = perm_module._projective_group(semilinear=True)
    pgl = perm_module._projective_group(semilinear=False)
    assert pgaml.shape == (1512, 9) and pgl.shape == (504, 9)
    assert PermutationSet(pgaml).min_hamming() == 6
    assert PermutationSet(pgl).min_hamming() == 7
    # A group: closed under composition (spot check) and contains the identity.
    as_set = {tuple(r) for r in pgaml.tolist()}
    assert tuple(range(9)) in as_set
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, 1512, size=(50, 2)):
        assert tuple(pgaml[i][pgaml[j]].tolist()) in as_set
    # Sharply 3-transitive: PGL(2, 8) maps each ordered triple of points to each other once.
    triples = {tuple(r[:3]) for r in pgl.tolist()}
    assert len(triples) == 504


@pytest.mark.parametrize(("k", "expected_min"), [(504, 7), (1512, 6)])
def test_projective_distances(k, expected_min):
    assert PermutationSet.generate(k, 9, method="projective", seed=4).min_hamming() == (
        expected_min
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"method": "max_mni"}, ValueError, r"Did you mean 'max_min'\?"),
        ({"method": "max_avg"}, ValueError, r"benchmarks/permutation_generators\.py"),
        ({"num_permutations": 7, "num_tiles": 3}, ValueError, r"only 3! = 6"),
        ({"num_permutations": 0}, ValueError, r"num_permutations must be a positive int; got 0"),
        ({"num_tiles": 1}, ValueError, r"num_tiles must be an int >= 2; got 1"),
        ({"num_permutations": 2.5}, TypeError, r"must be a positive int; got float 2.5"),
        ({"seed": None}, TypeError, r"seed must be an int"),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0; got -1"),
        ({"method": "projective", "num_tiles": 16}, ValueError, r"max_min"),
        ({"method": "projective", "num_permutations": 1513}, ValueError, r"1512.*max_min"),
        ({"method": "projective", "num_candidates": 5000}, ValueError, r"max_min' only"),
    ],
)
def test_generate_argument_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        PermutationSet.generate(**kwargs)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=7),
    data=st.data(),
    method=st.sampled_from(["max_min", "auto"]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_generated_sets_are_valid(n, data, method, seed):
    k = data.draw(st.integers(min_value=1, max_value=min(40, math.factorial(n))))
    ps = PermutationSet.generate(k, n, method=method, seed=seed)
    rows = ps.numpy()
    assert rows.shape == (k, n)
    assert all(sorted(r) == list(range(n)) for r in rows.tolist())
    assert len({tuple(r) for r in rows.tolist()}) == k
    assert PermutationSet(rows) == ps  # re-validates


# ---------------------------------------------------------------- default set


def test_default_set_properties():
    ps = PermutationSet.default()
    assert ps.permutations.shape == (1000, 9)
    assert ps.min_hamming() >= 6
    assert ps.mean_hamming() >= 8.0
    rows = ps.numpy()
    dist = (rows[:, None, :] != rows[None, :, :]).sum(axis=2)  # plain all-pairs reference
    off_diagonal = dist[~np.eye(len(rows), dtype=bool)]
    assert ps.min_hamming() == off_diagonal.min() >= 6
    assert ps.mean_hamming() == pytest.approx(off_diagonal.mean(), abs=1e-12)


def test_default_set_checksum_matches_shipped_file():
    from importlib.resources import files

    assets = files("patchssl") / "assets"
    data = (assets / "permutations_1000x9.txt").read_bytes()
    recorded = (assets / "permutations_1000x9.sha256").read_text().split()[0]
    assert hashlib.sha256(data).hexdigest() == recorded


def test_default_set_checksum_mismatch_raises(tmp_path, monkeypatch):
    path = perm_module._write_default_asset(tmp_path)
    (tmp_path / "permutations_1000x9.sha256").write_text("0" * 64 + "\n")

    class FakeFiles:
        def __truediv__(self, name):
            return tmp_path if name == "assets" else None

    monkeypatch.setattr(perm_module.importlib.resources, "files", lambda _pkg: FakeFiles())
    perm_module._load_default.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="corrupted"):
            PermutationSet.default()
    finally:
        perm_module._load_default.cache_clear()
    assert path.exists()


def test_default_set_is_regenerated_exactly():
    shipped = PermutationSet.default()
    regenerated = PermutationSet.generate(1000, 9, method="auto", seed=0)
    assert regenerated == shipped
    assert regenerated.fingerprint == shipped.fingerprint
    assert shipped.method == "projective" and shipped.seed == 0


def test_command_line(tmp_path, capsys):
    out = tmp_path / "s.txt"
    args = ["generate", str(out), "--num", "12", "--tiles", "5", "--method", "max_min"]
    assert cli_main(["permutations", *args]) == 0
    assert "generated 12 permutations of 5 tiles" in capsys.readouterr().out
    assert PermutationSet.load(out).num_permutations == 12
    assert cli_main(["permutations", "describe", str(out)]) == 0
    assert "12" in capsys.readouterr().out
