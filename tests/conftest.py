"""Shared fixtures: the real default model (thrifty and transformers on the same weights)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from thrifty.bench.processes import free_port, start_thrifty

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prompts of varied shape: prose, code, a list, a chat-like question, a long one.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4,",
    "Question: What is the boiling point of water in Celsius?\nAnswer:",
    "import numpy as np\n\n# Compute the mean of a list of numbers\ndef mean(xs):",
    "The three primary colors are",
    " ".join(["The history of computing spans many decades and many inventions."] * 6),
]
MAX_NEW = 64


@pytest.fixture(scope="session")
def llm():
    from thrifty import LLM

    return LLM(dtype="float32", seed=0)


# The engine's two paths: "auto" is the native CPU kernels where they are built (the pure-torch
# path where not), "torch" the pure-torch reference path. Correctness tests run both.
BACKENDS = ["auto", "torch"]


@pytest.fixture(scope="session")
def llm_torch():
    from thrifty import LLM

    return LLM(dtype="float32", seed=0, backend="torch")


@pytest.fixture(scope="session", params=BACKENDS)
def any_llm(request, llm, llm_torch):
    """The session's fp32 engine on each backend in turn."""
    return llm if request.param == "auto" else llm_torch


@pytest.fixture(scope="session")
def hf_model():
    from transformers import AutoModelForCausalLM

    from thrifty.model.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_greedy(llm, hf_model):
    """transformers' greedy continuation of every prompt, one at a time (no padding)."""
    tok = llm.get_tokenizer()
    eos = sorted(llm.llm_engine.eos_token_ids)
    refs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                    do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
            refs.append(out[0, ids.shape[1]:].tolist())
    return refs



class Server:
    """A real `thrifty serve` process on a free localhost port (float32, quiet logs)."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_thrifty(["serve", "--port", str(self.port), "--dtype", "float32",
                                   "--disable-uvicorn-access-log", "--log-level", "warning", *args], self.url, 120)

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
