"""The patchssl command line: every command on tiny synthetic data, exit codes, help texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_pretext_plugins import EXAMPLE, PLUGIN_MODULE, write_dist

from patchssl.checkpoint import load_checkpoint
from patchssl.cli import build_parser, main
from patchssl.engine.testing import TINY_CLI_ARGS, make_tiny_dataset

TINY_MODEL = TINY_CLI_ARGS  # a tiny model on the CPU, for any pretext task
TINY = [*TINY_MODEL, "--set", "pretext.options.num_permutations=8"]  # a small jigsaw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), num_unlabeled=12, num_patients=16)


def test_help_of_every_command_documents_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {
        "prepare",
        "pretrain",
        "probe",
        "finetune",
        "evaluate",
        "explain",
        "predict",
        "demo",
        "pretexts",
        "permutations",
    }
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "usage: patchssl" in out
        assert "(default: None)" not in out and "(default: False)" not in out


def test_python_dash_m_runs_and_lists_pretexts():
    proc = subprocess.run(
        [sys.executable, "-m", "patchssl", "pretexts"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "jigsaw" in proc.stdout and "rotation" in proc.stdout


def test_permutations_generate_and_describe(tmp_path, capsys):
    path = tmp_path / "perms.npy"
    assert main(["permutations", "generate", str(path), "--num", "24", "--seed", "1"]) == 0
    assert path.is_file() and "generated 24 permutations" in capsys.readouterr().out
    assert main(["permutations", "describe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fingerprint" in out and str(path) in out
    assert main(["permutations", "describe", str(tmp_path / "missing.npy")]) == 2


def test_permutations_generate_a_single_permutation(tmp_path, capsys):
    # one permutation has no pairs: the Hamming statistics are "n/a", not an error
    path = tmp_path / "sub" / "one.txt"  # a missing folder is created
    assert main(["permutations", "generate", str(path), "--num", "1", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "generated 1 permutation of 9 tiles (min Hamming n/a, mean n/a" in out
    assert main(["permutations", "describe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "num_permutations: 1" in out and "mean_hamming: n/a" in out
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num", "0"], "num_permutations must be a positive int; got 0"),
        (["--tiles", "1"], "num_tiles must be an int >= 2; got 1"),
        (["--method", "best"], "unknown permutation method 'best'"),
    ],
)
def test_permutations_generate_refuses_bad_arguments(tmp_path, capsys, args, message):
    path = tmp_path / "perms.npy"
    assert main(["permutations", "generate", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not path.exists()


def test_permutations_describe_refuses_a_malformed_file(tmp_path, capsys):
    path = tmp_path / "twice.txt"
    path.write_text("0 1 2\n0 1 2\n")
    assert main(["permutations", "describe", str(path)]) == 2
    err = capsys.readouterr().err
    assert "must be distinct" in err and "Traceback" not in err


def test_pretrain_an_external_pretext_plugin(data, tmp_path):
    # the example plugin "installed" as pip leaves it: a dist-info with its entry point, and
    # its module importable; the command line finds it by name in a fresh process
    site = tmp_path / "site"
    write_dist(site, "patchssl-flipped-tile", "0.1.0", {
        "flipped_tile": f"{PLUGIN_MODULE}:FlippedTilePretext"
    })  # fmt: skip
    path = [str(site), str(EXAMPLE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(data.unlabeled_dir), "--out", str(out), "--epochs", "1"]
    args += ["--pretext", "flipped_tile", *TINY_MODEL, "--threads", "1"]
    args += ["--set", "pretext.options={hidden_dim: 8, concat_dim: 16}"]
    proc = subprocess.run(
        [sys.executable, "-m", "patchssl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"outputs written to {out}" in proc.stdout
    checkpoint = load_checkpoint(out / "best.pt")
    assert checkpoint["kind"] == "pretrain"
    assert checkpoint["model_config"]["pretext"] == "flipped_tile"
    assert checkpoint["model_config"]["pretext_kwargs"]["hidden_dim"] == 8


def test_full_pipeline_through_the_cli(data, tmp_path, capsys):
    prep, pre, ft = tmp_path / "prep", tmp_path / "pre", tmp_path / "ft"
    assert (
        main(
            [
                "prepare",
                "--data",
                str(data.unlabeled_dir),
                "--manifest",
                str(data.manifest),
                "--image-size",
                "96",
                "--workers",
                "1",
                "--out",
                str(prep),
                "--no-progress",
            ]
        )
        == 0
    )
    assert f"outputs written to {prep}" in capsys.readouterr().out
    assert (prep / "split.json").is_file() and (prep / "cache" / "unlabeled").is_dir()
    cache = ["--set", f"data.cache={prep / 'cache'}"]
    args = ["pretrain", "--data", str(data.unlabeled_dir), "--out", str(pre), "--epochs", "1"]
    assert main(args + TINY + cache) == 0
    assert f"outputs written to {pre}" in capsys.readouterr().out
    args = ["finetune", "--data", str(data.manifest), "--out", str(ft), "--epochs", "1"]
    args += ["--init", str(pre / "best.pt"), "--split", str(prep / "split.json")]
    assert main(args + TINY + cache) == 0
    assert f"outputs written to {ft}" in capsys.readouterr().out
    assert main(["evaluate", "--out", str(ft), "--n-boot", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| Accuracy (%)" in out and f"outputs written to {ft}" in out
    assert json.loads((ft / "eval.json").read_text())["test"]["counts"]["n"] > 0
    assert main(["explain", "--out", str(ft), "--num-images", "1", "--no-progress"]) == 0
    assert "outputs written to" in capsys.readouterr().out
    assert (ft / "explain" / "embedding_tsne.png").is_file()


def test_resume_through_the_cli_uses_the_saved_config(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["pretrain", "--data", str(data.unlabeled_dir), "--out", str(out), *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 0
    # no --config: the run's config.yaml is the base; --epochs extends the run
    assert main(["pretrain", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    # another backbone on resume: refused, exit 2
    code = main(["pretrain", "--out", str(out), "--resume", "--backbone", "test_efficientnet"])
    assert code == 2
    assert "backbone" in capsys.readouterr().err


def test_user_errors_exit_2_without_traceback(data, tmp_path, capsys):
    rows = data.manifest.read_text().splitlines()
    col = rows[0].split(",").index("label")
    cells = rows[1].split(",")
    cells[col] = "CIN7"
    manifest = tmp_path / "bad.csv"
    manifest.write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
    args = ["finetune", "--data", str(manifest), "--out", str(tmp_path / "ft"), *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "CIN7" in err and "Traceback" not in err
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["pretrain", "--set", "train.epoch=3"]) == 2
    assert "Did you mean 'epochs'" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "x")]) == 2
    assert "unlabeled" in capsys.readouterr().err


def test_non_finite_loss_exits_1(data, tmp_path, capsys):
    args = ["pretrain", "--data", str(data.unlabeled_dir), "--out", str(tmp_path), *TINY]
    args += ["--lr", "1e30", "--epochs", "1", "--set", "train.warmup_epochs=0"]
    assert main(args) == 1
    assert "non-finite loss" in capsys.readouterr().err


def test_demo_flags_win_over_the_config_file(tmp_path, monkeypatch, capsys):
    import patchssl.engine as engine

    seen = {}

    class _Result:
        out_dir = tmp_path
        report_md = tmp_path / "report.md"

    def fake_run_demo(config):
        seen["config"] = config
        return _Result()

    monkeypatch.setattr(engine, "run_demo", fake_run_demo)
    file = tmp_path / "demo.yaml"
    file.write_text("out: from-file\ntrain:\n  seed: 5\n  device: cuda\nmodel:\n  gap: 3\n")
    assert main(["demo", "--config", str(file), "--seed", "3", "--device", "cpu"]) == 0
    config = seen["config"]
    assert config.train.seed == 3 and config.train.device == "cpu"  # the flags
    assert config.out == "from-file" and config.model.gap == 3  # the file, where no flag
    assert main(["demo", "--config", str(file), "--set", "train.seed=7"]) == 0
    assert seen["config"].train.seed == 7  # --set wins over both
    assert main(["demo"]) == 0
    assert seen["config"].out == "patchssl-demo" and seen["config"].train.seed == 0


def test_a_closed_pipe_ends_quietly(monkeypatch):
    # `patchssl permutations describe | head -1`: the reader has closed the pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    # line-buffered: the first print hits the pipe; closing it later is quiet, because its
    # descriptor then points at /dev/null
    with open(write_end, "w", buffering=1) as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        assert main(["permutations", "describe"]) == 141  # no BrokenPipeError escapes


@pytest.mark.parametrize(
    ("given", "expected"),
    [("true", True), ("False", False), ("weights/r50.safetensors", "weights/r50.safetensors")],
)
def test_pretrained_flag_takes_true_false_or_a_file(given, expected):
    from patchssl.cli import _config_from_args

    for command in ("pretrain", "finetune"):
        args = build_parser().parse_args([command, "--pretrained", given])
        assert _config_from_args(args).model.pretrained == expected


_HEAVY = ("torch", "numpy", "timm", "scipy", "sklearn", "PIL", "matplotlib")


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["pretrain", "--help"], ["finetune", "--epochs", "many"], ["nocommand"]],
)
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = (
        "import sys\n"
        "from patchssl.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    status = exit_.code\n"
        f"print('loaded:', [m for m in {_HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if "--help" in argv else 2), proc.stderr
    assert "loaded: []" in proc.stderr


def test_help_shows_the_config_defaults(capsys):
    from patchssl.engine.config import Config

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(train.epochs; default: {Config().train.epochs})" in out
    assert f"(model.backbone; default: {Config().model.backbone})" in out


def test_manifest_column_flags_set_the_config():
    from patchssl.cli import _config_from_args

    args = build_parser().parse_args(
        ["finetune", "--image-column", "path", "--label-column", "grade", "--patient-column", ""]
    )
    data = _config_from_args(args).data
    assert (data.path_column, data.label_column, data.patient_column) == ("path", "grade", "")
