#!/usr/bin/env python
"""The server's memory estimate for one model shape, as the table docs/memory.md shows.

Run from the repository root (after ``bash scripts/install.sh``)::

    .venv/bin/python scripts/memory_table.py                  # Qwen3-0.6B (bfloat16), Qwen3-8B (4-bit)
    .venv/bin/python scripts/memory_table.py --model Qwen/Qwen3-1.7B --budget 16GB --prompt-tokens 512
    .venv/bin/python scripts/memory_table.py --model Qwen/Qwen3-14B --quantization bnb-4bit

The model is built on the meta device from its configuration (no weights are read or
allocated; the built-in shape needs no download, ``--model`` reads a local folder's or
the hub's ``config.json``; ``--quantization`` counts the weights as bitsandbytes will hold
them, ``quantization.predicted_weight_bytes``). For each ``max_tokens`` and each capture (none; ``resid_post``
and ``mlp_out`` of 8 layers; of every layer) it prints what ``--memory-budget`` adds up
for one request (``server/engine/memory.py``, as the server's admission does, generate-mode
capture included), and what the budget does with one such request and with 8 at once: a
request over the budget is refused up front (400 ``memory_budget_exceeded``); requests
that fit alone but not together wait for room (the scheduler keeps each batch within the
budget) instead of running out of memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import QWEN3_06B  # noqa: E402  (Qwen3-0.6B's published shape)

from server.engine.capture import CapturePlan  # noqa: E402
from server.engine.hooks import HookPoint  # noqa: E402
from server.engine.memory import ModelShape, estimate, format_size, parse_size  # noqa: E402
from server.engine.quantization import QUANTIZATIONS  # noqa: E402

# Qwen3-8B as published (config.json of Qwen/Qwen3-8B): too large for a 16 GB card in bfloat16
# (16.4 GB of weights), the model --quantization bnb-4bit is for.
QWEN3_8B = dict(
    QWEN3_06B,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
DEFAULT_TABLES = (  # (shape, quantization) printed without --model
    ("Qwen3-0.6B (published shape)", QWEN3_06B, None),
    ("Qwen3-8B (published shape), weights in 4 bits (`--quantization bnb-4bit`)", QWEN3_8B, "bnb-4bit"),
)
MAX_TOKENS = (512, 1024, 2048)
CAPTURED_LAYERS = (0, 8, None)  # None: every layer
HOOK_POINTS = 2  # resid_post and mlp_out, each [pos, hidden]
CONCURRENT = 8
LIMITS = [  # (what the row asks, how it differs from the defaults)
    ("a 4,096-token prompt", {"prompt": 4096}),
    ("a 16,384-token prompt", {"prompt": 16384}),
    ("a 32,768-token prompt", {"prompt": 32768}),
    ("a 16,384-token prompt, no capture", {"prompt": 16384, "layers": 0}),
    ("`n` 64 choices", {"n": 64}),
    ("scoring a 16,384-token prompt (`echo` + `logprobs`, `max_tokens` 0, no capture)",
     {"prompt": 16384, "max_tokens": 0, "layers": 0, "scoring": True}),
]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a local folder or hub id whose config to use (default: Qwen3-0.6B)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quantization", choices=QUANTIZATIONS, help="as the server's flag")
    parser.add_argument("--budget", default="16GB", help="--memory-budget to check against")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    return parser.parse_args(argv)


def model_shape(model: str | dict, dtype: str, quantization: str | None = None) -> ModelShape:
    """The shape of ``model`` (a folder or hub id, or a Qwen3 configuration's fields) as the
    server would load it, from a model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**model) if isinstance(model, dict) else AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    layers = config.get_text_config().num_hidden_layers
    if quantization is None:
        return ModelShape.of(built, layers)
    return ModelShape.predicted(built, layers, quantization)


def default_tables(dtype: str, budget: int, prompt_tokens: int) -> str:
    """The tables docs/memory.md shows: Qwen3-0.6B, and Qwen3-8B with 4-bit weights."""
    return "\n\n".join(
        markdown(name, model_shape(shape, dtype, quantization), dtype, budget, prompt_tokens)
        for name, shape, quantization in DEFAULT_TABLES
    )


def admission(shape: ModelShape, budget: int, dtype: str):
    """The server's own admission check (``server/serving/admission.py``) for this shape and
    budget, without a model: it reads only the engine's static facts and the settings."""
    from server.config import Settings
    from server.serving.admission import Admission

    engine = SimpleNamespace(
        model_id="model",
        loaded=SimpleNamespace(source=None, dtype=getattr(torch, dtype)),
        shape=shape,
        resident_weight_bytes=shape.weight_bytes,
    )
    capture_limit = Settings.model_fields["max_capture_bytes"].default  # the server's default
    settings = SimpleNamespace(model="model", memory_budget=budget, max_capture_bytes=capture_limit)
    return Admission(engine, settings)


def capture_plan(shape: ModelShape, layers: int) -> CapturePlan | None:
    """A generate-mode capture of ``resid_post`` and ``mlp_out`` (``[pos, hidden]``) in ``layers`` layers."""
    if not layers:
        return None
    points = tuple(
        HookPoint(f"layers.{i}.{hook}", f"model.layers.{i}", "output", i, hook, order, shape.hidden)
        for order, (i, hook) in enumerate(
            (i, hook) for i in range(layers) for hook in ("mlp_out", "resid_post")
        )
    )
    return CapturePlan(points=points, mode="generate")


def verdict(check, shape: ModelShape, *, prompt: int, max_tokens: int, layers: int, n: int = 1,
            scoring: bool = False) -> tuple[int | None, str]:  # fmt: skip
    """Bytes the request adds beside the weights (None: refused) and what the server says."""
    from server.errors import APIError

    try:
        added = check.check_memory(
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            n=n,
            plan=capture_plan(shape, layers),
            scoring=scoring,
            prompt_param="messages",
            max_tokens_param="max_tokens",
        )
    except APIError as refusal:
        return None, f"400 `{refusal.code}`, naming `{refusal.param}`"
    return added, "admitted"


def markdown(name: str, shape: ModelShape, dtype: str, budget: int, prompt_tokens: int) -> str:
    check = admission(shape, budget, dtype)
    lines = [
        f"{name}, {dtype}, a {prompt_tokens}-token prompt, `--memory-budget` {format_size(budget)}; "
        f"weights {format_size(shape.weight_bytes)}. Capture: `resid_post` and `mlp_out`, generate mode.",
        "",
        "| max_tokens | captured | KV cache | prompt activations | capture on the device | one request "
        f"| {CONCURRENT} at once | what the budget does |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for max_tokens in MAX_TOKENS:
        for layers in CAPTURED_LAYERS:
            captured = shape.layers if layers is None else layers
            e = estimate(
                shape,
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens + (1 if captured else 0),  # generate mode feeds the last token in
                capture_widths=(shape.hidden,) * (captured * HOOK_POINTS),
                capture_positions=prompt_tokens if captured else 0,
            )
            added, said = verdict(check, shape, prompt=prompt_tokens, max_tokens=max_tokens, layers=captured)
            if added is None:
                does = f"refuses each request: {said}"
            else:
                # the scheduler keeps a batch's added bytes within the budget beside the weights
                at_once = min(CONCURRENT, (budget - shape.weight_bytes) // added)
                does = (
                    f"admits all {CONCURRENT}, in one batch"
                    if at_once >= CONCURRENT
                    else f"admits each; {at_once} run at once, the rest wait for room"
                )
            label = "none" if not captured else f"{captured} layers x {HOOK_POINTS}"
            lines.append(
                f"| {max_tokens} | {label} | {format_size(e.kv_cache)} | {format_size(e.activations)} "
                f"| {format_size(e.capture) if e.capture else '0'} | {format_size(e.total)} "
                f"| {format_size(e.weights + CONCURRENT * (e.total - e.weights))} | {does} |"
            )
    lines += [
        "",
        f"Where {format_size(budget)} says no (one request, `max_tokens` 2048, every layer captured as "
        "above, unless the row says otherwise):",
        "",
        "| request | estimate | the server's answer |",
        "| --- | --- | --- |",
    ]
    for label, kwargs in LIMITS:
        fields = {"prompt": prompt_tokens, "max_tokens": 2048, "layers": shape.layers, **kwargs}
        e = estimate(
            shape,
            prompt_tokens=fields["prompt"],
            max_tokens=fields["max_tokens"] + (1 if fields["layers"] else 0),
            n=fields.get("n", 1),
            capture_widths=(shape.hidden,) * (fields["layers"] * HOOK_POINTS),
            capture_positions=fields["prompt"] if fields["layers"] else 0,
            scoring=fields.get("scoring", False),
        )
        _, said = verdict(check, shape, **fields)
        lines.append(f"| {label} | {format_size(e.total)} | {said} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = parse_size(args.budget)
    if args.model is None and args.quantization is None:
        print(default_tables(args.dtype, budget, args.prompt_tokens))
        return
    model = QWEN3_06B if args.model is None else args.model
    name = (args.model or "Qwen3-0.6B (published shape)") + (
        f", weights `--quantization {args.quantization}`" if args.quantization else ""
    )
    shape = model_shape(model, args.dtype, args.quantization)
    print(markdown(name, shape, args.dtype, budget, args.prompt_tokens))


if __name__ == "__main__":
    main()
