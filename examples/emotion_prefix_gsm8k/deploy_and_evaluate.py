"""Does an emotional prefix change a model's math accuracy, and how do its activations differ?

Seven variants (``control`` and six prefixes, ``variants.py``) of each problem go to the server
through the official ``openai`` client; each answer is graded (``grading.py``) and the residual
stream at the last prompt token is captured, per sample, at every layer. Stages:

    deploy     start the server: start_server.sh locally, or scripts/deploy_remote.sh for a host
    configure  check the config and the server, choose the problems, write plan.json
    generate   one request per variant x problem x sample; rerunning skips what is done
    analyze    report.json, report.md and the plots, from the per-sample files only

    .venv/bin/python examples/emotion_prefix_gsm8k/deploy_and_evaluate.py \\
        --config examples/emotion_prefix_gsm8k/config.yaml --stages configure generate analyze

Everything lands in ``run.out_dir``: ``plan.json``, ``samples/<variant>/<problem>--<k>.json``
(and ``.safetensors`` with the captured residuals), ``report.json``, ``report.md``,
``accuracy_by_variant.png``, ``residual_difference_by_layer.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx

from server.storage import files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]

from config import Config, ConfigError, load_config  # noqa: E402
from data import load_problems  # noqa: E402
from grading import efficiency_reward, grade, reference_answer  # noqa: E402
from stats import bootstrap_mean_interval, paired_bootstrap_difference, wilson_interval  # noqa: E402
from variants import messages  # noqa: E402

log = logging.getLogger("emotion_prefix_gsm8k")

STAGES = ("deploy", "configure", "generate", "analyze")


# -- small helpers ------------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes) -> None:
    """A reader never sees half a file (the server's own atomic write, under a fresh folder if need be)."""
    with files.Directory.open_root(path.parent) as folder:  # made if missing
        folder.write_bytes(path.name, data)


def write_json(path: Path, value) -> None:
    write_atomically(path, (json.dumps(value, indent=2) + "\n").encode())


def api_key(config: Config) -> str | None:
    return os.environ.get(config.server.api_key_env) or None


def http_client(config: Config) -> httpx.Client:
    key = api_key(config)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=config.server.url, headers=headers, timeout=config.server.timeout_s)


def openai_client(config: Config):
    import openai

    return openai.OpenAI(
        base_url=f"{config.server.url}/v1",
        api_key=api_key(config) or "none",
        timeout=config.server.timeout_s,
        max_retries=0,  # a retried request would capture twice; a failed sample is redone by rerunning
    )


def sample_path(out: Path, variant: str, problem_id: str, k: int) -> Path:
    return out / "samples" / variant / f"{problem_id}--{k}.json"


# -- stages --------------------------------------------------------------------------------------


def stage_deploy(config: Config) -> None:
    deploy = config.deploy
    if deploy is None:
        raise ConfigError("the deploy stage needs a deploy section in the config")
    if deploy.target == "local":
        command = [
            "bash",
            str(ROOT / "start_server.sh"),
            "start",
            "--port",
            str(deploy.port),
            *deploy.server_flags,
        ]
    else:
        command = [
            "bash",
            str(ROOT / "scripts" / "deploy_remote.sh"),
            deploy.host,
            "--port",
            str(deploy.port),
        ]
        command += ["--local-port", str(deploy.port), "--", *deploy.server_flags]
    log.info("deploy: %s", " ".join(command))
    subprocess.run(command, check=True)


def plan_config(config: Config) -> dict:
    """What decides the samples (not where they go, how many at once, or how they are analysed)."""
    return config.model_dump(mode="json", include={"data", "variants", "generation", "capture"})


def load_plan(config: Config) -> dict:
    """The run's plan, refused if the config no longer matches it (samples would be mixed)."""
    path = config.run.out_dir / "plan.json"
    if not path.exists():
        raise ConfigError(f"no {path}: run the configure stage first")
    plan = json.loads(path.read_text())
    if plan["config"] != plan_config(config):
        changed = sorted(k for k in plan["config"] if plan["config"][k] != plan_config(config).get(k))
        raise ConfigError(
            f"the config differs from {path} in: {', '.join(changed)}; restore it, or choose another "
            "run.out_dir to start a new run"
        )
    return plan


def sample_done(config: Config, path: Path) -> bool:
    """Its record is written last; with capture on, its tensors must be there too."""
    return path.exists() and (not config.capture.enabled or path.with_suffix(".safetensors").exists())


def stage_configure(config: Config) -> dict:
    out = config.run.out_dir
    with http_client(config) as http:
        listed = http.get("/v1/models")
        listed.raise_for_status()
        served = [m["id"] for m in listed.json()["data"]]
        model = config.server.model or served[0]
        if model not in served:
            raise ConfigError(
                f"server.model {model!r} is not served at {config.server.url} (it serves {served})"
            )
        layers: list[int] = []
        if config.capture.enabled:
            count = http.get("/v1/model/structure").json()["num_layers"]
            # in the order the server returns them: each layer once, ascending
            layers = (
                list(range(count)) if config.capture.layers == "all" else sorted(set(config.capture.layers))
            )
            if any(not 0 <= layer < count for layer in layers):
                raise ConfigError(f"capture.layers must lie in [0, {count}) for {model}")
    data = config.data
    problems, origin = load_problems(data.source, data.path, data.split, data.limit, data.seed)
    plan = {
        "config": plan_config(config),
        "model": model,
        "layers": layers,
        "data_origin": origin,
        "problems": [p.as_dict() for p in problems],
    }
    path = out / "plan.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != plan:
            changed = sorted(key for key in plan if key != "config" and earlier.get(key) != plan[key])
            changed += sorted(k for k in plan["config"] if earlier["config"].get(k) != plan["config"][k])
            raise ConfigError(
                f"{out} holds a run with another plan (differs in: {', '.join(changed)}); "
                "choose another run.out_dir, or delete it to start over"
            )
        log.info("configure: %s matches the earlier plan; resuming", path)
    else:
        write_json(path, plan)
    log.info(
        "configure: %d problems (%s) x %d variants, model %s",
        len(problems),
        origin,
        len(config.variants),
        model,
    )
    return plan


def _generate_one(
    config: Config, plan: dict, variant: str, problem: dict, k: int, client, http, advance
) -> None:
    """One sample: a streamed chat request, graded, its capture downloaded; the record is written
    last. ``advance(n)`` is told of each token as it arrives, and of ``max_tokens`` in all,
    however the sample ends."""
    out = config.run.out_dir
    gen = config.generation
    extra_body = {}
    if config.capture.enabled:
        extra_body["capture"] = {
            "layers": plan["layers"],
            "hook_points": [config.capture.hook_point],
            "positions": "last",  # the last prompt token: where the model has read the whole prompt
        }
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=plan["model"],
        messages=messages(variant, problem["question"]),
        max_tokens=gen.max_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        seed=gen.seed + k,  # the same for every variant: only the prefix differs
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra_body,
    )
    pieces, finish_reason, usage, activations, counted = [], None, None, None, 0
    try:
        for chunk in raw.parse():  # a capture's reference first, a delta per token, the usage last
            activations = (chunk.model_extra or {}).get("activations") or activations
            usage = chunk.usage or usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish_reason = choice.finish_reason or finish_reason
                if choice.delta.content and counted < gen.max_tokens:
                    advance(1)
                    counted += 1
    finally:  # a sample counts max_tokens, however early it stopped (or failed)
        advance(gen.max_tokens - counted)
    if finish_reason is None or usage is None:
        raise RuntimeError("the stream ended without a finish reason and usage")
    seconds = time.monotonic() - started
    text = "".join(pieces)
    reference = reference_answer(problem["answer"])
    record = {
        "variant": variant,
        "problem_id": problem["id"],
        "sample": k,
        "question": problem["question"],
        "reference": str(reference),
        "completion": text,
        "finish_reason": finish_reason,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        **grade(text, reference),
        "efficiency_reward": efficiency_reward(usage.completion_tokens, gen.max_tokens),
        "request_id": raw.headers.get("x-request-id"),
        "seconds": round(seconds, 3),
        "activations": None,
    }
    path = sample_path(out, variant, problem["id"], k)
    if config.capture.enabled:
        if activations is None:
            raise RuntimeError("the server sent no activations for a request that asked for them")
        record["activations"] = _download_capture(http, activations, plan, path)
    write_json(path, record)  # last: its presence means the sample is done


def _download_capture(http: httpx.Client, ref: dict, plan: dict, sample: Path) -> dict:
    """The capture as one ``[layers, hidden]`` tensor beside the sample; the server's copy is deleted."""
    import torch
    from safetensors.torch import load, save

    rows = []
    try:
        captured = [int(name.split(".")[1]) for name in ref["tensors"]]  # "layers.<i>.<hook point>"
        if captured != plan["layers"]:
            raise RuntimeError(f"the server captured layers {captured}, not the planned {plan['layers']}")
        for name in ref["tensors"]:
            response = http.get(f"/v1/activations/{ref['id']}/{name}")
            response.raise_for_status()
            rows.append(load(response.content)[name].reshape(-1).float())
    finally:  # the server's copy goes, whatever happened here
        http.delete(f"/v1/activations/{ref['id']}")
    file = sample.with_suffix(".safetensors")
    write_atomically(file, save({"residual": torch.stack(rows)}))
    return {"file": file.name, "layers": plan["layers"], "tensors": ref["tensors"]}


def stage_generate(config: Config, plan: dict) -> None:
    from tqdm import tqdm

    out = config.run.out_dir
    todo = [
        (variant, problem, k)
        for problem in plan["problems"]
        for variant in config.variants
        for k in range(config.generation.samples_per_problem)
        if not sample_done(config, sample_path(out, variant, problem["id"], k))
    ]
    total = len(plan["problems"]) * len(config.variants) * config.generation.samples_per_problem
    log.info("generate: %d of %d samples to do (%d already done)", len(todo), total, total - len(todo))
    if not todo:
        return
    client, http = openai_client(config), http_client(config)
    failures = []
    pool = ThreadPoolExecutor(config.run.concurrency)
    # Requests decoded in one batch end together: a bar of samples would jump by the batch. This one
    # counts tokens as they stream (max_tokens per sample), and names the samples done.
    progress = tqdm(total=len(todo) * config.generation.max_tokens, unit="tok", desc="generate")
    progress.set_postfix_str(f"0/{len(todo)} samples")
    counting = threading.Lock()  # the pool's threads all advance one bar

    def advance(tokens: int) -> None:
        with counting:
            progress.update(tokens)

    try:
        futures = {
            pool.submit(_generate_one, config, plan, *item, client, http, advance): item for item in todo
        }
        for done, future in enumerate(as_completed(futures), start=1):
            with counting:
                progress.set_postfix_str(f"{done}/{len(todo)} samples")
            try:
                future.result()
            except Exception as exc:  # one failed sample must not lose the others; rerun to retry
                variant, problem, k = futures[future]
                failures.append(f"{variant}/{problem['id']}--{k}: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:  # stop now: what is running finishes, what waits is dropped
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        progress.close()
        http.close()
    if failures:
        raise RuntimeError(
            f"{len(failures)} sample(s) failed (rerun generate to retry them):\n" + "\n".join(failures)
        )


def _load_samples(config: Config, plan: dict) -> dict[str, list[dict]]:
    out = config.run.out_dir
    samples: dict[str, list[dict]] = {}
    missing = 0
    for variant in config.variants:
        samples[variant] = []
        for problem in plan["problems"]:
            for k in range(config.generation.samples_per_problem):
                path = sample_path(out, variant, problem["id"], k)
                if sample_done(config, path):
                    samples[variant].append(json.loads(path.read_text()))
                else:
                    missing += 1
    if missing:
        raise RuntimeError(f"{missing} sample(s) not generated yet: run the generate stage first")
    return samples


def _residual_differences(config: Config, samples: dict[str, list[dict]]) -> dict:
    """Per layer, how far each variant's last-token residual stream sits from control's (paired)."""
    import torch
    from safetensors.torch import load_file

    out = config.run.out_dir

    def residual(record: dict) -> torch.Tensor:
        folder = sample_path(out, record["variant"], record["problem_id"], record["sample"]).parent
        return load_file(folder / record["activations"]["file"])["residual"]

    control = torch.stack([residual(r) for r in samples["control"]])  # [pairs, layers, hidden]
    control_norm = control.norm(dim=-1).mean(dim=0)  # [layers]
    result = {
        "layers": samples["control"][0]["activations"]["layers"],
        "control_mean_norm": control_norm.tolist(),
    }
    result["variants"] = {}
    for variant, records in samples.items():
        if variant == "control":
            continue
        difference = torch.stack([residual(r) for r in records]) - control
        result["variants"][variant] = {
            # the shift common to all problems, relative to control's typical norm at that layer
            "mean_difference_norm": (difference.mean(dim=0).norm(dim=-1) / control_norm).tolist(),
            # the typical per-problem distance, same scale
            "mean_distance": (difference.norm(dim=-1).mean(dim=0) / control_norm).tolist(),
        }
    return result


def stage_analyze(config: Config, plan: dict) -> dict:
    out = config.run.out_dir
    analysis = config.analysis
    samples = _load_samples(config, plan)
    z = {0.9: 1.644854, 0.95: 1.959964, 0.99: 2.575829}.get(analysis.confidence)
    if z is None:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(0.5 + analysis.confidence / 2)
    boot = {"confidence": analysis.confidence, "resamples": analysis.bootstrap_resamples}
    k = config.generation.samples_per_problem

    def per_problem(values: list[float]) -> list[float]:
        """Each problem's mean over its k samples (records come problem by problem): the unit
        the intervals resample, since one problem's samples are not independent of each other."""
        return [sum(values[i : i + k]) / k for i in range(0, len(values), k)]

    def rate_interval(hits: list[float]) -> tuple[float, float]:
        if k == 1:
            return wilson_interval(int(sum(hits)), len(hits), z)
        return bootstrap_mean_interval(per_problem(hits), **boot)

    control_correct = per_problem([float(r["correct"]) for r in samples["control"]])
    variants = {}
    for variant, records in samples.items():
        correct = [float(r["correct"]) for r in records]
        formatted = [r["format_reward"] for r in records]
        efficiency = [r["efficiency_reward"] for r in records]
        n = len(records)
        row = {
            "n": n,
            "correct": int(sum(correct)),
            "accuracy": sum(correct) / n,
            "accuracy_ci": rate_interval(correct),
            "format_rate": sum(formatted) / n,
            "format_ci": rate_interval(formatted),
            "efficiency_mean": sum(efficiency) / n,
            "efficiency_ci": bootstrap_mean_interval(per_problem(efficiency), **boot),
            "completion_tokens_mean": sum(r["completion_tokens"] for r in records) / n,
            "finished_by_length": sum(r["finish_reason"] == "length" for r in records),
        }
        if variant != "control":
            mean, low, high = paired_bootstrap_difference(per_problem(correct), control_correct, **boot)
            row["accuracy_minus_control"] = mean
            row["accuracy_minus_control_ci"] = (low, high)
        variants[variant] = row
    report = {
        "model": plan["model"],
        "data_origin": plan["data_origin"],
        "problems": len(plan["problems"]),
        "samples_per_problem": config.generation.samples_per_problem,
        "generation": config.generation.model_dump(),
        "confidence": analysis.confidence,
        "variants": variants,
        "residual": _residual_differences(config, samples) if config.capture.enabled else None,
    }
    write_json(out / "report.json", report)
    write_atomically(out / "report.md", _markdown(report).encode())
    _plot(report, out)
    log.info("analyze: wrote %s, report.md and the plots", out / "report.json")
    return report


def _markdown(report: dict) -> str:
    pct = int(report["confidence"] * 100)
    lines = [
        f"# Emotion prefixes: {report['model']}",
        "",
        f"{report['problems']} problems ({report['data_origin']}) x "
        f"{report['samples_per_problem']} sample(s) "
        f"per variant; max_tokens {report['generation']['max_tokens']}, temperature "
        f"{report['generation']['temperature']}. Intervals: {pct}% ("
        + ("Wilson for rates, " if report["samples_per_problem"] == 1 else "")
        + "bootstrap over problems for the rest, including the paired difference from control).",
        "",
        "| variant | accuracy | vs control | format | efficiency | completion tokens |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant, row in report["variants"].items():
        low, high = row["accuracy_ci"]
        versus = "-"
        if "accuracy_minus_control" in row:
            d_low, d_high = row["accuracy_minus_control_ci"]
            versus = f"{row['accuracy_minus_control']:+.2f} [{d_low:+.2f}, {d_high:+.2f}]"
        f_low, f_high = row["format_ci"]
        e_low, e_high = row["efficiency_ci"]
        lines.append(
            f"| {variant} | {row['correct']}/{row['n']} = {row['accuracy']:.2f} [{low:.2f}, {high:.2f}] "
            f"| {versus} "
            f"| {row['format_rate']:.2f} [{f_low:.2f}, {f_high:.2f}] | {row['efficiency_mean']:.2f} "
            f"[{e_low:.2f}, {e_high:.2f}] | {row['completion_tokens_mean']:.1f} |"
        )
    if report["residual"]:
        lines += [
            "",
            "Residual stream at the last prompt token: norm of the mean paired difference from control, "
            "relative to control's mean norm, at the first, middle and last captured layer:",
            "",
        ]
        layers = report["residual"]["layers"]
        picks = sorted({0, len(layers) // 2, len(layers) - 1})
        lines.append("| variant | " + " | ".join(f"layer {layers[i]}" for i in picks) + " |")
        lines.append("| --- |" + " --- |" * len(picks))
        for variant, values in report["residual"]["variants"].items():
            shift = values["mean_difference_norm"]
            lines.append(f"| {variant} | " + " | ".join(f"{shift[i]:.3f}" for i in picks) + " |")
    return "\n".join(lines) + "\n"


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    rows = [report["variants"][n] for n in names]
    accuracy = [r["accuracy"] for r in rows]
    errors = [
        [a - r["accuracy_ci"][0] for a, r in zip(accuracy, rows, strict=True)],
        [r["accuracy_ci"][1] - a for a, r in zip(accuracy, rows, strict=True)],
    ]
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar(
        names,
        accuracy,
        yerr=errors,
        capsize=4,
        color=["#888888" if n == "control" else "#4878a8" for n in names],
    )
    axes.set_ylabel(f"accuracy ({int(report['confidence'] * 100)}% Wilson interval)")
    axes.set_ylim(0, 1)
    axes.set_title(
        f"{report['model']}: {report['problems']} problems x {report['samples_per_problem']} sample(s)"
    )
    figure.tight_layout()
    figure.savefig(out / "accuracy_by_variant.png", dpi=120)
    plt.close(figure)
    if report["residual"]:
        figure, axes = plt.subplots(figsize=(8, 4))
        layers = report["residual"]["layers"]
        for variant, values in report["residual"]["variants"].items():
            axes.plot(layers, values["mean_difference_norm"], marker="o", markersize=3, label=variant)
        axes.set_xlabel("layer")
        axes.set_ylabel("|mean(h_variant - h_control)| / mean |h_control|")
        axes.set_title("residual stream at the last prompt token, difference from control")
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "residual_difference_by_layer.png", dpi=120)
        plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=HERE / "config.yaml")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["configure", "generate", "analyze"])
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    for noisy in ("httpx", "httpx2"):  # a line per call (the openai client's HTTP library is httpx2)
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        config = load_config(args.config)
        plan = None
        for stage in STAGES:  # always in this order, whatever order they were given in
            if stage not in args.stages:
                continue
            if stage == "deploy":
                stage_deploy(config)
            elif stage == "configure":
                plan = stage_configure(config)
            else:
                if plan is None:
                    plan = load_plan(config)
                if stage == "generate":
                    stage_generate(config, plan)
                else:
                    stage_analyze(config, plan)
    except ConfigError as exc:
        print(f"config: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, httpx.HTTPError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
