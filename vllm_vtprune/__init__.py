"""vllm-vtprune: visual-token pruning served through vLLM."""

__version__ = "0.1.0"
