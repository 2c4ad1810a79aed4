#!/usr/bin/env bash
# Open MPI's plm_rsh_agent for the namespace "hosts" of netns-hosts.sh: called like ssh,
#   netns-agent.sh HOST COMMAND-WORDS...
# it finds the network namespace that owns address HOST and runs the command there, with that
# namespace's name as hostname (a UTS namespace of its own).
# Like ssh, it hands the command words to a shell on the "remote" side as one command line:
# Open MPI quotes the words of its orted command for exactly that shell.
set -euo pipefail

[[ $# -ge 2 ]] || { echo "usage: netns-agent.sh HOST COMMAND..." >&2; exit 255; }
HOST="$1"; shift
# Open MPI passes ssh options only when plm_rsh_args is set; skip any that come first.
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
[[ "$HOST" =~ ^[0-9.]+$ ]] || { echo "netns-agent.sh: HOST must be an IPv4 address, got '$HOST'" >&2; exit 255; }

target=""
for ns in $(ip netns list | awk '{print $1}'); do
  if ip -n "$ns" -o -4 addr show | grep -q " inet $HOST/"; then target="$ns"; break; fi
done
[[ -n "$target" ]] || { echo "netns-agent.sh: no network namespace owns $HOST" >&2; exit 255; }

# The words are joined with spaces and run by bash, exactly as sshd's login shell would run them.
exec ip netns exec "$target" unshare --uts -- \
  bash "$(dirname "${BASH_SOURCE[0]}")/netns-hosts.sh" as-host "$target" bash -c "$*"
