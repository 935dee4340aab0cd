"""What a generation job asks for and how each of its rows stands: no model, no runtime.

A :class:`GenerationJob` is one prompt, ``n`` choices (rows), the request's
:class:`SamplingParams`, its interventions (``interventions.Edit``), its capture
(``capture.CaptureSpec``) and, for logit difference amplification, its before side
(:class:`LdaPlan`). It is built whole by the serving layer and never patched after.

:class:`RowState` is the one per-row state of every job, alone or batched, plain or
LDA: the tokens chosen so far, their text (through
:class:`~server.engine.text.CompletionText`, so streamed and final text agree), their
logprobs or LDA statistics, and the one rule for when a row ends (EOS unless
``ignore_eos``, a stop string, ``max_tokens``; cancellation ends every row at once).
The decode loop (``loop.py``) owns these objects; nothing else advances them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .capture import CaptureResult, CaptureSpec
from .text import CompletionText

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt's choices. ``temperature == 0`` means greedy.

    A seeded job draws every token of its ``n`` rows from one ``torch.Generator`` seeded
    ``seed`` (one draw over its rows per step), so it draws the same tokens alone or in any
    batch, and exactly what HF ``generate`` draws after ``torch.manual_seed(seed)``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and k alternatives
    ignore_eos: bool = False
    # logits processors (sampler.process), each off at its default
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    repetition_penalty: float = 1.0  # HF/CTRL: > 1 discourages tokens of the prompt and output
    frequency_penalty: float = 0.0  # OpenAI/vLLM: minus this x the token's count in the output
    presence_penalty: float = 0.0  # OpenAI/vLLM: minus this if the token is in the output
    min_tokens: int = 0  # EOS and stop_token_ids masked until this many tokens
    min_p: float = 0.0  # a warper, after top_p: drop tokens below min_p x the top probability
    stop_token_ids: tuple[int, ...] = ()  # more ids that end a choice (finish_reason "stop")
    grammar: str | None = None  # an llguidance grammar each row follows (constraints.py)

    @property
    def needs_history(self) -> bool:
        """Whether a processor reads the tokens so far (the loop keeps them only then)."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def manifest(self) -> dict:
        """How it sampled, as a capture's manifest says (``sampling``), JSON-ready."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "n": self.n,
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
            "min_p": self.min_p,
            "logit_bias": {str(token): bias for token, bias in self.logit_bias},
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "min_tokens": self.min_tokens,
            "stop_token_ids": list(self.stop_token_ids),
        }


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a token under the model (raw logits, before sampling warpers)."""

    token_id: int
    logprob: float | None  # None only for a prompt's first token, which has no context
    top: tuple[tuple[int, float], ...] = ()  # the k most likely tokens at this step, best first


@dataclass(frozen=True)
class TokenStats:
    """How LDA's two sides differed at one generated token (raw logits, temperature 1)."""

    token_id: int
    kl: float  # KL(after || before) of the next-token distributions, in nats
    logit_diff_norm: float  # || after - before ||_2 over the vocabulary
    logprob_after: float  # the chosen token's log-probability under each side
    logprob_before: float


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice gained in one step: new text, new logprobs, and its finish reason once done."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    stats: list[TokenStats] | None = None  # LDA with token_stats: how the sides differed per token


@dataclass
class GenerationResult:
    choices: list[Choice]
    prompt_tokens: int
    capture: CaptureResult | None = None  # the job's capture, once written

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)


@dataclass(frozen=True)
class LdaPlan:
    """The before side of an LDA job: each token is drawn from ``after + alpha * (after - before)``.

    ``weights``: which weights run the before side: ``"served"`` (the served model as is,
    without the job's interventions), ``"adapter_off"`` (the same weights with the LoRA
    adapter switched off) or ``"before_model"`` (the ``--lda-before`` checkpoint)."""

    prompt_ids: tuple[int, ...]
    alpha: float
    weights: str = "served"
    token_stats: bool = False


@dataclass
class GenerationJob:
    """One prompt to generate ``params.n`` choices from; ``on_delta``/``on_capture`` (if set) are
    called from the worker thread as text arrives and when a trace-mode capture is written."""

    prompt_ids: list[int]
    params: SamplingParams
    first_index: int = 0  # index of the first choice (several prompts share one response)
    edits: tuple = ()  # interventions (interventions.Edit) on this job's rows, at every step
    capture: CaptureSpec | None = None  # what to record and where (capture.py)
    lda: LdaPlan | None = None  # LDA: the before side and alpha
    on_delta: Callable[[ChoiceDelta], None] | None = None
    on_capture: Callable[[CaptureResult], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps: int = 0  # decode steps run so far (written by the worker)
    first_token_at: float | None = None  # time.monotonic() when the first token was chosen
    memory_bytes: int = 0  # estimated bytes it adds while it runs (KV cache, activations), for batching

    @property
    def rows(self) -> int:
        """Rows it takes in a batch: one per choice, on each side it runs."""
        return self.params.n * (2 if self.lda is not None else 1)


@dataclass
class RowState:
    """One choice as it is generated: tokens, text, logprobs (or LDA stats), and whether it ended."""

    text: CompletionText
    max_tokens: int
    eos_ids: frozenset[int]  # EOS ids that end it (empty with ignore_eos); not in the text
    stop_token_ids: frozenset[int] = frozenset()  # more ids that end it; their text is kept (vLLM)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stats: list[TokenStats] = field(default_factory=list)
    finish_reason: str | None = None

    @classmethod
    def for_job(cls, job: GenerationJob, tokenizer, eos_ids: frozenset[int]) -> list[RowState]:
        params = job.params
        eos = frozenset() if params.ignore_eos else eos_ids
        stops = frozenset(params.stop_token_ids)
        return [
            cls(CompletionText(tokenizer, params.stop, params.min_tokens), params.max_tokens, eos, stops)
            for _ in range(params.n)
        ]

    @property
    def stop_ids(self) -> frozenset[int]:
        """Every id that ends the row (what ``min_tokens`` holds back)."""
        return self.eos_ids | self.stop_token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def advance(
        self, token: int, logprob: TokenLogprob | None = None, stats: TokenStats | None = None
    ) -> None:
        """Take the row's next token; ends the row on EOS, a stop token or string, or
        ``max_tokens``. A stop token's text is kept (vLLM's rule; special tokens decode to none)."""
        self.token_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if stats is not None:
            self.stats.append(stats)
        if token in self.eos_ids or self.text.append(token) or token in self.stop_token_ids:
            self.finish(FINISH_STOP)
        elif len(self.token_ids) >= self.max_tokens:
            self.finish(FINISH_LENGTH)

    def finish(self, reason: str = FINISH_LENGTH) -> None:
        """End the row (``length``: it ran out of tokens, or its request was cancelled)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.text.finish()

    def choice(self, index: int, with_logprobs: bool, with_stats: bool = False) -> Choice:
        return Choice(
            index=index,
            text=self.text.text,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            logprobs=self.logprobs if with_logprobs else None,
            stats=self.stats if with_stats else None,
        )
