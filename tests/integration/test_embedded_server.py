"""The real server on the embedded SmolLM2-135M-Instruct, driven by the official openai client."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]


def test_models_lists_the_embedded_model(oai, model_id):
    assert model_id == "SmolLM2-135M-Instruct"
    assert oai.models.list().data[0].max_model_len == 8192


def test_plain_chat_answers_and_stops_on_eos(oai, model_id):
    response = oai.chat.completions.create(model=model_id, messages=CAPITAL, max_tokens=32, temperature=0)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert "<|im_start|>" not in choice.message.content and "user" not in choice.message.content
    assert choice.finish_reason == "stop"
    assert response.usage.completion_tokens < 32


def test_length_finish_reason_is_truthful(oai, model_id):
    response = oai.chat.completions.create(model=model_id, messages=COUNT, max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_streaming_equals_non_streaming(oai, model_id):
    kwargs = dict(model=model_id, messages=COUNT, max_tokens=40, temperature=0)
    whole = oai.chat.completions.create(**kwargs)
    stream = oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_with_a_seed_reproduce(oai, model_id):
    kwargs = dict(model=model_id, messages=CAPITAL, max_tokens=16, n=3, temperature=1.0, seed=42)
    first = oai.chat.completions.create(**kwargs)
    second = oai.chat.completions.create(**kwargs)
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


def test_stop_string_cuts_the_text(oai, model_id):
    free = oai.chat.completions.create(model=model_id, messages=COUNT, max_tokens=40, temperature=0)
    assert "5" in free.choices[0].message.content
    stopped = oai.chat.completions.create(
        model=model_id, messages=COUNT, max_tokens=40, temperature=0, stop=["5"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    text = stopped.choices[0].message.content
    assert "5" not in text and free.choices[0].message.content.startswith(text)


def test_logprobs_and_top_logprobs(oai, model_id):
    response = oai.chat.completions.create(
        model=model_id, messages=CAPITAL, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert response.choices[0].finish_reason == "stop"
    # The end-of-sequence token is reported with its logprob, but it is not part of the text.
    assert content[-1].token == "<|im_end|>"
    assert "".join(entry.token for entry in content[:-1]) == response.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_completions_endpoint(oai, model_id):
    response = oai.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert "Paris" in response.choices[0].text


def test_bad_request_then_good_request(oai, model_id):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=model_id, messages=CAPITAL, max_tokens=100_000)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=CAPITAL, max_tokens=2)
    ok = oai.chat.completions.create(model=model_id, messages=CAPITAL, max_tokens=4)
    assert ok.choices[0].message.content


def test_health_answers_during_a_long_generation(embedded_server, oai, model_id):
    """The model runs on the engine's worker thread, never on the event loop."""
    first_token = threading.Event()
    finished = threading.Event()

    def long_stream():
        stream = oai.chat.completions.create(
            model=model_id,
            messages=COUNT,
            max_tokens=200,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first_token.set()
        finished.set()

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert first_token.wait(120)
    health = httpx.get(f"{embedded_server.url}/health", timeout=30)
    structure = httpx.get(f"{embedded_server.url}/v1/model/structure", timeout=30)
    still_generating = not finished.is_set()
    worker.join(300)
    assert health.status_code == 200 and structure.json()["num_layers"] == 30
    assert still_generating, "health should answer while the 200-token generation is still running"


def serve_next_request_and_read_log(server, model_id: str) -> str:
    """After a client hung up: the next request is served, and the server's log is returned."""
    ok = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=120,
        json={"model": model_id, "messages": CAPITAL, "max_tokens": 4},
    )
    assert ok.status_code == 200
    return server.log_path.read_text()


def test_client_disconnect_cancels_the_generation(embedded_server, model_id):
    body = {
        "model": model_id,
        "messages": COUNT,
        "max_tokens": 250,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{embedded_server.url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few chunks, then hang up
    assert any('"content"' in line for line in received)
    # The server notices, stops generating, and says so; the next request is served.
    log = serve_next_request_and_read_log(embedded_server, model_id)
    assert "generation cancelled after" in log and "of 250" in log


def test_non_streaming_client_that_gives_up_cancels_its_generation(embedded_server, model_id):
    body = {"model": model_id, "messages": COUNT, "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{embedded_server.url}/v1/chat/completions", json=body, timeout=2)
    log = serve_next_request_and_read_log(embedded_server, model_id)
    assert "client disconnected from /v1/chat/completions" in log
    assert "of 240" in log  # "generation cancelled after N step(s) of 240"


def test_health_answers_while_a_huge_prompt_is_tokenized(embedded_server, model_id):
    """Tokenizing runs on the prompt thread, not the event loop."""
    huge = {
        "model": model_id,
        "messages": [{"role": "user", "content": "word " * 1_000_000}],
        "max_tokens": 1,
    }
    result: dict = {}

    def send_huge():
        result["response"] = httpx.post(f"{embedded_server.url}/v1/chat/completions", json=huge, timeout=120)
        result["done_at"] = time.monotonic()

    worker = threading.Thread(target=send_huge)
    worker.start()
    time.sleep(0.5)  # let the 5 MB body arrive and its tokenization start
    health = httpx.get(f"{embedded_server.url}/health", timeout=60)
    health_at = time.monotonic()
    worker.join(120)
    assert health.status_code == 200
    assert result["response"].status_code == 400  # far past the context window
    assert result["response"].json()["error"]["param"] == "messages"
    assert health_at < result["done_at"]


def test_captured_residual_stream_equals_hf_hidden_states(embedded_server, oai, model_id):
    """The issue's promise, end to end: capture from the openai client, download, compare with HF."""
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    from server.engine.loading import embedded_model_dir

    reply = oai.chat.completions.create(
        model=model_id,
        messages=CAPITAL,
        max_tokens=12,
        temperature=0,
        extra_body={"capture": {"mode": "generate", "layers": [0, 14, -2], "hook_points": ["resid_post"]}},
    )
    activations = reply.model_extra["activations"]
    manifest = httpx.get(f"{embedded_server.url}{activations['manifest']}", timeout=30).json()
    token_ids = manifest["token_ids"]
    assert len(token_ids) == reply.usage.total_tokens
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir()).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
    for layer in (0, 14, 28):
        name = f"layers.{layer}.resid_post"
        raw = httpx.get(
            f"{embedded_server.url}/v1/activations/{activations['id']}/{name}", timeout=30
        ).content
        torch.testing.assert_close(load(raw)[name], hidden[layer + 1][0], rtol=1e-3, atol=1e-4)


POSITIVE = [
    "I love this, it is wonderful and great.",
    "What a fantastic, delightful day.",
    "This is excellent and I am so happy.",
    "Absolutely brilliant, I adore it.",
]
NEGATIVE = [
    "I hate this, it is awful and terrible.",
    "What a horrible, miserable day.",
    "This is dreadful and I am so sad.",
    "Absolutely disgusting, I loathe it.",
]


def next_token_logits(server, interventions=None) -> torch.Tensor:
    """Logits after "I think this movie is", read by capturing lm_head.output (with any steering)."""
    from safetensors.torch import load

    body = {
        "prompt": "I think this movie is",
        "max_tokens": 1,
        "capture": {"modules": ["lm_head.output"], "positions": "last"},
    }
    if interventions:
        body["interventions"] = interventions
    activations = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["activations"]
    raw = httpx.get(f"{server.url}/v1/activations/{activations['id']}/lm_head.output", timeout=30).content
    return load(raw)["lm_head.output"][0]


def test_contrastive_vector_moves_the_next_token_logits(embedded_server):
    from transformers import AutoTokenizer

    from server.engine.loading import embedded_model_dir

    made = httpx.post(
        f"{embedded_server.url}/v1/vectors/contrastive",
        timeout=300,
        json={"name": "sentiment", "positive": POSITIVE, "negative": NEGATIVE, "layers": [10]},
    )
    assert made.status_code == 200, made.text
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    good = [tokenizer.encode(w)[0] for w in (" good", " great")]
    bad = [tokenizer.encode(w)[0] for w in (" bad", " terrible")]

    def preference(scale: float | None) -> float:
        steer = (
            None
            if scale is None
            else [
                {
                    "type": "add",
                    "layer": 10,
                    "hook_point": "resid_post",
                    "vector": "sentiment-layer10",
                    "scale": scale,
                }
            ]
        )
        logits = next_token_logits(embedded_server, steer)
        return (logits[good].mean() - logits[bad].mean()).item()

    neutral = preference(None)
    assert preference(2.0) > neutral + 1.0  # towards the positive examples
    assert preference(-2.0) < neutral - 1.0  # and away from them


def test_steer_a_streamed_answer_and_capture_the_steered_residual_stream(embedded_server, oai, model_id):
    """The issue's 'done when': build, steer a stream, capture it, all from the openai client."""
    from safetensors.torch import load

    httpx.post(
        f"{embedded_server.url}/v1/vectors/contrastive",
        timeout=300,
        json={"name": "mood", "positive": POSITIVE, "negative": NEGATIVE, "layers": [10]},
    ).raise_for_status()
    capture = {"mode": "generate", "layers": [10], "hook_points": ["resid_post"]}
    steer = [{"type": "add", "layer": 10, "hook_point": "resid_post", "vector": "mood-layer10", "scale": 4.0}]
    question = [{"role": "user", "content": "How was your day?"}]

    def stream(extra):
        chunks = list(
            oai.chat.completions.create(
                model=model_id, messages=question, max_tokens=24, temperature=0, stream=True, extra_body=extra
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        activations = chunks[-1].model_extra["activations"]
        raw = httpx.get(
            f"{embedded_server.url}/v1/activations/{activations['id']}/layers.10.resid_post", timeout=30
        ).content
        return text, load(raw)["layers.10.resid_post"]

    plain_text, plain_resid = stream({"capture": capture})
    steered_text, steered_resid = stream({"capture": capture, "interventions": steer})
    assert steered_text != plain_text
    vector = torch.tensor(
        httpx.get(f"{embedded_server.url}/v1/vectors/mood-layer10", timeout=30).json()["values"]
    )
    prompt_len = oai.chat.completions.create(
        model=model_id, messages=question, max_tokens=1
    ).usage.prompt_tokens
    # the capture holds the values after the steering: the prompt positions moved by exactly 4 x vector
    torch.testing.assert_close(
        steered_resid[:prompt_len], plain_resid[:prompt_len] + 4.0 * vector, rtol=1e-4, atol=1e-3
    )
