#!/usr/bin/env bash
# hosts.sh - several emulated hosts on one machine, for MPI jobs that span "nodes" without a
# cluster: Linux network namespaces joined by a bridge, links shaped with tc token buckets.
#
#   benchmarks/multihost/hosts.sh up N [RATE] [CPUS]  build hosts 1..N (tears down first)
#   benchmarks/multihost/hosts.sh rate RATE           reshape every link: 10gbit, 1gbit, ..., none
#   benchmarks/multihost/hosts.sh env [R]             print the exports that make mpiexec start
#                                                     its ranks on the hosts, R per host (default 1)
#   benchmarks/multihost/hosts.sh status              hosts, addresses, shaping; exit 1 when down
#   benchmarks/multihost/hosts.sh down                end what runs inside, delete everything by
#                                                     name; idempotent
#   benchmarks/multihost/hosts.sh check               exit 0 when hosts can be built here, else 3
#
# RATE: a tc rate (10gbit, 1gbit, 500mbit, ...) or "none" (unshaped veth); default 10gbit.
# CPUS: "pin" gives host k the single CPU (k-1) mod nproc (an emulated node of one core;
# hosts beyond nproc share), "all" (default) lets every host run on every CPU.
#
# What a host is. Host k is the network namespace PREFIX-hk with one interface, eth0
# (NET.(10+k)/24), a veth whose peer PREFIX-hkv sits on the bridge PREFIX-br (NET.1/24) in the
# root namespace; its ranks see the other hosts only through that link. A token-bucket filter
# on both ends shapes it: eth0's egress is the host's upload, PREFIX-hkv's egress its
# download, each RATE, as a full-duplex NIC (bucket: 100 us at RATE, at least 64 KiB). netem
# is not built into this kernel: no delay is added; the latency is that of veth + TCP.
#
# How MPI is started there. mpiexec (MPICH's hydra) runs in the root namespace and starts one
# proxy per host through its ssh launcher, with on_host.sh as the "ssh" (HYDRA_LAUNCHER_EXEC):
# it enters the host's network namespace, a new UTS namespace (hostname = PREFIX-hk, what
# MPI_Get_processor_name and hpctrain's node-local split see), a new IPC namespace and a new
# mount namespace with a private /dev/shm. The proxies connect back to mpiexec on the bridge
# address (HYDRA_IFACE=PREFIX-br). No ssh daemon is involved.
#
# Why the IPC namespace and the private /dev/shm. MPICH decides "same node" from hydra's
# process mapping (one proxy per host), so ranks of different hosts never share its
# shared-memory segment; but MPICH's UCX netmod looks for itself and, when only the network and
# host name differ, reaches the other hosts through SysV/CMA shared memory, bypassing the
# shaped link (11 GB/s measured under a 1 Gbit/s shaping). In its own IPC namespace a host's
# ranks reach other hosts only by tcp over eth0 (`UCX_LOG_LEVEL=info` shows "inter-node ...
# tcp/eth0"). The private /dev/shm (a tmpfs that vanishes with the host's last process)
# keeps MPI's and hpctrain's shared-memory files of one host away from the others.
#
# Environment (all optional):
#   HPCTRAIN_MH_PREFIX   name prefix of namespaces and links (default hpcmh; <= 9 characters)
#   HPCTRAIN_MH_NET      first three octets of the /24 used (default 10.213.7)
#   HPCTRAIN_MH_DIR      state directory (default /run/hpctrain-multihost/PREFIX)
#
# Needs root, iproute2 (ip, tc) and util-linux (unshare, taskset); Debian: apt-get install -y
# iproute2 util-linux. Exit status: 0 on success; 3 when namespaces cannot be made here (not
# root, tools or kernel features missing): callers such as tests skip on it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${HPCTRAIN_MH_PREFIX:-hpcmh}
NET=${HPCTRAIN_MH_NET:-10.213.7}
DIR=${HPCTRAIN_MH_DIR:-/run/hpctrain-multihost/$PREFIX}
BR=$PREFIX-br

log() { echo "hosts: $*"; }
die() { echo "hosts: ERROR: $*" >&2; exit "${2:-1}"; }
unavailable() { die "$1" 3; }

host_ns() { echo "$PREFIX-h$1"; }
host_ip() { echo "$NET.$((10 + $1))"; }
# our namespaces, in host order
our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-h[0-9]+$" | sort -V || true; }

check() {
  [ "$(id -u)" -eq 0 ] || unavailable "must run as root (network namespaces, tc)"
  local t
  for t in ip tc unshare taskset; do
    command -v "$t" >/dev/null || unavailable "$t not found (Debian: apt-get install -y iproute2 util-linux)"
  done
  [ ${#PREFIX} -le 9 ] || die "HPCTRAIN_MH_PREFIX '$PREFIX' is longer than 9 characters (interface names)"
  local probe=$PREFIX-probe
  ip netns del "$probe" 2>/dev/null || true
  ip netns add "$probe" 2>/dev/null || unavailable "cannot create a network namespace (ip netns add)"
  local ok=1 why=""
  ip link add "$PREFIX-pv" type veth peer name eth0 netns "$probe" 2>/dev/null \
    || { ok=0; why="cannot create a veth pair"; }
  if [ $ok = 1 ] && ! tc qdisc add dev "$PREFIX-pv" root tbf rate 1gbit burst 128kb latency 20ms 2>/dev/null; then
    ok=0; why="tc cannot add a token-bucket filter (sch_tbf)"
  fi
  if [ $ok = 1 ] && ! ip netns exec "$probe" unshare --uts --ipc --mount --propagation private \
      sh -c 'hostname probe && mount -t tmpfs tmpfs /dev/shm' 2>/dev/null; then
    ok=0; why="cannot enter UTS/IPC/mount namespaces with a private /dev/shm (unshare)"
  fi
  if [ $ok = 1 ] && ! ip link add "$PREFIX-pb" type bridge 2>/dev/null; then
    ok=0; why="cannot create a bridge"
  fi
  ip link del "$PREFIX-pb" 2>/dev/null || true
  ip link del "$PREFIX-pv" 2>/dev/null || true
  ip netns del "$probe" 2>/dev/null || true
  [ $ok = 1 ] || unavailable "$why"
}

# token-bucket filter on one interface (in namespace $1, "" = root); rate "none" removes it
shape_dev() {
  local ns=$1 dev=$2 rate=$3
  local tcx=(tc); [ -n "$ns" ] && tcx=(ip netns exec "$ns" tc)
  "${tcx[@]}" qdisc del dev "$dev" root 2>/dev/null || true
  [ "$rate" = none ] && return 0
  # bucket: 100 us at the rate, at least 64 KiB (one GSO super-packet of veth): a NIC sends
  # at its rate, so the bucket is kept small, or messages below it would pass at memory speed
  local bps; bps=$(rate_bps "$rate")
  local burst=$(( bps / 8 / 10000 )); [ $burst -lt 65536 ] && burst=65536
  "${tcx[@]}" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 20ms \
    || die "tc qdisc add dev $dev root tbf rate $rate failed"
}

# bits per second of a tc rate such as 10gbit, 500mbit, 1000000bit
rate_bps() {
  local r=${1,,}
  case "$r" in
    *gbit) echo $(( ${r%gbit} * 1000000000 )) ;;
    *mbit) echo $(( ${r%mbit} * 1000000 )) ;;
    *kbit) echo $(( ${r%kbit} * 1000 )) ;;
    *bit) echo $(( ${r%bit} )) ;;
    *) die "rate '$1': expected e.g. 10gbit, 1gbit, 500mbit or none" ;;
  esac
}

cmd_rate() {
  local rate=${1:?rate: give a rate (10gbit, 1gbit, ..., none)}
  [ "$rate" = none ] || rate_bps "$rate" >/dev/null
  local ns k
  [ -n "$(our_namespaces)" ] || die "no hosts (run: $0 up N)"
  for ns in $(our_namespaces); do
    k=${ns##*-h}
    shape_dev "$ns" eth0 "$rate"
    shape_dev "" "$PREFIX-h${k}v" "$rate"
  done
  echo "$rate" >"$DIR/rate"
  log "links shaped: $rate"
}

cmd_down() {
  local ns pids pid _
  for ns in $(our_namespaces); do
    # end what still runs inside (ranks of a killed job), by pid: a namespace with processes
    # in it outlives `ip netns del` and keeps its link
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && { log "ending processes in $ns: $(echo $pids)"; kill -TERM $pids 2>/dev/null || true; }
    for _ in $(seq 20); do
      [ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ] && break
      sleep 0.1
    done
    for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  # the host-side veth first: deleting it removes its peer at once (namespace deletion is lazy)
  local dev
  for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
               | grep -E "^$PREFIX-h[0-9]+v$" || true); do
    ip link del "$dev" 2>/dev/null || true
  done
  for ns in $(our_namespaces); do ip netns del "$ns" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
  rm -rf "$DIR"
  log "down (prefix $PREFIX)"
}

cmd_up() {
  local n=${1:?up: give the number of hosts} rate=${2:-10gbit} cpus=${3:-all}
  [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "up: N must be 1..64, got '$n'"
  [ "$rate" = none ] || rate_bps "$rate" >/dev/null
  case "$cpus" in all|pin) ;; *) die "up: CPUS must be 'all' or 'pin', got '$cpus'" ;; esac
  check
  cmd_down >/dev/null
  if ip -4 route show to "$NET.0/24" 2>/dev/null | grep -q . ; then
    die "$NET.0/24 is already routed here; choose another HPCTRAIN_MH_NET"
  fi
  mkdir -p "$DIR"
  ip link add "$BR" type bridge
  ip link set "$BR" up
  ip addr add "$NET.1/24" dev "$BR"
  local k ns ncpu; ncpu=$(nproc)
  : >"$DIR/hosts"; : >"$DIR/cpus"
  for k in $(seq "$n"); do
    ns=$(host_ns "$k")
    ip netns add "$ns"
    ip link add "$PREFIX-h${k}v" type veth peer name eth0 netns "$ns"
    ip link set "$PREFIX-h${k}v" master "$BR" up
    ip -n "$ns" addr add "$(host_ip "$k")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$NET.1"
    echo "$ns" >>"$DIR/hosts"
    if [ "$cpus" = pin ]; then echo "$ns $(( (k - 1) % ncpu ))" >>"$DIR/cpus"; fi
  done
  echo "$cpus" >"$DIR/cpu_mode"
  cmd_rate "$rate" >/dev/null
  log "up: $n host(s) $(paste -sd, "$DIR/hosts") on $BR ($NET.0/24), links $rate, cpus $cpus"
}

cmd_env() {
  local r=${1:-1}
  [[ $r =~ ^[0-9]+$ ]] && [ "$r" -ge 1 ] || die "env: ranks per host must be >= 1, got '$r'"
  [ -s "$DIR/hosts" ] || die "no hosts (run: $0 up N)"
  sed "s/\$/:$r/" "$DIR/hosts" >"$DIR/hostfile-$r"
  cat <<EOF
export HYDRA_LAUNCHER=ssh
export HYDRA_LAUNCHER_EXEC=$HERE/on_host.sh
export HYDRA_IFACE=$BR
export HYDRA_HOST_FILE=$DIR/hostfile-$r
export HPCTRAIN_MH_DIR=$DIR
EOF
}

cmd_status() {
  local ns k
  [ -s "$DIR/hosts" ] || { log "down (prefix $PREFIX)"; return 1; }
  log "prefix $PREFIX, bridge $BR $NET.1/24, links $(cat "$DIR/rate" 2>/dev/null || echo ?)," \
      "cpus $(cat "$DIR/cpu_mode" 2>/dev/null || echo ?)"
  for ns in $(cat "$DIR/hosts"); do
    k=${ns##*-h}
    printf 'hosts:   %s  %s  %s\n' "$ns" "$(host_ip "$k")" \
      "$(tc qdisc show dev "$PREFIX-h${k}v" 2>/dev/null | head -n1)"
  done
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  rate) shift; cmd_rate "$@" ;;
  env) shift; cmd_env "$@" ;;
  status) cmd_status ;;
  check) check; log "network namespaces, veth, bridge and tbf work here" ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
