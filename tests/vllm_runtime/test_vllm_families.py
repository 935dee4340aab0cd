"""The alias table on vLLM for the Llama family's relatives: Qwen3 (what users run), Qwen2, Mistral.

vLLM implements each with its own module classes; the table (``server/engine/vllm_block.py``)
maps them like Llama's. For a tiny random model of each (2 layers, width 256, head_dim 64: vLLM's
CPU attention refuses narrower heads; Qwen3 with its q/k norms and tied embeddings), a server on
each backend gets the same requests: greedy text, a generate-mode capture of all four aliases
(1e-5 at every position both store) and a steered request. Runs where vLLM is installed
(``.venv-vllm/bin/python -m pytest -m vllm tests/vllm_runtime``).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

if os.environ.get("NNSIGHT_SERVER_REQUIRE_VLLM"):  # .ci/run: vLLM missing there is a failure
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/install_vllm.sh)")
pytestmark = pytest.mark.vllm

from apps import app_client  # noqa: E402
from conformance.families import Family, build_family_model  # noqa: E402

HIDDEN = 256
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CAPTURE = {
    "mode": "generate",
    "layers": "all",
    "hook_points": ["resid_pre", "attn_out", "mlp_out", "resid_post"],
}


def _config(family: str, ids: dict):
    import transformers

    common = dict(
        vocab_size=ids["vocab"],
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    if family == "qwen3":
        return transformers.Qwen3Config(**common, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    return transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "mistral"])
def servers(request, tmp_path_factory):
    family = request.param
    layout = Family(family, functools.partial(_config, family), "model.layers", "self_attn", "mlp")
    folder = build_family_model(tmp_path_factory.mktemp(f"tiny-{family}"), layout)
    common = {"dtype": "float32", "max_model_len": 256}
    work = tmp_path_factory.mktemp(f"work-{family}")
    with (
        app_client(folder, work / "hf", backend="hf", **common) as hf,
        app_client(folder, work / "vllm", backend="vllm", gpu_memory_utilization=0.1, **common) as vllm,
    ):
        name = hf.get("/v1/models").json()["data"][0]["id"]
        yield family, hf, vllm, name


def _chat(client, name: str, **fields) -> dict:
    body = {"model": name, "messages": CHAT, "max_tokens": 10, "temperature": 0, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _tensors(client, reply) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    activations = reply["activations"]
    return {
        name: load(client.get(f"{activations['manifest']}/{name}").content)[name]
        for name in activations["tensors"]
    }


def test_the_same_text_captures_and_steering_as_on_hf(servers):
    family, hf, vllm, name = servers
    assert vllm.get("/v1/model/structure").json()["architecture"].lower().startswith(family)
    expected, got = _chat(hf, name, capture=CAPTURE), _chat(vllm, name, capture=CAPTURE)
    assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    reference, mine = _tensors(hf, expected), _tensors(vllm, got)
    assert set(mine) == set(reference) and len(mine) == 8
    positions = got["usage"]["prompt_tokens"] + got["usage"]["completion_tokens"] - 1
    for tensor_name, tensor in mine.items():
        assert tensor.shape[0] == positions, tensor_name
        torch.testing.assert_close(
            tensor, reference[tensor_name][:positions], atol=1e-5, rtol=0, msg=tensor_name
        )
    steer = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1)).mul(4).tolist()
    interventions = [
        {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": steer, "scale": 2.0},
        {"type": "scale", "layer": 1, "hook_point": "attn_out", "factor": 0.5},
    ]

    def tokens(client, **fields) -> list:  # token bytes: random weights write text that may not decode
        reply = _chat(client, name, logprobs=True, **fields)
        return [token["bytes"] for token in reply["choices"][0]["logprobs"]["content"]]

    steered = tokens(vllm, interventions=interventions)
    assert steered == tokens(hf, interventions=interventions)
    assert steered != tokens(vllm)  # the edits reached the output
