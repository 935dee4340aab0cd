"""``/tokenize`` and ``/detokenize`` (vLLM's shapes), so a researcher can see the positions an
intervention or a capture will address, and ``GET /v1/models/{model}``.

``/tokenize`` renders ``messages`` exactly as ``/v1/chat/completions`` does (same template,
same chat fields, same prompt thread), so its ``tokens`` are the prompt a chat request with
the same fields will run on.
"""

from __future__ import annotations

from http import HTTPStatus

from ..errors import APIError
from ..protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    TokenizeRequest,
    TokenizeResponse,
)
from .chat import render_messages
from .parts import ServingParts


class TokenServing:
    """Tokenize and detokenize with the served model's tokenizer; no model work."""

    def __init__(self, parts: ServingParts, models) -> None:
        self.engine = parts.engine
        self.settings = parts.settings
        self.admission = parts.admission
        self.models = models  # () -> ModelList: the one card, as /v1/models shows it

    def model(self, name: str) -> ModelCard:
        """``GET /v1/models/{model}``: the served model's card, or 404 ``model_not_found``."""
        self.admission.check_model(name or "(none)")  # an empty id names no model
        return self.models().data[0]

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.admission.check_model(request.model)
        request.check()
        if request.messages is not None:
            messages = request.template_messages()
            self.admission.check_messages(messages, request.template_chars())
            ids = await render_messages(self.engine, request, messages)
        else:
            self.admission.check_prompt_chars(len(request.prompt), "prompt")
            add = True if request.add_special_tokens is None else request.add_special_tokens
            ids = await self.engine.encode(request.prompt, add_special_tokens=add)
        strings = await self.engine.token_strings(ids) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=self.engine.context_length, tokens=ids, token_strs=strings
        )

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.admission.check_model(request.model)
        vocabulary = len(self.engine.loaded.tokenizer)
        for i, token in enumerate(request.tokens):
            if token >= vocabulary:
                raise APIError(
                    f"token {token} is not in this model's vocabulary (ids 0 to {vocabulary - 1})",
                    param=f"tokens[{i}]",
                    status=HTTPStatus.BAD_REQUEST,
                )
        return DetokenizeResponse(prompt=await self.engine.decode(request.tokens))
