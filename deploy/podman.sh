#!/usr/bin/env bash
# podman as this project runs it (deploy/image.sh, tests/test_container.py): runc as the runtime when it
# is installed, and, on a root sandbox without systemd where no CONTAINERS_CONF is set, a containers.conf
# with `default_ulimits = []` and `cgroup_manager = "cgroupfs"` (shared/ENVIRONMENT.md: podman's default
# crun cannot set rlimits or use hybrid cgroups there; runc can). Elsewhere it is plain podman.
#
#   deploy/podman.sh run --rm --network host localhost/coe:gateway --help
set -euo pipefail
command -v podman >/dev/null || { echo "podman not found: apt-get install -y podman runc" >&2; exit 127; }
if [[ -z "${CONTAINERS_CONF:-}" && "$(id -u)" == "0" && ! -d /run/systemd/system ]]; then
    conf="${COE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coe-image}/containers.conf"
    if [[ ! -f "$conf" ]]; then
        mkdir -p "$(dirname "$conf")"
        printf '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\n' >"$conf"
    fi
    export CONTAINERS_CONF="$conf"
fi
if command -v runc >/dev/null; then
    exec podman --runtime runc "$@"
fi
exec podman "$@"
