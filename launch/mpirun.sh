#!/usr/bin/env bash
# Run `resflow run CONFIG` on N MPI ranks with Open MPI's mpirun, using the project's venv.
#
# Usage: launch/mpirun.sh [-n RANKS] [--bind-to none|core] [--hostfile FILE] [--dry-run] CONFIG
#                         [resflow run options...]
#   -n RANKS         ranks to start (default: the cores this shell may use)
#   --bind-to none   ranks float over the node's cores; resflow gives each rank cores/ranks torch
#                    threads (default)
#   --bind-to core   one core per rank (use RANKS = cores); each rank then runs one torch thread
#   --hostfile FILE  Open MPI hostfile for several nodes (the venv must exist at the same path there)
#   --dry-run        print the mpirun command and exit
# Everything after CONFIG goes to `resflow run` unchanged (--restart, --set section.key=value, ...).
#
# Environment:
#   RESFLOW_VENV            venv made by launch/install.sh (default: <repo>/.venv)
#   MPIRUN                  the mpirun to call (default: mpirun on PATH)
#   HDF5_USE_FILE_LOCKING   set FALSE when output.dir is on NFS or Lustre mounted without file
#                           locking (HDF5 then fails with "unable to lock file"); forwarded to ranks
#   OMP_NUM_THREADS         threads of OpenMP/BLAS code in each rank (default: cores / ranks)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESFLOW_VENV:-$ROOT/.venv}"
MPIRUN="${MPIRUN:-mpirun}"

usage() {
  sed -n '4,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}
die() { echo "mpirun.sh: $*" >&2; exit 2; }

if [[ $# -eq 0 ]]; then usage; exit 2; fi

CORES="$(nproc)"   # honours CPU affinity and cgroup limits, unlike /proc/cpuinfo
RANKS="$CORES"
BIND="none"
HOSTFILE=""
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|-np|--ranks) [[ $# -ge 2 ]] || die "$1 needs a number"; RANKS="$2"; shift 2 ;;
    --bind-to) [[ $# -ge 2 ]] || die "--bind-to needs none or core"; BIND="$2"; shift 2 ;;
    --hostfile) [[ $# -ge 2 ]] || die "--hostfile needs a file"; HOSTFILE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (launcher options come before CONFIG; see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "missing CONFIG (see --help)"
CONFIG="$1"; shift

[[ "$RANKS" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive whole number, got '$RANKS'"
[[ "$BIND" == none || "$BIND" == core ]] || die "--bind-to must be none or core, got '$BIND'"
[[ -f "$CONFIG" ]] || die "config file '$CONFIG' not found"
[[ -z "$HOSTFILE" || -f "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' not found"
RESFLOW="$VENV/bin/resflow"
[[ -x "$RESFLOW" ]] || die "$RESFLOW not found: run launch/install.sh (or set RESFLOW_VENV)"
command -v "$MPIRUN" >/dev/null 2>&1 || die "'$MPIRUN' not found: install Open MPI (launch/install.sh)"

args=(-n "$RANKS")
if [[ -n "$HOSTFILE" ]]; then args+=(--hostfile "$HOSTFILE"); fi
# Core counts of this node say nothing about a hostfile's nodes; there the hostfile's slots rule.
if [[ -z "$HOSTFILE" && "$RANKS" -gt "$CORES" ]]; then
  args+=(--oversubscribe)
  if [[ "$BIND" == core ]]; then
    echo "mpirun.sh: $RANKS ranks > $CORES cores: binding to cores is impossible, using --bind-to none" >&2
    BIND=none
  fi
fi
args+=(--bind-to "$BIND")

if [[ $EUID -eq 0 ]]; then
  # Containers and CI run as root; Open MPI refuses that unless both variables are set.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Debian's h5py chooses its parallel build only when told to; the writers need mpio.
export H5PY_ALWAYS_USE_MPI=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))}"
# Local ranks inherit mpirun's environment anyway; -x carries it to ranks on other nodes.
forward=(H5PY_ALWAYS_USE_MPI OMP_NUM_THREADS HDF5_USE_FILE_LOCKING RESFLOW_GDAL_CACHE_MB)
for var in "${forward[@]}"; do
  if [[ -n "${!var+set}" ]]; then args+=(-x "$var"); fi
done

cmd=("$MPIRUN" "${args[@]}" "$RESFLOW" run "$CONFIG" "$@")
if [[ $DRY_RUN -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
