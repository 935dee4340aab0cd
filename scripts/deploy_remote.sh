#!/usr/bin/env bash
# Deploy this checkout to a GPU box over ssh and serve it there, reachable here through an ssh tunnel.
#
#   scripts/deploy_remote.sh [options] HOST [-- server flags]
#
#   HOST                 ssh destination: user@host, or an alias from ~/.ssh/config (ports, keys, jumps)
#   --dir DIR            where the project goes on HOST (default: nnsight-server, under the remote home)
#   --port PORT          the server's port on HOST (default 8000); it listens on 127.0.0.1 there
#   --local-port PORT    this machine's end of the tunnel (default: the same as --port)
#   --session NAME       the tmux session on HOST (default nnsight-server)
#   --wait SECONDS       how long to wait for /health through the tunnel (default 60)
#   --dry-run            print every command instead of running it
#   -- FLAGS             passed to start_server.sh on HOST, e.g. -- --model Qwen/Qwen3-0.6B --dtype bfloat16
#
# Steps: rsync the project (what .gitignore ignores stays here: .venv, activations, results),
# `start_server.sh restart` on HOST (which installs what is missing and waits for /health there),
# an ssh tunnel with a control socket (closed by the command printed at the end; nothing is killed
# by name), /health through the tunnel with a deadline, then how to connect.
# An API key in NNSIGHT_SERVER_API_KEY travels on ssh's stdin, never on a command line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir="nnsight-server"
port=8000
local_port=""
session="nnsight-server"
wait_s=60
dry_run=""
host=""
server_args=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
fail() { printf 'deploy_remote.sh: %s\n' "$*" >&2; exit 2; }

while (($#)); do
    case "$1" in
        --dir) remote_dir="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --local-port) local_port="$2"; shift 2 ;;
        --session) session="$2"; shift 2 ;;
        --wait) wait_s="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage 0 ;;
        --) shift; server_args=("$@"); break ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) [[ -z "$host" ]] || fail "one HOST only (got '$host' and '$1')"; host="$1"; shift ;;
    esac
done
[[ -n "$host" ]] || { printf 'deploy_remote.sh: HOST is missing\n\n' >&2; usage 2; }
local_port="${local_port:-$port}"
for value in "$port" "$local_port" "$wait_s"; do
    [[ "$value" =~ ^[0-9]+$ ]] || fail "--port, --local-port and --wait take numbers (got '$value')"
done
[[ "$session" =~ ^[A-Za-z0-9_.-]+$ ]] || fail "--session must be letters, digits, '_', '.' or '-'"
[[ "$remote_dir" != *"'"* ]] || fail "--dir must not contain a quote"
for arg in ${server_args[@]+"${server_args[@]}"}; do
    case "$arg" in
        --host | --host=* | --port | --port=*) fail "give the port with --port; the server stays on 127.0.0.1 there" ;;
        --api-key | --api-key=*) fail "set NNSIGHT_SERVER_API_KEY instead of --api-key: it then travels on ssh's stdin" ;;
    esac
done

# Print, or run, one command.
run() {
    if [[ -n "$dry_run" ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

key="${NNSIGHT_SERVER_API_KEY:-}"
control="/tmp/nnsight-tunnel-$(id -u)-$local_port" # short: ssh adds to it, and sockets allow ~100 bytes
url="http://127.0.0.1:$local_port"

if [[ -z "$dry_run" ]]; then
    command -v rsync >/dev/null || fail "rsync is not installed here (apt-get install rsync; it is needed on $host too)"
    if [[ -S "$control" ]]; then
        fail "a tunnel for this session and port is already open; close it first: ssh -S $control -O exit $host"
    fi
fi

echo "1/4 copying $root to $host:$remote_dir"
run ssh "$host" "mkdir -p '$remote_dir'"
run rsync -az --delete --filter=':- .gitignore' --exclude=.git/ "$root/" "$host:$remote_dir/"

echo "2/4 installing and starting on $host (the first run installs torch and the rest: minutes)"
remote_start="cd '$remote_dir' && ./start_server.sh restart --session $session --port $port"
((${#server_args[@]})) && remote_start+="$(printf ' %q' "${server_args[@]}")"
if [[ -n "$key" ]]; then
    remote_start="IFS= read -r NNSIGHT_SERVER_API_KEY && export NNSIGHT_SERVER_API_KEY && $remote_start"
    if [[ -n "$dry_run" ]]; then
        run ssh "$host" "$remote_start"
        echo "  (stdin: the API key from NNSIGHT_SERVER_API_KEY)"
    else
        ssh "$host" "$remote_start" <<<"$key"
    fi
else
    run ssh "$host" "$remote_start" </dev/null
fi

echo "3/4 tunnel: 127.0.0.1:$local_port here -> 127.0.0.1:$port on $host"
run ssh -f -N -M -S "$control" -o ExitOnForwardFailure=yes -L "$local_port:127.0.0.1:$port" "$host"

echo "4/4 waiting for $url/health (up to $wait_s s)"
if [[ -z "$dry_run" ]]; then
    deadline=$((SECONDS + wait_s))
    until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$url/health" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "no answer through the tunnel after $wait_s s; the server's log on $host:" >&2
            ssh "$host" "cd '$remote_dir' && ./start_server.sh logs -n 30 --session $session" >&2 || true
            ssh -S "$control" -O exit "$host" 2>/dev/null || true
            exit 1
        fi
        sleep 1
    done
fi

cat <<EOF
ready: $url/v1  (the server on $host, through the tunnel)
  export OPENAI_BASE_URL=$url/v1${key:+ OPENAI_API_KEY=\$NNSIGHT_SERVER_API_KEY}
  status on $host:   ssh $host 'cd $remote_dir && ./start_server.sh status --session $session'
  stop on $host:     ssh $host 'cd $remote_dir && ./start_server.sh stop --session $session'
  close the tunnel:  ssh -S $control -O exit $host
EOF
