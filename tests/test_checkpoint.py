from __future__ import annotations

import os

import pytest
import torch

from patchssl.checkpoint import (
    CheckpointError,
    check_compatible,
    copy_checkpoint,
    load_checkpoint,
    payload_checksum,
    save_checkpoint,
)


def test_round_trip_with_weights_only(tmp_path):
    payload = {"kind": "pretrain", "model": {"w": torch.arange(3.0)}, "model_config": {"a": [1]}}
    path = save_checkpoint(tmp_path / "sub" / "last.pt", payload)
    data = load_checkpoint(path)
    assert data["format"] == "patchssl" and data["format_version"] == 1
    assert torch.equal(data["model"]["w"], torch.arange(3.0))
    assert load_checkpoint(path, kind="pretrain")["kind"] == "pretrain"
    with pytest.raises(CheckpointError, match="'pretrain' checkpoint"):
        load_checkpoint(path, kind="finetune")
    # no temporary files are left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_checkpoint(
        tmp_path / "c.pt", {"kind": "pretrain", "model": {"w": torch.ones(1000)}}
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_copy_is_byte_identical_atomic_and_keeps_the_checksum(tmp_path, monkeypatch):
    payload = {"kind": "pretrain", "model": {"w": torch.randn(64, 3), "b": torch.zeros(2)}}
    last = save_checkpoint(tmp_path / "last.pt", payload)
    best = copy_checkpoint(last, tmp_path / "best.pt")
    assert best.read_bytes() == last.read_bytes()
    assert torch.equal(load_checkpoint(best)["model"]["w"], payload["model"]["w"])
    # a copy cut short leaves the previous file, never half of one
    import shutil

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", boom)
    with pytest.raises(OSError, match="disk full"):
        copy_checkpoint(save_checkpoint(tmp_path / "new.pt", {"kind": "pretrain"}), best)
    monkeypatch.undo()
    assert best.read_bytes() == last.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "new.pt"]


def test_checksum_covers_every_byte_of_tensors_and_arrays():
    import numpy as np

    base = {"t": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "a": np.arange(4.0)}
    ref = payload_checksum(base)
    assert payload_checksum({**base, "t": base["t"].clone()}) == ref
    changed_t = base["t"].clone()
    changed_t[1, 2] += 1
    changed_a = base["a"].copy()
    changed_a[3] = -1.0
    assert payload_checksum({**base, "t": changed_t}) != ref
    assert payload_checksum({**base, "a": changed_a}) != ref
    assert payload_checksum({**base, "t": base["t"].t()}) != ref  # shape is part of it
    assert payload_checksum({**base, "a": base["a"].reshape(2, 2)}) != ref


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a patchssl checkpoint"):
        load_checkpoint(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "patchssl", "format_version": 99}, newer)
    with pytest.raises(CheckpointError, match="upgrade patchssl"):
        load_checkpoint(newer)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"kind": "pretrain", "step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"kind": "pretrain", "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert os.path.getsize(path) > 0


def test_check_compatible_names_both_values():
    ckpt = {
        "permutations_fingerprint": "aaaa",
        "model_config": {
            "pretext": "jigsaw",
            "encoder": {"backbone": "resnet50", "in_chans": 3},
            "tiler": {"grid": [3, 3], "patch_size": [153, 153], "image_size": [512, 512]},
        },
    }
    check_compatible(
        ckpt,
        source="x.pt",
        permutations_fingerprint="aaaa",
        encoder={"backbone": "resnet50", "in_chans": 3},
        tiler={"grid": (3, 3), "patch_size": (153, 153), "image_size": (512, 512)},
        pretext="jigsaw",
    )
    with pytest.raises(CheckpointError, match="permutation set aaaa.*bbbb"):
        check_compatible(ckpt, source="x.pt", permutations_fingerprint="bbbb")
    with pytest.raises(CheckpointError, match="backbone='resnet50'.*'vgg16'"):
        check_compatible(ckpt, source="x.pt", encoder={"backbone": "vgg16"})
    with pytest.raises(CheckpointError, match="patch_size"):
        check_compatible(ckpt, source="x.pt", tiler={"patch_size": [64, 64]})
    with pytest.raises(CheckpointError, match="rotation"):
        check_compatible(ckpt, source="x.pt", pretext="rotation")


def test_engine_payload_has_the_format_header(tmp_path):
    from patchssl import __version__
    from patchssl.checkpoint import FORMAT_VERSION
    from patchssl.engine.checkpointing import checkpoint_payload, model_entries

    info = model_entries({"pretext": "jigsaw"}, "abcd")
    payload = checkpoint_payload("pretrain", info, epoch=3, model={"w": torch.zeros(2)})
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["library_version"] == __version__
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", payload), kind="pretrain")
    assert loaded["model_config"] == {"pretext": "jigsaw"}
    assert loaded["permutations_fingerprint"] == "abcd" and loaded["epoch"] == 3
