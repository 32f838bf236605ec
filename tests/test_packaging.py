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
