#!/usr/bin/env bash
# single_node.sh - a private one-node Slurm (munged + slurmctld + slurmd) for tests and CI.
#
#   slurm/testing/single_node.sh start     install (if needed), configure, start, wait for idle
#   slurm/testing/single_node.sh stop      stop exactly the daemons that `start` started
#   slurm/testing/single_node.sh status    exit 0 when all three daemons run and the node is up
#   slurm/testing/single_node.sh env       print `export SLURM_CONF=...` for the client commands
#
# Everything lives under one state directory (default /tmp/hpctrain-slurm): slurm.conf, the
# munge key and socket, spool, state, logs and pid files. /etc/slurm, /etc/munge and any
# system-wide Slurm or munge on the machine are left alone: our munged listens on its own
# socket (slurm.conf AuthInfo=socket=...), our daemons use their own ports, and clients find
# them through SLURM_CONF (print it with `env`). Needs root (slurmd starts jobs as root, and
# apt-get); Debian/Ubuntu packages slurmctld slurmd slurm-client munge libpmix-dev are
# installed with apt-get when missing (libpmix-dev: Debian's mpi/pmix plugin dlopen()s the
# unversioned libpmix.so that only the -dev package ships; without it `srun --mpi=pmix`,
# which Open MPI needs, fails).
#
# Environment (all optional):
#   HPCTRAIN_SLURM_DIR      state directory                     (default /tmp/hpctrain-slurm)
#   HPCTRAIN_SLURM_PORT     slurmctld port; slurmd uses PORT+1  (default 16817)
#   HPCTRAIN_SLURM_CPUS     CPUs of the node                    (default: nproc)
#   HPCTRAIN_SLURM_MEM_MB   RealMemory in MiB                   (default: 90% of MemTotal)
#   HPCTRAIN_SLURM_WAIT_S   seconds to wait for the node        (default 60)
#   HPCTRAIN_SLURM_NODES    Slurm nodes emulated on this machine (default 1): node 1 is named
#                           after the host, node i >= 2 HOST-i; each has its own slurmd (port
#                           PORT+i, spool, log and pid file named after the node) and the
#                           CPUs above, so they share the machine's cores. Heterogeneous jobs
#                           need >= 2: Slurm's backfill places each component on its own node.
#   HPCTRAIN_SLURM_NO_INSTALL=1   never call apt-get
#
# Exit status: 0 on success; non-zero with a "single_node: ERROR: ..." line on stderr.
# Exit status 3 from `start` means Slurm cannot be had here (not root, no apt-get, packages
# not installable): callers such as tests skip on it rather than fail.
set -euo pipefail

DIR=${HPCTRAIN_SLURM_DIR:-/tmp/hpctrain-slurm}
PORT=${HPCTRAIN_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
PKGS=(slurmctld slurmd slurm-client munge libpmix-dev)
NODES=${HPCTRAIN_SLURM_NODES:-1}
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "single_node: ERROR: HPCTRAIN_SLURM_NODES must be >= 1, got '$NODES'" >&2; exit 2; }

log() { echo "single_node: $*"; }
die() { echo "single_node: ERROR: $*" >&2; exit "${2:-1}"; }
unavailable() { die "$1" 3; }
# a process that has exited but is not reaped yet (zombie) counts as gone
running() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# the daemon named by pidfile $1 runs (and the pid was not reused by another program); the
# program is the file's name up to ".pid" or the first "-" (slurmd-HOST-2.pid: slurmd)
alive() {
  [ -s "$1" ] || return 1
  local pid name; pid=$(cat "$1"); name=$(basename "$1" .pid)
  running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ]
}
# the Slurm node names (node 1: the host's short name)
node_names() {
  local node i; node=$(hostname -s)
  echo "$node"
  for ((i = 2; i <= NODES; i++)); do echo "$node-$i"; done
}
# the pid file of node $1's slurmd
slurmd_pidfile() {
  if [ "$NODES" -eq 1 ]; then echo "$DIR/run/slurmd.pid"; else echo "$DIR/run/slurmd-$1.pid"; fi
}
# the slurmd port and node lines of slurm.conf (one node: one SlurmdPort for all)
node_lines() {
  local node=$1 cpus=$2 mem=$3 i=1 n
  if [ "$NODES" -eq 1 ]; then
    echo "SlurmdPort=$((PORT + 1))"
    echo "NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
    return
  fi
  for n in $(node_names); do
    echo "NodeName=${n} NodeHostname=${node} NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
    i=$((i + 1))
  done
}
dump_logs() {
  local f
  for f in "$DIR/log/slurmctld.log" "$DIR"/log/slurmd*.log "$DIR/log/munged.log"; do
    [ -r "$f" ] && { echo "----- tail $f" >&2; tail -n 20 "$f" >&2; }
  done
  return 0
}

install_packages() {
  local need=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  [ "${HPCTRAIN_SLURM_NO_INSTALL:-0}" = 1 ] && unavailable "missing packages ${need[*]} (HPCTRAIN_SLURM_NO_INSTALL=1)"
  command -v apt-get >/dev/null || unavailable "missing packages ${need[*]} and no apt-get to install them"
  log "installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$DIR"
  # Package scripts may try to start the daemons through init; harmless, we start our own.
  if ! apt-get install -y --no-install-recommends "${need[@]}" >"$DIR/apt.log" 2>&1; then
    apt-get update >>"$DIR/apt.log" 2>&1 || unavailable "apt-get update failed (see $DIR/apt.log)"
    apt-get install -y --no-install-recommends "${need[@]}" >>"$DIR/apt.log" 2>&1 \
      || unavailable "apt-get install ${need[*]} failed (see $DIR/apt.log)"
  fi
}

write_conf() {
  local node=$1 cpus=$2 mem=$3 first_job_id=$4 sfx=""
  if [ "$NODES" -gt 1 ]; then sfx="-%n"; fi
  cat <<EOF
# one-node Slurm written by slurm/testing/single_node.sh; rewritten on every start
ClusterName=hpctrain-test
# Job ids start at a random number per state directory: MPICH names its shared-memory segment
# after the PMI job id (job.step), and a segment left in /dev/shm by a killed job of an earlier
# test Slurm (whose ids also started at 1) would otherwise be attached by a new job 1.
FirstJobId=${first_job_id}
SlurmctldHost=${node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged; cred_expire also sets how long a requeued job waits before it may start again
AuthInfo=socket=${DIR}/munge/munge.socket,cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# scan pending jobs every second: a requeued job becomes eligible after cred_expire and would
# otherwise wait for the next periodic pass (30-60 s)
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
MailProg=/bin/true
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd${sfx}.pid
SlurmdSpoolDir=${DIR}/spool/slurmd${sfx}
StateSaveLocation=${DIR}/spool/slurmctld
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd${sfx}.log
SlurmctldPort=${PORT}
$(node_lines "$node" "$cpus" "$mem")
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local m=$DIR/munge
  mkdir -p "$m"; chmod 0700 "$m"
  if [ ! -s "$m/munge.key" ]; then
    dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$m/munge.key"
  fi
  if alive "$m/munged.pid"; then
    log "munged already running (pid $(cat "$m/munged.pid"))"
  else
    rm -f "$m/munged.pid" "$m/munge.socket"
    /usr/sbin/munged --force --socket="$m/munge.socket" --key-file="$m/munge.key" \
      --pid-file="$m/munged.pid" --seed-file="$m/munged.seed" --log-file="$DIR/log/munged.log" \
      || { dump_logs; die "munged failed to start"; }
    log "started munged (pid $(cat "$m/munged.pid"))"
  fi
  local _
  for _ in $(seq 50); do munge -S "$m/munge.socket" -n 2>/dev/null | unmunge -S "$m/munge.socket" >/dev/null 2>&1 && return 0; sleep 0.1; done
  dump_logs; die "munge round-trip through $m/munge.socket failed"
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || unavailable "must run as root (slurmd starts jobs as any user; apt-get)"
  local node cpus mem wait_s state _
  node=$(hostname -s)
  getent hosts "$node" >/dev/null || unavailable "host name '$node' does not resolve (add it to /etc/hosts)"
  cpus=${HPCTRAIN_SLURM_CPUS:-$(nproc)}
  # Floored to 512 MiB: stable across runs and below what slurmd detects (more would drain it).
  mem=${HPCTRAIN_SLURM_MEM_MB:-$(awk '/MemTotal/{print int($2/1024*0.9/512)*512}' /proc/meminfo)}
  wait_s=${HPCTRAIN_SLURM_WAIT_S:-60}
  install_packages
  local b
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged; do [ -x "$b" ] || unavailable "$b missing"; done
  command -v sbatch >/dev/null || unavailable "sbatch not on PATH"

  mkdir -p "$DIR"/{run,log,spool/slurmctld}
  local n
  if [ "$NODES" -eq 1 ]; then mkdir -p "$DIR/spool/slurmd"
  else for n in $(node_names); do mkdir -p "$DIR/spool/slurmd-$n"; done; fi
  chmod 0755 "$DIR"
  start_munge

  [ -s "$DIR/first_job_id" ] || echo $(( (RANDOM * 32768 + RANDOM) % 60000000 + 1000 )) >"$DIR/first_job_id"
  local new; new=$(write_conf "$node" "$cpus" "$mem" "$(cat "$DIR/first_job_id")")
  if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new" ]; then
    local pf
    for pf in "$DIR"/run/slurmd*.pid "$DIR/run/slurmctld.pid"; do
      if alive "$pf"; then log "configuration changed: stopping pid $(cat "$pf")"; stop_pidfile "$pf"; fi
    done
    printf '%s\n' "$new" >"$CONF"
    log "wrote $CONF (node(s) $(node_names | paste -sd,), $cpus CPUs each, $mem MiB, port $PORT)"
  fi
  export SLURM_CONF=$CONF

  if alive "$DIR/run/slurmctld.pid"; then log "slurmctld already running (pid $(cat "$DIR/run/slurmctld.pid"))"
  else
    /usr/sbin/slurmctld -f "$CONF" || { dump_logs; die "slurmctld failed to start"; }
    for _ in $(seq 50); do alive "$DIR/run/slurmctld.pid" && break; sleep 0.1; done
    log "started slurmctld (pid $(cat "$DIR/run/slurmctld.pid" 2>/dev/null || echo '?'))"
  fi
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  scontrol ping 2>/dev/null | grep -q UP || { dump_logs; die "slurmctld does not answer 'scontrol ping'"; }
  local pf args
  for n in $(node_names); do
    pf=$(slurmd_pidfile "$n")
    args=(-f "$CONF")
    if [ "$NODES" -gt 1 ]; then args+=(-N "$n"); fi
    if alive "$pf"; then log "slurmd of $n already running (pid $(cat "$pf"))"
    else
      /usr/sbin/slurmd "${args[@]}" || { dump_logs; die "slurmd of $n failed to start"; }
      for _ in $(seq 50); do alive "$pf" && break; sleep 0.1; done
      log "started slurmd of $n (pid $(cat "$pf" 2>/dev/null || echo '?'))"
    fi
  done

  for n in $(node_names); do
    state=""
    for _ in $(seq $((wait_s * 5))); do
      state=$(sinfo -h -n "$n" -o %T 2>/dev/null | head -n1 || true)
      case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*) scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;;
      esac
      sleep 0.2
    done
    case "$state" in
      idle|mixed|allocated|completing) ;;
      *) dump_logs; die "node $n not ready after ${wait_s}s (state '$state')" ;;
    esac
  done
  log "OK: node(s) $(node_names | paste -sd,) $state; export SLURM_CONF=$CONF"
}

stop_pidfile() {
  local pf=$1 pid _
  alive "$pf" || return 0
  pid=$(cat "$pf")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do running "$pid" || return 0; sleep 0.05; done
  log "pid $pid alive after 10 s, sending KILL"; kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 20); do running "$pid" || return 0; sleep 0.05; done
  return 1
}

cmd_stop() {
  local rc=0 pf
  if alive "$DIR/run/slurmctld.pid"; then
    # Jobs of this cluster first, so no rank outlives its slurmd.
    SLURM_CONF=$CONF scancel --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  for pf in "$DIR"/run/slurmd*.pid "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if alive "$pf"; then
      log "stopping pid $(cat "$pf") ($(basename "$pf" .pid))"
      stop_pidfile "$pf" || { log "ERROR: could not stop pid $(cat "$pf")"; rc=1; }
    fi
  done
  return $rc
}

cmd_status() {
  local pf
  for pf in "$DIR/munge/munged.pid" "$DIR/run/slurmctld.pid" $(for n in $(node_names); do slurmd_pidfile "$n"; done); do
    alive "$pf" || { echo "not running: $pf"; return 1; }
  done
  SLURM_CONF=$CONF sinfo -h -o '%P %T %C' || return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
