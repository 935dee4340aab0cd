"""The HF + nnsight runtime: forward steps over left-padded batches, reads and edits through nnsight.

:class:`HFRuntime` implements the runtime contract (``runtime.py``) on the one loaded HF
model (and LDA's second checkpoint, if one was loaded). :class:`HFBatch` holds one batch:
the rows' pending input ids, the attention mask (0 on left padding), position ids from
the mask (``mask.cumsum(-1) - 1``, so every row counts its own tokens from 0 whatever
its padding), and one ``DynamicCache`` built from the model's config (sliding-window
layers keep only their window, as in HF ``generate``).

A step whose rows read or edit nothing calls the wrapped module itself
(``wrapper._module``, the same weights): an nnsight trace costs about 1 ms per call on
CPU and would buy nothing there. Any read or edit runs the step inside
``wrapper.trace`` with the batch's :class:`~server.engine.steps.BatchStepPlan`. Both
paths feed the model the same inputs, so they give the same logits (tested).

Rows that leave go with their cache rows (``keep``); rows that join arrive as a batch
that ran their prompts, and ``merge`` left-pads the shorter history so every row's
columns line up; ``_trim`` drops columns that became padding in every row, so a batch
that lives on under steady traffic does not grow with its history.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import torch
from transformers import DynamicCache

from interventions import placed

from .attention import install_taps, supports_taps
from .attribution import freeze
from .constraints import Constraints
from .hooks import HookPoint, HookResolver, first_tensor
from .interrupt import LayerGate
from .loading import LoadedModel
from .loop import DecodeLoop
from .runtime import RowGroup
from .steps import BatchStepPlan
from .structure import find_layers
from .vocab import build_vocabulary


class HFRuntime:
    """The served model (and LDA's ``--lda-before`` checkpoint, if loaded) as a runtime."""

    def __init__(self, served: LoadedModel, before: LoadedModel | None = None) -> None:
        self.served = served
        self.before = before
        self.device = served.device
        self.pad_token_id = served.tokenizer.pad_token_id
        layout = find_layers(served.hf_model)
        attention = f"{layout.path}.0.{layout.attention}" if layout.attention else None
        # attention patterns (capture.attention) are read where the model's attention allows it
        self.reads_patterns = attention is not None and supports_taps(served.hf_model, attention)
        if self.reads_patterns:
            install_taps(served.hf_model)
        self.layout = layout
        self.layers_path = layout.path
        for loaded in (served, before):  # the server never trains: no weight ever needs a gradient
            if loaded is not None:
                freeze(loaded.hf_model)
        self.gate = LayerGate(
            layer
            for loaded in (served, before)
            if loaded is not None
            for layer in loaded.hf_model.get_submodule(find_layers(loaded.hf_model).path)
        )

    def interrupted_when(self, stop):
        """See ``Runtime.interrupted_when``: a pre-hook on every decoder layer checks ``stop``."""
        return self.gate.watching(stop)

    def _wrapper(self, weights: str):
        if weights == "before_model":
            if self.before is None:
                raise ValueError("no --lda-before checkpoint is loaded")
            return self.before.wrapper
        if weights not in ("served", "adapter_off"):
            raise ValueError(f"unknown weights {weights!r}")
        return self.served.wrapper

    @property
    def joins_running_batches(self) -> bool:
        """Whether rows can join a running batch: the model's cache is plain growing layers (a
        sliding-window layer keeps only its window and cannot be aligned with newcomers)."""
        return _growing_only(DynamicCache(config=self.served.hf_model.config))

    def place(self, edits: tuple) -> tuple:
        """The edits' vectors and patch sources on the served model's device and dtype."""
        return placed(edits, self.served.hf_model)

    def start(self, weights: str, groups: list[RowGroup]) -> HFBatch:
        return HFBatch(
            self._wrapper(weights), groups, self.pad_token_id, adapter_enabled=weights != "adapter_off"
        )

    @functools.cached_property
    def skips_layers(self) -> bool:
        """Whether a batch can skip its first layers (``HFBatch.skip_layers``): every decoder layer
        returns one bare tensor, so a replacement for it is one, and none passes state to later
        layers beside it (Gemma 4's shared KV: a skipped layer would leave it unset). Measured on
        first use (a patching sweep), on the worker: one short forward pass."""
        model = self.served.hf_model
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "num_kv_shared_layers", 0):
            return False
        resolver = HookResolver(model, self.layout)
        return all(resolver.returns_tensor(f"{self.layout.path}.{i}") for i in range(self.layout.count))

    def resume(self, source: HFBatch, length: int, groups: list[RowGroup]) -> HFBatch:
        """A batch of ``groups`` (one prompt, every row) whose first ``length`` tokens ``source``
        already ran: its row 0's cache of them is shared (cropped and repeated), and only the
        rest of the prompt is fed. For runs that differ from ``source``'s only from position
        ``length`` on (a patching sweep's cells). ``source`` must have run that prompt's step,
        on plain growing cache layers, with no padding in row 0."""
        return HFBatch.resumed(source, length, groups)

    def read_prompts(
        self, prompts: list[list[int]], points: tuple[HookPoint, ...]
    ) -> list[dict[str, torch.Tensor]]:
        """One batched forward over ``prompts``; per prompt, each point's value ``[positions, ...]``
        (no padding) on the model's device. For contrastive vectors and analyses."""
        found: list[dict[str, torch.Tensor]] = [{} for _ in prompts]
        groups = [
            RowGroup(prompt, reads=points, on_values=lambda values, into=into: into.update(values))
            for prompt, into in zip(prompts, found, strict=True)
        ]
        batch = self.start("served", groups)
        batch.forward()
        for group in groups:
            if group.error is not None:
                raise group.error
        return [{name: first_tensor(value)[0] for name, value in values.items()} for values in found]


def decode_loop(
    served: LoadedModel,
    before: LoadedModel | None = None,
    *,
    token_text=None,
    manifest_facts: dict | None = None,
    logits_module: str | None = None,
) -> DecodeLoop:
    """The one decode loop over this runtime: what the engine runs, and what scripts and tests
    use in process (``loop.run(jobs)``). ``token_text``: one token's text for capture
    manifests (default: built from the tokenizer)."""
    width = served.hf_model.get_output_embeddings().weight.shape[0]
    return DecodeLoop(
        HFRuntime(served, before),
        served.tokenizer,
        served.eos_token_ids,
        token_text=token_text or build_vocabulary(served.tokenizer).text,
        manifest_facts=manifest_facts,
        logits_module=logits_module,
        constraints=Constraints(served.tokenizer, width, served.eos_token_ids),
    )


class HFBatch:
    """One batch of rows on one set of weights (see the module docstring)."""

    def __init__(
        self, wrapper, groups: list[RowGroup], pad_token_id: int, *, adapter_enabled: bool = True
    ) -> None:
        self.wrapper = wrapper
        self.model = wrapper._module
        self.adapter_enabled = adapter_enabled
        device = next(self.model.parameters()).device
        prompts = [list(g.prompt_ids) for g in groups for _ in range(g.n)]
        width = max(len(row) for row in prompts)
        pads = [width - len(row) for row in prompts]
        self.input_ids = torch.tensor(
            [[pad_token_id] * pad + row for pad, row in zip(pads, prompts, strict=True)], device=device
        )
        self.mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads], device=device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=self.model.config)
        self.plan = BatchStepPlan(groups, width)
        self.plan.pads = tuple(pads)
        self.full_logits = any(g.full_logits for g in groups)  # the prompt step's logits, every position
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @classmethod
    def resumed(cls, source: HFBatch, length: int, groups: list[RowGroup]) -> HFBatch:
        """See ``HFRuntime.resume``."""
        (prompt,) = {tuple(group.prompt_ids) for group in groups}
        rows = sum(group.n for group in groups)
        if not 0 < length < len(prompt) or not _growing_only(source.cache):
            raise ValueError(
                "a resumed batch needs a cached prefix of plain growing layers, shorter than the prompt"
            )
        batch = cls.__new__(cls)
        batch.wrapper, batch.model, batch.adapter_enabled = (
            source.wrapper,
            source.model,
            source.adapter_enabled,
        )
        device = source.mask.device
        batch.input_ids = torch.tensor([list(prompt[length:])] * rows, device=device)
        batch.mask = torch.ones((rows, len(prompt)), dtype=source.mask.dtype, device=device)
        batch.positions = torch.arange(length, len(prompt), device=device).expand(rows, -1)
        cache = copy.deepcopy(source.cache)
        cache.batch_select_indices(torch.tensor([0], device=device))
        cache.crop(length - cache.get_seq_length())  # a negative count: the tokens to drop
        cache.batch_repeat_interleave(rows)
        batch.cache = cache
        batch.plan = BatchStepPlan(groups, len(prompt))
        batch.plan.pads = (0,) * rows
        batch.plan.start, batch.plan.fed = length, len(prompt) - length
        batch.full_logits = False
        batch._keeps_logits = source._keeps_logits
        return batch

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def forward(self) -> torch.Tensor:
        """One step over the pending input; the next-token logits ``[rows, vocab]`` (float32)."""
        inputs = dict(
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        if self._keeps_logits and not self.full_logits:
            inputs["logits_to_keep"] = 1
        self.full_logits = False  # only ever the prompt step
        with self._adapter(), torch.no_grad():
            with self.plan.attention_taps(self.model):
                if self.plan.empty:
                    logits = self.model(self.input_ids, **inputs).logits[:, -1]
                else:
                    with self.wrapper.trace(self.input_ids, **inputs):
                        self.plan.run_step(self.wrapper)
                        logits = self.wrapper.output.logits[:, -1].save()
            self.plan.deliver()
        return logits.float()

    def skip_layers(self, layers_path: str, count: int, output: torch.Tensor) -> None:
        """The coming step does not run the first ``count`` decoder layers: layer ``count - 1``'s
        output is ``output`` (``[rows, positions fed, d_model]``; the layers before it are never
        read), through nnsight's ``skip``. Their cache is not written, so the batch takes no
        further step (a patching sweep's cells, whose early layers are the corrupted run's).

        Raises:
            ValueError: the batch has already run a step."""
        if self.plan.start != 0 and self.plan.fed is None:
            raise ValueError("skip_layers is for a batch's first (and only) step")
        self.plan.skips = [(f"{layers_path}.{i}", output) for i in range(count)]

    def append(self, tokens: torch.Tensor) -> None:
        """Make ``tokens`` (one per row) the next step's input."""
        self.input_ids = tokens.reshape(-1, 1).to(self.mask.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.input_ids)], dim=-1)
        self.positions = self.mask.sum(-1, keepdim=True) - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indexes into the current batch), in that order."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.input_ids = self.input_ids[index]
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.cache.batch_select_indices(index)
        self.plan.keep(rows)
        self._trim()

    @property
    def can_merge(self) -> bool:
        """Whether other rows can join this batch: every cache layer a plain growing one."""
        return _growing_only(self.cache)

    def merge(self, other: HFBatch) -> None:
        """Take ``other``'s rows (after this batch's), both having just had ``append`` called.

        The shorter history is left-padded (zeros in the cache, 0 in the mask) so that every
        row's columns line up; a row's absolute positions are unchanged (its padding grew).
        """
        width, other_width = self.mask.shape[1], other.mask.shape[1]
        mine, theirs = max(0, other_width - width), max(0, width - other_width)
        for layer, other_layer in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.keys = torch.cat([_left_pad(layer.keys, mine), _left_pad(other_layer.keys, theirs)])
            layer.values = torch.cat([_left_pad(layer.values, mine), _left_pad(other_layer.values, theirs)])
        self.mask = torch.cat([_left_pad(self.mask, mine, dim=1), _left_pad(other.mask, theirs, dim=1)])
        self.input_ids = torch.cat([self.input_ids, other.input_ids])
        self.positions = self.mask.sum(-1, keepdim=True) - 1
        self.plan.merge(other.plan, mine, theirs)
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (left by rows that left)."""
        if self.mask.shape[1] <= 1 or not self.can_merge:
            return
        unused = int((self.mask.cumsum(-1) == 0).sum(-1).min())  # the smallest left padding
        if unused == 0 or unused >= self.mask.shape[1] - 1:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, unused:]
            layer.values = layer.values[:, :, unused:]
        self.mask = self.mask[:, unused:]
        self.plan.shift(unused)

    def _adapter(self):
        """Run with the served LoRA adapter switched off when this batch asks for it."""
        if self.adapter_enabled:
            return contextlib.nullcontext()
        return adapter_disabled(self.model)


def _growing_only(cache: DynamicCache) -> bool:
    """Every layer of ``cache`` a plain growing one (rows can be merged in)."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


def _left_pad(tensor: torch.Tensor, count: int, dim: int = 2) -> torch.Tensor:
    """``count`` zeros before ``tensor``'s entries along ``dim`` (the sequence dimension)."""
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@contextlib.contextmanager
def adapter_disabled(hf_model: torch.nn.Module):
    """The same weights without the PEFT adapter, for the duration of the block."""
    hf_model.disable_adapters()
    try:
        yield
    finally:
        hf_model.enable_adapters()
