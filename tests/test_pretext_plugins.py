"""Third-party pretext tasks through the ``patchssl.pretexts`` entry point.

Each test writes a real ``*.dist-info`` (METADATA + entry_points.txt) into a temporary
directory on ``sys.path``, which is what ``pip install`` leaves behind, so importlib.metadata
finds the entry point exactly as it would for an installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchssl.pretext import (
    PretextPluginError,
    create_pretext,
    get_pretext_class,
    list_pretexts,
)
from patchssl.pretext import registry as registry_module
from patchssl.pretext.testing import check_pretext_contract, tiny_encoder

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_pretext"
PLUGIN_MODULE = "patchssl_flipped_tile"


def write_dist(root: Path, name: str, version: str, entry_points: dict[str, str]) -> Path:
    """Write ``<name>-<version>.dist-info`` declaring ``entry_points`` in our group."""
    dist = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"{key} = {value}" for key, value in entry_points.items()]
    (dist / "entry_points.txt").write_text("[patchssl.pretexts]\n" + "\n".join(lines) + "\n")
    return dist


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A private registry and a fresh site directory on sys.path; plugin modules unloaded."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in (PLUGIN_MODULE, "patchssl_plugin_that_raises"):
        sys.modules.pop(module, None)


@pytest.fixture
def flipped_tile(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example plugin 'installed': its dist-info and its module on sys.path."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    write_dist(isolated, "patchssl-flipped-tile", "0.1.0", {
        "flipped_tile": f"{PLUGIN_MODULE}:FlippedTilePretext"
    })  # fmt: skip
    return isolated


def test_example_pyproject_declares_the_entry_point() -> None:
    import tomllib

    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["patchssl.pretexts"] == {
        "flipped_tile": f"{PLUGIN_MODULE}:FlippedTilePretext"
    }
    assert "patchssl" in project["dependencies"]


def test_plugin_is_listed_without_being_imported(flipped_tile: Path) -> None:
    assert "flipped_tile" in list_pretexts()
    assert PLUGIN_MODULE not in sys.modules  # discovery reads metadata only


def test_plugin_trains_through_create_pretext(flipped_tile: Path, device: torch.device) -> None:
    torch.manual_seed(0)
    task = create_pretext("flipped_tile", encoder=tiny_encoder(), hidden_dim=16, concat_dim=32).to(
        device
    )
    assert type(task).__module__ == PLUGIN_MODULE and task.name == "flipped_tile"
    assert get_pretext_class("flipped_tile") is type(task)
    images = torch.randint(0, 256, (8, 3, *task.tiler.image_size), dtype=torch.uint8)
    images = images.to(device)
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):  # one fixed batch and seed: a working task overfits it
        loss = task(images, generator=torch.Generator().manual_seed(0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_plugin_passes_the_contract_test(flipped_tile: Path) -> None:
    report = check_pretext_contract("flipped_tile")
    assert report["num_classes"] == 9


def test_broken_plugin_fails_only_when_asked_for(isolated: Path) -> None:
    write_dist(isolated, "patchssl-broken-example", "2.0", {
        "broken_task": "patchssl_no_such_module_xyz:Task"
    })  # fmt: skip
    assert "broken_task" in list_pretexts()
    assert create_pretext("rotation", encoder=tiny_encoder()).name == "rotation"
    with pytest.raises(PretextPluginError) as info:
        create_pretext("broken_task", encoder=tiny_encoder())
    message = str(info.value)
    assert "distribution 'patchssl-broken-example' 2.0" in message
    assert "ModuleNotFoundError: No module named 'patchssl_no_such_module_xyz'" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert isinstance(info.value, ImportError)


def test_plugin_that_raises_on_import_or_is_not_a_task(isolated: Path) -> None:
    (isolated / "patchssl_plugin_that_raises.py").write_text("raise RuntimeError('boom')\n")
    write_dist(isolated, "patchssl-odd-plugins", "0.3", {
        "raises_task": "patchssl_plugin_that_raises:Task",
        "not_a_task": "collections:OrderedDict",
    })  # fmt: skip
    with pytest.raises(PretextPluginError, match="failed to load: RuntimeError: boom"):
        get_pretext_class("raises_task")
    with pytest.raises(PretextPluginError, match="not a PretextTask subclass"):
        get_pretext_class("not_a_task")
    # A misspelt plugin name still gets suggestions from the entry points.
    with pytest.raises(KeyError, match="Did you mean 'raises_task'"):
        get_pretext_class("raise_task")


def test_import_patchssl_survives_a_broken_plugin(isolated: Path) -> None:
    write_dist(isolated, "patchssl-broken-example", "2.0", {
        "broken_task": "patchssl_no_such_module_xyz:Task"
    })  # fmt: skip
    code = (
        "import patchssl, patchssl.pretext as p\n"
        "names = p.list_pretexts()\n"
        "assert 'broken_task' in names and 'jigsaw' in names, names\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(isolated), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
