"""Entry point: ``python -m server`` (or the ``nnsight-server`` console script).

Flags override ``NNSIGHT_SERVER_*`` environment variables, which override the
defaults in :mod:`server.config`. Logging is configured here, once.

Before anything loads, :func:`preflight` refuses what cannot be served (a model folder that
does not exist, an adapter that peft cannot switch off, a port in use) with one line that
says what to do; ``start_server.sh`` runs the same checks (``python -m server.probe
check-flags``) before it starts a session.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Literal, get_args, get_origin

from pydantic import ValidationError

from .config import ENV_PREFIX, Settings
from .logs import configure_logging
from .ports import port_free, port_in_use

logger = logging.getLogger("server")


class StartupRefused(RuntimeError):
    """The settings cannot be served; the message says why and what to do."""


def parse_args(argv: list[str] | None = None) -> Settings:
    fields = Settings.model_fields
    parser = argparse.ArgumentParser(
        prog="nnsight-server",
        description="Serve one HuggingFace causal LM, wrapped by nnsight, over an OpenAI-compatible API.",
        epilog=f"Every flag can also be set by environment variable: {ENV_PREFIX}<FLAG_NAME>, "
        f"e.g. {ENV_PREFIX}MAX_TOKENS_CAP=2048.",
    )
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict = {"dest": name, "default": None, "help": field.description}
        choices = _literal_choices(field.annotation)
        if choices:
            kwargs["choices"] = choices
        if get_origin(field.annotation) is list:
            kwargs["action"] = "append"  # a repeatable flag
        parser.add_argument(flag, **kwargs)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        parser.error("; ".join(_flag_error(error) for error in exc.errors()))
        raise  # unreachable: parser.error exits


def _literal_choices(annotation) -> list[str] | None:
    """The values of a ``Literal[...]`` setting (or of ``Literal[...] | None``), else None."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    literals = [arg for arg in get_args(annotation) if get_origin(arg) is Literal]
    return list(get_args(literals[0])) if literals else None


def _flag_error(error: dict) -> str:
    """One pydantic error as the flag (or variable) it came from: ``--max-tokens-cap: Input should
    be a valid integer (got 'lots')``."""
    name = str(error["loc"][0]) if error.get("loc") else ""
    where = "--" + name.replace("_", "-") if name else "settings"
    got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"{where} (or {ENV_PREFIX}{name.upper()}): {error['msg']}{got}"


def preflight(settings: Settings, *, check_port: bool = True) -> None:
    """The checks that need no model: the port is free, ``--model`` and ``--lda-before`` name
    something that exists, ``--adapter`` is a PEFT folder the installed peft and transformers
    can switch off, ``--quantization`` has bitsandbytes installed, ``--chat-template`` is a
    readable Jinja template, ``--backend`` takes the other flags (and vLLM is installed for it).

    Raises:
        StartupRefused: with the reason.
    """
    from .engine.loading import (
        ModelLoadError,
        check_adapter_support,
        check_chat_template,
        check_model_source,
        check_quantization_support,
    )
    from .engine.sae import sae_flag_problem
    from .engine.vllm_engine import check_backend_settings

    if check_port and not port_free(settings.host, settings.port):
        raise StartupRefused(port_in_use(settings.host, settings.port))
    for spec in settings.sae:
        problem = sae_flag_problem(spec, settings.backend)
        if problem:
            raise StartupRefused(f"--sae {spec}: {problem}")
    try:
        check_model_source(settings.model)
        if settings.lda_before:
            check_model_source(settings.lda_before, "--lda-before")
        if settings.adapter is not None:
            check_adapter_support(settings.adapter)
        check_quantization_support(settings.quantization)
        if settings.chat_template is not None:
            check_chat_template(settings.chat_template)
        check_backend_settings(settings)
    except ModelLoadError as exc:
        raise StartupRefused(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    configure_logging(settings.log_level)
    try:
        preflight(settings)
    except StartupRefused as exc:
        logger.error("not starting: %s", exc)
        sys.exit(1)
    import uvicorn

    from .app import create_app
    from .connections import protocol_with_read_timeout

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=protocol_with_read_timeout(settings.read_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,
        log_config=None,  # keep the logging configured above
        access_log=False,  # one line per request comes from server.middleware, with its id
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )


if __name__ == "__main__":
    main()
