from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchssl.data.io import load_image
from patchssl.data.manifest import Record
from patchssl.data.prepare import (
    INDEX_NAME,
    cache_path,
    map_records_to_cache,
    prepare_images,
)


def _write(path: Path, seed: int, size: tuple[int, int] = (40, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    _write(root / "a.png", 0)
    _write(root / "b.jpg", 1)
    _write(root / "sub" / "c.png", 2, size=(90, 30))
    (root / "sub" / "bad.png").write_bytes(b"broken")
    return root


def test_prepare_mirrors_tree_resizes_and_reports(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "cache"
    report = prepare_images(src, dst, 16, workers=2, progress=False)
    assert (report.total, report.written, report.skipped) == (4, 3, 0)
    assert len(report.failed) == 1 and report.failed[0][0].endswith("bad.png")
    assert "not an image" in report.failed[0][1]
    for rel in ["a.png", "b.png", "sub/c.png"]:
        with Image.open(dst / rel) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    # The cached copy equals decoding the original at the working size (PNG is lossless).
    assert np.array_equal(
        load_image(dst / "sub" / "c.png").numpy(), load_image(src / "sub" / "c.png", 16).numpy()
    )
    index = json.loads((dst / INDEX_NAME).read_text())
    assert index["counts"] == {"total": 4, "written": 3, "skipped": 0, "failed": 1}
    assert index["files"]["b.jpg"] == "b.png" and "sub/bad.png" not in index["files"]
    assert index["settings"]["image_size"] == [16, 16]
    assert "1 failed" in report.summary() and "bad.png" in report.summary()


def test_second_run_skips_and_leftover_temp_file_is_replaced(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "cache"
    prepare_images(src, dst, 16, workers=1, progress=False)
    # Simulate an interrupted run: one output gone, a half-written temp file left behind,
    # and one output truncated to garbage under its final name by some other tool.
    (dst / "a.png").unlink()
    (dst / ".a.png.patchssl-tmp").write_bytes(b"half")
    (dst / "b.png").write_bytes(b"garbage")
    report = prepare_images(src, dst, 16, workers=2, progress=False)
    assert (report.written, report.skipped, len(report.failed)) == (2, 1, 1)
    assert not (dst / ".a.png.patchssl-tmp").exists()
    with Image.open(dst / "a.png") as im, Image.open(dst / "b.png") as im2:
        assert im.size == (16, 16) and im2.size == (16, 16)
    again = prepare_images(src, dst, 16, progress=False)
    assert (again.written, again.skipped) == (0, 3)


def test_other_settings_into_same_cache_refused(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "cache"
    prepare_images(src, dst, 16, progress=False)
    with pytest.raises(ValueError, match="prepared with other settings"):
        prepare_images(src, dst, 32, progress=False)
    report = prepare_images(src, dst, 32, progress=False, overwrite=True)
    assert report.written == 3


def test_jpeg_format_processes_and_files(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "jcache"
    report = prepare_images(
        src, dst, (12, 20), format="jpeg", executor="process", workers=2, progress=False
    )
    assert report.written == 3
    with Image.open(dst / "a.jpg") as im:
        assert im.format == "JPEG" and im.size == (20, 12)
    only = prepare_images(src, tmp_path / "one", 8, files=[src / "a.png"], progress=False)
    assert only.total == 1 and (tmp_path / "one" / "a.png").is_file()


def test_name_clash_and_bad_arguments(src: Path, tmp_path: Path) -> None:
    _write(src / "a.jpg", 5)  # a.png and a.jpg would both become a.png
    with pytest.raises(ValueError, match="map to the same cache file"):
        prepare_images(src, tmp_path / "c", 8, progress=False)
    with pytest.raises(ValueError, match="format must be"):
        prepare_images(src, tmp_path / "c", 8, format="gif", progress=False)
    with pytest.raises(ValueError, match="dst must differ"):
        prepare_images(src, src, 8, progress=False)
    with pytest.raises(ValueError, match=r"^workers must be a positive int; got 0$"):
        prepare_images(src, tmp_path / "c", 8, workers=0, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_images(tmp_path / "nothing", tmp_path / "c", 8, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        prepare_images(tmp_path / "empty", tmp_path / "c", 8, progress=False)


def test_map_records_to_cache(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "cache"
    prepare_images(src, dst, 16, progress=False)
    recs = [
        Record(path=src / "b.jpg", label=1, raw_label="CIN3", patient="p"),
        Record(path=src / "sub" / "c.png", label=0, raw_label="CIN0", patient="q"),
    ]
    mapped = map_records_to_cache(recs, src, dst)
    assert [r.path for r in mapped] == [
        Path(os.path.abspath(dst / "b.png")),
        Path(os.path.abspath(dst / "sub" / "c.png")),
    ]
    assert mapped[0].label == 1 and mapped[0].patient == "p"
    bad = [Record(path=src / "sub" / "bad.png", label=0, raw_label="CIN0", patient="r")]
    with pytest.raises(FileNotFoundError, match="1 of 1 cached images are missing"):
        map_records_to_cache(bad, src, dst)
    with pytest.raises(ValueError, match="not inside the source folder"):
        cache_path(tmp_path / "elsewhere.png", src, dst)
