#!/usr/bin/env bash
# Start, stop and look after the server: in a tmux session, or in the background where tmux is missing.
#
#   ./start_server.sh [start] [flags]     install what is missing, start, wait for /health, print the URL
#   ./start_server.sh stop                stop the server this script started (SIGTERM; SIGKILL after a wait)
#   ./start_server.sh restart [flags]     stop, then start with these flags
#   ./start_server.sh status              running? healthy? what it is doing (from /metrics); exit 0 if healthy
#   ./start_server.sh logs [-f] [-n N]    the log file's last N lines (100), -f to follow
#   ./start_server.sh run [flags]         the server in the foreground (what the session runs)
#   ./start_server.sh --help              this text and the server's flags (anywhere on the line)
#
# Server flags are those of `python -m server --help` (--model, --host, --port, --dtype, --device,
# --api-key, --activations-dir, --memory-budget, ...); each also reads NNSIGHT_SERVER_<NAME> from
# the environment. --api-key never reaches a command line: it is handed over in the environment.
# --backend vllm runs from .venv-vllm (made by scripts/install_vllm.sh, run here if it is missing).
# They are checked before anything starts: an unknown flag, a model folder that does not exist or
# an unusable --adapter is refused at once, and so is an unknown command.
# Flags of this script (each also an environment variable):
#   --session NAME   NNSIGHT_SERVER_SESSION    tmux session, and the name of this server (nnsight-server)
#   --log FILE       NNSIGHT_SERVER_LOG        log file, appended to (~/.nnsight_server/NAME.log)
#   --wait SECONDS   NNSIGHT_SERVER_WAIT       how long start waits for /health (600)
#   --no-tmux        NNSIGHT_SERVER_NO_TMUX=1  a background process with a pid file, even with tmux
# The server's pid, session id and checkout are kept in ${NNSIGHT_SERVER_STATE_DIR:-~/.nnsight_server}/NAME.state;
# stop signals only that process and closes only that session (nothing is killed by name), and
# only from the checkout that started it: a second clone uses its own --session.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)" # physical: a symlinked path is the same checkout
venv="${NNSIGHT_SERVER_VENV:-$root/.venv}"
python="$venv/bin/python"
session="${NNSIGHT_SERVER_SESSION:-nnsight-server}"
log="${NNSIGHT_SERVER_LOG:-}" # default: $state_dir/$session.log, once the session is known
wait_s="${NNSIGHT_SERVER_WAIT:-600}"
no_tmux="${NNSIGHT_SERVER_NO_TMUX:-}"
state_dir="${NNSIGHT_SERVER_STATE_DIR:-$HOME/.nnsight_server}"
host="${NNSIGHT_SERVER_HOST:-127.0.0.1}"
port="${NNSIGHT_SERVER_PORT:-8000}"
shutdown_s="${NNSIGHT_SERVER_SHUTDOWN_TIMEOUT:-30}"
backend="${NNSIGHT_SERVER_BACKEND:-hf}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export PYTHONUNBUFFERED=1

say() { printf '%s\n' "$*"; }
fail() { printf 'start_server.sh: %s\n' "$*" >&2; exit 1; }

# What the tmux session (or the background process) runs: _serve ENV_FILE PID_FILE LOG PYTHON [--tee] ARGS.
# The environment of `start` arrives in ENV_FILE (0600, deleted once read); any NNSIGHT_SERVER_*
# variable tmux's own environment holds (from an earlier start) is dropped first.
if [[ "${1:-}" == _serve ]]; then
    env_file="$2" pid_file="$3" log_file="$4" server_python="$5"
    shift 5
    for name in ${!NNSIGHT_SERVER_@}; do unset "$name"; done
    [[ -r "$env_file" ]] || fail "the environment file $env_file is missing: not starting"
    # shellcheck disable=SC1090
    source "$env_file" || true # a read-only variable in it is not worth failing for...
    rm -f "$env_file"
    [[ "${_NNSIGHT_SERVER_ENV_READ:-}" == 1 ]] || fail "could not read the environment file: not starting"
    unset _NNSIGHT_SERVER_ENV_READ
    if [[ "${1:-}" == --tee ]]; then
        shift
        exec > >(trap '' HUP; exec tee -a "$log_file") 2>&1 # tee outlives the pane by a moment
    fi
    echo "$$" >"$pid_file"
    exec "$server_python" -m server "$@"
fi

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    if [[ -x "$python" ]] && "$python" -c "import server" 2>/dev/null; then
        printf '\nThe server'"'"'s flags (python -m server --help):\n\n'
        "$python" -m server --help
    else
        printf '\nThe server'"'"'s own flags are listed once it is installed (bash scripts/install.sh): python -m server --help\n'
    fi
}
refuse() { printf 'start_server.sh: %s (see ./start_server.sh --help)\n' "$*" >&2; exit 2; }

# --help anywhere: print and start nothing.
for arg in "$@"; do
    case "$arg" in -h | --help) usage; exit 0 ;; esac
done

command="start"
case "${1:-}" in
    start | stop | restart | status | logs | run) command="$1"; shift ;;
    help) usage; exit 0 ;;
    "" | -*) ;; # flags alone: start
    *) refuse "unknown command '$1' (commands: start, stop, restart, status, logs, run)" ;;
esac

# A key given as --api-key moves to the environment at once: this script re-executes itself
# without it, so it is not in `ps` while start waits for the server.
for arg in "$@"; do
    case "$arg" in
        --api-key | --api-key=*)
            rest=()
            while (($#)); do
                case "$1" in
                    --api-key) NNSIGHT_SERVER_API_KEY="${2:-}"; shift 2 || shift ;;
                    --api-key=*) NNSIGHT_SERVER_API_KEY="${1#*=}"; shift ;;
                    *) rest+=("$1"); shift ;;
                esac
            done
            export NNSIGHT_SERVER_API_KEY
            exec bash "$0" "$command" ${rest[@]+"${rest[@]}"}
            ;;
    esac
done

# Split this script's flags from the server's; note where the server will listen.
server_args=()
follow=""
lines=100
while (($#)); do
    case "$1" in
        --session) session="$2"; shift 2 ;;
        --session=*) session="${1#*=}"; shift ;;
        --log) log="$2"; shift 2 ;;
        --log=*) log="${1#*=}"; shift ;;
        --wait) wait_s="$2"; shift 2 ;;
        --wait=*) wait_s="${1#*=}"; shift ;;
        --no-tmux) no_tmux=1; shift ;;
        -f | --follow) follow=1; shift ;;
        -n) lines="${2:-}"; shift 2 || refuse "-n needs a number of lines" ;;
        *)
            case "$1" in
                --host) host="$2" ;;
                --host=*) host="${1#*=}" ;;
                --port) port="$2" ;;
                --port=*) port="${1#*=}" ;;
                --shutdown-timeout) shutdown_s="$2" ;;
                --shutdown-timeout=*) shutdown_s="${1#*=}" ;;
                --backend) backend="${2:-}" ;;
                --backend=*) backend="${1#*=}" ;;
            esac
            server_args+=("$1"); shift ;;
    esac
done
# --backend vllm runs from the vLLM runtime's own environment (docs/scale_out.md).
if [[ "$backend" == vllm && -z "${NNSIGHT_SERVER_VENV:-}" ]]; then
    venv="$root/.venv-vllm"
    python="$venv/bin/python"
fi
[[ "$session" =~ ^[A-Za-z0-9_.-]+$ ]] || fail "--session must be letters, digits, '_', '.' or '-' (got '$session')"
[[ "$port" =~ ^[0-9]+$ ]] || fail "--port must be a number (got '$port')"
if [[ -n "$follow" || "$lines" != 100 ]] && [[ "$command" != logs ]]; then
    refuse "-f and -n are flags of 'logs', not of '$command'"
fi
[[ "$lines" =~ ^[0-9]+$ ]] || refuse "-n needs a number of lines (got '$lines')"
case "$command" in
    stop | status | logs)
        ((${#server_args[@]} == 0)) || refuse "'$command' takes no server flags (got '${server_args[0]}'); name the server with --session"
        ;;
esac
state="$state_dir/$session.state"
log="${log:-$state_dir/$session.log}"
case "$host" in 0.0.0.0 | "::" | "[::]") probe_host=127.0.0.1 ;; *) probe_host="$host" ;; esac
[[ "$probe_host" == *:* ]] && url_host="[$probe_host]" || url_host="$probe_host"
url="http://$url_host:$port"

# install.sh records the lock and the extras it installed; a venv from another lock (or none) is
# brought in line, with the same extras (a --dev venv keeps its test tools current too).
# The vLLM environment is install_vllm.sh's: its CPU build from requirements-vllm.lock, or a --gpu
# install (which records "gpu" and is left as it is).
ensure_installed() {
    if [[ "$backend" == vllm ]]; then
        if ! cmp -s "$root/requirements-vllm.lock" "$venv/.installed-lock" 2>/dev/null &&
            [[ "$(cat "$venv/.installed-lock" 2>/dev/null || true)" != gpu ]]; then
            say "installing vLLM's CPU build into $venv (about 4 minutes the first time; on a GPU machine run scripts/install_vllm.sh --gpu first)"
            NNSIGHT_SERVER_VLLM_VENV="$venv" bash "$root/scripts/install_vllm.sh"
        fi
        return
    fi
    if ! cmp -s "$root/requirements.lock" "$venv/.installed-lock" 2>/dev/null; then
        local extras=()
        [[ "$(cat "$venv/.installed-extras" 2>/dev/null || true)" == dev ]] && extras=(--dev)
        say "installing into $venv the versions requirements.lock names (a minute or two the first time)"
        NNSIGHT_SERVER_VENV="$venv" bash "$root/scripts/install.sh" ${extras[@]+"${extras[@]}"}
    fi
}

# The server's own probes, run where the server runs (relative paths in flags mean the same, and
# the project's `server` package is the one imported).
probe() { (cd "$root" && "$python" -m server.probe "$@"); }

# The server's flags as the server itself reads them, before anything starts (no model loads):
# argparse's usage is long, so only its verdict is shown.
check_flags() {
    local out rc=0
    out="$(probe check-flags ${server_args[@]+"${server_args[@]}"} 2>&1)" || rc=$?
    case "$rc" in
        0) ;;
        2) refuse "$(printf '%s\n' "$out" | grep -E 'error:' | sed 's/^nnsight-server: error: //' | tail -n 1)" ;;
        *) fail "$(printf '%s\n' "$out" | tail -n 1)" ;;
    esac
}

check_port() {
    local why
    why="$(probe port-free "$host" "$port" 2>&1)" || fail "$why"
}

# The state file belongs to one checkout: another clone's server is never stopped from here.
check_checkout() {
    if [[ -n "$s_checkout" && "$s_checkout" != "$root" ]]; then
        fail "'$session' was started from another checkout, $s_checkout: run its own start_server.sh there, or use --session NAME for a server of this checkout ($root)"
    fi
}

# -- the state file: key=value lines written by start, read here (never sourced) -----------------
read_state() {
    pid="" started="" tmux_id="" tmux_name="" s_url="" s_log="" s_shutdown="$shutdown_s" s_checkout=""
    [[ -f "$state" ]] || return 1
    local key value
    while IFS='=' read -r key value; do
        case "$key" in
            pid) pid="$value" ;; started) started="$value" ;; tmux) tmux_id="$value" ;; session) tmux_name="$value" ;;
            url) s_url="$value" ;; log) s_log="$value" ;; shutdown) s_shutdown="$value" ;;
            checkout) s_checkout="$value" ;;
        esac
    done <"$state"
    return 0
}

# A process's start time, the same whatever the caller's time zone or locale ("" once it is gone).
start_time() { LC_ALL=C TZ=UTC ps -o lstart= -p "$1" 2>/dev/null | tr -s ' ' || true; }

# The recorded process is alive (a zombie is not) and is still the one we started (not a reused pid).
ours_alive() {
    [[ -n "$pid" && -n "$started" && "$(start_time "$pid")" == "$started" ]] || return 1
    [[ "$(ps -o stat= -p "$pid" 2>/dev/null || true)" != Z* ]]
}

# Our tmux session: its id (ids restart with the tmux server) and its name both still match.
tmux_ours() {
    [[ -n "$tmux_id" ]] && command -v tmux >/dev/null || return 1
    [[ "$(tmux display-message -p -t "$tmux_id" '#{session_name}' 2>/dev/null || true)" == "$tmux_name" ]]
}

# -- start ---------------------------------------------------------------------------------------------
do_start() {
    if read_state; then
        if ours_alive; then
            check_checkout
            fail "'$session' is already running (pid $pid, $s_url): use restart, or --session NAME for a second server"
        fi
        rm -f "$state"
    fi
    if [[ -z "${checked:-}" ]]; then
        ensure_installed
        check_flags
    fi
    check_port
    mkdir -p "$state_dir" "$(dirname "$log")"
    chmod 700 "$state_dir"
    if [[ -z "$no_tmux" ]] && ! command -v tmux >/dev/null; then
        say "tmux is not installed (Debian/Ubuntu: sudo apt-get install tmux; macOS: brew install tmux);"
        say "running the server in the background instead"
        no_tmux=1
    fi
    if [[ -z "$no_tmux" ]] && tmux has-session -t "=$session" 2>/dev/null; then
        fail "a tmux session named '$session' already exists (not started by this script?): choose --session"
    fi
    local pid_file="$state_dir/$session.pid"
    rm -f "$pid_file"
    # The environment (the API key among it) reaches the server through a file only this user can
    # read, deleted as soon as it is read (or when start ends, whatever happens): nothing secret on
    # a command line or in tmux's environment.
    env_file="$(umask 077 && mktemp "$state_dir/env.XXXXXX")"
    trap 'rm -f "$env_file"' EXIT
    { export -p; echo "_NNSIGHT_SERVER_ENV_READ=1"; } >"$env_file"
    local log_offset
    log_offset="$({ wc -c <"$log"; } 2>/dev/null | tr -d ' ' || true)"
    log_offset="${log_offset:-0}"
    printf '\n=== %s: starting %s on %s (session %s, checkout %s) ===\n' \
        "$(date '+%F %T')" "${server_args[*]:-(defaults)}" "$url" "$session" "$root" >>"$log"
    local serve=(bash "$root/start_server.sh" _serve "$env_file" "$pid_file" "$log" "$python")
    if [[ -z "$no_tmux" ]]; then
        # Several arguments: tmux (3.0 and later) runs them directly, not through the user's shell.
        # A tmux server started here copies this environment: not the key.
        tmux_id="$(env -u NNSIGHT_SERVER_API_KEY tmux new-session -d -P -F '#{session_id}' -s "$session" \
            -c "$root" "${serve[@]}" --tee ${server_args[@]+"${server_args[@]}"})"
    else
        tmux_id=""
        local detach=()
        command -v setsid >/dev/null && detach=(setsid) # not on macOS; nohup alone does there
        (cd "$root" && exec ${detach[@]+"${detach[@]}"} nohup "${serve[@]}" ${server_args[@]+"${server_args[@]}"} \
            >>"$log" 2>&1 </dev/null &)
    fi
    for _ in $(seq 100); do [[ -s "$pid_file" ]] && break; sleep 0.1; done
    [[ -s "$pid_file" ]] || fail "the server process did not start; see $log"
    pid="$(cat "$pid_file")"
    rm -f "$pid_file"
    started="$(start_time "$pid")"
    printf 'pid=%s\nstarted=%s\ntmux=%s\nsession=%s\nurl=%s\nlog=%s\nshutdown=%s\ncheckout=%s\n' \
        "$pid" "$started" "$tmux_id" "$session" "$url" "$log" "$shutdown_s" "$root" >"$state"
    say "started '$session' (pid $pid${tmux_id:+, tmux session $tmux_id}); waiting for $url/health (up to ${wait_s} s)"
    local deadline=$((SECONDS + wait_s)) told=""
    while ((SECONDS < deadline)); do
        # The one slow first-start step the user should hear about here, not only in the log.
        if [[ -z "$told" ]] && tail -c +"$((log_offset + 1))" "$log" 2>/dev/null | grep -q "first start: converting"; then
            tail -c +"$((log_offset + 1))" "$log" | grep -m 1 -o "first start: converting.*" | sed 's/^/  /'
            told=1
        fi
        if ! ours_alive; then
            rm -f "$state"
            say "the server exited during start-up; the end of $log:" >&2
            tail -n 30 "$log" >&2
            exit 1
        fi
        if probe health "$url"; then
            say "healthy: $url  (OpenAI base URL: $url/v1; playground: $url/ui)"
            [[ -n "$tmux_id" ]] && say "attach: tmux attach -t $session"
            local named=""
            [[ "$session" != nnsight-server ]] && named=" --session $session"
            say "status: $0 status$named   logs: $0 logs -f$named   stop: $0 stop$named"
            return 0
        fi
        sleep 1
    done
    say "not healthy after ${wait_s} s; it is left running (pid $pid). The end of $log:" >&2
    tail -n 30 "$log" >&2
    say "follow it with: $0 logs -f --session $session   or stop it: $0 stop --session $session" >&2
    exit 1
}

# -- stop ------------------------------------------------------------------------------------------
do_stop() {
    if ! read_state; then
        say "no server named '$session' was started by this script (no $state)"
        return 0
    fi
    if ours_alive; then
        check_checkout
        # The server gets --shutdown-timeout for running requests, then as long (at least 5 s) for
        # the worker to stop.
        local whole="${s_shutdown%.*}"
        local grace=$((${whole:-0} * 2 + 20))
        say "stopping '$session' (pid $pid): SIGTERM, up to ${grace} s for running requests"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + grace))
        while ours_alive && ((SECONDS < deadline)); do sleep 0.2; done
        if ours_alive; then
            say "still running after ${grace} s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 10))
            while ours_alive && ((SECONDS < deadline)); do sleep 0.1; done
            ours_alive && fail "pid $pid survived SIGKILL; state kept in $state"
        fi
        # Its session ends with it; close it if something keeps it open (only ours, by id and name).
        if tmux_ours; then tmux kill-session -t "$tmux_id"; fi
    else
        say "'$session' (pid $pid) was not running; tmux sessions left as they are"
    fi
    rm -f "$state"
    say "stopped"
}

# -- status ------------------------------------------------------------------------------------------
do_status() {
    if ! read_state; then
        say "'$session': not running (nothing started by this script; state: $state)"
        exit 3
    fi
    if ! ours_alive; then
        say "'$session': not running (pid $pid has exited; the end of $s_log:)"
        tail -n 20 "$s_log" 2>/dev/null || true
        exit 3
    fi
    say "'$session': running, pid $pid, since $started"
    if [[ -n "$tmux_id" ]]; then say "tmux: session $session ($tmux_id): tmux attach -t $session"; else say "background process (no tmux)"; fi
    say "url: $s_url   log: $s_log"
    [[ -n "$s_checkout" ]] && say "checkout: $s_checkout"
    probe summary "$s_url" || true
    say "--- the end of the log:"
    tail -n 5 "$s_log" 2>/dev/null || true
    probe health "$s_url" || exit 1
}

do_logs() {
    read_state && log="${s_log:-$log}"
    [[ -f "$log" ]] || fail "no log file at $log"
    if [[ -n "$follow" ]]; then exec tail -n "$lines" -F "$log"; fi
    tail -n "$lines" "$log"
}

case "$command" in
    start) do_start ;;
    stop) do_stop ;;
    restart) # a bad flag is refused before the running server is stopped
        ensure_installed
        check_flags
        checked=1
        do_stop && do_start
        ;;
    status) do_status ;;
    logs) do_logs ;;
    run) # the server checks the port itself before it loads anything
        ensure_installed
        check_flags
        cd "$root"
        exec "$python" -m server ${server_args[@]+"${server_args[@]}"}
        ;;
esac
