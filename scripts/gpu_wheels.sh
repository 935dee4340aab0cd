#!/usr/bin/env bash
# Download the wheels that scripts/gpu_session.sh installs on an air-gapped GPU box, at the
# versions of requirements.lock.
#
#   bash scripts/gpu_wheels.sh             # into .whl/ (kept out of git)
#   bash scripts/gpu_wheels.sh /tmp/whl    # into another folder
#
# Such a box has Python 3.12, torch (CUDA 13), transformers and many common packages, but no
# package registry: what the project needs beyond them travels as wheels in .whl/, installed
# there with `pip install --no-index --no-deps --target DIR` (docs/memory.md, "The GPU check").
# So the wheels are for CPython 3.12 on manylinux x86_64, whatever this machine runs, and each
# comes without its dependencies: the list below names every package that travels, and why.
# Each version is the one requirements.lock pins for Python 3.11 and newer.
#
# bitsandbytes' wheel holds a library for every CUDA (11.8 to 13.2), ROCm and XPU release it
# supports, 43 MB in all. Only the CPU and CUDA 13 libraries (cuda130, cuda132) are kept, and
# its RECORD is rewritten to match, leaving about 7 MB, so that everything carried stays well
# under 64 MiB. The script fails if the total is over 50 MiB.
#
# The folder's old wheels are replaced only after every new one is downloaded (two versions of
# one package there would stop the install). Needs network access.
#
# Environment: PYTHON (the interpreter that runs pip; default python3, any version).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements.lock"
python="${PYTHON:-python3}"
limit_mib=50
case "${1:-}" in
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
dest="${1:-$root/.whl}"
[[ -f "$lock" ]] || { echo "gpu_wheels.sh: no lock file at $lock" >&2; exit 1; }

# What travels (names as requirements.lock spells them), and why.
packages=(
    # nnsight, and what it needs that the box lacks
    nnsight greenlet websocket-client zstandard
    # the locked transformers (the box has 5.17), the peft that goes with it (LDA's adapter),
    # and the regex it asks for (>= 2025.10.22)
    transformers peft regex
    # scripts/gpu_check.py's 4-bit check (f), absent there; trimmed below
    bitsandbytes
    # the server: FastAPI, pydantic and pydantic-settings, with what they need (absent there,
    # but for annotated-doc)
    fastapi starlette uvicorn opentelemetry-api annotated-doc
    pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
    # there, but maybe older than these need: typing-extensions >= 4.16 (pydantic),
    # anyio >= 4.10 (openai), idna >= 3.18 (httpx2), h11 >= 0.16 (pyproject.toml)
    typing-extensions anyio idna h11
    # structured output (response_format), absent there
    llguidance
    # `transformers serve`, the peer scripts/bench_peer.py measures against, needs openai,
    # which brings httpx2 (all absent there)
    openai jiter sniffio httpx2 httpcore2 truststore
)

# locked_version NAME: the version requirements.lock pins for Python >= 3.11 (the line with
# no Python marker, or the one that is not `python_full_version < '3.11'`).
locked_version() {
    local found
    found="$(awk -v name="$1" 'index($0, name "==") == 1 && $0 !~ /python_full_version < .3\.11./ {
        split($1, parts, "=="); print parts[2] }' "$lock")"
    if [[ -z "$found" || "$found" == *$'\n'* ]]; then
        echo "gpu_wheels.sh: requirements.lock has no single version of $1 for Python 3.11+: '${found//$'\n'/ }'" >&2
        return 1
    fi
    echo "$found"
}

specs=()
for name in "${packages[@]}"; do
    specs+=("$name==$(locked_version "$name")")
done

mkdir -p "$dest"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The box: CPython 3.12, glibc new enough for every manylinux tag below (pip matches each tag
# exactly, so every one a needed wheel carries is named).
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$work" "${specs[@]}"

# Trim bitsandbytes: drop the CUDA 11.8-12.8, ROCm and XPU libraries from the wheel and from
# its RECORD; rewritten with zipfile, entry by entry, so it stays a valid wheel.
shopt -s nullglob
bnb=("$work"/bitsandbytes-*.whl)
[[ ${#bnb[@]} -eq 1 ]] || { echo "gpu_wheels.sh: expected one bitsandbytes wheel, found ${#bnb[@]}" >&2; exit 1; }
"$python" - "${bnb[0]}" <<'PY'
import os
import re
import sys
import zipfile

path = sys.argv[1]
dropped = re.compile(r"^bitsandbytes/libbitsandbytes_(cuda1(1[89]|2[0-8])|rocm|xpu)[^/]*$")
kept_libraries = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"}

with zipfile.ZipFile(path) as source:
    entries = [info for info in source.infolist() if not dropped.match(info.filename)]
    names = {info.filename for info in entries}
    libraries = {os.path.basename(n) for n in names if os.path.basename(n).startswith("libbitsandbytes_")}
    if libraries != kept_libraries:
        sys.exit(f"gpu_wheels.sh: bitsandbytes would keep {sorted(libraries)}, not {sorted(kept_libraries)}")
    trimmed = path + ".trimmed"
    with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in entries:
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] in names).encode()
            target.writestr(info, data)
os.replace(trimmed, path)
print(f"bitsandbytes trimmed: {len(entries)} files, {os.path.getsize(path) / 2**20:.1f} MiB")
PY

total=$(du -cb "$work"/*.whl | tail -n 1 | cut -f 1)
count=$(find "$work" -maxdepth 1 -name '*.whl' | wc -l)
echo "$count wheels, $(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }') MiB"
if ((total > limit_mib * 1048576)); then
    echo "gpu_wheels.sh: the wheels come to more than $limit_mib MiB" >&2
    exit 1
fi

rm -f "$dest"/*.whl
mv "$work"/*.whl "$dest"/
echo "in $dest"
