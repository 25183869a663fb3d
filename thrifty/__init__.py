"""thrifty: a cost-aware LLM inference engine."""

from thrifty.entrypoints.llm import LLM
from thrifty.outputs import CompletionOutput, RequestOutput
from thrifty.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
