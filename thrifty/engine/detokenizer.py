"""Incremental detokenizing with stop strings.

Each new token is decoded in the context of the tokens before it (so byte-level and
SentencePiece tokenizers see what decides spaces and merged bytes), and text is only released
once it no longer ends in an incomplete UTF-8 character. With a fast (Rust) tokenizer that is
one call per token into tokenizers' DecodeStream, primed with the prompt's last tokens; a slow
tokenizer decodes the new token with its context twice (with and without it) per token.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 6  # prompt tokens used as decoding context for the first output tokens
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._stream = _decode_stream(tokenizer, context, skip_special_tokens)
        self.tokens = context
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.output_text = ""
        # A stop string cut out of the text may begin in text already streamed, so streaming
        # holds back the last len(stop) - 1 characters until more text or the end shows it safe.
        self._hold_back = max((len(s) for s in stop), default=1) - 1 if not include_stop_str_in_output else 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if the text now contains one (the text is
        then cut at it), else None."""
        if self._stream is not None:
            delta = self._stream.step(self.tokenizer._tokenizer, token_id)
            if not delta:
                return None
            self.output_text += delta
            return self._check_stop(len(delta)) if self.stop else None
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return None  # nothing printable yet (or a partial multi-byte character)
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        self.output_text += delta
        return self._check_stop(len(delta)) if self.stop else None

    def _check_stop(self, new_chars: int) -> str | None:
        text = self.output_text
        best: tuple[int, str] | None = None
        for stop in self.stop:
            # Only a match that overlaps the new characters can be new.
            i = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best  # the earliest match wins, whatever the order of the list
        self.output_text = text[: i + len(stop)] if self.include_stop else text[:i]
        return stop

    def stable_text(self, finished: bool) -> str:
        """The text a stream may show now: no later stop-string cut can take any of it back."""
        if finished or not self._hold_back:
            return self.output_text
        return self.output_text[: max(0, len(self.output_text) - self._hold_back)]

    def decode_token(self, token_id: int) -> str:
        return self._decode([token_id])


def _decode_stream(tokenizer, context: list[int], skip_special_tokens: bool):
    """tokenizers' DecodeStream primed with `context`, for a fast tokenizer; None otherwise, and
    also when the context holds a broken UTF-8 sequence (a prompt cut inside a character): a
    stream primed so would later emit the prompt's own text."""
    if getattr(tokenizer, "_tokenizer", None) is None:
        return None
    if _REPLACEMENT in tokenizer.decode(context, skip_special_tokens=skip_special_tokens):
        return None
    from tokenizers.decoders import DecodeStream

    return DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
