"""Pretraining runs on tiny synthetic data: determinism, resume, mismatches, NaN, corrupt files."""

from __future__ import annotations

import shutil

import pytest
import torch

from patchssl.checkpoint import load_checkpoint
from patchssl.engine import ConfigError, NonFiniteLossError, pretrain
from patchssl.engine.pretraining import PretrainTask
from patchssl.engine.testing import make_tiny_dataset, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), num_unlabeled=16, num_patients=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted seeded 2-epoch run."""
    out = tmp_path_factory.mktemp("reference")
    return pretrain(tiny_config(data, out))


def _weights(path):
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pretrain_writes_run_files(reference):
    out = reference.out_dir
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["kind"] == "pretrain" and ckpt["epoch"] == 1
    assert ckpt["model_config"]["pretext"] == "jigsaw"
    assert ckpt["permutations_fingerprint"]
    for key in ("optimizer", "scheduler", "scaler", "rng", "config", "library_version"):
        assert key in ckpt, key
    assert {"torch", "python", "generators"} <= set(ckpt["rng"])
    assert [row["epoch"] for row in reference.history] == [1, 2]
    assert all(row["train_loss"] > 0 for row in reference.history)


def test_pretraining_records_and_trains_at_its_default_learning_rate(reference):
    import yaml

    saved = yaml.safe_load((reference.out_dir / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-3  # train.lr left at None: pretraining's default
    ckpt = load_checkpoint(reference.out_dir / "last.pt")
    assert ckpt["scheduler"]["base_lrs"] == [3e-3, 3e-3]


def test_seeded_pretraining_repeats_exactly(data, reference, tmp_path):
    again = pretrain(tiny_config(data, tmp_path))
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in reference.history]
    assert [r["val_loss"] for r in again.history] == [r["val_loss"] for r in reference.history]
    _assert_same_weights(_weights(again.last_checkpoint), _weights(reference.last_checkpoint))


class InterruptedRunError(Exception):
    pass


def test_resume_gives_the_same_final_weights(data, reference, tmp_path):
    def stop_after_first_epoch(trainer, epoch, row):
        if epoch == 0:
            raise InterruptedRunError

    config = tiny_config(data, tmp_path)
    with pytest.raises(InterruptedRunError):
        pretrain(config, callbacks=[stop_after_first_epoch])
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0
    config.train.resume = True
    resumed = pretrain(config)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[-1]["train_loss"] == reference.history[-1]["train_loss"]
    _assert_same_weights(_weights(resumed.last_checkpoint), _weights(reference.last_checkpoint))
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, no duplicate of epoch 1


def test_a_run_resumed_without_a_rate_keeps_the_rate_it_started_with(data, tmp_path):
    # a run begun at 1e-3 (the pretraining's default before 3e-3) and resumed with train.lr
    # unset goes on at 1e-3: the checkpoint's optimizer and schedule hold the rate
    def stop_after_first_epoch(trainer, epoch, row):
        if epoch == 0:
            raise InterruptedRunError

    config = tiny_config(data, tmp_path)
    config.train.lr = 1e-3
    with pytest.raises(InterruptedRunError):
        pretrain(config, callbacks=[stop_after_first_epoch])
    config.train.lr, config.train.resume = None, True
    resumed = pretrain(config)
    ckpt = load_checkpoint(resumed.last_checkpoint)
    assert ckpt["epoch"] == 1
    assert ckpt["scheduler"]["base_lrs"] == [1e-3, 1e-3]
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-3, 1e-3]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"pretext.options": {"num_permutations": 10}}, "permutation set"),
        ({"model.backbone": "test_efficientnet"}, "backbone"),
        ({"pretext.name": "rotation"}, "pretext"),
        # a run of the assignment head (the jigsaw's default before the relation head)
        (
            {"pretext.options": {"num_permutations": 8, "head": "assignment"}},
            r"(?s)pretext_kwargs\.head: checkpoint has 'relation', this run has 'assignment'.*"
            r"set the checkpoint's values in pretext\.options",
        ),
    ],
)
def test_resume_with_another_model_is_refused(data, reference, tmp_path, override, message):
    out = tmp_path / "run"
    shutil.copytree(reference.out_dir, out)
    config = tiny_config(data, out)
    for key, value in override.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    config.train.resume = True
    with pytest.raises(ConfigError, match=message):
        pretrain(config)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    original = PretrainTask.step
    calls = {"n": 0}

    def poisoned(self, batch, generator):
        out = original(self, batch, generator)
        calls["n"] += 1
        if calls["n"] > 2:  # 2 steps per epoch: the first step of epoch 2 is NaN
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(PretrainTask, "step", poisoned)
    config = tiny_config(data, tmp_path, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1") as err:
        pretrain(config)
    assert "last good checkpoint" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_huge_learning_rate_is_caught(data, tmp_path):
    config = tiny_config(data, tmp_path, epochs=2)
    config.train.lr = 1e30
    config.train.warmup_epochs = 0.0
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        pretrain(config)


def test_corrupt_images_are_skipped_and_reported(data, tmp_path):
    folder = tmp_path / "unlabeled"
    shutil.copytree(data.unlabeled_dir, folder)
    good = sorted(folder.glob("*.png"))[0].read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "garbage.png").write_bytes(b"not an image at all")
    config = tiny_config(data, tmp_path / "run", epochs=1)
    config.data.unlabeled = str(folder)
    config.data.pretrain_val_size = 0.0
    result = pretrain(config)
    assert result.skipped_files == 2 and result.epochs_run == 1
    text = (tmp_path / "run" / "skipped_files.txt").read_text()
    assert "truncated.png" in text and "garbage.png" in text


@pytest.fixture
def broken_plugin(monkeypatch, tmp_path):
    """A pretext plugin 'installed' (a dist-info on sys.path) whose module does not exist."""
    from patchssl.pretext import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    dist = tmp_path / "patchssl_broken_example-2.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: patchssl-broken-example\n")
    (dist / "entry_points.txt").write_text(
        "[patchssl.pretexts]\nbroken_task = patchssl_no_such_module_xyz:Task\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "broken_task"


def test_broken_pretext_plugin_is_a_config_error(broken_plugin):
    from patchssl.engine.config import Config
    from patchssl.engine.pretraining import build_pretext
    from patchssl.pretext import PretextPluginError

    config = Config()
    config.pretext.name = broken_plugin
    with pytest.raises(ConfigError) as err:
        build_pretext(config, torch.device("cpu"))
    text = str(err.value)
    assert "pretext.name" in text and "patchssl pretexts" in text
    assert "patchssl-broken-example" in text and "patchssl_no_such_module_xyz" in text
    assert isinstance(err.value.__cause__, PretextPluginError)


def test_unknown_pretext_name_is_a_config_error():
    from patchssl.engine.config import Config
    from patchssl.engine.pretraining import build_pretext

    config = Config()
    config.pretext.name = "jigsw"
    with pytest.raises(ConfigError, match=r"pretext\.name: unknown pretext 'jigsw'.*jigsaw") as err:
        build_pretext(config, torch.device("cpu"))
    assert "patchssl pretexts" in str(err.value)


def test_compile_option_compiles_the_encoder_in_place(data, tmp_path, monkeypatch):
    # A real compilation: TorchDynamo traces the encoder for real, with the "eager" backend
    # instead of inductor (whose code generation takes minutes on a CPU: about 3 for this
    # tiny config); the mode asked for is recorded, and the compiled run must train exactly as
    # the eager one.
    import torch._dynamo

    from patchssl.encoder import SharedPatchEncoder

    modes = []

    def compile_with_dynamo(self, **kw):
        modes.append(kw.get("mode"))
        torch.nn.Module.compile(self, backend="eager")

    eager = pretrain(tiny_config(data, tmp_path / "eager", epochs=1))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(SharedPatchEncoder, "compile", compile_with_dynamo)
    config = tiny_config(data, tmp_path / "run", epochs=1)
    config.train.compile = "reduce-overhead"
    result = pretrain(config)
    assert modes == ["reduce-overhead"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo traced it
    compiled_weights = _weights(result.last_checkpoint)
    assert not any("_orig_mod" in k for k in compiled_weights)
    eager_weights = _weights(eager.last_checkpoint)
    assert compiled_weights.keys() == eager_weights.keys()
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-4, atol=1e-5)

    config = tiny_config(data, tmp_path / "bad", epochs=1)
    config.train.compile = "fastest"
    with pytest.raises(ConfigError, match="train.compile"):
        pretrain(config)
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_next_epoch_loads_ahead_with_workers_and_changes_nothing(data, tmp_path, monkeypatch):
    """With loader workers, epoch e + 1's iterator starts before epoch e is validated; the
    run's batches, losses and weights are those of a run that starts it at the epoch's start."""
    from patchssl.engine.loop import Trainer

    used_ahead: list[int] = []
    real = Trainer._epoch_batches

    def spy(self, epoch):
        if self._ahead is not None and self._ahead[0] == epoch:
            used_ahead.append(epoch)
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "_epoch_batches", spy)
    config = tiny_config(data, tmp_path / "ahead", epochs=3)
    config.data.workers = 2
    ahead = pretrain(config)
    assert used_ahead == [1, 2]  # epochs 2 and 3 (0-based 1, 2) were started ahead
    monkeypatch.setattr(Trainer, "_start_epoch_ahead", lambda self, epoch: None)
    used_ahead.clear()
    config = tiny_config(data, tmp_path / "at_start", epochs=3)
    config.data.workers = 2
    at_start = pretrain(config)
    assert used_ahead == []
    assert [r["train_loss"] for r in ahead.history] == [r["train_loss"] for r in at_start.history]
    _assert_same_weights(_weights(ahead.last_checkpoint), _weights(at_start.last_checkpoint))
