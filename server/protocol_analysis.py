"""Request models of the analysis endpoints: ``POST /v1/patching/sweep`` (activation patching,
``server/engine/patching.py``) and ``POST /v1/attribution`` (gradient attribution,
``server/engine/attribution.py``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .protocol import Messages, OpenAIModel, StrictModel, Text

TokenSpec = Annotated[int, Field(ge=0)] | Annotated[Text, Field(min_length=1, max_length=200)]


class LogitDiffMetric(StrictModel):
    """``logit[correct] - logit[incorrect]`` of the next token after the prompt."""

    type: Literal["logit_diff"] = "logit_diff"  # as an attribution target, "type" is required
    correct: TokenSpec = Field(description="A token id, or text that is exactly one token (e.g. ' Paris').")
    incorrect: TokenSpec = Field(description="A token id, or text that is exactly one token.")


class PatchingSweepRequest(OpenAIModel):
    """Patch each (hook point, layer, position) of the corrupted run with the clean run's value."""

    model: str | None = None
    clean: Text | Messages = Field(description="The clean prompt: text, or messages (chat template applied).")
    corrupted: Text | Messages = Field(
        description="The corrupted prompt, with as many tokens as the clean one."
    )
    metric: LogitDiffMetric
    hook_points: Annotated[list[Annotated[str, Field(max_length=200)]], Field(min_length=1, max_length=8)] = (
        Field(
            default_factory=lambda: ["resid_post"],
            description="Per-layer hook points to patch: resid_pre, resid_post, attn_out, mlp_out, "
            "<submodule>.output.",
        )
    )
    layers: list[int] | Literal["all"] = Field(
        "all", description="Layer indexes (negative counts from the end)."
    )
    positions: (
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=4096)] | Literal["all"]
    ) = Field("all", description="Token positions of the prompt to patch (0 is its first token).")
    batch_size: int = Field(32, ge=1, le=512, description="Patched variants per forward pass.")
    heatmap: bool = Field(True, description="Return a PNG heatmap per hook point (base64).")


class LogprobTarget(StrictModel):
    """The log-probability of one token as the next token after the prompt."""

    type: Literal["logprob"]
    token: TokenSpec = Field(description="A token id, or text that is exactly one token.")


class AttributionRequest(OpenAIModel):
    """Gradients of a next-token metric at chosen hook points, and per-position attribution scores."""

    model: str | None = None
    prompt: Text | Messages = Field(description="The prompt: text, or messages (chat template applied).")
    reference_prompt: Text | Messages | None = Field(
        None,
        description="With as many tokens as the prompt: scores become attribution patching's "
        "(a_reference - a) . grad, the estimated effect of patching the reference run's value in.",
    )
    target: Annotated[LogprobTarget | LogitDiffMetric, Field(discriminator="type")]
    hook_points: Annotated[list[Annotated[str, Field(max_length=200)]], Field(min_length=1, max_length=8)] = (
        Field(default_factory=lambda: ["resid_post"], description="Per-layer hook points, as in capture.")
    )
    layers: list[int] | Literal["all"] = Field(
        "all", description="Layer indexes (negative counts from the end)."
    )
    save_tensors: bool = Field(
        False,
        description="Also store every activation, gradient and score as a capture (named by "
        "activations in the response).",
    )
