"""Workloads for the benchmarks: token ids for `bench throughput`, text for `bench serve`.

- random: every prompt has exactly `input_len` random tokens and asks for exactly `output_len`.
- grounded: passages of Python's documentation to be copied (grounded_dataset): outputs that
  repeat the prompt, the workload of speculative decoding.
- mixed: lengths spread like real traffic. Input lengths are uniform in
  [input_len / 4, 2 * input_len]; output lengths are log-normal (sigma 1) with mean
  `output_len`, clipped to [1, 8 * output_len]: most answers are short, a few are very long,
  which is what makes a static batch wait for its slowest member.

For `bench serve` (text prompts, any server):
- random: input and output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)].
- shared-prefix: `num_prefixes` random prefixes of `prefix_len` tokens, each followed by its own
  random suffix of `input_len` tokens (prompt i uses prefix i % num_prefixes): the prefix cache's
  workload, like many users sharing a system prompt.
- mixed: the lengths above.
- a .jsonl file: one {"prompt": str, "output_len": int (optional)} per line.
Prompts are random token ids decoded to text, so the server's count may differ slightly from
the length asked; bench serve reports the server's own counts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class ServePrompt:
    prompt: str
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
            n_in, n_out = _mixed_lengths(rng, input_len, output_len)
        else:
            raise ValueError(f"dataset must be 'random' or 'mixed', got {name!r}")
        n_out = max(1, min(n_out, max_model_len - n_in))
        if n_in >= max_model_len:
            raise ValueError(f"input_len {n_in} does not fit max_model_len {max_model_len}")
        requests.append(BenchRequest(_random_tokens(rng, n_in, vocab_size, special_ids), n_out))
    return requests


GROUNDED_INSTRUCTION = "Copy the following text exactly.\n\nText:\n{passage}\n\nCopy:\n"


def grounded_dataset(tokenizer, num_prompts: int, input_len: int, output_len: int, max_model_len: int,
                     seed: int = 0) -> list[BenchRequest]:
    """Input-grounded requests (an answer that repeats its prompt, as summaries, extractions and
    edits largely do): passages of `input_len` tokens of Python's own documentation
    (pydoc_data.topics, shipped with CPython), each to be copied. Speculative decoding's workload."""
    import pydoc_data.topics

    texts = [t for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) > 8 * input_len]
    if num_prompts > len(texts):
        raise ValueError(f"grounded: at most {len(texts)} prompts of {input_len} tokens")
    rng = random.Random(seed)
    requests = []
    for text in rng.sample(texts, num_prompts):
        passage = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:input_len])
        ids = tokenizer.encode(GROUNDED_INSTRUCTION.format(passage=passage), add_special_tokens=True)
        if len(ids) >= max_model_len:
            raise ValueError(f"grounded: a prompt of {len(ids)} tokens does not fit max_model_len {max_model_len}")
        requests.append(BenchRequest(ids, max(1, min(output_len, max_model_len - len(ids)))))
    return requests


def _mixed_lengths(rng: random.Random, input_len: int, output_len: int) -> tuple[int, int]:
    n_in = rng.randint(max(1, input_len // 4), 2 * input_len)
    n_out = round(output_len * rng.lognormvariate(0.0, 1.0) / math.exp(0.5))
    return n_in, min(max(1, n_out), 8 * output_len)


def make_serve_prompts(name: str, tokenizer, num_prompts: int, input_len: int, output_len: int,
                       range_ratio: float = 0.0, num_prefixes: int = 4, prefix_len: int = 256,
                       seed: int = 0) -> list[ServePrompt]:
    """`name` is random, shared-prefix, mixed, or a path to a .jsonl file."""
    if name.endswith(".jsonl"):
        return _jsonl_prompts(name, output_len, num_prompts)
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, input_len and output_len must be >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)

    def text(n: int) -> str:
        return tokenizer.decode(_random_tokens(rng, n, vocab, special), skip_special_tokens=True)

    def spread(n: int) -> int:
        return max(1, rng.randint(math.floor(n * (1 - range_ratio)), math.ceil(n * (1 + range_ratio))))

    if name == "random":
        return [ServePrompt(text(spread(input_len)), spread(output_len)) for _ in range(num_prompts)]
    if name == "mixed":
        return [ServePrompt(text(n_in), n_out)
                for n_in, n_out in (_mixed_lengths(rng, input_len, output_len) for _ in range(num_prompts))]
    if name == "shared-prefix":
        if num_prefixes < 1 or prefix_len < 1:
            raise ValueError("num_prefixes and prefix_len must be >= 1")
        prefixes = [text(prefix_len) for _ in range(num_prefixes)]
        return [ServePrompt(prefixes[i % num_prefixes] + text(input_len), output_len) for i in range(num_prompts)]
    raise ValueError(f"dataset must be random, shared-prefix, mixed or a .jsonl file, got {name!r}")


def _jsonl_prompts(path: str, output_len: int, num_prompts: int) -> list[ServePrompt]:
    prompts = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                    raise ValueError(f"dataset: {path}:{n}: expected {{\"prompt\": non-empty string}}")
                prompts.append(ServePrompt(row["prompt"], int(row.get("output_len", output_len))))
    except OSError as e:
        raise ValueError(f"dataset: cannot read {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset: {path!r} is not JSON lines: {e}") from None
    if not prompts:
        raise ValueError(f"dataset: {path!r} has no prompts")
    # Cycle through the file to the number of prompts asked for.
    return [prompts[i % len(prompts)] for i in range(num_prompts)]
