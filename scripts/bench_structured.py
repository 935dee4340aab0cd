#!/usr/bin/env python
"""Benchmark: what structured output costs, and why llguidance enforces it.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_structured.py        # embedded model, CPU; about a minute

1. The grammar libraries, on the served tokenizer (SmolLM2's, 49,152 tokens) and two JSON
   Schemas: the one-time cost of converting the tokenizer, the cost of compiling a schema,
   the first mask and the per-token cost (mask, applied to the logits, token consumed) along
   a valid answer. llguidance is installed with the server; xgrammar and outlines-core are
   measured where they are installed too (``pip install xgrammar outlines-core`` into a
   scratch environment: the comparison behind the choice, docs/api.md).
2. The cost per generated token through the server's own decode loop, side by side in one
   process and alternated: a free request and the same request constrained by a JSON
   Schema, the ratio of their times per token (the target: at most 1.3x).

Prints JSON (``--out`` writes it too).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mood": {"enum": ["calm", "angry", "sad"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "age", "tags", "mood", "address"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"answer": {"type": "number"}, "steps": {"type": "array", "items": {"type": "string"}}},
        "required": ["answer", "steps"],
        "additionalProperties": False,
    },
]
ANSWERS = [
    {"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"], "mood": "calm",
     "address": {"city": "London", "zip": "W1"}},
    {"answer": 42.5, "steps": ["add", "multiply by two", "done"]},
]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per request in part 2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def libraries(tokenizer, vocab: int) -> dict:
    """Part 1: each installed library on the same tokenizer, schemas and answers."""
    import numpy as np
    import torch

    logits = torch.randn(1, vocab)
    candidates = {}

    def llguidance_lib():
        import llguidance
        import llguidance.hf
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        def setup(llt, schema):
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            return llguidance.LLMatcher(llt, grammar), allocate_token_bitmask(1, vocab)

        def step(state, token):
            matcher, bitmask = state
            fill_next_token_bitmask(matcher, bitmask, 0)
            bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
            masked = logits.masked_fill(~torch.from_numpy(bits.astype(bool)), float("-inf"))
            return bool(masked[0, token] > float("-inf")) and matcher.consume_token(token)

        return (lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)), setup, step

    def xgrammar_lib():
        import xgrammar

        def setup(compiler, schema):
            matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
            return matcher, xgrammar.allocate_token_bitmask(1, vocab)

        def step(state, token):
            matcher, bitmask = state
            matcher.fill_next_token_bitmask(bitmask)
            masked = logits.clone()
            xgrammar.apply_token_bitmask_inplace(masked, bitmask)
            return bool(masked[0, token] > float("-inf")) and matcher.accept_token(token)

        def tokenizer_setup():
            return xgrammar.GrammarCompiler(
                xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
            )

        return tokenizer_setup, setup, step

    def outlines_lib():
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core import json_schema as schemas

        def tokenizer_setup():
            by_text: dict[str, list[int]] = {}
            for token, token_id in tokenizer.get_vocab().items():
                if token_id != tokenizer.eos_token_id:
                    by_text.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(token_id)
            return Vocabulary(tokenizer.eos_token_id, by_text)

        def setup(vocabulary, schema):
            return Guide(Index(schemas.build_regex_from_schema(json.dumps(schema)), vocabulary))

        def step(guide, token):
            allowed = torch.zeros(vocab, dtype=torch.bool)
            allowed[torch.tensor(guide.get_tokens())] = True
            masked = logits.masked_fill(~allowed, float("-inf"))
            ok = bool(masked[0, token] > float("-inf"))
            if ok and token != tokenizer.eos_token_id:
                guide.advance(token)
            return ok

        return tokenizer_setup, setup, step

    contenders = [
        ("llguidance", "llguidance", llguidance_lib),
        ("xgrammar", "xgrammar", xgrammar_lib),
        ("outlines-core", "outlines_core", outlines_lib),
    ]
    for name, module, build in contenders:
        if importlib.util.find_spec(module) is None:
            candidates[name] = {"installed": False}
            continue
        tokenizer_setup, setup, step = build()
        started = time.perf_counter()
        converted = tokenizer_setup()
        result = {
            "installed": True,
            "tokenizer_ms": round((time.perf_counter() - started) * 1e3, 1),
            "schemas": [],
        }
        for schema, answer in zip(SCHEMAS, ANSWERS, strict=True):
            ids = tokenizer.encode(json.dumps(answer), add_special_tokens=False) + [tokenizer.eos_token_id]
            started = time.perf_counter()
            state = setup(converted, schema)
            compile_ms = (time.perf_counter() - started) * 1e3
            times = []
            for token in ids:
                started = time.perf_counter()
                accepted = step(state, token)
                times.append((time.perf_counter() - started) * 1e3)
                if not accepted:
                    raise RuntimeError(f"{name} refused token {token} of a valid answer")
            result["schemas"].append({
                "compile_ms": round(compile_ms, 2), "first_mask_ms": round(times[0], 2),
                "per_token_median_ms": round(statistics.median(times[1:]), 3),
                "per_token_max_ms": round(max(times[1:]), 3),
            })  # fmt: skip
        candidates[name] = result
    return candidates


def decode_cost(model: str, tokens: int, rounds: int) -> dict:
    """Part 2: free vs constrained, through the decode loop, alternated."""
    from server.engine.hf_runtime import decode_loop
    from server.engine.job import GenerationJob, SamplingParams
    from server.engine.loading import load_model
    from server.protocol import ResponseFormat, grammar_of

    loaded = load_model(model, device="cpu")
    loop = decode_loop(loaded)
    grammar, _ = grammar_of(
        ResponseFormat.model_validate(
            {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}}
        ),
        None,
    )
    prompt = loaded.tokenizer.encode("Describe a person as JSON: ")
    free = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=tokens, temperature=0, grammar=grammar)
    loop.constraints.check(grammar)  # the one-time tokenizer conversion, outside the timing
    loop.run([GenerationJob(prompt, SamplingParams(max_tokens=2, temperature=0))])  # warm-up
    per_token = {"free": [], "constrained": []}
    for _ in range(rounds):
        for name, params in (("free", free), ("constrained", constrained)):
            started = time.perf_counter()
            (result,) = loop.run([GenerationJob(prompt, params)])
            elapsed = time.perf_counter() - started
            per_token[name].append(elapsed / max(1, len(result.choices[0].token_ids)) * 1e3)
    free_ms, constrained_ms = (statistics.median(per_token[k]) for k in ("free", "constrained"))
    return {
        "free_ms_per_token": round(free_ms, 2),
        "constrained_ms_per_token": round(constrained_ms, 2),
        "constrained_over_free": round(constrained_ms / free_ms, 3),
        "rounds": rounds,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from server.engine.loading import resolve_source

    source, _ = resolve_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    summary = {
        "libraries": libraries(tokenizer, len(tokenizer)),
        "decode": decode_cost(args.model, args.tokens, args.rounds),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
