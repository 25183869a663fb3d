"""Structured output: each constrained request's grammar, as a token bitmask per logits row.

llguidance (a Rust Earley parser over the tokenizer's vocabulary) does the grammar work. Compiled
grammars are cached by their text; each request walks a copy of its grammar's matcher, which
consumes the tokens the request outputs. A step's mask rows are int32 words, bit t of a row
allowing token t (llguidance's layout); the sampler sends disallowed tokens' logits to -inf.
Torch-free: the server compiles a request's grammar in a worker thread before queueing it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from thrifty.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# A small model in a JSON grammar that allows any whitespace can emit newlines until max_tokens:
# one space after ':' and ',' and none elsewhere (vLLM's disable_any_whitespace, on).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CACHED_GRAMMARS = 256


def grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for the constraint (raises ValueError for a malformed one)."""
    import llguidance as llg

    if params.json is not None or params.json_object:
        schema = params.json if params.json is not None else {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if params.regex is not None:
        return llg.grammar_from("regex", params.regex)
    if params.choice is not None:
        return llg.grammar_from("choice", json.dumps(params.choice))
    return llg.grammar_from("grammar", params.grammar)


@dataclass
class ConstrainedRows:
    """One request's rows in a step: the first logits row, then one per proposal it verifies."""

    req_id: str
    first_row: int
    drafts: list[int]


class StructuredOutputManager:
    """The compiled-grammar cache (shared by the server's compile thread and the engine) and the
    matcher of every constrained request the runner holds."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer = None
        self._llg_executor = None
        self._lock = threading.Lock()
        self._templates: OrderedDict[str, object] = OrderedDict()  # grammar text -> fresh matcher
        self.matchers: dict[str, object] = {}  # request id -> its matcher
        self.words = (vocab_size + 31) // 32  # int32 words per mask row
        # Seconds spent compiling (a cache hit costs none) and filling masks, for metrics.
        self.compile_seconds = 0.0
        self.mask_seconds = 0.0

    def _executor(self):
        if self._llg_executor is None:
            import llguidance as llg

            # The machine's cores: the masks are filled between forwards, which use them all.
            self._llg_executor = llg.LLExecutor(num_threads=min(os.cpu_count() or 1, 32))
        return self._llg_executor

    def _tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                              eos_token=self._eos[0] if self._eos else None)
        return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> tuple[object, float]:
        """The grammar's fresh matcher (cached by its text) and the CPU seconds compiling it took
        this thread (0 on a hit). Raises ValueError naming what is wrong with the grammar."""
        import llguidance as llg

        start = time.thread_time()
        text = grammar_text(params)
        with self._lock:
            template = self._templates.get(text)
            if template is not None:
                self._templates.move_to_end(text)
                return template, 0.0
            tokenizer = self._tokenizer()
        template = llg.LLMatcher(tokenizer, text, log_level=0)  # (never raises: an error is its state)
        if template.is_error():
            raise ValueError(f"structured_outputs: the constraint does not compile: {template.get_error()}")
        seconds = time.thread_time() - start
        with self._lock:
            self._templates[text] = template
            while len(self._templates) > MAX_CACHED_GRAMMARS:
                self._templates.popitem(last=False)
            self.compile_seconds += seconds
        return template, seconds

    # -- the runner's side ----------------------------------------------------------------------
    def start(self, req_id: str, params: StructuredOutputsParams, output_token_ids: list[int]) -> None:
        """A request the runner schedules: its matcher, unless it has one (it was preempted, and
        its matcher has consumed every token it output)."""
        if req_id in self.matchers:
            return
        matcher = self.compile(params)[0].deep_copy()
        if output_token_ids and not matcher.consume_tokens(output_token_ids):
            logger.error("structured output: request %s's tokens do not follow its grammar: %s", req_id,
                         matcher.get_error())
        self.matchers[req_id] = matcher

    def finish(self, req_id: str) -> None:
        self.matchers.pop(req_id, None)

    def bitmask(self, rows: list[ConstrainedRows], num_rows: int) -> np.ndarray:
        """[num_rows, words] masks: a constrained request's first row, and the row after each of
        its proposals while the proposals follow the grammar (a proposal it does not allow is
        rejected there, so later rows are never used and allow everything, as do the rows of
        unconstrained requests)."""
        import llguidance.numpy as lnp

        start = time.perf_counter()
        mask = np.full((num_rows, self.words), -1, dtype=np.int32)
        # One call for the batch's requests without proposals and one for those with: llguidance
        # fills the rows on its own threads, without the GIL, and walks each request's proposals
        # (rolling its matcher back after).
        plain = [(self.matchers[r.req_id], r.first_row) for r in rows if not r.drafts]
        drafted = [(self.matchers[r.req_id], r.first_row, r.drafts) for r in rows if r.drafts]
        if plain:
            lnp.fill_next_token_bitmask_par(self._executor(), plain, mask)
        if drafted:
            lnp.fill_next_token_bitmask_par_with_draft_tokens(self._executor(), drafted, mask)
        self.mask_seconds += time.perf_counter() - start
        return mask

    def accept(self, req_id: str, token_ids: list[int]) -> None:
        """The tokens a constrained request output this step (its grammar allowed each)."""
        matcher = self.matchers[req_id]
        for token in token_ids:
            if matcher.is_stopped():  # the grammar has ended: the token is EOS, which ends the request
                return
            if not matcher.consume_token(token):
                logger.error("structured output: request %s output a token its grammar does not allow: %s",
                             req_id, matcher.get_error())
                return
