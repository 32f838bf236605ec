"""vllm-vtprune: visual-token pruning served through vLLM."""

__version__ = "0.1.0"

# vLLM architecture name of the pruning LLaVA-1.5 class (stock LLaVA keeps its own).
LLAVA_ARCHITECTURE = "VTPruneLlavaForConditionalGeneration"
