"""The run's YAML configuration: every key is used, an unknown key is refused with its path.

See ``config.yaml`` beside this file for every key with its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from variants import VARIANTS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    url: str = "http://127.0.0.1:8000"
    api_key_env: str = Field(
        "NNSIGHT_SERVER_API_KEY", description="Environment variable holding the key (never the key itself)."
    )
    model: str | None = Field(None, description="Served model id; None: the one the server lists.")
    timeout_s: float = Field(600, gt=0)


class DeployConfig(_Strict):
    target: Literal["local", "remote"] = "local"
    host: str | None = Field(None, description="ssh destination, for target remote.")
    port: int = Field(8000, ge=1, le=65535)
    server_flags: list[str] = Field(
        default_factory=list, description="Flags for start_server.sh / the server."
    )

    @model_validator(mode="after")
    def _host_for_remote(self):
        if self.target == "remote" and not self.host:
            raise ValueError("deploy.target remote needs deploy.host")
        if self.target == "local" and self.host:
            raise ValueError("deploy.host is only used with deploy.target remote")
        return self


class DataConfig(_Strict):
    source: Literal["auto", "gsm8k", "jsonl", "bundled"] = "auto"
    path: Path | None = None
    split: str = "test"
    limit: int | None = Field(20, ge=1, description="A seeded random subset of this many problems.")
    seed: int = 0

    @model_validator(mode="after")
    def _only_what_the_source_uses(self):
        if self.source == "jsonl" and self.path is None:
            raise ValueError("data.source jsonl needs data.path")
        if self.path is not None and self.source not in ("jsonl", "auto"):
            raise ValueError(f"data.path is not used with data.source {self.source}")
        if self.split != "test" and self.source not in ("gsm8k", "auto"):
            raise ValueError(f"data.split is not used with data.source {self.source}")
        return self


class GenerationConfig(_Strict):
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    samples_per_problem: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _samples_differ(self):
        if self.samples_per_problem > 1 and self.temperature == 0:
            raise ValueError("samples_per_problem > 1 needs temperature > 0 (greedy samples are copies)")
        return self


class CaptureConfig(_Strict):
    enabled: bool = True
    layers: Annotated[list[int], Field(min_length=1)] | Literal["all"] = "all"
    hook_point: str = "resid_post"


class RunConfig(_Strict):
    out_dir: Path = Path("runs/emotion-prefix")
    concurrency: int = Field(4, ge=1, le=64)


class AnalysisConfig(_Strict):
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_resamples: int = Field(2000, ge=100)


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    deploy: DeployConfig | None = None
    data: DataConfig = DataConfig()
    variants: list[str] = Field(default_factory=lambda: list(VARIANTS), min_length=2)
    generation: GenerationConfig = GenerationConfig()
    capture: CaptureConfig = CaptureConfig()
    run: RunConfig = RunConfig()
    analysis: AnalysisConfig = AnalysisConfig()

    @model_validator(mode="after")
    def _deployed_where_it_is_called(self):
        if self.deploy is not None:
            expected = f"http://127.0.0.1:{self.deploy.port}"
            if self.server.url.rstrip("/") != expected:
                raise ValueError(
                    f"with a deploy section, server.url must be {expected} (local, or the tunnel)"
                )
        return self

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        if "control" not in variants:
            raise ValueError("variants must include control (every difference is measured against it)")
        if len(set(variants)) != len(variants):
            raise ValueError("variants must not repeat")
        return variants


class ConfigError(ValueError):
    """A config file that cannot be used, with every problem named by its key path."""


def load_config(path: Path) -> Config:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        ]
        raise ConfigError(f"{path}: {len(problems)} problem(s)\n" + "\n".join(problems)) from exc
    base = path.resolve().parent  # relative paths in the file are relative to the file
    run = config.run.model_copy(update={"out_dir": base / config.run.out_dir})
    data = config.data
    if data.path is not None:
        data = data.model_copy(update={"path": base / data.path})
    return config.model_copy(update={"run": run, "data": data})
