#!/usr/bin/env python
"""The server's memory estimate for one model shape, as the table docs/memory.md shows.

Run from the repository root (after ``bash scripts/install.sh``)::

    .venv/bin/python scripts/memory_table.py                  # Qwen3-0.6B's published shape, bfloat16
    .venv/bin/python scripts/memory_table.py --model Qwen/Qwen3-1.7B --budget 16GB --prompt-tokens 512

The model is built on the meta device from its configuration (no weights are read or
allocated; the built-in shape needs no download, ``--model`` reads a local folder's or
the hub's ``config.json``). For each ``max_tokens`` and each capture (none; ``resid_post``
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
    parser.add_argument("--budget", default="16GB", help="--memory-budget to check against")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    return parser.parse_args(argv)


def model_shape(model: str | None, dtype: str) -> tuple[str, ModelShape]:
    """The model's name and its shape, from a model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**QWEN3_06B) if model is None else AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    layers = config.get_text_config().num_hidden_layers
    return model or "Qwen3-0.6B (published shape)", ModelShape.of(built, layers)


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
    name, shape = model_shape(args.model, args.dtype)
    print(markdown(name, shape, args.dtype, parse_size(args.budget), args.prompt_tokens))


if __name__ == "__main__":
    main()
