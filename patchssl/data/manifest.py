"""CSV manifests of labeled images, and the mapping from raw grades to classes.

A manifest is a CSV file with one row per image::

    image,label,patient,visit
    images/p001_a.jpg,CIN1,p001,2019-03
    images/p001_b.jpg,CIN1,p001,2019-03
    images/p002_a.jpg,CIN3,p002,2020-01

Only the image and label columns are required. Relative image paths are resolved against
``root`` (default: the CSV's folder). Raw labels are turned into class indices by a
:class:`LabelMap`; a label the map does not know is an error that lists every unknown value.

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (CIN0/1 negative against CIN2+ positive).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BINARY_LABEL_MAP",
    "CERVIX_LABEL_MAP",
    "LabelMap",
    "ManifestError",
    "Record",
    "read_manifest",
    "write_manifest",
]


class ManifestError(ValueError):
    """A manifest or a label map is malformed; the message says what to change."""


def _norm(raw: object) -> str:
    """Normalise a raw label: strip, case-fold, drop all whitespace (``" CIN 2 "`` -> ``cin2``)."""
    return "".join(str(raw).split()).casefold()


class LabelMap:
    """Maps raw label strings (grades) to class indices ``0 .. K-1``.

    Raw labels are normalised before lookup: surrounding and inner whitespace is removed and
    case is ignored, so ``"CIN 2"``, ``"cin2"`` and ``" CIN2 "`` are the same label.

    Args:
        mapping: Raw label -> class index (int) or class name (str).
        class_names: Name of each class, index order. When ``mapping`` values are names,
            their indices are their positions in ``class_names``; when omitted, names get
            indices in order of first appearance. When values are ints and ``class_names`` is
            omitted, the names are ``"0"``, ``"1"``, ...

    Raises:
        ManifestError: For an empty mapping, class indices that are not ``0 .. K-1``, a name
            missing from ``class_names``, or two raw labels that normalise to the same key
            but map to different classes.

    Example:
        >>> m = LabelMap.parse("CIN0:0,CIN1:0,CIN2:1", class_names=["negative", "positive"])
        >>> m("cin 2"), m.class_names
        (1, ('negative', 'positive'))
    """

    def __init__(
        self,
        mapping: Mapping[str, int | str],
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not mapping:
            raise ManifestError("a label map needs at least one entry, e.g. 'CIN0:0,CIN2:1'")
        values = list(mapping.values())
        if all(isinstance(v, str) and not v.strip().lstrip("-").isdigit() for v in values):
            names = list(class_names) if class_names is not None else []
            if class_names is None:
                for v in values:
                    if v.strip() not in names:
                        names.append(v.strip())
            index_of = {n: i for i, n in enumerate(names)}
            missing = sorted({v.strip() for v in values} - set(index_of))
            if missing:
                raise ManifestError(
                    f"label map uses class names {missing} that are not in class_names={names}"
                )
            table = {k: index_of[str(v).strip()] for k, v in mapping.items()}
        else:
            table = {}
            for k, v in mapping.items():
                try:
                    table[k] = int(v)
                except (TypeError, ValueError):
                    raise ManifestError(
                        f"label map entry {k!r}: {v!r} is neither a class index nor a class "
                        "name; mix of names and indices is not allowed"
                    ) from None
            num = max(table.values()) + 1
            names = list(class_names) if class_names is not None else [str(i) for i in range(num)]
        num_classes = len(names)
        used = sorted(set(table.values()))
        if used[0] < 0 or used[-1] >= num_classes:
            raise ManifestError(
                f"class indices must lie in 0..{num_classes - 1} (one per class name "
                f"{names}); got {used}"
            )
        unused = sorted(set(range(num_classes)) - set(used))
        if unused:
            raise ManifestError(
                f"classes {unused} ({[names[i] for i in unused]}) have no raw label mapped to "
                f"them; class indices must be 0..K-1 without gaps, got {used}"
            )
        normalised: dict[str, int] = {}
        for raw, idx in table.items():
            key = _norm(raw)
            if not key:
                raise ManifestError("a label map key is empty; every raw label needs a name")
            if key in normalised and normalised[key] != idx:
                raise ManifestError(
                    f"label map keys that differ only in case or spaces map to different "
                    f"classes: {raw!r} -> {idx} but an earlier key -> {normalised[key]}"
                )
            normalised[key] = idx
        self._table = normalised
        self._raw = {str(k).strip(): v for k, v in table.items()}
        self.class_names: tuple[str, ...] = tuple(str(n) for n in names)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, class_names: Sequence[str] | None = None) -> LabelMap:
        """Build from ``"RAW:CLASS,RAW:CLASS"`` (CLASS an index or a class name).

        Args:
            text: For example ``"CIN0:0,CIN1:0,CIN2:1,CIN3:1"`` or
                ``"CIN0:negative,CIN2:positive"``.
            class_names: Optional class names in index order.

        Returns:
            The label map.

        Raises:
            ManifestError: If an entry is not ``RAW:CLASS``.
        """
        mapping: dict[str, int | str] = {}
        for entry in text.split(","):
            entry = entry.strip()
            if not entry:
                continue
            raw, sep, cls_ = entry.rpartition(":")
            if not sep or not raw.strip() or not cls_.strip():
                raise ManifestError(
                    f"cannot parse label map entry {entry!r} in {text!r}; "
                    "write RAW:CLASS pairs separated by commas, e.g. 'CIN0:0,CIN1:0,CIN2:1'"
                )
            cls_ = cls_.strip()
            mapping[raw.strip()] = int(cls_) if cls_.lstrip("-").isdigit() else cls_
        return cls(mapping, class_names)

    @classmethod
    def from_config(cls, config: LabelMap | str | Mapping[str, Any] | os.PathLike[str]) -> LabelMap:
        """Build from whatever a config file or a command-line flag holds.

        Accepts a :class:`LabelMap`; the name of a built-in map (``"cervix"``, ``"binary"``);
        a ``"RAW:CLASS,..."`` string; a path to a ``.yaml``/``.yml``/``.json`` file holding
        one of these; a plain ``{raw: class}`` mapping; or a dict
        ``{"mapping": {raw: class}, "class_names": [...]}`` (as :attr:`config` writes).

        Args:
            config: One of the forms above.

        Returns:
            The label map.

        Raises:
            ManifestError: If the value cannot be understood.
            FileNotFoundError: If a file path was given and does not exist.
        """
        if isinstance(config, LabelMap):
            return config
        if isinstance(config, os.PathLike) or (
            isinstance(config, str) and config.lower().endswith((".yaml", ".yml", ".json"))
        ):
            return cls.from_file(config)
        if isinstance(config, str):
            builtin = _BUILTIN.get(config.strip().lower())
            if builtin is not None:
                return builtin
            return cls.parse(config)
        if isinstance(config, Mapping):
            if "mapping" in config:
                extra = set(config) - {"mapping", "class_names"}
                if extra:
                    raise ManifestError(
                        f"unknown label map keys {sorted(extra)}; use 'mapping' and 'class_names'"
                    )
                return cls(dict(config["mapping"]), config.get("class_names"))
            return cls(dict(config))
        raise ManifestError(
            f"cannot build a label map from {type(config).__name__}; give a mapping, a "
            "'RAW:CLASS,...' string, 'cervix', or a YAML/JSON file"
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LabelMap:
        """Read a label map from a YAML or JSON file (see :meth:`from_config` for the forms)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label map file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except Exception as err:
            raise ManifestError(f"cannot parse label map file {path}: {err}") from err
        if isinstance(data, Mapping) and "label_map" in data:
            data = data["label_map"]
        if data is None:
            raise ManifestError(f"label map file {path} is empty")
        return cls.from_config(data)

    # -- use ---------------------------------------------------------------------------------

    def __call__(self, raw: object) -> int:
        """Class index of a raw label; raises KeyError if unknown."""
        return self._table[_norm(raw)]

    def get(self, raw: object, default: int | None = None) -> int | None:
        """Class index of a raw label, or ``default`` if unknown."""
        return self._table.get(_norm(raw), default)

    def __contains__(self, raw: object) -> bool:
        return _norm(raw) in self._table

    @property
    def num_classes(self) -> int:
        """Number of classes ``K``."""
        return len(self.class_names)

    @property
    def mapping(self) -> dict[str, int]:
        """Raw label (as given) -> class index."""
        return dict(self._raw)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able form; ``LabelMap.from_config(m.config)`` rebuilds the map."""
        return {"mapping": dict(self._raw), "class_names": list(self.class_names)}

    def describe(self) -> str:
        """One line, e.g. ``CIN0->0 (negative), CIN2->1 (positive)``."""
        return ", ".join(f"{k}->{v} ({self.class_names[v]})" for k, v in self._raw.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        return self._table == other._table and self.class_names == other.class_names

    def __hash__(self) -> int:
        return hash((tuple(sorted(self._table.items())), self.class_names))

    def __repr__(self) -> str:
        return f"LabelMap({self.describe()})"


#: The flagship mapping (Chae et al. 2021): CIN0 and CIN1 negative (class 0, named
#: "CIN0/1"); CIN2, CIN3 and CIN4 positive (class 1, named "CIN2+"). Also
#: accepts ``normal`` (0) and the class names ``CIN0/1`` (0) and ``CIN2+`` (1). Bare digits
#: are deliberately NOT accepted: a CSV of binary 0/1 labels would otherwise be read as grades
#: (1 = CIN1 = negative); use :data:`BINARY_LABEL_MAP` for such files.
CERVIX_LABEL_MAP = LabelMap(
    {
        "CIN0": 0,
        "CIN1": 0,
        "normal": 0,
        "CIN0/1": 0,
        "CIN2": 1,
        "CIN3": 1,
        "CIN4": 1,
        "CIN2+": 1,
    },
    class_names=("CIN0/1", "CIN2+"),
)

#: Labels that are already binary: ``0``/``negative`` -> 0, ``1``/``positive`` -> 1.
BINARY_LABEL_MAP = LabelMap(
    {"0": 0, "negative": 0, "1": 1, "positive": 1},
    class_names=("negative", "positive"),
)

_BUILTIN = {"cervix": CERVIX_LABEL_MAP, "cin": CERVIX_LABEL_MAP, "binary": BINARY_LABEL_MAP}


@dataclass(frozen=True)
class Record:
    """One manifest row.

    Attributes:
        path: Image file, absolute (resolved against the manifest's root).
        label: Class index (from the label map).
        raw_label: The label as written in the CSV.
        patient: Patient (subject) id; images of one patient stay on one side of a split.
            Defaults to the image file's stem when the manifest has no patient column.
        visit: Visit id, or None.
        extra: The row's other columns (for example lesion boxes), as strings.
        row: 1-based line number in the CSV (the header is line 1), for messages.
    """

    path: Path
    label: int
    raw_label: str
    patient: str
    visit: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    row: int = 0

    def with_path(self, path: str | os.PathLike[str]) -> Record:
        """A copy of the record pointing at another file (e.g. the resize cache)."""
        return replace(self, path=Path(path))


def _find_column(fieldnames: Sequence[str], wanted: str) -> str | None:
    if wanted in fieldnames:
        return wanted
    lowered = {f.strip().casefold(): f for f in fieldnames}
    return lowered.get(wanted.strip().casefold())


def _sniff_delimiter(header: str) -> str:
    """The header row's delimiter among ``, ; tab |`` (comma when there is only one column)."""
    try:
        return csv.Sniffer().sniff(header, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _list_some(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")


def read_manifest(
    csv_path: str | os.PathLike[str],
    *,
    label_map: LabelMap | str | Mapping[str, Any] | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
    patient_column: str | None = "patient",
    visit_column: str | None = "visit",
    check_files: bool = True,
    allow_outside_root: bool = True,
) -> list[Record]:
    """Read a CSV manifest of labeled images.

    The delimiter (comma, semicolon, tab or ``|``) is detected from the header; a UTF-8 byte-order
    mark (Excel) is ignored; column names match case-insensitively when there is no exact
    match.

    Args:
        csv_path: The CSV file.
        label_map: A :class:`LabelMap` or anything :meth:`LabelMap.from_config` accepts
            (``"cervix"``, ``"CIN0:0,CIN1:0,CIN2:1"``, a YAML/JSON file, a dict).
        root: Folder that relative image paths are resolved against (default: the CSV's
            folder).
        image_column: Column holding the image path (required).
        label_column: Column holding the raw label (required).
        patient_column: Column holding the patient id (optional: when absent each image is
            its own patient, with a warning, since splits then cannot keep one patient's
            images together). None to ignore it.
        visit_column: Column holding the visit id (optional). None to ignore it.
        check_files: Check that every image file exists.
        allow_outside_root: Accept image paths that lead outside ``root`` (absolute paths
            elsewhere, ``../``). The engine passes ``data.allow_outside_root`` (default
            ``False``), so a manifest cannot make a command read arbitrary files.

    Returns:
        One :class:`Record` per row, in file order.

    Raises:
        FileNotFoundError: If the CSV is missing, or image files are missing (the first few
            are listed with the total count).
        ManifestError: If the CSV is empty, a required column is missing (the message lists
            the columns found and the argument that sets the name), an image cell is empty,
            or labels are unknown to the map (all unknown values are listed with their
            counts, next to the configured map), an image is on several rows with different
            labels or patient ids (the rows are listed), or (``allow_outside_root=False``)
            a path leads outside ``root``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"manifest {csv_path} does not exist")
    lmap = LabelMap.from_config(label_map)
    base = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
        if not header.strip():
            raise ManifestError(
                f"manifest {csv_path} is empty; it needs a header row with at least the columns "
                f"'{image_column}' and '{label_column}' and one row per image"
            )
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter=_sniff_delimiter(header))
        fieldnames = [f.strip() for f in (reader.fieldnames or [])]
        reader.fieldnames = fieldnames
        rows = list(reader)
    flags = {
        "image": (image_column, "image_column= (command line: --set data.path_column=NAME)"),
        "label": (label_column, "label_column= (command line: --set data.label_column=NAME)"),
    }
    resolved: dict[str, str] = {}
    for role, (name, flag) in flags.items():
        col = _find_column(fieldnames, name)
        if col is None:
            raise ManifestError(
                f"manifest {csv_path} has no '{name}' column (the {role} column). Columns "
                f"found: {fieldnames}. Rename the column, or set its name with {flag}."
            )
        resolved[role] = col
    patient_col = _find_column(fieldnames, patient_column) if patient_column else None
    visit_col = _find_column(fieldnames, visit_column) if visit_column else None
    if not rows:
        raise ManifestError(f"manifest {csv_path} has a header but no rows")
    if patient_column and patient_col is None:
        warnings.warn(
            f"manifest {csv_path} has no '{patient_column}' column (columns: {fieldnames}): "
            "each image is treated as its own patient (id = file stem), so splits cannot keep "
            "one patient's images on one side. Add a patient column, or set its name with "
            "patient_column= (command line: --set data.patient_column=NAME).",
            UserWarning,
            stacklevel=2,
        )

    unknown: Counter[str] = Counter()
    empty_images: list[int] = []
    for line, row in enumerate(rows, start=2):
        raw = (row.get(resolved["label"]) or "").strip()
        if raw not in lmap:
            unknown[raw if raw else "<empty>"] += 1
        if not (row.get(resolved["image"]) or "").strip():
            empty_images.append(line)
    if empty_images:
        raise ManifestError(
            f"manifest {csv_path}: {len(empty_images)} row(s) have an empty "
            f"'{resolved['image']}' cell (lines {_list_some([str(n) for n in empty_images])})"
        )
    if unknown:
        listed = ", ".join(
            f"{value!r} ({count} row{'s' if count > 1 else ''})"
            for value, count in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        raise ManifestError(
            f"manifest {csv_path}: {sum(unknown.values())} row(s) have labels that the label "
            f"map does not know: {listed}. Label map: {lmap.describe()}. Add them to the label "
            "map (e.g. --label-map 'CIN0:0,CIN1:0,CIN2:1,CIN3:1') or remove those rows."
        )

    records: list[Record] = []
    seen: Counter[str] = Counter()
    empty_patients = 0
    known = {resolved["image"], resolved["label"], patient_col, visit_col}
    for line, row in enumerate(rows, start=2):
        written = row[resolved["image"]].strip()
        path = Path(written)
        if not path.is_absolute():
            path = base / path
        path = Path(os.path.abspath(path))
        raw = row[resolved["label"]].strip()
        patient = (row.get(patient_col) or "").strip() if patient_col else ""
        if not patient:
            if patient_col:
                empty_patients += 1
            patient = Path(written).stem
        visit = (row.get(visit_col) or "").strip() if visit_col else ""
        extra = {
            k: (v or "").strip()
            for k, v in row.items()
            if k not in known and k is not None and isinstance(v, str)
        }
        seen[str(path)] += 1
        records.append(
            Record(
                path=path,
                label=lmap(raw),
                raw_label=raw,
                patient=patient,
                visit=visit or None,
                extra=extra,
                row=line,
            )
        )
    if empty_patients:
        warnings.warn(
            f"manifest {csv_path}: {empty_patients} row(s) have an empty '{patient_col}' cell; "
            "those images are treated as their own patients (id = file stem)",
            UserWarning,
            stacklevel=2,
        )
    _check_consistent_rows(csv_path, records)
    if not allow_outside_root:
        inside = os.path.abspath(base)
        outside = [r for r in records if os.path.commonpath([inside, str(r.path)]) != inside]
        if outside:
            listed = _list_some([f"line {r.row}: {r.path}" for r in outside])
            raise ManifestError(
                f"manifest {csv_path}: {len(outside)} image path(s) lead outside the data root "
                f"{inside} ({listed}). Keep the images under the root (set it with "
                "data.image_root), or allow this with data.allow_outside_root: true."
            )
    dups = sorted(p for p, c in seen.items() if c > 1)
    if dups:
        warnings.warn(
            f"manifest {csv_path}: {len(dups)} image(s) appear on more than one row: "
            f"{_list_some(dups)}",
            UserWarning,
            stacklevel=2,
        )
    if check_files:
        missing = [str(r.path) for r in records if not r.path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"manifest {csv_path}: {len(missing)} of {len(records)} image files do not "
                f"exist: {_list_some(missing)}. Relative paths are resolved against {base} "
                "(set root=, on the command line --set data.image_root=DIR, to change it)."
            )
    return records


def _check_consistent_rows(csv_path: Path, records: Sequence[Record]) -> None:
    """Refuse an image listed on several rows with different labels or patient ids."""
    rows: dict[Path, list[Record]] = {}
    for r in records:
        rows.setdefault(r.path, []).append(r)
    problems: list[str] = []
    for path, group in rows.items():
        if len(group) < 2:
            continue
        lines = ", ".join(str(r.row) for r in group)
        labels = sorted({r.raw_label for r in group if _norm(r.raw_label)}, key=_norm)
        if len({_norm(r.raw_label) for r in group}) > 1:
            problems.append(f"{path} (lines {lines}) is labelled {' and '.join(labels)}")
        patients = sorted({r.patient for r in group})
        if len(patients) > 1:
            problems.append(f"{path} (lines {lines}) belongs to patients {' and '.join(patients)}")
    if problems:
        raise ManifestError(
            f"manifest {csv_path}: {len(problems)} contradiction(s) between rows of the same "
            f"image: {_list_some(problems)}. Keep one row per image with its true label and "
            "patient."
        )


def write_manifest(
    records: Iterable[Record],
    csv_path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write records back to a CSV (columns image, label, patient, visit, then extras).

    Args:
        records: The records.
        csv_path: Output file.
        root: When given, image paths are written relative to it (when they are under it).

    Returns:
        The written path.
    """
    records = list(records)
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    extras: list[str] = []
    for r in records:
        for k in r.extra:
            if k not in extras:
                extras.append(k)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "patient", "visit", *extras])
        for r in records:
            path = Path(r.path)
            if root is not None:
                with contextlib.suppress(ValueError):
                    path = path.relative_to(Path(os.path.abspath(root)))
            writer.writerow(
                [
                    path.as_posix(),
                    r.raw_label,
                    r.patient,
                    r.visit or "",
                    *(r.extra.get(k, "") for k in extras),
                ]
            )
    return csv_path
