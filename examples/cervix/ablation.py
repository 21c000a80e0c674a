"""The ablation of Chae et al. (JIPS 2021, Table 2) on your cervix images, or synthetic ones.

Four rows per backbone, trained and tested on one shared patient-grouped split (or on each of
``--folds K`` patient-grouped folds): (a) from scratch; (b) ``+ SSL``, from the encoder
pretrained on the jigsaw puzzle; (c) ``+ AL``, from scratch with the config's patch attention
(``model.attention``: the paper's sigmoid gate in ``configs/paper.yaml`` and
``configs/cpu_quick.yaml``, the library's default softmax pooling without a config);
(d) ``+ SSL + AL``, both (the paper's method). Rows (a) and (b) have no attention; every row
keeps the config's head. The jigsaw task is pretrained once per backbone,
on the unlabeled images only. The script prints, and writes to ``OUT/ablation.md``, the
paper's metrics with 95% intervals that resample patients, then the paired AUC difference
(d) minus (c) on the same test patients: does self-supervision help the attention model?

    # the synthetic cervix-like benchmark, small enough for a CPU
    python examples/cervix/ablation.py --synthetic --quick --out runs/ablation-synthetic

    # your data (a folder with unlabeled/ and labeled.csv), the paper's setup, 5 folds
    python examples/cervix/ablation.py --data /data/cervix \\
        --config examples/cervix/configs/paper.yaml --folds 5 --out runs/ablation

Each row is a run folder (``OUT/resnet50_ssl_al``, ``OUT/fold0/...``) with its checkpoints,
``eval.json`` and predictions (``patchssl explain --out OUT/resnet50_ssl_al`` draws its
attention). ``benchmarks/bench_transfer.py`` ranks the rows over label budgets and seeds.

References: Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised
Learning for Cervical Dysplasia Diagnosis." JIPS 17(3), 2021. Noroozi, Favaro. "Unsupervised
Learning of Visual Representations by Solving Jigsaw Puzzles." ECCV 2016.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from patchssl.data import (
    kfold_records,
    make_synthetic_cervix,
    sample_patients,
    save_split,
    split_records,
)
from patchssl.engine import evaluate, finetune, load_config, pretrain
from patchssl.engine.data import labeled_records
from patchssl.metrics import format_fold_table, format_table, paired_difference

#: ``--quick``: CPU-sized settings (3x3 patches of 32 px, the smallest ResNet50 and VGG16 take).
QUICK = {
    "overrides": [
        "data.image_size=112", "model.patch_size=32", "pretext.options.num_permutations=64",
        "train.epochs=5", "train.batch_size=8", "train.patience=0", "data.workers=0",
        "train.progress=false", "train.tensorboard=false",
    ],
    "pretrain_epochs": 2, "label_budget": 12, "synthetic": (96, 90, 2),
}  # fmt: skip
#: The rows (a)-(d): (start from the jigsaw encoder, the config's patch attention).
ROWS = [(ssl, attention) for attention in (False, True) for ssl in (False, True)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="folder with unlabeled/ and labeled.csv")
    source.add_argument("--synthetic", action="store_true", help="make synthetic cervix images")
    p.add_argument("--config", help="base config, e.g. examples/cervix/configs/paper.yaml")
    p.add_argument("--out", default="runs/cervix-ablation", help="output folder")
    p.add_argument("--backbones", nargs="+", default=["resnet50", "vgg16"], help="timm names")
    p.add_argument("--label-budget", type=int, metavar="PATIENTS", help="training patients")
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation (0: one split)")
    p.add_argument("--pretrain-epochs", type=int, help="default: train.epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, splits and training")
    p.add_argument("--quick", action="store_true", help=f"CPU-sized settings: {QUICK}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the ablation; return the Markdown report it printed and wrote."""
    args = parse_args(argv)
    out, quick = Path(args.out).resolve(), QUICK if args.quick else {}
    overrides = [*quick.get("overrides", []), f"train.seed={args.seed}", *args.overrides]
    config = load_config(args.config, overrides)
    if config.model.attention == "none":
        raise SystemExit(
            "the + AL rows need a patch attention: set model.attention (sigmoid, softmax or "
            "gated) in the config or with --set model.attention=sigmoid"
        )
    if args.synthetic:  # 96 unlabeled images, 90 patients x 2 (--quick), or 400, 100 x 2
        n_unlabeled, n_patients, per = quick.get("synthetic", (400, 100, 2))
        data = make_synthetic_cervix(
            out / "data", num_unlabeled=n_unlabeled, num_patients=n_patients,
            images_per_patient=per, image_size=config.data.image_size, seed=args.seed,
        )  # fmt: skip
        config.data.unlabeled, config.data.manifest = str(data.unlabeled_dir), str(data.manifest)
    else:
        config.data.unlabeled = str(Path(args.data) / "unlabeled")
        config.data.manifest = str(Path(args.data) / "labeled.csv")

    # One split (or K folds) for every row, saved; each training part cut to the label budget.
    records, d = labeled_records(config), config.data
    if args.folds > 1:
        layouts = kfold_records(records, n_splits=args.folds, val_size=d.val_size, seed=args.seed)
    else:  # data.val_size is a share of the non-test part
        val = d.val_size * (1.0 - d.test_size)
        layouts = [split_records(records, test_size=d.test_size, val_size=val, seed=args.seed)]
    budget = args.label_budget or quick.get("label_budget")
    splits = []
    for k, parts in enumerate(layouts):
        parts["train"] = sample_patients(parts["train"], budget, seed=args.seed + k)
        name = f"split_fold{k}.json" if len(layouts) > 1 else "split.json"
        splits.append(save_split(out / name, parts, meta={"seed": args.seed, "budget": budget}))

    reports, differences = {}, []  # {row name: one test report per split}, table lines
    for backbone in args.backbones:
        cfg = config.copy()
        cfg.out, cfg.model.backbone = str(out / f"pretrain_{backbone}"), backbone
        cfg.train.epochs = args.pretrain_epochs or quick.get("pretrain_epochs", cfg.train.epochs)
        checkpoint = pretrain(cfg).best_checkpoint
        for k, split in enumerate(splits):
            scores, fold = {}, f"fold{k}" if len(splits) > 1 else ""
            for ssl, attention in ROWS:
                cfg, name = config.copy(), backbone + " + SSL" * ssl + " + AL" * attention
                folder = f"{backbone}_{'ssl' if ssl else 'scratch'}_{'al' if attention else 'noal'}"
                cfg.out = str(out / fold / folder)
                cfg.model.backbone, cfg.data.split = backbone, str(split)
                cfg.model.attention = config.model.attention if attention else "none"
                cfg.model.init = str(checkpoint) if ssl else None
                cfg.eval.checkpoint = str(finetune(cfg).best_checkpoint)
                result = evaluate(cfg, name=name)
                reports.setdefault(name, []).append(result.test)
                scores[ssl, attention] = result.test_predictions
            ssl_al, scratch_al = scores[True, True], scores[False, True]
            assert list(ssl_al.paths) == list(scratch_al.paths)  # the same test images
            diff = paired_difference(
                ssl_al.labels, ssl_al.scores, scratch_al.scores, groups=ssl_al.patients,
                metric="auc", n_boot=config.eval.n_boot, seed=args.seed,
            )  # fmt: skip
            aucs = f"{100 * diff.value_a:.2f} | {100 * diff.value_b:.2f}"
            differences.append(f"| {backbone} | {fold or 'all'} | {aucs} | {diff} |")

    if len(splits) > 1:
        table = format_fold_table(reports)
    else:
        table = format_table({name: folds[0] for name, folds in reports.items()})
    report = (
        f"{table}\n| Backbone | Fold | AUC + SSL + AL (%) | AUC + AL (%) | Difference [95% CI] |\n"
        "|:---|:---|---:|---:|:---|\n" + "\n".join(differences) + "\n"
    )
    (out / "ablation.md").write_text(report, encoding="utf-8")
    print(report)
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # a bad option, path, split or budget (ConfigError is one)
        raise SystemExit(f"ablation.py: error: {err}") from None
