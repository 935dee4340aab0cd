"""Request and response models of the LDA endpoints.

``POST /generate_lda`` and ``POST /generate_lda_batch`` keep the field names of
the earlier server's clients; ``POST /v1/lda`` is the general form (one or many
prompts, stop strings, and per-token statistics). All three share the sampling
fields of :class:`LdaFields` and the ``before`` object of :class:`LdaBefore`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from .engine.job import SamplingParams
from .protocol import (
    GREEDY_BELOW_TEMPERATURE,
    MAX_STOP_STRINGS,
    InterventionRequest,
    OpenAIModel,
    StopString,
    StrictModel,
    Text,
    Usage,
)

Prompt = Annotated[Text, Field(min_length=1)]  # how long: --max-prompt-chars, for the whole request
BEFORE_KINDS = ("model", "adapter", "interventions", "system_prompt", "prefix")


class LdaBefore(StrictModel):
    """What the "before" side is; exactly one field is set."""

    model: Annotated[str, Field(max_length=500)] | None = Field(
        None, description="The second checkpoint loaded with --lda-before (by its name)."
    )
    adapter: Literal["off"] | None = Field(
        None, description='"off": the served weights with the --adapter switched off.'
    )
    interventions: Annotated[list[InterventionRequest], Field(min_length=1, max_length=64)] | None = Field(
        None,
        description="The after side runs with these interventions, the before side without them.",
    )
    system_prompt: Text | None = Field(
        None, description="The before side's system prompt (the after side has the request's)."
    )
    prefix: Text | None = Field(None, description="Text put before each prompt on the before side only.")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in BEFORE_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"before needs exactly one of {', '.join(BEFORE_KINDS)} (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in BEFORE_KINDS if getattr(self, name) is not None)


class LdaFields(OpenAIModel):
    """Fields every LDA endpoint shares."""

    model: str | None = Field(None, description="Must be the served model when given.")
    alpha: float = Field(
        1.0,
        description="Amplification: logits_after + alpha * (logits_after - logits_before); 0: after alone.",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens only; 0: off.")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Same seed, same output; row i of a batch draws with seed + i."
    )
    ignore_eos: bool = Field(False, description="Generate exactly the requested number of tokens per row.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    apply_chat_template: bool = Field(
        True, description="Put each prompt in a user message of the chat template."
    )
    system_prompt: Text | None = Field(None, description="System message (with apply_chat_template).")
    before: LdaBefore | None = Field(
        None, description="The before side; default: the server's (--lda-before, else --adapter off)."
    )

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if self.temperature < GREEDY_BELOW_TEMPERATURE else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class GenerateLdaRequest(LdaFields):
    """POST /generate_lda: one prompt (the earlier server's request)."""

    prompt: Prompt
    max_new_tokens: int = Field(64, ge=1)


class GenerateLdaBatchRequest(LdaFields):
    """POST /generate_lda_batch: several prompts, decoded together."""

    prompts: Annotated[list[Prompt], Field(min_length=1)]
    max_new_tokens: int = Field(64, ge=1)


class LdaRequest(LdaFields):
    """POST /v1/lda: one or several prompts; optionally per-token statistics."""

    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1)]
    max_tokens: int = Field(64, ge=1)
    token_stats: bool = Field(
        False, description="Per generated token: KL(after || before), ||logit difference||, both logprobs."
    )

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class GenerateLdaResponse(BaseModel):
    prompt: str
    formatted_prompt: str
    completion: str
    text: str  # formatted_prompt + completion
    alpha: float
    model_after: str
    model_before: str
    tokens_generated: int
    stopped_early: bool  # ended by EOS or a stop string before max_new_tokens


class GenerateLdaBatchResponse(BaseModel):
    results: list[GenerateLdaResponse]
    alpha: float
    model_after: str
    model_before: str
    batch_size: int


class LdaTokenStats(BaseModel):
    token: str
    token_id: int
    kl: float  # KL(after || before) of the next-token distributions, nats
    logit_diff_norm: float
    logprob_after: float
    logprob_before: float


class LdaRowResult(BaseModel):
    index: int
    prompt: str
    formatted_prompt: str
    completion: str
    finish_reason: Literal["stop", "length"]
    tokens_generated: int
    token_ids: list[int]
    tokens: list[LdaTokenStats] | None = None


class LdaResponse(BaseModel):
    id: str
    object: Literal["lda"] = "lda"
    created: int
    model: str
    alpha: float
    model_after: str
    model_before: str
    before: str  # the before side's kind
    results: list[LdaRowResult]
    usage: Usage
