"""Settings from flags and environment; layer discovery on two architectures; dtype/device rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.__main__ import parse_args
from server.engine.loading import ModelLoadError, resolve_device, resolve_dtype
from server.engine.structure import find_layers, layer_hook_points


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    assert parse_args([]).port == 8000 and parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("NNSIGHT_SERVER_PORT", "9001")
    monkeypatch.setenv("NNSIGHT_SERVER_MAX_TOKENS_CAP", "77")
    settings = parse_args(["--dtype", "bfloat16"])
    assert (settings.port, settings.max_tokens_cap, settings.dtype) == (9001, 77, "bfloat16")
    assert parse_args(["--port", "9002"]).port == 9002


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "int3"])


def test_auto_dtype_and_device_on_cpu():
    device = resolve_device("cpu")
    assert resolve_dtype("auto", device) == torch.float32
    assert resolve_dtype("float16", device) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_layers_found_on_gpt2_style_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    layout = find_layers(model)
    assert (layout.path, layout.count, layout.attention, layout.mlp) == ("transformer.h", 3, "attn", "mlp")
    assert layout.aliases()["attn_out"] == "attn.output"
    assert "mlp.c_proj.input" in layer_hook_points(model, layout)


def test_unknown_local_or_hub_model_fails_clearly(tmp_path):
    from server.engine.loading import load_model

    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(str(tmp_path / "missing-model"), device="cpu")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model("no-such-org/no-such-model", device="cpu")  # offline in tests: fails at once


def test_the_first_start_says_it_is_converting_the_embedded_model(tmp_path, monkeypatch, caplog):
    """The conversion runs in a child process whose output is kept for errors only: the server's
    own log says when it starts, how long it usually takes, and how long it took."""
    import logging
    import subprocess

    from server.engine import loading

    def convert(command, **_):  # the child: writes the folder
        (Path(command[-1]) / "config.json").parent.mkdir(parents=True)
        (Path(command[-1]) / "config.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(loading.subprocess, "run", convert)
    with caplog.at_level(logging.INFO, logger="server.engine.loading"):
        folder = loading.embedded_model_dir(tmp_path)
        again = loading.embedded_model_dir(tmp_path)  # converted: nothing to say
    messages = [r.getMessage() for r in caplog.records]
    assert folder == again and (folder / "config.json").is_file()
    assert len(messages) == 2
    assert messages[0].startswith("first start: converting the embedded model SmolLM2-135M-Instruct")
    assert "about 25 s on 2 idle CPU cores" in messages[0]
    assert messages[1].startswith("converted the embedded model in ")
