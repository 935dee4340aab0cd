"""The LDA endpoints: requests become an :class:`~server.engine.lda.LdaJob`, results become responses.

What the before side is comes from the request's ``before`` object, else from
the server's configuration (``--lda-before`` if a second checkpoint was loaded,
else ``--adapter`` switched off), else the request is refused naming ``before``:

=================  ==========================================  ============================
``before``         after side                                  before side
=================  ==========================================  ============================
``model``          served model                                the --lda-before checkpoint
``adapter: off``   served model, adapter on                    same weights, adapter off
``interventions``  served model with the interventions         served model as is
``system_prompt``  request's system prompt                     this system prompt
``prefix``         the prompt                                  this prefix + the prompt
=================  ==========================================  ============================

Limits (400 naming the field): ``|alpha| <= --lda-max-alpha``, at most
``--lda-max-batch-size`` prompts, tokens within ``--max-tokens-cap`` and the
context window of the longer side, and the ``--memory-budget`` estimate of both
KV caches (``memory.estimate_lda``). The shared limits go through the ``admission``
part; ``before: {"interventions": ...}`` through the ``interventions`` part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jinja2

from ..engine.job import FINISH_STOP
from ..engine.lda import LdaJob, LdaResult
from ..engine.memory import estimate_lda, format_size
from ..errors import APIError
from ..middleware import note_tokens
from ..protocol import completion_id, now
from ..protocol_lda import (
    GenerateLdaBatchRequest,
    GenerateLdaBatchResponse,
    GenerateLdaRequest,
    GenerateLdaResponse,
    LdaBefore,
    LdaFields,
    LdaRequest,
    LdaResponse,
    LdaRowResult,
    LdaTokenStats,
)
from .base import ENGINE_FAILURES, engine_error, require_feature, usage
from .parts import ServingParts

logger = logging.getLogger(__name__)


@dataclass
class _Ran:
    """A finished LDA run and what the responses need to describe it."""

    prompts: list[str]
    formatted: list[str]
    prompt_ids: list[list[int]]  # after and before side
    result: LdaResult
    model_after: str
    model_before: str
    before_kind: str


class LdaServing:
    """The LDA endpoints (``/v1/lda``, ``/generate_lda``, ``/generate_lda_batch``): one LdaJob each."""

    def __init__(self, parts: ServingParts) -> None:
        self.engine = parts.engine
        self.settings = parts.settings
        self.admission = parts.admission
        self.interventions = parts.interventions

    async def generate_one(self, request: GenerateLdaRequest) -> GenerateLdaResponse:
        ran = await self._run(request, [request.prompt], request.max_new_tokens, "max_new_tokens", "prompt")
        return self._compat_result(request, ran, 0)

    async def generate_batch(self, request: GenerateLdaBatchRequest) -> GenerateLdaBatchResponse:
        ran = await self._run(request, request.prompts, request.max_new_tokens, "max_new_tokens", "prompts")
        return GenerateLdaBatchResponse(
            results=[self._compat_result(request, ran, i) for i in range(len(ran.prompts))],
            alpha=request.alpha,
            model_after=ran.model_after,
            model_before=ran.model_before,
            batch_size=len(ran.prompts),
        )

    async def lda(self, request: LdaRequest) -> LdaResponse:
        ran = await self._run(
            request, request.prompts, request.max_tokens, "max_tokens", "prompt", request.token_stats
        )
        results = []
        for i, row in enumerate(ran.result.rows):
            tokens = None
            if request.token_stats:
                tokens = [
                    LdaTokenStats(
                        token=self.engine.token_text(s.token_id),
                        token_id=s.token_id,
                        kl=s.kl,
                        logit_diff_norm=s.logit_diff_norm,
                        logprob_after=s.logprob_after,
                        logprob_before=s.logprob_before,
                    )
                    for s in row.stats
                ]
            results.append(
                LdaRowResult(
                    index=i,
                    prompt=ran.prompts[i],
                    formatted_prompt=ran.formatted[i],
                    completion=row.text,
                    finish_reason=row.finish_reason,
                    tokens_generated=len(row.token_ids),
                    token_ids=row.token_ids,
                    tokens=tokens,
                )
            )
        prompt_tokens = sum(len(ids) for ids in ran.prompt_ids)  # both sides read a prompt
        completion_tokens = sum(len(row.token_ids) for row in ran.result.rows)
        return LdaResponse(
            id=completion_id("lda"),
            created=now(),
            model=self.engine.model_id,
            alpha=request.alpha,
            model_after=ran.model_after,
            model_before=ran.model_before,
            before=ran.before_kind,
            results=results,
            usage=usage(prompt_tokens, completion_tokens),
        )

    def _compat_result(self, request: LdaFields, ran: _Ran, i: int) -> GenerateLdaResponse:
        row = ran.result.rows[i]
        return GenerateLdaResponse(
            prompt=ran.prompts[i],
            formatted_prompt=ran.formatted[i],
            completion=row.text,
            text=ran.formatted[i] + row.text,
            alpha=request.alpha,
            model_after=ran.model_after,
            model_before=ran.model_before,
            tokens_generated=len(row.token_ids),
            stopped_early=row.finish_reason == FINISH_STOP,
        )

    # -- the shared path ---------------------------------------------------------

    async def _run(
        self,
        request: LdaFields,
        prompts: list[str],
        requested_tokens: int,
        tokens_param: str,
        prompts_param: str,
        token_stats: bool = False,
    ) -> _Ran:
        self.admission.check_model(request.model)
        require_feature(self.engine, "lda", None)
        self.admission.check_queue()
        settings = self.settings
        if abs(request.alpha) > settings.lda_max_alpha:
            raise APIError(
                f"alpha must be between -{settings.lda_max_alpha:g} and {settings.lda_max_alpha:g} "
                "on this server (--lda-max-alpha)",
                param="alpha",
            )
        if len(prompts) > settings.lda_max_batch_size:
            raise APIError(
                f"{len(prompts)} prompts in one request; this server takes at most "
                f"{settings.lda_max_batch_size} (--lda-max-batch-size): split them",
                param=prompts_param,
            )
        before = self._before(request.before)
        texts = [*prompts, request.system_prompt or "", before.system_prompt or "", before.prefix or ""]
        self.admission.check_prompt_chars(sum(map(len, texts)), prompts_param)
        if request.apply_chat_template and not self.engine.has_chat_template:
            raise APIError(
                "this model has no chat template: send apply_chat_template false",
                param="apply_chat_template",
            )
        if before.kind == "system_prompt" and not request.apply_chat_template:
            raise APIError(
                "a before system_prompt needs apply_chat_template true", param="before.system_prompt"
            )

        after_rendered = [
            await self._format(request, prompt, request.system_prompt, "", "system_prompt")
            for prompt in prompts
        ]
        if before.kind in ("system_prompt", "prefix"):
            system = before.system_prompt if before.kind == "system_prompt" else request.system_prompt
            blame = "before.system_prompt" if before.kind == "system_prompt" else "system_prompt"
            prefix = before.prefix or ""
            before_ids = [
                (await self._format(request, prompt, system, prefix, blame))[1] for prompt in prompts
            ]
        else:
            before_ids = [ids for _, ids in after_rendered]
        after_ids = [ids for _, ids in after_rendered]
        longest = max(len(ids) for ids in after_ids + before_ids)
        # A before checkpoint with a shorter context window than the served one bounds both sides.
        shorter = 0
        if before.kind == "model" and self.engine.before_context_length is not None:
            shorter = max(0, self.engine.context_length - self.engine.before_context_length)
        max_tokens = self.admission.token_budget(
            longest, requested_tokens, tokens_param, prompts_param, reserve=shorter
        )
        self._check_memory(
            len(prompts), after_ids, before_ids, max_tokens, tokens_param, prompts_param, before.kind
        )

        edits = ()
        if before.kind == "interventions":
            edits = await self.interventions.resolve(before.interventions, field="before.interventions")
        weights = {"model": "before_model", "adapter": "adapter_off"}.get(before.kind, "served")
        job = LdaJob(
            after_prompts=tuple(map(tuple, after_ids)),
            before_prompts=tuple(map(tuple, before_ids)),
            alpha=request.alpha,
            params=request.sampling_params(max_tokens),
            weights=weights,
            edits=edits,
            token_stats=token_stats,
        )
        try:
            result = await self.engine.lda(job)
        except ENGINE_FAILURES as exc:
            raise engine_error(exc, interventions_param="before.interventions") from exc
        note_tokens(
            sum(len(ids) for ids in after_ids + before_ids), sum(len(row.token_ids) for row in result.rows)
        )
        return _Ran(
            prompts=prompts,
            formatted=[text for text, _ in after_rendered],
            prompt_ids=after_ids + before_ids,
            result=result,
            model_after=self._after_name(),
            model_before=self._before_name(before),
            before_kind=before.kind,
        )

    def _before(self, before: LdaBefore | None) -> LdaBefore:
        """The request's before side, checked against what is loaded, or the server's default."""
        engine = self.engine
        if before is None:
            if engine.before is not None:
                return LdaBefore(model=engine.before.model_id)
            if engine.loaded.adapter is not None:
                return LdaBefore(adapter="off")
            raise APIError(
                "this server has no default before side (start it with --lda-before MODEL or "
                '--adapter PATH), so send one: {"model": ...}, {"adapter": "off"}, '
                '{"interventions": [...]}, {"system_prompt": ...} or {"prefix": ...}',
                param="before",
            )
        if before.kind == "model":
            names = set() if engine.before is None else {engine.before.model_id, self.settings.lda_before}
            if before.model not in names:
                loaded = ", ".join(sorted(n for n in names if n)) or "none (start with --lda-before MODEL)"
                raise APIError(
                    f"no before model named {before.model!r} is loaded; loaded: {loaded}",
                    param="before.model",
                )
        if before.kind == "adapter" and engine.loaded.adapter is None:
            raise APIError(
                "this server has no adapter to switch off (start it with --adapter PATH)",
                param="before.adapter",
            )
        return before

    async def _format(
        self, request: LdaFields, prompt: str, system_prompt: str | None, prefix: str, system_param: str
    ) -> tuple[str, list[int]]:
        if not request.apply_chat_template:
            return await self.engine.format_prompt(None, prefix + prompt)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": prefix + prompt})
        try:
            return await self.engine.format_prompt(messages, None)
        except jinja2.TemplateError as exc:  # e.g. a template without a system role
            raise APIError(
                f"the model's chat template rejected this prompt: {exc}",
                param=system_param if system_prompt is not None else "apply_chat_template",
            ) from exc

    def _check_memory(
        self,
        rows: int,
        after_ids: list[list[int]],
        before_ids: list[list[int]],
        max_tokens: int,
        tokens_param: str,
        prompts_param: str,
        before_kind: str,
    ) -> None:
        budget = self.settings.memory_budget
        if budget is None:
            return
        engine = self.engine
        before_shape = engine.before_shape if before_kind == "model" else engine.shape

        def need(rows: int = rows, tokens: int = max_tokens):
            return estimate_lda(
                engine.shape,
                before_shape,
                rows=rows,
                after_prompt=max(map(len, after_ids)),
                before_prompt=max(map(len, before_ids)),
                max_tokens=tokens,
                resident_weights=engine.resident_weight_bytes,
            )

        full = need()
        if full.total <= budget:
            return
        if rows > 1 and need(rows=1).total <= budget:
            blame = prompts_param
            fix = "send fewer prompts per request"
        elif max_tokens > 1 and need(tokens=1).total <= budget:
            blame, fix = tokens_param, f"reduce {tokens_param}"
        else:
            blame, fix = prompts_param, "shorten the prompts"
        raise APIError(
            f"this LDA request needs about {format_size(full.total)} ({full.describe()}, both sides), "
            f"more than the server's --memory-budget of {format_size(budget)}: {fix}.",
            param=blame,
            code="memory_budget_exceeded",
        )

    def _after_name(self) -> str:
        loaded = self.engine.loaded
        return loaded.model_id if loaded.adapter is None else f"{loaded.model_id} + adapter {loaded.adapter}"

    def _before_name(self, before: LdaBefore) -> str:
        model_id = self.engine.model_id
        return {
            "model": before.model if self.engine.before is None else self.engine.before.model_id,
            "adapter": f"{model_id} (adapter off)",
            "interventions": f"{model_id} (without the interventions)",
            "system_prompt": f"{model_id} (other system prompt)",
            "prefix": f"{model_id} (with prefix)",
        }[before.kind]
