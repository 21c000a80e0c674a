"""Shared test options: ``pytest --device cuda`` runs the same suite on a GPU."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        action="store",
        default="cpu",
        help="torch device the tests run on (cpu, cuda, cuda:1, ...)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device = config.getoption("--device")
    if device.startswith("cuda") and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run with --device cuda on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device chosen with ``--device`` (default ``cpu``)."""
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda asked for, but CUDA is not available")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    # Keep tests predictable on small CI machines.
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
