#!/usr/bin/env bash
# Install the stack (idempotent) and run the whole test suite (unit, MPI, integration, Spark).
# Usage: launch/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/install.sh
VENV="${RESFLOW_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH" H5PY_ALWAYS_USE_MPI=1 OMP_NUM_THREADS=1
if [[ $EUID -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
exec "$VENV/bin/python" -m pytest "$@"
