"""A left-padded batch of rows decoded one token at a time over the nnsight wrapper.

:class:`DecodeBatch` holds one side of a hand-written decode loop: the rows'
pending input ids, the attention mask (0 on left padding), position ids derived
from the mask (``mask.cumsum(-1) - 1``, so every row counts its own tokens from
0 whatever its padding), and one ``DynamicCache``. :meth:`DecodeBatch.forward`
runs one traced step (the padded prompts first, then one token per row) and
returns the last position's logits in float32; :meth:`DecodeBatch.append`
feeds the chosen tokens; :meth:`DecodeBatch.keep` drops rows that finished, so
they stop costing compute (their cache rows go too).

Interventions ride along as a :class:`~server.engine.steps.StepPlan` whose
``pads`` follow the batch, so an edit at absolute position ``p`` lands on
column ``p + pad`` of each row.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from .steps import StepPlan, placed


class DecodeBatch:
    def __init__(
        self,
        wrapper,
        prompts: list[list[int]],
        pad_token_id: int,
        *,
        edits: tuple = (),
        adapter_enabled: bool = True,
        plan=None,
    ) -> None:
        """``edits`` apply to every row; a ``plan`` (``steps.BatchStepPlan``) instead brings each
        row's own edits and captures. At most one of the two."""
        self.wrapper = wrapper
        self.adapter_enabled = adapter_enabled
        device = next(wrapper._module.parameters()).device
        width = max(len(row) for row in prompts)
        pads = [width - len(row) for row in prompts]
        self.input_ids = torch.tensor(
            [[pad_token_id] * pad + row for pad, row in zip(pads, prompts, strict=True)], device=device
        )
        self.mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads], device=device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        # With the config, each layer gets the cache its kind needs (sliding-window layers keep
        # only their window), as in HF generate.
        self.cache = DynamicCache(config=wrapper._module.config)
        if plan is None and edits:
            plan = StepPlan((), placed(edits, wrapper._module), width)
        self.plan = plan
        if self.plan is not None:
            self.plan.pads = tuple(pads)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def forward(self) -> torch.Tensor:
        """One traced step over the pending input; the next-token logits ``[rows, vocab]`` (float32)."""
        wrapper = self.wrapper
        with self._adapter(), torch.no_grad():
            with wrapper.trace(
                self.input_ids,
                attention_mask=self.mask,
                position_ids=self.positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            ):
                if self.plan is not None:
                    self.plan.run_step(wrapper)
                logits = wrapper.output.logits[:, -1].save()
        return logits.float()

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
        if self.plan is not None:
            self.plan.keep(rows)
        self._trim()

    @property
    def can_merge(self) -> bool:
        """Whether other rows can join this batch: every cache layer a plain growing one."""
        return all(type(layer).__name__ == "DynamicLayer" for layer in self.cache.layers)

    def merge(self, other: DecodeBatch) -> None:
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
        if self.plan is not None:
            self.plan.merge(other.plan, mine, theirs)
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (left by rows that left), so a
        batch that lives on under steady traffic does not grow with its history."""
        if self.mask.shape[1] <= 1 or not self.can_merge:
            return
        unused = int((self.mask.cumsum(-1) == 0).sum(-1).min())  # the smallest left padding
        if unused == 0 or unused >= self.mask.shape[1] - 1:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, unused:]
            layer.values = layer.values[:, :, unused:]
        self.mask = self.mask[:, unused:]
        if self.plan is not None:
            self.plan.shift(unused)

    def _adapter(self):
        """Run with the served LoRA adapter switched off when this side asks for it."""
        if self.adapter_enabled:
            return contextlib.nullcontext()
        return adapter_disabled(self.wrapper._module)


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
