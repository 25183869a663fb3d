"""N-gram (prompt lookup) proposals: the tokens that followed the last time the request's latest
n tokens appeared in its prompt or output, for the longest n in [min_n, max_n] that did.

Each request keeps an index from every n-gram of its tokens to where the most recent occurrence
with a continuation ended, extended as tokens arrive, so a proposal costs a few dict lookups
instead of a scan of the whole context (vLLM scans with KMP on every step).
"""

from __future__ import annotations

from thrifty.core.request import Request


class _Index:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence

    def extend(self, tokens: list[int]) -> None:
        """Appends tokens; each n-gram that now has a token after it is (re)indexed."""
        seq = self.tokens
        for t in tokens:
            end = len(seq)  # the n-grams ending just before `end` gain the continuation seq[end]
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.follows[tuple(seq[end - n:end])] = end
            seq.append(t)

    def propose(self, k: int) -> list[int]:
        seq = self.tokens
        for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
            start = self.follows.get(tuple(seq[-n:]))
            if start is not None:
                return seq[start:start + k]
        return []


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, _Index] = {}

    def propose(self, request: Request, k: int) -> list[int]:
        """Up to k tokens to try after the request's prompt and output so far."""
        if k <= 0:
            return []
        index = self._indexes.get(request.request_id)
        if index is None:
            index = self._indexes[request.request_id] = _Index(self.min_n, self.max_n)
            index.extend(request.prompt_token_ids)
        index.extend(request.output_token_ids[len(index.tokens) - request.num_prompt_tokens:])
        return index.propose(k)

    def forget(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
