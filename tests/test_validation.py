"""The shared argument checks and the atomic writer (patchssl._validation)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from patchssl._validation import as_pair, atomic_write, check_int, did_you_mean, look_up, plain


def test_as_pair_accepts_ints_and_pairs() -> None:
    assert as_pair(3, "grid") == (3, 3)
    assert as_pair((2, 5), "grid") == (2, 5)
    assert as_pair([np.int64(4), 6], "grid") == (4, 6)
    assert all(type(v) is int for v in as_pair(np.int32(7), "grid"))


@pytest.mark.parametrize(
    ("value", "exc", "pattern"),
    [
        (True, TypeError, r"grid must be an int or a pair of ints \(height, width\); got True"),
        ((2, False), TypeError, r"grid must hold ints; got \(2, False\)"),
        ((2.0, 3), TypeError, r"grid must hold ints"),
        ("33", TypeError, r"grid must be an int or a pair"),
        ((1, 2, 3), ValueError, r"grid must be an int or a pair of ints"),
        (0, ValueError, r"grid must be positive; got 0"),
        ((3, -1), ValueError, r"grid must be positive; got \(3, -1\)"),
    ],
)
def test_as_pair_refuses(value, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        as_pair(value, "grid")


def test_check_int() -> None:
    assert check_int(np.int64(5), "k") == 5 and type(check_int(np.int64(5), "k")) is int
    assert check_int(0, "seed", minimum=0) == 0
    with pytest.raises(ValueError, match=r"^k must be a positive int; got 0$"):
        check_int(0, "k")
    with pytest.raises(ValueError, match=r"^n must be an int >= 2; got 1$"):
        check_int(1, "n", minimum=2)
    with pytest.raises(TypeError, match=r"^k must be a positive int; got bool True$"):
        check_int(True, "k")
    with pytest.raises(TypeError, match=r"got float 2.0"):
        check_int(2.0, "k")


def test_look_up_names_the_choices_and_the_closest() -> None:
    assert look_up("gated", ("sigmoid", "gated"), "mode") == "gated"
    assert look_up(None, ("sigmoid", None), "mode") is None
    with pytest.raises(ValueError) as err:
        look_up("gatd", ("sigmoid", "gated"), "attention mode", note="(see the docs)")
    assert str(err.value) == (
        "unknown attention mode 'gatd'; choose one of ['sigmoid', 'gated']. "
        "Did you mean 'gated'? (see the docs)"
    )
    with pytest.raises(ValueError, match=r"choose one of \['a', 'b'\]\.$"):
        look_up("zzzz", ("a", "b"), "thing")
    assert did_you_mean("atention", ["attention", None]) == " Did you mean 'attention'?"
    assert did_you_mean("resnet5", ["resnet50", "resnet18", "vit"], n=3) == (
        " Did you mean 'resnet50' or 'resnet18'?"
    )
    close = ["abcdeXXX", "abcdefgX", "abcdefXX", "aXXXXXXX"]  # closest first, the far one left out
    assert did_you_mean("abcdefgh", close, n=3) == (
        " Did you mean 'abcdefgX', 'abcdefXX' or 'abcdeXXX'?"
    )
    assert did_you_mean("zzzz", ["abc"], n=3) == ""


def test_plain_turns_tuples_into_lists_at_any_depth() -> None:
    assert plain({"a": (1, (2, 3)), "b": [{"c": (4,)}]}) == {"a": [1, [2, 3]], "b": [{"c": [4]}]}


def test_atomic_write_bytes_text_and_writer(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.txt"  # the folder is created
    atomic_write(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, lambda fh: fh.write(b"from a writer"), fsync=False)
    assert path.read_bytes() == b"from a writer"
    assert os.listdir(path.parent) == ["f.txt"]  # no temporary file left


def test_atomic_write_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    atomic_write(path, "old\n")
    seen: list[str] = []

    def broken(fh) -> None:
        fh.write(b"half")
        seen.extend(os.listdir(tmp_path))
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["config.yaml"]
    # the temporary name while writing: hidden, unique, in the same folder, ending in .tmp
    # (the form the run folder's cleanup removes after a killed run)
    (temp,) = [name for name in seen if name != "config.yaml"]
    assert temp.startswith(".config.yaml.") and temp.endswith(".tmp")


def test_atomic_write_fixed_temp_name_overwrites_a_leftover(tmp_path: Path) -> None:
    (tmp_path / ".a.png.part").write_bytes(b"left by a killed run")
    atomic_write(tmp_path / "a.png", b"new", temp_name=".a.png.part")
    assert sorted(os.listdir(tmp_path)) == ["a.png"]
