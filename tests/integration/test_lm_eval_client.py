"""lm-eval's ``local-chat-completions`` model (``LocalChatCompletion``), as evaluation harnesses
drive an OpenAI-compatible server: its own payloads (``stop`` from ``until``, ``seed`` 1234,
greedy), its own concurrency, its own answer parsing, against the embedded model.

The reference is the same request sent by hand: each answer lm-eval reads equals the
server's own answer to it.
"""

from __future__ import annotations

import json

import httpx

QUESTIONS = ["What is 2+2?", "Name a primary color.", "Say hello in French."]


def test_lm_evals_chat_client_reads_the_servers_answers(embedded_server, model_id):
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    lm = LocalChatCompletion(
        base_url=f"{embedded_server.url}/v1/chat/completions",
        model=model_id,
        num_concurrent=2,
        max_retries=1,
        tokenizer_backend=None,
        tokenized_requests=False,
    )
    until = {"until": ["\n\n", "Question:"], "max_gen_toks": 24, "do_sample": False}
    requests = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(JsonChatStr(json.dumps([{"role": "user", "content": q}])), until),
            idx=i,
        )
        for i, q in enumerate(QUESTIONS)
    ]
    answers = lm.generate_until(requests)
    expected = []
    for question in QUESTIONS:
        body = {"model": model_id, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
                "temperature": 0, "stop": until["until"], "seed": 1234}  # fmt: skip
        response = httpx.post(f"{embedded_server.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        expected.append(response.json()["choices"][0]["message"]["content"])
    assert answers == expected and all(answers)
