"""Entry point: ``python -m server`` (or the ``nnsight-server`` console script).

Flags override ``NNSIGHT_SERVER_*`` environment variables, which override the
defaults in :mod:`server.config`. Logging is configured here, once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from .config import ENV_PREFIX, Settings


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
        if name == "dtype":
            kwargs["choices"] = ["auto", "float32", "float16", "bfloat16"]
        elif name == "log_level":
            kwargs["choices"] = ["debug", "info", "warning", "error"]
        parser.add_argument(flag, **kwargs)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvicorn

    from .app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging configured above
        access_log=False,  # one line per request comes from server.middleware, with its id
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )


if __name__ == "__main__":
    main()
