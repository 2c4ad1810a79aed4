#!/usr/bin/env bash
# Install resflow-mpi's whole stack on Debian 12 (bookworm) and put it in ./.venv.
#
# Route: Debian's compiled, mutually consistent stack (Open MPI, mpi4py, h5py on parallel HDF5,
# GDAL bindings) + a venv made with --system-site-packages that adds the rest from PyPI
# (torch CPU wheel, scikit-learn, pyspark, ...). numpy stays at Debian's 1.24 because Debian's
# h5py and gdal_array are compiled against numpy 1.x; a pip constraints file referenced from the
# venv's own pip.conf makes any later numpy 2 request fail loudly instead of breaking the stack.
#
# Idempotent: a stamp file records what was installed; a second run only checks and exits.
# Usage: launch/install.sh [--with-chromium] [--with-slurm]   (RESFLOW_VENV overrides the venv)
#   --with-chromium  Chromium, for the report screenshots
#   --with-slurm     Slurm 22.05 (slurmctld, slurmd, client commands) and munge from Debian, for the
#                    one-machine test cluster (launch/testcluster/, tests/cluster/); on a machine
#                    with systemd the packages enable their own services, which stay idle without
#                    /etc/slurm/slurm.conf; the test cluster runs its own daemons from a state folder
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESFLOW_VENV:-$ROOT/.venv}"
WITH_CHROMIUM=0
WITH_SLURM=0
for arg in "$@"; do
  case "$arg" in
    --with-chromium) WITH_CHROMIUM=1 ;;
    --with-slurm) WITH_SLURM=1 ;;
    *) echo "install.sh: unknown option '$arg' (valid: --with-chromium, --with-slurm)" >&2; exit 2 ;;
  esac
done

APT_PACKAGES=(openmpi-bin libopenmpi-dev python3-mpi4py python3-h5py-mpi python3-gdal gdal-bin
              python3-venv python3-dev)
# Keep versions here in one place; STAMP changes whenever this list changes.
PIP_PACKAGES=(torch==2.13.0 scikit-learn==1.9.1 "pyyaml>=6" pyspark==4.3.0 "matplotlib>=3.7,<3.11"
              "pytest>=8" "pytest-timeout>=2.3" "psutil>=5.9" hypothesis==6.170.27 pystac==1.15.2
              shapely==2.1.2)  # shapely 2.1 wheels run on numpy >= 1.21 (Debian's 1.24 here)
CONSTRAINTS=("numpy==1.24.2" "scipy==1.15.3")
STAMP_TEXT="apt:${APT_PACKAGES[*]} java pip:${PIP_PACKAGES[*]} constraints:${CONSTRAINTS[*]} pkg:editable"
STAMP="$VENV/.resflow-install-stamp"

log() { echo "[install] $*" >&2; }

sudo_if_needed() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
if [[ $WITH_CHROMIUM == 1 ]] && ! command -v chromium >/dev/null 2>&1; then need_apt+=(chromium); fi
if [[ $WITH_SLURM == 1 ]]; then
  # iproute2 and util-linux give the two-host test (ip netns, unshare); usually present already.
  for p in slurm-wlm munge iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
  done
fi
if [[ ${#need_apt[@]} -gt 0 ]]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_if_needed apt-get update -qq
  sudo_if_needed apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$VENV/bin/resflow" ]]; then
  log "stack already installed in $VENV"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV (Debian python3, --system-site-packages)"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
printf '%s\n' "${CONSTRAINTS[@]}" > "$VENV/constraints.txt"
# The venv's own pip.conf: later 'pip install' in this venv keeps numpy at Debian's ABI.
cat > "$VENV/pip.conf" <<CONF
[global]
constraint = $VENV/constraints.txt
CONF
export PIP_CONSTRAINT="$VENV/constraints.txt"
log "pip install ${PIP_PACKAGES[*]}"
# (the filter drops pip's notes about local wheel folders that have no index pages)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e "$ROOT"

# Fail now, not in the middle of a run, if the stack is not the real one.
H5PY_ALWAYS_USE_MPI=1 "$VENV/bin/python" - <<'PY'
import h5py, mpi4py, numpy, shapely, torch, sklearn, yaml
from osgeo import gdal, gdal_array  # noqa: F401
assert h5py.get_config().mpi, "h5py is not built with parallel HDF5"
print(f"[install] ok: numpy {numpy.__version__}, torch {torch.__version__}, h5py {h5py.__version__} "
      f"(HDF5 {h5py.version.hdf5_version}, mpi=True), mpi4py {mpi4py.__version__}, GDAL {gdal.__version__}")
PY
echo "$STAMP_TEXT" > "$STAMP"
