"""The installed distribution holds every package of the tree (a wheel built from
pyproject.toml, as the Dockerfile installs it, not only the editable checkout)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_declared():
    from setuptools.config.pyprojecttoml import read_configuration

    tool = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    declared = set(tool["packages"])
    dirs = tool["package-dir"]
    found = set()
    for name, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name,) + rel))
    # sub-packages of mapped folders (vllm_vtprune.kernels, vllm_vtprune.server) belong
    # to their mapping, not to vllm_vtprune/
    assert found <= declared, f"not installed: {sorted(found - declared)}"


def test_every_embedded_model_ships_as_package_data():
    """The wheel carries each embedded model's directory (the default one included)."""
    from setuptools.config.pyprojecttoml import read_configuration

    from vllm_vtprune.embedded import MODELS

    data = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]["package-data"]
    globs = data["vllm_vtprune.embedded"]
    for name in MODELS:
        assert f"{name}/*" in globs, name
    assert "rcp/*" in globs
