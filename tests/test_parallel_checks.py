"""Which parallel set-ups the model class refuses at startup (pure function, no engine)."""
from types import SimpleNamespace

import pytest

from vllm_vtprune import spec as spec_mod
from vllm_vtprune.models.checks import check_parallelism


def _config(tp: int, tower_lora: bool = False):
    lora = SimpleNamespace(enable_tower_connector_lora=True) if tower_lora else None
    return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           lora_config=lora)


@pytest.mark.parametrize("spec", [None, "none", "resprune:64", "dcp:16", "visionzip:0.25",
                                  "fastv:64", "polymorphic:32", "rcp:64"])
def test_every_method_runs_under_tensor_parallelism(spec):
    check_parallelism(_config(2), spec_mod.parse(spec))


def test_tower_lora_is_refused_naming_what_is_supported():
    with pytest.raises(ValueError, match="tower/connector LoRA.*LoRA on the language model"):
        check_parallelism(_config(1, tower_lora=True), spec_mod.parse("resprune:64"))
