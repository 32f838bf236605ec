"""vLLM general plugin (entry point ``vllm.general_plugins: vtprune``).

vLLM calls :func:`register` in every process it starts (API server, engine core,
workers). It registers the pruning LLaVA class under its own architecture name, so stock
LLaVA stays untouched unless a spec selects ours, and teaches vLLM's argument parser the
``--vtprune`` flag (:mod:`vllm_vtprune.vllm_flag`).
"""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from vllm_vtprune import LLAVA_ARCHITECTURE, vllm_flag

    # "module:Class" keeps vLLM's model code out of processes that never build the model.
    ModelRegistry.register_model(
        LLAVA_ARCHITECTURE, "vllm_vtprune.models.llava:VTPruneLlavaForConditionalGeneration")
    vllm_flag.install()
    _registered = True
