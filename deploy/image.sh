#!/usr/bin/env bash
# Build coe's container image (deploy/Containerfile) with podman, without any image registry.
#
#   deploy/image.sh [gateway|cpu]        (default: gateway)
#
# 1. The base: a minimal Debian bookworm made with debootstrap from Debian's own packages (python3,
#    python3-venv, ca-certificates, tini) and imported as localhost/coe-base:bookworm. Made once.
# 2. The wheels: built HERE with the project's .venv pip (its index and wheel folders, e.g. the CPU
#    torch wheel), pinned to the versions of .venv (`pip freeze`, the tested set), so the container
#    build needs no network and no compiler.
# 3. The image: `podman build --target TARGET`, tagged localhost/coe:TARGET-KEY and localhost/coe:TARGET.
#    KEY hashes every input (Containerfile, this script, pyproject.toml, the pinned versions, the
#    package sources); when the tag for KEY exists the build is skipped (a cache hit takes ~1 s).
#
# Prints the image reference (localhost/coe:TARGET-KEY) as its last line.
#
# Environment:
#   COE_IMAGE_CACHE   where the base rootfs tarball and build contexts are kept (default: ~/.cache/coe-image)
#   COE_IMAGE_NAME    image repository (default: localhost/coe)
#   BASE_IMAGE        build on another base instead (e.g. your CUDA image, see the Containerfile's ARGs)
#   DEBIAN_MIRROR     default: http://deb.debian.org/debian
#   CONTAINERS_CONF   podman's config (default: see deploy/podman.sh, which runs every podman command here)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TARGET="${1:-gateway}"
case "$TARGET" in gateway|cpu) ;; *) echo "usage: deploy/image.sh [gateway|cpu]" >&2; exit 2 ;; esac

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] ERROR: %s\n' "$*" >&2; exit 1; }

CACHE="${COE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coe-image}"
NAME="${COE_IMAGE_NAME:-localhost/coe}"
BASE_TAG="localhost/coe-base:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
VPY="$ROOT/.venv/bin/python"
mkdir -p "$CACHE"

command -v podman >/dev/null || die "podman not found: apt-get install -y podman runc debootstrap"
[[ -x "$VPY" ]] || die ".venv/bin/python not found (run deploy/setup.sh): the wheels are built with it"

PODMAN=("$ROOT/deploy/podman.sh")   # runc, and the sandbox's containers.conf where needed

# --- 1. the Debian base, once -----------------------------------------------------------------
if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE="$BASE_TAG"
    if ! "${PODMAN[@]}" image exists "$BASE_TAG"; then
        tarball="$CACHE/bookworm-rootfs.tar"
        if [[ ! -s "$tarball" ]]; then
            command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install -y debootstrap"
            [[ "$(id -u)" == "0" ]] || die "debootstrap needs root (once; the result is cached in $tarball)"
            rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
            log "debootstrap bookworm (minbase + python3) into $rootfs (once, a few minutes)"
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
                bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
                || die "debootstrap failed, see $CACHE/debootstrap.log"
            rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
            tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
            rm -rf "$rootfs"
        fi
        log "importing $tarball as $BASE_TAG"
        "${PODMAN[@]}" import "$tarball" "$BASE_TAG" >/dev/null
    fi
fi

# --- 2. the cache key -------------------------------------------------------------------------
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$VPY" -m pip freeze --exclude-editable --all 2>/dev/null | grep -v -e '^-e ' -e ' @ ' >"$constraints"
KEY="$(
    {
        printf '%s\n' "$TARGET" "$BASE_IMAGE" "$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$BASE_IMAGE")"
        cat deploy/Containerfile deploy/image.sh pyproject.toml "$constraints"
        find coe routers services -type f \( -name '*.py' -o -path '*/static/*' \) -not -path '*/__pycache__/*' \
            -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        if [[ "$TARGET" == cpu ]]; then find examples/pack/adapters -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; fi
    } | sha256sum | cut -c1-16
)"
REF="$NAME:$TARGET-$KEY"
if "${PODMAN[@]}" image exists "$REF"; then
    log "cache hit: $REF"
    "${PODMAN[@]}" tag "$REF" "$NAME:$TARGET"
    echo "$REF"
    exit 0
fi

# --- 3. wheels, built here, pinned to .venv's versions ----------------------------------------
CTX="$CACHE/context-$TARGET"
rm -rf "$CTX" && mkdir -p "$CTX/wheels"
extras=""
[[ "$TARGET" == cpu ]] && extras="[cpu,models]"
log "building wheels for coe$extras (pinned to .venv's versions)"
"$VPY" -m pip wheel -q --wheel-dir "$CTX/wheels" -c "$constraints" ".$extras" >"$CACHE/wheels-$TARGET.log" 2>&1 \
    || { tail -n 20 "$CACHE/wheels-$TARGET.log" >&2; die "pip wheel failed (log: $CACHE/wheels-$TARGET.log)"; }
# pip resolved for .venv's python; the image's python may differ in version (Debian's 3.11.2 here, a
# newer 3.11 in .venv), and markers like `python_full_version < "3.11.3"` then want more wheels. Add
# them, evaluated for the base's interpreter, until nothing is missing.
base_py="$("${PODMAN[@]}" run --rm --network none --entrypoint python3 "$BASE_IMAGE" \
    -c 'import platform; print(platform.python_version())')"
for _ in 1 2 3; do
    missing="$("$VPY" - "$CTX/wheels" "$base_py" <<'PY'
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.markers import default_environment
folder, full = Path(sys.argv[1]), sys.argv[2]
env = {**default_environment(), "python_full_version": full, "python_version": ".".join(full.split(".")[:2])}
have, want = set(), set()
for wheel in folder.glob("*.whl"):
    have.add(canonicalize_name(parse_wheel_filename(wheel.name)[0]))
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is not None and req.marker.evaluate({**env, "extra": ""}):
                    want.add(str(req).split(";")[0].strip())
print(" ".join(sorted(r for r in want if canonicalize_name(Requirement(r).name) not in have)))
PY
)"
    [[ -n "$missing" ]] || break
    log "wheels for python $base_py: $missing"
    # shellcheck disable=SC2086
    "$VPY" -m pip wheel -q --wheel-dir "$CTX/wheels" -c "$constraints" $missing >>"$CACHE/wheels-$TARGET.log" 2>&1 \
        || die "pip wheel $missing failed (log: $CACHE/wheels-$TARGET.log)"
done
mkdir -p "$CTX/pack"
[[ "$TARGET" == cpu ]] && cp -r examples/pack/adapters "$CTX/pack/"
cp "$constraints" "$CTX/constraints.txt"

log "podman build --target $TARGET -> $REF"
start=$SECONDS
"${PODMAN[@]}" build --format docker --network host --target "$TARGET" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "EXTRAS=$extras" -f deploy/Containerfile -t "$REF" -t "$NAME:$TARGET" "$CTX" >&2
log "built $REF in $((SECONDS - start)) s"
# Older builds of this target are superseded: drop their tags, so rebuilds do not fill the disk.
"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}}' | grep -x -e "$NAME:$TARGET-[0-9a-f]\{16\}" \
    | grep -v -x -F "$REF" | xargs -r "${PODMAN[@]}" rmi >/dev/null 2>&1 || true
rm -rf "$CTX"
echo "$REF"
