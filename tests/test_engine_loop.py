"""The generic training loop with a toy task: best checkpoint, early stopping, NaN, skipped files."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from patchssl.checkpoint import load_checkpoint
from patchssl.engine.config import Config, ConfigError, TrainConfig
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
    loader = kw.pop("loader", _loader())
    return Trainer(
        task,
        config,
        loader,
        DistributedSampler(range(12), num_replicas=1, rank=0),
        torch.device("cpu"),
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
    opt = build_optimizer(nn.Linear(2, 2), TrainConfig())
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is None  # torch's default


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda(device):
    opt = build_optimizer(nn.Linear(2, 2).to(device), TrainConfig())
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
