"""Memory: what a request will cost before it runs, and what each generation did cost.

:func:`estimate` adds up, for one request, the bytes that must fit at once on
the device that holds the model (the GPU, or host memory on CPU):

* weights: already resident, the bytes of every parameter (for bitsandbytes-quantized
  weights, the packed values and their quantization statistics: :func:`resident_weight_bytes`;
  before loading, :func:`quantized_weight_bytes` predicts them);
* KV cache: ``n x (prompt + max_tokens) x layers x 2 x kv_heads x head_dim x dtype bytes``;
* activations of the prompt forward (the largest step): ``n x prompt x (4 x hidden +
  2 x intermediate) x dtype bytes`` for the residual and MLP buffers, plus
  ``n x heads x prompt^2 x dtype bytes`` for attention scores (kernels that never
  materialise them need less; this stays on the safe side), plus the last
  position's logits in float32, plus, for quantized weights, the largest quantized weight
  dequantized to the compute dtype (bitsandbytes does that per layer for a prompt's matmul);
* prompt scoring (``echo`` with logprobs): ``prompt x vocab x dtype bytes`` of logits;
* capture: every planned value of the prompt forward (``prompt x width x dtype
  bytes`` each, widths measured at start-up); later steps add one position at a time
  and leave the device at once.

It is an estimate, meant to refuse what clearly cannot fit; docs/memory.md
works an example. :class:`MemoryLog` measures what a generation really used
and logs one ``[memory]`` line for it.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from dataclasses import dataclass

import psutil
import torch

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
MIB = 2**20


def parse_size(text: str | int) -> int:
    """'16GB' -> 16e9, '16GiB' -> 16 x 2^30, '512MB', '1.5G', or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 16GB, 16GiB or 512MB)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / MIB:.1f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the served model.

    ``weight_bytes``: resident weights (quantization statistics included); ``dtype_bytes``: the
    compute dtype's size (activations, KV cache, captures); ``dequantized_bytes``: the largest
    quantized weight in the compute dtype (0 where nothing is quantized)."""

    weight_bytes: int
    dtype_bytes: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dequantized_bytes: int = 0

    @classmethod
    def of(cls, model: torch.nn.Module, num_layers: int, quantization: str | None = None) -> ModelShape:
        """The shape of ``model`` as loaded; or, with ``quantization`` (``bnb-8bit`` or
        ``bnb-4bit``), of ``model`` (built in its compute dtype, e.g. on the meta device) once
        loaded with that ``--quantization``."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        intermediate = (
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        )
        compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if quantization is None:
            weight_bytes = resident_weight_bytes(model)
            quantized = [m.out_features * m.in_features for m in model.modules() if _is_quantized_linear(m)]
        else:
            weight_bytes = quantized_weight_bytes(model, quantization)
            quantized = [w.numel() for _, w in _bnb_converted_weights(model)]
        return cls(
            weight_bytes=weight_bytes,
            dtype_bytes=compute_dtype.itemsize,
            layers=num_layers,
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            dequantized_bytes=max(quantized, default=0) * compute_dtype.itemsize,
        )


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return hasattr(module, "in_features") and (
        getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None
    )


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights hold: every parameter once (tied weights are one parameter),
    plus what a bitsandbytes-quantized weight keeps beside its packed values (4-bit: per-block
    ``absmax``, the NF4 map and, with double quantization, their own statistics; 8-bit: per-row
    scales ``SCB``), counted per weight even where bitsandbytes shares a small constant map
    between layers (a few KiB per layer at most: the count stays on the safe side and equals
    :func:`quantized_weight_bytes`). Meta tensors count by shape."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for parameter in model.parameters():
        extras = [getattr(parameter, "SCB", None)]
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            extras += [state.absmax, state.code, getattr(state, "offset", None)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                extras += [nested.absmax, nested.code]
        total += sum(t.numel() * t.element_size() for t in extras if isinstance(t, torch.Tensor))
    return total


def _bnb_converted_weights(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """The (module, weight) pairs that transformers' bitsandbytes integration quantizes: every
    ``nn.Linear`` and GPT-2 ``Conv1D`` except the output embeddings, tied weights and the last
    module (``transformers.quantizers.base.get_keys_to_not_convert``)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = get_keys_to_not_convert(model)
    return [
        (module, module.weight)
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, keep)
    ]


NF4_BLOCK = 64  # values per absmax (bitsandbytes' 4-bit default)
NESTED_BLOCK = 256  # absmax values per float32 statistic under double quantization


def quantized_weight_bytes(model: torch.nn.Module, quantization: str) -> int:
    """What :func:`resident_weight_bytes` will measure once ``model`` (built in its compute
    dtype, e.g. on the meta device) is loaded with ``--quantization``.

    Per converted weight of ``n`` values (:func:`_bnb_converted_weights`): ``bnb-4bit`` (NF4,
    double quantization; Dettmers et al. 2023, "QLoRA") packs two values a byte, keeps one
    uint8 absmax per 64 values, one float32 per 256 of those, a 16-entry float32 NF4 map, a
    256-entry float32 map for the absmax values and a float32 offset; ``bnb-8bit`` (LLM.int8(),
    Dettmers et al. 2022) keeps ``n`` int8 values and one float32 scale per output row. Every
    other parameter (embeddings, norms, biases, the unembedding) stays as it is.

    Raises:
        ValueError: ``quantization`` is not ``bnb-8bit`` or ``bnb-4bit``.
    """
    if quantization not in ("bnb-8bit", "bnb-4bit"):
        raise ValueError(f"unknown quantization {quantization!r}")
    converted = _bnb_converted_weights(model)
    converted_ids = {id(weight) for _, weight in converted}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in converted_ids)
    for module, weight in converted:
        values = weight.numel()
        if quantization == "bnb-4bit":
            blocks = -(-values // NF4_BLOCK)
            total += -(-values // 2) + blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * (16 + 256 + 1)
        else:
            # an nn.Linear weight is [out, in], a Conv1D one [in, out]
            output_rows = weight.shape[0] if type(module) is torch.nn.Linear else weight.shape[1]
            total += values + 4 * output_rows
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    scoring: int
    capture: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.scoring + self.capture

    def describe(self) -> str:
        parts = [
            ("weights", self.weights),
            ("KV cache", self.kv_cache),
            ("activations", self.activations),
            ("prompt scoring", self.scoring),
            ("capture", self.capture),
        ]
        return ", ".join(f"{name} {format_size(size)}" for name, size in parts if size)


def estimate(
    shape: ModelShape,
    *,
    prompt_tokens: int,
    max_tokens: int,
    n: int = 1,
    capture_widths: tuple[int, ...] = (),
    capture_positions: int = 0,
    scoring: bool = False,
    resident_weights: int | None = None,
) -> MemoryEstimate:
    """Peak bytes for one request on the model's device (see the module docstring).

    ``resident_weights``: every loaded checkpoint's weights (default: this model's)."""
    b = shape.dtype_bytes
    tokens = prompt_tokens + max_tokens
    kv = n * tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim * b
    activations = (
        n * prompt_tokens * (4 * shape.hidden + 2 * shape.intermediate) * b
        + n * shape.heads * prompt_tokens * prompt_tokens * b
        + n * shape.vocab * 4
        + shape.dequantized_bytes
    )
    scoring_bytes = (
        prompt_tokens * shape.vocab * b + min(prompt_tokens, 256) * shape.vocab * 4 if scoring else 0
    )
    capture = sum(capture_widths) * capture_positions * b
    weights = shape.weight_bytes if resident_weights is None else resident_weights
    return MemoryEstimate(weights, kv, activations, scoring_bytes, capture)


def estimate_lda(
    after: ModelShape,
    before: ModelShape,
    *,
    rows: int,
    after_prompt: int,
    before_prompt: int,
    max_tokens: int,
    resident_weights: int,
) -> MemoryEstimate:
    """Peak bytes of an LDA request: both sides' KV caches for every row, the larger prompt
    forward (the sides run one after the other), and a handful of ``[rows, vocab]`` float32
    tensors (both sides' logits, the amplified logits, probabilities, log-softmaxes)."""
    sides = [(after, after_prompt), (before, before_prompt)]
    kv = sum(
        rows * (prompt + max_tokens) * shape.layers * 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes
        for shape, prompt in sides
    )
    activations = max(
        rows * prompt * (4 * shape.hidden + 2 * shape.intermediate) * shape.dtype_bytes
        + rows * shape.heads * prompt * prompt * shape.dtype_bytes
        + shape.dequantized_bytes
        for shape, prompt in sides
    )
    activations += 8 * rows * after.vocab * 4
    return MemoryEstimate(resident_weights, kv, activations, 0, 0)


class MemoryLog:
    """Measures one generation: ``with MemoryLog(device, "generate", max_new_tokens=N): ...``.

    On CUDA: allocated bytes before and after, and the peak in between. On CPU:
    the process's resident memory before and after, and its peak over the
    process's life (the operating system keeps no per-request peak).
    """

    def __init__(self, device: torch.device, what: str, **fields) -> None:
        self.device = device
        self.what = what
        self.fields = fields

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return psutil.Process().memory_info().rss

    def __enter__(self) -> MemoryLog:
        return self.start()

    def start(self) -> MemoryLog:
        """Measure from now (on CUDA the peak counter starts again)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.before = self._now()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.report()

    def report(self, **fields) -> None:
        """Log one ``[memory]`` line: before (at ``start``), now, the peak since, and ``fields``
        (with the constructor's). A batch reports once per job, as each job ends."""
        after = self._now()
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        extra = " ".join(f"{key}={value}" for key, value in {**self.fields, **fields}.items())
        logger.info(
            "[memory] %s: before=%dMiB after=%dMiB peak=%dMiB %s seconds=%.3f",
            self.what,
            self.before // MIB,
            after // MIB,
            peak // MIB,
            extra,
            time.perf_counter() - self.started,
        )
