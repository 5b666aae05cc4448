"""Generated tokens to text, cut at the first stop sequence, released in pieces that never change.

Streaming sends text as it is generated, but the final text may end up shorter: a stop sequence is cut
off, and a token may end inside a multi-byte character. `StreamedText` therefore releases only the text
that no later token can take back, so the streamed pieces always join up to exactly the final answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_PARTIAL_CHARACTER = "\ufffd"  # what decoding shows for a character whose remaining bytes are still to come


class StreamedText:
    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.stopped = False  # a stop sequence occurred: generation should end
        self._released = 0

    def text(self) -> str:
        """The answer so far: decoded tokens, cut before the first stop sequence."""
        text = self._decode(self.tokens)
        cuts = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.stopped = True
            return text[: min(cuts)]
        return text

    def push(self, tokens: Sequence[int]) -> str:
        """Add generated tokens; return the newly settled text."""
        self.tokens.extend(int(t) for t in tokens)
        text = self.text()
        if not self.stopped:
            text = text[: len(text) - self._unsettled_tail(text)]
        return self._release(text)

    def finish(self) -> str:
        """Generation is over: return whatever text was held back."""
        return self._release(self.text())

    def _release(self, text: str) -> str:
        piece = text[self._released :]
        self._released = max(self._released, len(text))
        return piece

    def _unsettled_tail(self, text: str) -> int:
        """How many trailing characters a later token could still change: an unfinished character, or
        the start of a stop sequence."""
        tail = len(text) - len(text.rstrip(_PARTIAL_CHARACTER))
        body = text[: len(text) - tail]
        prefix = max((n for stop in self._stops for n in range(1, len(stop)) if body.endswith(stop[:n])), default=0)
        return tail + prefix
