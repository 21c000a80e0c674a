"""Multi-process training under torchrun: two CPU processes with the gloo backend.

The launches go through ``python -m torch.distributed.run`` (torchrun itself), so they test the
real path: environment, process group, DistributedDataParallel, rank-0 writes, teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from patchssl.checkpoint import load_checkpoint
from patchssl.engine import finetune, pretrain
from patchssl.engine.config import Config, ConfigError, save_config
from patchssl.engine.loop import (
    StepOutput,
    Trainer,
    describe_batch,
    per_process_batch_size,
)
from patchssl.engine.testing import make_tiny_dataset, tiny_config

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

REPO = Path(__file__).resolve().parents[1]

# Runs `python -m patchssl ARGS` after installing an audit hook that records, per rank, every
# file this process creates, opens for writing, renames or creates a folder for under
# $AUDIT_OUT, and every corrupt test image it reads (to know which rank met which). Each rank
# also saves its own model state after training, and how many stand-in batches (a batch whose
# every image was unreadable) it stepped on, to $AUDIT_STATE.<rank>.
AUDIT_WRAPPER = textwrap.dedent(
    """
    import os, runpy, sys

    import torch
    from patchssl.engine import loop

    standins = [0]
    placeholder, fit = loop.Trainer._placeholder_batch, loop.Trainer.fit

    def counted_placeholder(self):
        standins[0] += 1
        return placeholder(self)

    def fit_and_save_state(self):
        result = fit(self)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        path = os.environ["AUDIT_STATE"] + "." + os.environ["RANK"]
        torch.save({"model": state, "standins": standins[0]}, path)
        return result

    loop.Trainer._placeholder_batch = counted_placeholder
    loop.Trainer.fit = fit_and_save_state

    out = os.path.realpath(os.environ["AUDIT_OUT"])
    log = open(os.environ["AUDIT_LOG"] + "." + os.environ["RANK"], "w")
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def record(kind, path):
        try:
            path = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if path == out or path.startswith(out + os.sep):
            log.write(kind + " " + path + "\\n")
            log.flush()
        elif kind == "read" and "corrupt" in os.path.basename(path):
            log.write("corrupt " + path + "\\n")
            log.flush()

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE)
            record("write" if writing else "read", path)
        elif event == "os.rename":
            record("rename", args[1])
        elif event == "os.mkdir":
            record("mkdir", args[0])

    sys.addaudithook(hook)
    sys.argv = ["patchssl", *sys.argv[1:]]
    runpy.run_module("patchssl", run_name="__main__", alter_sys=True)
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def _torchrun(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port on localhost
        "--nproc_per_node",
        "2",
        *args,
    ]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(
        tmp_path_factory.mktemp("data"), num_unlabeled=20, num_patients=16, images_per_patient=2
    )


def _comparable_config(data: Any, out: Path) -> Config:
    """Fine-tuning with no random draw (no jitter, flips or dropout) and no batch statistics.

    GroupNorm instead of BatchNorm, unweighted cross-entropy (the mean over a batch is then
    the mean of the per-process means) and SGD (weights linear in the gradients): a step on 2
    x 5 images must equal a step on the same 10 images in one process, up to rounding.
    """
    config = tiny_config(data, out, epochs=2)
    config.train.device = "cpu"  # the in-process reference too (torchrun's processes hide GPUs)
    config.model.norm = "group"
    config.model.jitter = 0
    config.model.dropout = 0.0
    config.train.augment = "none"
    config.train.class_weights = "none"
    config.train.optimizer = "sgd"
    config.train.lr = 0.05
    config.train.warmup_epochs = 0.0
    return config


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_total_batch(data, tmp_path):
    from patchssl.engine.finetuning import build_classifier

    config = _comparable_config(data, tmp_path / "ddp")
    config.train.batch_size = 5  # per process: 2 x 5 = 10 images per step
    save_config(config, tmp_path / "ddp.yaml")
    result = _torchrun(
        ["-m", "patchssl", "finetune", "--config", str(tmp_path / "ddp.yaml")], tmp_path, _env()
    )
    assert "10 images per step (5 per process x 2 processes)" in result.stdout
    assert result.stdout.count("outputs written to") == 1  # rank 0 alone prints

    single = _comparable_config(data, tmp_path / "single")
    single.train.batch_size = 10
    reference = finetune(single)

    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    one = load_checkpoint(reference.last_checkpoint)
    assert ddp["trainer"]["world_size"] == 2 and ddp["trainer"]["batch_size"] == 5
    assert ddp["step"] == one["step"] == 4  # 20 training images, 10 per step, 2 epochs
    assert ddp["model"].keys() == one["model"].keys()
    assert not any(k.startswith("module.") for k in ddp["model"])

    init = build_classifier(single, torch.device("cpu"))[0].state_dict()
    moved = max((one["model"][k].float() - init[k].float()).abs().max() for k in init)
    gap = max((ddp["model"][k].float() - one["model"][k].float()).abs().max() for k in init)
    print(f"largest weight change {moved:.3g}; largest 2-process vs 1-process gap {gap:.3g}")
    assert moved > 1e-3  # training moved the weights...
    # ...and two processes moved them the same way. Rounding differs between the two (a sum
    # over 2 x 5 images against one over 10), and a ReLU or attention weight near a boundary
    # can amplify it: measured gaps over data orders (seeds 0, 1, 2) were 1.35e-5, 4.5e-8 and
    # 2.5e-6 for weight changes of 8.8e-3, 1.4e-2 and 1.1e-2. A sharding mistake (other images
    # in a step) moves the weights apart by the order of the change itself.
    assert gap < 1e-4 and gap < moved / 100

    # metrics are reduced over processes (train) or computed on the whole val part (rank 0)
    for row_ddp, row_one in zip(ddp["trainer"]["history"], one["trainer"]["history"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_auc", "val_acc"):
            assert row_ddp[key] == pytest.approx(row_one[key], abs=1e-4), key


def _rank_states(prefix: Path) -> list[dict[str, Any]]:
    """What AUDIT_WRAPPER saved for rank 0 and rank 1 (model state, stand-in batch count)."""
    return [torch.load(f"{prefix}.{rank}", weights_only=True) for rank in (0, 1)]


def _assert_same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensor(s) differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_rank0_alone_writes_and_resume_on_one_process(data, tmp_path, capsys):
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for path in sorted(Path(data.unlabeled_dir).glob("*.png")):
        (unlabeled / path.name).write_bytes(path.read_bytes())
    corrupt = [unlabeled / f"corrupt{i}.png" for i in range(4)]
    for path in corrupt:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "run"
    config = tiny_config(data, out, epochs=1)
    config.data.unlabeled = str(unlabeled)
    config.pretext.options.update(hidden_dim=32, concat_dim=64)  # small checkpoints
    # One image per process and step: each unreadable image leaves its rank a batch with no
    # image, on which it steps on a stand-in batch while the other rank trains.
    config.train.batch_size = 1
    config.dist.timeout_s = 120  # a collective mismatch fails the test instead of hanging
    save_config(config, tmp_path / "run.yaml")
    logs, states = tmp_path / "audit", tmp_path / "state"
    (tmp_path / "audit_main.py").write_text(AUDIT_WRAPPER)
    env = _env(AUDIT_OUT=str(out), AUDIT_LOG=str(logs), AUDIT_STATE=str(states))
    result = _torchrun(
        ["audit_main.py", "pretrain", "--config", str(tmp_path / "run.yaml")], tmp_path, env
    )
    assert "2 images per step (1 per process x 2 processes)" in result.stdout

    rank0 = Path(f"{logs}.0").read_text().splitlines()
    rank1 = Path(f"{logs}.1").read_text().splitlines()
    written = lambda lines: [ln for ln in lines if not ln.startswith(("read", "corrupt"))]  # noqa: E731
    assert written(rank1) == []  # rank 1 created, wrote or renamed nothing in the run folder
    assert any(ln.endswith("last.pt") for ln in written(rank0))
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.csv",
        "skipped_files.json",
        "skipped_files.txt",
    ]
    # rank 1 met some of the unreadable images itself; rank 0's report still lists them all
    assert any(ln.startswith("corrupt") for ln in rank1)
    report = (out / "skipped_files.txt").read_text()
    assert all(str(p) in report for p in corrupt), report
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch

    first = load_checkpoint(out / "last.pt")
    assert first["epoch"] == 0 and first["trainer"]["world_size"] == 2
    steps_two = first["trainer"]["steps_per_epoch"]
    assert not any(k.startswith("module.") for k in first["model"])

    # The stand-in batches kept the processes in lockstep: each rank stepped on one for every
    # unreadable image it met, and both ended with the weights of the checkpoint.
    rank_states = _rank_states(states)
    met = [{ln for ln in lines if ln.startswith("corrupt")} for lines in (rank0, rank1)]
    assert [s["standins"] for s in rank_states] == [len(m) for m in met]
    assert sum(s["standins"] for s in rank_states) > 0  # the stand-in path ran
    assert first["step"] == steps_two == 12  # 24 images, 2 per step: stand-ins are steps too
    _assert_same_state(rank_states[0]["model"], rank_states[1]["model"])
    _assert_same_state(rank_states[0]["model"], first["model"])
    # a stand-in does not move the batch-norm statistics (rank 0's, broadcast to every rank)
    assert rank_states[0]["standins"] > 0, "no stand-in on rank 0 any more: change train.seed"
    tracked = {int(v) for k, v in first["model"].items() if k.endswith("num_batches_tracked")}
    assert tracked == {steps_two - rank_states[0]["standins"]}

    # resume the 2-process run in this single process, with the same per-process batch (and
    # the good images only: one process skips an image-less batch, a step less to schedule)
    for path in corrupt:
        path.unlink()
    config.train.epochs = 2
    config.train.resume = True
    capsys.readouterr()
    resumed = pretrain(config)
    said = capsys.readouterr().out
    assert "trained with 2 images per step (1 per process x 2 processes)" in said
    assert "this run uses 1 images per step (1 per process x 1 process)" in said
    last = load_checkpoint(resumed.last_checkpoint)
    steps_one = last["trainer"]["steps_per_epoch"]
    assert steps_one > steps_two  # smaller global batch, more steps per epoch
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert last["epoch"] == 1 and last["step"] == steps_two + steps_one
    # the schedule was moved to the start of epoch 2 of the new length: it ends at min_lr
    assert last["scheduler"]["last_epoch"] == 2 * steps_one
    assert resumed.history[-1]["lr"] == pytest.approx(config.train.min_lr, abs=1e-12)


@pytest.mark.slow
def test_batch_norm_statistics_are_the_same_on_every_process(data, tmp_path):
    # The encoder's default BatchNorm: each process normalises with its own batch, DDP
    # broadcasts rank 0's running statistics before each forward, and the engine copies them
    # to every process after each epoch; every rank must end with the checkpoint's state.
    from patchssl.engine import evaluate

    out = tmp_path / "run"
    config = tiny_config(data, out, epochs=2)
    config.train.device = "cpu"
    config.train.batch_size = 4
    config.dist.timeout_s = 120  # a collective mismatch fails the test instead of hanging
    assert config.model.norm == "batch"
    save_config(config, tmp_path / "run.yaml")
    (tmp_path / "audit_main.py").write_text(AUDIT_WRAPPER)
    states = tmp_path / "state"
    env = _env(AUDIT_OUT=str(out), AUDIT_LOG=str(tmp_path / "audit"), AUDIT_STATE=str(states))
    _torchrun(["audit_main.py", "finetune", "--config", str(tmp_path / "run.yaml")], tmp_path, env)

    ckpt = load_checkpoint(out / "last.pt")
    saved = ckpt["model"]
    rank0, rank1 = (state["model"] for state in _rank_states(states))
    _assert_same_state(rank0, rank1)  # parameters and batch-norm buffers
    _assert_same_state(rank0, saved)
    running = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert running, "the encoder has no BatchNorm layer left"
    # trained statistics (not the initial zeros and ones), updated once per step on rank 0
    assert any(saved[k].abs().max() > 0 for k in running if k.endswith("running_mean"))
    tracked = {int(v) for k, v in saved.items() if k.endswith("num_batches_tracked")}
    assert tracked == {ckpt["step"]} and ckpt["step"] > 0

    # the checkpoint loads and evaluates; its validation AUC is the one logged in training
    # (rank 0 validated with the statistics that were then saved)
    config = Config()
    config.out = str(tmp_path / "eval")
    config.data.workers = 0
    config.train.progress = False
    config.eval.n_boot = 0
    config.eval.checkpoint = str(out / "last.pt")
    result = evaluate(config)
    assert result.test.counts["n"] > 0 and 0.0 <= result.test.metrics["auc"] <= 1.0
    logged = ckpt["trainer"]["history"][-1]["val_auc"]
    assert result.val is not None and result.val.metrics["auc"] == pytest.approx(logged)


# ------------------------------------------------------------------------ no processes needed
@pytest.mark.parametrize("size", [7, 8, 9, 10])
@pytest.mark.parametrize("world", [2, 3])
def test_sampler_shards_cover_the_single_process_order(size, world):
    # The engine's sampler is torch's DistributedSampler; this checks the property the engine
    # relies on (resume with another number of processes), not torch's implementation.
    full = DistributedSampler(range(size), num_replicas=1, rank=0, seed=5)
    full.set_epoch(3)
    order = list(full)
    shards = []
    for rank in range(world):
        sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, seed=5)
        sampler.set_epoch(3)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == -(-size // world)  # padded: equal shards
    padded = order + order[: len(shards[0]) * world - size]
    # step k over all processes = step k of one process with a world-times larger batch
    for batch in (1, 2):
        for k in range(0, len(shards[0]), batch):
            together = sorted(i for s in shards for i in s[k : k + batch])
            assert together == sorted(padded[k * world : (k + batch) * world])
    dropped = [
        list(DistributedSampler(range(size), num_replicas=world, rank=r, seed=5, drop_last=True))
        for r in range(world)
    ]
    assert all(len(s) == size // world for s in dropped)
    assert len({i for s in dropped for i in s}) == size // world * world  # disjoint


def test_global_batch_size_is_split_over_processes():
    train = Config().train
    train.batch_size = 3
    assert per_process_batch_size(train, 4) == 3
    train.global_batch_size = 32
    assert per_process_batch_size(train, 4) == 8
    assert per_process_batch_size(train, 1) == 32
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        per_process_batch_size(train, 3)
    assert describe_batch(8, 4) == "32 images per step (8 per process x 4 processes)"


class _DrawTask:
    """Records the random draws of its steps (the jitter/permutation draws of a real task)."""

    kind = "pretrain"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.train_model = self.model
        self.draws: list[float] = []

    def step(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepOutput:
        self.draws.append(float(torch.rand((), generator=generator)))
        self.draws.append(float(torch.rand(())))  # the global RNG, reseeded per epoch too
        return StepOutput(self.train_model(batch["image"]).pow(2).mean(), 2)

    def validate(self, epoch: int) -> dict[str, float]:
        return {}

    def checkpoint_info(self) -> dict[str, Any]:
        return {"model_config": {}, "permutations_fingerprint": None}


def _draws(monkeypatch, tmp_path, rank: int) -> list[float]:
    import patchssl.engine.loop as loop

    monkeypatch.setattr(loop, "get_rank", lambda: rank)
    config = Config()
    config.out = str(tmp_path / f"rank{rank}")
    config.train.progress = False
    task = _DrawTask()
    loader = [{"image": torch.ones(2, 4)} for _ in range(3)]
    Trainer(task, config, loader, None, torch.device("cpu"), monitor="train_loss").train_epoch(1)
    return task.draws


def test_random_draws_differ_across_ranks_and_repeat_per_rank(monkeypatch, tmp_path):
    rank0, rank1 = _draws(monkeypatch, tmp_path, 0), _draws(monkeypatch, tmp_path, 1)
    assert _draws(monkeypatch, tmp_path, 1) == rank1
    assert all(a != b for a, b in zip(rank0, rank1))


def test_single_process_commands_refuse_torchrun(monkeypatch, capsys):
    from patchssl.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["pretexts"]) == 2
    err = capsys.readouterr().err
    assert "(rank 1)" in err and "runs in one process" in err


def test_sync_batch_norm_on_cpu_processes_is_refused(monkeypatch, data, tmp_path):
    import patchssl.engine.common as common

    config = tiny_config(data, tmp_path)
    config.model.norm = "sync_batch"
    common.build_encoder(config, torch.device("cpu"))  # one process: plain batch norm
    monkeypatch.setattr(common, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="model.norm=group"):
        common.build_encoder(config, torch.device("cpu"))


def test_unwrap_model_removes_data_parallel_wrappers():
    from patchssl.engine.distributed import unwrap_model

    inner = torch.nn.Linear(2, 2)
    wrapped = torch.nn.DataParallel(torch.nn.DataParallel(inner))
    assert unwrap_model(wrapped) is inner
    assert unwrap_model(inner) is inner
    assert list(unwrap_model(wrapped).state_dict()) == ["weight", "bias"]
