#!/usr/bin/env bash
# A one-machine Slurm cluster for trying the launch kit: munged + slurmctld + slurmd on this host,
# all state in one folder, nothing written to /etc.
#
# Usage: launch/testcluster/slurm-cluster.sh start|stop|status [STATE_DIR]
#   start   write STATE_DIR/slurm.conf (this node's real CPUs and memory from `slurmd -C`,
#           select/cons_tres, one partition), start munged, slurmctld and slurmd, and wait until
#           `sinfo` shows the node idle; prints the line to paste: export SLURM_CONF=...
#   stop    stop the three daemons by the pids in their pid files (and nothing else)
#   status  sinfo of the running cluster
# STATE_DIR defaults to /tmp/resflow-slurm. Needs root (slurmd starts jobs as their user) and the
# Debian 12 packages slurm-wlm + munge: `bash launch/install.sh --with-slurm`.
#
# Environment:
#   RESFLOW_SLURM_PORT   slurmctld port (default 6817; slurmd uses the next one)
#   RESFLOW_SLURM_WAIT   seconds to wait for the node to turn idle (default 60)
#
# Accounting: no slurmdbd (it needs a MySQL/MariaDB server). Finished jobs are recorded by
# jobcomp/filetxt and read with `sacct --completion` (job state and exit code, no steps).
set -euo pipefail

ACTION="${1:-}"
STATE="${2:-/tmp/resflow-slurm}"
PORT="${RESFLOW_SLURM_PORT:-6817}"
WAIT_S="${RESFLOW_SLURM_WAIT:-60}"

die() { echo "slurm-cluster.sh: $*" >&2; exit 2; }
usage() { sed -n '5,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; }

[[ -n "$ACTION" ]] || { usage; exit 2; }
[[ "$PORT" =~ ^[0-9]+$ ]] || die "RESFLOW_SLURM_PORT must be a port number, got '$PORT'"
export SLURM_CONF="$STATE/slurm.conf"

pid_of() {  # the live pid recorded in a pid file, or nothing
  local file="$1" pid
  [[ -f "$file" ]] || return 0
  pid="$(tr -dc '0-9' < "$file")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

stop_pid() {  # TERM, then KILL after 10 s, one pid
  local name="$1" pid="$2" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || { echo "stopped $name (pid $pid)"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  echo "killed $name (pid $pid)"
}

write_conf() {
  local node cpus_line
  node="$(hostname -s)"
  # slurmd -C prints this node's real layout: CPUs, sockets, cores, threads, RealMemory (MiB).
  cpus_line="$(slurmd -C | head -n 1)"
  [[ "$cpus_line" == NodeName=* ]] || die "slurmd -C did not print a node line: $cpus_line"
  mkdir -p "$STATE/ctld" "$STATE/slurmd" "$STATE/log"
  cat > "$SLURM_CONF" <<CONF
# One-machine test cluster written by launch/testcluster/slurm-cluster.sh
ClusterName=resflow-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$(( PORT + 1 ))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=5
MinJobAge=600
# The real node, as slurmd -C sees it; slurmd refuses to register with more than it has.
${cpus_line/NodeName=$node/NodeName=$node NodeAddr=127.0.0.1} State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start() {
  [[ $EUID -eq 0 ]] || die "start needs root (slurmd runs jobs as the submitting user)"
  for exe in munged slurmctld slurmd sinfo; do
    command -v "$exe" >/dev/null 2>&1 || die "$exe not found: run 'bash launch/install.sh --with-slurm'"
  done
  if [[ -n "$(pid_of "$STATE/slurmctld.pid")" ]]; then die "a cluster already runs from $STATE (stop it first)"; fi
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  write_conf
  # A private munge key and socket: this cluster trusts only itself.
  if [[ ! -s "$STATE/munge.key" ]]; then
    dd if=/dev/urandom of="$STATE/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge.key"
  fi
  munged --force --key-file="$STATE/munge.key" --socket="$STATE/munge.socket" \
         --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munged.seed"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  local node state="" i
  node="$(hostname -s)"
  for i in $(seq 1 "$(( WAIT_S * 2 ))"); do
    state="$(sinfo -h -n "$node" -o '%T' 2>/dev/null || true)"
    [[ "$state" == idle ]] && break
    sleep 0.5
  done
  if [[ "$state" != idle ]]; then
    echo "node $node is '${state:-unreachable}' after ${WAIT_S} s; last log lines:" >&2
    tail -n 5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    stop
    exit 1
  fi
  sinfo
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local name pid
  # slurmd first (it may be running job steps), munged last (the others authenticate through it).
  for name in slurmd slurmctld munged; do
    pid="$(pid_of "$STATE/$name.pid")"
    if [[ -n "$pid" ]]; then stop_pid "$name" "$pid"; fi
  done
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  -h|--help) usage ;;
  *) usage; exit 2 ;;
esac
