"""`patchssl demo --fast` end to end: report, figures, both rows of metrics."""

from __future__ import annotations

import json

from patchssl.cli import main
from patchssl.engine.demo import demo_config


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"outputs written to {out}" in printed and "[7/7]" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "fast"
    rows = report["results"]
    assert set(rows) == {"SSL (jigsaw) + attention", "From scratch + attention"}
    for row in rows.values():
        metrics, ci = row["test"]["metrics"], row["test"]["ci"]
        for key in ("accuracy", "specificity", "sensitivity", "precision", "auc", "f1"):
            assert key in metrics and key in ci
        assert row["test"]["resampled_by"] == "patient"
        lesion = row["lesion_localisation"]
        assert lesion["count"] > 0 and 0.0 <= lesion["chance"] <= 1.0
        for png in [
            *row["figures"]["overlays"],
            row["figures"]["grid"],
            row["figures"]["embedding"],
        ]:
            assert (out / png).is_file() and (out / png).read_bytes()[:4] == b"\x89PNG"
        # the hit rate stands beside its baselines, each with an interval
        for key in ("hit_rate", "centre_patch_rate", "chance"):
            assert 0.0 <= lesion[key] <= 1.0
        for key in ("hit_rate_ci", "centre_patch_ci", "chance_ci"):
            low, high = lesion[key]
            assert 0.0 <= low <= high <= 1.0
        assert set(lesion["selectivity"]) == {"weight_range", "weight_entropy"}
    # the verdict: the paired AUC difference of the two rows on the same patients
    comparison = report["comparison"]
    ssl, scratch = (rows[name]["test"]["metrics"]["auc"] for name in comparison["models"])
    assert comparison["metric"] == "auc" and comparison["resampled_by"] == "patient"
    assert abs(comparison["value"] - (ssl - scratch)) < 1e-9
    low, high = comparison["ci"]
    expected = "better" if low > 0 else "worse" if high < 0 else "no difference detectable"
    assert comparison["verdict"].startswith(expected)
    markdown = (out / "report.md").read_text()
    assert markdown.rstrip().splitlines()[-1].startswith("**Verdict:**")
    assert "[100.00, 100.00]" not in markdown and "[0.00, 0.00]" not in markdown
    assert "| SSL (jigsaw) + attention |" in markdown
    assert "| From scratch + attention |" in markdown
    assert "Lesion localisation" in markdown
    # both models were evaluated on the same held-out patients
    test_sets = {
        tuple(r["test"]["counts"][k] for k in ("n", "n_positive", "n_negative", "n_groups"))
        for r in rows.values()
    }
    assert len(rows) == 2 and len(test_sets) == 1, test_sets
    assert report["seconds"]["total"] > 0


def test_demo_config_builds_a_geometry_that_cuts_its_images():
    """What the demo's configs build, not what their table says: the tiler fits the images,
    the pretext task takes the configured permutations, and --fast is the smaller run."""
    import torch

    from patchssl.engine.common import build_tiler
    from patchssl.engine.pretraining import build_pretext

    sizes = {}
    for fast in (False, True):
        config = demo_config(fast=fast)
        tiler = build_tiler(config)
        images = torch.zeros(
            2, 3, config.data.image_size, config.data.image_size, dtype=torch.uint8
        )
        patches = tiler.eval()(images).patches
        assert patches.shape[1:3] == (9, 3)  # a 3x3 grid of RGB patches
        task = build_pretext(config, torch.device("cpu"))
        assert task.num_classes == config.pretext.options["num_permutations"]
        sizes[fast] = (config.data.image_size, task.num_classes, config.train.epochs)
    assert all(f <= d for f, d in zip(sizes[True], sizes[False], strict=True))
    assert sizes[True] != sizes[False]
    assert demo_config().out == "patchssl-demo"  # the folder the README's Quickstart names
    assert demo_config(fast=True, seed=3).train.seed == 3
