"""Tests of the examples: the cervix configs load, and the ablation example runs end to end.

The ablation example is ``examples/cervix/ablation.py`` (not a package module), so it is loaded
from its file. Its reusable pieces are tested where they live: ``sample_patients`` and
``kfold_records`` in ``test_data_splits.py``, ``summarize_folds`` and ``format_fold_table`` in
``test_metrics.py``. The end-to-end run uses the tiniest settings (96 px images, 3x3 patches of
32 px, timm's ``test_resnet``, one epoch) to stay within seconds on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

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


def test_quick_config_trains_a_jigsaw_step_and_classifies() -> None:
    # What the config does, not what it says: its pretext task takes a training step on its
    # own image size (finite loss, every encoder weight gets a gradient), and its classifier,
    # built around that encoder, gives logits for the same images.
    import torch

    from patchssl.engine.config import load_config
    from patchssl.engine.finetuning import build_classifier
    from patchssl.engine.pretraining import build_pretext

    c = load_config(CONFIGS / "cpu_quick.yaml")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, c.data.image_size, c.data.image_size), dtype=torch.uint8)
    task = build_pretext(c, torch.device("cpu")).train()
    loss = task(images, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in task.encoder.parameters() if p.requires_grad)
    classifier, _, _ = build_classifier(c, torch.device("cpu"))
    with torch.no_grad():
        assert classifier.eval()(images).shape == (2, c.model.num_classes)


# ------------------------------------------------------------------------------- end to end
def test_ablation_runs_the_four_rows_end_to_end(ablation: ModuleType, tmp_path: Path) -> None:
    from patchssl.data import make_synthetic_cervix
    from patchssl.engine.config import Config, load_config

    data = make_synthetic_cervix(
        tmp_path / "data", num_unlabeled=10, num_patients=20, images_per_patient=1,
        image_size=96, progress=False,
    )  # fmt: skip
    out = tmp_path / "ablation"
    report = ablation.main(
        [
            "--data", str(data.root), "--quick", "--backbones", "test_resnet",
            "--pretrain-epochs", "1", "--label-budget", "4", "--out", str(out),
            "--set", "data.image_size=96", "--set", "pretext.options.num_permutations=4",
            "--set", "train.epochs=1", "--set", "eval.n_boot=20",
        ]
    )  # fmt: skip
    assert (out / "ablation.md").read_text() == report
    split = json.loads((out / "split.json").read_text())
    assert len({Path(p).stem.split("_")[0] for p in split["parts"]["train"]}) == 4  # budget
    names = ["test_resnet", "test_resnet + SSL", "test_resnet + AL", "test_resnet + SSL + AL"]
    folders = ["scratch_noal", "ssl_noal", "scratch_al", "ssl_al"]
    auc = {}
    for name, folder in zip(names, folders, strict=True):
        run = out / f"test_resnet_{folder}"
        assert f"| {name} |" in report
        # Every row used the one saved split; (b) and (d) start from the jigsaw checkpoint.
        assert json.loads((run / "split.json").read_text())["parts"] == split["parts"]
        assert (run / "transfer.json").is_file() == ("ssl" in folder)
        attention = load_config(run / "config.yaml").model.attention
        assert attention == (Config().model.attention if folder.endswith("_al") else "none")
        auc[folder] = json.loads((run / "eval.json").read_text())["test"]["metrics"]["auc"]
    # The paired difference is (d) minus (c), on the AUCs each row's evaluation reported.
    line = next(x for x in report.splitlines() if x.startswith("| test_resnet | all |"))
    cells = [c.strip() for c in line.split("|")[3:6]]
    assert cells[:2] == [f"{100 * auc['ssl_al']:.2f}", f"{100 * auc['scratch_al']:.2f}"]
    assert cells[2].startswith(f"{100 * (auc['ssl_al'] - auc['scratch_al']):+.2f} [")
