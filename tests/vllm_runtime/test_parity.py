"""The vLLM runtime against the HF runtime: the same requests, over HTTP, on the same tiny model.

Runs only where vLLM is installed (``bash scripts/install_vllm.sh``, then
``.venv-vllm/bin/python -m pytest -m vllm tests/vllm_runtime``). Two servers in this process
serve one tiny random Llama (2 layers, width 256, float32): ``--backend hf`` and ``--backend
vllm`` (vLLM's CPU build, through nnsight). Checked, each against the HF runtime (itself
checked against HF ``generate`` and ``output_hidden_states`` by the main suite):

* greedy text, logprobs, stop strings, ``min_tokens``; streaming token by token; seeded ``n``;
* captures (trace and generate mode, every alias) equal within 1e-5 at every position both
  store (vLLM never feeds the final token: one position fewer in generate mode);
* every intervention operation, at every alias, gives the same tokens, as do ``positions``,
  ``steps`` and ``patch``;
* steered and plain requests sent together (vLLM batches them) each equal their solo runs;
* a client that leaves mid-stream, and a stop string, abort the vLLM request;
* what the vLLM runtime does not run is a 400 naming the field and the backend.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

if os.environ.get("NNSIGHT_SERVER_REQUIRE_VLLM"):  # .ci/run: vLLM missing there is a failure
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/install_vllm.sh)")
pytestmark = pytest.mark.vllm

from apps import app_client  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

HIDDEN = 256
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-parity"), num_layers=2, hidden=HIDDEN)


def _serve(folder, work, backend, **extra):
    return app_client(
        folder,
        work,
        backend=backend,
        dtype="float32",
        max_model_len=256,
        max_tokens_cap=200,
        **({"gpu_memory_utilization": 0.1} if backend == "vllm" else {}),
        **extra,
    )


@pytest.fixture(scope="module")
def hf(folder, tmp_path_factory):
    with _serve(folder, tmp_path_factory.mktemp("hf"), "hf") as client:
        yield client


@pytest.fixture(scope="module")
def vllm(folder, tmp_path_factory):
    with _serve(folder, tmp_path_factory.mktemp("vllm"), "vllm", request_timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
def model_name(hf, vllm):
    """The served model's name (both servers name it by its folder)."""
    name = hf.get("/v1/models").json()["data"][0]["id"]
    assert vllm.get("/v1/models").json()["data"][0]["id"] == name
    return name


def _named(body: dict, name: str) -> dict:
    return {**body, "model": name}


def post(client, path: str, name: str, body: dict):
    return client.post(path, json=_named(body, name))


def run_chat(client, name, **fields) -> dict:
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, **fields}
    response = post(client, "/v1/chat/completions", name, body)
    assert response.status_code == 200, response.text
    return response.json()


def run_completion(client, name, **fields) -> dict:
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, **fields}
    response = post(client, "/v1/completions", name, body)
    assert response.status_code == 200, response.text
    return response.json()


def tensors(client, reply) -> dict[str, torch.Tensor]:
    """A reply's captured tensors by name (downloaded), and its manifest under ``__manifest__``."""
    from safetensors.torch import load

    activations = reply["activations"]
    out = {}
    for name in activations["tensors"]:
        response = client.get(f"{activations['manifest']}/{name}")
        assert response.status_code == 200, response.text
        out[name] = load(response.content)[name]
    out["__manifest__"] = client.get(activations["manifest"]).json()
    return out


def test_greedy_chat_text_equals_hf(hf, vllm, model_name):
    expected = run_chat(hf, model_name)
    got = run_chat(vllm, model_name)
    assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert got["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert got["usage"] == expected["usage"]


def test_completion_logprobs_equal_hf(hf, vllm, model_name):
    expected = run_completion(hf, model_name, logprobs=3)["choices"][0]["logprobs"]
    got = run_completion(vllm, model_name, logprobs=3)["choices"][0]["logprobs"]
    assert got["tokens"] == expected["tokens"]
    torch.testing.assert_close(
        torch.tensor(got["token_logprobs"]), torch.tensor(expected["token_logprobs"]), atol=1e-4, rtol=0
    )
    for mine, theirs in zip(got["top_logprobs"], expected["top_logprobs"], strict=True):
        assert list(mine) == list(theirs)
        torch.testing.assert_close(
            torch.tensor(list(mine.values())), torch.tensor(list(theirs.values())), atol=1e-4, rtol=0
        )


def test_echo_scores_the_prompt_as_on_hf(hf, vllm, model_name):
    """Prompt scoring as loglikelihood evaluations use it: echo, logprobs, max_tokens 0."""
    fields = {"prompt": "The capital of France is Paris.", "echo": True, "logprobs": 2, "max_tokens": 0}
    expected = run_completion(hf, model_name, **fields)["choices"][0]
    got = run_completion(vllm, model_name, **fields)["choices"][0]
    assert got["text"] == expected["text"]
    mine, theirs = got["logprobs"], expected["logprobs"]
    assert mine["tokens"] == theirs["tokens"] and mine["token_logprobs"][0] is None
    torch.testing.assert_close(
        torch.tensor(mine["token_logprobs"][1:]),
        torch.tensor(theirs["token_logprobs"][1:]),
        atol=1e-4,
        rtol=0,
    )
    for a, b in zip(mine["top_logprobs"][1:], theirs["top_logprobs"][1:], strict=True):
        assert list(a) == list(b)
    # and with a continuation generated after the echoed prompt
    fields = {**fields, "max_tokens": 4}
    got = run_completion(vllm, model_name, **fields)["choices"][0]
    expected = run_completion(hf, model_name, **fields)["choices"][0]
    assert (got["text"], got["logprobs"]["tokens"]) == (expected["text"], expected["logprobs"]["tokens"])


def test_stop_strings_and_min_tokens_end_a_choice_as_on_hf(hf, vllm, model_name):
    plain = run_completion(hf, model_name, max_tokens=16)["choices"][0]["text"]
    stop = plain[3:5]
    for fields in ({"stop": [stop]}, {"stop": [stop], "max_tokens": 2}, {"min_tokens": 4, "max_tokens": 6}):
        expected = run_completion(hf, model_name, **fields)["choices"][0]
        got = run_completion(vllm, model_name, **fields)["choices"][0]
        assert (got["text"], got["finish_reason"]) == (expected["text"], expected["finish_reason"]), fields


def test_streamed_text_equals_the_whole_reply_token_by_token(vllm, model_name):
    whole = run_chat(vllm, model_name)["choices"][0]["message"]["content"]
    body = _named(
        {"messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True, "logprobs": True}, model_name
    )
    pieces, tokens, finish = [], 0, None
    with vllm.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["delta"].get("content") or "")
                tokens += len((choice["logprobs"] or {}).get("content") or [])
                finish = choice["finish_reason"] or finish
    assert "".join(pieces) == whole
    assert finish == "length"
    assert tokens == 12  # each token in a chunk as it came (its logprob with it)


def test_n_choices_are_seeded_per_choice(vllm, model_name):
    fields = {"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 8}
    first = run_completion(vllm, model_name, **fields)
    again = run_completion(vllm, model_name, **fields)
    texts = [choice["text"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert texts == [choice["text"] for choice in again["choices"]]  # the same seed, the same draws
    assert len(set(texts)) > 1  # each choice its own draw


@pytest.mark.parametrize("mode", ["trace", "generate"])
def test_captures_equal_hf(hf, vllm, model_name, mode):
    capture = {
        "mode": mode,
        "layers": "all",
        "hook_points": ["resid_pre", "attn_out", "mlp_out", "resid_post"],
    }
    expected_reply = run_chat(hf, model_name, capture=capture)
    got_reply = run_chat(vllm, model_name, capture=capture)
    expected, got = tensors(hf, expected_reply), tensors(vllm, got_reply)
    manifest, reference = got.pop("__manifest__"), expected.pop("__manifest__")
    assert set(got) == set(expected) and len(got) == 8
    prompt = got_reply["usage"]["prompt_tokens"]
    positions = prompt if mode == "trace" else prompt + got_reply["usage"]["completion_tokens"] - 1
    assert manifest["token_ids"] == reference["token_ids"][:positions]
    assert manifest["backend"] == "vllm"
    for name, tensor in got.items():
        assert tensor.shape == (positions, HIDDEN), name
        torch.testing.assert_close(tensor, expected[name][:positions], atol=ATOL, rtol=0, msg=name)


def test_capture_positions_and_sampling_as_on_hf(hf, vllm, model_name):
    capture = {
        "mode": "generate",
        "layers": [1],
        "hook_points": ["resid_post"],
        "positions": "prompt",
        "sample_hidden": 16,
    }
    expected = tensors(hf, run_chat(hf, model_name, capture=capture))
    got = tensors(vllm, run_chat(vllm, model_name, capture=capture))
    torch.testing.assert_close(got["layers.1.resid_post"], expected["layers.1.resid_post"], atol=ATOL, rtol=0)
    assert got["__manifest__"]["unit_indices"] == expected["__manifest__"]["unit_indices"]


def _direction(seed: int) -> list[float]:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)).mul(4).tolist()


OPERATIONS = [
    {"type": "add", "vector": _direction(1), "scale": 2.0},
    {"type": "scale", "factor": -1.5},
    {"type": "ablate"},
    {"type": "project_out", "vector": _direction(2)},
    {"type": "clamp", "vector": _direction(3), "value": 20.0},
]


@pytest.mark.parametrize("hook", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op["type"])
def test_each_operation_gives_the_tokens_hf_gives(hf, vllm, model_name, hook, operation):
    intervention = {**operation, "layer": 0 if hook != "resid_pre" else 1, "hook_point": hook}
    expected = run_completion(hf, model_name, interventions=[intervention], max_tokens=8)
    got = run_completion(vllm, model_name, interventions=[intervention], max_tokens=8)
    assert got["choices"][0]["text"] == expected["choices"][0]["text"]


def test_positions_steps_and_patching_as_on_hf(hf, vllm, model_name):
    cases = [
        [
            {
                "type": "add",
                "layer": 0,
                "hook_point": "resid_post",
                "vector": _direction(4),
                "positions": "generated",
            }
        ],
        [{"type": "add", "layer": 1, "hook_point": "mlp_out", "vector": _direction(5), "positions": [0, 2]}],
        [{"type": "scale", "layer": 0, "hook_point": "attn_out", "factor": 3.0, "steps": [2, 5]}],
        [{"type": "ablate", "layer": 1, "hook_point": "resid_pre", "positions": "last"}],
    ]
    for interventions in cases:
        expected = run_completion(hf, model_name, interventions=interventions, max_tokens=8)
        got = run_completion(vllm, model_name, interventions=interventions, max_tokens=8)
        assert got["choices"][0]["text"] == expected["choices"][0]["text"], interventions
    # Each runtime patches a capture of its own into a different prompt.
    capture = {"layers": [0], "hook_points": ["resid_post"]}
    texts = []
    for client in (hf, vllm):
        source = run_completion(client, model_name, capture=capture)["activations"]["id"]
        patch = {
            "type": "patch",
            "layer": 0,
            "hook_point": "resid_post",
            "activation_id": source,
            "tensor": "layers.0.resid_post",
            "positions": [1, 2],
        }
        reply = run_completion(client, model_name, prompt="Steering vectors change", interventions=[patch])
        texts.append(reply["choices"][0]["text"])
    plain = run_completion(hf, model_name, prompt="Steering vectors change")["choices"][0]["text"]
    assert texts[1] == texts[0] != plain


@pytest.mark.parametrize(
    ("hook", "position"), [("resid_post", "last"), ("resid_pre", "mean"), ("mlp_out", "last")]
)
def test_contrastive_vectors_equal_hf(hf, vllm, model_name, hook, position):
    body = {
        "name": f"c-{hook}-{position}",
        "positive": ["The quick brown fox", "Steering vectors change what a model says."],
        "negative": ["What is the capital of France?", "Count from one to ten."],
        "layers": "all",
        "hook_point": hook,
        "position": position,
        "method": "mean_diff",
    }
    made = {}
    for name, client in (("hf", hf), ("vllm", vllm)):
        response = post(client, "/v1/vectors/contrastive", model_name, body)
        assert response.status_code == 200, response.text
        vectors = [v["name"] for v in response.json()["data"]]
        made[name] = {v: client.get(f"/v1/vectors/{v}").json()["values"] for v in vectors}
    assert set(made["vllm"]) == set(made["hf"]) == {f"{body['name']}-layer0", f"{body['name']}-layer1"}
    for vector, values in made["vllm"].items():
        torch.testing.assert_close(
            torch.tensor(values), torch.tensor(made["hf"][vector]), atol=1e-4, rtol=1e-5
        )


def test_steered_and_plain_requests_batched_together_equal_their_solo_runs(vllm, model_name):
    steer = [{"type": "add", "layer": 0, "hook_point": "resid_post", "vector": _direction(6), "scale": 2.0}]
    solo_plain = run_completion(vllm, model_name, max_tokens=16)["choices"][0]["text"]
    solo_steered = run_completion(vllm, model_name, interventions=steer, max_tokens=16)["choices"][0]["text"]
    assert solo_plain != solo_steered
    results: dict[int, str] = {}
    barrier = threading.Barrier(6)

    def send(i: int) -> None:
        barrier.wait()
        fields = {"interventions": steer} if i % 2 else {}
        results[i] = run_completion(vllm, model_name, max_tokens=16, **fields)["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(6)] == [solo_plain, solo_steered] * 3


def _unfinished(client) -> int:
    """Requests vLLM's engine still holds (the server's AsyncLLM)."""
    return client.app.state.engine.model.vllm_entrypoint.get_num_unfinished_requests()


def _settles(client, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _unfinished(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _unfinished(client) == 0


def test_a_client_leaving_mid_stream_aborts_its_vllm_request(vllm, model_name):
    body = _named(
        {"prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True, "stream": True}, model_name
    )
    with vllm.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                assert _unfinished(vllm) == 1
                break  # leave after the first chunk
    assert _settles(vllm)  # aborted well before its 200 tokens
    assert run_completion(vllm, model_name, max_tokens=4)["choices"][0]["finish_reason"] == "length"


def test_a_row_ending_on_a_stop_string_is_aborted_in_vllm(vllm, model_name):
    plain = run_completion(vllm, model_name, max_tokens=200, ignore_eos=True)["choices"][0]["text"]
    reply = run_completion(vllm, model_name, max_tokens=200, ignore_eos=True, stop=[plain[2:4]])
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 200
    assert _settles(vllm)


def test_what_the_vllm_runtime_does_not_run_is_refused_naming_the_field(vllm, model_name):
    refused = [
        (
            "/v1/chat/completions",
            {"messages": CHAT, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "capture": {"modules": ["model.norm.output"]}},
            "capture.modules",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "capture": {"layers": [0], "hook_points": ["mlp.down_proj.input"]}},
            "capture.hook_points[0]",
        ),
        (
            "/v1/lda",
            {
                "prompt": "Hi",
                "alpha": 1.0,
                "before": {
                    "interventions": [
                        {"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 0.5}
                    ]
                },
            },
            None,
        ),
        ("/v1/chat/completions", {"messages": CHAT, "capture": {"saes": ["any"]}}, "capture.saes"),
        ("/v1/chat/completions", {"messages": CHAT, "capture": {"logit_lens": [0]}}, "capture.logit_lens"),
        ("/v1/chat/completions", {"messages": CHAT, "capture": {"attention": [0]}}, "capture.attention"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "interventions": [{"type": "sae_add", "sae": "any", "feature": 0}]},
            "interventions[0].sae",
        ),
        ("/v1/saes", {"name": "any", "folder": "any"}, "folder"),
        (
            "/v1/patching/sweep",
            {"clean": "Hi there", "corrupted": "Hi where", "metric": {"correct": 1, "incorrect": 2}},
            None,
        ),
        ("/v1/attribution", {"prompt": "Hi", "target": {"type": "logprob", "token": 1}}, None),
    ]
    for path, body, param in refused:
        named = path not in ("/v1/saes",)  # a body without a model field
        response = post(vllm, path, model_name, body) if named else vllm.post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (path, error)
        assert "vllm" in error["message"], (path, error)
    structure = vllm.get("/v1/model/structure").json()
    assert structure["backend"] == "vllm" and set(structure["hook_points"]["aliases"]) == {
        "resid_pre",
        "resid_post",
        "attn_out",
        "mlp_out",
    }
    assert vllm.get("/health").status_code == 200
