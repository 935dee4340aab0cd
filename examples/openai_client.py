#!/usr/bin/env python
"""Talk to a running nnsight-server with the official openai client.

    ./start_server.sh &                      # or any running server
    .venv/bin/python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

Shows a plain chat completion with logprobs, a seeded streamed completion with a server
extension (top_k), and the model's structure endpoint.
"""

from __future__ import annotations

import argparse

import httpx
from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    print(f"\nanswer ({choice.finish_reason}): {choice.message.content}")
    for entry in choice.logprobs.content[:5]:
        alternatives = ", ".join(f"{t.token!r} {t.logprob:.2f}" for t in entry.top_logprobs)
        print(f"  {entry.token!r:>12} {entry.logprob:6.2f}   top: {alternatives}")

    print("\nstreamed, seed 7, top_k 40:")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a two-sentence story about a robot."}],
        max_tokens=64,
        seed=7,
        stream=True,
        extra_body={"top_k": 40},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    structure = httpx.get(args.base_url.rstrip("/").removesuffix("/v1") + "/v1/model/structure").json()
    print(
        f"\n{structure['num_layers']} layers, hidden size {structure['hidden_size']}, "
        f"hook-point aliases: {structure['hook_points']['aliases']}"
    )


if __name__ == "__main__":
    main()
