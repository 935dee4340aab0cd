"""The serving layer: OpenAI requests in, engine jobs out, OpenAI responses back.

This module validates what depends on the served model (model name, prompt
length against the context window, the server's token cap), builds
:class:`GenerationJob` objects, and turns their results into response bodies
or one SSE stream. Routes stay thin: they only choose JSON or SSE.

Token budget rule: a request asking for more than ``--max-tokens-cap`` tokens,
or more than fit in the context window after its prompt, is refused with a
400 naming ``max_tokens`` (never silently clamped); a request that names no
limit gets whatever fits, up to the cap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

import jinja2
import torch

from .config import Settings
from .engine.engine import Engine
from .engine.generation import (
    ChoiceDelta,
    GenerationJob,
    GenerationResult,
    TokenLogprob,
)
from .errors import APIError
from .protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
    completion_id,
    dump,
    now,
)

logger = logging.getLogger(__name__)


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@dataclass(frozen=True)
class CompletionPrompt:
    """One prompt of a /v1/completions request: its job, and its text when echo is on."""

    job: GenerationJob
    echo: str | None


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


class Serving:
    """Chat completions, completions and model listing over one engine."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.created = now()
        self._model_names = {engine.model_id, settings.model, engine.loaded.source}

    # -- checks shared by both endpoints -----------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model and model not in self._model_names:
            raise APIError(
                f"The model `{model}` does not exist; this server serves `{self.engine.model_id}`.",
                status=HTTPStatus.NOT_FOUND,
                param="model",
                code="model_not_found",
            )

    def token_budget(self, prompt_len: int, requested: int | None, param: str, prompt_param: str) -> int:
        """How many tokens this request may generate, or a 400 naming the parameter at fault."""
        window = self.engine.context_length
        cap = self.settings.max_tokens_cap
        room = window - prompt_len
        if room < 1:
            raise APIError(
                f"This model's maximum context length is {window} tokens, and the prompt has "
                f"{prompt_len} tokens, leaving no room for a completion. Shorten the prompt.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return min(cap, room)
        if requested > cap:
            raise APIError(
                f"{param} is {requested}, above this server's cap of {cap} tokens per request "
                "(--max-tokens-cap).",
                param=param,
            )
        if requested > room:
            raise APIError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                f"completion). Reduce {param} or the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    # -- /v1/models ---------------------------------------------------------------------

    def models(self) -> ModelList:
        card = ModelCard(
            id=self.engine.model_id,
            created=self.created,
            root=self.engine.loaded.source,
            max_model_len=self.engine.context_length,
        )
        return ModelList(data=[card])

    # -- /v1/chat/completions -----------------------------------------------------------

    def prepare_chat(self, request: ChatCompletionRequest) -> GenerationJob:
        """Everything that can be refused is refused here, before any model work."""
        self.check_model(request.model)
        if not self.engine.has_chat_template:
            raise APIError(
                f"{self.engine.model_id} has no chat template; use /v1/completions",
                param="messages",
            )
        try:
            prompt_ids = self.engine.render_chat(request.template_messages())
        except jinja2.TemplateError as exc:  # e.g. "roles must alternate user/assistant"
            raise APIError(
                f"the model's chat template rejected these messages: {exc}", param="messages"
            ) from exc
        requested, param = request.requested_max_tokens()
        max_tokens = self.token_budget(len(prompt_ids), requested, param, "messages")
        params = request.sampling_params(
            max_tokens=max_tokens, logprobs=request.logprobs_k(), max_n=self.settings.max_n
        )
        return GenerationJob(prompt_ids=prompt_ids, params=params)

    async def chat(self, request: ChatCompletionRequest, job: GenerationJob) -> ChatCompletionResponse:
        result = await self._generate(job)
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self._chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for c in result.choices
        ]
        return ChatCompletionResponse(
            id=completion_id("chatcmpl"),
            created=now(),
            model=self.engine.model_id,
            choices=choices,
            usage=_usage(result.prompt_tokens, result.completion_tokens),
        )

    async def chat_stream(self, request: ChatCompletionRequest, job: GenerationJob) -> AsyncIterator[str]:
        """Role chunk per choice, content deltas, finish chunks, optional usage, then [DONE]."""
        base = {
            "id": completion_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": now(),
            "model": self.engine.model_id,
        }
        include_usage = request.include_usage
        if include_usage:
            base["usage"] = None

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return sse({**base, "choices": [choice]})

        for index in range(job.params.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for item in self._stream(job):
            if isinstance(item, ChoiceDelta):
                logprobs = (
                    dump(self._chat_logprobs(list(item.logprobs)))
                    if job.params.logprobs is not None and item.logprobs
                    else None
                )
                if item.text or logprobs:
                    yield chunk(item.index, {"content": item.text}, logprobs)
                if item.finish_reason:
                    yield chunk(item.index, {}, None, item.finish_reason)
            elif isinstance(item, GenerationResult) and include_usage:
                usage = _usage(item.prompt_tokens, item.completion_tokens)
                yield sse({**base, "choices": [], "usage": dump(usage)})
            elif isinstance(item, APIError):
                yield sse(item.body())
        yield sse("[DONE]")

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.engine.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [
            ChatTokenLogprob(
                **entry(lp.token_id, lp.logprob),
                top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top],
            )
            for lp in logprobs
        ]
        return ChatLogprobs(content=content)

    # -- /v1/completions ----------------------------------------------------------------

    def prepare_completion(self, request: CompletionRequest) -> list[CompletionPrompt]:
        self.check_model(request.model)
        request.check_supported()
        prepared: list[CompletionPrompt] = []
        prompts = request.prompts()
        single = isinstance(request.prompt, str) or isinstance(request.prompt[0], int)
        for i, prompt in enumerate(prompts):
            prompt_ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
            param = "prompt" if single else f"prompt[{i}]"
            if not prompt_ids:
                raise APIError("prompt must not be empty", param=param)
            if any(t < 0 or t >= self.engine.vocab_size for t in prompt_ids):
                raise APIError(f"token ids must lie in [0, {self.engine.vocab_size})", param=param)
            max_tokens = self.token_budget(len(prompt_ids), request.max_tokens, "max_tokens", param)
            params = request.sampling_params(
                max_tokens=max_tokens, logprobs=request.logprobs, max_n=self.settings.max_n
            )
            job = GenerationJob(prompt_ids=prompt_ids, params=params, first_index=i * request.n)
            echo = None
            if request.echo:
                echo = prompt if isinstance(prompt, str) else self.engine.prompt_tokenizer.decode(prompt_ids)
            prepared.append(CompletionPrompt(job, echo))
        return prepared

    async def _echo_logprobs(self, prompt: CompletionPrompt) -> list[TokenLogprob]:
        """The prompt's own logprobs, when echo and logprobs are both asked for."""
        k = prompt.job.params.logprobs
        if prompt.echo is None or k is None:
            return []
        try:
            return await self.engine.score_prompt(prompt.job.prompt_ids, k)
        except torch.OutOfMemoryError as exc:
            raise _out_of_memory() from exc

    async def completion(
        self, request: CompletionRequest, prompts: list[CompletionPrompt]
    ) -> CompletionResponse:
        choices: list[CompletionChoice] = []
        prompt_tokens = completion_tokens = 0
        for prompt in prompts:
            echoed = await self._echo_logprobs(prompt)
            result = await self._generate(prompt.job)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            for c in result.choices:
                logprobs = None
                if c.logprobs is not None:
                    logprobs = self._completion_logprobs(echoed + c.logprobs)
                choices.append(
                    CompletionChoice(
                        index=c.index,
                        text=(prompt.echo or "") + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                    )
                )
        return CompletionResponse(
            id=completion_id("cmpl"),
            created=now(),
            model=self.engine.model_id,
            choices=choices,
            usage=_usage(prompt_tokens, completion_tokens),
        )

    async def completion_stream(
        self, request: CompletionRequest, prompts: list[CompletionPrompt]
    ) -> AsyncIterator[str]:
        base = {
            "id": completion_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": self.engine.model_id,
        }
        include_usage = request.include_usage
        if include_usage:
            base["usage"] = None

        def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            return sse({**base, "choices": [choice]})

        offsets: dict[int, int] = {}  # next logprobs.text_offset per choice
        prompt_tokens = completion_tokens = 0
        for prompt in prompts:
            job = prompt.job
            if prompt.echo is not None:
                try:
                    echoed = await self._echo_logprobs(prompt)
                except APIError as error:
                    yield sse(error.body())
                    break
                echo_logprobs = self._completion_logprobs(echoed) if echoed else None
                for index in range(job.first_index, job.first_index + job.params.n):
                    offsets[index] = _end_offset(echo_logprobs, 0)
                    yield chunk(index, prompt.echo, dump(echo_logprobs) if echoed else None, None)
            failed = False
            async for item in self._stream(job):
                if isinstance(item, ChoiceDelta):
                    logprobs = None
                    if job.params.logprobs is not None and item.logprobs:
                        start = offsets.get(item.index, 0)
                        logprobs = self._completion_logprobs(list(item.logprobs), start=start)
                        offsets[item.index] = _end_offset(logprobs, start)
                    if item.text or logprobs or item.finish_reason:
                        yield chunk(item.index, item.text, logprobs and dump(logprobs), item.finish_reason)
                elif isinstance(item, GenerationResult):
                    prompt_tokens += item.prompt_tokens
                    completion_tokens += item.completion_tokens
                elif isinstance(item, APIError):
                    yield sse(item.body())
                    failed = True
            if failed:
                break
        else:
            if include_usage:
                yield sse({**base, "choices": [], "usage": dump(_usage(prompt_tokens, completion_tokens))})
        yield sse("[DONE]")

    def _completion_logprobs(self, logprobs: list[TokenLogprob], start: int = 0) -> CompletionLogprobs:
        tokens, offsets = [], []
        position = start
        for lp in logprobs:
            text = self.engine.token_text(lp.token_id)
            tokens.append(text)
            offsets.append(position)
            position += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[None if lp.logprob is None else self._top_by_text(lp.top) for lp in logprobs],
            text_offset=offsets,
        )

    def _top_by_text(self, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
        """OpenAI keys completions' alternatives by text; where two tokens decode alike, the likelier wins."""
        alternatives: dict[str, float] = {}
        for token_id, logprob in top:  # best first
            alternatives.setdefault(self.engine.token_text(token_id), logprob)
        return alternatives

    # -- engine calls with errors in OpenAI shape ----------------------------------------

    async def _generate(self, job: GenerationJob) -> GenerationResult:
        try:
            return await self.engine.generate(job)
        except torch.OutOfMemoryError as exc:
            raise _out_of_memory() from exc

    async def _stream(self, job: GenerationJob) -> AsyncIterator[ChoiceDelta | GenerationResult | APIError]:
        """The engine's stream, with a failure turned into one final APIError item."""
        try:
            async for item in self.engine.stream(job):
                yield item
        except torch.OutOfMemoryError:
            yield _out_of_memory()
        except Exception:
            logger.exception("generation failed during a stream")
            yield APIError("internal error during generation", status=HTTPStatus.INTERNAL_SERVER_ERROR)


def _end_offset(logprobs: CompletionLogprobs | None, start: int) -> int:
    """text_offset counts the texts of the tokens before; where the next token's offset lies."""
    if logprobs is None or not logprobs.tokens:
        return start
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


def _out_of_memory() -> APIError:
    return APIError(
        "the accelerator ran out of memory for this request; reduce max_tokens, n or the prompt",
        status=HTTPStatus.SERVICE_UNAVAILABLE,
        code="out_of_memory",
    )
