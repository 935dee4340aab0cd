"""Several generation jobs decoded together, each as if it ran alone.

:func:`run_batched_generation` runs the jobs of one batch through one
:class:`~server.engine.decode.DecodeBatch` over the served wrapper (left padding,
one KV cache, position ids from the mask). Every job keeps what makes it itself:

* its own :class:`~server.engine.generation._DecodeMonitor` (EOS, stop strings,
  ``max_tokens``, cancellation, text, streamed deltas) and, when logprobs are asked
  for, its own log-softmax of the raw logits: the same objects as a job alone;
* its own interventions, applied to its rows only at its rows' own positions, and its
  own generate-mode capture, fed its row's values without the padding
  (:class:`~server.engine.steps.BatchStepPlan`); a capturing job runs one extra step
  so its final token is captured too, as alone;
* its own sampling: HF's warpers with its own temperature, top-p and top-k, then one
  ``torch.multinomial`` draw over its ``n`` rows from its own generator (seeded
  ``seed``), exactly as HF ``generate`` draws for that job alone after
  ``torch.manual_seed(seed)``. A job's rows stay in the batch until all of them are
  done (HF keeps finished rows of a batch too), so its draws consume its generator
  exactly as they would alone.

A job leaves the batch (its rows and their cache rows go) as soon as it is done, so
it stops costing compute, and is answered then; jobs that arrive meanwhile join at the
next step (``take_more``; see :func:`run_batched_generation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .decode import DecodeBatch
from .generation import GenerationJob, GenerationResult, _DecodeMonitor, _LogprobRecorder
from .sampling import warp
from .steps import BatchMember, BatchStepPlan, placed

logger = logging.getLogger(__name__)


class _Member:
    """One job's place in the batch and its per-job decoding state."""

    def __init__(self, job: GenerationJob, tokenizer, eos_ids: frozenset[int], device: torch.device) -> None:
        params = job.params
        self.job = job
        self.recorder = _LogprobRecorder(params.logprobs) if params.logprobs is not None else None
        self.monitor = _DecodeMonitor(
            job, tokenizer, eos_ids, self.recorder, extra_step=job.capture is not None
        )
        self.step_member = None  # its steps.BatchMember, once it is in a batch
        self.error: BaseException | None = None
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def choose_or_fail(self, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`choose`, or (its own failure, e.g. NaN logits from its edits) a placeholder
        token with the error kept: this job leaves, the others go on."""
        try:
            return self.choose(logits)
        except Exception as exc:
            self.error = self.error or exc
            return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """This job's next token for each of its rows, from its rows' float32 logits."""
        params = self.job.params
        if self.recorder is not None:
            self.recorder(None, logits)
        if params.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(warp(logits, params), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)

    def result(self) -> GenerationResult:
        return self.monitor.result(with_logprobs=self.recorder is not None)


def batchable(job: GenerationJob) -> bool:
    """Whether a job can share a batch: anything that generates (a capture records one choice)."""
    return job.params.max_tokens > 0 and (job.capture is None or job.params.n == 1)


def run_batched_generation(
    wrapper,
    tokenizer,
    eos_ids: frozenset[int],
    jobs: list[GenerationJob],
    *,
    on_done: Callable[[GenerationJob, GenerationResult | BaseException], None] | None = None,
    take_more: Callable[[int], list[GenerationJob]] | None = None,
    max_rows: int | None = None,
) -> list[GenerationResult | BaseException]:
    """Run jobs together on the calling (worker) thread; returns every job's outcome, in order.

    ``on_done(job, outcome)`` is called as soon as a job ends, so its request is answered then,
    not when the batch ends. Before each step, ``take_more(free_rows)`` may hand over jobs that
    arrived meanwhile (at most ``max_rows`` rows in all): they run their prompts as a batch of
    their own for that step, then join this batch (``DecodeBatch.merge``).

    A job whose own part fails (its capture cannot be written, its stream is gone) leaves the
    batch with its exception as its outcome; the others go on. A failure of the forward pass
    itself (out of memory) fails every job still in the batch."""
    device = next(wrapper._module.parameters()).device
    outcomes: dict[int, GenerationResult | BaseException] = {}
    order: list[GenerationJob] = []  # kept only without on_done
    running: dict[int, GenerationJob] = {}  # jobs that have not ended

    def finish(member: _Member) -> None:
        if member.error is None:
            try:
                member.monitor.finish_unfinished()
            except Exception as exc:  # e.g. its stream's event loop is gone
                member.error = exc
        outcome = member.error if member.error is not None else member.result()
        running.pop(id(member.job), None)
        if on_done is None:  # with on_done nothing is kept: a batch may live on for hours
            outcomes[id(member.job)] = outcome
        else:
            on_done(member.job, outcome)

    def start(new_jobs: list[GenerationJob]) -> _Group | None:
        if not all(batchable(job) for job in new_jobs):
            raise ValueError("a job that generates nothing, or captures several choices, runs alone")
        if on_done is None:
            order.extend(new_jobs)
        running.update((id(job), job) for job in new_jobs)
        members = [_Member(job, tokenizer, eos_ids, device) for job in new_jobs]
        for member in members:
            if member.job.cancelled.is_set():  # gone while it waited
                finish(member)
        live = [m for m in members if not m.job.cancelled.is_set()]
        return _Group(wrapper, tokenizer.pad_token_id, live) if live else None

    group = start(jobs)
    try:
        while group is not None:
            free = (max_rows or 0) - group.rows
            newcomers = take_more(free) if take_more is not None and free > 0 and group.can_merge else []
            for member in group.step():
                finish(member)
            joining = start(newcomers) if newcomers else None
            if joining is not None:
                for member in joining.step():
                    finish(member)
            group = _Group.combine(group, joining)
    except BaseException as exc:
        for key, job in list(running.items()):
            outcomes[key] = exc
            if on_done is not None:
                on_done(job, exc)
        raise
    return [outcomes[id(job)] for job in order]


class _Group:
    """Jobs decoding together: one DecodeBatch, the jobs' rows in order."""

    def __init__(self, wrapper, pad_token_id: int, members: list[_Member]) -> None:
        prompts = [m.job.prompt_ids for m in members for _ in range(m.job.params.n)]
        plan = _plan(members, prompts, wrapper._module)
        self.batch = DecodeBatch(wrapper, prompts, pad_token_id, plan=plan)
        for member, step_member in zip(members, plan.members, strict=True):
            member.step_member = step_member
        self.members = members

    @property
    def rows(self) -> int:
        return self.batch.rows

    @property
    def can_merge(self) -> bool:
        return self.batch.can_merge

    def step(self) -> list[_Member]:
        """One forward step and each job's next tokens; returns the jobs that ended (gone from it)."""
        logits = self.batch.forward()
        tokens, still, ended, start = [], [], [], 0
        for member in self.members:
            n = member.job.params.n
            chosen = member.choose_or_fail(logits[start : start + n])
            tokens.append(chosen)
            member.error = member.error or member.step_member.error
            done = True
            if member.error is None:
                try:
                    done = bool(member.monitor(chosen[:, None], None).all())
                except Exception as exc:  # e.g. its stream's event loop is gone: this job alone fails
                    member.error = exc
            (ended if done else still).append((member, start))
            start += n
        next_tokens = torch.cat(tokens)
        if ended:
            keep = [r for member, s in still for r in range(s, s + member.job.params.n)]
            if keep:
                self.batch.keep(keep)
                next_tokens = next_tokens[keep]
            self.members = [member for member, _ in still]
        if self.members:
            self.batch.append(next_tokens)
        return [member for member, _ in ended]

    @staticmethod
    def combine(group: _Group | None, joining: _Group | None) -> _Group | None:
        """One group of whatever is still running in either."""
        group = group if group is not None and group.members else None
        joining = joining if joining is not None and joining.members else None
        if group is None or joining is None:
            return group or joining
        group.batch.merge(joining.batch)
        group.members += joining.members
        return group


def _plan(active: list[_Member], prompts: list[list[int]], model: torch.nn.Module) -> BatchStepPlan:
    """Each job's edits and capture on its own rows (a job with neither reads nothing)."""
    members, start = [], 0
    for m in active:
        n = m.job.params.n
        members.append(
            BatchMember(
                rows=list(range(start, start + n)),
                edits=placed(m.job.edits, model),
                capture=m.job.capture,
                prompt_len=len(m.job.prompt_ids),
            )
        )
        start += n
    return BatchStepPlan(members, max(len(p) for p in prompts))
