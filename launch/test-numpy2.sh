#!/usr/bin/env bash
# Run tests on numpy 2 (not part of the default CI run): a venv without Debian's Python packages,
# numpy 2.x, the pip h5py wheel (serial HDF5: the mask store's serialized path), mpi4py 4.1.2 on
# Debian's Open MPI, torch, and GDAL's Python bindings built against Debian's libgdal (STACK.md
# route B; no gdal-wheel exists for Python 3.11). About 3-4 minutes the first time, then seconds.
#
# Usage: launch/test-numpy2.sh [pytest args...]   (default: tests/unit -m "not integration")
#   RESFLOW_NP2_VENV  the venv (default ./.venv-np2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${RESFLOW_NP2_VENV:-$ROOT/.venv-np2}"
PIP_PACKAGES=("numpy>=2,<3" "h5py>=3.10" mpi4py==4.1.2 torch==2.13.0 scikit-learn==1.9.1
              "pyyaml>=6" "matplotlib>=3.7,<3.11" "pytest>=8" "pytest-timeout>=2.3" "psutil>=5.9"
              hypothesis==6.170.27 setuptools wheel)
STAMP="$VENV/.resflow-numpy2-stamp"
log() { echo "[test-numpy2] $*" >&2; }
sudo_if_needed() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

need_apt=()
for p in libgdal-dev openmpi-bin libopenmpi-dev python3-venv python3-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [[ ${#need_apt[@]} -gt 0 ]]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_if_needed apt-get update -qq
  sudo_if_needed apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
stamp_text="pip:${PIP_PACKAGES[*]} gdal:$(gdal-config --version)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$stamp_text" ]]; then
  [[ -x "$VENV/bin/python" ]] || /usr/bin/python3 -m venv "$VENV"
  log "pip install ${PIP_PACKAGES[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  log "GDAL $(gdal-config --version) bindings against Debian's libgdal (numpy 2, gdal_array)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    --no-cache-dir "GDAL==$(gdal-config --version)" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    --no-deps -e "$ROOT"
  echo "$stamp_text" > "$STAMP"
fi
"$VENV/bin/python" - <<'PY'
import h5py, mpi4py, numpy, torch
from osgeo import gdal, gdal_array  # noqa: F401
assert int(numpy.__version__.split(".")[0]) >= 2, f"numpy {numpy.__version__} is not 2.x"
print(f"[test-numpy2] numpy {numpy.__version__}, torch {torch.__version__}, GDAL {gdal.__version__}, "
      f"h5py {h5py.__version__} (parallel HDF5: {h5py.get_config().mpi}), mpi4py {mpi4py.__version__}")
PY
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS=1
if [[ $EUID -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
if [[ $# -eq 0 ]]; then set -- tests/unit -m "not integration"; fi
exec "$VENV/bin/python" -m pytest "$@"
