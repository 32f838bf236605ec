"""Visual-token pruning algorithms as pure PyTorch (no vLLM, no transformers imports).

The vLLM model classes, the transformers reference path, the Triton kernels and the
benchmarks all call these modules, so every path prunes identically:

* :mod:`.divprune`, :mod:`.fastv`, :mod:`.visionzip` -- baselines;
* :mod:`.dcp` -- DCP-Prune (ACGR + TATCS); :mod:`.polymorphic` -- Polymorphic;
* :mod:`.rcp` -- RCP's trainable pruner and repair adapter;
* :mod:`.resprune` -- ResPrune (with its Triton kernel);
* :mod:`._common` -- shared input validation (``check_tokens``).

A module that defines ``METHOD = registry.Method(...)`` is a method: the registry finds
it, and the flag, per-request specs, the benches and the tests pick it up.
Submodules are imported lazily by callers (``from vllm_vtprune.methods import dcp``).
"""
