"""/v1/completions on the tiny model: prompts as text or token ids, several prompts, streaming."""

from __future__ import annotations

import pytest
import torch


def test_completion_equals_hf_generate_from_token_ids(
    openai_client, served_model, tiny_tokenizer, reference_model
):
    ids = tiny_tokenizer.encode("The capital of France is", add_special_tokens=False)
    response = openai_client.completions.create(
        model=served_model, prompt=ids, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    with torch.no_grad():
        expected = reference_model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            pad_token_id=tiny_tokenizer.pad_token_id,
            eos_token_id=None,
        )[0, len(ids) :].tolist()
    assert response.choices[0].text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    assert response.usage.prompt_tokens == len(ids)
    assert response.object == "text_completion"


def test_several_prompts_and_n(openai_client, served_model):
    prompts = ["The quick brown fox", "Count from one"]
    response = openai_client.completions.create(
        model=served_model, prompt=prompts, max_tokens=5, n=2, temperature=0
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    solo = [
        openai_client.completions.create(model=served_model, prompt=p, max_tokens=5, temperature=0)
        for p in prompts
    ]
    assert response.choices[0].text == response.choices[1].text == solo[0].choices[0].text
    assert response.choices[2].text == response.choices[3].text == solo[1].choices[0].text
    assert response.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in solo)
    assert response.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in solo)


def test_streamed_completion_equals_non_streamed_with_logprobs(openai_client, served_model):
    kwargs = dict(
        model=served_model, prompt=["Interpretability", "Steering"], max_tokens=12, temperature=0, logprobs=2
    )
    whole = openai_client.completions.create(**kwargs)
    chunks = list(
        openai_client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
        streamed_logprobs = [lp for c in mine if c.logprobs for lp in c.logprobs.token_logprobs]
        # The non-streamed prompts ran batched together (left padding): same tokens, logprobs equal
        # up to float rounding (docs/batching.md).
        assert streamed_logprobs == pytest.approx(choice.logprobs.token_logprobs, abs=1e-4)
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completion_logprobs_shape(openai_client, served_model):
    response = openai_client.completions.create(
        model=served_model,
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 6
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    assert all(b >= a for a, b in zip(logprobs.text_offset, logprobs.text_offset[1:], strict=False))
    assert "".join(logprobs.tokens) == response.choices[0].text


def test_echo_scores_the_prompt_like_a_forward_pass(
    openai_client, served_model, tiny_tokenizer, reference_model
):
    """echo + logprobs + max_tokens=0: what loglikelihood evaluation harnesses send."""
    prompt = "The capital of France is Paris."
    response = openai_client.completions.create(
        model=served_model, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    choice = response.choices[0]
    ids = tiny_tokenizer.encode(prompt, add_special_tokens=False)
    assert choice.text == prompt
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(ids)
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert "".join(logprobs.tokens) == prompt
    with torch.no_grad():
        expected = torch.log_softmax(reference_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for position in range(1, len(ids)):
        row = expected[position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(row[ids[position]].item(), abs=1e-4)
        assert max(logprobs.top_logprobs[position].values()) == pytest.approx(row.max().item(), abs=1e-4)


def test_echo_with_generation_streams_the_same(openai_client, served_model):
    kwargs = dict(
        model=served_model,
        prompt=["Steering vectors", "Count"],
        max_tokens=4,
        echo=True,
        logprobs=1,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = openai_client.completions.create(**kwargs)
    chunks = list(openai_client.completions.create(**kwargs, stream=True))
    for choice, prompt in zip(whole.choices, ["Steering vectors", "Count"], strict=True):
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
        n_prompt = len(choice.logprobs.tokens) - 4
        assert choice.logprobs.token_logprobs[0] is None and n_prompt >= 1
        assert choice.logprobs.text_offset[n_prompt] == len(prompt)
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        streamed = [lp for c in mine if c.logprobs for lp in c.logprobs.token_logprobs]
        assert streamed == pytest.approx(choice.logprobs.token_logprobs, abs=1e-4)  # batched: rounding
        offsets = [o for c in mine if c.logprobs for o in c.logprobs.text_offset]
        assert offsets == choice.logprobs.text_offset


def test_echo_scores_a_prompt_that_fills_the_context_window(client, tiny_tokenizer):
    ids = (tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog.") * 40)[:256]
    scored = client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    )
    assert scored.status_code == 200, scored.text
    assert len(scored.json()["choices"][0]["logprobs"]["token_logprobs"]) == 256
    refused = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"


def test_null_max_tokens_means_openai_default_of_16(client):
    response = client.post(
        "/v1/completions", json={"prompt": "Hello", "max_tokens": None, "ignore_eos": True}
    )
    assert response.json()["usage"]["completion_tokens"] == 16
