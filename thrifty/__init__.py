"""thrifty: a cost-aware LLM inference engine."""

import os

# OpenMP threads that spin while waiting collapse (10-30x slower ops) as soon as another process
# or thread wants a core, e.g. a server's event loop; passive waiting cost nothing measurable
# here. Only effective if set before torch is first imported; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from thrifty.entrypoints.llm import LLM  # noqa: E402
from thrifty.outputs import CompletionOutput, RequestOutput  # noqa: E402
from thrifty.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
