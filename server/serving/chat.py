"""/v1/chat/completions: messages -> chat-templated prompt -> one job -> response or chunks.

Also ``/v1/models`` (the one model card). Built from parts: ``admission`` (limits),
``captures`` (capture planning, server-wide capture settings), ``interventions``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import jinja2

from ..engine.capture import CapturePlan, CaptureResult, ReasoningMarks
from ..engine.engine import Engine
from ..engine.job import ChoiceDelta, GenerationJob, TokenLogprob
from ..errors import APIError
from ..protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTemplateFields,
    ChatTokenLogprob,
    ModelCard,
    ModelList,
    TopLogprob,
    completion_id,
    dump,
    now,
)
from .base import (
    activation_fields,
    checked_grammar,
    generate,
    leading_capture,
    place_activations,
    stream,
    usage,
)
from .capture_planning import extra_step
from .parts import ServingParts
from .reasoning import END as REASONING_END
from .reasoning import START as REASONING_START
from .reasoning import ReasoningParser


async def render_messages(engine: Engine, request: ChatTemplateFields, messages: list[dict]) -> list[int]:
    """The prompt's token ids: ``messages`` (``request.template_messages()``) in the chat
    template with the request's chat fields, as chat requests and ``/tokenize`` render them.

    Raises:
        APIError: no chat template, a chat field that cannot apply, or the template refused.
    """
    if not engine.has_chat_template:
        raise APIError(f"{engine.model_id} has no chat template; use /v1/completions", param="messages")
    options = request.chat_options()
    try:
        return await engine.render_chat(messages, options)
    except (jinja2.TemplateError, TypeError) as exc:  # e.g. "roles must alternate user/assistant"
        raise APIError(
            f"the chat template rejected these messages: {exc}",
            param="chat_template_kwargs" if options.template_kwargs else "messages",
        ) from exc
    except ValueError as exc:  # transformers: e.g. the final message cannot be continued
        if options.continue_final_message:
            raise APIError(
                f"cannot continue the final message: {exc}", param="continue_final_message"
            ) from exc
        param = "chat_template_kwargs" if options.template_kwargs else "messages"
        raise APIError(f"the chat template could not render these messages: {exc}", param=param) from exc


@dataclass(frozen=True)
class PreparedChat:
    request: ChatCompletionRequest
    job: GenerationJob
    capture: CapturePlan | None
    id: str


class ChatServing:
    """The chat endpoint (and ``/v1/models``): its own checks, then the parts' checks, then one job."""

    def __init__(self, parts: ServingParts) -> None:
        self.engine = parts.engine
        self.settings = parts.settings
        self.admission = parts.admission
        self.captures = parts.captures
        self.interventions = parts.interventions
        self.created = now()
        name = parts.settings.reasoning_parser
        self.reasoning = ReasoningParser(name) if name else None
        self.reasoning_marks = self._marks() if self.reasoning else None

    def _marks(self) -> ReasoningMarks:
        """Where the capture manifest finds the reasoning: the tags' token ids, where each is one
        token of this tokenizer (else None, and nothing is marked)."""
        vocab = self.engine.loaded.tokenizer.get_vocab()
        return ReasoningMarks(
            parser=self.reasoning.name,
            start_id=vocab.get(REASONING_START),
            end_id=vocab.get(REASONING_END),
            opens_in_prompt=self.reasoning.opens_in_prompt,
        )

    def models(self) -> ModelList:
        card = ModelCard(
            id=self.engine.model_id,
            created=self.created,
            root=self.engine.loaded.source,
            max_model_len=self.engine.context_length,
        )
        return ModelList(data=[card])

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Everything that can be refused is refused here, before any model work."""
        self.admission.check_model(request.model)
        messages = request.template_messages()
        self.admission.check_messages(messages, request.template_chars())
        capture = self.captures.effective_capture(request.capture, request.ndif)
        plan = self.captures.capture_plan(capture, request.n)
        prompt_ids = await render_messages(self.engine, request, messages)
        requested, param = request.requested_max_tokens()
        max_tokens = self.admission.token_budget(
            len(prompt_ids), requested, param, "messages", reserve=extra_step(plan)
        )
        grammar = await checked_grammar(self.engine, request)
        params = request.sampling_params(
            max_tokens=max_tokens,
            logprobs=request.logprobs_k(),
            max_n=self.settings.max_n,
            vocab_size=self.engine.vocab_size,
            grammar=grammar,
        )
        self.admission.check_queue()
        memory_bytes = self.admission.check_memory(
            prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            n=params.n,
            plan=plan,
            scoring=False,
            prompt_param="messages",
            max_tokens_param=param,
        )
        edits = await self.interventions.resolve(request.interventions, request.presets)
        request_id = completion_id("chatcmpl")
        job = GenerationJob(
            prompt_ids=prompt_ids,
            params=params,
            edits=edits,
            capture=self.captures.capture_spec(plan, request, request_id, self.reasoning_marks),
            memory_bytes=memory_bytes,
        )
        return PreparedChat(request, job, plan, request_id)

    async def respond(self, prepared: PreparedChat) -> ChatCompletionResponse:
        result = await generate(self.engine, prepared.job)
        activations = self.captures.activations_ref(result.capture)
        choices = [
            ChatChoice(
                index=c.index,
                message=self._message(c.text, prepared.request.include_reasoning),
                logprobs=self._logprobs(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for c in result.choices
        ]
        return ChatCompletionResponse(
            id=prepared.id,
            created=now(),
            model=self.engine.model_id,
            choices=choices,
            usage=usage(result.prompt_tokens, result.completion_tokens),
            activations=activations,
            ndif=activations,
        )

    def _message(self, text: str, include_reasoning: bool) -> ChatResponseMessage:
        if self.reasoning is None:
            return ChatResponseMessage(content=text)
        reasoning, content = self.reasoning.split(text)
        return ChatResponseMessage(
            content=content, reasoning_content=reasoning if include_reasoning else None
        )

    def chunks(self, prepared: PreparedChat) -> AsyncIterator[dict]:
        """Role chunk per choice, deltas, one finish chunk per choice, then the usage if asked.

        Captured ``activations`` ride on the first chunk in trace mode, on the last finish
        chunk in generate mode (``place_activations``). (A trace-mode capture is kept if the
        stream fails later: its id has already reached the client.)
        """
        generate_mode = prepared.capture is not None and prepared.capture.mode == "generate"
        return place_activations(self._chunks(prepared), wait_for_capture=generate_mode)

    async def _chunks(self, prepared: PreparedChat) -> AsyncIterator[dict]:
        request, job = prepared.request, prepared.job
        trace = prepared.capture is not None and prepared.capture.mode == "trace"
        captured, items = await leading_capture(stream(self.engine, job), trace)
        base = {
            "id": prepared.id,
            "object": "chat.completion.chunk",
            "created": now(),
            "model": self.engine.model_id,
        }
        if request.include_usage:
            base["usage"] = None
        activations = self.captures.activations_ref(captured)
        if activations is not None:
            yield {**base, "choices": [], **activation_fields(activations)}

        def chunk(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None):
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**base, "choices": [choice]}

        for index in range(job.params.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        splitters = {}  # per choice, with --reasoning-parser: its ReasoningStream
        async for item in items:
            if isinstance(item, CaptureResult):
                continue
            if isinstance(item, ChoiceDelta):
                logprobs = dump(self._logprobs(list(item.logprobs))) if item.logprobs else None
                if self.reasoning is None:
                    deltas = [{"content": item.text}] if item.text or logprobs else []
                else:
                    splitter = splitters.setdefault(item.index, self.reasoning.stream())
                    reasoning, content = splitter.feed(item.text)
                    if item.finish_reason:
                        held_reasoning, held_content = splitter.finish()
                        reasoning, content = reasoning + held_reasoning, content + held_content
                    deltas = (
                        [{"reasoning_content": reasoning}] if reasoning and request.include_reasoning else []
                    )
                    deltas += [{"content": content}] if content else []
                    if logprobs and not deltas:
                        deltas = [{}]  # a token whose text is a tag (or held back): its logprobs
                for i, delta in enumerate(deltas):
                    yield chunk(item.index, delta, logprobs if i == len(deltas) - 1 else None)
                if item.finish_reason:
                    yield chunk(item.index, {}, None, item.finish_reason)
            else:  # the final GenerationResult: a generate-mode capture is known now
                if not trace:
                    captured = self.captures.activations_ref(item.capture)
                    if captured is not None:
                        yield {**base, "choices": [], **activation_fields(captured)}
                if request.include_usage:
                    totals = usage(item.prompt_tokens, item.completion_tokens)
                    yield {**base, "choices": [], "usage": dump(totals)}

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            raw = self.engine.token_bytes(token_id)
            return {"token": self.engine.token_text(token_id), "logprob": logprob, "bytes": list(raw)}

        content = [
            ChatTokenLogprob(
                **entry(lp.token_id, lp.logprob),
                top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top],
            )
            for lp in logprobs
        ]
        return ChatLogprobs(content=content)
