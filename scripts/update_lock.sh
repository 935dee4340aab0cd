#!/usr/bin/env bash
# Re-resolve requirements.lock, test it in a fresh copy of the checkout, and keep it only if
# the tests pass. For maintainers; users and CI only ever install from the committed lock.
#
#   bash scripts/update_lock.sh              # newest releases within pyproject.toml's bounds
#   bash scripts/update_lock.sh --keep       # keep today's pins where still allowed (after
#                                            # editing pyproject.toml: only what changed moves)
#   bash scripts/update_lock.sh --no-test    # resolve only (the tests are the point: use sparingly)
#   bash scripts/update_lock.sh --torch 2.14.1
#
# The lock is a pip requirements file made by `uv pip compile --universal`: one file for
# Linux, macOS and Windows and every Python from 3.10 on, installed by plain pip as a
# constraints file (scripts/install.sh), so the CPU build of torch can still come from a
# local wheel or a PyTorch index. torch itself is held at one release (--torch; default:
# the lock's current one), since its CPU build is what CI and the docs measure.
#
# The candidate is tested as CI tests a submission: `bash .ci/run` (the README's test command:
# install.sh --dev, then pytest) in a copy of this working tree, its own .venv included. When
# the tests fail, requirements.lock is left as it was and the candidate is kept as
# requirements.lock.failed, with the copy it failed in, for a look.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements.lock"
upgrade=(--upgrade)
run_tests=1
torch_version=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) upgrade=() ;;
        --no-test) run_tests=0 ;;
        --torch) torch_version="${2:?--torch needs a version}"; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "update_lock.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z "$torch_version" && -f "$lock" ]]; then
    torch_version="$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$lock" | head -n 1)"
fi
if [[ -z "$torch_version" ]]; then
    echo "update_lock.sh: no torch pin in $lock; pass --torch" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/nnsight-lock.XXXXXX")"
cleanup() { [[ -n "${keep_work:-}" ]] || rm -rf "$work"; }
trap cleanup EXIT

uv="${UV:-$root/.venv/bin/uv}"
if [[ ! -x "$uv" ]]; then
    echo "installing uv into a throwaway environment"
    python3 -m venv "$work/uv-env"
    "$work/uv-env/bin/python" -m pip install --quiet --disable-pip-version-check uv
    uv="$work/uv-env/bin/uv"
fi

# The build backend is locked too: install.sh builds the project without build isolation.
build_requires="$(python3 - "$root/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^\[build-system\]\s*requires\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
print("\n".join(re.findall(r'"([^"]+)"', block)))
PY
)"
printf '%s\n' "$build_requires" > "$work/build.in"
echo "torch==$torch_version" > "$work/torch.txt"

candidate="$work/requirements.lock"
touch "$lock"
cp "$lock" "$candidate"  # uv keeps the pins it finds there unless --upgrade
(
    cd "$root"
    "$uv" pip compile pyproject.toml "$work/build.in" --extra dev --universal --python-version 3.10 \
        --constraint "$work/torch.txt" ${upgrade[@]+"${upgrade[@]}"} --quiet \
        --custom-compile-command "bash scripts/update_lock.sh" -o "$candidate"
)
# uv writes the input paths into the header; the temporary ones mean nothing to a reader.
sed -i.bak -e "s|$work/build.in|[build-system] requires|g" -e "s|$work/torch.txt|torch==$torch_version|g" "$candidate"
rm -f "$candidate.bak"

if diff -q "$lock" "$candidate" >/dev/null; then
    echo "requirements.lock is already up to date"
    exit 0
fi
echo "changes:"
diff <(grep -E '^[A-Za-z0-9]' "$lock") <(grep -E '^[A-Za-z0-9]' "$candidate") | grep -E '^[<>]' || true

if [[ "$run_tests" == 1 ]]; then
    tree="$work/tree"
    echo "testing the candidate in a copy of this checkout: $tree (install, then the tests)"
    mkdir -p "$tree"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
        | tar -xf - -C "$tree"
    cp "$candidate" "$tree/requirements.lock"
    if ! (cd "$tree" && bash .ci/run); then
        cp "$candidate" "$root/requirements.lock.failed"
        keep_work=1
        echo "the candidate failed; requirements.lock is unchanged." >&2
        echo "candidate: requirements.lock.failed; the copy it failed in: $tree" >&2
        exit 1
    fi
fi
cp "$candidate" "$lock"
echo "requirements.lock updated; commit it with the reason (what moved, what the tests said)"
