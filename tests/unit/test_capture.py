"""Activation capture (trace mode) against independent references: HF hidden states and plain hooks."""

from __future__ import annotations

import errno
import io
import json

import numpy as np
import pytest
import torch
from reference import hooked_values as hooked
from safetensors.torch import load

HELLO = [{"role": "user", "content": "Hello there"}]


def prompt_ids(tokenizer, messages=HELLO) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def capture(client, capture: dict, messages=HELLO, **extra) -> dict:
    body = {"messages": messages, "max_tokens": 2, "temperature": 0, "capture": capture, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["activations"]


def tensor(client, activation_id: str, name: str) -> torch.Tensor:
    response = client.get(f"/v1/activations/{activation_id}/{name}")
    assert response.status_code == 200, response.text
    return load(response.content)[name]


def test_resid_post_equals_hf_hidden_states(client, tiny_tokenizer, reference_model):
    ref = capture(client, {"layers": "all", "hook_points": ["resid_post"]})
    ids = prompt_ids(tiny_tokenizer)
    with torch.no_grad():
        hidden = reference_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert ref["tensors"] == ["layers.0.resid_post", "layers.1.resid_post"]
    # hidden_states[i + 1] is layer i's output, except the last entry, which HF takes after the final norm.
    torch.testing.assert_close(tensor(client, ref["id"], "layers.0.resid_post"), hidden[1][0])
    last = hooked(reference_model, ids, [("model.layers.1", "output")])[("model.layers.1", "output")]
    torch.testing.assert_close(tensor(client, ref["id"], "layers.1.resid_post"), last)
    normed = capture(client, {"modules": ["model.norm.output"]})
    torch.testing.assert_close(tensor(client, normed["id"], "model.norm.output"), hidden[2][0])


def test_hook_points_in_any_order_equal_plain_hooks(client, tiny_tokenizer, reference_model):
    asked = ["mlp_out", "mlp.down_proj.input", "resid_pre", "input_layernorm.output", "attn_out"]
    ref = capture(client, {"layers": [-1], "hook_points": asked})
    paths = {
        "mlp_out": ("model.layers.1.mlp", "output"),
        "mlp.down_proj.input": ("model.layers.1.mlp.down_proj", "input"),
        "resid_pre": ("model.layers.1", "input"),
        "input_layernorm.output": ("model.layers.1.input_layernorm", "output"),
        "attn_out": ("model.layers.1.self_attn", "output"),
    }
    expected = hooked(reference_model, prompt_ids(tiny_tokenizer), list(paths.values()))
    for hook, key in paths.items():
        torch.testing.assert_close(tensor(client, ref["id"], f"layers.1.{hook}"), expected[key])


def test_manifest_describes_every_tensor(client, tiny_tokenizer, activations_dir):
    ref = capture(client, {"layers": [0, -1], "hook_points": ["resid_post"], "positions": "last"})
    manifest = client.get(ref["manifest"]).json()
    ids = prompt_ids(tiny_tokenizer)
    assert manifest["id"] == ref["id"] and manifest["model"] and manifest["format"] == "safetensors"
    assert manifest["completion_id"].startswith("chatcmpl-")
    assert manifest["started"] <= manifest["finished"]
    assert [t["name"] for t in manifest["tensors"]] == ref["tensors"]
    entry = manifest["tensors"][0]
    assert (
        entry["layer"] == 0
        and entry["hook_point"] == "resid_post"
        and entry["module"] == "model.layers.0.output"
    )
    assert entry["original_shape"] == [1, len(ids), 64] and entry["saved_shape"] == [1, 64]
    assert manifest["manifest_version"] == 2
    assert manifest["token_positions"] == [len(ids) - 1] and manifest["token_ids"] == [ids[-1]]
    assert manifest["tokens"] == [tiny_tokenizer.decode([ids[-1]])] and manifest["unit_indices"] is None
    assert entry["sampled_units"] is False
    assert entry["dtype"] == "float32"
    files = activations_dir / ref["directory"]
    assert sorted(p.name for p in files.iterdir()) == sorted(
        ["manifest.json"] + [f"{name}.safetensors" for name in ref["tensors"]]
    )
    assert entry["bytes"] == (files / entry["file"]).stat().st_size


@pytest.mark.parametrize("method", ["random", "first"])
def test_sample_hidden_keeps_the_recorded_units(client, method):
    full = capture(client, {"layers": [0], "hook_points": ["resid_post"]})
    kept = capture(
        client,
        {
            "layers": [0],
            "hook_points": ["resid_post"],
            "sample_hidden": 8,
            "sample_hidden_method": method,
            "sample_hidden_seed": 3,
        },
    )
    kept_manifest = client.get(kept["manifest"]).json()
    entry = kept_manifest["tensors"][0]
    units = kept_manifest["unit_indices"]["64"]  # by the tensor's original width
    assert entry["sampled_units"] is True
    assert len(units) == 8 and units == sorted(set(units))
    if method == "first":
        assert units == list(range(8))
    else:
        assert units != list(range(8))  # a seeded random subset, not the first units
        again = capture(
            client,
            {"layers": [0], "hook_points": ["resid_post"], "sample_hidden": 8, "sample_hidden_seed": 3},
        )
        assert client.get(again["manifest"]).json()["unit_indices"]["64"] == units
    stored = tensor(client, kept["id"], "layers.0.resid_post")
    assert stored.shape[-1] == 8 and entry["saved_shape"][-1] == 8
    torch.testing.assert_close(stored, tensor(client, full["id"], "layers.0.resid_post")[:, units])


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_other_formats_and_storage_dtype(client, fmt):
    ref = capture(client, {"layers": [0], "hook_points": ["resid_post"], "format": fmt, "dtype": "bfloat16"})
    reference = capture(client, {"layers": [0], "hook_points": ["resid_post"]})
    expected = tensor(client, reference["id"], "layers.0.resid_post")
    raw = client.get(f"/v1/activations/{ref['id']}/layers.0.resid_post").content
    if fmt == "npy":
        value = torch.from_numpy(np.load(io.BytesIO(raw)))  # numpy has no bfloat16: stored as float32
        torch.testing.assert_close(value, expected.to(torch.bfloat16).float())
    else:
        value = torch.load(io.BytesIO(raw), weights_only=True)
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, expected.to(torch.bfloat16))


def test_completions_capture_and_openai_client(openai_client, served_model, client, tiny_tokenizer):
    response = openai_client.completions.create(
        model=served_model,
        prompt="The capital of France",
        max_tokens=2,
        extra_body={"capture": {"layers": [0], "hook_points": ["resid_pre"]}},
    )
    activations = response.model_extra["activations"]
    ids = tiny_tokenizer.encode("The capital of France")
    assert client.get(activations["manifest"]).json()["token_ids"] == ids
    chat = openai_client.chat.completions.create(
        model=served_model,
        messages=HELLO,
        max_tokens=2,
        extra_body={"capture": {"layers": [1], "hook_points": ["mlp_out"]}},
    )
    assert chat.model_extra["activations"]["tensors"] == ["layers.1.mlp_out"]


def test_streamed_chat_carries_activations_in_its_first_chunk(client):
    body = {
        "messages": HELLO,
        "max_tokens": 3,
        "stream": True,
        "capture": {"layers": [0], "hook_points": ["resid_post"]},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    first = json.loads(events[0])
    assert first["activations"]["tensors"] == ["layers.0.resid_post"]
    assert events[-1] == "[DONE]"
    assert client.get(first["activations"]["manifest"]).status_code == 200


def test_unknown_ids_and_delete(client, activations_dir):
    ref = capture(client, {"layers": [0], "hook_points": ["resid_post"]})
    assert client.get(f"/v1/activations/{ref['id']}/no.such.tensor").status_code == 404
    assert client.delete(f"/v1/activations/{ref['id']}").json() == {"id": ref["id"], "deleted": True}
    assert not (activations_dir / ref["directory"]).exists()
    for path in (f"/v1/activations/{ref['id']}", "/v1/activations/act-00", "/v1/activations/..%2F..%2Fetc"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert client.delete(f"/v1/activations/{ref['id']}").status_code == 404


def test_save_dir_stays_inside_the_root(client, activations_dir, tmp_path):
    ok = capture(client, {"layers": [0], "hook_points": ["resid_post"], "save_dir": "exp1/run2"})
    assert ok["directory"].startswith("exp1/run2/act-")
    (activations_dir / "escape").symlink_to(tmp_path)
    for bad in ("../elsewhere", "/etc", "exp1/../../x", "escape", "escape/inner"):
        body = {
            "messages": HELLO,
            "max_tokens": 1,
            "capture": {"layers": [0], "hook_points": ["resid_post"], "save_dir": bad},
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"] == "capture.save_dir"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("capture_block", "param"),
    [
        ({"layers": [0], "hook_points": ["resid_mid"]}, "capture.hook_points[0]"),
        ({"layers": [0], "hook_points": ["mlp.up_proj.sideways"]}, "capture.hook_points[0]"),
        ({"layers": [2], "hook_points": ["resid_post"]}, "capture.layers[0]"),
        ({"layers": [0, -3], "hook_points": ["resid_post"]}, "capture.layers[1]"),
        ({"layers": [], "hook_points": ["resid_post"]}, "capture.layers"),
        ({"layers": [0]}, "capture.hook_points"),
        ({}, "capture.hook_points"),
        ({"modules": ["model.nowhere.output"]}, "capture.modules[0]"),
        ({"modules": ["model.norm"]}, "capture.modules[0]"),
        ({"layers": [0], "hook_points": ["resid_post"], "mode": "generate"}, "n"),  # with n=2 below
        ({"layers": [0], "hook_points": ["resid_post"], "positions": "generated"}, "capture.positions"),
        ({"layers": [0], "hook_points": ["resid_post"], "sample_hidden": 0}, "capture.sample_hidden"),
        ({"layers": [0], "hook_points": ["resid_post"], "format": "pickle"}, "capture.format"),
    ],
)
def test_bad_capture_requests_name_the_field(client, capture_block, param):
    body = {"messages": HELLO, "capture": capture_block, "n": 2 if param == "n" else 1}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_failed_write_leaves_no_partial_files(client, activations_dir):
    from tests.faults import failing_disk

    before = set(activations_dir.rglob("*"))
    body = {
        "messages": HELLO,
        "max_tokens": 2,
        "capture": {"layers": "all", "hook_points": ["resid_pre", "resid_post"]},
    }
    with failing_disk(errno.ENOSPC, budget=3000) as disk:  # the first tensor lands, the second fails
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 507
    assert "No space left on device" in response.json()["error"]["message"]
    assert disk.failures == 1 and set(activations_dir.rglob("*")) == before
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # the next request works


# -- generate mode: the prompt and every generated token ------------------------------------


def generate_capture(client, capture_block: dict, **extra) -> tuple[dict, dict]:
    body = {
        "messages": HELLO,
        "max_tokens": 7,
        "temperature": 0,
        "capture": {"mode": "generate", **capture_block},
        **extra,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    return data, client.get(data["activations"]["manifest"]).json()


def test_generate_capture_equals_a_forward_over_prompt_and_completion(
    client, tiny_tokenizer, reference_model
):
    asked = ["resid_pre", "attn_out", "resid_post"]
    data, manifest = generate_capture(client, {"layers": "all", "hook_points": asked}, ignore_eos=True)
    prompt = prompt_ids(tiny_tokenizer)
    token_ids = manifest["token_ids"]
    assert token_ids[: len(prompt)] == prompt
    assert len(token_ids) == len(prompt) + data["usage"]["completion_tokens"] == len(prompt) + 7
    assert (
        tiny_tokenizer.decode(token_ids[len(prompt) :], skip_special_tokens=True)
        == (data["choices"][0]["message"]["content"])
    )
    paths = {"resid_pre": ("input", ""), "attn_out": ("output", ".self_attn"), "resid_post": ("output", "")}
    keys = [(f"model.layers.{i}{suffix}", kind) for i in range(2) for kind, suffix in paths.values()]
    expected = hooked(reference_model, token_ids, keys)
    for layer in range(2):
        for hook, (kind, suffix) in paths.items():
            name = f"layers.{layer}.{hook}"
            stored = tensor(client, data["activations"]["id"], name)
            assert stored.shape[0] == len(token_ids)
            torch.testing.assert_close(
                stored, expected[(f"model.layers.{layer}{suffix}", kind)], rtol=1e-4, atol=1e-5
            )


def test_capture_does_not_change_what_is_generated(client):
    plain = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 7, "seed": 5}).json()
    data, _ = generate_capture(
        client, {"layers": [0], "hook_points": ["resid_post"]}, seed=5, temperature=1.0
    )
    assert data["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert data["usage"] == plain["usage"]


@pytest.mark.parametrize("positions", ["prompt", "generated", "last", "all"])
def test_generate_capture_positions(client, tiny_tokenizer, positions):
    full, full_manifest = generate_capture(
        client, {"layers": [1], "hook_points": ["mlp_out"]}, ignore_eos=True
    )
    part, manifest = generate_capture(
        client, {"layers": [1], "hook_points": ["mlp_out"], "positions": positions}, ignore_eos=True
    )
    n_prompt = len(prompt_ids(tiny_tokenizer))
    total = n_prompt + 7
    expected = {
        "prompt": list(range(n_prompt)),
        "generated": list(range(n_prompt, total)),
        "last": [total - 1],
        "all": list(range(total)),
    }[positions]
    entry = manifest["tensors"][0]
    assert manifest["token_positions"] == expected and entry["original_shape"] == [1, total, 64]
    stored = tensor(client, part["activations"]["id"], "layers.1.mlp_out")
    assert list(stored.shape) == entry["saved_shape"] == [len(expected), 64]
    torch.testing.assert_close(
        stored, tensor(client, full["activations"]["id"], "layers.1.mlp_out")[expected]
    )
    assert manifest["token_ids"] == [full_manifest["token_ids"][p] for p in expected]


def stream_chunks(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_generate_capture_stream_carries_activations_on_the_last_finish_chunk(client):
    """The capture is known when the job ends: it rides on the finish chunk; the usage chunk
    (asked for) comes after, as the only chunk without choices."""
    body = {
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "capture": {"mode": "generate", "layers": [0], "hook_points": ["resid_post"]},
    }
    chunks = stream_chunks(client, "/v1/chat/completions", body)
    assert [c for c in chunks if not c["choices"]] == [chunks[-1]] and "usage" in chunks[-1]
    carrying = [c for c in chunks if "activations" in c]
    assert carrying == [chunks[-2]] and chunks[-2]["choices"][0]["finish_reason"] is not None
    activations = chunks[-2]["activations"]
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"][0]["index"] == 0
    )
    whole = client.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert text == whole["choices"][0]["message"]["content"]
    stored = tensor(client, activations["id"], "layers.0.resid_post")
    assert stored.shape[0] == chunks[-1]["usage"]["total_tokens"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("mode", ["trace", "generate"])
def test_a_capturing_stream_never_sends_a_chunk_without_choices_unasked(client, path, mode):
    """The usual client loop reads ``chunk.choices[0]`` of every chunk: with capture on (a
    request's own, or the server-wide settings) and no usage asked, every chunk has a choice,
    and one of them names the capture."""
    body = {"max_tokens": 4, "temperature": 0, "stream": True,
            "capture": {"mode": mode, "layers": [0], "hook_points": ["resid_post"]}}  # fmt: skip
    body.update({"messages": HELLO} if "chat" in path else {"prompt": "Hello there"})
    chunks = stream_chunks(client, path, body)
    assert all(c["choices"] for c in chunks)
    (carrying,) = [c for c in chunks if "activations" in c]
    assert carrying is (chunks[0] if mode == "trace" else chunks[-1])
    assert carrying["ndif"] == carrying["activations"]


def test_generate_capture_that_fails_midway_leaves_nothing(client, activations_dir, monkeypatch):
    from server.storage import activations as storage

    real_append = storage._Appender.append
    calls = []

    def full_disk_on_step_three(self, value):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_append(self, value)

    monkeypatch.setattr(storage._Appender, "append", full_disk_on_step_three)
    before = set(activations_dir.rglob("*"))
    response = client.post(
        "/v1/chat/completions",
        json={
            "messages": HELLO,
            "max_tokens": 6,
            "ignore_eos": True,
            "capture": {"mode": "generate", "layers": [0], "hook_points": ["resid_post"]},
        },
    )
    assert response.status_code == 507, response.text
    assert set(activations_dir.rglob("*")) == before
    monkeypatch.setattr(storage._Appender, "append", real_append)
    generate_capture(client, {"layers": [0], "hook_points": ["resid_post"]})  # the next request works


def test_a_capture_whose_disk_fills_mid_flush_leaves_nothing(client, activations_dir, monkeypatch):
    """Every step goes to the hidden file at once (FLUSH_BYTES 1), and the third write fails:
    the half-written raw files and the capture's folder are gone, and the next request works."""
    from server.storage import activations as storage

    real_flush = storage._Appender.flush
    calls = []

    def full_disk_on_write_three(self):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_flush(self)

    monkeypatch.setattr(storage._Appender, "FLUSH_BYTES", 1)
    monkeypatch.setattr(storage._Appender, "flush", full_disk_on_write_three)
    before = set(activations_dir.rglob("*"))
    body = {
        "messages": HELLO,
        "max_tokens": 6,
        "ignore_eos": True,
        "capture": {"mode": "generate", "layers": [0], "hook_points": ["resid_post"]},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 507, response.text
    assert len(calls) >= 3  # the raw file was really being written when the disk filled
    assert set(activations_dir.rglob("*")) == before
    monkeypatch.setattr(storage._Appender, "flush", real_flush)
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("flush_bytes", [None, 1])
def test_generate_capture_equals_a_trace_capture_of_the_same_tokens(client, monkeypatch, flush_bytes):
    """Through the API alone: a generate-mode capture, then a trace over prompt + completion.
    ``flush_bytes`` 1: every step goes to the hidden file at once (a capture too large to hold)."""
    from server.storage import activations as storage

    if flush_bytes is not None:
        monkeypatch.setattr(storage._Appender, "FLUSH_BYTES", flush_bytes)
    data, manifest = generate_capture(
        client, {"layers": "all", "hook_points": ["resid_post"]}, ignore_eos=True
    )
    token_ids = manifest["token_ids"]
    traced = client.post(
        "/v1/completions",
        json={
            "prompt": token_ids,
            "max_tokens": 1,
            "capture": {"layers": "all", "hook_points": ["resid_post"]},
        },
    ).json()["activations"]
    for name in data["activations"]["tensors"]:
        torch.testing.assert_close(
            tensor(client, data["activations"]["id"], name),
            tensor(client, traced["id"], name),
            rtol=1e-4,
            atol=1e-5,
        )


# -- edge cases found in review ---------------------------------------------------------------


@pytest.mark.parametrize(
    "save_dir",
    [
        "act-00000000000000000000000000000000",
        ".evil.tmp",
        "x/.hidden",
        "a" * 101,
        "ok//twice",
        "sp ace",
        "/abs",
    ],
)
def test_save_dir_must_be_plain_names(client, save_dir):
    body = {
        "messages": HELLO,
        "max_tokens": 1,
        "capture": {"layers": [0], "hook_points": ["resid_post"], "save_dir": save_dir},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "capture.save_dir"


def test_save_dir_through_a_file_is_refused(client, activations_dir):
    (activations_dir / "plainfile").write_text("x")
    body = {
        "messages": HELLO,
        "max_tokens": 1,
        "capture": {"layers": [0], "hook_points": ["resid_post"], "save_dir": "plainfile/sub"},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "capture.save_dir"


def test_values_that_are_not_per_position_tensors_are_refused(client):
    for capture_block, param in (
        ({"modules": ["model.output"]}, "capture.modules[0]"),
        ({"mode": "generate", "modules": ["lm_head.output"]}, "capture.modules"),
    ):
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "capture": capture_block})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_logits_in_trace_mode_and_keyword_inputs(client, tiny_tokenizer, reference_model):
    ref = capture(
        client,
        {
            "modules": ["lm_head.output"],
            "layers": [0],
            "hook_points": ["self_attn.input", "input_layernorm.output"],
        },
    )
    ids = prompt_ids(tiny_tokenizer)
    with torch.no_grad():
        logits = reference_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(tensor(client, ref["id"], "lm_head.output"), logits)
    # the attention block is called with keyword arguments; its input is the normed residual
    torch.testing.assert_close(
        tensor(client, ref["id"], "layers.0.self_attn.input"),
        tensor(client, ref["id"], "layers.0.input_layernorm.output"),
    )


def test_concurrent_deletes_of_one_capture(client):
    from concurrent.futures import ThreadPoolExecutor

    ref = capture(client, {"layers": [0], "hook_points": ["resid_post"]})
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(
            pool.map(lambda _: client.delete(f"/v1/activations/{ref['id']}").status_code, range(4))
        )
    assert codes == [200, 404, 404, 404]


def test_generate_capture_rules(client, tiny_tokenizer):
    ids = (tiny_tokenizer.encode("the quick brown fox ") * 100)[:200]
    body = {
        "prompt": ids,
        "max_tokens": 56,
        "capture": {"mode": "generate", "layers": [0], "hook_points": ["resid_post"]},
    }
    # 200 + 56 = the window of 256; the extra step of a generate-mode capture needs one more
    refused = client.post("/v1/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert client.post("/v1/completions", json={**body, "max_tokens": 55}).status_code == 200
    echo_only = client.post("/v1/completions", json={**body, "max_tokens": 0, "echo": True})
    assert echo_only.status_code == 400 and echo_only.json()["error"]["param"] == "max_tokens"
    both = client.post(
        "/v1/chat/completions",
        json={
            "messages": HELLO,
            "ndif": {"save_dir": "x"},
            "capture": {"layers": [0], "hook_points": ["resid_post"]},
        },
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "ndif"


def test_generate_capture_ending_on_a_stop_string(client, tiny_tokenizer, reference_model):
    free = client.post(
        "/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 12, "temperature": 0, "ignore_eos": True},
    ).json()
    text = free["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    data, manifest = generate_capture(
        client, {"layers": [1], "hook_points": ["resid_post"]}, stop=[stop], max_tokens=12, ignore_eos=True
    )
    assert data["choices"][0]["finish_reason"] == "stop"
    token_ids = manifest["token_ids"]
    assert len(token_ids) == data["usage"]["total_tokens"]
    expected = hooked(reference_model, token_ids, [("model.layers.1", "output")])[
        ("model.layers.1", "output")
    ]
    torch.testing.assert_close(
        tensor(client, data["activations"]["id"], "layers.1.resid_post"), expected, rtol=1e-4, atol=1e-5
    )


def test_a_failed_generation_removes_its_trace_capture(client, activations_dir, monkeypatch):
    """The prompt step writes the trace-mode capture; the next step runs out of memory: the
    client never learns the capture's id, so nothing of it stays."""
    from server.engine.hf_runtime import HFBatch

    real, forwards = HFBatch.forward, []

    def out_of_memory_after_the_prompt(self):
        forwards.append(1)
        if len(forwards) > 1:
            raise torch.OutOfMemoryError("out of memory")
        return real(self)

    before = set(activations_dir.rglob("*"))
    monkeypatch.setattr(HFBatch, "forward", out_of_memory_after_the_prompt)
    body = {"messages": HELLO, "max_tokens": 2, "capture": {"layers": [0], "hook_points": ["resid_post"]}}
    assert client.post("/v1/chat/completions", json=body).status_code == 507
    assert len(forwards) == 2  # the capture was written, then the generation failed
    assert set(activations_dir.rglob("*")) == before


def test_a_job_cancelled_before_it_runs_creates_nothing(client, activations_dir):
    import asyncio

    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.job import GenerationJob, SamplingParams

    app = client.app
    engine, store = app.state.engine, app.state.store
    points = engine.hooks.resolve(layers=[0], hook_points=["resid_post"], modules=None)
    opened = []

    class CountingSink:
        def create(self, save_dir, fmt):
            opened.append(1)
            return store.create(save_dir, fmt)

    plan = CapturePlan(points=tuple(points), mode="generate")
    spec = CaptureSpec(plan, CountingSink(), "test")
    job = GenerationJob([1, 2, 3], SamplingParams(max_tokens=4), capture=spec)
    job.cancelled.set()
    before = set(activations_dir.rglob("*"))
    asyncio.run(engine.generate(job))
    assert opened == [] and set(activations_dir.rglob("*")) == before


def test_the_manifest_records_what_it_takes_to_reproduce_the_capture(client):
    """model, dtype, sampling settings and interventions in the manifest: a request built from
    them alone generates the same text and captures the same values."""
    sampling = {"temperature": 0.9, "top_p": 0.8, "top_k": 20, "seed": 5, "max_tokens": 6,
                "repetition_penalty": 1.3, "logit_bias": {"5": 2.0}}  # fmt: skip
    steer = [{"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 1.5}]
    capture = {"mode": "generate", "layers": [0, 1], "hook_points": ["resid_post"]}
    first = client.post(
        "/v1/chat/completions",
        json={"messages": HELLO, **sampling, "interventions": steer, "capture": capture},
    ).json()
    manifest = client.get(first["activations"]["manifest"]).json()
    assert manifest["model"] == first["model"] and manifest["dtype"] == "float32"
    defaults = {"n": 1, "stop": [], "ignore_eos": False, "min_p": 0.0, "frequency_penalty": 0.0,
                "presence_penalty": 0.0, "min_tokens": 0, "stop_token_ids": []}  # fmt: skip
    assert manifest["sampling"] == {**sampling, **defaults}
    assert manifest["interventions"][0]["factor"] == 1.5 and manifest["presets"] == []
    assert manifest["adapter"] is None

    replay = manifest["sampling"]  # every key is a request field
    again = client.post(
        "/v1/chat/completions",
        json={
            "model": manifest["model"],
            "messages": HELLO,
            **replay,
            "interventions": manifest["interventions"],
            "capture": capture,
        },
    ).json()
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    for name in ("layers.0.resid_post", "layers.1.resid_post"):
        torch.testing.assert_close(
            tensor(client, again["activations"]["id"], name), tensor(client, first["activations"]["id"], name)
        )
    unsteered = client.post("/v1/chat/completions", json={"messages": HELLO, **replay, "capture": capture})
    name = "layers.0.resid_post"
    assert not torch.equal(
        tensor(client, unsteered.json()["activations"]["id"], name),
        tensor(client, first["activations"]["id"], name),
    )  # the interventions mattered: without them the values differ


def test_a_stream_that_fails_still_names_the_capture_it_wrote(client):
    """A trace-mode capture is written before the first token; when the stream then fails (an
    intervention that overflows, at token 0), the capture's id reaches the client before the
    error event, so what is on disk is never anonymous."""
    body = {"prompt": "Hello there", "max_tokens": 3, "stream": True,
            "capture": {"mode": "trace", "layers": [0], "hook_points": ["resid_post"]},
            "interventions": [{"type": "scale", "module": "lm_head.output", "factor": 3e38}]}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["error"]["code"] == "non_finite_values"
    (named,) = [c["activations"]["id"] for c in chunks if "activations" in c]
    assert client.get(f"/v1/activations/{named}").status_code == 200
