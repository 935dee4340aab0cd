"""/v1/chat/completions: messages -> chat-templated prompt -> one job -> response or chunks.

Also ``/v1/models`` (the one model card). Built from parts: ``admission`` (limits),
``captures`` (capture planning, server-wide capture settings), ``interventions``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import jinja2

from ..engine.capture import CapturePlan, CaptureResult, ReasoningMarks
from ..engine.constraints import GrammarError
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
    schema_grammar,
)
from .base import (
    activation_fields,
    checked_grammar,
    generate,
    leading_capture,
    place_activations,
    require_feature,
    stream,
    usage,
)
from .capture_planning import extra_step
from .parts import ServingParts
from .reasoning import END as REASONING_END
from .reasoning import START as REASONING_START
from .reasoning import ReasoningParser
from .tools import ToolCall, ToolPlan, named_schema, required_schema


async def render_messages(engine: Engine, request: ChatTemplateFields, messages: list[dict]) -> list[int]:
    """The prompt's token ids: ``messages`` (``request.template_messages()``) in the chat
    template with the request's chat fields and tools, as chat requests and ``/tokenize``
    render them. A template that would drop the tools, a tool result or a call made earlier
    is refused rather than followed.

    Raises:
        APIError: no chat template, a chat field that cannot apply, or the template refused.
    """
    if not engine.has_chat_template:
        raise APIError(f"{engine.model_id} has no chat template; use /v1/completions", param="messages")
    options = request.chat_options()
    try:
        text, ids = await engine.format_prompt(messages, None, options)
        if (
            options.tools
            and (await engine.format_prompt(messages, None, replace(options, tools=None)))[1] == ids
        ):
            raise APIError(f"{engine.model_id}'s chat template does not render tools", param="tools")
    except (jinja2.TemplateError, TypeError) as exc:  # e.g. "roles must alternate user/assistant"
        raise APIError(
            f"the chat template rejected these messages: {exc}",
            param="chat_template_kwargs" if options.template_kwargs else "messages",
        ) from exc
    except ValueError as exc:  # transformers: e.g. the final message cannot be continued
        if options.continue_final_message:
            param = "continue_final_message"
            raise APIError(f"cannot continue the final message: {exc}", param=param) from exc
        param = "chat_template_kwargs" if options.template_kwargs else "messages"
        raise APIError(f"the chat template could not render these messages: {exc}", param=param) from exc
    if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        await _check_tool_history_rendered(engine, messages, options)
    return ids


class _AnswerReader:
    """One choice's text, streamed or whole, read by one piece of code into its reasoning
    (``--reasoning-parser``), its content and its tool calls (the request's ``ToolPlan``)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolPlan | None) -> None:
        self.reasoning = reasoning.stream() if reasoning is not None else None
        self.plan = tools
        self.tools = tools.stream() if tools is not None else None
        self.calls = 0  # calls read so far: the next one's index
        self.blank = ""  # with tools: trailing whitespace, held until more text or the end

    def feed(self, text: str, last: bool) -> tuple[str, str, list[tuple[int, ToolCall]]]:
        """(reasoning, content, indexed calls) this text makes certain; ``last``: the answer ended."""
        reasoning, content = "", text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if last:
                held_reasoning, held_content = self.reasoning.finish()
                reasoning, content = reasoning + held_reasoning, content + held_content
        calls: list[ToolCall] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, last)
            # trailing whitespace waits for more text: around calls it is no content (an answer
            # of calls alone has content null, streamed or not)
            held = self.blank + content
            body = held.rstrip()
            content, self.blank = body, held[len(body) :]
            if last and not (self.calls or calls):
                content, self.blank = content + self.blank, ""
        indexed = list(enumerate(calls, start=self.calls))
        self.calls += len(calls)
        return reasoning, content, indexed

    def settle(
        self, reasoning: str, content: str, calls: list
    ) -> tuple[str | None, str | None, list[ToolCall]]:
        """A whole answer's fields: None where it has no reasoning, or no content beside calls."""
        thought: str | None = None
        answer: str | None = content
        if self.reasoning is not None:
            thought, answer = self.reasoning.result(reasoning, content)
        if calls and not (answer or "").strip():
            answer = None
        return thought, answer, [call for _, call in calls]

    def finish_reason(self, reason: str) -> str:
        """OpenAI's: ``tool_calls`` where the answer ended on its own after calls it chose to
        make (auto, required); a named function's call ends with ``stop``, as OpenAI and vLLM say."""
        chose = self.plan is not None and self.plan.mode != "named"
        return "tool_calls" if reason == "stop" and self.calls and chose else reason


async def _check_tool_history_rendered(engine: Engine, messages: list[dict], options) -> None:
    """Refuse a conversation whose template would drop a tool result or an earlier call: the
    messages are rendered once more with each result's content and each call's name replaced
    by a marker of its own, and every marker must reach the text (templates may quote or
    JSON-encode contents, and list the tools' names anyway: markers tell them apart).

    Raises:
        APIError: naming the first message whose result or call the template drops."""
    probe, markers = [], []
    for i, message in enumerate(messages):
        message = dict(message)
        if message["role"] == "tool":
            message["content"] = f"nnsight-probe-{i}-result"
            markers.append((i, message["content"]))
        if message.get("tool_calls"):
            calls = []
            for j, call in enumerate(message["tool_calls"]):
                name = f"nnsight_probe_{i}_{j}_call"
                calls.append({**call, "function": {**call["function"], "name": name}})
                markers.append((i, name))
            message["tool_calls"] = calls
        probe.append(message)
    text, _ = await engine.format_prompt(probe, None, options)
    for i, marker in markers:
        if marker not in text:
            raise APIError(
                f"{engine.model_id}'s chat template drops this message's tool call or result",
                param=f"messages[{i}]",
            )


@dataclass(frozen=True)
class PreparedChat:
    request: ChatCompletionRequest
    job: GenerationJob
    capture: CapturePlan | None
    id: str
    tools: ToolPlan | None = None  # how the answer becomes tool calls, if it may


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
        self.tool_call_parser = parts.settings.tool_call_parser

    async def _tool_plan(self, request: ChatCompletionRequest) -> ToolPlan | None:
        """How the answer becomes tool calls (OpenAI's tool_choice; vLLM's rules for each).

        Raises:
            APIError: a choice without tools, an unknown function, ``auto`` on a server started
                without --tool-call-parser, or a constraint besides a required or named call."""
        choice = request.tool_choice
        if not request.tools:
            if choice not in (None, "none"):
                raise APIError("tool_choice needs tools", param="tool_choice")
            return None
        names = frozenset(tool.function.name for tool in request.tools)
        if choice == "none":
            return None
        if choice in (None, "auto"):
            if self.tool_call_parser is None:
                raise APIError(
                    "tool_choice auto reads calls from the model's own text: start the server with "
                    "--tool-call-parser hermes, or send tool_choice required or a named function "
                    "(enforced while decoding)",
                    param="tool_choice",
                )
            return ToolPlan("auto", names, parallel=request.parallel_tool_calls)
        if request.response_format is not None and request.response_format.type != "text":
            raise APIError(f"tool_choice {choice!r} cannot go with response_format", param="tool_choice")
        if request.structured_outputs is not None:
            raise APIError(f"tool_choice {choice!r} cannot go with structured_outputs", param="tool_choice")
        specs = request.tool_specs()
        for i, spec in enumerate(specs):
            parameters = spec["function"].get("parameters")
            if parameters is not None and parameters.get("type") != "object":
                raise APIError(
                    "a function's parameters are a JSON Schema of an object (OpenAI's rule)",
                    param=f"tools[{i}].function.parameters",
                )
        if choice == "required":
            named, schema = None, required_schema(specs, request.parallel_tool_calls)
        else:
            named = choice.function.name
            tool = next((spec for spec in specs if spec["function"]["name"] == named), None)
            if tool is None:
                raise APIError(f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
            schema = named_schema(tool)
        require_feature(self.engine, "structured_output", "tool_choice")
        grammar = await self.engine.on_prompt_thread(schema_grammar, schema, "tools")
        try:
            await self.engine.check_grammar(grammar)
        except GrammarError as exc:
            raise APIError(f"tools: a parameters schema cannot be followed: {exc}", param="tools") from exc
        return ToolPlan("required" if named is None else "named", names, named, grammar)

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
        tools = await self._tool_plan(request)
        if tools is not None and tools.grammar is not None:
            grammar, constrained = tools.grammar, "tool_choice"
        else:
            grammar = await checked_grammar(self.engine, request)
            constrained = "response_format" if request.response_format is not None else "structured_outputs"
        if grammar is not None and self.reasoning is not None:
            raise APIError(
                f"{constrained} cannot go with this server's --reasoning-parser yet: the constraint "
                "would hold the thinking too (serve without the parser and switch thinking off, e.g. "
                'chat_template_kwargs {"enable_thinking": false})',
                param=constrained,
            )
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
        return PreparedChat(request, job, plan, request_id, tools)

    async def respond(self, prepared: PreparedChat) -> ChatCompletionResponse:
        result = await generate(self.engine, prepared.job)
        activations = self.captures.activations_ref(result.capture)
        choices = []
        for c in result.choices:
            reader = _AnswerReader(self.reasoning, prepared.tools)
            reasoning, content, calls = reader.settle(*reader.feed(c.text, last=True))
            message = ChatResponseMessage(
                content=content,
                reasoning_content=reasoning if prepared.request.include_reasoning else None,
                tool_calls=[call.wire() for call in calls] or None,
            )
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=self._logprobs(c.logprobs) if c.logprobs is not None else None,
                    finish_reason=reader.finish_reason(c.finish_reason),
                )
            )
        return ChatCompletionResponse(
            id=prepared.id,
            created=now(),
            model=self.engine.model_id,
            choices=choices,
            usage=usage(result.prompt_tokens, result.completion_tokens),
            activations=activations,
            ndif=activations,
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
        readers: dict[int, _AnswerReader] = {}  # per choice: reasoning and tool calls apart
        async for item in items:
            if isinstance(item, CaptureResult):
                continue
            if isinstance(item, ChoiceDelta):
                logprobs = dump(self._logprobs(list(item.logprobs))) if item.logprobs else None
                reader = readers.setdefault(item.index, _AnswerReader(self.reasoning, prepared.tools))
                reasoning, content, calls = reader.feed(item.text, last=item.finish_reason is not None)
                deltas = [{"reasoning_content": reasoning}] if reasoning and request.include_reasoning else []
                deltas += [{"content": content}] if content else []
                deltas += [{"tool_calls": [call.wire(index)]} for index, call in calls]
                if logprobs and not deltas:
                    deltas = [{}]  # a token whose text is held back (a tag, a call): its logprobs
                for i, delta in enumerate(deltas):
                    yield chunk(item.index, delta, logprobs if i == len(deltas) - 1 else None)
                if item.finish_reason:
                    yield chunk(item.index, {}, None, reader.finish_reason(item.finish_reason))
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
