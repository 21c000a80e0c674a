"""``patchssl demo``: the whole method on a synthetic dataset, in minutes on a laptop CPU.

Steps, each printed as it runs:

1. generate a seeded synthetic cervix-like dataset (:func:`patchssl.data.make_synthetic_cervix`):
   unlabeled images for pretraining, and labeled images of several images per patient, with
   the lesion box of every positive image recorded;
2. draw one patient-grouped, label-stratified split (train / val / test) used by both models;
3. pretrain the jigsaw task on the unlabeled images;
4. fine-tune the attention classifier from the pretrained encoder (SSL + attention);
5. fine-tune the same classifier from scratch (the baseline);
6. evaluate both on the held-out patients (threshold chosen on the val split; bootstrap CIs
   resampled by patient), and compare them: the paired difference of their test AUC (SSL
   minus scratch, both scored on every resample of the same patients) with its interval, and
   a verdict read from it (:func:`patchssl.metrics.paired_difference`);
7. draw attention overlays and t-SNE embedding plots, and score lesion localisation: the share
   of positive test images whose highest-weight patch overlaps the recorded lesion, beside a
   random patch (chance) and always the middle patch, each with an interval, and the gate's
   selectivity (:func:`patchssl.explain.lesion_hit_rate`);
8. write ``report.md`` and ``report.json``, ending with the verdict.

The figures are whatever the run measures; nothing is tuned on the test split.

References:
    Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
    Dysplasia Diagnosis", JIPS 2021 (Table 2, Fig. 4).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchssl.data import load_split, make_synthetic_cervix
from patchssl.engine.common import say, write_json
from patchssl.engine.config import Config, ConfigError
from patchssl.engine.data import labeled_records, make_split
from patchssl.engine.evaluation import evaluate
from patchssl.engine.explain_run import explain, format_lesion
from patchssl.engine.finetuning import finetune
from patchssl.engine.logging import echo
from patchssl.engine.pretraining import pretrain
from patchssl.metrics import format_table, paired_difference

__all__ = ["DEMO_SETTINGS", "DemoResult", "demo_config", "run_demo"]

#: Sizes of the default and the ``--fast`` demo (the default: 2 min 36 s on a 2-core x86-64 CPU,
#: measured; see docs/demo.md).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "default": {
        "num_unlabeled": 800,
        "num_patients": 160,
        "images_per_patient": 2,
        "test_size": 0.3,
        "val_size": 0.2,
        "image_size": 128,
        "patch_size": 32,
        "gap": 4,
        "backbone": "resnet10t",
        "num_permutations": 100,
        "pretrain_epochs": 5,
        "pretrain_batch_size": 32,
        "finetune_epochs": 20,
        "finetune_batch_size": 16,
        "n_boot": 1000,
        "num_overlays": 8,
    },
    "fast": {
        "num_unlabeled": 64,
        "num_patients": 30,
        "images_per_patient": 2,
        "test_size": 0.25,
        "val_size": 0.25,
        "image_size": 112,
        "patch_size": 32,
        "gap": 0,
        "backbone": "resnet10t",
        "num_permutations": 16,
        "pretrain_epochs": 2,
        "pretrain_batch_size": 16,
        "finetune_epochs": 2,
        "finetune_batch_size": 16,
        "n_boot": 200,
        "num_overlays": 4,
    },
}


def demo_config(
    out: str | Path = "patchssl-demo",
    *,
    fast: bool = False,
    seed: int = 0,
    threads: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Config:
    """The configuration the demo starts from (edit it, then pass it to :func:`run_demo`).

    Args:
        out: Output folder.
        fast: The small (about a minute) version.
        seed: Seed of the data and of every run.
        threads: CPU threads (default: every core).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: Show progress bars.

    Returns:
        A :class:`Config` with ``demo.fast`` set and the demo's model and training settings.
    """
    s = DEMO_SETTINGS["fast" if fast else "default"]
    config = Config()
    config.out = str(out)
    config.demo.fast = fast
    config.data.image_size = s["image_size"]
    config.data.workers = 0
    config.data.test_size = s["test_size"]
    config.data.val_size = s["val_size"]
    config.model.backbone = s["backbone"]
    config.model.patch_size = s["patch_size"]
    config.model.gap = s["gap"]
    config.pretext.name = "jigsaw"
    # 1000 permutations: the paper's count, i.e. the shipped max-Hamming set
    perms = s["num_permutations"]
    config.pretext.options = {} if perms == 1000 else {"num_permutations": perms}
    config.train.batch_size = s["finetune_batch_size"]
    config.train.seed = seed
    config.train.device = device
    config.train.num_threads = threads or os.cpu_count() or 1
    config.train.progress = progress
    config.train.warmup_epochs = 1.0
    config.train.patience = 0
    config.train.tensorboard = "false"
    config.eval.n_boot = s["n_boot"]
    config.explain.num_images = s["num_overlays"]
    return config


@dataclass
class DemoResult:
    """What the demo wrote and measured.

    Attributes:
        out_dir: Output folder.
        report_md: ``report.md``.
        report_json: ``report.json``.
        reports: ``{row name: patchssl.metrics.EvaluationReport}`` of the test split.
        lesion: ``{row name: lesion-localisation dict}``.
        comparison: The :class:`patchssl.metrics.PairedDifference` of the test AUC, SSL minus
            scratch, with its verdict.
        seconds: Wall time of each stage and in total.
    """

    out_dir: Path
    report_md: Path
    report_json: Path
    reports: dict[str, Any] = field(default_factory=dict)
    lesion: dict[str, Any] = field(default_factory=dict)
    comparison: Any = None
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(config: Config | None = None) -> DemoResult:
    """Run the demo (see the module docstring for the steps).

    Args:
        config: From :func:`demo_config` (default: ``demo_config()``).

    Returns:
        The :class:`DemoResult`.
    """
    config = (config or demo_config()).copy()
    s = DEMO_SETTINGS["fast" if config.demo.fast else "default"]
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config.out = str(out)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    mode = "fast" if config.demo.fast else "default"
    say(
        f"demo ({mode}) in {out}: {torch.get_num_threads()} CPU thread(s), "
        f"backbone {config.model.backbone}, {config.data.image_size} px images, "
        f"{config.model.grid}x{config.model.grid} patches of {config.model.patch_size} px"
    )

    # 1. data ------------------------------------------------------------------------------
    t = time.perf_counter()
    data_dir = out / "data"
    say(
        f"[1/7] generating the synthetic dataset: {s['num_unlabeled']} unlabeled images, "
        f"{s['num_patients']} patients x {s['images_per_patient']} labeled images"
    )
    synthetic = make_synthetic_cervix(
        data_dir,
        num_unlabeled=s["num_unlabeled"],
        num_patients=s["num_patients"],
        images_per_patient=s["images_per_patient"],
        image_size=config.data.image_size,
        positive_fraction=0.4,
        seed=config.train.seed,
        progress=config.train.progress,
    )
    config.data.unlabeled = str(synthetic.unlabeled_dir)
    config.data.manifest = str(synthetic.manifest)
    config.data.label_map = "cervix"
    seconds["data"] = time.perf_counter() - t

    # 2. split ------------------------------------------------------------------------------
    say("[2/7] splitting the labeled images by patient (train / val / test)")
    records = labeled_records(config)
    make_split(config, records, out)
    config.data.split = str(out / "split.json")

    # 3. pretraining ------------------------------------------------------------------------
    t = time.perf_counter()
    say(f"[3/7] pretraining the jigsaw task ({s['pretrain_epochs']} epochs)")
    pre = config.copy()
    pre.out = str(out / "pretrain")
    pre.train.epochs = s["pretrain_epochs"]
    pre.train.batch_size = s["pretrain_batch_size"]
    pre.train.lr = 2e-3
    pre.train.weight_decay = 1e-4
    pre.train.class_weights = "none"
    pre.train.overwrite = True  # the demo regenerates its whole folder
    pre_result = pretrain(pre)
    seconds["pretrain"] = time.perf_counter() - t

    # 4-5. fine-tuning ----------------------------------------------------------------------
    runs = {
        "SSL (jigsaw) + attention": ("ssl_attention", str(pre_result.best_checkpoint)),
        "From scratch + attention": ("scratch_attention", None),
    }
    results: dict[str, Any] = {}
    for step, (name, (folder, init)) in enumerate(runs.items(), start=4):
        t = time.perf_counter()
        say(f"[{step}/7] fine-tuning: {name} ({s['finetune_epochs']} epochs)")
        ft = config.copy()
        ft.out = str(out / folder)
        ft.model.init = init
        ft.train.overwrite = True
        ft.train.epochs = s["finetune_epochs"]
        ft.train.lr = 1e-3
        ft.train.weight_decay = 1e-4
        results[name] = finetune(ft)
        seconds[f"finetune_{folder}"] = time.perf_counter() - t

    # 6-7. evaluation and explanation --------------------------------------------------------
    t = time.perf_counter()
    say("[6/7] evaluating both models on the held-out patients")
    reports: dict[str, Any] = {}
    evaluations: dict[str, Any] = {}
    for name, (folder, _) in runs.items():
        ev = config.copy()
        ev.out = str(out / folder)
        ev.eval.checkpoint = str(out / folder / "best.pt")
        evaluations[name] = evaluate(ev, name=name)
        reports[name] = evaluations[name].test
    ssl_name, scratch_name = runs
    comparison = _compare(
        evaluations[ssl_name].test_predictions,
        evaluations[scratch_name].test_predictions,
        n_boot=config.eval.n_boot,
        alpha=1.0 - config.eval.ci,
        seed=config.train.seed,
    )
    seconds["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    say("[7/7] attention overlays, embedding plots and lesion localisation")
    lesion: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    for name, (folder, _) in runs.items():
        ex = config.copy()
        ex.out = str(out / folder)
        ex.explain.checkpoint = str(out / folder / "best.pt")
        ex.explain.split = "test"
        result = explain(ex)
        lesion[name] = result.lesion
        figures[name] = {
            "overlays": [str(p.relative_to(out)) for p in result.overlays],
            "grid": str(result.grid.relative_to(out)) if result.grid else None,
            "embedding": str(result.embedding.relative_to(out)) if result.embedding else None,
        }
    seconds["explain"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    # 8. report -----------------------------------------------------------------------------
    table = format_table(reports)
    pretext_row = pre_result.history[-1] if pre_result.history else {}
    report = {
        "mode": mode,
        "seed": config.train.seed,
        "machine": {
            "threads": torch.get_num_threads(),
            "device": str(config.train.device),
            "torch": torch.__version__,
        },
        "data": {
            "unlabeled": synthetic.num_unlabeled,
            "labeled": synthetic.num_labeled,
            "patients": synthetic.num_patients,
            "positive_images": synthetic.num_positive,
            "split": {k: len(v) for k, v in _split_counts(out / "split.json").items()},
        },
        "settings": s,
        "pretraining": {
            "epochs": len(pre_result.history),
            "final": pretext_row,
            "chance_accuracy": 1.0 / s["num_permutations"],
        },
        "results": {
            name: {
                "test": reports[name].to_dict(),
                "threshold": evaluations[name].threshold,
                "best_epoch": (results[name].best_epoch or 0) + 1,
                "lesion_localisation": lesion[name],
                "figures": figures[name],
            }
            for name in runs
        },
        "comparison": {
            "models": [ssl_name, scratch_name],
            "description": f"{ssl_name} minus {scratch_name}, test AUC, paired by patient",
            **comparison.to_dict(),
        },
        "seconds": seconds,
    }
    report_json = write_json(out / "report.json", report)
    report_md = out / "report.md"
    report_md.write_text(_markdown(report, table, runs), encoding="utf-8")
    echo("\n" + table)
    for name in runs:
        les = lesion[name]
        if les and les.get("count"):
            say(f"{name}: {format_lesion(les)}")
    say(f"verdict: {_verdict_sentence(report['comparison'])}")
    say(f"demo finished in {seconds['total']:.0f} s; report: {report_md}")
    return DemoResult(
        out_dir=out,
        report_md=report_md,
        report_json=report_json,
        reports=reports,
        lesion=lesion,
        comparison=comparison,
        seconds=seconds,
    )


def _compare(ssl: Any, scratch: Any, *, n_boot: int, alpha: float, seed: int) -> Any:
    """Paired AUC difference of two models' test predictions (matched by image path)."""
    where = {path: i for i, path in enumerate(scratch.paths)}
    if sorted(where) != sorted(ssl.paths):
        raise ConfigError("the two models were not scored on the same test images")
    order = np.array([where[p] for p in ssl.paths], dtype=np.int64)
    if not np.array_equal(ssl.labels, scratch.labels[order]):  # pragma: no cover - same split
        raise ConfigError("the two models' test labels disagree")
    groups = ssl.patients if all(ssl.patients) else None
    return paired_difference(
        ssl.labels,
        ssl.scores,
        scratch.scores[order],
        groups=groups,
        metric="auc",
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
    )


def _verdict_sentence(c: dict[str, Any]) -> str:
    a, b = c["models"]

    def pts(x: Any) -> str:
        return "n/a" if x is None else f"{100 * x:+.1f}"

    lo, hi = c["ci"]
    level = round(100 * (1 - c["alpha"]))
    numbers = (
        f"test AUC {100 * (c['value_a'] or float('nan')):.1f} against "
        f"{100 * (c['value_b'] or float('nan')):.1f}, a paired difference of "
        f"{pts(c['value'])} points [{level}% CI {pts(lo)}, {pts(hi)}; {c['n_valid']} resamples "
        f"by {c['resampled_by']}]"
    )
    if c["verdict"] == "better":
        return f"{a} is better than {b}: {numbers}; the interval lies above 0."
    if c["verdict"] == "worse":
        return f"{a} is worse than {b}: {numbers}; the interval lies below 0."
    if c["verdict"] == "undefined":
        return f"No comparison: the AUC is undefined on the test resamples ({numbers})."
    return (
        f"No difference detectable at this size between {a} and {b}: {numbers}; the interval "
        "holds 0, so this test set cannot tell the two apart (which does not show that they are "
        "equal)."
    )


def _split_counts(path: Path) -> dict[str, list[str]]:
    try:
        return load_split(path)
    except (OSError, ValueError) as err:  # pragma: no cover - written just before
        raise ConfigError(str(err)) from err


def _pct(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def _pct_ci(value: Any, ci: Any) -> str:
    lo, hi = ci if ci else (None, None)
    if value is None or value != value:
        return "n/a"

    def pct(x: Any) -> str:
        return "n/a" if x is None or x != x else f"{100 * x:.1f}"

    return f"{100 * value:.1f}% [{pct(lo)}, {pct(hi)}]"


def _num(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _markdown(report: dict[str, Any], table: str, runs: dict[str, Any]) -> str:
    d, p, sec = report["data"], report["pretraining"], report["seconds"]
    final = p["final"]
    lines = [
        "# patchssl demo report",
        "",
        f"Synthetic cervix-like data (seed {report['seed']}, {report['mode']} settings): "
        f"{d['unlabeled']} unlabeled images for pretraining; {d['labeled']} labeled images of "
        f"{d['patients']} patients ({d['positive_images']} positive), split by patient into "
        + ", ".join(f"{k} {v}" for k, v in d["split"].items())
        + " images. Both models share the split, the backbone "
        f"({report['settings']['backbone']}), the attention head and the fine-tuning recipe; "
        "only the encoder's starting point differs.",
        "",
        f"Jigsaw pretraining: {p['epochs']} epochs, final validation accuracy "
        f"{_pct(final.get('val_acc'))} over {report['settings']['num_permutations']} "
        f"permutations (chance {_pct(p['chance_accuracy'])}).",
        "",
        "## Test metrics",
        "",
        "Threshold chosen on the validation split (Youden's J); values in percent with 95% "
        "bootstrap intervals resampled by patient. The test split is small, so the intervals "
        "are wide: read differences between the rows with them in mind.",
        "",
        table.rstrip(),
        "",
        "## Lesion localisation",
        "",
        "Share of positive test images whose highest-weight patch overlaps the recorded lesion "
        "(hit rate), beside the rate of always choosing the middle patch and of a randomly "
        "chosen patch (chance), each with a 95% interval resampled by patient (exact where a "
        "rate is 0% or 100%). Attention only localises if it beats both. Selectivity: the mean "
        "over test images of the highest minus the lowest patch weight (0 = a flat gate) and "
        "the normalised entropy of the weights (1 = all equal).",
        "",
        "| Model | Hit rate | Hits / images | Middle patch | Chance | Weight range | Entropy |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in runs:
        les = report["results"][name]["lesion_localisation"] or {}
        sel = les.get("selectivity") or {}
        hits = les.get("hits", 0)
        lines.append(
            f"| {name} | {_pct_ci(les.get('hit_rate'), les.get('hit_rate_ci'))} "
            f"| {hits:g}/{les.get('count', 0)} "
            f"| {_pct_ci(les.get('centre_patch_rate'), les.get('centre_patch_ci'))} "
            f"| {_pct_ci(les.get('chance'), les.get('chance_ci'))} "
            f"| {_num(sel.get('weight_range'))} | {_num(sel.get('weight_entropy'))} |"
        )
    ties = {
        name: (report["results"][name]["lesion_localisation"] or {}).get("ties", 0) for name in runs
    }
    lines.append("")
    for name in runs:
        vs = (report["results"][name]["lesion_localisation"] or {}).get("vs_centre")
        if vs and vs.get("value") is not None and vs["value"] == vs["value"]:
            lo, hi = vs["ci"]
            lines.append(
                f"- {name}: hit rate minus middle patch {100 * vs['value']:+.1f} points "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}], paired by patient: {vs['verdict']}."
            )
    if any(ties.values()):
        lines += [
            "",
            "Tied top weights (each such image counts the share of its tied top patches on the "
            "lesion): " + ", ".join(f"{k} {v}" for k, v in ties.items()) + ".",
        ]
    lines += ["", "## Figures", ""]
    for name in runs:
        fig = report["results"][name]["figures"]
        if fig.get("grid"):
            lines.append(f"{name}, attention on test images (Fig. 4b style):")
            lines.append("")
            lines.append(f"![attention {name}]({fig['grid']})")
            lines.append("")
        if fig.get("embedding"):
            lines.append(f"{name}, t-SNE of the classifier features (Fig. 4a style):")
            lines.append("")
            lines.append(f"![embedding {name}]({fig['embedding']})")
            lines.append("")
    lines += [
        "## Time",
        "",
        ", ".join(f"{k} {v:.0f} s" for k, v in sec.items()),
        "",
        "## Verdict",
        "",
        "The two models are compared on the same test patients: the difference of their test "
        "AUC, with an interval from resampling patients jointly for both. A synthetic test set "
        "shows the pipeline working and how wide the uncertainty is; it does not say whether "
        "pretraining helps on real photographs.",
        "",
        "**Verdict:** " + _verdict_sentence(report["comparison"]),
        "",
    ]
    return "\n".join(lines)
