"""References the engine is checked against, and a way to run jobs through the engine's loop.

:func:`hf_generate` runs a job through HF's own ``generate`` on the served module: HF's
decode loop, HF's sampling, with a stopping criterion and a logits processor of its own
(EOS, stop strings and ``max_tokens`` with :class:`~server.engine.text.CompletionText`,
log-softmax of the raw logits). The server never generates this way; it is the reference
its one decode loop must equal: greedy tokens equal, and seeded samples equal HF's after
``torch.manual_seed(seed)``.

:func:`run_in_loop` runs jobs through the engine's :class:`~server.engine.loop.DecodeLoop`
synchronously on the calling thread (no scheduler), as one batch.

:func:`hooked_values` reads modules' inputs and outputs with plain PyTorch hooks (the
reference for captures); :func:`hooked_greedy` is the reference for interventions: greedy
decoding by full forward passes with an edit made by a plain PyTorch forward hook.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from server.engine.hf_runtime import decode_loop
from server.engine.job import (
    FINISH_LENGTH,
    FINISH_STOP,
    Choice,
    GenerationJob,
    GenerationResult,
    TokenLogprob,
)
from server.engine.text import CompletionText


class _RawLogprobs(LogitsProcessor):
    """Keeps log-softmax of the raw scores (HF applies custom processors before its warpers)."""

    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Stop(StoppingCriteria):
    def __init__(self, job: GenerationJob, tokenizer, eos_ids, recorder: _RawLogprobs | None) -> None:
        self.params = job.params
        self.eos = (frozenset() if job.params.ignore_eos else eos_ids) | frozenset(job.params.stop_token_ids)
        self.recorder = recorder
        self.texts = [CompletionText(tokenizer, job.params.stop) for _ in range(job.params.n)]
        self.tokens: list[list[int]] = [[] for _ in range(job.params.n)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(job.params.n)]
        self.reasons: list[str | None] = [None] * job.params.n

    def __call__(self, input_ids, scores, **kwargs):
        k = self.params.logprobs
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self.reasons[i] is not None:
                continue
            self.tokens[i].append(token)
            if self.recorder is not None:
                row = self.recorder.logprobs[i]
                top = row.topk(k) if k else None
                alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if k else ()
                self.logprobs[i].append(TokenLogprob(token, row[token].item(), alternatives))
            if token in self.eos or self.texts[i].append(token):
                self.reasons[i] = FINISH_STOP
            elif len(self.tokens[i]) >= self.params.max_tokens:
                self.reasons[i] = FINISH_LENGTH
            if self.reasons[i] is not None:
                self.texts[i].finish()
        return torch.tensor([r is not None for r in self.reasons], device=input_ids.device)


def hf_generate(loaded, job: GenerationJob) -> GenerationResult:
    """The job's choices from HF ``generate`` on the served module (plain jobs only), with HF's
    own logits processors for ``logit_bias``, ``repetition_penalty``, ``min_tokens`` and
    ``min_p`` (frequency and presence penalties have none in HF). With any of those the
    recorded logprobs are of the processed logits (HF runs them before custom processors)."""
    params = job.params
    model = loaded.hf_model
    device = next(model.parameters()).device
    ids = torch.tensor([job.prompt_ids] * params.n, device=device)
    recorder = _RawLogprobs() if params.logprobs is not None else None
    stop = _Stop(job, loaded.tokenizer, loaded.eos_token_ids, recorder)
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
    processors = {}  # HF's own processors for the request's (frequency/presence have none in HF)
    if params.logit_bias:
        processors["sequence_bias"] = {(token,): bias for token, bias in params.logit_bias}
    if params.repetition_penalty != 1.0:
        processors["repetition_penalty"] = params.repetition_penalty
    if params.min_tokens:
        processors["min_new_tokens"] = params.min_tokens
        processors["eos_token_id"] = sorted(stop.eos)
    if params.min_p and not params.greedy:
        processors["min_p"] = params.min_p
    config = GenerationConfig(
        max_new_tokens=params.max_tokens, pad_token_id=loaded.tokenizer.pad_token_id, **sampling, **processors
    )
    if params.max_tokens > 0:
        with torch.random.fork_rng():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                stopping_criteria=[stop],
                logits_processor=LogitsProcessorList([recorder] if recorder else []),
            )
    choices = []
    for i in range(params.n):
        if stop.reasons[i] is None:
            stop.reasons[i] = FINISH_LENGTH
            stop.texts[i].finish()
        choices.append(
            Choice(
                index=job.first_index + i,
                text=stop.texts[i].text,
                token_ids=stop.tokens[i],
                finish_reason=stop.reasons[i],
                logprobs=stop.logprobs[i] if recorder else None,
            )
        )
    return GenerationResult(choices=choices, prompt_tokens=len(job.prompt_ids))


def run_in_loop(loaded, jobs: list[GenerationJob], before=None, **kwargs) -> list:
    """Each job's outcome (result or exception) from one run of the engine's decode loop."""
    return decode_loop(loaded, before).run(jobs, **kwargs)


def hooked_greedy(
    model, ids: list[int], module_path: str, edit, steps: int, prompt_only_len: int | None = None
):
    """Greedy decoding by full forward passes of an HF model, ``edit`` applied by a plain forward
    hook to the first tensor of ``module_path``'s output (``[1, pos, ...]``), at every position,
    or the first ``prompt_only_len`` ones. Returns the ``steps`` generated token ids."""

    def hook(_module, _args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = tensor.clone()
        limit = prompt_only_len if prompt_only_len is not None else new.shape[1]
        new[:, :limit] = edit(new[:, :limit])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.get_submodule(module_path).register_forward_hook(hook)
    ids, out = list(ids), []
    try:
        with torch.no_grad():
            for _ in range(steps):
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                out.append(token)
                ids.append(token)
    finally:
        handle.remove()
    return out


def hooked_values(model, ids: list[int], paths) -> dict[tuple[str, str], torch.Tensor]:
    """One forward over ``ids`` with plain PyTorch hooks: (module path, 'input'|'output') ->
    the value's first tensor ``[pos, ...]`` (batch row 0) at the module's first call. An input
    is the first positional argument, else the first keyword one (what nnsight's ``.input`` is)."""
    values, handles = {}, []

    def keep(key, value) -> None:  # hooks must return None, or they replace the module's values
        while isinstance(value, (tuple, list)):
            value = value[0]
        values.setdefault(key, value[0].detach().clone())

    for path, kind in paths:
        module = model.get_submodule(path)
        if kind == "input":
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs, key=(path, kind): keep(
                        key, args[0] if args else next(iter(kwargs.values()))
                    ),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, key=(path, kind): keep(key, out)))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return values
