"""A whole-model activation survey: per-layer residual norms, outlier features, and a small SAE.

Texts (a set written for this project, a file, or a `datasets` name) go through the server's
own engine code in this process (the same loading, hook points and nnsight reads), or through
a running server (capture requests, tensors downloaded). For every chosen layer's residual
stream (``resid_post``) it reports:

* token norms: mean, median, 99th percentile and maximum over tokens (the first token, often
  an attention sink with a huge norm, is reported apart and left out of the rest);
* outlier features: hidden units whose magnitude reaches ``--outlier-threshold`` times the
  token's own RMS value at ``--outlier-position-share`` or more of the token positions, in
  ``--outlier-layer-share`` or more of the layers. These are LLM.int8()'s shares (6% of
  positions, 25% of layers); its threshold, an absolute 6.0, assumes activations of unit
  scale, so here the threshold is relative to each token's RMS and means the same for any
  model (a unit at 6x RMS alone holds 36/hidden of the token's squared norm);
* unless ``--skip-sae``: a ReLU sparse autoencoder trained on one layer's residuals
  (``--sae-layer``), with its reconstruction error (MSE and the fraction of variance
  unexplained) on held-out tokens, its L0 (active features per token) and its dead
  features (never active on held-out tokens).

    .venv/bin/python scripts/run_full_analysis.py --num-samples 16 --layers 0,10,20 --skip-sae
    .venv/bin/python scripts/run_full_analysis.py --num-samples 16 --layers 0,10,20
    .venv/bin/python scripts/run_full_analysis.py --server http://127.0.0.1:8000 --layers all --skip-sae

Writes ``analysis.json``, ``norms_by_layer.png``, ``outliers_by_layer.png`` and (with the SAE)
``sae_training.png`` into ``--out``. Short of memory, it says what to reduce (docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Written for this project: short, varied English, so that a few samples cover some ground.
BUILT_IN_TEXTS = [
    "The river rose overnight, and by morning the lower fields were under a foot of brown water.",
    "To make the sauce, melt the butter slowly, then whisk in the flour a spoonful at a time.",
    "She checked the train times twice, but the last connection had already left the station.",
    "A prime number has exactly two divisors: one and the number itself.",
    "The committee postponed its vote until the auditors could review the new figures.",
    "def mean(values):\n    return sum(values) / len(values)",
    "Bees communicate the direction of a food source through a dance on the honeycomb.",
    "He apologised for the delay and promised the parts would ship by Friday.",
    "In the winter of 1923 the lighthouse keeper wrote a letter he never sent.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Please remember to water the tomatoes while I am away next week.",
    "The orchestra tuned to a single note from the oboe before the overture began.",
    "Interest compounds: each year's gain is added to the balance that earns the next.",
    "The cat ignored the new toy and slept in the cardboard box it came in.",
    "Glaciers carve U-shaped valleys, while rivers tend to cut V-shaped ones.",
    "Our meeting moved to Thursday at three; the agenda is unchanged.",
    "If the input list is empty, the function should raise a ValueError.",
    "The museum's new wing holds textiles from four continents and six centuries.",
    "A gentle rain fell on the market stalls as the vendors packed away their fruit.",
    "The spacecraft used the moon's gravity to swing onto a faster course.",
    "Why do onions make people cry? They release a gas that irritates the eyes.",
    "The translation kept the poem's rhythm but lost one of its jokes.",
    "Two trains leave the same station an hour apart, travelling at different speeds.",
    "Wash the lentils, then simmer them with cumin until they are soft.",
    "The referee reviewed the footage and overturned the goal.",
    "Every morning the baker starts the ovens at four and the first loaves are out by six.",
    "The library extended its opening hours during the examination period.",
    "Volcanic soil is rich in minerals, which is why vineyards often grow on old lava slopes.",
    "I would rather walk than wait forty minutes for the next bus.",
    "The proof proceeds by induction on the number of vertices in the graph.",
    "Fog rolled in from the harbour and the foghorn began its slow call.",
    "The startup hired three engineers and a designer in its first month.",
]


@dataclass
class LayerStats:
    """Running statistics of one layer's residual stream over all tokens seen."""

    hidden: int
    norms: list[float] = field(default_factory=list)  # per token (the first token of each text excluded)
    first_token_norms: list[float] = field(default_factory=list)
    above: torch.Tensor | None = None  # [hidden]: tokens where |h| >= threshold x the token's RMS, per unit
    tokens: int = 0
    max_abs: float = 0.0

    def add(self, values: torch.Tensor, threshold: float) -> None:
        """``values``: one text's [positions, hidden] residuals (float32, CPU)."""
        norms = values.norm(dim=-1)
        self.first_token_norms.append(float(norms[0]))
        self.norms.extend(norms[1:].tolist())
        rest = values[1:].abs()
        rms = rest.pow(2).mean(dim=-1, keepdim=True).sqrt()  # each token's own scale
        counted = (rest >= threshold * rms).sum(dim=0)
        self.above = counted if self.above is None else self.above + counted
        self.tokens += rest.shape[0]
        if rest.numel():
            self.max_abs = max(self.max_abs, float(rest.max()))

    def summary(self, position_share: float) -> dict:
        norms = torch.tensor(self.norms) if self.norms else torch.zeros(1)
        share = (
            (self.above.float() / max(1, self.tokens)) if self.above is not None else torch.zeros(self.hidden)
        )
        frequent = torch.nonzero(share >= position_share).flatten().tolist()
        return {
            "tokens": self.tokens,
            "norm_mean": float(norms.mean()),
            "norm_median": float(norms.median()),
            "norm_p99": float(torch.quantile(norms, 0.99)),
            "norm_max": float(norms.max()),
            "first_token_norm_mean": sum(self.first_token_norms) / max(1, len(self.first_token_norms)),
            "max_abs_value": self.max_abs,
            "units_over_threshold": frequent,  # at >= position_share of this layer's tokens
            "share_over_threshold": {str(u): round(float(share[u]), 4) for u in frequent},
        }


# -- texts ---------------------------------------------------------------------------------------


def load_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.texts is not None:
        raw = args.texts.read_text()
        if args.texts.suffix == ".jsonl":
            texts = [str(json.loads(line)[args.dataset_field]) for line in raw.splitlines() if line.strip()]
        else:
            texts = raw.splitlines()
        texts = [text for text in texts if text.strip()]
        origin = f"file {args.texts}"
    elif args.dataset is not None:
        from datasets import load_dataset  # optional: pip install datasets

        # streamed: N texts need not download the whole split
        rows = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split, streaming=True)
        texts = []
        for row in rows:
            if str(row[args.dataset_field]).strip():
                texts.append(str(row[args.dataset_field]))
            if len(texts) == args.num_samples:
                break
        config = args.dataset_config or "default"
        origin = f"dataset {args.dataset} ({config}, {args.dataset_split}, field {args.dataset_field})"
    else:
        texts, origin = BUILT_IN_TEXTS, "built-in texts (written for this project)"
    if args.num_samples > len(texts):
        raise SystemExit(f"--num-samples {args.num_samples}: only {len(texts)} texts in {origin}")
    return texts[: args.num_samples], origin


# -- activations: in process, through the server's engine code -----------------------------------


class InProcess:
    """The server's loading and hook points, run here: one nnsight trace per batch."""

    def __init__(self, args: argparse.Namespace) -> None:
        from server.engine.hooks import HookResolver
        from server.engine.loading import load_model
        from server.engine.structure import find_layers

        self.loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        model = self.loaded.hf_model
        self.resolver = HookResolver(model, find_layers(model))
        self.num_layers = self.resolver.layout.count
        self.hidden = model.config.hidden_size
        self.max_length = args.max_length
        self.describe = f"{self.loaded.model_id} in process ({self.loaded.dtype}, {self.loaded.device})"

    def layers(self, wanted: list[int] | str) -> list[int]:
        return self.resolver.layer_indexes(wanted, "--layers")

    def residuals(self, texts: list[str], layers: list[int]) -> list[dict[int, torch.Tensor]]:
        """Per text: {layer: [positions, hidden] float32 on the CPU}."""
        from server.engine.hf_runtime import HFRuntime

        tokenizer = self.loaded.tokenizer
        rows = [tokenizer.encode(text)[: self.max_length] for text in texts]
        points = tuple(self.resolver.resolve(layers=layers, hook_points=["resid_post"], modules=None))
        values = HFRuntime(self.loaded).read_prompts(rows, points)
        return [{p.layer: v[p.name].float().cpu() for p in points} for v in values]


# -- activations: through a running server ---------------------------------------------------------


class ThroughServer:
    """Capture requests to a running server (trace mode, every position), tensors downloaded."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        key = os.environ.get(args.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=args.server, headers=headers, timeout=600)
        structure = self.http.get("/v1/model/structure")
        structure.raise_for_status()
        info = structure.json()
        self.num_layers = info["num_layers"]
        self.hidden = info["hidden_size"]
        self.max_length = args.max_length
        self.describe = f"{info['model']} through {args.server}"

    def layers(self, wanted: list[int] | str) -> list[int]:
        if wanted == "all":
            return list(range(self.num_layers))
        bad = [layer for layer in wanted if not -self.num_layers <= layer < self.num_layers]
        if bad:
            raise SystemExit(f"--layers {bad} out of range for a {self.num_layers}-layer model")
        return sorted({layer % self.num_layers for layer in wanted})

    def _one(self, text: str, layers: list[int]) -> dict[int, torch.Tensor]:
        from safetensors.torch import load

        body = {
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0,
            "capture": {"layers": layers, "hook_points": ["resid_post"], "dtype": "float32"},
        }
        response = self.http.post("/v1/completions", json=body)
        if response.status_code == 507:
            raise torch.OutOfMemoryError(response.json()["error"]["message"])
        if response.status_code != 200:
            raise SystemExit(f"the server refused a capture: {response.status_code} {response.text}")
        ref = response.json()["activations"]
        out = {}
        for layer in layers:
            name = f"layers.{layer}.resid_post"
            tensor = self.http.get(f"/v1/activations/{ref['id']}/{name}")
            tensor.raise_for_status()
            out[layer] = load(tensor.content)[name][: self.max_length].float()
        self.http.delete(f"/v1/activations/{ref['id']}")
        return out

    def residuals(self, texts: list[str], layers: list[int]) -> list[dict[int, torch.Tensor]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(texts)) as pool:  # the server batches what arrives together
            return list(pool.map(lambda text: self._one(text, layers), texts))


# -- the sparse autoencoder -------------------------------------------------------------------------


class SparseAutoencoder(torch.nn.Module):
    """ReLU SAE: f = relu(W_e (x - b_d) + b_e), x_hat = W_d f + b_d, decoder rows of unit norm."""

    def __init__(self, hidden: int, features: int, generator: torch.Generator) -> None:
        super().__init__()
        decoder = torch.randn(features, hidden, generator=generator)
        decoder /= decoder.norm(dim=-1, keepdim=True)
        self.decoder = torch.nn.Parameter(decoder)
        self.encoder = torch.nn.Parameter(decoder.t().clone())
        self.encoder_bias = torch.nn.Parameter(torch.zeros(features))
        self.decoder_bias = torch.nn.Parameter(torch.zeros(hidden))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.decoder_bias) @ self.encoder + self.encoder_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(x)
        return features @ self.decoder + self.decoder_bias, features

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.decoder /= self.decoder.norm(dim=-1, keepdim=True)


def train_sae(per_text: list[torch.Tensor], args: argparse.Namespace, device: torch.device) -> dict:
    """Train on the tokens of 90% of the texts, evaluate on the other texts' tokens (tokens of one
    text are not independent, so the split is by text)."""
    if len(per_text) < 2:
        raise SystemExit("the SAE needs at least 2 texts (one to hold out): raise --num-samples")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(per_text), generator=generator).tolist()
    held = max(1, len(per_text) // 10)
    evaluation = torch.cat([per_text[i] for i in order[:held]])
    training = torch.cat([per_text[i] for i in order[held:]])
    scale = float(training.norm(dim=-1).mean()) / math.sqrt(training.shape[1])  # inputs of norm ~sqrt(hidden)
    training, evaluation = (training / scale).to(device), (evaluation / scale).to(device)
    sae = SparseAutoencoder(training.shape[1], args.sae_expansion * training.shape[1], generator).to(device)
    with torch.no_grad():
        sae.decoder_bias.copy_(training.mean(dim=0))
    optimiser = torch.optim.Adam(sae.parameters(), lr=args.sae_lr)
    curve = []
    batch_generator = torch.Generator().manual_seed(args.seed + 1)
    for step in range(args.sae_steps):
        batch = training[
            torch.randint(0, training.shape[0], (args.sae_batch_size,), generator=batch_generator)
        ]
        reconstruction, features = sae(batch)
        mse = (reconstruction - batch).pow(2).sum(dim=-1).mean()
        sparsity = features.sum(dim=-1).mean()  # decoder rows have unit norm: plain L1
        loss = mse + args.sae_l1 * sparsity
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        sae.normalise_decoder()
        if step % max(1, args.sae_steps // 50) == 0 or step == args.sae_steps - 1:
            curve.append(
                {
                    "step": step,
                    "loss": float(loss.detach()),
                    "mse": float(mse.detach()),
                    "l0": float((features > 0).float().sum(-1).mean()),
                }
            )
    with torch.no_grad():
        reconstruction, features = sae(evaluation)
        error = (reconstruction - evaluation).pow(2).sum(dim=-1)
        variance = (evaluation - evaluation.mean(dim=0)).pow(2).sum(dim=-1)
        active = (features > 0).float()
        # dead: never active on any token, training or held out (the held-out ones alone are too few)
        ever = active.sum(dim=0) > 0
        for start in range(0, training.shape[0], args.sae_batch_size):
            ever |= (sae.encode(training[start : start + args.sae_batch_size]) > 0).any(dim=0)
        dead = int((~ever).sum())
    if args.sae_save is not None:
        save_saelens(sae, scale, args.sae_layer, args.sae_save)
    return {
        "layer": args.sae_layer,
        "saved_to": None if args.sae_save is None else str(args.sae_save),
        "features": sae.encoder.shape[1],
        "train_tokens": training.shape[0],
        "eval_tokens": evaluation.shape[0],
        "input_scale": scale,
        "steps": args.sae_steps,
        "eval_mse": float(error.mean()),  # per token, in the scaled units (inputs of norm ~sqrt(hidden))
        "eval_fraction_of_variance_unexplained": float(error.sum() / variance.sum()),
        "eval_l0": float(active.sum(dim=-1).mean()),
        "dead_features": dead,
        "dead_fraction": dead / sae.encoder.shape[1],
        "curve": curve,
    }


def save_saelens(sae: SparseAutoencoder, scale: float, layer: int, folder: Path) -> None:
    """Write the SAE in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``), for the
    residual itself: it was trained on ``x / scale``, so ``W_enc = W_e / scale``, ``b_dec =
    scale * b_d`` and ``W_dec = scale * W_d`` give the same features and reconstruction on ``x``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = {
            "W_enc": (sae.encoder / scale).float().cpu().contiguous(),
            "b_enc": sae.encoder_bias.float().cpu().contiguous(),
            "W_dec": (sae.decoder * scale).float().cpu().contiguous(),
            "b_dec": (sae.decoder_bias * scale).float().cpu().contiguous(),
        }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    config = {
        "architecture": "standard",
        "d_in": tensors["W_enc"].shape[0],
        "d_sae": tensors["W_enc"].shape[1],
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"},
    }
    (folder / "cfg.json").write_text(json.dumps(config, indent=2))


# -- the survey -------------------------------------------------------------------------------------


def outlier_features(summaries: dict[int, dict], layer_share: float) -> list[dict]:
    """Units over the threshold (at enough positions) in at least ``layer_share`` of the layers."""
    layers_of: dict[int, list[int]] = {}
    for layer, summary in summaries.items():
        for unit in summary["units_over_threshold"]:
            layers_of.setdefault(unit, []).append(layer)
    needed = max(2, math.ceil(layer_share * len(summaries)))  # "persistent": two layers at the least
    return [
        {"unit": unit, "layers": sorted(layers), "layer_share": len(layers) / len(summaries)}
        for unit, layers in sorted(layers_of.items())
        if len(layers) >= needed
    ]


def run(args: argparse.Namespace) -> dict:
    texts, origin = load_texts(args)
    source = ThroughServer(args) if args.server else InProcess(args)
    layers = source.layers(args.layers)
    if not args.skip_sae:
        if args.sae_layer is None:
            args.sae_layer = layers[len(layers) // 2]
        if args.sae_layer not in layers:
            raise SystemExit(f"--sae-layer {args.sae_layer} must be one of --layers {layers}")
    stats = {layer: LayerStats(source.hidden) for layer in layers}
    sae_rows: list[torch.Tensor] = []
    started = time.monotonic()
    from tqdm import tqdm

    for start in tqdm(range(0, len(texts), args.batch_size), desc="batches"):
        for per_text in source.residuals(texts[start : start + args.batch_size], layers):
            for layer, values in per_text.items():
                stats[layer].add(values, args.outlier_threshold)
            if not args.skip_sae:
                sae_rows.append(per_text[args.sae_layer][1:])  # the first token left out, as above
    summaries = {layer: stats[layer].summary(args.outlier_position_share) for layer in layers}
    result = {
        "model": source.describe,
        "texts": origin,
        "num_samples": len(texts),
        "max_length": args.max_length,
        "layers": layers,
        "hook_point": "resid_post",
        "outlier_criterion": {
            "threshold": args.outlier_threshold,
            "position_share": args.outlier_position_share,
            "layer_share": args.outlier_layer_share,
        },
        "per_layer": {str(layer): summary for layer, summary in summaries.items()},
        "outlier_features": outlier_features(summaries, args.outlier_layer_share),
        "capture_seconds": round(time.monotonic() - started, 2),
        "sae": None,
    }
    if not args.skip_sae:
        device = source.loaded.device if isinstance(source, InProcess) else torch.device("cpu")
        result["sae"] = train_sae(sae_rows, args, device)
    if isinstance(source, InProcess) and source.loaded.device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(source.loaded.device)
    return result


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    per_layer = [result["per_layer"][str(layer)] for layer in layers]
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.plot(layers, [s["norm_mean"] for s in per_layer], marker="o", label="mean")
    axes.plot(layers, [s["norm_median"] for s in per_layer], marker="o", label="median")
    axes.plot(layers, [s["norm_p99"] for s in per_layer], marker="o", label="99th percentile")
    axes.plot(
        layers,
        [s["first_token_norm_mean"] for s in per_layer],
        marker="x",
        linestyle=":",
        label="first token",
    )
    axes.set_xlabel("layer")
    axes.set_ylabel("L2 norm of the residual stream")
    axes.set_yscale("log")
    axes.set_title(f"{result['model']}: {result['num_samples']} texts")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "norms_by_layer.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar([str(layer) for layer in layers], [len(s["units_over_threshold"]) for s in per_layer])
    criterion = result["outlier_criterion"]
    axes.set_xlabel("layer")
    axes.set_ylabel("units")
    axes.set_title(
        f"units with |h| >= {criterion['threshold']:g} x RMS at >= {criterion['position_share']:.0%} of "
        f"positions ({len(result['outlier_features'])} outlier features in >= "
        f"{criterion['layer_share']:.0%} of layers)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(out / "outliers_by_layer.png", dpi=120)
    plt.close(figure)

    if result["sae"]:
        sae = result["sae"]
        figure, left = plt.subplots(figsize=(8, 4))
        steps = [point["step"] for point in sae["curve"]]
        left.plot(
            steps, [point["mse"] for point in sae["curve"]], color="tab:blue", label="reconstruction MSE"
        )
        left.set_xlabel("step")
        left.set_ylabel("MSE (training batch)", color="tab:blue")
        right = left.twinx()
        right.plot(steps, [point["l0"] for point in sae["curve"]], color="tab:orange", label="L0")
        right.set_ylabel("L0 (active features per token)", color="tab:orange")
        left.set_title(
            f"SAE on layer {sae['layer']} ({sae['features']} features): held-out FVU "
            f"{sae['eval_fraction_of_variance_unexplained']:.3f}, L0 {sae['eval_l0']:.1f}, "
            f"{sae['dead_features']} dead",
            fontsize=9,
        )
        figure.tight_layout()
        figure.savefig(out / "sae_training.png", dpi=120)
        plt.close(figure)


MEMORY_ADVICE = """\
Out of memory. What the survey holds at once, and what to reduce (docs/memory.md has the full guide):
  - one batch's forward pass: lower --batch-size (and --max-length for long texts);
  - every chosen layer's values for that batch: fewer --layers;
  - the SAE: its tokens (--num-samples x --max-length) and weights (--sae-expansion x hidden^2 x 2):
    fewer samples, a smaller --sae-expansion or --sae-batch-size, or --skip-sae;
  - the weights: --dtype bfloat16 (or float16) on a GPU halves them; --device cpu when the GPU is small.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("model (in process) or server")
    source.add_argument("--model", default="embedded", help="hub id, folder, or embedded (in process)")
    source.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    source.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (in process)")
    source.add_argument(
        "--server", default=None, help="a running server's URL instead of loading the model here"
    )
    source.add_argument(
        "--api-key-env", default="NNSIGHT_SERVER_API_KEY", help="variable holding the server's key"
    )
    texts = parser.add_argument_group("texts")
    texts.add_argument("--texts", type=Path, default=None, help="a .txt (one text per line) or .jsonl file")
    texts.add_argument("--dataset", default=None, help="a `datasets` name (needs `datasets`)")
    texts.add_argument("--dataset-config", default=None, help="its configuration, e.g. wikitext-2-raw-v1")
    texts.add_argument("--dataset-split", default="train")
    texts.add_argument("--dataset-field", default="text", help="the text field (datasets and .jsonl)")
    texts.add_argument("--num-samples", type=int, default=32)
    texts.add_argument("--max-length", type=int, default=128, help="tokens kept per text")
    survey = parser.add_argument_group("survey")
    survey.add_argument("--layers", default="all", help="comma-separated layer indexes, or all")
    survey.add_argument(
        "--batch-size", type=int, default=8, help="texts per forward pass (server: concurrent requests)"
    )
    survey.add_argument("--outlier-threshold", type=float, default=6.0, help="in units of each token's RMS")
    survey.add_argument("--outlier-position-share", type=float, default=0.06)
    survey.add_argument("--outlier-layer-share", type=float, default=0.25)
    sae = parser.add_argument_group("sparse autoencoder")
    sae.add_argument("--skip-sae", action="store_true")
    sae.add_argument("--sae-layer", type=int, default=None, help="default: the middle of --layers")
    sae.add_argument("--sae-expansion", type=int, default=2, help="features = expansion x hidden size")
    sae.add_argument("--sae-steps", type=int, default=400)
    sae.add_argument("--sae-batch-size", type=int, default=256)
    sae.add_argument(
        "--sae-l1", type=float, default=1.0, help="L1 weight (inputs are scaled to norm sqrt(hidden))"
    )
    sae.add_argument("--sae-lr", type=float, default=1e-3)
    sae.add_argument(
        "--sae-save",
        type=Path,
        default=None,
        help="also write the SAE here in SAELens' format (cfg.json, ...)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "full-analysis")
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_length", "batch_size", "sae_expansion", "sae_steps", "sae_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.texts is not None and args.dataset is not None:
        parser.error("--texts and --dataset: choose one")
    if args.server:
        ignored = [
            f"--{name}"
            for name in ("model", "dtype", "device")
            if getattr(args, name) != parser.get_default(name)
        ]
        if ignored:
            parser.error(f"{', '.join(ignored)}: the server's own settings apply with --server")
    if args.layers != "all":
        try:
            args.layers = [int(part) for part in args.layers.split(",") if part.strip()]
        except ValueError:
            parser.error("--layers takes comma-separated integers, or all")
        if not args.layers:
            parser.error("--layers is empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        result = run(args)
    except (torch.OutOfMemoryError, MemoryError):
        print(MEMORY_ADVICE, file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out)
    outliers = result["outlier_features"]
    print(f"{result['model']}: {result['num_samples']} texts, layers {result['layers']}")
    for layer in result["layers"]:
        summary = result["per_layer"][str(layer)]
        print(
            f"  layer {layer:>3}: norm mean {summary['norm_mean']:.1f} "
            f"(first token {summary['first_token_norm_mean']:.1f}), max |h| {summary['max_abs_value']:.1f}, "
            f"{len(summary['units_over_threshold'])} units over threshold"
        )
    units = [o["unit"] for o in outliers]
    print(f"  outlier features ({len(units)}): {units[:20] or 'none'}{' ...' if len(units) > 20 else ''}")
    if result["sae"]:
        sae = result["sae"]
        print(
            f"  SAE (layer {sae['layer']}, {sae['features']} features): held-out FVU "
            f"{sae['eval_fraction_of_variance_unexplained']:.3f}, L0 {sae['eval_l0']:.1f}, "
            f"{sae['dead_features']} dead ({sae['dead_fraction']:.0%})"
        )
    print(f"wrote {args.out}/analysis.json and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
