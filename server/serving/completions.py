"""/v1/completions: prompts (text or token ids) -> one job each -> response or chunks; echo.

Built from parts: ``admission`` (limits), ``captures`` (capture planning),
``interventions``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine.capture import CapturePlan, CaptureResult
from ..engine.job import GenerationJob, GenerationResult, TokenLogprob
from ..errors import APIError
from ..protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    completion_id,
    dump,
    now,
)
from .base import (
    ENGINE_FAILURES,
    activation_fields,
    checked_grammar,
    engine_error,
    generate,
    leading_capture,
    place_activations,
    stream,
    usage,
)
from .capture_planning import extra_step
from .parts import ServingParts


@dataclass(frozen=True)
class CompletionPrompt:
    """One prompt of a request: its job, and its text when echo is on."""

    job: GenerationJob
    echo: str | None


@dataclass(frozen=True)
class PreparedCompletion:
    request: CompletionRequest
    prompts: list[CompletionPrompt]
    capture: CapturePlan | None
    id: str


class CompletionServing:
    """The completions endpoint: its own checks, then the parts' checks, then one job per prompt."""

    def __init__(self, parts: ServingParts) -> None:
        self.engine = parts.engine
        self.settings = parts.settings
        self.admission = parts.admission
        self.captures = parts.captures
        self.interventions = parts.interventions

    async def prepare(self, request: CompletionRequest) -> PreparedCompletion:
        """Everything that can be refused is refused here, before any model work."""
        self.admission.check_model(request.model)
        request.check_supported()
        capture = self.captures.effective_capture(request.capture, request.ndif)
        plan = self.captures.capture_plan(capture, request.n)
        prepared: list[CompletionPrompt] = []
        request_id = completion_id("cmpl")
        edits = await self.interventions.resolve(request.interventions, request.presets)
        if edits and request.echo and request.logprobs is not None:
            raise APIError(
                "echo with logprobs scores the prompt without interventions; send one or the other",
                param="interventions",
            )
        grammar = await checked_grammar(self.engine, request)
        prompts = request.prompts()  # refuses an empty list
        self.admission.check_prompt_chars(sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
        if plan is not None and len(prompts) > 1:
            raise APIError(
                "capture works on one prompt per request; send the prompts separately", param="prompt"
            )
        single = isinstance(request.prompt, str) or isinstance(request.prompt[0], int)
        for i, prompt in enumerate(prompts):
            param = "prompt" if single else f"prompt[{i}]"
            prompt_ids = (
                await self.engine.encode(prompt, add_special_tokens=request.add_special_tokens)
                if isinstance(prompt, str)
                else list(prompt)
            )
            if not prompt_ids:
                raise APIError("prompt must not be empty", param=param)
            if any(t < 0 or t >= self.engine.vocab_size for t in prompt_ids):
                raise APIError(f"token ids must lie in [0, {self.engine.vocab_size})", param=param)
            max_tokens = self.admission.token_budget(
                len(prompt_ids), request.max_tokens, "max_tokens", param, reserve=extra_step(plan)
            )
            if plan is not None and plan.mode == "generate" and max_tokens == 0:
                raise APIError('capture mode "generate" needs max_tokens of at least 1', param="max_tokens")
            params = request.sampling_params(
                max_tokens=max_tokens,
                logprobs=request.logprobs,
                max_n=self.settings.max_n,
                vocab_size=self.engine.vocab_size,
                grammar=grammar,
            )
            memory_bytes = self.admission.check_memory(
                prompt_tokens=len(prompt_ids),
                max_tokens=max_tokens,
                n=params.n,
                plan=plan,
                scoring=request.echo and request.logprobs is not None,
                prompt_param=param,
                max_tokens_param="max_tokens",
            )
            job = GenerationJob(
                prompt_ids=prompt_ids,
                params=params,
                first_index=i * request.n,
                edits=edits,
                capture=self.captures.capture_spec(plan, request, request_id),  # one prompt when capturing
                memory_bytes=memory_bytes,
            )
            echo = None
            if request.echo:
                echo = prompt if isinstance(prompt, str) else await self.engine.decode(prompt_ids)
            prepared.append(CompletionPrompt(job, echo))
        if len(prepared) > self.settings.max_queue:
            raise APIError(
                f"{len(prepared)} prompts in one request; this server queues at most "
                f"{self.settings.max_queue} (--max-queue): split them",
                param="prompt",
            )
        # A stream queues its prompts in turn.
        self.admission.check_queue(1 if request.stream else len(prepared))
        return PreparedCompletion(request, prepared, plan, request_id)

    async def _echo_logprobs(self, prompt: CompletionPrompt) -> list[TokenLogprob]:
        """The prompt's own logprobs, when echo and logprobs are both asked for."""
        k = prompt.job.params.logprobs
        if prompt.echo is None or k is None:
            return []
        try:
            return await self.engine.score_prompt(prompt.job.prompt_ids, k)
        except ENGINE_FAILURES as exc:  # out of memory, the request timeout
            raise engine_error(exc) from exc

    async def respond(self, prepared: PreparedCompletion) -> CompletionResponse:
        async def answer(prompt: CompletionPrompt):
            return await self._echo_logprobs(prompt), await generate(self.engine, prompt.job)

        # Every prompt is queued at once, so the scheduler can batch them together; one
        # request-timeout clock for them all, as when they are streamed one after another.
        self.engine.start_clock()
        tasks = [asyncio.ensure_future(answer(prompt)) for prompt in prepared.prompts]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()  # a cancelled task cancels its job
            raise
        choices: list[CompletionChoice] = []
        prompt_tokens = completion_tokens = 0
        activations = None
        for prompt, (echoed, result) in zip(prepared.prompts, answers, strict=True):
            activations = activations or self.captures.activations_ref(result.capture)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            for c in result.choices:
                logprobs = self._logprobs(echoed + c.logprobs) if c.logprobs is not None else None
                text = (prompt.echo or "") + c.text
                choices.append(
                    CompletionChoice(
                        index=c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason
                    )
                )
        return CompletionResponse(
            id=prepared.id,
            created=now(),
            model=self.engine.model_id,
            choices=choices,
            usage=usage(prompt_tokens, completion_tokens),
            activations=activations,
            ndif=activations,
        )

    def chunks(self, prepared: PreparedCompletion) -> AsyncIterator[dict]:
        """Per prompt: the echo (if asked), then its choices' deltas and finish; then the usage
        if asked. Captured ``activations`` ride on the first chunk in trace mode, on the last
        finish chunk in generate mode (``place_activations``)."""
        generate_mode = prepared.capture is not None and prepared.capture.mode == "generate"
        return place_activations(self._chunks(prepared), wait_for_capture=generate_mode)

    async def _chunks(self, prepared: PreparedCompletion) -> AsyncIterator[dict]:
        request = prepared.request
        trace = prepared.capture is not None and prepared.capture.mode == "trace"
        first_items = stream(self.engine, prepared.prompts[0].job)  # a trace-mode capture comes first
        captured, first_items = await leading_capture(first_items, trace)
        activations = self.captures.activations_ref(captured)
        base = {
            "id": prepared.id,
            "object": "text_completion",
            "created": now(),
            "model": self.engine.model_id,
        }
        if request.include_usage:
            base["usage"] = None
        if activations is not None:  # trace mode
            yield {**base, "choices": [], **activation_fields(activations)}

        def chunk(
            index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None
        ) -> dict:
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs and dump(logprobs),
                "finish_reason": finish_reason,
            }
            return {**base, "choices": [choice]}

        offsets: dict[int, int] = {}  # the next logprobs.text_offset, per choice
        prompt_tokens = completion_tokens = 0
        for prompt in prepared.prompts:
            job = prompt.job
            if prompt.echo is not None:
                echoed = await self._echo_logprobs(prompt)
                logprobs = self._logprobs(echoed) if echoed else None
                for index in range(job.first_index, job.first_index + job.params.n):
                    offsets[index] = _end_offset(logprobs, 0)
                    yield chunk(index, prompt.echo, logprobs, None)
            items = first_items if prompt is prepared.prompts[0] else stream(self.engine, job)
            async for item in items:
                if isinstance(item, CaptureResult):
                    continue
                if isinstance(item, GenerationResult):
                    prompt_tokens += item.prompt_tokens
                    completion_tokens += item.completion_tokens
                    generated = None if trace else self.captures.activations_ref(item.capture)
                    if generated is not None:
                        yield {**base, "choices": [], **activation_fields(generated)}
                    continue
                logprobs = None
                if item.logprobs:
                    start = offsets.get(item.index, 0)
                    logprobs = self._logprobs(list(item.logprobs), start=start)
                    offsets[item.index] = _end_offset(logprobs, start)
                if item.text or logprobs or item.finish_reason:
                    yield chunk(item.index, item.text, logprobs, item.finish_reason)
        if request.include_usage:
            yield {**base, "choices": [], "usage": dump(usage(prompt_tokens, completion_tokens))}

    def _logprobs(self, logprobs: list[TokenLogprob], start: int = 0) -> CompletionLogprobs:
        """OpenAI's completions shape; text_offset is the summed length of the tokens' texts before."""
        tokens = [self.engine.token_text(lp.token_id) for lp in logprobs]
        offsets, position = [], start
        for text in tokens:
            offsets.append(position)
            position += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[None if lp.logprob is None else self._top_by_text(lp.top) for lp in logprobs],
            text_offset=offsets,
        )

    def _top_by_text(self, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
        """Alternatives keyed by text (OpenAI's shape); where two tokens decode alike, the likelier wins."""
        alternatives: dict[str, float] = {}
        for token_id, logprob in top:  # best first
            alternatives.setdefault(self.engine.token_text(token_id), logprob)
        return alternatives


def _end_offset(logprobs: CompletionLogprobs | None, start: int) -> int:
    """Where the next token's text_offset lies."""
    if logprobs is None or not logprobs.tokens:
        return start
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])
