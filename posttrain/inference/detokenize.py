"""Text of a completion as its tokens arrive: incremental decoding, stop strings, and what may be streamed.

Decoding the whole completion again at every token costs O(length) per token and, worse, can change
earlier characters (a multi-byte character split over two tokens decodes to U+FFFD until its second half
arrives). As in vLLM's incremental detokenizer, only a short window of recent tokens is decoded each step
and text is released only once it no longer ends in a partial character. Text that could still turn out
to be the start of a stop string is held back from a stream until it cannot.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
CONTEXT_TOKENS = 6  # tokens decoded before the new ones, so that a token's leading space comes out right


class CompletionText:
    """The text of one completion, grown one token at a time; ``stopped_at`` is set once a stop string
    appears (the text is then cut before it)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stop for stop in stops if stop)
        self.text = ""
        self.tokens: list[int] = []
        self._prefix = 0  # tokens[_prefix:_read] were decoded already and are in self.text
        self._read = 0
        self.stopped_at: int | None = None
        self.streamed = 0  # characters of text handed to a stream so far

    def push(self, token: int) -> None:
        """Add one generated token; checks the stop strings against the text it completes."""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return  # nothing new yet, or a character still incomplete: wait for the next token
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += after[len(before):]
        self._read = len(self.tokens)
        self._prefix = max(0, self._read - CONTEXT_TOKENS)
        if self.stops and self.stopped_at is None:
            hits = [index for stop in self.stops if (index := self.text.find(stop, searched_from)) >= 0]
            if hits:
                self.stopped_at = min(hits)

    def final(self) -> str:
        """The completion's text: all of it (also a partial character at the very end), cut at a stop string."""
        if self.stopped_at is not None:
            return self.text[:self.stopped_at]
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def stream_delta(self, finished: bool) -> str:
        """Text not streamed yet that is safe to send: while generating, anything that might still be the
        beginning of a stop string is kept back; once ``finished``, the rest of :meth:`final`."""
        if finished:
            text = self.final()
        else:
            text = self.text if self.stopped_at is None else self.text[:self.stopped_at]
            text = text[:len(text) - self._held_back(text)]
        delta = text[self.streamed:]
        self.streamed = max(self.streamed, len(text))
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
