"""Memory: what a request will cost before it runs, and what each generation did cost.

:func:`estimate` adds up, for one request, the bytes that must fit at once on
the device that holds the model (the GPU, or host memory on CPU):

* weights: already resident, the bytes of every parameter (for bitsandbytes-quantized
  weights, the packed values and their quantization statistics: ``quantization.py``);
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

from .quantization import (
    compute_dtype,
    converted_weights,
    largest_quantized_weight,
    predicted_weight_bytes,
    resident_weight_bytes,
)

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
    def of(cls, model: torch.nn.Module, num_layers: int) -> ModelShape:
        """The shape of a loaded model, its weights measured as they are resident (measure before
        the first forward: bitsandbytes' CPU kernels repack 4-bit weights then)."""
        dtype = compute_dtype(model)
        return cls._from_config(
            model.config,
            num_layers,
            weight_bytes=resident_weight_bytes(model),
            dtype_bytes=dtype.itemsize,
            dequantized_bytes=largest_quantized_weight(model) * dtype.itemsize,
        )

    @classmethod
    def predicted(cls, model: torch.nn.Module, num_layers: int, quantization: str) -> ModelShape:
        """The shape ``model`` (unquantized, built in its compute dtype, e.g. on the meta device)
        will have once loaded with ``--quantization``.

        Raises:
            ValueError: an unknown ``quantization``.
        """
        dtype = compute_dtype(model)
        largest = max((w.numel() for _, w in converted_weights(model)), default=0)
        return cls._from_config(
            model.config,
            num_layers,
            weight_bytes=predicted_weight_bytes(model, quantization),
            dtype_bytes=dtype.itemsize,
            dequantized_bytes=largest * dtype.itemsize,
        )

    @classmethod
    def _from_config(cls, config, num_layers: int, **sizes: int) -> ModelShape:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        return cls(
            layers=num_layers,
            hidden=hidden,
            intermediate=(
                getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
            ),
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            vocab=config.vocab_size,
            **sizes,
        )


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
    pattern_bytes: int = 0,
) -> MemoryEstimate:
    """Peak bytes for one request on the model's device (see the module docstring).

    ``resident_weights``: every loaded checkpoint's weights (default: this model's);
    ``pattern_bytes``: attention patterns a capture holds (``CapturePlan.pattern_device_bytes``)."""
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
    capture = sum(capture_widths) * capture_positions * b + pattern_bytes
    weights = shape.weight_bytes if resident_weights is None else resident_weights
    return MemoryEstimate(weights, kv, activations, scoring_bytes, capture)


def estimate_backward(shape: ModelShape, prompt_tokens: int) -> int:
    """Bytes a forward pass with gradient tracking and its backward pass add beside the weights
    (gradient attribution): what autograd keeps of every layer for the backward (about the
    activations ``estimate`` counts for one layer, in every layer), the attention scores of
    every layer, the float32 logits at every position, and the gradients (as large again)."""
    b = shape.dtype_bytes
    per_layer = (
        prompt_tokens * (4 * shape.hidden + 2 * shape.intermediate) * b + shape.heads * prompt_tokens**2 * b
    )
    kept = shape.layers * per_layer + prompt_tokens * shape.vocab * 4
    return 2 * kept + shape.dequantized_bytes


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


class HostMemory:
    """Hands host memory that requests freed back to the system, when the worker goes idle.

    glibc's malloc keeps the memory of freed blocks in its arenas for reuse: after one
    7,000-token scoring request and one 7,000-token capture the server's resident set (RSS)
    stayed at its high-water mark for good. ``malloc_trim(0)`` releases the free pages at the
    top of each arena and, since glibc 2.8, the free pages inside them too (``man 3
    malloc_trim``): ``scripts/bench_host_memory.py`` measured RSS 0.94 -> 1.70 GiB after those
    requests and back to 0.94 GiB, in 56 ms (docs/operations.md). It runs only when RSS grew by
    ``GROWTH_BYTES`` since the last trim, so small requests never pay for it. Elsewhere (macOS,
    musl) there is nothing to call and :meth:`release` does nothing.
    """

    GROWTH_BYTES = 64 * 2**20

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._floor = self._process.memory_info().rss
        self._trim = None
        try:
            import ctypes

            self._trim = ctypes.CDLL(None).malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
            self._trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            logger.debug("no malloc_trim here: freed host memory stays with the allocator")

    def release(self, force: bool = False) -> bool:
        """Give free allocator memory back to the system if RSS grew by ``GROWTH_BYTES`` since
        the last time (or ``force``); True if the allocator released some."""
        if self._trim is None:
            return False
        if not force and self._process.memory_info().rss - self._floor < self.GROWTH_BYTES:
            return False
        released = bool(self._trim(0))
        self._floor = self._process.memory_info().rss
        return released
