"""A new user's path from folders of images to predictions, on the command line.

The README's command-line block is run as written (with tiny models and one epoch appended)
on a small synthetic dataset laid out as the README names it: ``prepare`` must print the next
two commands exactly, ``pretrain`` and ``finetune`` must take their settings from the cache
and the checkpoint, and ``evaluate`` and ``predict`` must agree on the threshold.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from patchssl.checkpoint import load_checkpoint, save_checkpoint
from patchssl.cli import main
from patchssl.data import LabelMap
from patchssl.engine import predict_images
from patchssl.engine.config import Config, ConfigError, load_config
from patchssl.engine.evaluation import stored_threshold
from patchssl.engine.logging import progress
from patchssl.engine.settings import fitting_patch_size, label_names, resolve_settings
from patchssl.engine.testing import make_tiny_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
# what every training command of the tests appends: one quick epoch on the CPU
QUICK = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--threads", "1"]
QUICK += ["--no-progress", "--set", "train.tensorboard=false"]
TINY_PRETEXT = ["--backbone", "test_resnet", "--set", "pretext.options.num_permutations=8"]


def readme_commands() -> list[list[str]]:
    """The README's command-line block, one argument list per line (without ``patchssl``)."""
    text = README.read_text(encoding="utf-8")
    block = text.split("From the command line")[1].split("```bash")[1].split("```")[0]
    lines = [shlex.split(line) for line in block.strip().splitlines()]
    assert all(line[0] == "patchssl" for line in lines)
    return [line[1:] for line in lines]


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The README pipeline, run in a folder laid out as the README names it."""
    root = tmp_path_factory.mktemp("user")
    make_tiny_dataset(root / "cervix", num_unlabeled=12, num_patients=16)
    new = root / "new_images"
    new.mkdir()
    for path in sorted((root / "cervix" / "labeled").glob("*.png"))[:3]:
        shutil.copy(path, new / path.name)
    (new / "broken.png").write_bytes(b"not an image")
    prepare, pretrain, finetune, evaluate, predict = readme_commands()
    logs: dict[str, tuple[int, str, str]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        logs["prepare"] = _run([*prepare, "--image-size", "128", "--workers", "1", "--no-progress"])
        printed = [
            shlex.split(line.strip())[1:]
            for line in logs["prepare"][1].splitlines()
            if line.strip().startswith("patchssl ")
        ]
        # the printed commands, run as printed, plus a tiny model and one epoch
        logs["pretrain"] = _run([*printed[0], *QUICK, *TINY_PRETEXT])
        logs["finetune"] = _run([*printed[1], *QUICK])
        logs["evaluate"] = _run([*evaluate, "--n-boot", "20", "--no-progress"])
        logs["predict"] = _run(predict)
    return {"root": root, "logs": logs, "printed": printed, "readme": [pretrain, finetune]}


def test_readme_commands_run_as_written(run):
    logs = run["logs"]
    for step in ("prepare", "pretrain", "finetune", "evaluate", "predict"):
        code, out, err = logs[step]
        assert code == 0, f"{step}: {err}"
        assert "outputs written to" in out
    # prepare prints exactly the README's next two commands, for these paths
    assert run["printed"] == run["readme"]


def test_settings_carry_forward_from_the_cache_and_the_checkpoint(run):
    root = run["root"]
    pre = load_checkpoint(root / "runs" / "pretrain" / "best.pt")
    ft = load_checkpoint(root / "runs" / "finetune" / "best.pt")
    # no --image-size after prepare: the cache's 128 px, not the default 512
    assert pre["model_config"]["tiler"]["image_size"] == [128, 128]
    assert "from the cache runs/prep/cache: data.image_size=128" in run["logs"]["pretrain"][1]
    # no geometry flag to finetune: the pretraining checkpoint's backbone and tiling
    assert ft["model_config"]["encoder"]["backbone"] == "test_resnet"
    assert ft["model_config"]["tiler"] == pre["model_config"]["tiler"]
    assert ft["model_config"]["classifier"]["input_norm"] == pre["model_config"]["input_norm"]
    assert (
        "from the checkpoint runs/pretrain/best.pt: model.backbone=test_resnet"
        in (run["logs"]["finetune"][1])
    )


def test_conflicting_flags_are_refused_all_at_once(run, monkeypatch):
    monkeypatch.chdir(run["root"])
    finetune = [*run["readme"][1], *QUICK, "--out", "runs/other"]
    code, _, err = _run([*finetune, "--backbone", "resnet18", "--image-size", "96", "--grid", "2"])
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    for key in ("model.backbone (--backbone)", "data.image_size (--image-size)", "model.grid"):
        assert key in err
    assert "given 'resnet18', checkpoint runs/pretrain/best.pt has 'test_resnet'" in err
    assert not (run["root"] / "runs" / "other").exists()  # refused before any output
    # the cache keeps its size: another one is refused, naming the cache
    pretrain = [*run["readme"][0], *QUICK, *TINY_PRETEXT, "--out", "runs/other"]
    code, _, err = _run([*pretrain, "--image-size", "96"])
    assert code == 2 and "given 96, cache runs/prep/cache has 128" in err


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_one_row_per_image_at_the_stored_threshold(run):
    root = run["root"]
    _, out, err = run["logs"]["predict"]
    rows = _rows(root / "predictions.csv")
    assert list(rows[0]) == ["image", "CIN0/1", "CIN2+", "predicted", "error"]
    assert len(rows) == 4  # three images and the unreadable one
    broken = [r for r in rows if r["image"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["predicted"] == ""
    assert "broken.png" in err and "3 images predicted" in out
    threshold = stored_threshold(load_checkpoint(root / "runs" / "finetune" / "best.pt"))
    assert threshold is not None
    for row in rows:
        if row["error"]:
            continue
        p0, p1 = float(row["CIN0/1"]), float(row["CIN2+"])
        assert p0 + p1 == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == ("CIN2+" if p1 >= threshold else "CIN0/1")


def test_prediction_agrees_with_evaluation(run, monkeypatch):
    root = run["root"]
    monkeypatch.chdir(root)
    ckpt = root / "runs" / "finetune" / "best.pt"
    report = json.loads((root / "runs" / "finetune" / "eval.json").read_text())
    assert "stored in it" in report["threshold_choice"]
    assert report["class_names"] == ["CIN0/1", "CIN2+"]
    assert "Positive class: CIN2+ (against CIN0/1)" in (root / "runs/finetune/eval.md").read_text()
    tested = _rows(root / "runs" / "finetune" / "predictions_test.csv")
    result = predict_images(ckpt, [r["image"] for r in tested])
    assert result.threshold == pytest.approx(report["threshold"])
    assert [r["predicted"] for r in result.rows] == [
        result.class_names[int(r["predicted"])] for r in tested
    ]
    scores = [float(r["score"]) for r in tested]
    assert [r["CIN2+"] for r in result.rows] == pytest.approx(scores, abs=1e-5)


def test_predict_from_a_csv_in_a_subprocess_with_overlays_and_a_quiet_log(run, tmp_path):
    root = run["root"]
    listing = tmp_path / "list.csv"
    images = sorted((root / "new_images").glob("*.png"))
    listing.write_text("file\n" + "\n".join(str(p) for p in images) + "\n", encoding="utf-8")
    stderr = tmp_path / "stderr.txt"
    args = ["--checkpoint", str(root / "runs" / "finetune" / "best.pt"), "--data", str(listing)]
    args += ["--out", str(tmp_path / "p.csv"), "--explain", str(tmp_path / "overlays")]
    args += ["--image-column", "file", "--threads", "1"]  # progress bars left on
    with stderr.open("wb") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "patchssl", "predict", *args],
            stdout=subprocess.PIPE,
            stderr=handle,
            timeout=300,
        )
    log = stderr.read_bytes()
    assert proc.returncode == 0, log.decode()
    # stderr is a file: no progress bar, only the unreadable image
    assert b"\r" not in log and len(log) < 1000 and b"broken.png" in log
    assert len(_rows(tmp_path / "p.csv")) == 4
    assert len(list((tmp_path / "overlays").glob("attention_*.png"))) == 3


def test_predict_names_a_missing_csv_column_and_the_flag_that_fixes_it(run, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_text("file\na.png\n", encoding="utf-8")
    ckpt = str(run["root"] / "runs" / "finetune" / "best.pt")
    assert main(["predict", "--checkpoint", ckpt, "--data", str(listing)]) == 2
    err = capsys.readouterr().err
    assert "no 'image' column (columns: file)" in err and "--image-column" in err


def test_no_epochs_is_refused_before_anything_is_written(run, monkeypatch, tmp_path):
    monkeypatch.chdir(run["root"])
    pretrain = [*run["readme"][0], *QUICK, *TINY_PRETEXT, "--out", str(tmp_path / "zero")]
    for epochs in ("0", "-1"):
        code, out, err = _run([*pretrain, "--epochs", epochs])
        assert code == 2 and "train.epochs must be >= 1" in err and "done" not in out
    assert not (tmp_path / "zero").exists()


def test_a_label_error_of_pretrain_suggests_a_flag_pretrain_accepts(run, monkeypatch, tmp_path):
    monkeypatch.chdir(run["root"])
    rows = Path("cervix/labeled.csv").read_text().splitlines()
    manifest = tmp_path / "graded.csv"
    manifest.write_text("\n".join([rows[0], *(r.replace("CIN3", "HSIL") for r in rows[1:])]))
    (tmp_path / "labeled").symlink_to(run["root"] / "cervix" / "labeled")
    args = ["pretrain", "--data", "cervix/unlabeled", "--manifest", str(manifest)]
    args += [*QUICK, *TINY_PRETEXT, "--image-size", "96", "--patch-size", "32"]
    args += ["--out", str(tmp_path / "run")]
    code, _, err = _run(args)
    assert code == 2 and "'HSIL'" in err and "--label-map" in err
    assert err.count(str(manifest)) == 1  # the file is named once
    code, _, err = _run([*args, "--label-map", "CIN0:0,CIN1:0,CIN2:1,HSIL:1"])
    assert code == 0, err


def test_small_validation_splits_are_warned_about(run):
    assert "warning: the validation split has 6 image(s)" in run["logs"]["finetune"][2]
    assert "pretraining validation split has 1 image(s)" in run["logs"]["pretrain"][2]


def test_class_names_come_from_the_label_map(run, tmp_path, monkeypatch):
    import patchssl.engine.explain_run as explain_run

    root = run["root"]
    monkeypatch.chdir(root)
    payload = load_checkpoint(root / "runs" / "finetune" / "best.pt")
    payload["model_config"]["labels"]["class_names"] = ["low", "high"]
    renamed = tmp_path / "renamed.pt"
    save_checkpoint(renamed, payload)
    result = predict_images(renamed, root / "new_images")
    assert result.columns == ["image", "low", "high", "predicted", "error"]
    assert {r["predicted"] for r in result.rows if not r["error"]} <= {"low", "high"}
    # explain draws the legend and the titles with the same names
    seen = {}
    real = explain_run.plot_embedding

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_run, "plot_embedding", spy)
    out = tmp_path / "explain"
    args = ["explain", "--checkpoint", str(renamed), "--out", str(out), "--part", "all"]
    args += ["--split", "runs/finetune/split.json", "--num-images", "1", "--no-progress"]
    code, _, err = _run(args)
    assert code == 0, err
    assert seen["class_names"] == ["low", "high"]


def test_label_names_of_maps_without_names():
    assert label_names(LabelMap.parse("benign:0,malignant:1")) == ["benign", "malignant"]
    assert label_names(LabelMap.parse("a:0,b:0,c:1")) == ["a/b", "c"]
    assert label_names(LabelMap.from_config("cervix")) == ["CIN0/1", "CIN2+"]


def test_options_given_are_recorded_and_defaults_are_not(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {backbone: resnet50}\ndata: {image_size: 512}\n")
    config = load_config(path, ["model.grid=3"])
    assert config.is_given("model.backbone") and config.is_given("data.image_size")
    assert config.is_given("model.grid") and not config.is_given("model.patch_size")
    assert config.copy().is_given("model.backbone")  # copies keep the record
    plain = Config()
    plain.data.image_size = 96  # set in Python: given because it is not the default
    assert plain.is_given("data.image_size") and not plain.is_given("model.backbone")
    # a value given that equals a checkpoint's default is still compared with it
    ckpt = {"kind": "pretrain", "model_config": {"encoder": {"backbone": "test_resnet"}}}
    with pytest.raises(ConfigError, match="model.backbone"):
        resolve_settings(config, checkpoint=ckpt)


def test_default_patches_shrink_to_fit_a_small_image():
    assert fitting_patch_size(512) == 153  # the paper's geometry
    assert fitting_patch_size(128) == 38
    config = Config()
    config.data.image_size = 128
    assert resolve_settings(config, fit_patches=True).model.patch_size == 38


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    bar = progress(range(3), desc="x")
    assert not hasattr(bar, "set_postfix") and list(bar) == [0, 1, 2]
    assert sys.stderr.getvalue() == ""
