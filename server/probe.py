"""Small probes ``start_server.sh`` runs against a port or a running server: no model is loaded
here. The first three need the standard library only (plus prometheus-client's parser);
``check-flags`` imports the server's settings and loading code (and so torch), nothing more.

    python -m server.probe port-free HOST PORT   exit 0 if a server could bind there, else 1 and why
    python -m server.probe health URL             exit 0 if URL/health answers 200, else 1
    python -m server.probe summary URL            what the server is doing, from /health and /metrics
    python -m server.probe check-flags [FLAGS]    the server's flags (and NNSIGHT_SERVER_* variables)
                                                  checked as `python -m server` checks them before it
                                                  loads anything, port aside: exit 0 if they would
                                                  start, 2 for a bad flag, 1 for what cannot be served

``summary`` sends ``NNSIGHT_SERVER_API_KEY`` (when set) as the bearer key, as clients do.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

from .ports import port_free, port_in_use

TIMEOUT_S = 3


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def healthy(url: str) -> bool:
    try:
        return _get(f"{url}/health")[0] == 200
    except OSError:
        return False


def summary(url: str) -> str:
    """Health, then the numbers an operator looks at first, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, body = _get(f"{url}/health")
    except OSError as error:
        return f"health: no answer from {url} ({error})"
    lines = [f"health: {status} {body.decode(errors='replace').strip()}"]
    try:
        status, body = _get(f"{url}/metrics", os.environ.get("NNSIGHT_SERVER_API_KEY"))
    except OSError as error:
        return "\n".join([*lines, f"metrics: no answer ({error})"])
    if status != 200:
        message = json.loads(body).get("error", {}).get("message", "") if body.startswith(b"{") else ""
        return "\n".join([*lines, f"metrics: {status} {message}".rstrip()])
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    mib = 2**20
    lines += [
        f"requests: {values.get('nnsight_server_requests_in_progress', 0) - 1:.0f} in progress "
        f"(besides this one), {values.get('nnsight_server_requests_total', 0):.0f} answered",
        f"queue: {values.get('nnsight_server_queue_depth', 0):.0f} waiting "
        f"of {values.get('nnsight_server_queue_capacity', 0):.0f}",
        f"tokens: {values.get('nnsight_server_prompt_tokens_total', 0):.0f} in, "
        f"{values.get('nnsight_server_completion_tokens_total', 0):.0f} out",
        f"captures: {values.get('nnsight_server_captures_total', 0):.0f} "
        f"({values.get('nnsight_server_capture_bytes_total', 0) / mib:.1f} MiB)",
        f"memory: process {values.get('process_resident_memory_bytes', 0) / mib:.0f} MiB resident",
    ]
    if "nnsight_server_accelerator_memory_allocated_bytes" in values:
        lines[-1] += (
            f", accelerator {values['nnsight_server_accelerator_memory_allocated_bytes'] / mib:.0f} MiB "
            f"allocated, {values.get('nnsight_server_accelerator_memory_reserved_bytes', 0) / mib:.0f} MiB "
            "reserved"
        )
    return "\n".join(lines)


def check_flags(flags: list[str]) -> int:
    """What ``python -m server FLAGS`` would refuse before loading a model (the port aside:
    ``port-free`` checks that); argparse itself exits 2 with its usage for a bad flag."""
    from .__main__ import StartupRefused, parse_args, preflight

    try:
        preflight(parse_args(flags), check_port=False)
    except StartupRefused as exc:
        print(f"not starting: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    if len(argv) == 3 and argv[0] == "port-free" and argv[2].isdigit():
        if port_free(argv[1], int(argv[2])):
            return 0
        print(port_in_use(argv[1], int(argv[2])), file=sys.stderr)
        return 1
    if len(argv) == 2 and argv[0] == "health":
        return 0 if healthy(argv[1]) else 1
    if len(argv) == 2 and argv[0] == "summary":
        print(summary(argv[1]))
        return 0
    if argv and argv[0] == "check-flags":
        return check_flags(argv[1:])
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
