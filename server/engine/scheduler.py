"""The engine's one worker thread and the bounded queue in front of it.

Everything that touches the model goes through :class:`Scheduler`: generation
jobs, and any other model work (prompt capture, scoring, LDA, contrastive
vectors) as plain calls. One thread runs them, so the model is never touched
concurrently and the asyncio event loop never runs model code.

Batching strategy. The worker takes the oldest item. If it is a batchable
generation job (anything that generates; see ``batched.batchable``),
it gathers more batchable jobs from the queue, in arrival order, until the batch
holds ``max_batch_size`` rows (a job of ``n`` choices is ``n`` rows) or its
memory estimate fills ``memory_room``; until the batch is full it waits up to
``batch_window_s`` for more. Other items keep their place in the queue and run
after the batch (joining stops at the first of them, so the batch drains). A batch
runs to completion: a job that finishes early leaves it at once (it stops costing
compute), and jobs that arrive while it runs join it at the next step, while it has
rows to spare (their prompts run as a batch of their own for one step, then the two
merge: ``DecodeBatch.merge``). A batch of one job runs the single-job path (HF
``generate``), which nothing can join: jobs that arrive during it wait for it.

Log lines: each item runs in the context it was submitted from (``contextvars``), so what
the worker logs about a request carries that request's id (``server.logs``); a batch runs
under the ids of all its jobs, joined by ``+``.

Limits: at most ``max_queue`` items wait before a generation job is refused
(:class:`QueueFull`, a 429 with ``Retry-After``); a job cancelled while it waits
is skipped.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..logs import request_id
from .batched import batchable
from .generation import GenerationJob, GenerationResult

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass
class _Item:
    future: Future
    job: GenerationJob | None = None  # a generation job, or
    call: Callable | None = None  # any other model work, run alone
    enqueued: float = field(default_factory=time.monotonic)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)  # the submitter's

    @property
    def rows(self) -> int:
        return self.job.params.n if self.job is not None else 0


@dataclass
class BatchStats:
    """What the worker has done: batches run and the rows in each (read by tests and benchmarks)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size (jobs) -> how many batches
    joined: int = 0  # jobs that joined a batch already running
    peak_rows: int = 0  # most rows decoding at once

    def record(self, jobs: int, rows: int) -> None:
        self.batches += 1
        self.rows += rows
        self.peak_rows = max(self.peak_rows, rows)
        self.largest = max(self.largest, jobs)
        self.sizes[jobs] = self.sizes.get(jobs, 0) + 1


class Scheduler:
    def __init__(
        self,
        run_one: Callable[[GenerationJob], GenerationResult] | None = None,
        run_batch: Callable[[list[GenerationJob], Callable, Callable[[int], list[GenerationJob]]], None]
        | None = None,
        *,
        max_batch_size: int = 8,
        batch_window_s: float = 0.01,
        max_queue: int = 64,
        memory_room: int | None = None,
        batch_memory: Callable[[list[GenerationJob]], int] | None = None,
    ) -> None:
        self._run_one = run_one
        # Bytes a batch of jobs adds beside the weights (rows padded to the longest prompt);
        # default: the sum of the jobs' own estimates.
        self._batch_memory = batch_memory or (lambda jobs: sum(job.memory_bytes for job in jobs))
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self.memory_room = memory_room  # bytes a batch's jobs may add together (None: no limit)
        self.stats = BatchStats()
        self._queue: deque[_Item] = deque()
        self._condition = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="engine", daemon=True)
        self._thread.start()

    def bind(self, run_one, run_batch, batch_memory=None) -> None:
        """Set how generation jobs run (an engine built on this scheduler's own thread calls it)."""
        self._run_one = run_one
        self._run_batch = run_batch
        if batch_memory is not None:
            self._batch_memory = batch_memory

    # -- submitting (any thread) ---------------------------------------------------------

    @property
    def thread_id(self) -> int | None:
        """The worker thread's identifier: the one thread that runs the model."""
        return self._thread.ident

    @property
    def depth(self) -> int:
        """Items waiting (not counting what runs)."""
        return len(self._queue)

    def room(self) -> int:
        """How many more generation jobs the queue takes now (requests that are gone don't count)."""
        with self._condition:
            self._drop_cancelled()
            return max(0, self.max_queue - len(self._queue))

    def submit_job(self, job: GenerationJob) -> Future:
        """Queue a generation job; :class:`QueueFull` when ``max_queue`` items already wait."""
        return self._put(_Item(Future(), job=job), bounded=True)

    def submit_call(self, fn: Callable, *args) -> Future:
        """Queue other model work. Never refused: the serving layer admits requests
        (``Serving.check_queue``) before their work is queued."""
        return self._put(_Item(Future(), call=functools.partial(fn, *args)), bounded=False)

    def _put(self, item: _Item, bounded: bool) -> Future:
        with self._condition:
            if self._closing:
                raise RuntimeError("the engine is shut down")
            if bounded and len(self._queue) >= self.max_queue:
                self._drop_cancelled()
            if bounded and len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (--max-queue)")
            self._queue.append(item)
            self._condition.notify()
        return item.future

    def _drop_cancelled(self) -> None:
        """Forget waiting work whose requests are gone (timed out, disconnected)."""
        gone = [
            item
            for item in self._queue
            if item.future.cancelled() or (item.job is not None and item.job.cancelled.is_set())
        ]
        for item in gone:
            self._queue.remove(item)
            item.future.cancel()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, fail what waits, and give the running item ``timeout`` seconds to finish
        (None: as long as it takes). The worker is a daemon thread: one still running then ends
        with the process."""
        with self._condition:
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            self._condition.notify_all()
        for item in waiting:
            if item.future.set_running_or_notify_cancel():  # not already cancelled
                item.future.set_exception(RuntimeError("the engine shut down before this request ran"))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the model worker did not stop within %.0f s; exiting without it", timeout)

    # -- the worker --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait()
                if self._closing:
                    return
                first = self._queue.popleft()
            if first.call is not None:
                self._run(first, first.call)
                continue
            batch = self._gather(first)
            if len(batch) == 1:
                self.stats.record(1, first.rows)
                self._run(first, functools.partial(self._run_one, first.job))
            else:
                self._run_together(batch)
            del first, batch  # an idle worker keeps nothing of the last batch alive

    def _gather(self, first: _Item) -> list[_Item]:
        """``first`` plus batchable jobs that are waiting or arrive within the window."""
        batch = [first]
        if not batchable(first.job) or first.rows >= self.max_batch_size:
            return batch
        rows = first.rows
        deadline = time.monotonic() + self.batch_window_s
        with self._condition:
            while rows < self.max_batch_size:
                taken = False
                for item in list(self._queue):
                    if item.job is None or not batchable(item.job):
                        continue
                    if rows + item.rows > self.max_batch_size:
                        continue
                    if self.memory_room is not None and (
                        self._batch_memory([i.job for i in batch] + [item.job]) > self.memory_room
                    ):
                        continue
                    self._queue.remove(item)
                    batch.append(item)
                    rows += item.rows
                    taken = True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    break
                if not taken:
                    self._condition.wait(remaining)
        return batch

    def _run(self, item: _Item, work: Callable) -> None:
        future = item.future
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(item.context.run(_guarded, work))
        except BaseException as exc:  # handed to the waiting request
            future.set_exception(exc)

    def _run_together(self, batch: list[_Item]) -> None:
        """Run a batch; each job's future is set the moment that job ends. Jobs that arrive
        meanwhile join it (``_take_more``) while it has rows to spare."""
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        running = {id(item.job): item for item in live}
        self.stats.record(len(live), sum(item.rows for item in live))

        def name_requests() -> None:  # the log lines' request id: every job now in the batch
            request_id.set("+".join(item.context.get(request_id, "-") for item in running.values()))

        def on_done(job: GenerationJob, outcome) -> None:
            item = running.pop(id(job))
            name_requests()
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

        def take_more(free_rows: int) -> list[GenerationJob]:
            joined = self._take_more(free_rows, [item.job for item in running.values()])
            for item in joined:
                running[id(item.job)] = item
            if joined:
                name_requests()
                self.stats.joined += len(joined)
                self.stats.rows += sum(item.rows for item in joined)
                self.stats.peak_rows = max(self.stats.peak_rows, sum(i.rows for i in running.values()))
            return [item.job for item in joined]

        def run() -> None:
            name_requests()
            _guarded(lambda: self._run_batch([item.job for item in live], on_done, take_more))

        try:
            contextvars.copy_context().run(run)
        except BaseException as exc:  # the forward pass failed: every job still in the batch
            for item in running.values():
                item.future.set_exception(exc)

    def _take_more(self, free_rows: int, running: list[GenerationJob]) -> list[_Item]:
        """Waiting batchable jobs that fit in ``free_rows`` (and the memory room), marked running."""
        taken: list[_Item] = []
        with self._condition:
            for item in list(self._queue):
                # In arrival order, and only up to the first item that cannot join: work that
                # waits (a call, a job that runs alone or does not fit) is never overtaken for
                # long; the batch drains and it runs.
                if item.job is None or not batchable(item.job) or item.rows > free_rows:
                    break
                jobs = running + [i.job for i in taken] + [item.job]
                try:
                    too_big = self.memory_room is not None and self._batch_memory(jobs) > self.memory_room
                except Exception:
                    logger.exception("estimating a batch's memory failed; not joining more")
                    break
                if too_big:
                    break
                self._queue.remove(item)
                if not item.future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                taken.append(item)
                free_rows -= item.rows
        return taken


def _guarded(work: Callable):
    try:
        return work()
    except torch.OutOfMemoryError:
        logger.exception("out of memory; freeing the accelerator cache")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
