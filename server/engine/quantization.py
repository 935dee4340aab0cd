"""Quantized weights: what ``--quantization`` means and what quantized weights hold.

This module owns:

* the methods (:data:`QUANTIZATIONS`) and their ``transformers.BitsAndBytesConfig``
  (:func:`bnb_config`: the settings ``transformers serve --quantization`` uses);
* what a loaded model really is (:func:`detect`): a checkpoint may arrive quantized
  already, whatever the flag says;
* the bytes quantized weights hold, measured on a loaded model
  (:func:`resident_weight_bytes`) and predicted for a model built on the meta device
  (:func:`predicted_weight_bytes`, for ``scripts/memory_table.py``), and the largest weight
  a prompt's forward dequantizes at once (:func:`largest_quantized_weight`).

Layouts are bitsandbytes 0.50's on CUDA (the lock's release). On a CPU, bitsandbytes
repacks 4-bit weights for its kernels at the first forward pass (absmax values as
bfloat16, no nested statistics), a few percent either way of what is measured at load.
"""

from __future__ import annotations

import sys

import torch

QUANTIZATIONS = ("bnb-8bit", "bnb-4bit")
NF4_BLOCK = 64  # values per absmax (bitsandbytes' 4-bit default)
NESTED_BLOCK = 256  # absmax values per float32 statistic under double quantization
# Where the locked bitsandbytes is installed by scripts/install.sh (pyproject.toml's marker).
BNB_PLATFORMS = "Linux x86-64 and aarch64, Windows x86-64"


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """The ``transformers.BitsAndBytesConfig`` for ``--quantization``.

    ``bnb-4bit``: NF4 with double quantization (Dettmers et al. 2023, "QLoRA"), as
    ``transformers serve --quantization bnb-4bit``, computing in ``compute_dtype``;
    ``bnb-8bit``: LLM.int8() (Dettmers et al. 2022), whose matmuls run in float16 and return
    ``compute_dtype``.

    Raises:
        ValueError: ``quantization`` is not one of :data:`QUANTIZATIONS`.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")


def detect(model: torch.nn.Module) -> str | None:
    """How a loaded HF model's weights are quantized: ``bnb-4bit``, ``bnb-8bit``, another
    method's name as its checkpoint gives it (``gptq``, ``awq``, ``fp8``, ...), or None."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        method, four_bit = config.get("quant_method"), config.get("load_in_4bit")
    else:
        method, four_bit = getattr(config, "quant_method", None), getattr(config, "load_in_4bit", False)
    method = getattr(method, "value", method)  # an enum in transformers' config classes
    if method == "bitsandbytes":
        return "bnb-4bit" if four_bit else "bnb-8bit"
    return str(method) if method else "unknown"


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype activations run in: the first floating-point parameter's (quantized weights
    are integers; embeddings and norms stay in the compute dtype)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _bnb_linear_types() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")  # loaded by transformers when a model is quantized
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def _statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """What a bitsandbytes layer keeps beside its packed weight: 4-bit: per-block ``absmax``,
    the NF4 map and, with double quantization, the absmax values' own statistics; 8-bit: the
    per-row scales ``SCB`` (on the weight until the first forward, on ``module.state`` after)."""
    weight = module.weight
    found = [getattr(weight, "SCB", None)]
    state = getattr(module, "state", None)
    if found[0] is None and state is not None:
        found = [getattr(state, "SCB", None)]
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        found += [quant_state.absmax, quant_state.code, getattr(quant_state, "offset", None)]
        nested = getattr(quant_state, "state2", None)
        if nested is not None:
            found += [nested.absmax, nested.code]
    return [t for t in found if isinstance(t, torch.Tensor)]


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights hold: every parameter once (tied weights are one parameter),
    plus each bitsandbytes layer's quantization statistics (bitsandbytes 0.50 allocates them
    per layer: nothing is shared). Meta tensors count by shape."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    bnb_linears = _bnb_linear_types()
    if bnb_linears:
        for module in model.modules():
            if isinstance(module, bnb_linears):
                total += sum(t.numel() * t.element_size() for t in _statistics(module))
    return total


def largest_quantized_weight(model: torch.nn.Module) -> int:
    """Values in the largest bitsandbytes-quantized weight of a loaded model (0: none)."""
    bnb_linears = _bnb_linear_types()
    if not bnb_linears:
        return 0
    return max(
        (m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb_linears)), default=0
    )


def converted_weights(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """The (module, weight) pairs transformers' bitsandbytes integration quantizes in an
    unquantized model: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output embeddings,
    tied weights, the last module and the model's ``_keep_in_fp32_modules``
    (``HfQuantizer.get_modules_to_not_convert``, as the bitsandbytes quantizers call it)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return [
        (module, module.weight)
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, keep)
    ]


def predicted_weight_bytes(model: torch.nn.Module, quantization: str) -> int:
    """What :func:`resident_weight_bytes` measures once ``model`` (unquantized, built in its
    compute dtype, e.g. on the meta device) is loaded with ``--quantization``.

    Per converted weight of ``n`` values (:func:`converted_weights`): ``bnb-4bit`` (NF4,
    double quantization) packs two values a byte, keeps one uint8 absmax per 64 values, one
    float32 per 256 of those, a 16-entry float32 NF4 map, a 256-entry float32 map for the
    absmax values and a float32 offset; ``bnb-8bit`` (LLM.int8()) keeps ``n`` int8 values and
    one float32 scale per output row. Every other parameter (embeddings, norms, biases, the
    unembedding, mixture-of-experts weights held as 3-D parameters) stays as it is.

    Raises:
        ValueError: ``quantization`` is not one of :data:`QUANTIZATIONS`.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    converted = converted_weights(model)
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
