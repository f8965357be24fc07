"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's shapes in, the same
spool work as OpenAI's chat completions, Anthropic's shapes out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from http_api.anthropic.replies import MessageReply
from http_api.anthropic.schemas import CountTokensRequest, MessageResponse, MessagesRequest, TokenCount
from http_api.errors import ERROR_RESPONSES
from http_api.served_model import ServedModel
from http_api.submit import Work, answer, tool_prompt

router = APIRouter()


@router.post("/v1/messages", response_model=MessageResponse,
             responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
async def messages(body: MessagesRequest, request: Request) -> Any:
    served: ServedModel = request.app.state.model
    served.check_name(body.model)
    prompt = tool_prompt(served.tokenizer, body.chat(), body.tool_spec())
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k}
    sampling = served.defaults.model_copy(update={k: v for k, v in given.items() if v is not None})
    work = Work("chat", prompt.tokens, body.max_tokens, sampling, (body.stop_sequences or []) + prompt.stop,
                body.stream, "messages", prompt.grammar)
    return await answer(request, work, lambda request_id, created: MessageReply(
        request_id, body.model, len(prompt.tokens), prompt.tool_text))


@router.post("/v1/messages/count_tokens", response_model=TokenCount, responses=ERROR_RESPONSES)
async def count_tokens(body: CountTokensRequest, request: Request) -> TokenCount:
    served: ServedModel = request.app.state.model
    served.check_name(body.model)
    return TokenCount(input_tokens=len(tool_prompt(served.tokenizer, body.chat(), body.tool_spec()).tokens))
