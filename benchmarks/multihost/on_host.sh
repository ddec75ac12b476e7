#!/usr/bin/env bash
# on_host.sh - mpiexec's "ssh" for the emulated hosts of hosts.sh (HYDRA_LAUNCHER_EXEC).
#
#   on_host.sh [-x] HOST COMMAND...
#
# Hydra's ssh launcher calls it as it would call ssh: `-x HOST "proxy" --control-port ...`.
# It runs COMMAND, as a remote shell would (one string, evaluated by sh), inside host HOST:
# HOST's network namespace, a new UTS namespace whose hostname is HOST, a new IPC namespace
# and a mount namespace with a private /dev/shm (why each: hosts.sh). With `hosts.sh up N RATE
# pin`, the host's processes are bound to its CPU. HOST must be a host of the running set
# (HPCTRAIN_MH_DIR/hosts, which `hosts.sh env` exports).
set -euo pipefail
[ "${1:-}" = -x ] && shift
host=${1:?on_host: usage: on_host.sh [-x] HOST COMMAND...}
shift
DIR=${HPCTRAIN_MH_DIR:-/run/hpctrain-multihost/${HPCTRAIN_MH_PREFIX:-hpcmh}}
if ! grep -qx -- "$host" "$DIR/hosts" 2>/dev/null; then
  echo "on_host: '$host' is not an emulated host (none in $DIR/hosts; run hosts.sh up N)" >&2
  exit 255
fi
pin=()
cpu=$(awk -v h="$host" '$1 == h {print $2}' "$DIR/cpus" 2>/dev/null || true)
[ -n "$cpu" ] && pin=(taskset -c "$cpu")
# $1 of the inner script is the host name, the rest the command's words
exec ip netns exec "$host" unshare --uts --ipc --mount --propagation private -- "${pin[@]}" \
  sh -c 'hostname "$1" && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && shift && exec sh -c "$*"' \
  on_host "$host" "$@"
