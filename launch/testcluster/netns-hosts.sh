#!/usr/bin/env bash
# Two "hosts" on one machine: two network namespaces joined by a veth pair, each with its own
# address on a link of its own and its own hostname (UTS namespace). The file system is shared,
# as on a cluster with a parallel file system. Open MPI reaches the second host through
# launch/testcluster/netns-agent.sh (plm_rsh_agent: `ip netns exec` in place of ssh).
#
# Usage: launch/testcluster/netns-hosts.sh start|stop|run [CMD...]
#   start       create the namespaces <P>1 and <P>2, the veth pair <P>v1 <-> <P>v2 with
#               <NET>.1/24 and <NET>.2/24, and print the Open MPI hostfile lines
#   stop        delete both namespaces (the veth pair goes with them)
#   run CMD...  run CMD as host 1: inside namespace <P>1 with hostname <P>1 (start mpirun here)
# Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2 + util-linux (ip, unshare).
#
# Environment:
#   RESFLOW_NETNS_PREFIX   namespace name prefix P (default rfhost)
#   RESFLOW_NETNS_NET      first three octets NET of the link's /24 (default 10.77.0)
#
# A 2 x 2 rank run of resflow over the veth link (mpirun's TCP traffic kept on it):
#   launch/testcluster/netns-hosts.sh start
#   launch/testcluster/netns-hosts.sh run mpirun -n 4 --host 10.77.0.1:2,10.77.0.2:2 \
#       --mca plm_rsh_agent "$PWD/launch/testcluster/netns-agent.sh" \
#       --mca btl self,vader,tcp --mca btl_tcp_if_include 10.77.0.0/24 \
#       --mca oob_tcp_if_include 10.77.0.0/24 -x PATH -x H5PY_ALWAYS_USE_MPI \
#       resflow run cfg.yaml
#   launch/testcluster/netns-hosts.sh stop
set -euo pipefail

PREFIX="${RESFLOW_NETNS_PREFIX:-rfhost}"
NET="${RESFLOW_NETNS_NET:-10.77.0}"
NS1="${PREFIX}1" NS2="${PREFIX}2"

die() { echo "netns-hosts.sh: $*" >&2; exit 2; }
usage() { sed -n '7,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; }

[[ "$PREFIX" =~ ^[a-z][a-z0-9]{0,8}$ ]] || die "RESFLOW_NETNS_PREFIX must be 1-9 lower-case letters/digits, got '$PREFIX'"
[[ "$NET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "RESFLOW_NETNS_NET must look like 10.77.0, got '$NET'"

exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

start() {
  [[ $EUID -eq 0 ]] || die "start needs root (network namespaces)"
  command -v ip >/dev/null 2>&1 || die "ip not found: apt-get install iproute2"
  command -v unshare >/dev/null 2>&1 || die "unshare not found: apt-get install util-linux"
  if exists "$NS1" || exists "$NS2"; then die "namespace $NS1 or $NS2 exists already (stop first)"; fi
  ip netns add "$NS1"
  ip netns add "$NS2"
  ip link add "${PREFIX}v1" netns "$NS1" type veth peer name "${PREFIX}v2" netns "$NS2"
  ip -n "$NS1" addr add "$NET.1/24" dev "${PREFIX}v1"
  ip -n "$NS2" addr add "$NET.2/24" dev "${PREFIX}v2"
  local ns
  for ns in "$NS1" "$NS2"; do
    ip -n "$ns" link set lo up
  done
  ip -n "$NS1" link set "${PREFIX}v1" up
  ip -n "$NS2" link set "${PREFIX}v2" up
  echo "$NET.1 slots=2   # $NS1 (${PREFIX}v1)"
  echo "$NET.2 slots=2   # $NS2 (${PREFIX}v2)"
}

stop() {
  local ns
  for ns in "$NS2" "$NS1"; do
    if exists "$ns"; then ip netns del "$ns" && echo "deleted namespace $ns"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  run)
    shift
    [[ $# -ge 1 ]] || die "run needs a command"
    exists "$NS1" || die "namespace $NS1 does not exist (run start first)"
    # A UTS namespace of its own gives host 1 its own hostname; the command runs as given.
    exec ip netns exec "$NS1" unshare --uts -- bash "${BASH_SOURCE[0]}" as-host "$NS1" "$@" ;;
  as-host)
    # (inside the namespaces) set the hostname, then become the command
    [[ $# -ge 3 ]] || die "as-host needs a name and a command"
    hostname "$2"
    shift 2
    exec "$@" ;;
  -h|--help) usage ;;
  *) usage; exit 2 ;;
esac
