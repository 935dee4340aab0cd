#!/usr/bin/env bash
# Install Debian's Chromium for the playground's browser tests (tests/integration/test_playground.py),
# where this machine can: Debian (its `chromium` package; Ubuntu's is a snap shim) with apt-get,
# as root or with password-less sudo.
# Nothing is downloaded by the tests themselves: Playwright drives this system Chromium.
#
#   bash scripts/install_browser.sh     # scripts/install.sh --dev (the README's test command) runs it
#
# Where Chromium is already there (`chromium` or `chromium-browser` on PATH, or
# NNSIGHT_SERVER_CHROMIUM naming one), it does nothing. Where it cannot install, it says why and
# exits 0: the browser tests then skip, naming this script.
set -euo pipefail

if [[ -n "${NNSIGHT_SERVER_CHROMIUM:-}" ]] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    echo "install_browser.sh: Chromium is installed"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_browser.sh: no apt-get here; install Chromium yourself (or set NNSIGHT_SERVER_CHROMIUM)" \
        "to run the browser tests"
    exit 0
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "install_browser.sh: not root and no password-less sudo; run: sudo apt-get install chromium"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium; then
    echo "install_browser.sh: installed $(chromium --version 2>/dev/null || echo chromium)"
else
    echo "install_browser.sh: apt-get could not install chromium; the browser tests will be skipped"
fi
