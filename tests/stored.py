"""Reading what a request stored, over HTTP: the prompt a chat request renders, a captured tensor."""

from __future__ import annotations

import torch
from safetensors.torch import load


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The token ids a chat request renders ``messages`` to (the template, ready for the reply)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def stored_tensor(client, activation_id: str, name: str) -> torch.Tensor:
    """A captured tensor, downloaded (``GET /v1/activations/{id}/{name}``, safetensors)."""
    response = client.get(f"/v1/activations/{activation_id}/{name}")
    assert response.status_code == 200, response.text
    return load(response.content)[name]
