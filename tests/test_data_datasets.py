from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchssl.data.datasets import (
    ImageFolderDataset,
    ManifestDataset,
    collate_skip_failed,
    find_images,
    make_loader,
)
from patchssl.data.manifest import Record


def _write(path: Path, seed: int, size: tuple[int, int] = (20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _write(root / "b.png", 0)
    _write(root / "a.PNG", 1)
    _write(root / "sub" / "c.jpg", 2)
    _write(root / "sub" / "deeper" / "d.png", 3)
    (root / "notes.txt").write_text("not an image")
    (root / "._a.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    (root / ".hidden").mkdir()
    _write(root / ".hidden" / "e.png", 4)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_scan_is_recursive_sorted_and_skips_hidden(folder: Path) -> None:
    names = [p.relative_to(folder).as_posix() for p in find_images(folder)]
    assert names == ["a.PNG", "b.png", "broken.png", "sub/c.jpg", "sub/deeper/d.png"]


def test_items_and_failure_item(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 16)
    assert len(ds) == 5
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8
    assert item["index"] == 0 and item["path"].endswith("a.PNG")
    bad = ds[2]
    assert "image" not in bad and bad["path"].endswith("broken.png")
    assert "truncated" in bad["error"] and bad["shape"] == (3, 16, 16)
    assert ds[-1]["path"].endswith("d.png")
    with pytest.raises(IndexError, match="out of range"):
        ds[5]


def test_empty_folder_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images found under .*empty.*\.png, \.jpg"):
        ImageFolderDataset(tmp_path / "empty", 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 16)


def test_exclude(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 8, exclude=[folder / "b.png"])
    assert ds.num_excluded == 1 and len(ds) == 4
    assert all(p.name != "b.png" for p in ds.paths)


def test_collate_skips_and_reports_failures(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 16)
    batch = collate_skip_failed([ds[i] for i in range(5)])
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["index"].tolist() == [0, 1, 3, 4]
    assert len(batch["path"]) == 4
    assert len(batch["failed"]) == 1
    path, reason = batch["failed"][0]
    assert path.endswith("broken.png") and "truncated" in reason
    # A reference: the stacked images are the items' own tensors.
    assert torch.equal(batch["image"][2], ds[3]["image"])


def test_all_failed_batch_is_empty_but_well_formed(folder: Path) -> None:
    ds = ImageFolderDataset(folder, (12, 14))
    batch = collate_skip_failed([ds[2], ds[2]])
    assert batch["image"].shape == (0, 3, 12, 14) and batch["image"].dtype == torch.uint8
    assert batch["index"].shape == (0,) and len(batch["failed"]) == 2


def test_different_sizes_without_image_size(folder: Path) -> None:
    _write(folder / "z.png", 9, size=(7, 9))
    ds = ImageFolderDataset(folder, None)
    with pytest.raises(ValueError, match="different shapes"):
        collate_skip_failed([ds[0], ds[len(ds) - 1]])


def _records(root: Path, n: int = 6) -> list[Record]:
    recs = []
    for i in range(n):
        path = root / f"r{i}.png"
        _write(path, 10 + i)
        recs.append(Record(path=path, label=i % 2, raw_label=f"CIN{i % 4}", patient=f"p{i // 2}"))
    return recs


def test_manifest_dataset_labels_and_failures(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    recs[3].path.write_bytes(b"corrupt")
    ds = ManifestDataset(recs, 10)
    assert ds.labels.tolist() == [0, 1, 0, 1, 0, 1] and ds.groups[:3] == ["p0", "p0", "p1"]
    item = ds[1]
    assert item["label"] == 1 and item["patient"] == "p0" and item["visit"] is None
    batch = collate_skip_failed([ds[i] for i in range(6)])
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [0, 1, 0, 0, 1]
    assert batch["patient"] == ["p0", "p0", "p1", "p2", "p2"]
    assert [p for p, _ in batch["failed"]] == [str(recs[3].path)]
    all_bad = collate_skip_failed([ds[3]])
    assert all_bad["label"].shape == (0,) and all_bad["image"].shape == (0, 3, 10, 10)
    with pytest.raises(ValueError, match="at least one record"):
        ManifestDataset([], 10)


def test_loader_never_stops_on_bad_file_and_repeats_with_seed(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 8)

    def epoch(seed: int) -> tuple[list[int], int]:
        order, failed = [], 0
        for batch in make_loader(ds, 2, shuffle=True, seed=seed):
            order += batch["index"].tolist()
            failed += len(batch["failed"])
        return order, failed

    a, fa = epoch(3)
    b, _ = epoch(3)
    assert a == b and fa == 1 and sorted(a) == [0, 1, 3, 4]
    orders = {tuple(epoch(s)[0]) for s in range(6)}
    assert len(orders) > 1  # the seed matters


def test_loader_with_workers_repeats(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 8)
    runs = []
    for _ in range(2):
        loader = make_loader(ds, 2, shuffle=True, seed=7, num_workers=2)
        runs.append([(b["index"].tolist(), b["image"].sum().item()) for b in loader])
    assert runs[0] == runs[1]


def test_loader_argument_errors(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 8)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int; got 0$"):
        make_loader(ds, 0)
    with pytest.raises(TypeError, match=r"^batch_size must be a positive int; got bool True$"):
        make_loader(ds, True)
    with pytest.raises(ValueError, match=r"^num_workers must be an int >= 0; got -1$"):
        make_loader(ds, 2, num_workers=-1)


def test_batches_of_hwc_views_are_channels_last_and_equal(tmp_path: Path) -> None:
    from patchssl.data.datasets import ImageFolderDataset, collate_skip_failed, make_loader

    for i in range(4):
        arr = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.jpg", quality=95)
    ds = ImageFolderDataset(tmp_path, 16)
    items = [ds[i] for i in range(4)]
    batch = collate_skip_failed(items)["image"]
    assert batch.shape == (4, 3, 16, 16)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    expected = torch.stack([it["image"].contiguous() for it in items])
    torch.testing.assert_close(batch, expected, atol=0, rtol=0)
    # Channels-first items (a user transform's output) stack channels-first.
    firsts = [{**it, "image": it["image"].contiguous()} for it in items]
    plain = collate_skip_failed(firsts)["image"]
    assert plain.is_contiguous()
    torch.testing.assert_close(plain, expected, atol=0, rtol=0)
    # Through worker processes (the batch is built in shared memory there).
    loader = make_loader(ds, 2, num_workers=1)
    got = torch.cat([b["image"] for b in loader])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_default_workers_follow_cores_device_and_local_processes(monkeypatch) -> None:
    import os

    from patchssl.data.datasets import default_workers, make_loader

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers("cuda") == 15
    assert default_workers("cpu") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes share the 16 cores
    assert default_workers("cuda") == 3
    assert default_workers("cpu") == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers("cpu") == 0 and default_workers("cuda") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers("cuda") == 16
    assert make_loader(list(range(4)), 2, num_workers=None).num_workers == 4  # 64 CPU cores
