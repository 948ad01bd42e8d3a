#!/usr/bin/env bash
# Install what is missing, build the demo model, start coe, answer one demo request, keep serving.
#
#   deploy/serve.sh [extra `coe serve` args]
#
# Environment:
#   COE_PORT=8080              port of the gateway
#   COE_CONFIG=experts.yaml    expert configuration
#   COE_READY_TIMEOUT=600      seconds to wait for /health/ready
#   COE_API_KEYS=k1,k2         if set, the demo request sends the first key as a Bearer token
#   COE_SETUP_SKIP=1           do not run deploy/setup.sh (use `coe` from your own environment)
# Server output goes to .coe/serve.log. Ctrl-C (or SIGTERM) stops coe, which drains and stops the
# vLLM servers it manages.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[serve] %s\n' "$*"; }
die() { printf '[serve] ERROR: %s\n' "$*" >&2; exit 1; }

deploy/setup.sh

if [[ -x .venv/bin/coe ]]; then
    COE=.venv/bin/coe
    PY=.venv/bin/python
elif [[ "${COE_SETUP_SKIP:-0}" == "1" ]] && command -v coe >/dev/null 2>&1; then
    COE="$(command -v coe)"
    PY="$(dirname "$COE")/python"
    [[ -x "$PY" ]] || PY=python3
else
    die ".venv/bin/coe not found (run deploy/setup.sh, or with COE_SETUP_SKIP=1 put coe on PATH)"
fi

PORT="${COE_PORT:-8080}"
CONFIG="${COE_CONFIG:-experts.yaml}"
READY_TIMEOUT="${COE_READY_TIMEOUT:-600}"
BASE="http://127.0.0.1:$PORT"
LOG_DIR="$ROOT/.coe"
LOG="$LOG_DIR/serve.log"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
mkdir -p "$LOG_DIR"

[[ -f "$CONFIG" ]] || die "$CONFIG not found (run from a checkout of the repository, or set COE_CONFIG)"

# --- demo model -----------------------------------------------------------------------------------
# Always asked: a no-op (~1 s) when the build is current, a rebuild when its recipe changed.
[[ -f models/gemma-3-270m/coe-build.json ]] || log "building the demo model into models/gemma-3-270m (first run only)"
"$COE" models build-gemma models/gemma-3-270m

# --- start the server ---------------------------------------------------------------------------
if curl -s -o /dev/null --max-time 2 "$BASE/" 2>/dev/null; then
    die "something already answers on port $PORT (stop it, or choose another port: COE_PORT=8081 deploy/serve.sh)"
fi

SERVER_PID=""
STOPPING=0
WAITING=0   # 1 while the dots of the readiness wait are being printed

server_alive() { [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; }

# shellcheck disable=SC2329  # called by trap
forward_signal() {  # Ctrl-C / SIGTERM / SIGHUP: ask coe to drain and stop (a second one forces it)
    if server_alive; then
        if [[ "$STOPPING" == "0" ]]; then
            [[ "$WAITING" == "0" ]] || printf '\n'
            WAITING=0
            log "stopping coe (it drains requests and stops its vLLM servers) ..."
        fi
        STOPPING=1
        kill -TERM "$SERVER_PID" 2>/dev/null || true
    fi
}

# shellcheck disable=SC2329  # called by trap
cleanup() {  # on any exit: never leave the server (or its vLLM children) behind
    local rc=$?
    if server_alive; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do
            server_alive || break
            sleep 1
        done
        if server_alive; then
            log "coe did not stop within 60 s: killing its process group"
            kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
    fi
    rm -f "${RESP:-}"
    exit "$rc"
}

show_log_tail() {
    printf '[serve] last lines of %s:\n' "$LOG" >&2
    tail -n 40 "$LOG" >&2 || true
}

trap forward_signal INT TERM HUP
trap cleanup EXIT

log "starting coe on $BASE (config $CONFIG, log $LOG)"
# Job control puts the server in its own process group: a Ctrl-C in the terminal reaches only this
# script, which forwards exactly one SIGTERM (uvicorn would treat two signals as "force quit").
set -m
"$COE" serve --config "$CONFIG" --port "$PORT" "$@" </dev/null >"$LOG" 2>&1 &
SERVER_PID=$!
set +m

printf '[serve] waiting for %s/health/ready ' "$BASE"
WAITING=1
waited=0
while :; do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$BASE/health/ready" 2>/dev/null || true)"
    if [[ "$code" == "200" ]]; then
        printf ' ready after %ss\n' "$waited"
        break
    fi
    if ! server_alive; then
        printf '\n'
        set +e
        wait "$SERVER_PID"
        rc=$?
        set -e
        SERVER_PID=""
        show_log_tail
        log "coe exited with code $rc before it was ready"
        [[ "$rc" != "0" ]] || rc=1
        exit "$rc"
    fi
    if ((waited >= READY_TIMEOUT)); then
        printf '\n'
        show_log_tail
        die "coe was not ready after ${READY_TIMEOUT}s (COE_READY_TIMEOUT raises the limit)"
    fi
    printf '.'
    sleep 3 &
    wait $! || true
    waited=$((waited + 3))
    [[ "$STOPPING" == "0" ]] || break
done
WAITING=0

# --- one demo request ---------------------------------------------------------------------------
if [[ "$STOPPING" == "0" ]]; then
    auth=()
    if [[ -n "${COE_API_KEYS:-}" ]]; then
        key="${COE_API_KEYS%%,*}"
        key="${key//[[:space:]]/}"
        auth=(-H "Authorization: Bearer $key")
    fi
    QUESTION="What is the capital of France?"
    RESP="$(mktemp "${TMPDIR:-/tmp}/coe-demo.XXXXXX")"
    log "demo request: POST $BASE/v1/chat/completions  \"$QUESTION\""
    code="$(curl -sS -o "$RESP" -w '%{http_code}' --max-time 600 \
        -H 'Content-Type: application/json' ${auth[@]+"${auth[@]}"} \
        -d "{\"model\": \"coe\", \"messages\": [{\"role\": \"user\", \"content\": \"$QUESTION\"}], \"max_tokens\": 48}" \
        "$BASE/v1/chat/completions" || true)"
    if [[ "$code" != "200" ]]; then
        log "demo request failed: HTTP ${code:-(no answer)}"
        head -c 2000 "$RESP" >&2 || true
        printf '\n' >&2
        show_log_tail
        exit 1
    fi
    "$PY" - "$RESP" <<'EOF'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    data = json.load(f)
answer = data["choices"][0]["message"]["content"] or ""
experts = (data.get("coe") or {}).get("experts") or []
names = [str(e.get("name")) for e in experts if isinstance(e, dict) and e.get("name")]
print("[serve] answer:   " + " ".join(answer.split()))
print("[serve] expert(s): " + (", ".join(names) if names else "(not reported)"))
EOF
    log "coe keeps running at $BASE/v1 (OpenAI-compatible; logs: $LOG). Ctrl-C stops it."
fi

# --- keep serving until coe exits (Ctrl-C / SIGTERM are forwarded to it) ---------------------
set +e
while server_alive; do
    wait "$SERVER_PID"
done
wait "$SERVER_PID"
rc=$?
set -e
SERVER_PID=""
log "coe stopped (exit code $rc)"
exit "$rc"
