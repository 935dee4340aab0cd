"""Qwen3-0.6B's published shape (the model our users run), served from a local folder.

The checkpoint has random weights (memory and speed depend on shape, not values) and is
built by ``scripts/gpu_check.py`` (28 layers, hidden 1024, 16 query / 8 key-value heads of
128, vocabulary 151,936, tied embeddings, bfloat16, with a LoRA adapter). About 1.2 GB on
disk, 2.6 GB of memory and 20 s on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from apps import app_client

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import memory_table  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    return gpu_check.build_checkpoint(tmp_path_factory.mktemp("qwen3-0.6b"), dry_run=False, device="cpu")


def serve(model_dir: Path, work: Path, **settings):
    """The model served as the GPU check serves it: bfloat16, --memory-budget 16GB."""
    return app_client(model_dir, work, dtype="bfloat16", memory_budget="16GB", **settings)


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    with serve(checkpoint[0], tmp_path_factory.mktemp("qwen3-served")) as test_client:
        yield test_client


def test_it_loads_from_a_local_folder_with_its_shape(client):
    structure = client.get("/v1/model/structure").json()
    assert (structure["architecture"], structure["num_layers"], structure["hidden_size"]) == (
        "Qwen3ForCausalLM",
        28,
        1024,
    )
    assert structure["vocab_size"] == 151936 and structure["dtype"] == "bfloat16"
    assert structure["parameter_bytes"] == 596049920 * 2  # tied embeddings: counted once


def test_it_serves_a_generate_mode_capture(client):
    body = {
        "messages": [{"role": "user", "content": gpu_check.words(12)}],
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
        "capture": {"mode": "generate", "layers": [0, -1], "hook_points": ["resid_post", "mlp_out"]},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert len(response.json()["activations"]["tensors"]) == 4


def test_with_its_adapter_lda_runs_with_the_adapter_off(checkpoint, tmp_path):
    model_dir, adapter_dir = checkpoint
    lda = {"prompt": [gpu_check.words(6), gpu_check.words(9, 50)], "max_tokens": 2, "temperature": 0}
    with serve(model_dir, tmp_path, adapter=adapter_dir) as client:
        response = client.post("/v1/lda", json={**lda, "before": {"adapter": "off"}})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2 and response.json()["before"] == "adapter"


def test_the_memory_table_in_the_docs_is_the_servers_estimate(client):
    """docs/memory.md shows scripts/memory_table.py's output, and the shape that script builds
    on the meta device is the one the server loaded (so the table is the server's estimate).
    The 4-bit table's weights are checked against bitsandbytes in test_quantization.py."""
    shape = memory_table.model_shape(memory_table.QWEN3_06B, "bfloat16")
    assert shape == client.app.state.engine.shape
    args = memory_table.parse_args([])
    tables = memory_table.default_tables(args.dtype, memory_table.parse_size(args.budget), args.prompt_tokens)
    docs = (ROOT / "docs" / "memory.md").read_text()
    start, end = "<!-- memory_table.py: start -->\n", "\n<!-- memory_table.py: end -->"
    assert docs[docs.index(start) + len(start) : docs.index(end)] == tables
