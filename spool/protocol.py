"""The contract between the HTTP front and rank 0: what a spool request holds, and the
events rank 0 writes back for it, one JSON object a line in its stream file.

Both sides write and read these only through the models here, so a field added on one
side is known to the other, and a stream file that does not parse is an error, not a
silently different dict.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class SamplingParams(BaseModel):
    """What decides the next token; temperature 0 is greedy. The defaults are OpenAI's,
    and the only ones: the API leaves unset what the client did not send."""

    model_config = ConfigDict(frozen=True)

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None

    @classmethod
    def pick(cls, *sources: dict) -> "SamplingParams":
        """The sampling fields of `sources` (a model's generation_config.json, settings,
        parsed arguments), later ones over earlier ones; missing or None keep the default."""
        given = {name: source[name] for source in sources for name in cls.model_fields
                 if source.get(name) is not None}
        return cls(**given)


class SpoolRequest(BaseModel):
    """A checked, tokenized request, queued by the API for rank 0."""

    kind: Literal["chat", "completion"]
    model: str
    prompt_tokens: list[int]
    max_tokens: int = Field(ge=1)
    sampling: SamplingParams = SamplingParams()
    stop: list[str] = []  # matched on the text, never emitted
    grammar: Optional[str] = None  # llguidance grammar the output must follow (a JSON schema's)
    logprobs: Optional[int] = None  # log-probabilities wanted, with this many top alternatives
    created: int  # Unix time the API accepted it (the response's `created`)
    # The batch whose line this is (None: an interactive request). Rank 0 admits batch
    # lines after interactive requests, and only up to BATCH_MAX_ACTIVE of them at once.
    batch: Optional[str] = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache


class CompletionTokensDetails(BaseModel):
    accepted_prediction_tokens: int = 0  # completion tokens that were speculative proposals the model accepted


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    completion_tokens_details: CompletionTokensDetails = CompletionTokensDetails()

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
           accepted_tokens: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
                   completion_tokens_details=CompletionTokensDetails(accepted_prediction_tokens=accepted_tokens))


class Timings(BaseModel):
    """Rank 0's clock for one request (absent for one that never ran)."""

    claimed_at: Optional[float] = None  # Unix time rank 0 took it from the queue
    time_to_first_token: Optional[float] = None  # s from the claim
    total: Optional[float] = None  # s from the claim to the end


class Started(BaseModel):
    """Rank 0 admitted the request: the API may open its response."""

    type: Literal["started"] = "started"


class TokenLogprob(BaseModel):
    """A drawn token's log-probability, and the most likely tokens' (id, log-probability)
    at its position, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = []


class Delta(BaseModel):
    """New text, and the token ids it came from (none for held-back text let go at the end),
    with their log-probabilities when the request asked for them."""

    type: Literal["delta"] = "delta"
    text: str
    token_ids: list[int] = []
    logprobs: Optional[list[TokenLogprob]] = None


class Requeued(BaseModel):
    """The ring restarted while the request ran: rank 0 resumes it after the tokens its
    deltas hold, so its output goes on where it stopped."""

    type: Literal["requeued"] = "requeued"


FinishReason = Literal["stop", "length", "cancelled"]


class Final(BaseModel):
    type: Literal["final"] = "final"
    finish_reason: FinishReason
    stop_sequence: Optional[str] = None  # the request's stop string that ended it, if one did
    usage: Usage
    timings: Timings = Timings()


class Failed(BaseModel):
    """The request ended without an answer; `status` is the HTTP status it deserves."""

    type: Literal["error"] = "error"
    message: str
    code: Optional[str] = None
    status: int = 500


class ControlRequest(BaseModel):
    """An operation on the ring itself rather than a generation, queued by the API."""

    action: Literal["reset_prefix_cache"]


class ControlDone(BaseModel):
    """Rank 0 carried out a `ControlRequest`: what the prompt cache held before the reset."""

    action: Literal["reset_prefix_cache"]
    dropped_entries: int = 0
    dropped_tokens: int = 0


Event = Annotated[Union[Started, Delta, Requeued, Final, Failed], Field(discriminator="type")]
TERMINAL = (Final, Failed)

_EVENT = TypeAdapter(Event)


def encode_event(event: Event) -> bytes:
    """One stream line, without its newline."""
    return event.model_dump_json().encode()


def decode_event(line: bytes) -> Event:
    return _EVENT.validate_json(line)


class Supervision(BaseModel):
    """What the supervisor (launcher/supervisor.py) last said, kept beside rank 0's
    heartbeat: `/health`, the streams waiting on a ring that will not come back, and
    `launch.sh status` read it."""

    state: Literal["watching", "restarting", "gave_up"]
    restarts: int = 0  # of the ring, since `start`
    api_restarts: int = 0
    last_cause: Optional[str] = None  # why the ring was last restarted
    reason: Optional[str] = None  # why the supervisor gave up
    time: float = 0.0
