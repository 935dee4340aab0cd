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
it stops costing compute; jobs that arrive meanwhile wait for the next batch.
"""

from __future__ import annotations

import logging

import torch

from .decode import DecodeBatch
from .generation import Choice, GenerationJob, GenerationResult, _DecodeMonitor, _LogprobRecorder
from .sampling import warp
from .steps import BatchMember, BatchStepPlan

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
        self.step_member = None  # its steps.BatchMember when the batch has a plan
        self.error: BaseException | None = None
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

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
        job = self.job
        choices = [
            Choice(
                index=job.first_index + i,
                text=row.text.text,
                token_ids=row.token_ids,
                finish_reason=row.finish_reason,
                logprobs=row.logprobs if self.recorder else None,
            )
            for i, row in enumerate(self.monitor.rows)
        ]
        return GenerationResult(choices=choices, prompt_tokens=len(job.prompt_ids))


def batchable(job: GenerationJob) -> bool:
    """Whether a job can share a batch: anything that generates (a capture records one choice)."""
    return job.params.max_tokens > 0 and (job.capture is None or job.params.n == 1)


def run_batched_generation(
    wrapper, tokenizer, eos_ids: frozenset[int], jobs: list[GenerationJob]
) -> list[GenerationResult | BaseException]:
    """Run jobs together on the calling (worker) thread; one result per job, in order.

    A job whose own part fails (its capture cannot be written, its stream is gone) leaves the
    batch and gets its exception in its slot; the others go on. A failure of the forward pass
    itself (out of memory) fails the whole batch."""
    if not all(batchable(job) for job in jobs):
        raise ValueError("a job that generates nothing, or captures several choices, runs alone")
    device = next(wrapper._module.parameters()).device
    members = [_Member(job, tokenizer, eos_ids, device) for job in jobs]
    active = [m for m in members if not m.job.cancelled.is_set()]  # gone while it waited
    if active:
        prompts = [m.job.prompt_ids for m in active for _ in range(m.job.params.n)]
        plan = _plan(active, prompts)
        batch = DecodeBatch(wrapper, prompts, tokenizer.pad_token_id, plan=plan)
        if plan is not None:
            for member, step_member in zip(active, plan.members, strict=True):
                member.step_member = step_member
    while active:
        logits = batch.forward()
        tokens, still, start = [], [], 0
        for member in active:
            n = member.job.params.n
            chosen = member.choose(logits[start : start + n])
            tokens.append(chosen)
            member.error = member.error or (member.step_member and member.step_member.error)
            if member.error is None:
                try:
                    done = bool(member.monitor(chosen[:, None], None).all())
                except Exception as exc:  # e.g. its stream's event loop is gone: this job alone fails
                    member.error, done = exc, True
            if member.error is None and not done:
                still.append((member, start))
            start += n
        next_tokens = torch.cat(tokens)
        if len(still) < len(active):
            keep = [r for member, s in still for r in range(s, s + member.job.params.n)]
            if keep:
                batch.keep(keep)
                next_tokens = next_tokens[keep]
            active = [member for member, _ in still]
        if active:
            batch.append(next_tokens)
    results: list[GenerationResult | BaseException] = []
    for member in members:
        if member.error is not None:
            results.append(member.error)
            continue
        member.monitor.finish_unfinished()
        results.append(member.result())
    return results


def _plan(active: list[_Member], prompts: list[list[int]]) -> BatchStepPlan | None:
    """Each job's edits and capture on its own rows, or None when no job has any."""
    if all(m.job.capture is None and not m.job.edits for m in active):
        return None
    members, start = [], 0
    for m in active:
        n = m.job.params.n
        members.append(
            BatchMember(rows=list(range(start, start + n)), edits=m.job.edits, capture=m.job.capture)
        )
        start += n
    return BatchStepPlan(members, max(len(p) for p in prompts))
