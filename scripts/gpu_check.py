#!/usr/bin/env python
"""GPU check: the 16 GB budget on a real card, with Qwen3-0.6B's shape and random weights.

Run from the repository root on a machine with a CUDA card (no download, no hub)::

    .venv/bin/python scripts/gpu_check.py                          # a few minutes on a modern GPU
    .venv/bin/python scripts/gpu_check.py --device cpu --dry-run   # tiny sizes: the same code, seconds
    .venv/bin/python scripts/gpu_check.py --checkpoint DIR --build-only  # just the checkpoint, kept in DIR

What it does, in order:

1. Builds a checkpoint with Qwen3-0.6B's published shape (28 layers, hidden 1024, 16 query and
   8 key-value heads of 128, vocabulary 151,936, tied embeddings) and random weights, in
   bfloat16, with a word-level tokenizer that covers the whole vocabulary, and a LoRA adapter
   on it (random, non-zero) so that LDA can switch it off. Memory depends on shape, not values.
2. Starts the server on it with ``--memory-budget 16GB`` in a process capped at
   ``--card-gib`` 16 GiB of GPU memory (``torch.cuda.set_per_process_memory_fraction``), to
   stand in for a 16 GB card such as an RTX A4000 on a larger one, and runs:
   (a) the workload that broke the system this server replaces: a generate-mode capture of
       every layer's ``resid_post`` and ``mlp_out`` (28 x 2), ``max_tokens`` 2048, ``ignore_eos``:
       it must finish; the peak allocated memory is reported;
   (b) 8 such requests at once: each must finish or be refused up front (400
       ``memory_budget_exceeded``, naming what to reduce); none may end out of memory;
   (c) LDA over 8 prompts x 512 tokens with the adapter off as the before side;
   (e) tokens per second of one request alone and of 8 clients at once, next to raw HF
       ``generate`` on the same card and weights, in this process (also capped).
3. Starts it without the budget and (d) sends a request forced past the card
   (16 choices of a 12,000-token prompt: their KV cache alone is 20 GiB): it must be a 507
   ``out_of_memory``, the cache freed (allocated memory back near where it was) and the next
   request a 200. A CPU has no card to outgrow: the dry run reports (d) as skipped.
4. Starts it with the budget and ``--quantization bnb-4bit`` (no adapter) and (f) checks that
   the resident weights are the bytes the memory estimate predicts for 4 bits
   (``quantization.predicted_weight_bytes``; exactly on CUDA, within 10% on a CPU, where
   bitsandbytes' kernels repack the weights at the first forward pass), then runs (a)'s
   capture over 512 tokens, a steered request and an LDA over 8 prompts x 64 tokens (a system
   prompt as the before side), with the peak and tokens per second. bitsandbytes computes on a
   CPU too: the dry run runs (f).
   Where bitsandbytes is not installed, (f) fails, saying so.
5. (g), on 2.'s server: one request with every logits processor (``logit_bias``, the
   penalties, ``min_p``, ``min_tokens``, ``stop_token_ids``) sampled on the card.

The servers run quickest first (3., 4., then 2. and 5., with (b) last), a check that raises
or whose server does not start is reported as failed while the others run, and the JSON summary
is rewritten after every check (``"finished": false`` until the end), so a run stopped by a time
limit keeps the figures of the checks it did. ``--checkpoint DIR`` keeps the checkpoint in DIR
(reused when it is there) for another script to load.

Prints one JSON summary (and writes it to ``--out``); exits 1 if a check failed.
``--dry-run`` shrinks everything (2 layers, hidden 64, a 1,000-token vocabulary, a few
tokens per request) so the tests run it on a CPU and it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

# Qwen3-0.6B as published (config.json of Qwen/Qwen3-0.6B).
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    QWEN3_06B,
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CAPTURE = {"mode": "generate", "layers": "all", "hook_points": ["resid_post", "mlp_out"]}
TIMEOUT_S = 900


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry-run)")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes, for a CPU: checks the script runs"
    )
    parser.add_argument("--card-gib", type=float, default=16.0, help="GPU memory the server may use (GiB)")
    parser.add_argument("--budget", default="16GB", help="the server's --memory-budget")
    parser.add_argument("--max-tokens", type=int, help="for (a) and (b) (default 2048; dry run 12)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "gpu_check.json")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="keep the checkpoint in this folder (reused if it already holds one of this shape)",
    )
    parser.add_argument(
        "--build-only", action="store_true", help="build the checkpoint (in --checkpoint) and stop"
    )
    parser.add_argument("--serve-capped", type=float, help=argparse.SUPPRESS)  # internal: run the server
    args, rest = parser.parse_known_args(argv)
    args.server_args = rest[1:] if rest[:1] == ["--"] else rest
    if args.device == "cpu" and not args.dry_run:
        parser.error("--device cpu is for --dry-run only (a CPU has no 16 GB card to stand in for)")
    if args.build_only and args.checkpoint is None:
        parser.error("--build-only needs --checkpoint DIR")
    if args.max_tokens is None:
        args.max_tokens = 12 if args.dry_run else 2048
    return args


# -- the checkpoint ------------------------------------------------------------------


def build_checkpoint(folder: Path, dry_run: bool, device: str) -> tuple[Path, Path]:
    """Random weights in the model's shape, a tokenizer covering its vocabulary, a LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    shape = TINY if dry_run else QWEN3_06B
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), shape["vocab_size"])})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dtype = torch.float32 if dry_run else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model_dir, adapter_dir = folder / "model", folder / "adapter"
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); a random B makes "adapter off" differ
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    lora.save_pretrained(adapter_dir)
    del model, lora
    return model_dir, adapter_dir


def checkpoint_in(folder: Path, dry_run: bool, device: str) -> tuple[Path, Path]:
    """The checkpoint kept in ``folder``: reused if it holds one of this shape, else built there."""
    model_dir, adapter_dir = folder / "model", folder / "adapter"
    shape = TINY if dry_run else QWEN3_06B
    try:
        config = json.loads((model_dir / "config.json").read_text())
        if (adapter_dir / "adapter_config.json").is_file() and all(config[k] == shape[k] for k in shape):
            return model_dir, adapter_dir
    except (OSError, ValueError, KeyError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    return build_checkpoint(folder, dry_run, device)


def words(count: int, start: int = 10) -> str:
    return " ".join(f"w{start + i}" for i in range(count))


# -- the server ----------------------------------------------------------------------


def serve_capped(fraction: float, server_args: list[str]) -> None:
    """Internal: this process, capped at ``fraction`` of the card, runs the server."""
    import torch

    if fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)
    sys.argv = ["server", *server_args]
    runpy.run_module("server", run_name="__main__")


def card_fraction(args) -> float:
    import torch

    if args.device != "cuda":
        return 0.0
    total = torch.cuda.get_device_properties(0).total_memory
    return min(1.0, args.card_gib * 2**30 / total)


def server_command(
    args, model_dir: Path, port: int, work: Path, budget: bool, extra: tuple[str, ...]
) -> list[str]:
    """The capped server on ``model_dir``, with ``--memory-budget`` if ``budget``, and ``extra`` flags."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--serve-capped", str(card_fraction(args)), "--",
        "--model", str(model_dir), "--device", args.device,
        "--dtype", "float32" if args.dry_run else "bfloat16", "--port", str(port), "--log-level", "warning",
        "--activations-dir", str(work / "activations"), "--vectors-dir", str(work / "vectors"),
        "--max-tokens-cap", str(max(args.max_tokens, 512)), "--max-capture-bytes", "8GB",
    ]  # fmt: skip
    if budget:
        command += ["--memory-budget", args.budget]
    else:
        command += ["--max-n", "16"]
    return command + list(extra)


def metric(client, url: str, name: str) -> float | None:
    """One gauge from /metrics (None when the server does not report it, e.g. on a CPU)."""
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return None


def chat(client, url: str, text: str, max_tokens: int, **extra):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}
    return client.post(f"{url}/v1/chat/completions", json={**body, **extra})


def peak_gib(client, url: str) -> float | None:
    value = metric(client, url, "nnsight_server_accelerator_memory_peak_allocated_bytes")
    return None if value is None else round(value / 2**30, 3)


# -- the checks ----------------------------------------------------------------------


def check_capture(client, url: str, args) -> dict:
    """(a) the old failing workload, alone."""
    started = time.perf_counter()
    response = chat(client, url, words(64), args.max_tokens, ignore_eos=True, capture=CAPTURE)
    result = {"status": response.status_code, "seconds": round(time.perf_counter() - started, 2)}
    if response.status_code == 200:
        data = response.json()
        result["completion_tokens"] = data["usage"]["completion_tokens"]
        result["tensors"] = len(data["activations"]["tensors"])
    else:
        result["error"] = response.text[:500]
    result["peak_allocated_gib"] = peak_gib(client, url)
    result["ok"] = response.status_code == 200 and result["completion_tokens"] == args.max_tokens
    return result


def check_eight_at_once(client, url: str, args) -> dict:
    """(b) 8 of them at once: each 200, or refused up front; none out of memory."""
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda i: chat(
                    client, url, words(64, 10 + i), args.max_tokens, ignore_eos=True, capture=CAPTURE
                ),
                range(8),
            )
        )
    codes = [r.status_code for r in responses]
    refused = [r.json()["error"] for r in responses if r.status_code != 200]
    return {
        "statuses": codes,
        "seconds": round(time.perf_counter() - started, 2),
        "refusals": [
            {"code": e.get("code"), "param": e.get("param"), "message": e["message"][:200]} for e in refused
        ],
        "peak_allocated_gib": peak_gib(client, url),
        # each finished, or was refused before it ran; none ran out of memory
        "ok": all(e.get("code") == "memory_budget_exceeded" for e in refused),
    }


def check_sampling_fields(client, url: str, args) -> dict:
    """(g) every logits processor on the card at once (their tensors must be on its device)."""
    fields = {"logit_bias": {"100": 2.0}, "repetition_penalty": 1.2, "frequency_penalty": 0.5,
              "presence_penalty": 0.5, "min_p": 0.05, "min_tokens": 8, "stop_token_ids": [3],
              "seed": 7, "temperature": 0.8, "logprobs": True}  # fmt: skip
    response = chat(client, url, words(16), 16, **fields)
    result = {"status": response.status_code}
    if response.status_code == 200:
        result["completion_tokens"] = response.json()["usage"]["completion_tokens"]
    else:
        result["error"] = response.text[:500]
    result["ok"] = response.status_code == 200 and result["completion_tokens"] >= fields["min_tokens"]
    return result


def check_lda(client, url: str, args) -> dict:
    """(c) LDA, 8 prompts, the adapter off as the before side."""
    tokens = 8 if args.dry_run else 512
    body = {
        "prompt": [words(32, 100 + 40 * i) for i in range(8)],
        "max_tokens": tokens,
        "alpha": 1.0,
        "temperature": 0,
        "ignore_eos": True,
        "before": {"adapter": "off"},
    }
    started = time.perf_counter()
    response = client.post(f"{url}/v1/lda", json=body)
    result = {"status": response.status_code, "seconds": round(time.perf_counter() - started, 2)}
    if response.status_code != 200:
        result["error"] = response.text[:500]
    result["peak_allocated_gib"] = peak_gib(client, url)
    result["ok"] = response.status_code == 200
    return result


def check_speed(client, url: str, model_dir: Path, args) -> dict:
    """(e) tokens/s alone and with 8 clients, next to raw HF generate in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = 16 if args.dry_run else 256
    prompt = words(64)
    started = time.perf_counter()
    response = chat(client, url, prompt, tokens, ignore_eos=True)
    alone = response.json()["usage"]["completion_tokens"] / (time.perf_counter() - started)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        done = list(
            pool.map(lambda i: chat(client, url, words(64, 10 + i), tokens, ignore_eos=True), range(8))
        )
    eight = sum(r.json()["usage"]["completion_tokens"] for r in done) / (time.perf_counter() - started)

    fraction = card_fraction(args)
    if fraction:
        torch.cuda.set_per_process_memory_fraction(fraction)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=args.device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if args.device == "cuda":
            torch.cuda.synchronize()
    raw = tokens / (time.perf_counter() - started)
    del model
    return {
        "tokens_per_request": tokens,
        "server_alone_tokens_per_s": round(alone, 1),
        "server_8_clients_tokens_per_s": round(eight, 1),
        "raw_generate_tokens_per_s": round(raw, 1),
        "server_alone_over_raw": round(alone / raw, 3),
        "ok": all(r.status_code == 200 for r in [response, *done]),
    }


def check_quantized(client, url: str, model_dir: Path, args) -> dict:
    """(f) 4-bit weights: the predicted bytes, then capture, steering and LDA on them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from server.engine.quantization import predicted_weight_bytes

    structure = client.get(f"{url}/v1/model/structure").json()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir), dtype=torch.float32 if args.dry_run else torch.bfloat16
        )
    predicted = predicted_weight_bytes(meta, "bnb-4bit")
    result: dict = {
        "quantization": structure.get("quantization"),
        "weight_bytes": structure["parameter_bytes"],
        "predicted_weight_bytes": predicted,
    }
    tokens = min(args.max_tokens, 512)
    started = time.perf_counter()
    captured = chat(client, url, words(64), tokens, ignore_eos=True, capture=CAPTURE)
    seconds = time.perf_counter() - started
    result["capture_status"] = captured.status_code
    if captured.status_code == 200:
        result["capture_tokens_per_s"] = round(captured.json()["usage"]["completion_tokens"] / seconds, 1)
    else:
        result["capture_error"] = captured.text[:500]
    vector = [4.0] * structure["hidden_size"]
    steer = [{"type": "add", "layer": 1, "hook_point": "resid_post", "vector": vector}]
    plain, steered = (chat(client, url, words(16), 8, interventions=i) for i in ([], steer))
    result["steering_changed_the_answer"] = (
        steered.status_code == 200 and plain.json()["choices"] != steered.json()["choices"]
    )
    lda = client.post(
        f"{url}/v1/lda",
        json={"prompt": [words(32, 100 + 40 * i) for i in range(8)], "max_tokens": 8 if args.dry_run else 64,
              "alpha": 1.0, "temperature": 0, "ignore_eos": True,
              "before": {"system_prompt": "Answer in one word."}},
    )  # fmt: skip
    result["lda_status"] = lda.status_code
    result["peak_allocated_gib"] = peak_gib(client, url)
    result["ok"] = (
        result["quantization"] == "bnb-4bit"
        # exact on CUDA; bitsandbytes' CPU kernels repack 4-bit weights (see test_quantization.py)
        and abs(result["weight_bytes"] / predicted - 1) <= (0.1 if args.device == "cpu" else 0)
        and captured.status_code == 200
        and result["steering_changed_the_answer"]
        and lda.status_code == 200
    )
    return result


def check_out_of_memory(client, url: str, args) -> dict:
    """(d) without the budget: a request past the card is a 507, the cache is freed, the next is 200."""
    if args.device != "cuda":
        return {"skipped": "a CPU has no card to outgrow", "ok": True}
    before = metric(client, url, "nnsight_server_accelerator_memory_allocated_bytes")
    # 16 choices of a 12,000-token prompt: their KV cache alone is 16 x 12,000 x 112 KiB = 20 GiB.
    response = chat(client, url, words(12000), 1, n=16)
    after = metric(client, url, "nnsight_server_accelerator_memory_allocated_bytes")
    error = (
        response.json().get("error", {})
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    following = chat(client, url, words(16), 8)
    return {
        "status": response.status_code,
        "code": error.get("code"),
        "allocated_before_gib": round(before / 2**30, 3),
        "allocated_after_gib": round(after / 2**30, 3),
        "next_request_status": following.status_code,
        "ok": response.status_code == 507
        and error.get("code") == "out_of_memory"
        and after <= before + 2**28
        and following.status_code == 200,
    }


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run(args, save=lambda summary: None) -> dict:
    """Every check; ``save`` is called with the summary so far after each one."""
    import httpx
    import torch
    from bench_common import free_port, running_server

    summary: dict = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "dry_run": args.dry_run,
        "card_gib": args.card_gib,
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "versions": {"torch": torch.__version__, "bitsandbytes": package_version("bitsandbytes")},
    }
    began = time.perf_counter()

    def check(key: str, function, *more) -> None:
        """One check; one that raises is a failed check, and the others still run."""
        try:
            summary[key] = function(*more)
        except Exception as error:  # reported in the summary
            summary[key] = {"error": f"{type(error).__name__}: {error}"[:1000], "ok": False}
        save(summary)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        if args.checkpoint:
            model_dir, adapter_dir = checkpoint_in(args.checkpoint, args.dry_run, args.device)
        else:
            model_dir, adapter_dir = build_checkpoint(work, args.dry_run, args.device)
        summary["build_seconds"] = round(time.perf_counter() - began, 1)
        save(summary)
        adapter = ("--adapter", str(adapter_dir))
        weights = (model_dir,)  # what the checks that load the weights themselves take besides
        # (name, with the budget, more flags, its checks as (key, function, arguments after the
        # url)): the quickest first, for a run under a time limit
        servers = [
            ("no-budget", False, adapter, [("d_out_of_memory", check_out_of_memory, ())]),
            ("bnb-4bit", True, ("--quantization", "bnb-4bit"), [("f_bnb_4bit", check_quantized, weights)]),
            ("budget", True, adapter, [
                ("a_capture_alone", check_capture, ()), ("g_sampling_fields", check_sampling_fields, ()),
                ("c_lda", check_lda, ()), ("e_speed", check_speed, weights),
                ("b_eight_at_once", check_eight_at_once, ()),
            ]),
        ]  # fmt: skip
        if package_version("bitsandbytes") is None:  # a bare GPU box: carry its wheel (docs/memory.md)
            servers.pop(1)
            summary["f_bnb_4bit"] = {"skipped": "bitsandbytes is not installed", "ok": False}
        for name, budget, extra, checks in servers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = server_command(args, model_dir, port, work, budget, extra)
            try:
                with (
                    running_server(command, url, "/health", work / f"server-{name}.log"),
                    httpx.Client(timeout=TIMEOUT_S) as client,
                ):
                    for key, function, more in checks:
                        check(key, function, client, url, *more, args)
            except (Exception, SystemExit) as error:  # the server did not start: its checks failed
                for key, _, _ in checks:
                    summary.setdefault(key, {"error": f"{name} server: {error}"[-2000:], "ok": False})
                save(summary)
    summary["seconds"] = round(time.perf_counter() - began, 1)
    summary["ok"] = all(v["ok"] for k, v in summary.items() if isinstance(v, dict) and "ok" in v)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_capped is not None:
        serve_capped(args.serve_capped, args.server_args)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_only:
        began = time.perf_counter()
        model_dir, _ = checkpoint_in(args.checkpoint, args.dry_run, args.device)
        print(f"checkpoint in {model_dir.parent} ({time.perf_counter() - began:.1f} s)")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(summary: dict) -> None:  # what is done so far, in case a time limit stops the run
        args.out.write_text(json.dumps({**summary, "finished": False}, indent=2) + "\n")

    summary = run(args, save)
    summary["finished"] = True
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
