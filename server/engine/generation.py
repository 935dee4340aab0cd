"""Plain generation: one prompt, ``n`` choices, through the wrapped HF module's own ``generate``.

What a job asks for is :class:`SamplingParams` (already validated by the
serving layer); what it returns is :class:`GenerationResult`. In between, the
HF decode loop runs on the served weights (no second copy) with two small
hooks of ours:

* :class:`_LogprobRecorder`, a logits processor placed before any sampling
  warper, keeps the log-softmax of the raw logits of the current step, only
  when logprobs were asked for (O(vocab) memory, not O(steps x vocab));
* :class:`_DecodeMonitor`, a stopping criterion that sees every new token. It
  is the single authority on when a choice ends (EOS, stop string,
  ``max_tokens``, or cancellation) and the single place tokens become text
  (:class:`~server.engine.text.CompletionText`), so streamed and non-streamed
  output are the same by construction.

EOS is deliberately *not* given to HF: the monitor ends rows on EOS itself,
which is what makes ``ignore_eos`` possible without changing the distribution.
Sampling follows the request (OpenAI defaults where it is silent), never the
checkpoint's suggested settings: see ``loading.neutral_generation_config``.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .capture import GenerationCapture
from .steps import StepPlan, placed
from .text import CompletionText

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt's choices. ``temperature == 0`` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and k alternatives
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a token under the model (raw logits, before sampling warpers)."""

    token_id: int
    logprob: float | None  # None only for a prompt's first token, which has no context
    top: tuple[tuple[int, float], ...] = ()  # the k most likely tokens at this step, best first


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


@dataclass
class GenerationResult:
    choices: list[Choice]
    prompt_tokens: int
    capture_manifest: dict | None = None  # set when the job captured activations at every step

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)


@dataclass
class GenerationJob:
    """One prompt to generate from; ``on_delta`` (if set) is called from the worker thread."""

    prompt_ids: list[int]
    params: SamplingParams
    first_index: int = 0  # index of the first choice (several prompts share one response)
    on_delta: Callable[[ChoiceDelta], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    capture: GenerationCapture | None = None  # read activations at every step (capture mode "generate")
    edits: tuple = ()  # interventions (steps.Edit), applied at every step through nnsight
    steps: int = 0  # decode steps run so far (written by the worker)
    first_token_at: float | None = None  # time.monotonic() when the first token was chosen
    memory_bytes: int = 0  # estimated bytes it adds while it runs (KV cache, activations), for batching


class _LogprobRecorder(LogitsProcessor):
    """Keeps log-softmax of this step's raw logits (and its top k) for the monitor to pick from."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.logprobs: torch.Tensor | None = None  # [rows, vocab]
        self.top: tuple[torch.Tensor, torch.Tensor] | None = None  # values, indices: [rows, k]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)
        if self.top_k:
            top = self.logprobs.topk(self.top_k, dim=-1)
            self.top = (top.values, top.indices)
        return scores


@dataclass
class _Row:
    text: CompletionText
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    fed_back: bool = False  # with an extra step: the final token has been through the model too


class _DecodeMonitor(StoppingCriteria):
    """Sees each new token of every row; decides when rows finish; emits deltas."""

    def __init__(
        self,
        job: GenerationJob,
        tokenizer,
        eos_ids: frozenset[int],
        recorder: _LogprobRecorder | None,
        *,
        extra_step: bool = False,
    ) -> None:
        self.job = job
        self.params = job.params
        self.eos_ids = frozenset() if job.params.ignore_eos else eos_ids
        self.recorder = recorder
        # extra_step: report a finished row done one step late, so the model also runs on its
        # final token (a generate-mode capture then has every token of prompt + completion);
        # the token sampled in that step is discarded.
        self.extra_step = extra_step
        self.rows = [_Row(CompletionText(tokenizer, job.params.stop)) for _ in range(job.params.n)]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.job.steps += 1
        if self.job.first_token_at is None:
            self.job.first_token_at = time.monotonic()
        new_tokens = input_ids[:, -1]
        step_logprobs = self._step_logprobs(new_tokens)
        new_tokens = new_tokens.tolist()
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                self._advance(i, row, new_tokens[i], step_logprobs[i] if step_logprobs else None)
            elif self.extra_step:
                row.fed_back = True
        cancelled = self.job.cancelled.is_set()
        done = [
            cancelled or (row.finish_reason is not None and (row.fed_back or not self.extra_step))
            for row in self.rows
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _step_logprobs(self, new_tokens: torch.Tensor) -> list[TokenLogprob] | None:
        if self.recorder is None or self.recorder.logprobs is None:
            return None
        chosen = self.recorder.logprobs.gather(1, new_tokens[:, None])[:, 0].tolist()
        ids = new_tokens.tolist()
        if self.recorder.top is None:
            return [TokenLogprob(t, lp) for t, lp in zip(ids, chosen, strict=True)]
        values, indices = (x.tolist() for x in self.recorder.top)
        return [
            TokenLogprob(t, lp, tuple(zip(idx, val, strict=True)))
            for t, lp, idx, val in zip(ids, chosen, indices, values, strict=True)
        ]

    def _advance(self, i: int, row: _Row, token: int, logprob: TokenLogprob | None) -> None:
        row.token_ids.append(token)
        if logprob is not None:
            row.logprobs.append(logprob)
        if token in self.eos_ids:
            row.finish_reason = FINISH_STOP
        elif row.text.append(token):
            row.finish_reason = FINISH_STOP
        elif len(row.token_ids) >= self.params.max_tokens:
            row.finish_reason = FINISH_LENGTH
        if row.finish_reason is not None:
            row.text.finish()
        self._emit(i, row, (logprob,) if logprob is not None else ())

    def _emit(self, i: int, row: _Row, logprobs: tuple[TokenLogprob, ...]) -> None:
        if self.job.on_delta is None:
            return
        text = row.text.take_delta()
        if text or logprobs or row.finish_reason:
            self.job.on_delta(ChoiceDelta(self.job.first_index + i, text, logprobs, row.finish_reason))

    def result(self, with_logprobs: bool) -> GenerationResult:
        """The job's choices as they ended."""
        choices = [
            Choice(
                index=self.job.first_index + i,
                text=row.text.text,
                token_ids=row.token_ids,
                finish_reason=row.finish_reason,
                logprobs=row.logprobs if with_logprobs else None,
            )
            for i, row in enumerate(self.rows)
        ]
        return GenerationResult(choices=choices, prompt_tokens=len(self.job.prompt_ids))

    def finish_unfinished(self) -> None:
        """Rows HF stopped without our say (its own max length): they ran out of tokens."""
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                row.finish_reason = FINISH_LENGTH
                row.text.finish()
                self._emit(i, row, ())


def generation_config_for(
    params: SamplingParams, pad_token_id: int, extra_step: bool = False
) -> GenerationConfig:
    """An explicit HF generation config: every sampling knob set from the request."""
    sampling = (
        {"do_sample": False}
        if params.greedy
        else {
            "do_sample": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
        }
    )
    return GenerationConfig(
        max_new_tokens=params.max_tokens + extra_step,
        num_beams=1,
        pad_token_id=pad_token_id,
        repetition_penalty=1.0,
        **sampling,
    )


def run_generation(
    hf_model: torch.nn.Module, tokenizer, eos_ids: frozenset[int], job: GenerationJob, wrapper=None
) -> GenerationResult:
    """Run one job to completion on the calling (worker) thread.

    Plain jobs call the HF module's own ``generate``. A job with a ``capture``
    runs the same ``generate`` through the nnsight wrapper (the same module),
    handing every forward step's planned values to the capture as they happen.
    """
    params = job.params
    capture = job.capture
    traced = capture is not None or bool(job.edits)
    if traced and wrapper is None:
        raise ValueError("a job that captures or intervenes needs the nnsight wrapper")
    device = next(hf_model.parameters()).device
    input_ids = torch.tensor([job.prompt_ids] * params.n, dtype=torch.long, device=device)
    recorder = _LogprobRecorder(params.logprobs) if params.logprobs is not None else None
    extra_step = capture is not None
    monitor = _DecodeMonitor(job, tokenizer, eos_ids, recorder, extra_step=extra_step)
    if not job.cancelled.is_set() and params.max_tokens > 0:  # 0: echo-only completions
        kwargs = dict(
            attention_mask=torch.ones_like(input_ids),
            generation_config=generation_config_for(params, tokenizer.pad_token_id, extra_step),
            stopping_criteria=StoppingCriteriaList([monitor]),
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
        )
        if params.seed is None or params.greedy:
            _generate(hf_model, wrapper, input_ids, kwargs, job)
        else:
            # manual_seed reseeds every CUDA device, so every one is restored afterwards.
            devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(params.seed)
                _generate(hf_model, wrapper, input_ids, kwargs, job)
    if job.cancelled.is_set():
        logger.info("generation cancelled after %d step(s) of %d", job.steps, params.max_tokens)
    monitor.finish_unfinished()
    return monitor.result(with_logprobs=recorder is not None)


def _generate(hf_model, wrapper, input_ids: torch.Tensor, kwargs: dict, job: GenerationJob) -> None:
    capture = job.capture
    if capture is None and not job.edits:
        hf_model.generate(input_ids=input_ids, **kwargs)
        return
    steps = StepPlan(capture.plan.points if capture else (), placed(job.edits, hf_model), input_ids.shape[1])
    with warnings.catch_warnings():
        # The loop below is open-ended by design (the run decides how many steps there are);
        # nnsight warns when such a loop is cut short by the end of generation.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with wrapper.generate(input_ids, **kwargs) as tracer:
            for _ in tracer.all():
                values = steps.run_step(wrapper)
                if capture is not None:
                    capture.on_step(values)
