"""Runs that never lose or corrupt work: crashes between writes, non-finite weights, taken
run folders, degenerate data, manifest paths, corrupt checkpoints and OS errors.

Each case goes through the command line, as a user would meet it (in a subprocess where the
process itself must die), on a tiny model and 96 px images.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from patchssl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchssl.cli import main
from patchssl.engine.testing import TINY_CLI_ARGS, make_tiny_dataset

TINY = [*TINY_CLI_ARGS, "--set", "pretext.options.num_permutations=8"]
# every epoch "improves" (the global step only grows), so each epoch writes last.pt then best.pt
EVERY_EPOCH_BEST = ["--set", "train.monitor=step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), num_unlabeled=12, num_patients=16)


def pretrain_args(data, out, *extra):
    return ["pretrain", "--data", str(data.unlabeled_dir), "--out", str(out), *TINY, *extra]


def finetune_args(data, out, *extra, manifest=None):
    manifest = manifest or data.manifest
    return ["finetune", "--data", str(manifest), "--out", str(out), *TINY, *extra]


def crash_after_writes(monkeypatch, count: int) -> list[str]:
    """Make the trainer crash (KeyboardInterrupt) right after its ``count``-th checkpoint write.

    A write is a :func:`save_checkpoint` or a :func:`copy_checkpoint` (``best.pt`` is copied
    from the ``last.pt`` of the same epoch).
    """
    import patchssl.checkpoint as checkpoint

    written: list[str] = []

    def counting(real):
        def write(source_or_path, *rest):
            if len(written) >= count:
                raise KeyboardInterrupt
            result = real(source_or_path, *rest)
            written.append(Path(result).name)
            return result

        return write

    for name in ("save_checkpoint", "copy_checkpoint"):
        monkeypatch.setattr(checkpoint, name, counting(getattr(checkpoint, name)))
    return written


def assert_pair_consistent(out: Path) -> None:
    """best.pt holds the best epoch that last.pt records (the same weights here)."""
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert best["epoch"] == last["trainer"]["best_epoch"]
    if best["epoch"] == last["epoch"]:
        for key, value in last["model"].items():
            assert torch.equal(value, best["model"][key]), key


# -- 1. best.pt after a crash ------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 3])  # 1: best.pt missing; 3: best.pt one epoch behind
def test_best_pt_follows_last_pt_after_a_crash_between_the_writes(
    data, tmp_path, monkeypatch, capsys, count
):
    out = tmp_path / "run"
    written = crash_after_writes(monkeypatch, count)
    assert main(pretrain_args(data, out, "--epochs", "2", *EVERY_EPOCH_BEST)) == 130
    assert written == ["last.pt", "best.pt", "last.pt"][:count]
    last = load_checkpoint(out / "last.pt")
    assert last["trainer"]["best_epoch"] == last["epoch"]  # recorded, but best.pt not written
    assert (
        (not (out / "best.pt").exists())
        if count == 1
        else (load_checkpoint(out / "best.pt")["epoch"] < last["epoch"])
    )
    monkeypatch.undo()
    capsys.readouterr()
    # resuming restores best.pt first (also when there is nothing left to train)
    epochs = str(last["epoch"] + 1)
    assert main(["pretrain", "--out", str(out), "--resume", "--epochs", epochs]) == 0
    assert "restored it" in capsys.readouterr().out
    assert_pair_consistent(out)


def test_a_real_kill_between_last_pt_and_best_pt_then_resume(data, tmp_path):
    out = tmp_path / "run"
    # the process dies (no cleanup at all) right after its third write: last.pt of epoch 2
    script = textwrap.dedent(
        f"""
        import os, sys
        import patchssl.checkpoint as checkpoint
        calls = []
        def counting(real):
            def write(*args):
                result = real(*args)
                calls.append(result)
                if len(calls) == 3:
                    os._exit(137)
                return result
            return write
        checkpoint.save_checkpoint = counting(checkpoint.save_checkpoint)
        checkpoint.copy_checkpoint = counting(checkpoint.copy_checkpoint)
        from patchssl.cli import main
        sys.exit(main({pretrain_args(data, out, "--epochs", "2", *EVERY_EPOCH_BEST)!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    assert load_checkpoint(out / "best.pt")["epoch"] == 0  # stale: last.pt says epoch 1
    (out / ".last.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # a write cut short
    proc = subprocess.run(
        [sys.executable, "-m", "patchssl", "pretrain", "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no longer running" in proc.stdout  # the dead process's lock file was taken over
    assert "removed 1 unfinished temporary file" in proc.stdout
    assert not (out / ".last.pt.x1y2z3.tmp").exists()
    assert_pair_consistent(out)


# -- 2. non-finite weights ---------------------------------------------------------------------
def test_non_finite_weights_are_never_checkpointed(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = pretrain_args(data, out, "--lr", "1e6", "--epochs", "2", *EVERY_EPOCH_BEST)
    args += ["--set", "train.max_steps_per_epoch=1", "--set", "train.warmup_epochs=0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "nothing was saved for this epoch" in err
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            checkpoint = load_checkpoint(out / name)
            assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    if not (out / "last.pt").exists():
        assert "No checkpoint had been written yet" in err


def test_check_finite_looks_at_the_weights_not_only_the_loss(data, tmp_path):
    from patchssl.engine.loop import NonFiniteLossError

    class Probe:  # the state Trainer.check_finite reads
        def __init__(self, weight):
            self.model = torch.nn.Linear(2, 2)
            with torch.no_grad():
                self.model.weight.fill_(weight)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
            self.last_path = tmp_path / "last.pt"

    from patchssl.engine.loop import Trainer

    Trainer.check_finite(Probe(1.0), 0, {"train_loss": 0.5, "val_loss": 0.7})
    with pytest.raises(NonFiniteLossError, match="weight weight"):
        Trainer.check_finite(Probe(float("nan")), 0, {"train_loss": 0.5})
    with pytest.raises(NonFiniteLossError, match="val_loss=nan"):
        Trainer.check_finite(Probe(1.0), 0, {"train_loss": 0.5, "val_loss": float("nan")})


# -- 3. the run folder -------------------------------------------------------------------------
def test_a_finished_run_is_not_replaced_without_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(pretrain_args(data, out, "--epochs", "1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(pretrain_args(data, out, "--epochs", "1", "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a refused --resume (another backbone) rewrites nothing either, config.yaml included
    assert main(["pretrain", "--out", str(out), "--resume", "--backbone", "test_efficientnet"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(["pretrain", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    # checkpoints are 0644 (umask 022), like the other files of the run
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "last.pt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert main(pretrain_args(data, out, "--epochs", "1", "--overwrite")) == 0
    assert "removed the previous run's last.pt, best.pt, metrics.csv" in capsys.readouterr().out


def test_a_folder_in_use_is_refused_and_its_files_untouched(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another run holding the folder's lock
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(out / '.patchssl.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(pretrain_args(data, out, "--epochs", "1")) == 2
        err = capsys.readouterr().err
        assert "in use by another patchssl run" in err and f"process {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [".patchssl.lock"]
    finally:
        holder.stdin.close()
        holder.wait()
    # once it is released, the folder can be used
    fd = os.open(out / ".patchssl.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    os.close(fd)


def test_a_refused_finetune_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(finetune_args(data, out, "--epochs", "1", "--init", str(tmp_path / "no.pt"))) == 2
    assert "model.init" in capsys.readouterr().err
    assert not out.exists()  # no split.json, no config.yaml, not even the folder


# -- 4. symlink loops and non-regular files ------------------------------------------------------
def test_a_symlink_loop_lists_each_image_once_and_fifos_are_skipped(tmp_path):
    from PIL import Image

    from patchssl.data import find_images, load_image
    from patchssl.data.io import ImageReadError

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / f"a{i}.png")
        Image.new("RGB", (8, 8)).save(root / "sub" / f"b{i}.png")
    (root / "sub" / "loop").symlink_to("..")
    os.mkfifo(root / "pipe.png")
    found = find_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "a0.png",
        "a1.png",
        "a2.png",
        "sub/b0.png",
        "sub/b1.png",
        "sub/b2.png",
    ]
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(root / "pipe.png", 8)  # returns at once instead of blocking on the FIFO


# -- 5. degenerate data --------------------------------------------------------------------------
def test_all_images_unreadable_is_an_error_naming_them(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(12):
        (folder / f"img{i}.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(folder), "--out", str(out), *TINY, "--epochs", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "trained on no image" in err and "img" in err and "Traceback" not in err
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


def _rewrite_manifest(data, tmp_path, change) -> Path:
    lines = data.manifest.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    rows = change(header, rows)
    path = data.manifest.parent / f"{tmp_path.name}.csv"  # beside the images (the data root)
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def test_one_class_manifest_is_refused(data, tmp_path, capsys):
    def negatives_only(header, rows):
        col = header.index("label")
        return [r for r in rows if r[col] in ("CIN0", "CIN1")]

    manifest = _rewrite_manifest(data, tmp_path, negatives_only)
    out = tmp_path / "ft"
    assert main(finetune_args(data, out, "--epochs", "1", manifest=manifest)) == 2
    captured = capsys.readouterr()
    assert "do not cover every class" in captured.err and "CIN2+" in captured.err
    assert "split (" not in captured.out and not out.exists()


def test_a_three_class_map_with_two_classes_is_refused_before_the_split(data, tmp_path, capsys):
    out = tmp_path / "ft"
    label_map = "CIN0:0,CIN1:1,CIN2:2,CIN3:2,CIN4:2"
    args = finetune_args(data, out, "--epochs", "1", "--label-map", label_map)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "3 classes" in captured.err and "model.num_classes=2" in captured.err
    assert "split (" not in captured.out


@pytest.mark.parametrize("what", ["label", "patient"])
def test_one_image_on_rows_that_contradict_each_other(data, tmp_path, capsys, what):
    def contradict(header, rows):
        col = header.index(what)
        copy = list(rows[0])
        if what == "label":
            copy[col] = "CIN3" if copy[col] != "CIN3" else "CIN0"
        else:
            copy[col] += "x"
        return [*rows, copy]

    manifest = _rewrite_manifest(data, tmp_path, contradict)
    assert main(finetune_args(data, tmp_path / "ft", manifest=manifest)) == 2
    err = capsys.readouterr().err
    assert "contradiction" in err and "lines 2, " in err and "Traceback" not in err


def test_a_split_that_leaves_images_out_warns_with_counts(data, tmp_path, capsys):
    from patchssl.data import load_split, save_split
    from patchssl.engine.config import Config
    from patchssl.engine.data import labeled_records, make_split

    config = Config()
    config.data.manifest = str(data.manifest)
    config.out = str(tmp_path)
    records = labeled_records(config)
    make_split(config, records, tmp_path)
    parts = load_split(tmp_path / "split.json")
    parts["train"] = parts["train"][: len(parts["train"]) // 2]
    kept = sum(len(v) for v in parts.values())
    save_split(tmp_path / "half.json", parts)
    config.data.split = str(tmp_path / "half.json")
    capsys.readouterr()
    make_split(config, records, tmp_path / "again")
    err = capsys.readouterr().err
    assert f"leaves {len(records) - kept} of {len(records)} manifest image(s) out" in err


# -- 6. manifest paths ----------------------------------------------------------------------------
def test_manifest_paths_stay_inside_the_data_root_for_every_command(data, tmp_path, capsys):
    def escape(header, rows):
        col = header.index("image")
        rows[0][col] = "../../../../etc/passwd"
        rows[1][col] = str(tmp_path / "elsewhere.png")
        return rows

    manifest = _rewrite_manifest(data, tmp_path, escape)
    for command in (["finetune", "--data"], ["prepare", "--manifest"]):
        out = tmp_path / command[0]
        assert main([*command, str(manifest), "--out", str(out), "--image-size", "32"]) == 2
        err = capsys.readouterr().err
        assert "2 image path(s) lead outside the data root" in err and "line 2" in err
        assert "allow_outside_root" in err and not out.exists()


def test_allow_outside_root_opts_out(data, tmp_path):
    from patchssl.data import ManifestError, read_manifest

    manifest = tmp_path / "m.csv"
    outside = data.manifest.parent / "labeled"
    image = sorted(p for p in outside.iterdir())[0]
    manifest.write_text(f"image,label,patient\n{image},CIN1,p1\n")
    with pytest.raises(ManifestError, match="outside the data root"):
        read_manifest(manifest, label_map="cervix", allow_outside_root=False)
    assert read_manifest(manifest, label_map="cervix", allow_outside_root=True)[0].path == image


# -- 7. checkpoint integrity ---------------------------------------------------------------------
def test_a_flipped_bit_in_the_optimizer_state_is_detected(tmp_path):
    state = torch.arange(64, dtype=torch.float32) + 0.25
    path = save_checkpoint(
        tmp_path / "c.pt", {"model": {"w": torch.ones(3)}, "optimizer": {"exp_avg": state}}
    )
    assert torch.equal(load_checkpoint(path)["optimizer"]["exp_avg"], state)
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(state.numpy().tobytes())
    assert at > 0
    raw[at + 17] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "patchssl", "format_version": 1, "model": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


# -- 8. errors that read like crashes --------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "train.lr must be > 0.0"),
        (["--set", "train.lr=.nan"], "train.lr must be a finite number"),
        (["--set", "train.lr=.inf"], "train.lr must be a finite number"),
        (["--workers", "-1"], "data.workers must be >= 0"),
    ],
)
def test_bad_values_are_refused_when_the_config_is_read(tmp_path, capsys, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "patchssl", "pretrain", "--data", str(tmp_path), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_folder_that_cannot_be_written_exits_2_in_one_line(data, tmp_path, monkeypatch, capsys):
    import patchssl.engine.run_dir as run_dir

    def refuse(out):
        raise PermissionError(errno.EACCES, "Permission denied", str(out / run_dir.LOCK_NAME))

    monkeypatch.setattr(run_dir, "_lock", refuse)  # a read-only folder (tests may run as root)
    assert main(pretrain_args(data, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "Permission denied" in err and "--out" in err and len(err.splitlines()) == 1


def test_a_full_disk_exits_2_in_one_line(data, tmp_path, monkeypatch, capsys):
    import patchssl.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    out = tmp_path / "run"
    assert main(pretrain_args(data, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "free some space" in err
    assert len([line for line in err.splitlines() if not line.startswith("warning:")]) == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# -- 9. smaller things -----------------------------------------------------------------------------
def test_a_repeated_manifest_row_is_prepared_once(data, tmp_path, capsys):
    manifest = _rewrite_manifest(data, tmp_path, lambda header, rows: [*rows, rows[0]])
    out = tmp_path / "prep"
    args = ["prepare", "--manifest", str(manifest), "--out", str(out), "--image-size", "32"]
    assert main([*args, "--workers", "1", "--no-progress"]) == 0
    index = json.loads((out / "cache" / "labeled" / "patchssl_prepare.json").read_text())
    rows = len(data.manifest.read_text().splitlines()) - 1
    assert index["counts"]["total"] == rows


def test_a_permutation_mismatch_names_the_first_differing_row_only():
    from patchssl.engine.checkpointing import config_differences

    saved = [[i, (i + 1) % 9, (i + 2) % 9] for i in range(1000)]
    current = [list(row) for row in saved]
    current[7] = [0, 0, 0]
    (line,) = config_differences({"p": saved}, {"p": current})
    assert "first difference at row 7" in line and "[7, 8, 0]" in line
    assert len(line) < 300
