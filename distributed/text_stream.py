"""Token ids to text deltas, with stop strings matched on the text and never emitted.

A stop string is the one end of a sequence decided on text rather than on tokens, so
it is decided here, where the text is made, and the scheduler is told (`on_stop`).
"""

from __future__ import annotations

from typing import Callable, Optional


class StopText:
    """Holds back text that could be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.reached: Optional[str] = None  # the stop string found, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached (the one
        that starts first; of two starting together, the first given)."""
        buf = self.pending + text
        hits = {s: buf.find(s) for s in self.stops if s in buf}
        if hits:
            self.reached = min(hits, key=hits.get)
            self.pending = ""
            return buf[: hits[self.reached]], True
        keep = max((self._overlap(buf, s) for s in self.stops), default=0)
        self.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    @staticmethod
    def _overlap(buf: str, stop: str) -> int:
        """Length of the longest end of `buf` that begins `stop`."""
        for n in range(min(len(buf), len(stop) - 1), 0, -1):
            if stop.startswith(buf[-n:]):
                return n
        return 0


class TextStream:
    """Feeds a sequence's tokens through mlx-lm's streaming detokenizer and the stop
    strings; `on_stop` finishes the sequence when one is reached."""

    def __init__(self, tokenizer, stops: list[str], on_stop: Callable[[], None]):
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.stop = StopText(stops)
        self.on_stop = on_stop

    def add(self, token: int) -> tuple[str, bool]:
        """The text this token completes, and whether a stop string was reached,
        which finishes the sequence."""
        self.detokenizer.add_token(token)
        text, hit = self.stop.feed(self.detokenizer.last_segment)
        if hit:
            self.on_stop()
        return text, hit

    def finish(self) -> str:
        """Whatever text is still held: the detokenizer's tail and partial stop matches."""
        self.detokenizer.finalize()
        text, _ = self.stop.feed(self.detokenizer.last_segment)
        return text + self.stop.flush()
