"""Training, evaluation and explanation runs on top of the patchssl blocks.

The functions here are the Python face of the command line: each takes a
:class:`~patchssl.engine.config.Config` (or a nested dict, or a path to a YAML/JSON file) and
does what the ``patchssl`` command of the same name does::

    from patchssl.engine import Config, pretrain, finetune, evaluate

    config = Config()
    config.data.unlabeled = "data/unlabeled"
    config.out = "runs/ssl"
    pretrain(config)

Modules: :mod:`~patchssl.engine.config` (configuration), :mod:`~patchssl.engine.loop` (the
training loop), :mod:`~patchssl.engine.pretraining`, :mod:`~patchssl.engine.finetuning`,
:mod:`~patchssl.engine.evaluation`, :mod:`~patchssl.engine.explain_run`,
:mod:`~patchssl.engine.preparation`, :mod:`~patchssl.engine.probing`,
:mod:`~patchssl.engine.demo`.
"""

from __future__ import annotations

from patchssl.engine.config import Config, ConfigError, load_config, save_config
from patchssl.engine.demo import DemoResult, demo_config, run_demo
from patchssl.engine.evaluation import EvaluationResult, evaluate, predict
from patchssl.engine.explain_run import ExplainResult, explain
from patchssl.engine.finetuning import finetune
from patchssl.engine.loop import NonFiniteLossError, Trainer, TrainingResult
from patchssl.engine.preparation import PrepareResult, prepare
from patchssl.engine.pretraining import pretrain
from patchssl.engine.probing import ProbeRunResult, probe

__all__ = [
    "Config",
    "ConfigError",
    "DemoResult",
    "EvaluationResult",
    "ExplainResult",
    "NonFiniteLossError",
    "PrepareResult",
    "ProbeRunResult",
    "Trainer",
    "TrainingResult",
    "demo_config",
    "evaluate",
    "explain",
    "finetune",
    "load_config",
    "predict",
    "prepare",
    "pretrain",
    "probe",
    "run_demo",
    "save_config",
]
