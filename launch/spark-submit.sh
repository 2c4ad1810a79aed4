#!/usr/bin/env bash
# Run `resflow run CONFIG --engine spark` as a spark-submit driver on a Spark cluster.
#
# Usage: SPARK_MASTER=spark://host:7077 launch/spark-submit.sh CONFIG [resflow run options...]
#   (SPARK_MASTER may be any master URL spark-submit accepts: spark://, yarn, k8s://, local[N])
# The driver runs here (client mode). Executors need:
#   - the same venv (or the same container image) at the same path as here, because tasks start
#     <venv>/bin/python and import resflow_mpi from it;
#   - a shared workspace: scenes.inputs, models.gallery, output.dir and the GPU ticket folder
#     (spark.ticket_dir, default <output.dir>/tickets) must be one folder seen by every executor,
#     since the tickets decide which task may use which GPU on a node.
# Environment:
#   RESFLOW_VENV             venv made by launch/install.sh (default: <repo>/.venv)
#   SPARK_SUBMIT             spark-submit to call (default: $SPARK_HOME/bin/spark-submit, else the
#                            venv's); the client's pyspark version must match the cluster's Spark
#   SPARK_EXECUTOR_CORES, SPARK_EXECUTOR_MEMORY   per-executor resources (e.g. 8, 32g)
#   SPARK_EXECUTOR_GPUS      GPUs per executor; needs SPARK_GPU_DISCOVERY_SCRIPT (Spark ships
#                            examples/src/main/scripts/getGpusResources.sh)
#   SPARK_TASK_GPU_AMOUNT    GPU share Spark reserves per task (default 1; 0.25 lets four tasks
#                            share a GPU, to go with spark.tickets_per_device: 4)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESFLOW_VENV:-$ROOT/.venv}"

usage() { sed -n '4,5s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; }
die() { echo "spark-submit.sh: $*" >&2; exit 2; }

if [[ $# -eq 0 ]]; then usage; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
CONFIG="$1"; shift
[[ -f "$CONFIG" ]] || die "config file '$CONFIG' not found"
[[ -n "${SPARK_MASTER:-}" ]] || die "set SPARK_MASTER to the cluster's master URL (e.g. spark://host:7077)"
PYTHON="$VENV/bin/python"
[[ -x "$PYTHON" ]] || die "$PYTHON not found: run launch/install.sh (or set RESFLOW_VENV)"
if [[ -z "${SPARK_SUBMIT:-}" ]]; then
  if [[ -n "${SPARK_HOME:-}" ]]; then SPARK_SUBMIT="$SPARK_HOME/bin/spark-submit"
  else SPARK_SUBMIT="$VENV/bin/spark-submit"; fi
fi
# The venv's spark-submit finds Spark through this Python (a bare python3 has no pyspark), and
# Spark starts these Pythons for the driver and the executors' tasks.
export PYSPARK_PYTHON="$PYTHON" PYSPARK_DRIVER_PYTHON="$PYTHON"
command -v "$SPARK_SUBMIT" >/dev/null 2>&1 || die "'$SPARK_SUBMIT' not found (set SPARK_HOME or SPARK_SUBMIT)"

# spark-submit runs Python applications only from a .py file, and the package's cli.py uses
# relative imports; a three-line driver in a private temporary folder bridges the two.
DRIVER_DIR="$(mktemp -d)"
trap 'rm -rf "$DRIVER_DIR"' EXIT
printf '%s\n' 'import sys' 'from resflow_mpi.cli import main' 'sys.exit(main())' \
  > "$DRIVER_DIR/resflow_driver.py"

conf=(--conf "spark.pyspark.python=$PYTHON" --conf "spark.pyspark.driver.python=$PYTHON")
if [[ -n "${SPARK_EXECUTOR_CORES:-}" ]]; then
  conf+=(--conf "spark.executor.cores=$SPARK_EXECUTOR_CORES")
fi
if [[ -n "${SPARK_EXECUTOR_MEMORY:-}" ]]; then
  conf+=(--conf "spark.executor.memory=$SPARK_EXECUTOR_MEMORY")
fi
if [[ -n "${SPARK_EXECUTOR_GPUS:-}" ]]; then
  [[ -n "${SPARK_GPU_DISCOVERY_SCRIPT:-}" ]] || die "SPARK_EXECUTOR_GPUS needs SPARK_GPU_DISCOVERY_SCRIPT"
  conf+=(--conf "spark.executor.resource.gpu.amount=$SPARK_EXECUTOR_GPUS"
         --conf "spark.executor.resource.gpu.discoveryScript=$SPARK_GPU_DISCOVERY_SCRIPT"
         --conf "spark.task.resource.gpu.amount=${SPARK_TASK_GPU_AMOUNT:-1}")
fi

# Not exec: the EXIT trap must remove the driver folder afterwards.
"$SPARK_SUBMIT" --master "$SPARK_MASTER" --name resflow "${conf[@]}" "$DRIVER_DIR/resflow_driver.py" \
  run "$CONFIG" --engine spark --set "spark.master=$SPARK_MASTER" "$@"
