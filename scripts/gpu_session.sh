#!/usr/bin/env bash
# One prepared GPU session: the GPU check and the peer benchmark, on an air-gapped GPU box, with
# wheels carried in .whl/ (docs/memory.md, "The GPU check"; the box has Python, torch and
# transformers but no package registry and no hub).
# `bash scripts/gpu_wheels.sh` downloads those wheels (where there is network).
#
# Run from the repository root, with OUT set to a folder for the results:
#
#     OUT=/tmp/out bash scripts/gpu_session.sh
#
# Each part runs under its own time limit, carved from one deadline (TOTAL_S, default 550 s),
# and writes into $OUT as it goes, so a part that fails or runs out of time still leaves the
# others' figures. It always exits 0, after writing $OUT/summary.txt. $OUT gets six files:
# env.txt, gpu_check.log, gpu_check.json, bench_peer.log, bench_peer.json, summary.txt.
#
#   1. installs .whl/*.whl into $SITE (default /tmp/site) and puts it first on PYTHONPATH;
#   2. env.txt: the card, Python, torch, transformers, nnsight and bitsandbytes versions;
#   3. builds a random-weight bf16 checkpoint of Qwen3-0.6B's shape (scripts/gpu_check.py
#      --build-only), kept in $CKPT for the two parts below;
#   4. scripts/gpu_check.py on it (the 16 GB budget checks; extra flags: GPU_CHECK_ARGS);
#   5. scripts/bench_peer.py on it, on cuda, against `transformers serve --continuous-batching`,
#      at reduced sizes (extra flags: BENCH_PEER_ARGS).
#
# Variables: PYTHON (default python3), INSTALL_PYTHON (the interpreter that installs the
# wheels, default $PYTHON), SITE, CKPT, TOTAL_S, GPU_CHECK_ARGS, BENCH_PEER_ARGS, and
# GPU_SESSION_DRY=1: a rehearsal on a CPU (tiny sizes; the wheels are installed into $SITE but
# not put on PYTHONPATH, so PYTHON's own packages are used), e.g.
#
#     GPU_SESSION_DRY=1 PYTHON=.venv/bin/python INSTALL_PYTHON=python3.12 OUT=/tmp/out \
#         bash scripts/gpu_session.sh

set -u
: "${OUT:?set OUT to the folder for the results}"
PYTHON=${PYTHON:-python3}
INSTALL_PYTHON=${INSTALL_PYTHON:-$PYTHON}
SITE=${SITE:-/tmp/site}
CKPT=${CKPT:-/tmp/gpu_session_checkpoint}
TOTAL_S=${TOTAL_S:-550}
DRY=${GPU_SESSION_DRY:-0}
mkdir -p "$OUT"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_UPDATE_CHECK=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false

RESULTS=()
# part NAME CAP_S RESERVE_S LOG COMMAND...: COMMAND under a limit of CAP_S seconds, or less so that
# RESERVE_S seconds of the deadline are left for the parts after it; its output appended to LOG.
part() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    local left=$((TOTAL_S - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        RESULTS+=("$name: skipped (no time left)")
        echo "== $name: skipped, no time left" >>"$log"
        return
    fi
    local began=$SECONDS rc
    echo "== $name (limit ${limit} s): $*" >>"$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local took=$((SECONDS - began)) verdict
    case $rc in
        0) verdict=passed ;;
        124 | 137) verdict="timed out after ${limit} s" ;;
        *) verdict="failed (exit $rc)" ;;
    esac
    RESULTS+=("$name: $verdict, ${took} s")
    echo "== $name: $verdict, ${took} s" >>"$log"
}

# 1. the wheels
part install 90 360 "$OUT/env.txt" \
    "$INSTALL_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
if [ "$DRY" = 1 ]; then
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. the environment
{
    echo "== nvidia-smi -L"
    nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
    echo "PYTHONPATH=$PYTHONPATH"
} >>"$OUT/env.txt"
part versions 60 350 "$OUT/env.txt" "$PYTHON" -c '
import importlib.metadata as m, platform, torch
names = ("torch", "transformers", "nnsight", "huggingface-hub", "tokenizers", "accelerate", "peft",
         "bitsandbytes", "fastapi", "uvicorn", "pydantic", "openai")
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
print("python", platform.python_version(), "| cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print(" | ".join(f"{n} {v(n)}" for n in names))
import server, transformers, nnsight, fastapi, uvicorn  # server first: its import-order guard
print("imports ok:", transformers.__file__)
'

if [ "$DRY" = 1 ]; then
    DEVICE=(--device cpu --dry-run)
    PEER_SIZES=(--device cpu --dtype float32 --rounds 1 --hol-repeats 1 --solo-repeats 1 --ttft-repeats 1
        --clients 2 --requests 1 --max-tokens 8 --short-tokens 4 --long-tokens 24 --delay 0.2)
else
    DEVICE=(--device cuda)
    PEER_SIZES=(--device cuda --dtype bfloat16 --rounds 2 --hol-repeats 1 --solo-repeats 2 --ttft-repeats 3
        --clients 8 --requests 2 --max-tokens 64)
fi

# 3. the checkpoint (gpu_check builds it itself if this part fails)
part checkpoint 120 330 "$OUT/gpu_check.log" \
    "$PYTHON" scripts/gpu_check.py "${DEVICE[@]}" --checkpoint "$CKPT" --build-only

# 4. the GPU check: its JSON is rewritten after every check, so a time limit keeps what was done
# shellcheck disable=SC2086  # GPU_CHECK_ARGS: words on purpose
part gpu_check 320 160 "$OUT/gpu_check.log" \
    "$PYTHON" scripts/gpu_check.py "${DEVICE[@]}" --checkpoint "$CKPT" --out "$OUT/gpu_check.json" \
    ${GPU_CHECK_ARGS:-}

# 5. the peer benchmark: part 1's figures are written as soon as they are measured
# shellcheck disable=SC2086
part bench_peer 180 5 "$OUT/bench_peer.log" \
    "$PYTHON" scripts/bench_peer.py --model "$CKPT/model" "${PEER_SIZES[@]}" --out "$OUT/bench_peer.json" \
    ${BENCH_PEER_ARGS:-}

# the summary: each part's verdict, then the figures that say most
{
    echo "gpu_session ($([ "$DRY" = 1 ] && echo "dry run, CPU" || echo GPU)), ${SECONDS} s in all"
    printf '%s\n' "${RESULTS[@]}"
    timeout 60 "$PYTHON" - "$OUT" <<'EOF' 2>&1
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as error:
        print(f"{name}: none ({type(error).__name__})")
        return None

check = load("gpu_check.json")
if check:
    print(f"gpu_check: ok={check.get('ok')} finished={check.get('finished')} device={check.get('device')}")
    for key, value in check.items():
        if isinstance(value, dict) and "ok" in value:
            brief = {k: v for k, v in value.items() if not isinstance(v, (dict, list)) or k == "statuses"}
            print(f"  {key}: {json.dumps(brief)[:400]}")
peer = load("bench_peer.json")
if peer:
    if peer.get("partial"):
        print(f"bench_peer: part 1 only; worst short-behind-long ratio {peer['head_of_line']['worst_ratio']:.2f}")
    else:
        print(f"bench_peer: ratios {json.dumps(peer['ratios'])}")
        print(f"  meets targets {json.dumps(peer['meets_targets'])}")
        for name, row in peer["closed_loop"].items():
            print(f"  {name}: {row['tokens_per_s']:.1f} tokens/s, "
                  f"{row['requests_short_of_max_tokens']} requests short of max_tokens")
EOF
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
exit 0
