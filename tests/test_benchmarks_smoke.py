"""Smoke tests for the benchmark scripts: they run end to end on tiny settings (no timing asserts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_profile_step_quick(tmp_path: Path) -> None:
    import profile_step

    out = tmp_path / "profile.json"
    report = profile_step.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)])
    for name in ("bare_backbone", "library_step"):
        assert report[name]["wall_ms"] > 0 and report[name]["top"]
        assert report[name]["device_busy_ms"] is None  # no kernels on the CPU
    assert report["step_over_bare"] > 0 and report["library_extra"]
    assert json.loads(out.read_text())["results"][0]["geometry"] == "tiny"


def test_throughput_quick(tmp_path: Path) -> None:
    import bench_throughput

    out = tmp_path / "throughput.json"
    rows = bench_throughput.main(
        ["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )
    assert not [r for r in rows if "error" in r], rows
    steps = [r for r in rows if "mode" in r]
    assert {r["mode"] for r in steps} == {"pretrain", "finetune", "inference"}
    for row in steps:
        assert row["images_per_s"] > 0 and math.isfinite(row["peak_mib"])
    (ratios,) = [r for r in rows if "step_over_bare" in r]
    assert ratios["step_over_bare"] > 0 and ratios["classic_over_library"] > 0
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch"] and len(saved["results"]) == len(rows) + 1
    assert out.with_suffix(".csv").is_file()


def test_throughput_records_a_failing_option(tmp_path: Path) -> None:
    import bench_throughput

    # A configuration that cannot build becomes a row with the error, not a crash.
    geom = bench_throughput.Geometry("broken", 112, 32, "no_such_backbone")
    variant = bench_throughput.Variant.parse("fp32")
    timing = {"warmup": 1, "repeats": 1, "min_time": 0.0}
    row = bench_throughput.run_one(
        "inference", geom, variant, 2, bench_throughput.torch.device("cpu"), timing
    )
    assert "no_such_backbone" in row["error"]


def test_variant_names() -> None:
    import bench_throughput

    v = bench_throughput.Variant.parse("bf16-cl-compile")
    assert (v.bf16, v.channels_last, v.compile) == (True, True, True)
    with pytest.raises(ValueError, match="unknown variant"):
        bench_throughput.Variant.parse("fp16")
    variant, modes = bench_throughput.parse_variant_spec("bf16@inference")
    assert variant.bf16 and modes == ("inference",)


def test_classic_dataset_matches_the_permutation(tmp_path: Path) -> None:
    """The classic loader's tiles are the tiler's centre crops, reordered by the drawn permutation."""
    import bench_throughput
    import torch

    from patchssl.tiling import PatchTiler

    tiler = PatchTiler(3, 32, 112, jitter=0)
    images = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    perms = [[8, 7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    data = bench_throughput.ClassicJigsawDataset(images, tiler, perms, gray_prob=0.0)
    tiles, label = data[1]
    reference = tiler.eval()(images[1:2].float() / 255).patches[0]  # (9, C, h, w) row-major
    mean = reference.mean(dim=(2, 3), keepdim=True)
    std = reference.std(dim=(2, 3), keepdim=True)
    expected = ((reference - mean) / std)[perms[label]]
    torch.testing.assert_close(tiles, expected, atol=1e-4, rtol=1e-4)


def test_dataloading_quick(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    import bench_dataloading

    out = tmp_path / "dataloading.json"
    rows = bench_dataloading.main(
        ["--quick", "--count", "2", "--original-size", "640", "424", "--out", str(out)]
    )
    names = {r["name"] for r in rows}
    assert {"pil_resize_original", "load_image_original", "load_image_cache_png"} <= names
    assert all(r["images_per_s"] > 0 for r in rows)
    assert json.loads(out.read_text())["results"][-1]["table"] == "run"


_MICRO = [
    "--backbone", "test_resnet", "--image-size", "96", "--patch-size", "32",
    "--num-unlabeled", "8", "--test-patients", "6", "--budgets", "2", "--seeds", "0",
    "--pretrain-epochs", "1", "--num-permutations", "4", "--finetune-images", "4",
    "--min-epochs", "1", "--max-epochs", "1", "--batch-size", "4", "--n-boot", "20",
]  # fmt: skip


def test_transfer_micro_run_and_resume(tmp_path: Path) -> None:
    import bench_transfer

    args = [*_MICRO, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    payload = bench_transfer.main(args)
    assert {r["row"] for r in payload["auc"]} == {"scratch", "ssl", "al", "ssl_al"}
    assert len(payload["diffs"]) == len(bench_transfer.PAIRS)
    assert {r["row"] for r in payload["probe_auc"]} == {"jigsaw", "random"}
    assert {r["row"] for r in payload["localisation"]} == {"al", "ssl_al"}
    assert payload["test_images"] == 12
    for name in ("transfer.md", "transfer.csv", "transfer.json", "transfer.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| 2 | ssl_al - al |" in (tmp_path / "out" / "transfer.md").read_text()
    # A second run finds every fine-tuning cached and gives the same numbers.
    again = bench_transfer.main(args)
    assert set(again["run_seconds"].values()) == {0.0}
    assert again["auc"] == payload["auc"]


def test_transfer_probe_alone_with_another_pretext(tmp_path: Path) -> None:
    import bench_transfer

    args = [*_MICRO, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    payload = bench_transfer.main([*args, "--rows", "--pretext", "rotation"])
    assert payload["auc"] == [] and payload["diffs"] == []  # no fine-tuning at all
    assert not (tmp_path / "cache" / "runs").exists()
    assert {r["row"] for r in payload["probe_auc"]} == {"rotation", "random"}
    assert [r["pair"] for r in payload["probe_diffs"]] == ["rotation - random"]
    assert "rotation pretraining" in (tmp_path / "out" / "transfer.md").read_text()
    # jigsaw options reach the pretraining (another checkpoint), and a wrong one is refused
    jig = bench_transfer.main([*args, "--rows", "--pretext-options", "crop_scale=[0.5,1.0]"])
    assert jig["pretrain_checkpoint"] != payload["pretrain_checkpoint"]
    assert "crop_scale=[0.5,1.0]" in (tmp_path / "out" / "transfer.md").read_text()
    with pytest.raises(Exception, match="crop_scale"):
        bench_transfer.main([*args, "--rows", "--pretext", "rotation", "--pretext-options",
                             "crop_scale=[0.5,1.0]"])  # fmt: skip


def test_transfer_pretrains_only_for_what_uses_it(tmp_path: Path) -> None:
    import bench_transfer

    args = [*_MICRO, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    scratch = bench_transfer.main([*args, "--rows", "al", "--no-probe"])
    assert scratch["pretrain_checkpoint"] is None
    assert not list((tmp_path / "cache").glob("pretrain_*"))
    probe = bench_transfer.main([*args, "--rows"])  # the probe needs the pretraining
    assert probe["pretrain_checkpoint"] is not None
    # Options that only the classifier reads do not pretrain again. (The input normalisation
    # does: it decides whether the jigsaw standardises its tiles.)
    classifier_only = [*args, "--rows", "--attention", "softmax",
                       "--set", "model.head=pooled", "model.dropout=0.1"]  # fmt: skip
    again = bench_transfer.main(classifier_only)
    assert again["pretrain_checkpoint"] == probe["pretrain_checkpoint"]
    assert len(list((tmp_path / "cache").glob("pretrain_*"))) == 1
    # the pretraining's rate: 1e-3 unless given (that of the cached runs), another is new
    faster = bench_transfer.main([*args, "--rows", "--pretrain-lr", "3e-3"])
    assert faster["pretrain_checkpoint"] != probe["pretrain_checkpoint"]
    saved = yaml.safe_load((Path(faster["pretrain_checkpoint"]).parent / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-3
    first = yaml.safe_load((Path(probe["pretrain_checkpoint"]).parent / "config.yaml").read_text())
    assert first["train"]["lr"] == 1e-3
    # the pretraining's own batch size: another checkpoint; the rows' own is the cached one
    wider = bench_transfer.main([*args, "--rows", "--pretrain-batch-size", "8"])
    assert wider["pretrain_checkpoint"] not in (probe["pretrain_checkpoint"],
                                                faster["pretrain_checkpoint"])  # fmt: skip
    saved = yaml.safe_load((Path(wider["pretrain_checkpoint"]).parent / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 8
    assert first["train"]["batch_size"] == 4
    same = bench_transfer.main([*args, "--rows", "--pretrain-batch-size", "4"])
    assert same["pretrain_checkpoint"] == probe["pretrain_checkpoint"]


def test_compare_transfer_pairs_one_row_under_two_settings(tmp_path: Path) -> None:
    import compare_transfer

    shared = [*_MICRO, "--cache", str(tmp_path / "cache")]
    args = ["--row", "al", "--a", "--attention softmax", "--b",
            "--attention sigmoid --set model.head=concat", "--name-a", "mil", "--name-b",
            "paper", "--out", str(tmp_path / "cmp.json"), "--", *shared]  # fmt: skip
    payload = compare_transfer.main(args)
    assert [r["row"] for r in payload["auc"]] == ["mil", "paper"]
    assert [d["pair"] for d in payload["diffs"]] == ["mil - paper"]
    (hits,) = payload["hit_diffs"]
    assert hits["diff"] == pytest.approx(hits["hit_mil"] - hits["hit_paper"])
    assert hits["ci_low"] <= hits["ci_high"]
    assert {r["row"] for r in payload["localisation"]} == {"mil", "paper"}
    assert json.loads((tmp_path / "cmp.json").read_text())["diffs"] == payload["diffs"]
    # the two settings trained two runs, which a second call finds in the cache
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == 2
    assert compare_transfer.main(args)["auc"] == payload["auc"]
    with pytest.raises(SystemExit, match="budgets"):
        compare_transfer.main(["--row", "al", "--a", "--budgets 3", "--", *shared])


def test_compare_transfer_pairs_the_probes_of_two_pretrainings(tmp_path: Path) -> None:
    import bench_transfer
    import compare_transfer

    shared = [*_MICRO, "--cache", str(tmp_path / "cache"), "--input-norm", "encoder"]
    args = ["--row", "probe", "--a", "--pretext rotation", "--b", "", "--name-a", "rot",
            "--name-b", "jig", "--", *shared]  # fmt: skip
    payload = compare_transfer.main(args)
    assert [d["pair"] for d in payload["diffs"]] == ["rot - jig"]
    assert not (tmp_path / "cache" / "runs").exists()  # no fine-tuning
    assert len(list((tmp_path / "cache").glob("pretrain_*"))) == 2
    # the same probe as the benchmark's own
    alone = bench_transfer.main([*shared, "--out", str(tmp_path / "out"), "--rows",
                                 "--pretext", "rotation"])  # fmt: skip
    rot = next(r for r in alone["probe_auc"] if r["row"] == "rotation")
    assert payload["auc"][0]["auc"] == pytest.approx(rot["auc"])


def test_transfer_cache_keys_ignore_defaults_device_and_threads() -> None:
    import bench_transfer

    from patchssl.engine.config import Config

    reference = Config()
    reference.train.lr = 1e-3  # the benchmark names every run's rate; fine-tuning's default
    base = reference.to_dict()
    assert bench_transfer._changed(base, *base) == {
        k: {} for k, v in base.items() if isinstance(v, dict)
    }
    faster = reference.copy()
    faster.train.lr = 3e-3  # another rate is a new key
    assert bench_transfer._changed(faster.to_dict(), "train") == {"train": {"lr": 3e-3}}
    moved = reference.copy()
    moved.train.device, moved.train.num_threads = "cuda", 7
    assert bench_transfer._changed(moved.to_dict(), *base) == bench_transfer._changed(base, *base)
    changed = Config()
    changed.model.attention_temperature = 0.5
    assert bench_transfer._changed(changed.to_dict(), "model") == {
        "model": {"attention_temperature": 0.5}
    }
    # the data key follows what the generator draws, at each image size
    first = bench_transfer._generator_fingerprint(64)
    assert (
        first
        == bench_transfer._generator_fingerprint(64)
        != bench_transfer._generator_fingerprint(96)
    )


def test_transfer_states_the_jigsaw_per_tile_norm_its_rows_need() -> None:
    from types import SimpleNamespace

    import bench_transfer

    data = SimpleNamespace(unlabeled_dir="unlabeled", manifest="labels.csv")

    def options(**kwargs) -> dict:
        s = bench_transfer.Settings(**kwargs)
        return bench_transfer.base_config(s, data, 1).pretext.options

    # per-patch rows need a per-tile-normalised pretraining; the others the library's default
    assert options(input_norm="per_patch")["per_patch_norm"] is True
    assert options(input_norm="encoder")["per_patch_norm"] is False
    assert options(input_norm="auto")["per_patch_norm"] is False
    # an option given is kept, flat or nested
    assert options(input_norm="auto", pretext_options=("per_patch_norm=true",))["per_patch_norm"]
    nested = options(pretext_options=("defences={per_patch_norm: false}",))
    assert "per_patch_norm" not in nested and nested["defences"] == {"per_patch_norm": False}
    assert "per_patch_norm" not in options(pretext="rotation")


def test_finetune_recipe_trains_and_scores_in_memory(tmp_path: Path, monkeypatch) -> None:
    import sys

    import bench_finetune_recipe

    out = tmp_path / "recipe.json"
    monkeypatch.setattr(
        sys,
        "argv",
        ["bench_finetune_recipe.py", "--variants", "base", "no_dropout", "--budgets", "4",
         "--images", "16", "--test-patients", "6", "--image-size", "96", "--patch-size", "32",
         "--cache", str(tmp_path / "c"), "--out", str(out)],
    )  # fmt: skip
    bench_finetune_recipe.main()
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["base", "no_dropout"]
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["lo"] <= r["hi"] <= 1.0
        assert r["epochs"] == 2 and math.isfinite(r["train_loss_last"])  # 16 images, 8 a time
    import numpy as np

    (stack,) = (tmp_path / "c").glob("data_*/labeled_uint8.npy")
    assert np.load(stack).shape[-2:] == (96, 96)  # --image-size reached the data


def test_transfer_paired_table_and_budgets() -> None:
    import bench_transfer
    import numpy as np

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 2)  # 2 images per patient, one label each
    labels = np.repeat(rng.permutation([0, 1] * 20), 2)
    good = labels + rng.normal(0, 0.5, 80)
    noise = rng.normal(0, 1, 80)
    scores = {("a", 8, 0): good, ("b", 8, 0): noise, ("c", 8, 0): good.copy()}
    aucs, diffs = bench_transfer.paired_table(
        scores, labels, groups, ["a", "b", "c"], [("a", "b"), ("a", "c")], [8], [0], 200
    )
    by = {r["pair"]: r for r in diffs}
    assert by["a - b"]["ci_low"] > 0 and by["a - b"]["ci_above_0"]
    assert by["a - c"]["diff"] == 0 and by["a - c"]["ci_low"] == by["a - c"]["ci_high"] == 0
    assert {r["row"] for r in aucs} == {"a", "b", "c"}


def test_dataloading_reports_the_decode_jpeg_ratio(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    import bench_dataloading

    rows = bench_dataloading.main(
        ["--quick", "--count", "2", "--original-size", "640", "424", "--out", str(tmp_path / "d")]
    )
    (ratio,) = [r for r in rows if r["name"] == "load_image_over_decode_jpeg"]
    assert ratio["ratio"] > 0 and math.isfinite(ratio["ratio"])
    assert any(r["name"] == "decode_jpeg_cache" for r in rows)


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_python_command_on_the_cpu(tmp_path: Path) -> None:
    """gpu_check.sh with DRY=1: its commands run with --device cpu --quick (no GPU needed)."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("skimage")
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    work = tmp_path / "gpu"
    env = dict(os.environ, DRY="1", PYTHON=sys.executable)
    # One command per script: the engine end to end (its compiled variant), the step and
    # its ratios, decoding. The other parts run the same scripts with other geometries.
    env["PARTS"] = "env engine_paper_compiled step_paper decode liftoff recipe tests"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (work / "gpu_check.log").read_text()
    assert proc.returncode == 0, log
    for name in ("env", "engine_paper_compiled", "step_paper", "decode", "liftoff_sweep",
                 "liftoff_long", "recipe"):  # fmt: skip
        assert f"== {name}: rc=0" in log, log
    assert "tests: skipped in DRY mode" in log
    (engine,) = json.loads((work / "engine_paper_compiled.json").read_text())["results"][:1]
    assert "error" not in engine, engine
    assert engine["engine_images_per_s"] > 0 and engine["step_images_per_s"] > 0
    assert engine["compile"] == "model" and engine["train_images"] > 0
    assert json.loads((work / "throughput_paper.json").read_text())["results"]
    assert json.loads((work / "dataloading.json").read_text())["results"]
    sweep = json.loads((work / "liftoff_sweep.json").read_text())
    assert [r["step"] for r in sweep["defaults+small_gap"]["log"]] == [2, 4]
    # the sweep's best lever goes on to the long run
    long_run = json.loads((work / "liftoff_long.json").read_text())
    (longer,) = [k for k, v in long_run.items() if isinstance(v, dict) and "log" in v]
    assert longer in ("defaults+no_gap", "defaults+small_gap")
    assert json.loads((work / "recipe.json").read_text())[0]["variant"] == "base"


def test_liftoff_variants_train_at_their_own_rate_else_lr_else_the_librarys() -> None:
    import bench_jigsaw_liftoff as bl
    import torch

    class Noise:  # stands for the photographs: random crops, a few held out
        held_out = torch.randint(0, 256, (2, 3, bl.IMAGE, bl.IMAGE), dtype=torch.uint8)

        def batch(self, n: int, g: torch.Generator) -> torch.Tensor:
            return torch.randint(0, 256, (n, 3, bl.IMAGE, bl.IMAGE), generator=g, dtype=torch.uint8)

    def peak(variant: str, lr: float | None) -> float:
        task = bl.build(variant, 10, 0, "cpu", None)
        return bl.train(task, Noise(), variant, 1, 0, batch=2, lr=lr)[-1]["lr"]

    assert peak("defaults", None) == 3e-3  # the library's pretraining rate
    assert peak("defaults", 1e-3) == 1e-3  # --lr: the rate of the earlier tables
    assert peak("defaults+sgd", 1e-3) == 0.01  # a variant's own rate wins


def test_liftoff_engine_mode_scores_the_engines_own_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("skimage")
    import sys

    import bench_jigsaw_liftoff

    out = tmp_path / "engine.json"
    argv = ["bench_jigsaw_liftoff.py", "--engine", "64", "--steps", "2", "--workdir"]
    argv += [str(tmp_path / "work"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_jigsaw_liftoff.main()
    report = json.loads(out.read_text())["engine"]
    # 64 crops: 4 held out by the engine, 60 trained on in 2 steps of 32: one epoch
    assert report["crops"] == 64 and report["steps"] == 2 and report["epochs_run"] == 1
    assert report["config"]["head"] == "relation"  # the library's default, untouched
    assert report["config"]["lr"] == 3e-3  # the pretraining's default rate
    # --lr sets the engine's rate (the rate of the tables measured before 3e-3)
    monkeypatch.setattr(sys, "argv", [*argv, "--lr", "1e-3"])
    bench_jigsaw_liftoff.main()
    assert json.loads(out.read_text())["engine"]["config"]["lr"] == 1e-3
    assert set(report["held_out_hits_by_photograph"]) == set(bench_jigsaw_liftoff.HELD_OUT)
    assert 0.0 <= report["held_out_acc"] <= 1.0
    assert len(list((tmp_path / "work" / "unlabeled").glob("*.png"))) == 64


def test_transfer_rows_without_pretraining_ignore_the_pretext(tmp_path: Path) -> None:
    import bench_transfer

    args = [*_MICRO, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--rows", "al", "ssl_al", "--no-probe", "--input-norm", "encoder"]  # fmt: skip
    first = bench_transfer.main(args)
    other = bench_transfer.main([*args, "--pretext", "rotation"])
    # + AL does not pretrain: its run is found in the cache; + SSL + AL trains again
    assert other["run_seconds"]["al_b2_s0"] == 0.0
    assert other["run_seconds"]["ssl_al_b2_s0"] > 0.0
    assert first["run_seconds"]["al_b2_s0"] > 0.0
    assert len(list((tmp_path / "cache" / "runs").glob("al_*"))) == 1


def test_transfer_set_reaches_the_pretrained_rows_only(tmp_path: Path) -> None:
    import bench_transfer
    import yaml

    args = [*_MICRO, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--rows", "al", "ssl_al", "--no-probe", "--input-norm", "encoder"]  # fmt: skip
    bench_transfer.main(args)
    again = bench_transfer.main([*args, "--transfer-set", "train.encoder_layer_decay=0.5"])
    # + AL keeps its recipe and its cached run; + SSL + AL trains with the layer-wise decay
    assert again["run_seconds"]["al_b2_s0"] == 0.0
    assert again["run_seconds"]["ssl_al_b2_s0"] > 0.0
    assert list(again["settings"]["transfer_overrides"]) == ["train.encoder_layer_decay=0.5"]
    runs = sorted((tmp_path / "cache" / "runs").glob("ssl_al_*"))
    decays = {yaml.safe_load((r / "config.yaml").read_text())["train"]["encoder_layer_decay"]
              for r in runs}  # fmt: skip
    assert decays == {1.0, 0.5}
    assert len(list((tmp_path / "cache" / "runs").glob("al_*"))) == 1


def test_transfer_probe_reference_is_an_encoder_trained_with_labels(tmp_path: Path) -> None:
    import bench_transfer

    args = [*_MICRO, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--rows", "--probe-reference", "--lesion-probe"]  # fmt: skip
    payload = bench_transfer.main(args)
    assert {r["row"] for r in payload["probe_auc"]} == {"jigsaw", "random", "supervised"}
    # the lesion probe ran on the same three feature sets
    assert {r["row"] for r in payload["lesion_probe_auc"]} == {"jigsaw", "random", "supervised"}
    assert "Lesion probe" in (tmp_path / "out" / "transfer.md").read_text()
    assert [r["pair"] for r in payload["probe_diffs"]] == [
        "jigsaw - random",
        "supervised - jigsaw",
    ]
    saved = list((tmp_path / "cache").glob("patch_features_supervised_*.npy"))
    assert len(saved) == 1 and np.load(saved[0]).ndim == 3  # (n, N, D), cached
    assert not list((tmp_path / "cache" / "runs").rglob("*.pt"))  # features kept, weights not
    again = bench_transfer.main(args)
    assert again["probe_auc"] == payload["probe_auc"]


def test_lesion_probe_reads_the_lesion_from_features_that_hold_it() -> None:
    from types import SimpleNamespace

    import bench_transfer

    rng = np.random.default_rng(0)
    boxes = np.array([[x, y, x + 10, y + 10] for y in (0, 10) for x in (0, 10)], float)
    records, truth = [], []
    for i in range(80):  # 40 patients, 2 images each; every other patient has a lesion
        patient = f"P{i // 2:02d}"
        lesion = (i // 2) % 2 == 1
        cell = (i // 2) % 4
        x0, y0 = boxes[cell, :2] + 2
        extra = {"lesion_x0": x0, "lesion_y0": y0, "lesion_x1": x0 + 6, "lesion_y1": y0 + 6}
        records.append(SimpleNamespace(patient=patient, extra=extra if lesion else {}))
        truth.append(np.eye(4)[cell] if lesion else np.zeros(4))
    labels, kept = bench_transfer.patch_lesion_labels(SimpleNamespace(records=records), boxes)
    assert (labels == np.array(truth)).all() and kept.all()  # 36% of a patch: a lesion patch
    data = SimpleNamespace(
        records=records,
        pool={f"P{p:02d}": [2 * p, 2 * p + 1] for p in range(20)},
        test_index=np.arange(40, 80),
    )
    noise = rng.normal(size=(80, 4, 8))
    holds = noise.copy()
    holds[..., 0] += 3.0 * labels  # one feature says "lesion here"
    aucs, diffs = bench_transfer.lesion_probe(
        {"holds": holds, "random": noise}, data, boxes, [("holds", "random")], n_boot=50
    )
    by_name = {r["row"]: r["auc"] for r in aucs}
    assert by_name["holds"] > 0.95 and 0.2 < by_name["random"] < 0.8
    assert diffs[0]["pair"] == "holds - random" and diffs[0]["ci_low"] > 0
    assert aucs[0]["budget"] == 20  # the pool's patients trained it
    # no lesion anywhere: skipped, not an error
    bare = SimpleNamespace(**{**vars(data), "records": [SimpleNamespace(patient=r.patient,
                           extra={}) for r in records]})  # fmt: skip
    assert bench_transfer.lesion_probe({"random": noise}, bare, boxes, [], 10) == ([], [])
