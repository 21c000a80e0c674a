"""Tests of the examples: the cervix configs load, and the ablation runner works end to end.

The ablation runner lives in ``examples/cervix/ablation.py`` (not a package module), so it is
loaded from its file. The end-to-end run uses the tiniest settings (96 px images, 3x3 patches
of 32 px, timm's ``test_resnet``, one epoch) to stay well under a minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "cervix" / "configs"


def _load_ablation() -> ModuleType:
    path = ROOT / "examples" / "cervix" / "ablation.py"
    spec = importlib.util.spec_from_file_location("patchssl_example_ablation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation() -> ModuleType:
    return _load_ablation()


# ----------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["paper.yaml", "cpu_quick.yaml"])
def test_configs_load_and_build_a_tiler(name: str) -> None:
    from patchssl.engine.common import build_tiler
    from patchssl.engine.config import load_config

    config = load_config(CONFIGS / name)
    tiler = build_tiler(config)  # refuses patches that do not fit the image
    assert tiler.num_patches == 9
    assert config.pretext.name == "jigsaw"
    assert config.data.label_map == "cervix"


def test_paper_config_builds_the_papers_pipeline() -> None:
    # What the config builds, not what it says: the paper's geometry (3x3 patches of 153 px in
    # 512 px images, the library's paper-proportion default), a 1,000-permutation jigsaw
    # task with the shipped set, a ResNet50 encoder and an 80/20 split.
    import torch

    from patchssl.engine.common import build_tiler
    from patchssl.engine.config import load_config
    from patchssl.engine.pretraining import build_pretext
    from patchssl.permutations import PermutationSet
    from patchssl.tiling import default_tiler

    c = load_config(CONFIGS / "paper.yaml")
    assert build_tiler(c).config == default_tiler(153).config
    assert default_tiler(153).image_size == (512, 512)
    c.model.backbone = "resnet18"  # the same task, lighter to build in a test
    task = build_pretext(c, torch.device("cpu"))
    assert task.permutation_fingerprint == PermutationSet.default().fingerprint
    assert task.num_classes == 1000
    assert load_config(CONFIGS / "paper.yaml").model.backbone == "resnet50"
    assert c.data.test_size == pytest.approx(0.2)


def test_quick_config_is_small() -> None:
    from patchssl.engine.config import load_config

    c = load_config(CONFIGS / "cpu_quick.yaml")
    assert c.data.image_size <= 224
    assert c.model.backbone == "resnet18"
    assert c.train.epochs <= 10


# ------------------------------------------------------------------------------ label budget
class _Rec:
    def __init__(self, path: str, label: int, patient: str) -> None:
        self.path, self.label, self.patient = path, label, patient


def _records(num_pos: int, num_neg: int, per: int = 2) -> list[_Rec]:
    recs = []
    for i in range(num_pos + num_neg):
        label = int(i < num_pos)
        recs += [_Rec(f"p{i}_{k}.png", label, f"p{i}") for k in range(per)]
    return recs


def test_apply_budget_keeps_whole_patients_and_the_class_balance(ablation: ModuleType) -> None:
    recs = _records(num_pos=12, num_neg=18)
    kept = ablation.apply_budget(recs, 10, seed=3)
    patients = {r.patient for r in kept}
    assert len(patients) == 10
    # Reference: every image of a kept patient is kept, none of the others.
    assert kept == [r for r in recs if r.patient in patients]
    positives = {r.patient for r in kept if r.label == 1}
    assert len(positives) == round(10 * 12 / 30)
    assert ablation.apply_budget(recs, 10, seed=3) == kept  # seeded
    assert ablation.apply_budget(recs, None, seed=3) == recs
    assert ablation.apply_budget(recs, 100, seed=3) == recs
    with pytest.raises(ValueError, match="at least 2"):
        ablation.apply_budget(recs, 1, seed=0)


def test_apply_budget_keeps_one_patient_of_a_rare_class(ablation: ModuleType) -> None:
    recs = _records(num_pos=1, num_neg=29)
    kept = ablation.apply_budget(recs, 4, seed=0)
    assert {r.label for r in kept} == {0, 1}
    assert len({r.patient for r in kept}) == 4


# ------------------------------------------------------------------------- fold aggregation
def test_aggregate_folds_matches_a_numpy_reference(ablation: ModuleType) -> None:
    from patchssl.metrics import evaluate_predictions

    rng = np.random.default_rng(0)
    rows = ablation.make_rows(["a", "b"])
    assert [r.name for r in rows[:4]] == ["a", "a + SSL", "a + AL", "a + SSL + AL"]
    results = []
    for fold in range(3):
        for row in rows:
            y = rng.integers(0, 2, 20)
            y[:2] = [0, 1]
            s = rng.uniform(size=20)
            report = evaluate_predictions(y, s, threshold=0.5, n_boot=0)
            results.append(ablation.RowResult(row, fold, report, 0.5, 1, 0.0, Path(".")))
    table = ablation.aggregate_folds(results)
    assert [t["row"] for t in table] == [r.name for r in rows]
    for line, row in zip(table, rows, strict=True):
        mine = [r for r in results if r.row == row]
        for metric in ("accuracy", "sensitivity", "auc"):
            values = [r.report.metrics[metric] for r in mine]
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            assert line[f"{metric}_mean"] == pytest.approx(mean)
            assert line[f"{metric}_std"] == pytest.approx(std)
            assert line[f"{metric}_min"] == pytest.approx(min(values))
            assert line[f"{metric}_max"] == pytest.approx(max(values))
        assert line["n"] == 60
        assert line["tp"] + line["fp"] + line["tn"] + line["fn"] == 60
    markdown = ablation.folds_table(table)
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_lines) == len(rows) + 1  # the header and one line per row


# ------------------------------------------------------------------------------- end to end
def test_imagenet_row_starts_from_the_given_weights(ablation: ModuleType, tmp_path: Path) -> None:
    # The ImageNet row takes timm's weights (here a local file, as offline) and no jigsaw.
    import timm
    import torch

    from patchssl.checkpoint import load_checkpoint

    rows = ablation.make_rows(["test_resnet"], imagenet=True)
    assert [r.name for r in rows][-1] == "test_resnet + ImageNet + AL"
    assert rows[-1].folder == "test_resnet_imagenet_al"
    torch.manual_seed(1)
    weights = tmp_path / "imagenet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    out = tmp_path / "ablation"
    payload = ablation.run_ablation(
        [
            "--synthetic", "--quick", "--backbones", "test_resnet", "--image-size", "96",
            "--patch-size", "32", "--num-permutations", "4", "--epochs", "1",
            "--pretrain-epochs", "1", "--num-unlabeled", "10", "--num-patients", "16",
            "--images-per-patient", "1", "--label-budget", "4", "--n-boot", "20",
            "--batch-size", "8", "--explain", "none", "--imagenet", str(weights),
            "--out", str(out),
        ]
    )  # fmt: skip
    row = next(r for r in payload["rows"] if r["row"] == "test_resnet + ImageNet + AL")
    run = Path(row["out_dir"])
    assert not (run / "transfer.json").is_file()  # no jigsaw checkpoint
    # The run started from the file: its stem weights moved only by the short fine-tuning.
    stem = "encoder.backbone.conv1.0.weight"
    trained = load_checkpoint(run / "last.pt")["model"][stem]
    given = torch.load(weights, weights_only=True)["conv1.0.weight"]
    random_init = timm.create_model("test_resnet").state_dict()["conv1.0.weight"]
    assert (trained - given).abs().max() < (trained - random_init).abs().max()


def test_ablation_runs_end_to_end_at_the_tiniest_settings(
    ablation: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "ablation"
    payload = ablation.run_ablation(
        [
            "--synthetic",
            "--quick",
            "--backbones",
            "test_resnet",
            "--image-size",
            "96",
            "--patch-size",
            "32",
            "--num-permutations",
            "4",
            "--epochs",
            "1",
            "--pretrain-epochs",
            "1",
            "--num-unlabeled",
            "10",
            "--num-patients",
            "16",
            "--images-per-patient",
            "1",
            "--label-budget",
            "4",
            "--n-boot",
            "20",
            "--batch-size",
            "8",
            "--explain",
            "none",
            "--out",
            str(out),
        ]
    )
    for name in ("ablation.md", "ablation.csv", "ablation.json", "split.json"):
        assert (out / name).is_file(), name
    rows = payload["rows"]
    assert [r["row"] for r in rows] == [
        "test_resnet",
        "test_resnet + SSL",
        "test_resnet + AL",
        "test_resnet + SSL + AL",
    ]
    split = json.loads((out / "split.json").read_text())
    n_test = len(split["parts"]["test"])
    assert len({Path(p).name.split("_")[0] for p in split["parts"]["train"]}) == 4  # budget
    for r in rows:
        assert r["n"] == n_test
        assert r["tp"] + r["fp"] + r["tn"] + r["fn"] == n_test
        assert r["n_positive"] == r["tp"] + r["fn"]
        # Every row used the one saved split.
        row_split = json.loads((Path(r["out_dir"]) / "split.json").read_text())
        assert row_split["parts"] == split["parts"]
    # (b) and (d) start from the one pretraining checkpoint, (a) and (c) from scratch.
    transfer = [Path(r["out_dir"]) / "transfer.json" for r in rows]
    assert [t.is_file() for t in transfer] == [False, True, False, True]
    markdown = (out / "ablation.md").read_text()
    assert "test_resnet + SSL + AL" in markdown and "TP/FP/TN/FN" in markdown
    assert json.loads((out / "ablation.json").read_text())["seed"] == 0
