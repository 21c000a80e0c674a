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


def _test_threads() -> int:
    return 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def pytest_configure(config: pytest.Config) -> None:
    # Before any fixture: a module-scoped fixture (a reference training run, say) is set up
    # before the function-scoped one below, and a run that must repeat exactly has to see the
    # same thread count, hence the same floating-point reduction order, as the test repeating it.
    torch.set_num_threads(_test_threads())


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    # Keep tests predictable on small CI machines (and undo a test that changed it).
    torch.set_num_threads(_test_threads())
