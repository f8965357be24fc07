"""Log-probabilities in OpenAI's shapes: a chat choice's `logprobs.content`, and a text
completion's legacy `logprobs` (tokens, token_logprobs, top_logprobs, text_offset)."""

from __future__ import annotations

from typing import Any

from http_api.schemas import ChoiceLogprobs, CompletionLogprobs, ContentLogprob, TopLogprob
from spool.protocol import TokenLogprob


class LogprobText:
    """Token ids as the text OpenAI's logprobs name them by."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _top(self, token: int, logprob: float) -> TopLogprob:
        text = self.text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def chat(self, items: list[TokenLogprob]) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[
            ContentLogprob(**self._top(i.token, i.logprob).model_dump(),
                           top_logprobs=[self._top(token, logprob) for token, logprob in i.top])
            for i in items])

    def completion(self, items: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
        tokens = [self.text(i.token) for i in items]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=[i.logprob for i in items],
                                  top_logprobs=[{self.text(t): lp for t, lp in i.top} for i in items],
                                  text_offset=offsets)
