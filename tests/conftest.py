"""Fixtures shared by every test directory."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def rcp_checkpoint(tmp_path_factory) -> str:
    """RCP modules for the small embedded model (what the tests serve) at their
    initialisation (identity adapters), written the way `vtprune rcp-init` writes them."""
    from vllm_vtprune import cli
    from vllm_vtprune.embedded import SMALL_MODEL, model_path

    out = str(tmp_path_factory.mktemp("rcp") / "rcp-identity.safetensors")
    assert cli.main(["rcp-init", model_path(SMALL_MODEL), "--out", out]) == 0
    return out
