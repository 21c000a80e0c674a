"""Which timm backbones SharedPatchEncoder supports at the paper's geometry: a docs table.

Builds each family's representative (the real-size names users pick; random initialisation,
nothing downloaded) at 153 px patches, runs one image's 3x3 patches (B=1, N=9) through it in
eval mode, finds the smallest patch it accepts, and prints a Markdown table. With
``--write docs/backbones.md`` it replaces the text between the ``<!-- table:start -->`` and
``<!-- table:end -->`` markers of that page.

Usage:
    python benchmarks/backbone_table.py [--patch-size 153] [--write docs/backbones.md]
"""

from __future__ import annotations

import argparse
import gc
import re
import time
from pathlib import Path

import torch
from _common import describe_machine

from patchssl.encoder import SharedPatchEncoder

START, END = "<!-- table:start -->", "<!-- table:end -->"

# (family, timm name, notes)
FAMILIES = [
    ("ResNet", "resnet50", "the paper's first backbone"),
    ("ResNeXt", "resnext50_32x4d", ""),
    ("VGG", "vgg16", "the paper's second backbone; feature map average pooled (see below)"),
    ("DenseNet", "densenet121", ""),
    ("EfficientNet", "efficientnet_b0", ""),
    ("MobileNetV3", "mobilenetv3_large_100", "1x1 conv_head after pooling"),
    ("RegNet", "regnety_008", ""),
    ("ConvNeXt", "convnext_tiny", ""),
    ("ViT", "vit_small_patch16_224", "gets img_size=patch_size; multiples of 16 px"),
]


def _params(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M"


def _try(name: str, patch: int) -> tuple[SharedPatchEncoder | None, str]:
    try:
        return SharedPatchEncoder(name, patch_size=patch), ""
    except ValueError as err:
        return None, str(err)


def _smallest(name: str, hint: tuple[int, int] | None) -> str:
    """The smallest square patch that builds (the dry run included), checked, not guessed."""
    start = hint[0] if hint else 8
    for size in range(start, 257, hint[0] if hint else 8):
        enc, _ = _try(name, size)
        if enc is not None:
            del enc
            return f"{size} px"
    return "> 256 px"


def _grad_ckpt(enc: SharedPatchEncoder) -> str:
    try:
        enc.set_grad_checkpointing(True)
        enc.set_grad_checkpointing(False)
    except ValueError:
        return "no"
    return "yes"


def build_table(patch: int) -> str:
    lines = [
        f"| family | timm name | out_dim | params | smallest patch | forward at {patch} px | "
        "grad checkpointing | notes |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(0)
    for family, name, notes in FAMILIES:
        start = time.perf_counter()
        enc, error = _try(name, patch)
        used = patch
        status = "yes"
        if enc is None:
            status = f"no: {error.split(';')[0].split(':')[0]}"
            # A ViT needs a multiple of its token size: take the nearest one above.
            match = re.search(r"use (\d+) or (\d+) px", error)
            if match:
                used = int(match.group(2))
                enc, error = _try(name, used)
                status = f"no ({patch} is not a multiple of 16); yes at {used} px"
        if enc is None:
            lines.append(f"| {family} | `{name}` | - | - | - | {status} | - | {error} |")
            continue
        enc.eval()
        patches = torch.randint(0, 256, (1, 9, 3, used, used), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            feats = enc(patches)
        ok = feats.shape == (1, 9, enc.out_dim) and bool(torch.isfinite(feats).all())
        if not ok:
            status = f"no: output {tuple(feats.shape)}"
        smallest = _smallest(name, enc.min_patch_size)
        width = getattr(enc.backbone, "num_features", enc.out_dim)
        if width != enc.out_dim:
            extra = f"out_dim = head_hidden_size {enc.out_dim}, num_features {width}"
            notes = f"{notes}; {extra}" if notes else extra
        row = (
            f"| {family} | `{name}` | {enc.out_dim} | {_params(enc)} | {smallest} | {status} | "
            f"{_grad_ckpt(enc)} | {notes} |"
        )
        lines.append(row)
        print(row, f"({time.perf_counter() - start:.1f} s)", flush=True)
        del enc, feats
        gc.collect()
    command = f"python benchmarks/backbone_table.py --patch-size {patch} --write docs/backbones.md"
    lines += [
        "",
        f"Random initialisation, B=1 image of N=9 patches, eval mode, CPU. Machine: "
        f"{describe_machine()}. Produced by `{command}`.",
    ]
    return "\n".join(lines)


def write_into(path: Path, table: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: markers {START} and {END} not found")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), flags=re.S)
    path.write_text(pattern.sub(lambda _m: f"{START}\n{table}\n{END}", text, count=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch-size", type=int, default=153)
    parser.add_argument("--write", type=Path, help="Markdown page to update between markers")
    args = parser.parse_args()
    table = build_table(args.patch_size)
    print()
    print(table)
    if args.write:
        write_into(args.write, table)
        print(f"\nwritten into {args.write}")


if __name__ == "__main__":
    main()
