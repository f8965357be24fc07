"""Token ids to text deltas, with stop strings matched on the text and never emitted."""

from __future__ import annotations


class StopText:
    """Holds back text that could be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        buf = self.pending + text
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
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
    """Feeds tokens through mlx-lm's streaming detokenizer and the stop strings."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.stop = StopText(stops)

    def add(self, token: int) -> tuple[str, bool]:
        """The text this token completes, and whether a stop string was reached."""
        self.detokenizer.add_token(token)
        return self.stop.feed(self.detokenizer.last_segment)

    def finish(self) -> str:
        """Whatever text is still held: the detokenizer's tail and partial stop matches."""
        self.detokenizer.finalize()
        text, _ = self.stop.feed(self.detokenizer.last_segment)
        return text + self.stop.flush()
