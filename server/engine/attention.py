"""Attention patterns of chosen layers and rows, read beside the model's own attention.

The model keeps its attention implementation (``sdpa`` on most models; flash or eager where
loaded so): :func:`install_taps` registers a wrapper of it with transformers'
``AttentionInterface`` (and the same mask function with ``AttentionMaskInterface``) and
switches the model to it. The wrapper calls the model's own implementation for every row, so
outputs are unchanged (tested bit for bit); only where a step asked for a pattern (an
:class:`AttentionTap` on that attention module, set for one forward) does it also run the
model family's own ``eager_attention_forward`` on that row's queries, keys and mask, the
function HF's ``output_attentions`` uses, and keep its probabilities. So no layer and no other
row switches to eager attention, and the patterns equal HF's eager ``output_attentions``.

Shapes: a pattern is ``[1, heads kept, queries, keys]`` as computed; a tap hands it on
without the row's left padding (queries at the prompt step, keys always) and position-major,
``[1, queries, heads kept, keys]``, like every other captured value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TAPS_ATTRIBUTE = "_nnsight_server_attention_taps"  # on an attention module, for one forward
_PREFIX = "nnsight_server_taps_"


@dataclass(frozen=True)
class PatternPoint:
    """Where a pattern is read: layer ``layer``'s attention module (``module_path``), the
    heads kept (None: all), stored as ``name``."""

    name: str  # "attention.layers.3.pattern"
    module_path: str  # "model.layers.3.self_attn"
    layer: int
    heads: tuple[int, ...] | None = None


@dataclass
class AttentionTap:
    """Keep row ``row``'s pattern (heads ``heads``; None: all; query rows ``queries`` only) under
    ``name`` in ``into``.

    ``columns``: the batch's columns once this step's are fed (the last query's column + 1);
    ``pad``: the row's left padding, so batch column ``c`` is the row's absolute position
    ``c - pad``. Keys are the last columns the cache holds (all of them, or a sliding
    window's); the pattern is handed on over absolute positions ``[0, columns - pad)``, zeros
    where the cache held nothing."""

    name: str
    row: int
    columns: int
    pad: int
    heads: tuple[int, ...] | None
    into: dict
    queries: tuple[int, int]  # the absolute [first, end) positions whose rows are computed


def _eager_function(module: torch.nn.Module):
    """The model family's own eager attention (``eager_attention_forward`` beside the class)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def supports_taps(model: torch.nn.Module, attention_path: str) -> bool:
    """Whether patterns can be read on this model: the attention module at ``attention_path``
    (layer 0's) calls transformers' attention interface and has an eager function beside it."""
    try:
        module = model.get_submodule(attention_path)
    except AttributeError:
        return False
    if getattr(model.config, "reorder_and_upcast_attn", False):  # GPT-2's own path, keyed to "eager"
        return False
    return _eager_function(module) is not None and hasattr(model.config, "_attn_implementation")


def install_taps(model: torch.nn.Module) -> None:
    """Switch ``model`` to a tapping wrapper of its own attention implementation (once)."""
    base = model.config._attn_implementation
    if base.startswith(_PREFIX):
        return
    name = _PREFIX + base
    AttentionInterface.register(name, _tapped(base))
    masks = AttentionMaskInterface._global_mapping
    AttentionMaskInterface.register(name, masks.get(base, masks["eager"]))
    model.set_attn_implementation(name)


def _tapped(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = _eager_function(module)
        own = eager if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        output = own(module, query, key, value, attention_mask, **kwargs)
        for tap in module.__dict__.get(TAPS_ATTRIBUTE, ()):
            tap.into[tap.name] = _pattern(eager, module, query, key, value, attention_mask, tap, kwargs)
        return output

    return attention


def _pattern(eager, module, query, key, value, mask, tap: AttentionTap, kwargs) -> torch.Tensor:
    """The tapped row's probabilities, ``[1, query rows kept, heads kept, keys]``, padding dropped.
    Only the kept query rows are computed (a long prompt's full ``[heads, P, P]`` never is)."""
    rows = slice(tap.row, tap.row + 1)
    queries, keys = query.shape[2], key.shape[2]
    base = tap.columns - queries - tap.pad  # absolute position of query row 0
    kept = slice(max(0, tap.queries[0] - base), max(0, tap.queries[1] - base))
    q, k, v = query[rows, :, kept], key[rows], value[rows]
    if mask is None or mask.dim() == 2:  # sdpa's causal shortcut, or flash's [batch, keys] padding
        causal = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(keys - queries)
        window = kwargs.get("sliding_window")
        if window:  # flash applies a sliding window inside the kernel: keys within it only
            causal &= ~torch.ones_like(causal).tril(keys - queries - window)
        mask = causal[None, None] if mask is None else (causal & mask[rows].bool()[:, None, :])[:, None]
    elif mask.shape[0] > 1:
        mask = mask[rows]
    mask = mask[:, :, kept]
    if mask.dtype == torch.bool:  # eager adds the mask to the scores
        blocked = torch.finfo(q.dtype).min
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, blocked)
    rest = {name: value for name, value in kwargs.items() if name not in ("dropout", "scaling")}
    _, probabilities = eager(module, q, k, v, mask, dropout=0.0, scaling=kwargs.get("scaling"), **rest)
    if tap.heads is not None:
        probabilities = probabilities[:, list(tap.heads)]
    first_key = tap.columns - keys - tap.pad  # < 0: padding columns; > 0: a window's cut
    if first_key < 0:
        probabilities = probabilities[..., -first_key:]
    elif first_key > 0:
        probabilities = torch.nn.functional.pad(probabilities, (first_key, 0))
    return probabilities.transpose(1, 2)


class tapping:
    """For one forward: the taps on each attention module (``{module: [AttentionTap]}``)."""

    def __init__(self, taps: dict[torch.nn.Module, list[AttentionTap]]) -> None:
        self.taps = taps

    def __enter__(self) -> None:
        for module, taps in self.taps.items():
            module.__dict__[TAPS_ATTRIBUTE] = taps

    def __exit__(self, *exc_info) -> None:
        for module in self.taps:
            module.__dict__.pop(TAPS_ATTRIBUTE, None)
