from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchssl.data.manifest import (
    BINARY_LABEL_MAP,
    CERVIX_LABEL_MAP,
    LabelMap,
    ManifestError,
    read_manifest,
    write_manifest,
)


def _csv(tmp_path: Path, text: str, files: list[str] | None = None, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    for f in files or []:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"x")
    return path


def test_cervix_label_map() -> None:
    m = CERVIX_LABEL_MAP
    assert [m(x) for x in ["CIN0", "CIN1", "CIN2", "CIN3", "CIN4"]] == [0, 0, 1, 1, 1]
    assert m(" cin 2 ") == 1 and m("Normal") == 0 and m("CIN2+") == 1 and m("cin0/1") == 0
    assert m.class_names == ("CIN0/1", "CIN2+") and m.num_classes == 2
    assert "1" not in m and "0" not in m  # bare digits are ambiguous: refused
    assert BINARY_LABEL_MAP("1") == 1 and BINARY_LABEL_MAP("Negative") == 0


def test_label_map_forms(tmp_path: Path) -> None:
    a = LabelMap.parse("CIN0:0, CIN1:0,CIN2:1", class_names=["neg", "pos"])
    b = LabelMap({"cin0": "neg", "CIN1": "neg", "CIN 2": "pos"})
    assert a == b and a.class_names == ("neg", "pos")
    assert LabelMap.from_config(a.config) == a
    assert LabelMap.from_config("cervix") is CERVIX_LABEL_MAP
    assert LabelMap.from_config({"CIN0": 0, "CIN2": 1})("cin2") == 1
    (tmp_path / "m.json").write_text(json.dumps({"mapping": {"a": 0, "b": 1}}))
    assert LabelMap.from_config(str(tmp_path / "m.json"))("B") == 1
    (tmp_path / "m.yaml").write_text("label_map:\n  mapping: {low: negative, high: positive}\n")
    ym = LabelMap.from_file(tmp_path / "m.yaml")
    assert ym("HIGH") == 1 and ym.class_names == ("negative", "positive")
    assert "CIN0->0 (neg)" in a.describe()


def test_label_map_errors() -> None:
    with pytest.raises(ManifestError, match="cannot parse label map entry 'CIN0'"):
        LabelMap.parse("CIN0,CIN1:0")
    with pytest.raises(ManifestError, match="without gaps"):
        LabelMap({"a": 0, "b": 2})
    with pytest.raises(ManifestError, match="different classes"):
        LabelMap({"CIN2": 1, "cin 2": 0, "x": 0})
    with pytest.raises(ManifestError, match="not in class_names"):
        LabelMap({"a": "neg", "b": "maybe"}, class_names=["neg", "pos"])
    with pytest.raises(ManifestError, match="at least one entry"):
        LabelMap({})


def test_read_manifest_basic(tmp_path: Path) -> None:
    csv = _csv(
        tmp_path,
        "image,label,patient,visit,site\n"
        "img/a.png,CIN1,p1,v1,x\n"
        "img/b.png, cin3 ,p1,v1,y\n"
        "img/c.png,CIN2,p2,,z\n",
        ["img/a.png", "img/b.png", "img/c.png"],
    )
    recs = read_manifest(csv, label_map="cervix")
    assert [r.label for r in recs] == [0, 1, 1]
    assert recs[1].raw_label == "cin3" and recs[0].patient == "p1" and recs[2].visit is None
    assert recs[0].path == (tmp_path / "img" / "a.png").resolve() and recs[0].path.is_absolute()
    assert recs[0].extra == {"site": "x"} and recs[2].row == 4


def test_root_semicolons_bom_and_case_insensitive_columns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "a.png").parent.mkdir()
    (data / "a.png").write_bytes(b"x")
    csv = tmp_path / "m.csv"
    csv.write_text("\ufeffImage;Label\na.png;CIN0\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="no 'patient' column"):
        recs = read_manifest(csv, label_map=CERVIX_LABEL_MAP, root=data)
    assert recs[0].path == data / "a.png" and recs[0].patient == "a"


@pytest.mark.parametrize(
    "text",
    [
        "image,label,patient\na.png,CIN0,p1\nb.png,CIN3,p2\n",
        "image\tlabel\tpatient\na.png\tCIN0\tp1\nb.png\tCIN3\tp2\n",
        "image|label|patient\na.png|CIN0|p1\nb.png|CIN3|p2\n",
        '"image";"label";"patient"\na.png;CIN0;p1\nb.png;CIN3;p2\n',
    ],
    ids=["comma", "tab", "pipe", "quoted-semicolon"],
)
def test_delimiter_is_detected_from_the_header(tmp_path: Path, text: str) -> None:
    csv = _csv(tmp_path, text, ["a.png", "b.png"])
    recs = read_manifest(csv, label_map="cervix")
    assert [(r.path.name, r.label, r.patient) for r in recs] == [
        ("a.png", 0, "p1"),
        ("b.png", 1, "p2"),
    ]


def test_missing_column_names_it_and_lists_columns(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "file,label\na.png,CIN0\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(csv, label_map="cervix")
    msg = str(info.value)
    assert (
        "no 'image' column" in msg
        and "['file', 'label']" in msg
        and "--set data.path_column=NAME" in msg
    )
    (tmp_path / "a.png").write_bytes(b"x")
    assert read_manifest(csv, label_map="cervix", image_column="file", patient_column=None)


def test_unknown_labels_all_listed_with_counts(tmp_path: Path) -> None:
    csv = _csv(
        tmp_path,
        "image,label,patient\na,CIN0,1\nb,HSIL,1\nc,HSIL,2\nd,CIN5,3\ne,,4\n",
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(csv, label_map="cervix")
    msg = str(info.value)
    assert "4 row(s)" in msg
    assert "'HSIL' (2 rows)" in msg and "'CIN5' (1 row)" in msg and "'<empty>' (1 row)" in msg
    assert "CIN0->0 (CIN0/1)" in msg and "CIN3->1 (CIN2+)" in msg


def test_empty_csv_and_header_only(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is empty"):
        read_manifest(_csv(tmp_path, "", name="e.csv"), label_map="cervix")
    with pytest.raises(ManifestError, match="header but no rows"):
        read_manifest(_csv(tmp_path, "image,label\n", name="h.csv"), label_map="cervix")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv", label_map="cervix")


def test_missing_image_files_listed_with_count(tmp_path: Path) -> None:
    rows = "".join(f"m{i}.png,CIN0,p{i}\n" for i in range(8))
    csv = _csv(tmp_path, "image,label,patient\nok.png,CIN1,p\n" + rows, ["ok.png"])
    with pytest.raises(FileNotFoundError) as info:
        read_manifest(csv, label_map="cervix")
    msg = str(info.value)
    assert "8 of 9 image files do not exist" in msg and "m0.png" in msg
    assert "and 3 more" in msg and "--set data.image_root=DIR" in msg
    assert len(read_manifest(csv, label_map="cervix", check_files=False)) == 9


def test_empty_image_cell_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="empty 'image' cell"):
        read_manifest(_csv(tmp_path, "image,label,patient\n,CIN0,p\n"), label_map="cervix")
    csv = _csv(tmp_path, "image,label,patient\na.png,CIN0,1\na.png,CIN0,1\n", ["a.png"], "d.csv")
    with pytest.warns(UserWarning, match="more than one row"):
        read_manifest(csv, label_map="cervix")


def test_write_manifest_roundtrip(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "image,label,patient,visit,x0\nimg/a.png,CIN1,p1,v1,3\n", ["img/a.png"])
    recs = read_manifest(csv, label_map="cervix")
    out = write_manifest(recs, tmp_path / "copy.csv", root=tmp_path)
    assert out.read_text().splitlines()[1] == "img/a.png,CIN1,p1,v1,3"
    assert read_manifest(out, label_map="cervix") == recs
