"""vLLM general plugin (entry point ``vllm.general_plugins: vtprune``).

vLLM calls :func:`register` in every process it starts (API server, engine core,
workers). It registers each family's pruning class under its own architecture name, so
stock classes stay untouched unless a spec selects ours, and teaches vLLM's argument parser the
``--vtprune`` flag (:mod:`vllm_vtprune.vllm_flag`).
"""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from vllm_vtprune import families, vllm_flag
    from vllm_vtprune.server import stats

    # "module:Class" keeps vLLM's model code out of processes that never build the model.
    for family in families.families():
        ModelRegistry.register_model(family.architecture, family.vllm_class)
    vllm_flag.install()
    stats.ensure_path()  # before vLLM starts the engine, which inherits the path
    _registered = True
