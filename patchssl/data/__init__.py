"""Data: decoding, datasets, CSV manifests, the resize cache, splits and a synthetic dataset.

Data loaders only decode images and hand over uint8 tensors of shape ``(B, C, H, W)``; tiling,
shuffling and normalisation happen later, on the device (see :mod:`patchssl.tiling`).
"""

from __future__ import annotations

from patchssl.data.datasets import (
    ImageFolderDataset,
    ManifestDataset,
    collate_skip_failed,
    default_workers,
    find_images,
    make_loader,
    seed_worker,
)
from patchssl.data.io import (
    IMAGE_EXTENSIONS,
    RESIZE_MODES,
    ImageReadError,
    load_image,
    load_pil_image,
    resize_image,
    to_8bit,
)
from patchssl.data.manifest import (
    BINARY_LABEL_MAP,
    CERVIX_LABEL_MAP,
    LabelMap,
    ManifestError,
    Record,
    read_manifest,
    write_manifest,
)
from patchssl.data.prepare import PrepareReport, cache_path, map_records_to_cache, prepare_images
from patchssl.data.splits import (
    Overlap,
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
from patchssl.data.synthetic import (
    CervixParams,
    SyntheticDataset,
    lesion_center,
    make_synthetic_cervix,
    render_cervix,
    sample_cervix_params,
)

__all__ = [
    "BINARY_LABEL_MAP",
    "CERVIX_LABEL_MAP",
    "IMAGE_EXTENSIONS",
    "RESIZE_MODES",
    "CervixParams",
    "ImageFolderDataset",
    "ImageReadError",
    "LabelMap",
    "ManifestDataset",
    "ManifestError",
    "Overlap",
    "PrepareReport",
    "Record",
    "SyntheticDataset",
    "cache_path",
    "collate_skip_failed",
    "default_workers",
    "exclude_overlap",
    "find_images",
    "find_overlap",
    "grouped_kfold",
    "grouped_stratified_split",
    "kfold_records",
    "lesion_center",
    "load_image",
    "load_pil_image",
    "load_split",
    "make_loader",
    "make_synthetic_cervix",
    "map_records_to_cache",
    "prepare_images",
    "read_manifest",
    "records_from_split",
    "render_cervix",
    "resize_image",
    "sample_cervix_params",
    "sample_patients",
    "save_split",
    "seed_worker",
    "split_records",
    "to_8bit",
    "write_manifest",
]
