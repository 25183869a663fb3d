"""Synthetic workloads for offline benchmarks.

- random: every prompt has exactly `input_len` random tokens and asks for exactly `output_len`.
- mixed: lengths spread like real traffic. Input lengths are uniform in
  [input_len / 4, 2 * input_len]; output lengths are log-normal (sigma 1) with mean
  `output_len`, clipped to [1, 8 * output_len]: most answers are short, a few are very long,
  which is what makes a static batch wait for its slowest member.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def _random_tokens(rng: random.Random, n: int, vocab_size: int, special: set[int]) -> list[int]:
    out = []
    while len(out) < n:
        t = rng.randrange(vocab_size)
        if t not in special:
            out.append(t)
    return out


def make_dataset(name: str, num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                 special_ids: set[int], max_model_len: int, seed: int = 0) -> list[BenchRequest]:
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, input_len and output_len must be >= 1")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        if name == "random":
            n_in, n_out = input_len, output_len
        elif name == "mixed":
            n_in = rng.randint(max(1, input_len // 4), 2 * input_len)
            n_out = round(output_len * rng.lognormvariate(0.0, 1.0) / math.exp(0.5))
            n_out = min(max(1, n_out), 8 * output_len)
        else:
            raise ValueError(f"dataset must be 'random' or 'mixed', got {name!r}")
        n_out = max(1, min(n_out, max_model_len - n_in))
        if n_in >= max_model_len:
            raise ValueError(f"input_len {n_in} does not fit max_model_len {max_model_len}")
        requests.append(BenchRequest(_random_tokens(rng, n_in, vocab_size, special_ids), n_out))
    return requests
