"""The vLLM runtime: the same engine seam, with nnsight's vLLM integration behind it (``--backend vllm``).

:class:`VLLMEngine` is an :class:`~server.engine.engine.Engine` whose batches run on vLLM
instead of the HF decode loop: the serving layer, the scheduler (queue, ``--max-queue``,
cancellation, ``--request-timeout``), prompts and chat templates, the activation store
and the result types are the HF runtime's. The weights are loaded once, by vLLM, through
nnsight's ``VLLM`` wrapper (``mode="async"``: vLLM's ``AsyncLLM``); every job is one
nnsight trace per choice, each a vLLM request, so vLLM's continuous batching runs
concurrent requests together while nnsight keeps each request's edits and reads on its
own tokens (``vllm_block.py`` is the part that runs in vLLM's worker).

Threading: the scheduler's worker thread runs a private asyncio loop that owns the
``AsyncLLM``; while a batch runs, that loop streams every request's outputs, hands each
new token to the job's :class:`~server.engine.job.RowState` (the same rule for stop
strings, EOS and ``max_tokens`` as the HF runtime; text decoded the same way) and takes
newly queued jobs in (``take_more``) as rows free up. The model itself runs in vLLM's
engine process, never on a thread of this one.

A capture's values are spooled by the worker, step by step, into a private folder and
turned into the activation store's files here (on a thread of their own), so the manifest
and files are the HF runtime's. Generate mode stores each position fed in: on vLLM the
final generated token is never fed (the request ends there), so a generate-mode capture
holds ``prompt + completion - 1`` positions where the HF runtime holds one more; the
manifest's ``token_positions`` lists exactly what is stored.

What this runtime refuses (400 naming the field and the backend, ``Engine.unsupported``)
is listed in docs/scale_out.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .capture import CaptureRecorder, CaptureResult
from .engine import Engine
from .hooks import HookError, HookPoint, HookResolver
from .interrupt import JobInterrupted
from .job import ChoiceDelta, GenerationJob, GenerationResult, RowState, TokenLogprob
from .loading import (
    LoadedModel,
    ModelLoadError,
    eos_token_ids_of,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from .memory import HostMemory, ModelShape
from .sae import SaeSet
from .sampler import LOGPROB_FLOOR
from .scheduler import Scheduler
from .structure import LayerLayout, context_length, find_layers, module_tree
from .vllm_block import (
    SPOOL_FILE,
    Place,
    RequestPlan,
    Site,
    Stage,
    place_of,
    run_request,
    spool_records,
    spool_rows,
)
from .vocab import build_vocabulary

logger = logging.getLogger(__name__)

BACKEND = "vllm"
# vLLM's Llama-family module layout: the architectures whose alias table (vllm_block.py) holds.
LLAMA_FAMILY = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
ALIASES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
# What the HF runtime does and this one does not (yet); the serving layer refuses each with a
# 400 naming the request field and the backend (serving/base.py require_feature).
UNSUPPORTED = frozenset(
    {"lda", "structured_output", "saes", "logit_lens", "attention", "patching", "attribution"}
)
# How often the batch loop looks for cancelled jobs and newly queued ones, in seconds.
POLL_S = 0.02
# Positions a spool is replayed into the capture recorder at once (bounds the replay's memory).
SPOOL_CHUNK = 256


class VLLMHooks(HookResolver):
    """Hook points on vLLM's module tree: the per-layer aliases only (``vllm_block.py`` maps
    them); module paths and submodule hook points are refused (vLLM's module tree differs
    from HF's, so the same name would not mean the same value)."""

    def __init__(self, layout: LayerLayout, hidden: int, architecture: str) -> None:
        self.layout = layout
        self.hidden = hidden
        self.architecture = architecture
        self.logits_module = None

    def resolve(self, *, layers, hook_points, modules) -> list[HookPoint]:
        if modules:
            raise HookError(
                "module paths are not mapped on the vllm backend; use per-layer hook_points "
                f"({', '.join(ALIASES)})",
                "modules",
            )
        if not hook_points:
            if layers is not None:
                raise HookError('layers needs hook_points (e.g. ["resid_post"])', "hook_points")
            raise HookError("name at least one hook point (hook_points or modules)", "hook_points")
        if self.architecture not in LLAMA_FAMILY:
            raise HookError(
                f"hook points are not mapped for {self.architecture} on the vllm backend "
                f"(mapped: {', '.join(sorted(LLAMA_FAMILY))})",
                "hook_points",
            )
        indexes = self.layer_indexes("all" if layers is None else layers)
        points = {}
        for j, hook in enumerate(hook_points):
            if hook not in ALIASES:
                raise HookError(
                    f"hook point {hook!r} is not mapped on the vllm backend; use one of {', '.join(ALIASES)}",
                    f"hook_points[{j}]",
                )
            for layer in indexes:
                place, order = place_of(hook, layer, self.layout.path, _embed_path(self.layout))
                name = f"layers.{layer}.{hook}"
                points[name] = HookPoint(name, place.module, "output", layer, hook, order, self.hidden)
        return sorted(points.values(), key=lambda p: (p.order, p.name))


def _embed_path(layout: LayerLayout) -> str:
    return layout.path.rsplit(".", 1)[0] + ".embed_tokens"


class VLLMEngine(Engine):
    """The engine on vLLM (see the module docstring); built by :meth:`from_settings`."""

    backend = BACKEND
    unsupported = UNSUPPORTED

    def __init__(
        self,
        model,
        loaded: LoadedModel,
        config,
        *,
        scheduler: Scheduler,
        max_model_len: int | None = None,
        request_timeout: float | None = None,
        chat_template: str | None = None,
        events: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``model``: nnsight's ``VLLM`` (dispatched, async); ``config``: the checkpoint's HF config;
        ``events``: the loop the model's ``AsyncLLM`` was built on (the worker thread's)."""
        self.built_on_thread = threading.get_ident()
        self.model = model
        self.loaded = loaded
        self.config = config
        self.before = None
        self.before_shape = None
        self.before_context_length = None
        self.model_id = loaded.model_id
        meta = model._module  # vLLM's module tree, on the meta device
        self.architecture = type(meta).__name__
        self.layout = find_layers(meta)
        self.shape = ModelShape._from_config(
            config,
            self.layout.count,
            weight_bytes=sum(p.numel() for p in meta.parameters()) * loaded.dtype.itemsize,
            dtype_bytes=loaded.dtype.itemsize,
        )
        self.hooks = VLLMHooks(self.layout, self.shape.hidden, self.architecture)
        self.saes = SaeSet()  # always empty: SAEs are refused on this backend
        self.unembedding = None
        self.reads_attention_patterns = False
        self.context_length = context_length(config, loaded.tokenizer, max_model_len)
        self.prompt_tokenizer = copy.deepcopy(loaded.tokenizer)
        if chat_template is not None:
            self.prompt_tokenizer.chat_template = chat_template
        self.vocabulary = build_vocabulary(loaded.tokenizer)
        self.request_timeout = request_timeout
        self.host_memory = HostMemory()
        self.runtime = None  # no HF runtime: batches run in vLLM
        self.loop = None
        self.spool_root = Path(tempfile.mkdtemp(prefix="nnsight-vllm-spool-"))
        self._events = events or asyncio.new_event_loop()  # the worker thread's loop: vLLM's AsyncLLM on it
        self._capture_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-captures")
        # no batch memory estimate: vLLM sizes its own KV cache (--gpu-memory-utilization)
        scheduler.bind(self._run_batch, None, on_idle=self.host_memory.release)
        self.scheduler = scheduler
        self._prompt_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompts")

    # -- building ---------------------------------------------------------------------

    @classmethod
    def _build(cls, settings, scheduler: Scheduler) -> VLLMEngine:
        check_backend_settings(settings)
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from .loading import check_chat_template

        started = time.perf_counter()
        source, model_id = resolve_source(settings.model, settings.cache_dir)
        accelerator = resolve_device(settings.device).type == "cuda"
        dtype = resolve_dtype(settings.dtype, torch.device("cuda" if accelerator else "cpu"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            config = AutoConfig.from_pretrained(source)
            try:
                generation_config = GenerationConfig.from_pretrained(source)
            except OSError:
                generation_config = GenerationConfig()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load model {settings.model!r}: {exc}") from exc
        engine_args = {
            "dtype": str(dtype).removeprefix("torch."),
            "max_model_len": settings.max_model_len,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "max_num_seqs": settings.max_batch_size,
            "served_model_name": settings.served_model_name or model_id,
            "generation_config": "vllm",  # sample exactly as each request says (loading.py)
        }
        if settings.distributed_executor_backend is not None:
            engine_args["distributed_executor_backend"] = settings.distributed_executor_backend
        logger.info("loading %s from %s on vLLM (%s)", model_id, source, engine_args)
        events = asyncio.new_event_loop()
        asyncio.set_event_loop(events)
        try:
            model = vllm_model(source, accelerator, **{k: v for k, v in engine_args.items() if v is not None})
        except Exception as exc:
            raise ModelLoadError(f"vLLM could not load {settings.model!r}: {exc}") from exc
        elapsed = time.perf_counter() - started
        logger.info("loaded %s on vLLM in %.1f s", model_id, elapsed)
        loaded = LoadedModel(
            wrapper=model,
            tokenizer=tokenizer,
            model_id=settings.served_model_name or model_id,
            source=source,
            dtype=dtype,
            device=torch.device("cuda" if accelerator else "cpu"),  # where vLLM's workers run it
            load_seconds=elapsed,
            eos_token_ids=eos_token_ids_of(generation_config, tokenizer),
            checkpoint_generation_config=generation_config.to_diff_dict(),
        )
        engine = cls(
            model,
            loaded,
            config,
            scheduler=scheduler,
            max_model_len=settings.max_model_len,
            request_timeout=settings.request_timeout or None,
            chat_template=check_chat_template(settings.chat_template) if settings.chat_template else None,
            events=events,
        )
        return engine

    def close(self, timeout: float | None = None) -> None:
        """Fail queued work, let the running batch end, then stop vLLM's engine and remove the spool."""
        super().close(timeout)
        self._capture_executor.shutdown(wait=True)
        if not self._events.is_running():  # a batch that outlived the timeout still holds it
            self._events.run_until_complete(self._stop_vllm())
            self._events.close()
        shutil.rmtree(self.spool_root, ignore_errors=True)

    async def _stop_vllm(self) -> None:
        """vLLM's engine processes stopped, and its output handler ended, on the loop it ran on."""
        entrypoint = getattr(self.model, "vllm_entrypoint", None)
        if entrypoint is not None:
            with contextlib.suppress(Exception):
                entrypoint.shutdown()
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    @property
    def vocab_size(self) -> int:
        return self.config.get_text_config().vocab_size

    @property
    def resident_weight_bytes(self) -> int:
        return self.shape.weight_bytes

    # -- what this runtime refuses --------------------------------------------------------

    async def check_grammar(self, grammar: str) -> None:
        raise AssertionError("the serving layer refuses structured output on the vllm backend first")

    async def score_prompt(self, prompt_ids: list[int], top_k: int) -> list[TokenLogprob]:
        """Logprob of every prompt token given the ones before it (``echo`` with ``logprobs``):
        vLLM's own prompt logprobs (raw, as on the HF runtime), from one request that generates
        one token, on the worker, within the request timeout. The first entry has
        ``logprob=None``."""
        cancelled = threading.Event()

        def run() -> list[TokenLogprob]:
            return self._events.run_until_complete(self._score(prompt_ids, top_k, cancelled))

        future = asyncio.wrap_future(self.scheduler.submit_call(run))
        return await self._wait(future, cancelled, lambda: "part-way")

    async def _score(
        self, prompt_ids: list[int], top_k: int, cancelled: threading.Event
    ) -> list[TokenLogprob]:
        if cancelled.is_set():
            raise JobInterrupted
        # nothing read or edited: echo scores the prompt without interventions
        finished = await self._finished_output(
            prompt_ids, None, max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False
        )
        steps = finished.prompt_logprobs
        return [TokenLogprob(prompt_ids[0], None)] + [
            _logprob(step, token, top_k) for step, token in zip(steps[1:], prompt_ids[1:], strict=True)
        ]

    async def collect(
        self, prompts: list[list[int]], points: tuple[HookPoint, ...], position: str
    ) -> dict[str, torch.Tensor]:
        """Per hook point, one row per prompt: its value at the last token ("last") or averaged
        over the prompt ("mean"), float32 on the CPU (contrastive vectors). The prompts run as
        vLLM requests together, each reading its prompt step through a spool, within the
        request timeout."""
        cancelled = threading.Event()

        def run() -> dict[str, torch.Tensor]:
            return self._events.run_until_complete(self._collect(prompts, points, position, cancelled))

        future = asyncio.wrap_future(self.scheduler.submit_call(run))
        return await self._wait(future, cancelled, lambda: "part-way")

    async def _collect(
        self, prompts, points, position: str, cancelled: threading.Event
    ) -> dict[str, torch.Tensor]:
        if cancelled.is_set():
            raise JobInterrupted
        rows = await _all_or_none(self._read_prompt(ids, points, position) for ids in prompts)
        return {point.name: torch.stack([row[point.name] for row in rows]) for point in points}

    async def _read_prompt(self, prompt_ids: list[int], points, position: str) -> dict[str, torch.Tensor]:
        """One prompt's values at ``points`` (its prompt step), reduced to one row each."""
        spool = Path(tempfile.mkdtemp(dir=self.spool_root))
        try:
            plan = self._plan_for((), points, len(prompt_ids), read_steps=1, spool=spool)
            await self._finished_output(prompt_ids, plan, max_tokens=1, temperature=0.0, detokenize=False)
            names, width, dtype = plan.names(), self.shape.hidden, self.loaded.dtype
            with _mapped(spool / SPOOL_FILE) as buffer:
                records = spool_records(buffer, len(names), width, dtype)
                if not records or records[0][1] != len(prompt_ids):
                    raise RuntimeError("the worker did not spool the prompt step")
                out = {}
                for j, name in enumerate(names):
                    values = spool_rows(buffer, records[0], j, width, dtype).float()
                    out[name] = (values[-1] if position == "last" else values.mean(0)).clone()
                    del values  # a view of the map, closed next
            return out
        finally:
            shutil.rmtree(spool, ignore_errors=True)

    async def lda(self, job):
        raise AssertionError("the serving layer refuses LDA on the vllm backend first")

    # -- batches (the worker thread) -----------------------------------------------------

    def _run_batch(
        self,
        jobs: list[GenerationJob],
        on_done: Callable[[GenerationJob, GenerationResult | BaseException], None],
        take_more: Callable[[int], list[GenerationJob]],
    ) -> None:
        """Run ``jobs`` as vLLM requests, taking newly queued jobs in as rows free up (at most
        ``--max-batch-size`` rows in flight); each ends through ``on_done``."""
        self._events.run_until_complete(self._drive(jobs, on_done, take_more))

    async def _drive(self, jobs, on_done, take_more) -> None:
        running: dict[asyncio.Task, GenerationJob] = {}
        cancelled: set[asyncio.Task] = set()  # each cancelled once: its cleanup must not be cut short

        def launch(new_jobs: list[GenerationJob]) -> None:
            for job in new_jobs:
                running[asyncio.create_task(self._run_job(job))] = job

        launch(jobs)
        try:
            while running:
                done, _ = await asyncio.wait(running, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    job = running.pop(task)
                    cancelled.discard(task)
                    on_done(job, JobInterrupted() if task.cancelled() else task.exception() or task.result())
                for task, job in running.items():
                    if job.cancelled.is_set() and task not in cancelled:
                        task.cancel()
                        cancelled.add(task)
                free = self.scheduler.max_batch_size - sum(job.rows for job in running.values())
                if free > 0:
                    launch(take_more(free))
        except BaseException as exc:
            for task, job in running.items():
                if task not in cancelled:
                    task.cancel()
                on_done(job, exc)
            await asyncio.gather(*running, return_exceptions=True)  # their requests aborted
            raise

    async def _run_job(self, job: GenerationJob) -> GenerationResult:
        """One job: ``n`` vLLM requests (choice 0 carries the capture), to their ends."""
        rows = RowState.for_job(job, self.loaded.tokenizer, self.loaded.eos_token_ids)
        capture = _Capture(self, job) if job.capture is not None else None
        try:
            if job.params.max_tokens == 0:  # echo only: nothing to generate (a capture still reads)
                for i, row in enumerate(rows):
                    row.finish()
                    _emit(job, i, row)
                runs = [0] if capture is not None else []
            else:
                runs = list(range(len(rows)))
            await _all_or_none(self._run_row(job, i, rows[i], capture if i == 0 else None) for i in runs)
            for i, row in enumerate(rows):
                if not row.finished:
                    row.finish()
                    _emit(job, i, row)
            result = None
            if capture is not None:
                if capture.recorder.trace:
                    result = capture.result
                else:  # every position fed in: the prompt and each generated token but the last
                    ids = list(job.prompt_ids) + rows[0].token_ids
                    fed = len(job.prompt_ids) + max(0, len(rows[0].token_ids) - 1)
                    result = await capture.write(fed, ids)
            with_logprobs = job.params.logprobs is not None
            return GenerationResult(
                choices=[row.choice(job.first_index + i, with_logprobs) for i, row in enumerate(rows)],
                prompt_tokens=len(job.prompt_ids),
                capture=result,
            )
        except BaseException:
            if capture is not None:
                capture.abort()
            raise
        finally:
            if capture is not None:
                capture.clean()

    async def _run_row(self, job: GenerationJob, i: int, row: RowState, capture: _Capture | None) -> None:
        """One choice as one traced vLLM request: its tokens into ``row`` as they stream.

        vLLM ends the request itself where the row ends on an EOS or stop token or at
        ``max_tokens``; the stream is read to its finished output then, which is where nnsight
        raises an error of the request's block. A row that ends on a stop string (which vLLM
        is not told of) or whose job is cancelled is aborted in vLLM."""
        params = job.params
        plan = self._plan(job, capture)
        if capture is not None:
            capture.names = plan.names()
        sampling = self._sampling(job, i)
        model = self.model  # the block names only what nnsight can ship: the model, the plan
        with model.trace(list(job.prompt_ids), **sampling) as tracer:
            if plan.sites:
                run_request(model, tracer, plan)
        backend = tracer.backend
        stream = backend.__aiter__()
        finished = False
        try:
            async for output in stream:
                finished = output.finished
                completion = output.outputs[0]
                new = completion.token_ids[len(row.token_ids) :]
                if job.first_token_at is None:
                    job.first_token_at = time.monotonic()
                if capture is not None and capture.recorder.trace and capture.result is None:
                    await capture.write(len(job.prompt_ids), list(job.prompt_ids))
                    if job.on_capture is not None:
                        job.on_capture(capture.result)
                if params.max_tokens == 0:
                    break
                offset = len(row.token_ids)
                for k, token in enumerate(new):
                    if row.finished:
                        break
                    logprob = None
                    if params.logprobs is not None:
                        logprob = _logprob(completion.logprobs[offset + k], token, params.logprobs)
                    row.advance(token, logprob)
                    if i == 0:
                        job.steps += 1
                    _emit(job, i, row, (logprob,) if logprob is not None else ())
                if row.finished and not _vllm_ends_too(row):
                    break
        finally:
            # nnsight's request id: its stream does not close vLLM's own generator, whose abort
            # would wait for garbage collection (and this loop runs only while a batch does).
            await _to_the_end(self._end_request(stream, None if finished else backend._request_id))

    async def _finished_output(self, prompt_ids: list[int], plan: RequestPlan | None, **sampling):
        """One request (``sampling``: vLLM's fields; ``plan``: its reads and edits, if any) run to
        its end without streaming: its finished ``RequestOutput``."""
        model = self.model
        with model.trace(list(prompt_ids), **sampling) as tracer:
            if plan is not None:
                run_request(model, tracer, plan)
        backend = tracer.backend
        stream = backend.__aiter__()
        finished = None
        try:
            async for output in stream:
                if output.finished:
                    finished = output
        finally:
            await _to_the_end(self._end_request(stream, None if finished else backend._request_id))
        return finished

    async def _end_request(self, stream, unfinished: str | None) -> None:
        """Abort a request in vLLM if it had not finished (first: it stops decoding at once),
        then close its stream (nnsight frees its worker state)."""
        try:
            if unfinished is not None:
                await self.model.vllm_entrypoint.abort(unfinished)
        finally:
            await stream.aclose()

    def _sampling(self, job: GenerationJob, i: int) -> dict:
        """vLLM's ``SamplingParams`` fields for choice ``i`` (each choice is its own request)."""
        p = job.params
        eos = () if p.ignore_eos else tuple(self.loaded.eos_token_ids)
        sampling = {
            "max_tokens": max(1, p.max_tokens),
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "min_p": p.min_p,
            "seed": None if p.seed is None else p.seed + i,
            "stop_token_ids": sorted(set(eos) | set(p.stop_token_ids)) or None,
            "ignore_eos": p.ignore_eos,
            "min_tokens": min(p.min_tokens, max(1, p.max_tokens)),
            "repetition_penalty": p.repetition_penalty,
            "frequency_penalty": p.frequency_penalty,
            "presence_penalty": p.presence_penalty,
            "logit_bias": dict(p.logit_bias) or None,
            "logprobs": p.logprobs,
            # The text is ours (RowState, as on the HF runtime), and so are stop strings: a row that
            # ends on one is aborted in vLLM.
            "detokenize": False,
        }
        return {key: value for key, value in sampling.items() if value is not None}

    def _plan(self, job: GenerationJob, capture: _Capture | None) -> RequestPlan:
        """The worker-side plan of a job's choice: its edits and (choice 0 only) capture reads."""
        if capture is None:
            return self._plan_for(job.edits, (), len(job.prompt_ids))
        plan = capture.recorder.plan
        return self._plan_for(
            job.edits, plan.points, len(job.prompt_ids), capture.recorder.reads_steps, capture.spool
        )

    def _plan_for(
        self,
        edits,
        reads: tuple[HookPoint, ...],
        prompt_len: int,
        read_steps: int | None = None,
        spool: Path | None = None,
    ) -> RequestPlan:
        """Edits and reads by place in execution order, and at a place by hook point
        (``resid_post`` before ``resid_pre``). Edit tensors travel as they are (float32 on the
        CPU); the worker places them."""
        stages: dict[tuple[str, str], tuple[list, list]] = {}
        places: dict[str, tuple[Place, int]] = {}

        def stage(point: HookPoint) -> tuple[list, list]:
            place, order = place_of(point.hook, point.layer, self.layout.path, _embed_path(self.layout))
            places[place.module] = (place, order)
            return stages.setdefault((place.module, point.hook), ([], []))

        for edit in edits:
            stage(edit.point)[0].append(edit)
        for point in reads:
            stage(point)[1].append(point.name)
        sites = []
        for module, (place, _) in sorted(places.items(), key=lambda item: item[1][1]):
            hooks = sorted(
                (hook for where, hook in stages if where == module), key=lambda h: h == "resid_pre"
            )
            sites.append(
                Site(
                    place,
                    tuple(Stage(tuple(stages[module, h][0]), tuple(stages[module, h][1])) for h in hooks),
                )
            )
        return RequestPlan(
            sites=tuple(sites),
            prompt_len=prompt_len,
            read_steps=read_steps if reads else None,
            spool=None if spool is None else str(spool),
        )

    # -- introspection -------------------------------------------------------------

    def _aliases(self) -> dict[str, str]:
        """Where each alias is read on vLLM's tree (``vllm_block.py``); none outside the family."""
        if self.architecture not in LLAMA_FAMILY:
            return {}
        layers, embed = self.layout.path, _embed_path(self.layout)
        return {
            "resid_pre": f"{layers}.{{layer-1}}.output summed (hidden + residual); {embed}.output at layer 0",
            "resid_post": f"{layers}.{{layer}}.output summed (hidden + residual)",
            "attn_out": f"{layers}.{{layer}}.self_attn.output",
            "mlp_out": f"{layers}.{{layer}}.mlp.output",
        }

    def structure(self) -> dict:
        """What /v1/model/structure reports: vLLM's module tree and the hook points mapped on it."""
        meta = self.model._module
        layout = self.layout
        return {
            "model": self.model_id,
            "backend": BACKEND,
            "source": self.loaded.source,
            "architecture": self.architecture,
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "quantization": None,
            "device": str(self.loaded.device),
            "num_layers": layout.count,
            "hidden_size": self.shape.hidden,
            "vocab_size": self.vocab_size,
            "context_length": self.context_length,
            "num_parameters": sum(p.numel() for p in meta.parameters()),
            "parameter_bytes": self.shape.weight_bytes,
            "layers_path": layout.path,
            "hook_points": {
                "layer_path_template": f"{layout.path}.{{layer}}",
                "aliases": self._aliases(),
                "per_layer": list(ALIASES) if self.architecture in LLAMA_FAMILY else [],
            },
            "modules": module_tree(meta),
            "checkpoint_generation_config": self.loaded.checkpoint_generation_config,
            "adapter": None,
            "lda_before": None,
        }


class _Capture:
    """A job's capture on vLLM: the spool the worker appends to, and the recorder that turns it
    into the activation store's files."""

    def __init__(self, engine: VLLMEngine, job: GenerationJob) -> None:
        self.engine = engine
        self.job = job
        self.recorder = CaptureRecorder(job.capture, len(job.prompt_ids), _capture_facts(engine, job))
        self.spool = engine.spool_root / uuid.uuid4().hex
        self.spool.mkdir(mode=0o700)
        self.names: list[str] = []  # the spool records' order (RequestPlan.names), set with the plan
        self.result: CaptureResult | None = None

    async def write(self, positions: int, ids: list[int]) -> CaptureResult:
        """Feed the first ``positions`` spooled positions to the recorder, step by step, and
        write the manifest (on the capture thread); ``ids``: the token ids of those positions."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        future = loop.run_in_executor(self.engine._capture_executor, self._write, positions, ids)
        try:
            self.result = await asyncio.shield(future)
        except asyncio.CancelledError:  # its files are being written: let that end before any abort
            with contextlib.suppress(BaseException):
                await future
            raise
        logger.debug(
            "capture %s: %d positions written in %.3f s",
            self.result.id,
            positions,
            time.perf_counter() - started,
        )
        return self.result

    def _write(self, positions: int, ids: list[int]) -> CaptureResult:
        """The spool's first ``positions`` positions through the recorder, a few hundred at a
        time, then the manifest. Raises RuntimeError where the worker spooled fewer."""
        recorder, names = self.recorder, self.names
        dtype, width = self.engine.loaded.dtype, self.engine.shape.hidden
        with _mapped(self.spool / SPOOL_FILE) as buffer:
            records = spool_records(buffer, len(names), width, dtype)
            available = sum(n for _, n in records)
            if available < positions:
                raise RuntimeError(f"the worker spooled {available} of the {positions} positions fed in")
            fed = 0
            batch: list[tuple[tuple[int, int], int, int]] = []
            for piece in _pieces(records, positions):
                batch.append(piece)
                size = sum(end - first for _, first, end in batch)
                if size >= SPOOL_CHUNK or fed + size == positions:
                    step = {
                        name: torch.cat([spool_rows(buffer, r, j, width, dtype)[a:b] for r, a, b in batch])[
                            None
                        ]
                        for j, name in enumerate(names)
                    }
                    recorder.on_step(step, size)  # copies: nothing keeps a view of the map
                    fed += size
                    batch = []
        ids = ids[:positions]
        tokens = [self.engine.vocabulary.text(t) for t in ids]
        return recorder.finish(ids, tokens, stop=self.job.cancelled.is_set)

    def abort(self) -> None:
        """Remove what the capture wrote, unless a trace-mode capture's id already went out."""
        if self.result is None:
            self.recorder.abort()
        elif self.job.on_capture is None:  # written, but nobody was told its id
            with contextlib.suppress(KeyError):
                self.recorder.spec.sink.delete(self.result.id)

    def clean(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)


def _pieces(records: list[tuple[int, int]], positions: int):
    """The spool's first ``positions`` rows as ``(record, first row, end row)`` pieces of at most
    ``SPOOL_CHUNK`` rows (a long prompt's record is split: the replay's memory stays bounded)."""
    left = positions
    for record in records:
        first = 0
        while first < record[1] and left > 0:
            end = min(record[1], first + SPOOL_CHUNK, first + left)
            yield record, first, end
            left -= end - first
            first = end


@contextlib.contextmanager
def _mapped(path: Path):
    """A spool file's bytes, memory-mapped read-only (empty where the worker wrote nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield b""
        return
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            yield b""
            return
        with mmap.mmap(fd, size, access=mmap.ACCESS_COPY) as mapped:
            yield mapped
    finally:
        os.close(fd)


def _capture_facts(engine: VLLMEngine, job: GenerationJob) -> dict:
    """What the capture's manifest says besides its tensors (as the HF runtime's, plus the backend)."""
    return {
        "model": engine.model_id,
        "dtype": str(engine.loaded.dtype).removeprefix("torch."),
        "adapter": None,
        "quantization": None,
        "backend": BACKEND,
        "sampling": job.params.manifest(),
    }


def _logprob(step: dict, token: int, top_k: int) -> TokenLogprob:
    """The chosen token's logprob and the ``top_k`` most likely tokens, best first, from one
    step of vLLM's logprobs (``{token id: Logprob}``: the top ``top_k`` and the chosen token, an
    extra entry where it is not among them, whose rank can tie the k-th's; raw logprobs, the
    model's distribution before sampling warpers, as on the HF runtime; -inf reported as
    ``LOGPROB_FLOOR``, as there). For a prompt token, "chosen" is the token itself."""
    candidates = [(tid, lp) for tid, lp in step.items() if len(step) <= top_k or tid != token]
    ranked = sorted(candidates, key=lambda item: (item[1].rank, -item[1].logprob))
    top = tuple((tid, max(lp.logprob, LOGPROB_FLOOR)) for tid, lp in ranked[:top_k])
    return TokenLogprob(token, max(step[token].logprob, LOGPROB_FLOOR), top)


async def _to_the_end(coroutine) -> None:
    """Await ``coroutine`` to its end even if the caller is cancelled meanwhile (once or more),
    then re-raise the cancellation: cleanup that must not be cut short."""
    task = asyncio.ensure_future(coroutine)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            cancelled = True
            if task.done():
                break
    if cancelled:
        raise asyncio.CancelledError
    task.result()


async def _all_or_none(coroutines) -> list:
    """Run ``coroutines`` together and return their results in order; when one fails or this is
    cancelled, cancel the others and wait for them (their requests aborted) before raising
    (``asyncio.gather`` leaves them running)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task in done and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]


def _vllm_ends_too(row: RowState) -> bool:
    """Whether vLLM ends the request where ``row`` ended: on an EOS or stop token, or at
    ``max_tokens`` (a stop string it is not told of)."""
    last = row.token_ids[-1] if row.token_ids else None
    return last in row.stop_ids or len(row.token_ids) >= row.max_tokens


def _emit(job: GenerationJob, i: int, row: RowState, logprobs: tuple = ()) -> None:
    if job.on_delta is None:
        return
    text = row.text.take_delta()
    if text or logprobs or row.finish_reason:
        job.on_delta(ChoiceDelta(job.first_index + i, text, logprobs, row.finish_reason))


def check_backend_settings(settings) -> None:
    """Refuse, before anything loads, flags the chosen backend does not take: vLLM's flags
    without ``--backend vllm``; with it, the HF runtime's loading flags, or vLLM missing.

    Raises:
        ModelLoadError: naming the flag.
    """
    if settings.backend != BACKEND:
        if (
            settings.tensor_parallel_size != 1
            or settings.distributed_executor_backend is not None
            or settings.gpu_memory_utilization is not None
        ):
            raise ModelLoadError(
                "--tensor-parallel-size, --distributed-executor-backend and --gpu-memory-utilization "
                "need --backend vllm (docs/scale_out.md)"
            )
        return
    if importlib.util.find_spec("vllm") is None:
        raise ModelLoadError(
            "--backend vllm: vLLM is not installed in this environment; run `bash scripts/install_vllm.sh` "
            "and start the server with .venv-vllm/bin/python (docs/scale_out.md)"
        )
    refused = {
        "quantization": "--quantization (serve a checkpoint quantized for vLLM instead)",
        "adapter": "--adapter",
        "lda_before": "--lda-before (LDA runs on the hf backend)",
        "memory_budget": "--memory-budget (vLLM sizes its own cache: --gpu-memory-utilization)",
    }
    for field, flag in refused.items():
        if getattr(settings, field, None) is not None:
            raise ModelLoadError(f"{flag} is not available with --backend vllm (docs/scale_out.md)")
    if settings.device not in ("auto", "cuda", "cpu"):
        raise ModelLoadError("--device: vLLM places the model itself; use --tensor-parallel-size")


def vllm_model(source: str, accelerator: bool, **engine_args):
    """nnsight's async ``VLLM`` on ``source``: on vLLM's GPU worker (``accelerator``), else on this
    project's CPU worker (``vllm_cpu.py``).

    Raises:
        ImportError: vLLM is not installed (``scripts/install_vllm.sh``).
    """
    if accelerator:
        from nnsight.modeling.vllm import VLLM

        return VLLM(source, dispatch=True, mode="async", **engine_args)
    from .vllm_cpu import cpu_vllm

    return cpu_vllm(source, mode="async", **engine_args)
