"""thrifty: a cost-aware LLM inference engine."""

import os

# OpenMP threads that spin while waiting collapse (10-30x slower ops) as soon as another process
# or thread wants a core, e.g. a server's event loop; passive waiting cost nothing measurable
# here. A short spin after each parallel region, though, keeps the native forward's threads awake
# across the few hundred microseconds of Python between two decode steps, instead of waking them
# (docs/native.md). Only effective if set before torch is first imported; the user's own setting
# wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `thrifty --help`, the cost tools and the load generator
    # start without importing torch.
    if name == "LLM":
        from thrifty.entrypoints.llm import LLM

        return LLM
    if name in ("CompletionOutput", "RequestOutput"):
        from thrifty import outputs

        return getattr(outputs, name)
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from thrifty import sampling_params

        return getattr(sampling_params, name)
    raise AttributeError(f"module 'thrifty' has no attribute {name!r}")
