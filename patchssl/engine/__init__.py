"""Training, evaluation and explanation runs on top of the patchssl blocks.

The functions here are the Python face of the command line: each takes a
:class:`~patchssl.engine.config.Config` (or a dict, or a path to a YAML/JSON file) and does
what the ``patchssl`` command of the same name does.
"""

from __future__ import annotations

from patchssl.engine.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
