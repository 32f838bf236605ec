"""Which parallel set-ups the model class refuses at startup (pure function, no engine)."""
from types import SimpleNamespace

import pytest

from vllm_vtprune import spec as spec_mod
from vllm_vtprune.models.checks import check_parallelism


def _config(tp: int):
    return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           lora_config=None)


@pytest.mark.parametrize("spec", [None, "none", "resprune:64", "dcp:16", "visionzip:0.25"])
def test_encoder_side_pruning_runs_under_tensor_parallelism(spec):
    check_parallelism(_config(2), spec_mod.parse(spec))


@pytest.mark.parametrize("method", ["fastv", "polymorphic", "rcp"])
def test_pruning_inside_the_llm_is_refused_under_tensor_parallelism_naming_what_runs(method):
    spec = spec_mod.parse(f"{method}:64")
    check_parallelism(_config(1), spec)
    with pytest.raises(ValueError, match=rf"{method} prunes inside the LLM.*"
                                         r"tensor_parallel_size=2.*resprune"):
        check_parallelism(_config(2), spec)
