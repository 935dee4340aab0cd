"""The engine: owns THE one nnsight-wrapped model and the one thread that touches it.

The engine knows nothing about HTTP. It takes :class:`GenerationJob` objects (and LDA
requests, whose rows are such jobs), queues them for its worker thread (never the
asyncio event loop, so ``/health`` answers while a long generation runs), which runs
every job in the one decode loop (``loop.py``) over the HF + nnsight runtime
(``hf_runtime.py``), concurrent jobs together (``scheduler.py``), and hands back a
:class:`GenerationResult`, or a stream of :class:`ChoiceDelta` (and a trace-mode
capture's :class:`CaptureResult`) followed by the result. A job that waits or runs past
the request timeout is cancelled and raises :class:`RequestTimedOut`.

Threading contract:

* the worker thread (the scheduler's) alone runs the model and decodes generated tokens
  (with the model's tokenizer);
* a second thread renders, encodes and decodes prompts with its own copy of
  the tokenizer (``prompt_tokenizer``): a fast tokenizer is not safe to share
  between threads, and tokenizing a long prompt must not stall the event loop;
* the event loop reads only the immutable :class:`Vocabulary` tables (token
  text and bytes for logprobs).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .attribution import AttributionResult, Target, attribute
from .capture import CaptureResult
from .hf_runtime import decode_loop
from .hooks import HookPoint, HookResolver
from .interrupt import JobInterrupted
from .job import ChoiceDelta, GenerationJob, GenerationResult, TokenLogprob
from .lda import LdaJob, LdaResult
from .lens import unembedding_of
from .loading import LoadedModel, check_chat_template, check_same_vocabulary, load_model
from .memory import HostMemory, MemoryLog, ModelShape, estimate, format_size
from .sae import CFG_FILE, WEIGHTS_FILE, SaeError, SaeSet, load_sae
from .scheduler import Scheduler
from .scoring import score_prompt
from .structure import context_length, find_layers, layer_hook_points, module_tree
from .vocab import Vocabulary, build_vocabulary

logger = logging.getLogger(__name__)

# The default batch window for a model whose cache cannot take new rows (no request joins a
# running batch): requests sent together wait this long for each other, then share a batch.
NO_JOIN_BATCH_WINDOW_S = 0.01

T = TypeVar("T")


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation becomes a prompt (vLLM's chat request fields): end with the header of
    the assistant's reply (``add_generation_prompt``), or leave the final (assistant) message
    open so the reply continues it (``continue_final_message``); ``template_kwargs``: more
    variables for the template (``chat_template_kwargs``, e.g. ``enable_thinking``); ``tools``:
    the functions the model may call, rendered by the template."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tools: list[dict] | None = None  # functions the template renders (OpenAI's tools)


DEFAULT_CHAT = ChatOptions()


# When the current request's --request-timeout runs out (event loop time), set by its first
# piece of model work; a request runs in its own task, so each has its own.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)


class RequestTimedOut(TimeoutError):
    """A request waited and ran longer than --request-timeout; its job was cancelled."""


class Engine:
    """One served model, one worker thread. ``backend``: which runtime runs the batches
    (``hf`` here; ``vllm``: :class:`~server.engine.vllm_engine.VLLMEngine`); ``unsupported``:
    the features it does not run (the serving layer refuses them, naming the field)."""

    backend = "hf"
    unsupported: frozenset[str] = frozenset()

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_model_len: int | None = None,
        before: LoadedModel | None = None,
        max_batch_size: int = 8,
        batch_window_s: float = 0.0,
        max_queue: int = 64,
        request_timeout: float | None = None,
        memory_room: int | None = None,
        scheduler: Scheduler | None = None,
        chat_template: str | None = None,
    ) -> None:
        """``scheduler``: the one this engine's model was loaded on (``from_settings``); by
        default a new one. ``chat_template``: a Jinja template that replaces the model's own
        (``--chat-template``)."""
        self.built_on_thread = threading.get_ident()  # from_settings: the worker (see there)
        self.loaded = loaded
        self.before = before  # LDA's second checkpoint, if one was loaded (same vocabulary)
        self.model_id = loaded.model_id
        self.layout = find_layers(loaded.hf_model)
        self.shape = ModelShape.of(loaded.hf_model, self.layout.count)  # before any forward pass
        self.hooks = HookResolver(loaded.hf_model, self.layout)  # runs one (to measure widths)
        self.before_shape = (
            ModelShape.of(before.hf_model, find_layers(before.hf_model).count) if before else None
        )
        self.context_length = context_length(loaded.hf_model.config, loaded.tokenizer, max_model_len)
        self.before_context_length = (
            context_length(before.hf_model.config, before.tokenizer, max_model_len) if before else None
        )
        self.prompt_tokenizer = copy.deepcopy(loaded.tokenizer)
        if chat_template is not None:
            self.prompt_tokenizer.chat_template = chat_template
        self.vocabulary: Vocabulary = build_vocabulary(loaded.tokenizer)
        self.request_timeout = request_timeout
        if scheduler is None:
            scheduler = Scheduler(
                max_batch_size=max_batch_size,
                batch_window_s=batch_window_s,
                max_queue=max_queue,
                memory_room=memory_room,
            )
        self.loop = decode_loop(
            loaded,
            before,
            token_text=self.vocabulary.text,
            manifest_facts={
                "model": self.model_id,
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "adapter": loaded.adapter,
                "quantization": loaded.quantization,
            },
            logits_module=self.hooks.logits_module,
        )
        self.runtime = self.loop.runtime
        self.saes = SaeSet()  # changed on the worker only (add_sae, remove_sae)
        self.unembedding = unembedding_of(loaded.wrapper, loaded.hf_model, self.hooks)  # the logit lens
        self.reads_attention_patterns = self.runtime.reads_patterns  # capture.attention
        self.host_memory = HostMemory()
        scheduler.bind(self._run_batch, self._batch_memory, on_idle=self.host_memory.release)
        self.scheduler = scheduler
        self._prompt_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompts")

    @classmethod
    def from_settings(cls, settings) -> Engine:
        """Load the model(s) and build the engine, all on the engine's own worker thread.

        torch runs CPU ops on OpenMP thread teams, one per OS thread that ever ran a parallel
        op, living as long as that thread. A second team in the process made every later
        decode step on a 2-core machine 1.65x slower (measured: one forward pass, or one large
        tensor copy, on any other long-lived thread). So the worker is the only thread that
        loads, measures and runs the model, and other threads keep to small tensor work or
        numpy (``docs/architecture.md``). ``--backend vllm`` builds a
        :class:`~server.engine.vllm_engine.VLLMEngine` instead (vLLM must be installed)."""
        if cls is Engine and settings.backend == "vllm":
            from .vllm_engine import VLLMEngine

            return VLLMEngine.from_settings(settings)
        scheduler = Scheduler(
            max_batch_size=settings.max_batch_size,
            batch_window_s=(settings.batch_window_ms or 0) / 1000,
            max_queue=settings.max_queue,
        )
        try:
            return scheduler.submit_call(cls._build, settings, scheduler).result()
        except BaseException:
            scheduler.close()
            raise

    @classmethod
    def _build(cls, settings, scheduler: Scheduler) -> Engine:
        loaded = load_model(
            settings.model,
            dtype=settings.dtype,
            device=settings.device,
            served_model_name=settings.served_model_name,
            cache_dir=settings.cache_dir,
            adapter=settings.adapter,
            quantization=settings.quantization,
        )
        before = None
        if settings.lda_before:
            before = load_model(
                settings.lda_before,
                dtype=str(loaded.dtype).removeprefix("torch."),
                device=str(loaded.device),
                cache_dir=settings.cache_dir,
                quantization=settings.quantization,
                flag="--lda-before",
            )
            check_same_vocabulary(loaded, before)
        engine = cls(
            loaded,
            max_model_len=settings.max_model_len,
            before=before,
            request_timeout=settings.request_timeout or None,
            scheduler=scheduler,
            chat_template=check_chat_template(settings.chat_template) if settings.chat_template else None,
        )
        if settings.memory_budget is not None:  # what a batch's jobs may add together
            engine.scheduler.memory_room = max(0, settings.memory_budget - engine.resident_weight_bytes)
        if settings.batch_window_ms is None and not engine.runtime.joins_running_batches:
            engine.scheduler.batch_window_s = NO_JOIN_BATCH_WINDOW_S
        for spec in settings.sae:  # checked by the preflight: NAME=FOLDER with both files
            name, folder = spec.split("=", 1)
            files = Path(folder).expanduser()
            try:
                engine.add_sae(
                    name, (files / CFG_FILE).read_bytes(), (files / WEIGHTS_FILE).read_bytes(), folder
                )
            except SaeError as exc:
                raise SaeError(f"--sae {name}: {exc}", exc.field) from None
        return engine

    # -- SAEs (worker side) ------------------------------------------------------------

    def add_sae(self, name: str, cfg_bytes: bytes, weights_bytes: bytes, folder: str) -> dict:
        """Load an SAE onto the model's device and serve it as ``name`` (on the worker). Its
        weights count against ``--memory-budget`` like the model's.

        Raises:
            SaeError: it does not fit the model, the format or the memory budget (``field``)."""
        if name in self.saes:
            raise SaeError(f"an SAE named {name!r} is loaded already (DELETE /v1/saes/{name} first)", "name")
        served = load_sae(name, cfg_bytes, weights_bytes, folder, self.hooks, "cpu")
        room = self.scheduler.memory_room
        if room is not None:
            if served.sae.nbytes > room:
                raise SaeError(
                    f"the SAE's weights take {format_size(served.sae.nbytes)}; --memory-budget leaves "
                    f"{format_size(room)} beside the weights and SAEs already loaded",
                    WEIGHTS_FILE,
                )
            self.scheduler.memory_room = room - served.sae.nbytes
        served = served.on(self.loaded.device)
        self.saes.add(served)
        logger.info(
            "SAE %s loaded from %s at %s (%d features)", name, folder, served.point.name, served.sae.d_sae
        )
        return served.describe()

    def remove_sae(self, name: str) -> None:
        """Stop serving an SAE (on the worker). Raises KeyError for a name not loaded."""
        served = self.saes.remove(name)
        if self.scheduler.memory_room is not None:
            self.scheduler.memory_room += served.sae.nbytes
        logger.info("SAE %s unloaded", name)

    @property
    def resident_weight_bytes(self) -> int:
        """Bytes of every loaded checkpoint's weights (the served one and LDA's before model) and
        of the SAEs loaded."""
        before = self.before_shape.weight_bytes if self.before_shape else 0
        return self.shape.weight_bytes + before + self.saes.nbytes

    def close(self, timeout: float | None = None) -> None:
        """Fail queued work; give the running batch ``timeout`` seconds to end (see Scheduler.close)."""
        self._prompt_executor.shutdown(wait=True, cancel_futures=True)
        self.scheduler.close(timeout)

    # -- prompts (the prompt thread) ------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.prompt_tokenizer, "chat_template", None))

    async def on_prompt_thread(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the prompt thread (tokenizing, templates, grammars: CPU work that
        must not hold the event loop, and is no model work)."""
        return await asyncio.wrap_future(self._prompt_executor.submit(fn, *args))

    async def render_chat(self, messages: list[dict], options: ChatOptions = DEFAULT_CHAT) -> list[int]:
        """Token ids of a conversation in the chat template (``options``: how)."""
        return (await self.format_prompt(messages, None, options))[1]

    async def format_prompt(
        self, messages: list[dict] | None, text: str | None, options: ChatOptions = DEFAULT_CHAT
    ) -> tuple[str, list[int]]:
        """The text the model will see and its token ids: ``messages`` in the chat template, or
        ``text`` encoded as is (with the tokenizer's own special tokens, e.g. BOS).

        Raises:
            jinja2.TemplateError: the template refused the messages (or its variables).
            ValueError: transformers refused the options (e.g. continuing a final message that
                is not the assistant's).
        """

        def render() -> tuple[str, list[int]]:
            tokenizer = self.prompt_tokenizer
            if messages is not None:
                formatted = tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=options.add_generation_prompt,
                    continue_final_message=options.continue_final_message,
                    tools=options.tools,
                    tokenize=False,
                    **options.template_kwargs,
                )
                # The template already holds any BOS text; don't add a second one.
                return formatted, tokenizer.encode(formatted, add_special_tokens=False)
            ids = tokenizer.encode(text)
            return tokenizer.decode(ids), ids

        return await self.on_prompt_thread(render)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        def encode() -> list[int]:
            return self.prompt_tokenizer.encode(text, add_special_tokens=add_special_tokens)

        return await self.on_prompt_thread(encode)

    async def check_grammar(self, grammar: str) -> None:
        """Raise ``constraints.GrammarError`` unless the decode loop can follow ``grammar`` (the
        first call converts the tokenizer for llguidance: about a second, on the prompt thread)."""
        await self.on_prompt_thread(self.loop.constraints.check, grammar)

    async def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each token as the tokenizer spells it (``convert_ids_to_tokens``: ``Ġthe``, ``<0x0A>``)."""
        return await self.on_prompt_thread(self.prompt_tokenizer.convert_ids_to_tokens, token_ids)

    async def decode(self, token_ids: list[int]) -> str:
        return await self.on_prompt_thread(self.prompt_tokenizer.decode, token_ids)

    def token_text(self, token_id: int) -> str:
        return self.vocabulary.text(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        return self.vocabulary.bytes(token_id)

    @property
    def vocab_size(self) -> int:
        return self.loaded.hf_model.config.vocab_size

    # -- model work (worker side) -------------------------------------------------

    async def compute(self, fn: Callable[..., T], *args) -> T:
        """Tensor math for the serving layer (e.g. a contrastive vector's SVD), on the worker."""
        return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., T], *args) -> T:
        """Run model work (not a generation job) on the worker, after what is queued before it."""
        return await asyncio.wrap_future(self.scheduler.submit_call(fn, *args))

    def _batch_memory(self, jobs: list[GenerationJob]) -> int:
        """Bytes a batch adds beside the weights: every row padded to the longest prompt (an LDA
        row counts twice: its before side has a cache of its own)."""
        padded = estimate(
            self.shape,
            prompt_tokens=max(len(job.prompt_ids) for job in jobs),
            max_tokens=max(job.params.max_tokens for job in jobs) + 1,
            n=sum(job.rows for job in jobs),
        )
        return max(padded.total - padded.weights, sum(job.memory_bytes for job in jobs))

    def _run_batch(
        self,
        jobs: list[GenerationJob],
        on_done: Callable[[GenerationJob, GenerationResult | BaseException], None],
        take_more: Callable[[int], list[GenerationJob]],
    ) -> None:
        """Decode ``jobs`` (and the jobs ``take_more`` hands over) in the one loop; each ends
        through ``on_done`` with its result (its capture written) or its own error, after its
        ``[memory]`` line (the batch's memory since it began, logged under its request ids)."""
        memory = MemoryLog(self.loaded.device, "generate").start()
        live = {id(job): job for job in jobs}

        def done(job: GenerationJob, outcome: GenerationResult | BaseException) -> None:
            memory.report(
                batch=len(live), rows=sum(j.rows for j in live.values()), max_new_tokens=job.params.max_tokens
            )
            live.pop(id(job), None)
            on_done(job, outcome)

        def more(free_rows: int) -> list[GenerationJob]:
            joined = take_more(free_rows)
            live.update((id(job), job) for job in joined)
            return joined

        self.loop.run(jobs, on_done=done, take_more=more, max_rows=self.scheduler.max_batch_size)

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """Run a job; if the caller is cancelled (client gone) or the request times out, the job
        stops at its next token (or between layers of its forward, or never starts)."""
        future = asyncio.wrap_future(self.scheduler.submit_job(job))
        return await self._wait(future, job.cancelled, lambda: _progress(job.steps))

    async def _wait(self, future: asyncio.Future, cancelled: threading.Event, progress: Callable[[], str]):
        """Await work on the worker within the request timeout; past it, or if the caller goes
        away (a disconnected client), ``cancelled`` is set: the work stops at its next step or
        layer, or never starts. A result that finished as the caller went away is discarded
        (its capture removed: nobody was told its id)."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._time_left())
        except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
            caller_gone = isinstance(exc, asyncio.CancelledError)
            if future.done() and not future.cancelled():
                if caller_gone:
                    _discard(future)
                    raise
                return future.result()  # the work's own outcome (even its own TimeoutError), not ours
            cancelled.set()
            future.add_done_callback(_discard)  # what it still writes, nobody will be told of
            if caller_gone:
                raise
            raise RequestTimedOut(self._timeout_message(progress())) from None

    def start_clock(self) -> None:
        """Start the current request's --request-timeout clock, if its work has not already:
        tasks it then starts (its prompts, queued at once) share it rather than each starting
        their own."""
        self._time_left()

    def _time_left(self) -> float | None:
        """Seconds the current request has left of --request-timeout: the clock starts at its
        first piece of model work (or ``start_clock``) and runs across all of them (echo scoring
        then generation, a contrastive request's two sets of examples), not anew for each."""
        if self.request_timeout is None:
            return None
        now = asyncio.get_running_loop().time()
        deadline = _deadline.get()
        if deadline is None:
            deadline = now + self.request_timeout
            _deadline.set(deadline)
        return max(0.0, deadline - now)

    def _timeout_message(self, where: str) -> str:
        return f"the request took longer than --request-timeout ({self.request_timeout:g} s); stopped {where}"

    async def _run_within_timeout(self, fn: Callable[..., T], *args) -> T:
        """Model work that is not a generation job (echo scoring, contrastive examples) on the
        worker, within the request timeout and cancelled with its caller: ``fn(*args, stop)``
        runs with ``stop()`` true once nobody wants its result, and checks it between layers
        (``Runtime.interrupted_when``) and between its own pieces of work."""
        cancelled = threading.Event()

        def run() -> T:
            with self.runtime.interrupted_when(cancelled.is_set):
                return fn(*args, cancelled.is_set)

        future = asyncio.wrap_future(self.scheduler.submit_call(run))
        return await self._wait(future, cancelled, lambda: "part-way")

    async def run_analysis(self, fn: Callable[..., T], *args) -> T:
        """A model analysis that is not generation (a patching sweep) on the worker: ``fn(*args,
        stop)``, within the request timeout and stopped (``JobInterrupted``) once its caller goes."""
        return await self._run_within_timeout(fn, *args)

    async def attribute(
        self,
        prompt_ids: list[int],
        points: tuple[HookPoint, ...],
        target: Target,
        reference_ids: list[int] | None,
        sink=None,
        manifest: dict | None = None,
    ) -> tuple[AttributionResult, CaptureResult | None]:
        """Gradient attribution of ``target`` at ``points`` over ``prompt_ids`` (``attribution.py``),
        on the worker within the request timeout; with ``sink`` (the activation store) every
        activation and gradient is written as a capture (``manifest``: what the request adds)."""
        facts = {
            "model": self.model_id,
            "tokens": [self.token_text(t) for t in prompt_ids],
            **(manifest or {}),
        }
        return await self._run_within_timeout(
            attribute,
            self.runtime,
            self.loaded.wrapper,
            self.hooks.embedding_module,
            prompt_ids,
            points,
            target,
            reference_ids,
            sink,
            facts,
        )

    async def lda(self, job: LdaJob) -> LdaResult:
        """Run an LDA request (every row, both sides) in the decode loop, within the request timeout."""
        future = asyncio.wrap_future(self.scheduler.submit_jobs(job.jobs))
        results = await self._wait(future, job.cancelled, lambda: _progress(job.steps))
        return LdaResult(rows=[result.choices[0] for result in results], steps=job.steps)

    async def score_prompt(self, prompt_ids: list[int], top_k: int) -> list[TokenLogprob]:
        """Logprob of every prompt token given the ones before it (see ``scoring.py``)."""
        return await self._run_within_timeout(score_prompt, self.loaded.hf_model, prompt_ids, top_k)

    async def collect(
        self, prompts: list[list[int]], points: tuple[HookPoint, ...], position: str
    ) -> dict[str, torch.Tensor]:
        """Per hook point, one row per prompt: its value at the last token ("last") or averaged
        over the prompt ("mean"), as float32 on the CPU. For building contrastive vectors."""
        return await self._run_within_timeout(self._collect_sync, prompts, points, position)

    def _collect_sync(
        self, prompts: list[list[int]], points: tuple, position: str, stop: Callable[[], bool]
    ) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {p.name: [] for p in points}
        for prompt_ids in prompts:  # one at a time: no padding, as each prompt alone
            if stop():
                raise JobInterrupted
            (values,) = self.runtime.read_prompts([prompt_ids], points)
            for point in points:
                value = values[point.name].float()  # [positions, width]
                rows[point.name].append(value[-1] if position == "last" else value.mean(0))
        return {name: torch.stack(values).cpu() for name, values in rows.items()}

    async def stream(
        self, job: GenerationJob
    ) -> AsyncIterator[ChoiceDelta | CaptureResult | GenerationResult]:
        """Deltas as the worker produces them (a trace-mode capture's result first, as soon as it
        is written), then the final result.

        Closing the iterator early (a disconnected client) cancels the job; a capture it wrote
        that the caller never received (it arrived after the caller left, or came with a result
        never handed over) is removed. Once handed over, a capture is the caller's to deliver
        (the serving layer removes one whose id never reached the client).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        job.on_delta = lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta)
        if job.capture is not None and job.capture.plan.mode == "trace":
            job.on_capture = lambda result: loop.call_soon_threadsafe(queue.put_nowait, result)
        future = asyncio.wrap_future(self.scheduler.submit_job(job))
        left = self._time_left()
        deadline = None if left is None else loop.time() + left

        def finished(task: asyncio.Future) -> None:
            if not task.cancelled():
                task.exception()  # retrieved here so an abandoned stream logs no "never retrieved"
            queue.put_nowait(done)

        future.add_done_callback(finished)
        handed_result = False
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    raise RequestTimedOut(self._timeout_message(_progress(job.steps))) from None
                if item is done:
                    break
                yield item
            result = future.result()
            handed_result = True
            yield result
        finally:
            if not future.done():
                job.cancelled.set()

            def remove_unhanded(_: object = None) -> None:
                """Captures the caller never received: still queued, or on a result not handed."""
                lost = []
                while not queue.empty():
                    item = queue.get_nowait()
                    if isinstance(item, CaptureResult):
                        lost.append(item)
                if not handed_result and not future.cancelled() and future.exception() is None:
                    capture = future.result().capture
                    if capture is not None and job.on_capture is None:  # a trace capture was queued
                        lost.append(capture)
                if lost:
                    loop.run_in_executor(None, remove_captures, lost)

            if future.done():
                remove_unhanded()
            else:
                future.add_done_callback(remove_unhanded)

    # -- introspection -------------------------------------------------------------

    def structure(self) -> dict:
        """What /v1/model/structure reports: sizes, module tree, hook points."""
        model = self.loaded.hf_model
        config = model.config
        layout = self.layout
        return {
            "model": self.model_id,
            "source": self.loaded.source,
            "architecture": type(model).__name__,
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "quantization": self.loaded.quantization,
            "device": str(self.loaded.device),
            "num_layers": layout.count,
            "hidden_size": self.shape.hidden,
            "vocab_size": config.vocab_size,
            "context_length": self.context_length,
            "num_parameters": model.num_parameters(),  # HF counts a packed 4-bit weight's values
            "parameter_bytes": self.shape.weight_bytes,
            "layers_path": layout.path,
            "hook_points": {
                "layer_path_template": f"{layout.path}.{{layer}}",
                "aliases": layout.aliases(),
                "per_layer": layer_hook_points(model, layout),
            },
            "modules": module_tree(model),
            "checkpoint_generation_config": self.loaded.checkpoint_generation_config,
            "adapter": self.loaded.adapter,
            "lda_before": None if self.before is None else self.before.model_id,
        }


def _progress(steps: int) -> str:
    return f"after {steps} generated token(s)" if steps else "before its first token"


def remove_captures(captures: list[CaptureResult]) -> None:
    """Delete captures whose ids never reached a client (on a thread: file work)."""
    for capture in captures:
        try:
            capture.remove()
        except KeyError:  # deleted already
            pass
        except OSError:
            logger.exception("could not remove capture %s", capture.id)
        else:
            logger.info("removed capture %s: its id never reached the client", capture.id)


def _discard(future: asyncio.Future) -> None:
    """The outcome of work whose caller went away: read, and a capture it wrote removed (its
    id never reached anyone)."""
    if future.cancelled() or future.exception() is not None:
        return
    capture = getattr(future.result(), "capture", None)
    if capture is not None:
        asyncio.get_running_loop().run_in_executor(None, remove_captures, [capture])
