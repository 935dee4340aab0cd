"""The engine's one worker thread and the bounded queue in front of it.

Everything that touches the model goes through :class:`Scheduler`: generation
jobs, and any other model work (prompt capture, scoring, LDA, contrastive
vectors) as plain calls. One thread runs them, so the model is never touched
concurrently and the asyncio event loop never runs model code.

Batching strategy. The worker takes the oldest item. If it holds generation jobs (one
job, or an LDA request's row jobs), it gathers more such items from the queue, in
arrival order, until the batch holds ``max_batch_size`` rows (a job of ``n`` choices is
``n`` rows, twice that for LDA's two sides) or its memory estimate fills
``memory_room``; until the batch is full it waits up to ``batch_window_s`` for more.
Other items keep their place in the queue and run after the batch (joining stops at the
first of them, so the batch drains). The batch runs in the one decode loop
(``loop.py``): a job that finishes leaves it at once (it stops costing compute), and
jobs that arrive while it runs join it at the next step, while it has rows to spare. A
job alone is just a batch of one: a short request sent while a long one runs joins it.

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
from .job import GenerationJob

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass
class _Item:
    future: Future
    jobs: list[GenerationJob] = field(default_factory=list)  # generation jobs, answered together, or
    call: Callable | None = None  # any other model work, run alone
    single: bool = True  # the future's result: the one job's result (else a list, in order)
    enqueued: float = field(default_factory=time.monotonic)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)  # the submitter's
    outcomes: dict[int, object] = field(default_factory=dict)  # job id -> result, as jobs end

    @property
    def rows(self) -> int:
        return sum(job.rows for job in self.jobs)

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled() or any(job.cancelled.is_set() for job in self.jobs)


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
        run_batch: Callable[[list[GenerationJob], Callable, Callable[[int], list[GenerationJob]]], None]
        | None = None,
        *,
        max_batch_size: int = 8,
        batch_window_s: float = 0.0,
        max_queue: int = 64,
        memory_room: int | None = None,
        batch_memory: Callable[[list[GenerationJob]], int] | None = None,
    ) -> None:
        # Bytes a batch of jobs adds beside the weights (rows padded to the longest prompt);
        # default: the sum of the jobs' own estimates.
        self._batch_memory = batch_memory or (lambda jobs: sum(job.memory_bytes for job in jobs))
        self._run_batch = run_batch
        self._on_idle: Callable[[], None] | None = None
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

    def bind(self, run_batch, batch_memory=None, on_idle: Callable[[], None] | None = None) -> None:
        """Set how generation jobs run (an engine built on this scheduler's own thread calls it);
        ``on_idle``: called on the worker each time it runs out of work (e.g. to hand freed memory
        back to the system)."""
        self._run_batch = run_batch
        if batch_memory is not None:
            self._batch_memory = batch_memory
        self._on_idle = on_idle

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
        """Queue a generation job (its future: its ``GenerationResult``); :class:`QueueFull` when
        ``max_queue`` items already wait."""
        return self._put(_Item(Future(), jobs=[job]), bounded=True)

    def submit_jobs(self, jobs: list[GenerationJob]) -> Future:
        """Queue jobs that are answered together (an LDA request's rows): they join a batch
        together; the future holds their results in order, or the first job's failure. Never
        refused (the serving layer admits the request first)."""
        return self._put(_Item(Future(), jobs=list(jobs), single=False), bounded=False)

    def submit_call(self, fn: Callable, *args) -> Future:
        """Queue other model work. Never refused: the serving layer admits requests
        (``Admission.check_queue``) before their work is queued."""
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
        gone = [item for item in self._queue if item.cancelled]
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
                idle = not self._queue
            if idle and self._on_idle is not None:
                try:
                    self._on_idle()
                except Exception:
                    logger.exception("the idle hook failed")
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
            self._run_together(batch)
            del first, batch  # an idle worker keeps nothing of the last batch alive

    def _gather(self, first: _Item) -> list[_Item]:
        """``first`` plus generation items that are waiting or arrive within the window."""
        batch = [first]
        if first.rows >= self.max_batch_size:
            return batch
        rows = first.rows
        deadline = time.monotonic() + self.batch_window_s
        with self._condition:
            while rows < self.max_batch_size:
                taken = False
                for item in list(self._queue):
                    if not item.jobs:
                        continue
                    if rows + item.rows > self.max_batch_size:
                        continue
                    if self.memory_room is not None and (
                        self._batch_memory(_jobs_of(batch + [item])) > self.memory_room
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
        """Run a batch in the decode loop; each item's future is set the moment its last job ends.
        Items that arrive meanwhile join it (``_take_more``) while it has rows to spare."""
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        running = {id(job): item for item in live for job in item.jobs}
        self.stats.record(len(live), sum(item.rows for item in live))

        def name_requests() -> None:  # the log lines' request id: every request now in the batch
            items = {id(item): item for item in running.values()}.values()
            request_id.set("+".join(item.context.get(request_id, "-") for item in items))

        def on_done(job: GenerationJob, outcome) -> None:
            item = running.pop(id(job))
            item.outcomes[id(job)] = outcome
            if len(item.outcomes) < len(item.jobs) or item.future.done():
                return
            name_requests()
            outcomes = [item.outcomes[id(j)] for j in item.jobs]
            failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
            if failure is not None:
                for other in item.jobs:  # the request failed: its other rows stop too
                    other.cancelled.set()
                item.future.set_exception(failure)
            else:
                item.future.set_result(outcomes[0] if item.single else outcomes)

        def take_more(free_rows: int) -> list[GenerationJob]:
            joined = self._take_more(free_rows, [item.jobs for item in running.values()])
            for item in joined:
                running.update((id(job), item) for job in item.jobs)
            if joined:
                name_requests()
                self.stats.joined += len(joined)
                self.stats.rows += sum(item.rows for item in joined)
                busy = {id(item): item for item in running.values()}.values()
                self.stats.peak_rows = max(self.stats.peak_rows, sum(i.rows for i in busy))
            return _jobs_of(joined)

        def run() -> None:
            name_requests()
            _guarded(lambda: self._run_batch(_jobs_of(live), on_done, take_more))

        try:
            contextvars.copy_context().run(run)
        except BaseException as exc:  # the forward pass failed: every job still in the batch
            for item in {id(item): item for item in running.values()}.values():
                if not item.future.done():
                    item.future.set_exception(exc)

    def _take_more(self, free_rows: int, running: list[list[GenerationJob]]) -> list[_Item]:
        """Waiting generation items that fit in ``free_rows`` (and the memory room), marked running."""
        taken: list[_Item] = []
        busy = [job for jobs in running for job in jobs]
        with self._condition:
            for item in list(self._queue):
                # In arrival order, and only up to the first item that cannot join: work that
                # waits (a call, an item that does not fit) is never overtaken for long; the
                # batch drains and it runs.
                if not item.jobs or item.rows > free_rows:
                    break
                jobs = busy + _jobs_of(taken) + item.jobs
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


def _jobs_of(items: list[_Item]) -> list[GenerationJob]:
    return [job for item in items for job in item.jobs]


def _guarded(work: Callable):
    try:
        return work()
    except torch.OutOfMemoryError:
        logger.exception("out of memory; freeing the accelerator cache")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
