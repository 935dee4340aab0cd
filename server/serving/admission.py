"""Admission: the refusals a request gets before any model work, from the server's limits.

Owns the model-name check, the token budget, ``--max-prompt-chars``, queue room
(``--max-queue``), the ``--memory-budget`` estimate and ``--max-capture-bytes``. Each
refusal is an :class:`~server.errors.APIError` naming the request field at fault; the
endpoint passes in the field names (``messages``, ``prompt[2]``, ``max_completion_tokens``)
so no message is fixed up afterwards. Nothing here touches the model: every check reads
the engine's static facts (context window, shape, queue room) and the settings.

Token budget rule: a request asking for more than ``--max-tokens-cap`` tokens,
or for more than fit in the context window after its prompt, is refused with
a 400 naming ``max_tokens`` (never silently clamped); a request that names no
limit gets whatever fits, up to the cap.

Endpoint-specific limits (``--max-messages``, ``--lda-max-alpha``, the LDA memory
estimate of both sides) stay with their endpoint.
"""

from __future__ import annotations

from http import HTTPStatus

from ..config import Settings
from ..engine.capture import CapturePlan, manifest_bytes, stored_bytes
from ..engine.engine import Engine
from ..engine.memory import estimate, format_size
from ..errors import APIError
from .base import queue_full
from .capture_planning import extra_step


class Admission:
    """The server's limits, checked against one request. Stateless beyond the engine and settings."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._model_names = {engine.model_id, settings.model, engine.loaded.source}

    def check_model(self, model: str | None) -> None:
        if model and model not in self._model_names:
            raise APIError(
                f"The model `{model}` does not exist; this server serves `{self.engine.model_id}`.",
                status=HTTPStatus.NOT_FOUND,
                param="model",
                code="model_not_found",
            )

    def token_budget(
        self, prompt_len: int, requested: int | None, param: str, prompt_param: str, reserve: int = 0
    ) -> int:
        """How many tokens this request may generate, or a 400 naming the parameter at fault.

        ``reserve``: positions the request needs beyond its tokens (a generate-mode capture
        feeds its final token through the model once more).
        """
        window = self.engine.context_length - reserve
        cap = self.settings.max_tokens_cap
        room = window - prompt_len
        if room < 0 or (room == 0 and requested != 0):  # requested == 0: scoring an echoed prompt
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

    def check_messages(self, messages: list[dict[str, str]], template_chars: int = 0) -> None:
        """Refuse more chat messages than --max-messages, or more text than --max-prompt-chars
        (``template_chars``: what the request's template variables add, as JSON)."""
        if len(messages) > self.settings.max_messages:
            raise APIError(
                f"{len(messages)} messages in one request; this server takes at most "
                f"{self.settings.max_messages} (--max-messages)",
                param="messages",
                code="too_many_messages",
            )
        self.check_prompt_chars(sum(len(m["content"]) for m in messages) + template_chars, "messages")

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """Refuse a request with more prompt text than --max-prompt-chars, before tokenizing it."""
        limit = self.settings.max_prompt_chars
        if chars > limit:
            raise APIError(
                f"{chars} characters of prompt text in one request; this server takes at most "
                f"{limit} (--max-prompt-chars)",
                param=param,
                code="prompt_too_long",
            )

    def check_queue(self, jobs: int = 1) -> None:
        """429 now, before a stream starts, when the engine's queue has no room for ``jobs`` more
        (a request that arrives in the meantime can still take the last place)."""
        scheduler = self.engine.scheduler
        room = scheduler.room()
        if room < jobs:
            waiting = scheduler.max_queue - room
            raise queue_full(f"{waiting} requests are already waiting (--max-queue {scheduler.max_queue})")

    def check_memory(
        self,
        *,
        prompt_tokens: int,
        max_tokens: int,
        n: int,
        plan: CapturePlan | None,
        scoring: bool,
        prompt_param: str,
        max_tokens_param: str,
    ) -> int:
        """Refuse, before it runs, a request whose estimated peak exceeds --memory-budget (or
        whose capture would write more than --max-capture-bytes).

        Returns the bytes the request adds beyond the resident weights (the scheduler keeps a
        batch's sum within the budget)."""
        if plan is not None:
            self.check_capture_size(plan, prompt_tokens, max_tokens)
        budget = self.settings.memory_budget

        def need(tokens: int = max_tokens, rows: int = n, capture: CapturePlan | None = plan):
            points = capture.points if capture else ()
            return estimate(
                self.engine.shape,
                prompt_tokens=prompt_tokens,
                max_tokens=tokens + extra_step(capture),
                n=rows,
                capture_widths=tuple(p.width for p in points),
                capture_positions=prompt_tokens if points else 0,
                scoring=scoring,
                resident_weights=self.engine.resident_weight_bytes,
                pattern_bytes=capture.pattern_device_bytes(prompt_tokens, self.engine.shape.dtype_bytes)
                if capture
                else 0,
            )

        full = need()
        if budget is None or full.total <= budget:
            return full.total - full.weights
        # Name the first knob whose reduction alone would make the request fit, else the prompt.
        fixes = [
            ("capture", plan is not None, lambda: need(capture=None)),
            (max_tokens_param, max_tokens > 1, lambda: need(tokens=1)),
            ("n", n > 1, lambda: need(rows=1)),
        ]
        blame = next(
            (name for name, applies, reduced in fixes if applies and reduced().total <= budget), prompt_param
        )
        raise APIError(
            f"this request needs about {format_size(full.total)} ({full.describe()}), more than the "
            f"server's --memory-budget of {format_size(budget)}. Reduce {blame}"
            + (" (fewer layers or hook points, or sample_hidden)" if blame == "capture" else "")
            + ".",
            param=blame,
            code="memory_budget_exceeded",
        )

    def check_capture_size(self, plan: CapturePlan, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.settings.max_capture_bytes
        size = stored_bytes(plan, prompt_tokens, max_tokens, self.engine.loaded.dtype) + manifest_bytes(
            plan, prompt_tokens, max_tokens
        )
        if size > limit:
            raise APIError(
                f"this capture would write up to {format_size(size)} with its manifest, more than this "
                f"server's --max-capture-bytes of {format_size(limit)}. Capture fewer layers or hook points, "
                "fewer positions, sample_hidden, a smaller dtype, or generate fewer tokens.",
                param="capture",
                code="capture_too_large",
            )
