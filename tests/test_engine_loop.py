"""The generic training loop with a toy task: best checkpoint, early stopping, NaN, skipped files."""

from __future__ import annotations

import csv
import errno
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from patchssl import checkpoint as checkpoint_io
from patchssl.checkpoint import load_checkpoint
from patchssl.engine.checkpointing import resolve_async_checkpoint, snapshot_payload
from patchssl.engine.config import Config, ConfigError, TrainConfig, load_config
from patchssl.engine.loop import NonFiniteLossError, StepOutput, Trainer, build_optimizer


class ToyTask:
    kind = "pretrain"

    def __init__(self, val_metrics: list[float] | None = None, nan_at_step: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.val_metrics = val_metrics
        self.nan_at_step = nan_at_step
        self.steps = 0

    def step(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepOutput:
        x = batch["image"].float()
        loss = self.model(x).pow(2).mean()
        self.steps += 1
        if self.nan_at_step is not None and self.steps >= self.nan_at_step:
            loss = loss * float("nan")
        return StepOutput(loss, x.shape[0], None)

    def validate(self, epoch: int) -> dict[str, float]:
        if self.val_metrics is None:
            return {}
        return {"val_auc": self.val_metrics[epoch]}

    def checkpoint_info(self) -> dict[str, Any]:
        return {"model_config": {"pretext": "toy"}, "permutations_fingerprint": None}


def _loader(failed_every: int | None = None) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(3):
        failed = (
            [(f"/data/bad{i}.png", "truncated")] if failed_every and i % failed_every == 0 else []
        )
        batches.append({"image": torch.randn(4, 4, generator=gen), "failed": failed})
    return batches


def _trainer(task: ToyTask, tmp_path, epochs: int = 5, patience: int = 0, monitor="val_auc", **kw):
    config = Config()
    config.out = str(tmp_path)
    config.train.epochs = epochs
    config.train.patience = patience
    config.train.progress = False
    config.train.tensorboard = "false"
    config.train.lr = 0.01
    config.train.async_checkpoint = kw.pop("async_checkpoint", "auto")
    loader = kw.pop("loader", _loader())
    return Trainer(
        task,
        config,
        loader,
        DistributedSampler(range(12), num_replicas=1, rank=0),
        kw.pop("device", torch.device("cpu")),
        monitor=monitor,
        **kw,
    )


def test_best_checkpoint_and_early_stopping(tmp_path):
    task = ToyTask(val_metrics=[0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    result = _trainer(task, tmp_path, epochs=6, patience=2).fit()
    # best at epoch index 1 (0.7); epochs 2 and 3 do not improve -> stop after epoch index 3
    assert result.stopped_early and result.epochs_run == 4
    assert result.best_epoch == 1 and result.best_metric == pytest.approx(0.7)
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert (best["epoch"], last["epoch"]) == (1, 3)
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["val_auc"]) for r in rows] == [0.5, 0.7, 0.6, 0.65]


def test_missing_monitor_falls_back_to_train_loss(tmp_path):
    result = _trainer(ToyTask(), tmp_path, epochs=3).fit()
    with open(tmp_path / "metrics.csv") as fh:
        losses = [float(r["train_loss"]) for r in csv.DictReader(fh)]
    # no val_auc: the best epoch is the one of the lowest training loss that metrics.csv records
    assert len(losses) == 3 and len(set(losses)) == 3
    assert result.best_epoch == losses.index(min(losses))
    assert result.best_metric == pytest.approx(min(losses))
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == result.best_epoch


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    task = ToyTask(nan_at_step=5)  # 3 steps per epoch: epoch 1 is clean, epoch 2 step 2 is NaN
    trainer = _trainer(task, tmp_path, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2 .*global step 5"):
        trainer.fit()
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert torch.isfinite(task.model.weight).all()  # nothing was stepped with the NaN loss


def test_skipped_files_are_counted_and_written(tmp_path):
    task = ToyTask()
    result = _trainer(task, tmp_path, epochs=1, loader=_loader(failed_every=2)).fit()
    assert result.skipped_files == 2
    text = (tmp_path / "skipped_files.txt").read_text()
    assert "/data/bad0.png\ttruncated" in text and "/data/bad2.png" in text
    entries = json.loads((tmp_path / "skipped_files.json").read_text())
    assert {e["path"] for e in entries} == {"/data/bad0.png", "/data/bad2.png"}


def test_empty_batches_are_skipped(tmp_path):
    loader = _loader()
    loader[1] = {"image": torch.empty(0, 4), "failed": [("/x.png", "bad")]}
    task = ToyTask()
    _trainer(task, tmp_path, epochs=1, loader=loader).fit()
    assert task.steps == 2


def _decay_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )
    model[0].bias.requires_grad_(False)  # frozen: in no group
    return model


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_build_optimizer_no_decay_on_biases_and_norms(name: str) -> None:
    model = _decay_model()
    train = TrainConfig(optimizer=name, lr=0.1, weight_decay=0.5, momentum=0.8)
    opt = build_optimizer(model, train)
    decayed, rest = opt.param_groups
    assert [id(p) for p in decayed["params"]] == [id(model[0].weight), id(model[3].weight)]
    assert [id(p) for p in rest["params"]] == [
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    ]
    assert (decayed["weight_decay"], rest["weight_decay"]) == (0.5, 0.0)
    # a step with zero gradients moves only what weight decay acts on
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = model.state_dict()
    for key in ("0.weight", "3.weight"):
        assert not torch.equal(after[key], before[key]), key
    for key in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert torch.equal(after[key], before[key]), key


def test_build_optimizer_sgd_is_nesterov_with_the_configured_momentum() -> None:
    model = _decay_model()
    reference = _decay_model()  # the same weights
    train = TrainConfig(optimizer="SGD", lr=0.05, weight_decay=0.01, momentum=0.7)
    opt = build_optimizer(model, train)
    assert isinstance(opt, torch.optim.SGD)
    ref_opt = torch.optim.SGD(
        [
            {"params": [reference[0].weight, reference[3].weight], "weight_decay": 0.01},
            {
                "params": [reference[1].weight, reference[1].bias, reference[3].bias],
                "weight_decay": 0.0,
            },
        ],
        lr=0.05,
        momentum=0.7,
        nesterov=True,
    )
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for net, optimizer in ((model, opt), (reference, ref_opt)):
        for _ in range(3):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=key)


def test_build_optimizer_refuses_other_names() -> None:
    with pytest.raises(ConfigError, match="train.optimizer must be 'adamw' or 'sgd'; got 'lamb'"):
        build_optimizer(_decay_model(), TrainConfig(optimizer="lamb"))


class SaturatedTask(ToyTask):
    """A validation AUC that saturates at once while the validation loss keeps falling."""

    def validate(self, epoch: int) -> dict[str, float]:
        return {"val_auc": 1.0, "val_loss": [0.9, 0.7, 0.8, 0.75][epoch]}


def test_ties_on_the_monitored_metric_go_to_the_lower_validation_loss(tmp_path):
    result = _trainer(SaturatedTask(), tmp_path, epochs=4).fit()
    # AUC 1.0 every epoch: epoch 1 (0-based) lowers the loss, the later ones do not
    assert result.best_epoch == 1 and result.best_metric == 1.0
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


def test_nan_checked_every_few_steps_names_the_first_bad_step(tmp_path):
    """With deferred checks (the accelerator default), the message still names the first
    non-finite step, and no checkpoint of that epoch is written."""
    task = ToyTask(nan_at_step=5)  # epoch 2, step 2 (global step 5)
    trainer = _trainer(task, tmp_path, epochs=3)
    trainer.check_every = 32  # longer than an epoch: the check at the epoch's end finds it
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2 .*global step 5"):
        trainer.fit()
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert task.steps == 6  # the epoch ran to its end before the check


def test_epoch_sums_are_kept_on_the_device_and_match(tmp_path):
    """train_loss is the image-weighted mean of the step losses, whatever check_every."""
    losses = {}
    for every in (1, 2):
        task = ToyTask()
        trainer = _trainer(task, tmp_path / str(every), epochs=1)
        trainer.check_every = every
        row = trainer.train_epoch(0)
        losses[every] = row["train_loss"]
        assert row["images_per_s"] > 0
    assert losses[1] == pytest.approx(losses[2], rel=1e-6)


def test_adamw_is_not_fused_on_the_cpu():
    opt = build_optimizer(nn.Linear(2, 2), TrainConfig(lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is None  # torch's default


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda(device):
    opt = build_optimizer(nn.Linear(2, 2).to(device), TrainConfig(lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


def test_compile_scope(tmp_path):
    from patchssl.engine.common import compile_encoder
    from patchssl.engine.config import ConfigError

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    compile_encoder(model[0], "default", model=model, scope="model")
    assert model._compiled_call_impl is not None and model[0]._compiled_call_impl is None
    other = nn.Sequential(nn.Linear(2, 2))
    compile_encoder(other[0], "default", model=other, scope="encoder")
    assert other[0]._compiled_call_impl is not None and other._compiled_call_impl is None
    with pytest.raises(ConfigError, match="compile_scope"):
        compile_encoder(other[0], None, model=other, scope="everything")


# -- checkpoints written in the background (train.async_checkpoint) ---------------------------
def _slow_saves(monkeypatch, delay: float = 0.2, then=None) -> None:
    """Make every ``save_checkpoint`` sleep first (training goes on meanwhile), then write.

    ``then(path)`` runs after each write (in the thread that wrote).
    """
    real = checkpoint_io.save_checkpoint

    def slow(path, payload):
        time.sleep(delay)
        written = real(path, payload)
        if then is not None:
            then(written)
        return written

    monkeypatch.setattr(checkpoint_io, "save_checkpoint", slow)


def _assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Equal nested payloads: same keys, types, tensors (dtype and values), ``_metadata``."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def _content(path: Path) -> dict[str, Any]:
    """A checkpoint without what differs between two runs of the same seed: timings, paths."""
    ckpt = load_checkpoint(path)
    assert ckpt["metrics"] is ckpt["trainer"]["history"][-1]  # one row, stored once
    for row in ckpt["trainer"]["history"]:
        del row["epoch_time_s"], row["images_per_s"]
    del ckpt["config"]["out"]
    del ckpt["config"]["train"]["async_checkpoint"]
    return ckpt


def test_async_checkpoints_hold_what_synchronous_ones_do(tmp_path, monkeypatch):
    _slow_saves(monkeypatch, delay=0.1)
    files = {}
    for mode in (False, True):
        task = ToyTask(val_metrics=[0.5, 0.7, 0.6, 0.65])  # best: epoch 1 of 0..3
        out = tmp_path / f"async_{mode}"
        result = _trainer(task, out, epochs=4, async_checkpoint=mode).fit()
        assert result.best_epoch == 1
        files[mode] = {name: _content(out / name) for name in ("last.pt", "best.pt")}
    assert (files[True]["last.pt"]["epoch"], files[True]["best.pt"]["epoch"]) == (3, 1)
    for name in ("last.pt", "best.pt"):
        _assert_same(files[True][name], files[False][name], name)


def _files_and_live_state(tmp_path, monkeypatch, device, mode: bool) -> dict[str, Any]:
    """What each epoch's checkpoint file holds, and what the trainer held as it was taken."""
    saved: dict[int, Any] = {}
    live: dict[int, Any] = {}

    def keep_file(path):
        ckpt = load_checkpoint(path)
        saved[ckpt["epoch"]] = {"model": ckpt["model"], "optimizer": ckpt["optimizer"]}

    def keep_live(trainer, epoch, row):  # called once the epoch's checkpoint is taken
        state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
        live[epoch] = snapshot_payload(state)

    # each write waits while the next epoch trains and changes the weights in place
    _slow_saves(monkeypatch, delay=0.2, then=keep_file)
    task = ToyTask()
    task.model.to(device)
    out = tmp_path / f"async_{mode}"
    _trainer(task, out, epochs=3, async_checkpoint=mode, device=device, callbacks=[keep_live]).fit()
    return {"saved": saved, "live": live}


def test_an_async_checkpoint_holds_the_state_at_the_end_of_its_epoch(tmp_path, monkeypatch, device):
    modes = (False, True)
    runs = {mode: _files_and_live_state(tmp_path, monkeypatch, device, mode) for mode in modes}
    for mode, run in runs.items():
        assert sorted(run["saved"]) == sorted(run["live"]) == [0, 1, 2], mode
        for epoch in range(3):
            _assert_same(run["saved"][epoch], run["live"][epoch], f"epoch {epoch}, {mode}")
    first, second = runs[True]["live"][0]["model"], runs[True]["live"][1]["model"]
    assert not torch.equal(first["weight"], second["weight"])  # training did change them
    if device.type == "cpu":  # a CPU run repeats exactly
        _assert_same(runs[True]["saved"], runs[False]["saved"], "async against sync")


def test_a_callback_waits_for_the_checkpoint_of_its_epoch(tmp_path, monkeypatch):
    _slow_saves(monkeypatch, delay=0.2)
    seen = []

    def read(trainer, epoch, row):
        trainer.wait_for_checkpoints()
        seen.append(load_checkpoint(trainer.last_path)["epoch"])

    _trainer(ToyTask(), tmp_path, epochs=3, async_checkpoint=True, callbacks=[read]).fit()
    assert seen == [0, 1, 2]


def test_a_failed_async_write_stops_fit_naming_the_file_and_keeps_the_last_good_one(
    tmp_path, monkeypatch
):
    real_save, real_torch_save = checkpoint_io.save_checkpoint, checkpoint_io.torch.save
    calls = []

    def full_disk(obj, handle):  # half a file, then the disk is full
        handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(path, payload):
        calls.append(Path(path).name)
        if len(calls) == 2:  # the second epoch's last.pt
            checkpoint_io.torch.save = full_disk
        try:
            return real_save(path, payload)
        finally:
            checkpoint_io.torch.save = real_torch_save

    monkeypatch.setattr(checkpoint_io, "save_checkpoint", save)
    trainer = _trainer(ToyTask(), tmp_path, epochs=4, async_checkpoint=True)
    with pytest.raises(OSError, match="No space left on device") as info:
        trainer.fit()
    assert str(tmp_path / "last.pt") in str(info.value)
    assert calls == ["last.pt", "last.pt"]  # the run stopped at the next epoch's end
    last = load_checkpoint(tmp_path / "last.pt")  # whole, and its checksum holds
    assert last["epoch"] == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_an_error_in_training_leaves_the_pending_checkpoint_written(tmp_path, monkeypatch):
    _slow_saves(monkeypatch, delay=0.5)
    task = ToyTask(nan_at_step=5)  # 3 steps per epoch: epoch 1 is clean, epoch 2 step 2 is NaN
    trainer = _trainer(task, tmp_path, epochs=3, async_checkpoint=True)
    with pytest.raises(NonFiniteLossError, match="The last good checkpoint is kept at"):
        trainer.fit()
    last = load_checkpoint(tmp_path / "last.pt")  # written by the time fit raised
    assert last["epoch"] == 0 and last["trainer"]["best_epoch"] == 0
    _assert_same(load_checkpoint(tmp_path / "best.pt")["model"], last["model"])
    assert not list(tmp_path.glob("*.tmp"))


def test_an_interrupt_leaves_the_pending_checkpoint_written(tmp_path, monkeypatch):
    _slow_saves(monkeypatch, delay=0.5)

    def interrupt(trainer, epoch, row):  # Ctrl-C right after the first checkpoint is taken
        raise KeyboardInterrupt

    trainer = _trainer(ToyTask(), tmp_path, epochs=3, async_checkpoint=True, callbacks=[interrupt])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 0


def test_a_failed_async_write_does_not_replace_the_error_that_ends_the_run(
    tmp_path, monkeypatch, capsys
):
    def fail(path, payload):
        time.sleep(0.2)  # still writing when the NaN is met
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint_io, "save_checkpoint", fail)
    trainer = _trainer(ToyTask(nan_at_step=5), tmp_path, epochs=3, async_checkpoint=True)
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 2"):
        trainer.fit()
    err = capsys.readouterr().err
    assert "could not be written" in err and str(tmp_path / "last.pt") in err


def test_async_checkpoint_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_async_checkpoint("auto", cuda) and not resolve_async_checkpoint("auto", cpu)
    assert resolve_async_checkpoint(True, cpu) and resolve_async_checkpoint("TRUE", cpu)
    assert not resolve_async_checkpoint(False, cuda) and not resolve_async_checkpoint("false", cuda)
    assert load_config(overrides=["train.async_checkpoint=true"]).train.async_checkpoint is True
    assert Config().train.async_checkpoint == "auto"
    config = load_config(overrides=["train.async_checkpoint=sometimes"])
    with pytest.raises(ConfigError, match="train.async_checkpoint must be auto, true or false"):
        resolve_async_checkpoint(config.train.async_checkpoint, cpu)


def test_a_bad_async_checkpoint_setting_is_refused_before_training(tmp_path):
    task = ToyTask()
    with pytest.raises(ConfigError, match="got 'sometimes'"):
        _trainer(task, tmp_path, async_checkpoint="sometimes")
    assert task.steps == 0 and not list(tmp_path.iterdir())


def test_a_snapshot_does_not_follow_the_live_tensors():
    model = nn.BatchNorm1d(3)
    payload = {"model": model.state_dict(), "rows": [{"loss": 1.0}], "pair": (1, torch.ones(2))}
    snapshot = snapshot_payload(payload)
    with torch.no_grad():
        model.weight.add_(1.0)  # in place, as an optimizer step
    payload["rows"].append({"loss": 0.5})
    payload["pair"][1].zero_()
    assert torch.equal(snapshot["model"]["weight"], torch.ones(3))
    assert snapshot["model"]._metadata == payload["model"]._metadata  # load_state_dict reads it
    assert snapshot["rows"] == [{"loss": 1.0}] and torch.equal(snapshot["pair"][1], torch.ones(2))
    shared = torch.zeros(2)
    again = snapshot_payload({"a": shared, "b": [shared], "row": payload["rows"][0]})
    assert again["a"] is again["b"][0] and again["a"] is not shared  # shared once, as saved


@pytest.mark.parametrize(("val_images", "expected"), [(3, 1), (9, 3), (40, 4)])
def test_validation_loader_has_a_worker_per_batch_up_to_the_training_loaders(val_images, expected):
    from patchssl.engine.data import training_loaders

    config = Config()
    config.train.batch_size = 4
    config.data.workers = 4
    loader, _, val_loader = training_loaders(
        config, list(range(16)), list(range(val_images)), torch.device("cpu")
    )
    assert loader.num_workers == 4 and val_loader.num_workers == expected
    assert val_loader.persistent_workers
