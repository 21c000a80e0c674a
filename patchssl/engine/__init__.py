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
:mod:`~patchssl.engine.prediction` (new images), :mod:`~patchssl.engine.preparation`,
:mod:`~patchssl.engine.probing`, :mod:`~patchssl.engine.settings` (what carries forward from a
checkpoint or a cache),
:mod:`~patchssl.engine.demo`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from patchssl._lazy import lazy_exports

# The names below are imported on first use (PEP 562), so that `import patchssl.engine` and the
# command line's --help stay free of torch; type checkers and the API docs read them here.
if TYPE_CHECKING:
    from patchssl.engine.config import Config, ConfigError, load_config, save_config
    from patchssl.engine.demo import DemoResult, demo_config, run_demo
    from patchssl.engine.evaluation import EvaluationResult, evaluate, predict
    from patchssl.engine.explain_run import ExplainResult, explain
    from patchssl.engine.finetuning import finetune
    from patchssl.engine.loop import NonFiniteLossError, Trainer, TrainingResult
    from patchssl.engine.prediction import PredictionResult, predict_images
    from patchssl.engine.preparation import PrepareResult, prepare
    from patchssl.engine.pretraining import pretrain
    from patchssl.engine.probing import ProbeRunResult, probe

_EXPORTS: dict[str, str] = {
    "Config": "patchssl.engine.config",
    "ConfigError": "patchssl.engine.config",
    "DemoResult": "patchssl.engine.demo",
    "EvaluationResult": "patchssl.engine.evaluation",
    "ExplainResult": "patchssl.engine.explain_run",
    "NonFiniteLossError": "patchssl.engine.loop",
    "PredictionResult": "patchssl.engine.prediction",
    "PrepareResult": "patchssl.engine.preparation",
    "ProbeRunResult": "patchssl.engine.probing",
    "Trainer": "patchssl.engine.loop",
    "TrainingResult": "patchssl.engine.loop",
    "demo_config": "patchssl.engine.demo",
    "evaluate": "patchssl.engine.evaluation",
    "explain": "patchssl.engine.explain_run",
    "finetune": "patchssl.engine.finetuning",
    "load_config": "patchssl.engine.config",
    "predict": "patchssl.engine.evaluation",
    "predict_images": "patchssl.engine.prediction",
    "prepare": "patchssl.engine.preparation",
    "pretrain": "patchssl.engine.pretraining",
    "probe": "patchssl.engine.probing",
    "run_demo": "patchssl.engine.demo",
    "save_config": "patchssl.engine.config",
}


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

__all__ = [
    "Config",
    "ConfigError",
    "DemoResult",
    "EvaluationResult",
    "ExplainResult",
    "NonFiniteLossError",
    "PredictionResult",
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
    "predict_images",
    "prepare",
    "pretrain",
    "probe",
    "run_demo",
    "save_config",
]
