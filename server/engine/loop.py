"""The one decode loop: every generation job, alone or batched, plain, captured, steered or LDA.

:class:`DecodeLoop` runs jobs (``job.GenerationJob``) over a runtime (``runtime.py``)
on the calling (worker) thread. A job alone is a batch of one that later jobs join;
there is no other path. Each step:

1. every *lane* runs one forward step (``RuntimeBatch.forward``): a lane is one runtime
   batch on one set of weights. Every job has its rows on the ``served`` lane; an LDA
   job also has its before side's rows on the lane of its before weights
   (``served``-as-is, ``adapter_off`` or ``before_model``), with its own prompt and cache;
2. each job turns its rows' logits into next tokens with the one sampler
   (``sampler.py``: LDA first amplifies, ``lda.amplify``) from its own generator, and
   its :class:`~server.engine.job.RowState` objects take them (text, logprobs or LDA
   stats, and the one end-of-row rule); deltas go out through ``job.on_delta``;
3. jobs that ended leave every lane (their rows and cache rows go) and are answered at
   once through ``on_done``; the others' tokens become the next input.

Before each step, ``take_more(free_rows)`` may hand over jobs that arrived meanwhile:
they run their prompts as a cohort of their own for one step, then merge into the
running one lane by lane (``RuntimeBatch.merge``).

A job that captures (``capture.CaptureSpec``) gets its reads planned on its rows; the
runtime hands the values to its :class:`~server.engine.capture.CaptureRecorder`. In
generate mode the job stays one extra step after its rows end, so its final token is fed
in (and recorded) too; that step's sampled token is discarded. In trace mode only the
prompt step is read, and the capture is written (manifest and all) right after it, so a
stream can name it before the first token.

A job whose own part fails (NaN logits from its edits, its capture cannot be written,
its stream is gone) leaves with its exception as its outcome; the others go on. A
failure of a forward pass itself (out of memory) fails every job in the loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .capture import CaptureRecorder, CaptureResult
from .constraints import Constraints, GrammarError
from .interrupt import JobInterrupted
from .job import ChoiceDelta, GenerationJob, GenerationResult, RowState, TokenStats
from .lda import amplify, token_stats
from .runtime import RowGroup, Runtime, RuntimeBatch
from .sampler import chosen_logprobs, finite_rows, generator_for, non_finite, process, sample

logger = logging.getLogger(__name__)

Outcome = GenerationResult | BaseException


class _Running:
    """A job inside the loop: its rows, its generator, its capture, its groups on each lane."""

    def __init__(self, job: GenerationJob, loop: DecodeLoop) -> None:
        self.job = job
        self.rows = RowState.for_job(job, loop.tokenizer, loop.eos_ids)
        self.generator = generator_for(job.params, loop.runtime.device)
        self.constraints = loop.constraints
        # where a logits processor reads the tokens so far: [n, prompt + max_tokens], filled as
        # they are chosen (choose() passes the filled part)
        self.history = None
        if job.params.needs_history:
            prompt = torch.tensor(list(job.prompt_ids), device=loop.runtime.device)
            self.history = torch.zeros(
                (job.params.n, len(prompt) + job.params.max_tokens),
                dtype=torch.long,
                device=loop.runtime.device,
            )
            self.history[:, : len(prompt)] = prompt
        self.recorder = (
            CaptureRecorder(job.capture, len(job.prompt_ids), loop.capture_facts(job), job.params.max_tokens)
            if job.capture is not None
            else None
        )
        self.capture: CaptureResult | None = None
        self.error: BaseException | None = None
        self.matchers = None  # one grammar matcher per row, where the job is constrained
        if job.params.grammar:
            try:
                self.matchers = self.constraints.matchers(job.params.grammar, job.params.n)
            except GrammarError as exc:
                self.error = exc
        self.forwards = 0  # forward steps its rows went through
        self.finished_at: int | None = 0 if job.params.max_tokens == 0 else None  # forwards then
        self.token_text = loop.token_text
        self.device = loop.runtime.device
        edits = loop.runtime.place(job.edits) if job.edits else ()
        recorder = self.recorder
        self.after = RowGroup(
            job.prompt_ids,
            job.params.n,
            edits=edits,
            reads=recorder.plan.reads if recorder else (),
            patterns=recorder.plan.patterns if recorder else (),
            pattern_rows=recorder.pattern_rows if recorder else None,
            read_steps=recorder.reads_steps if recorder else None,
            on_values=recorder.on_step if recorder else None,
            full_logits=recorder is not None and loop.wants_full_logits(recorder.plan.points),
        )
        self.before = RowGroup(job.lda.prompt_ids, job.params.n) if job.lda is not None else None
        if job.params.max_tokens == 0:  # echo-only: nothing to generate (a capture still reads)
            try:
                for i, row in enumerate(self.rows):
                    row.finish()
                    self.emit(i, row)
            except Exception as exc:  # its stream is gone
                self.error = exc

    def groups(self) -> dict[str, RowGroup]:
        """Its row groups by lane."""
        lanes = {"served": self.after}
        if self.before is not None:
            lanes[self.job.lda.weights + ":before"] = self.before
        return lanes

    @property
    def all_finished(self) -> bool:
        return all(row.finished for row in self.rows)

    @property
    def done(self) -> bool:
        if self.job.cancelled.is_set() or self.error is not None:
            return True
        if not self.all_finished:
            return False
        if self.recorder is None:
            return True
        if self.recorder.trace:
            return self.forwards >= 1
        return self.forwards > self.finished_at  # its final token was fed in too

    def choose(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Its next token per row from this step's logits (``[n, vocab]`` per lane); advances rows."""
        job, params = self.job, self.job.params
        n = params.n
        after = logits["served"]
        flags = [finite_rows(after)]  # read back with the tokens: no extra host sync
        if job.lda is not None:
            before = logits[job.lda.weights + ":before"].to(after.device)
            flags.append(finite_rows(before))
            scores = amplify(after, before, job.lda.alpha)
        else:
            before, scores = None, after
        prompt_len = len(job.prompt_ids)
        history = None if self.history is None else self.history[:, : prompt_len + job.steps]
        scores = process(scores, params, history, prompt_len, self.rows[0].stop_ids, job.steps)
        active = [not row.finished for row in self.rows]
        if self.matchers is not None:
            allowed = self.constraints.allowed(self.matchers, active).to(scores.device, non_blocking=True)
            scores = scores.masked_fill(~allowed, float("-inf"))
        if not params.greedy:  # a NaN row would make multinomial raise before it is reported
            scores = torch.where(torch.stack(flags).all(0)[:, None], scores, torch.zeros_like(scores[:1]))
        tokens, sampled = sample(scores, params, self.generator)
        flags[0] = flags[0] & sampled
        host = torch.cat([tokens, *(f.long() for f in flags)]).tolist()
        if not all(host[n : 2 * n]):
            raise non_finite(step=job.steps, edits=job.edits, side="after" if job.lda else "")
        if job.lda is not None and not all(host[2 * n :]):
            raise non_finite(step=job.steps, side="before")
        chosen = host[:n]
        if self.matchers is not None:
            self.constraints.advance(self.matchers, chosen, active)
        stats = token_stats(after, before, tokens) if before is not None and job.lda.token_stats else None
        if self.history is not None:
            self.history[:, prompt_len + job.steps] = tokens
        logprobs = chosen_logprobs(after, tokens, params.logprobs) if params.logprobs is not None else None
        job.steps += 1
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        for i, (row, token) in enumerate(zip(self.rows, chosen, strict=True)):
            if row.finished:
                continue
            logprob = logprobs[i] if logprobs else None
            row.advance(token, logprob, TokenStats(token, *stats[i]) if stats else None)
            self.emit(i, row, (logprob,) if logprob is not None else ())
        if self.all_finished:
            self.finished_at = self.forwards
        return tokens

    def finish_trace_capture(self) -> None:
        """Write a trace-mode capture right after the prompt step, and say so (``on_capture``)."""
        if self.error is not None or self.job.cancelled.is_set():
            return
        try:
            self.write_capture(list(self.job.prompt_ids))
            if self.job.on_capture is not None:
                self.job.on_capture(self.capture)
        except JobInterrupted:  # cancelled while its files were written: it ends as cancelled
            pass
        except Exception as exc:  # its storage failure, or its stream is gone
            self.error = exc

    def write_capture(self, ids: list[int]) -> None:
        """Close the capture's files and write its manifest; ``ids``: every position fed in.
        Raises JobInterrupted if the job is cancelled between two files."""
        tokens = [self.token_text(t) for t in ids]
        self.capture = self.recorder.finish(ids, tokens, stop=self.job.cancelled.is_set)

    def placeholders(self) -> torch.Tensor:
        """Next input for rows that sample nothing more (the job leaves before it is used)."""
        return torch.zeros(self.job.params.n, dtype=torch.long, device=self.device)

    def emit(self, i: int, row: RowState, logprobs: tuple = ()) -> None:
        if self.job.on_delta is None:
            return
        text = row.text.take_delta()
        if text or logprobs or row.finish_reason:
            self.job.on_delta(ChoiceDelta(self.job.first_index + i, text, logprobs, row.finish_reason))


class _Lane:
    """One runtime batch and the jobs with rows on it, in row order."""

    def __init__(self, batch: RuntimeBatch, members: list[_Running]) -> None:
        self.batch = batch
        self.members = members


class _Cohort:
    """Jobs decoding together: one lane per set of weights in use, the jobs in join order."""

    def __init__(self, loop: DecodeLoop, jobs: list[_Running]) -> None:
        self.jobs = jobs
        self.runtime = loop.runtime
        self.lanes: dict[str, _Lane] = {}
        by_lane: dict[str, list[_Running]] = {}
        for running in jobs:
            for key in running.groups():
                by_lane.setdefault(key, []).append(running)
        for key, members in by_lane.items():
            weights = key.removesuffix(":before")
            groups = [m.groups()[key] for m in members]
            self.lanes[key] = _Lane(loop.runtime.start(weights, groups), members)

    @property
    def rows(self) -> int:
        return sum(lane.batch.rows for lane in self.lanes.values())

    @property
    def can_merge(self) -> bool:
        return all(lane.batch.can_merge for lane in self.lanes.values())

    def step(self) -> list[_Running]:
        """One forward step on every lane and each job's next tokens; returns the jobs that ended
        (gone from every lane)."""
        logits: dict[int, dict[str, torch.Tensor]] = {id(r): {} for r in self.jobs}
        try:
            with self.runtime.interrupted_when(self._all_cancelled):
                for key, lane in self.lanes.items():
                    out = lane.batch.forward()
                    start = 0
                    for member in lane.members:
                        n = member.job.params.n
                        logits[id(member)][key] = out[start : start + n]
                        start += n
        except JobInterrupted:  # every job here was cancelled mid-forward: all end, as cancelled
            ended, self.jobs, self.lanes = self.jobs, [], {}
            return ended
        tokens: dict[int, torch.Tensor] = {}
        cancelled = {id(r) for r in self.jobs if r.job.cancelled.is_set()}  # as the step began
        for running in self.jobs:
            running.forwards += 1
            running.error = running.error or running.after.error
            if running.forwards == 1 and running.recorder is not None and running.recorder.trace:
                running.finish_trace_capture()  # before its first token: a stream names it first
            if running.error is None and not running.all_finished and id(running) not in cancelled:
                try:
                    tokens[id(running)] = running.choose(logits[id(running)])
                except Exception as exc:  # its own failure (NaN logits, its stream is gone)
                    running.error = exc
        ended = [r for r in self.jobs if r.done]
        if ended:
            gone = {id(r) for r in ended}
            self.jobs = [r for r in self.jobs if id(r) not in gone]
            for key, lane in list(self.lanes.items()):
                keep, start = [], 0
                for member in lane.members:
                    n = member.job.params.n
                    if id(member) not in gone:
                        keep.extend(range(start, start + n))
                    start += n
                lane.members = [m for m in lane.members if id(m) not in gone]
                if not lane.members:
                    del self.lanes[key]
                else:
                    lane.batch.keep(keep)
        for lane in self.lanes.values():
            lane.batch.append(torch.cat([_tokens_for(member, tokens) for member in lane.members]))
        return ended

    def _all_cancelled(self) -> bool:
        return all(running.job.cancelled.is_set() for running in self.jobs)

    def absorb(self, other: _Cohort | None) -> None:
        """Take ``other``'s jobs (both just stepped): lane by lane, its rows after this cohort's."""
        if other is None:
            return
        for key, lane in other.lanes.items():
            if key in self.lanes:
                self.lanes[key].batch.merge(lane.batch)
                self.lanes[key].members += lane.members
            else:
                self.lanes[key] = lane
        self.jobs += other.jobs


def _tokens_for(running: _Running, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
    """Its rows' next input: the tokens it chose this step."""
    chosen = tokens.get(id(running))
    return running.placeholders() if chosen is None else chosen


class DecodeLoop:
    """Runs generation jobs over a runtime, each as if it ran alone (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        tokenizer,
        eos_ids: frozenset[int],
        *,
        token_text: Callable[[int], str],
        manifest_facts: dict[str, Any] | None = None,
        logits_module: str | None = None,
        constraints: Constraints | None = None,
    ) -> None:
        """``tokenizer``: decodes generated tokens (the worker's own copy); ``token_text``: one
        token's text, for capture manifests; ``manifest_facts``: what every capture manifest
        says of the served model (model id, dtype, adapter); ``logits_module``: the module
        whose output is the logits (a capture of it needs every position's logits);
        ``constraints``: what constrained jobs (``SamplingParams.grammar``) are followed with."""
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.token_text = token_text
        self.manifest_facts = manifest_facts or {}
        self.logits_module = logits_module
        self.constraints = constraints

    def wants_full_logits(self, points) -> bool:
        return any(p.module_path == self.logits_module and p.kind == "output" for p in points)

    def capture_facts(self, job: GenerationJob) -> dict[str, Any]:
        """What a capture's manifest says besides its tensors: the model and how it sampled."""
        return {**self.manifest_facts, "sampling": job.params.manifest()}

    def run(
        self,
        jobs: list[GenerationJob],
        *,
        on_done: Callable[[GenerationJob, Outcome], None] | None = None,
        take_more: Callable[[int], list[GenerationJob]] | None = None,
        max_rows: int | None = None,
    ) -> list[Outcome]:
        """Run ``jobs`` (and those ``take_more`` hands over) to their ends; returns each outcome
        in order (without ``on_done``; with it, each job is handed over the moment it ends and
        nothing is kept: a loop may live on for hours under steady traffic)."""
        outcomes: dict[int, Outcome] = {}
        order: list[GenerationJob] = []
        running: dict[int, _Running] = {}

        def finish(member: _Running) -> None:
            outcome = self._outcome(member)
            running.pop(id(member.job), None)
            if on_done is None:
                outcomes[id(member.job)] = outcome
            else:
                on_done(member.job, outcome)

        def start(new_jobs: list[GenerationJob]) -> _Cohort | None:
            if on_done is None:
                order.extend(new_jobs)
            members = []
            for job in new_jobs:
                member = _Running(job, self)
                running[id(job)] = member
                if member.done:  # cancelled while it waited, or nothing to generate or read
                    finish(member)
                else:
                    members.append(member)
            return _Cohort(self, members) if members else None

        try:
            cohort = start(jobs)
            while cohort is not None:
                free = (max_rows or 0) - cohort.rows
                newcomers = take_more(free) if take_more is not None and free > 0 and cohort.can_merge else []
                for member in cohort.step():
                    finish(member)
                joining = start(newcomers) if newcomers else None
                if joining is not None:
                    for member in joining.step():
                        finish(member)
                cohort = _merged(cohort, joining)
        except BaseException as exc:
            for member in list(running.values()):
                self._abort_capture(member)
                outcomes[id(member.job)] = exc
                if on_done is not None:
                    on_done(member.job, exc)
            raise
        return [outcomes[id(job)] for job in order]

    def _outcome(self, member: _Running) -> Outcome:
        """The job's result (its capture finished), or its own error (its capture removed)."""
        job = member.job
        if member.error is None:
            try:
                for i, row in enumerate(member.rows):
                    if not row.finished:  # cancelled, or ended without its own say
                        row.finish()
                        member.emit(i, row)
            except Exception as exc:  # e.g. its stream's event loop is gone
                member.error = exc
        if member.error is None and not job.cancelled.is_set() and member.recorder is not None:
            if not member.recorder.trace:
                try:
                    member.write_capture(job.prompt_ids + member.rows[0].token_ids)
                except Exception as exc:  # one job's storage failure is that job's alone
                    member.error = exc
        if member.error is not None or job.cancelled.is_set():
            self._abort_capture(member)
            if job.cancelled.is_set() and member.error is None:
                logger.info("generation cancelled after %d step(s) of %d", job.steps, job.params.max_tokens)
        if member.error is not None:
            return member.error
        with_logprobs = job.params.logprobs is not None
        with_stats = job.lda is not None and job.lda.token_stats
        return GenerationResult(
            choices=[
                row.choice(job.first_index + i, with_logprobs, with_stats)
                for i, row in enumerate(member.rows)
            ],
            prompt_tokens=len(job.prompt_ids),
            capture=member.capture,
        )

    def _abort_capture(self, member: _Running) -> None:
        """Remove what its capture wrote, unless a trace-mode capture's id already went out."""
        recorder = member.recorder
        if recorder is None:
            return
        if member.capture is None:
            recorder.abort()
        elif member.job.on_capture is None:  # written, but nobody was told its id
            with contextlib.suppress(KeyError):
                recorder.spec.sink.delete(member.capture.id)
        member.capture = None


def _merged(cohort: _Cohort, joining: _Cohort | None) -> _Cohort | None:
    """One cohort of whatever is still running in either."""
    cohort = cohort if cohort.jobs else None
    joining = joining if joining is not None and joining.jobs else None
    if cohort is None or joining is None:
        return cohort or joining
    cohort.absorb(joining)
    return cohort
