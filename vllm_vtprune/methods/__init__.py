"""Visual-token pruning algorithms as pure PyTorch (no vLLM, no transformers imports).

The vLLM model classes, the transformers reference path, the Triton kernels and the
benchmarks all call these modules, so every path prunes identically:

* :mod:`.divprune`, :mod:`.fastv`, :mod:`.visionzip` -- baselines (PRIOR_ART.md);
* :mod:`.dcp` -- DCP-Prune (ACGR + TATCS); :mod:`.polymorphic` -- Polymorphic;
* :mod:`.rcp` -- RCP's trainable pruner and repair adapter;
* :mod:`.resprune` -- ResPrune (with its Triton kernel);
* :mod:`._common` -- shared input validation (``check_tokens``).

Submodules are imported lazily by callers (``from vllm_vtprune.methods import dcp``).
"""
