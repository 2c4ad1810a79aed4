#!/usr/bin/env bash
# The built-in demo, from a bare Debian 12 machine: install the stack, synthesise an archive,
# train the galleries (resflow init), map the held-out regions (resflow run) and evaluate them.
# Usage: launch/demo.sh [RANKS]   (default 2; outputs under ./demo-out)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RANKS="${1:-2}"
bash launch/install.sh
VENV="${RESFLOW_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH" H5PY_ALWAYS_USE_MPI=1 OMP_NUM_THREADS=1
MPIRUN=(mpirun -n "$RANKS" --oversubscribe)
if [[ $EUID -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
CFG=configs/demo.yaml
start=$(date +%s)
echo "== 1/4 synthetic archive (demo preset) -> demo-out/archive"
resflow synth --out demo-out/archive --preset demo --seed 0 --mixed-crs
echo "== 2/4 resflow init on $RANKS ranks (CEM, clustering, hashing, per-bucket + Mono models)"
if [[ -f demo-out/gallery/manifest.json ]]; then echo "gallery exists, kept (delete demo-out/gallery to retrain)"
else "${MPIRUN[@]}" resflow init "$CFG"; fi
echo "== 3/4 resflow run on $RANKS ranks (held-out regions -> HDF5 + GeoTIFF/COG)"
"${MPIRUN[@]}" resflow run "$CFG"
echo "== 4/4 resflow evaluate (IoU per held-out region: baselines, Mono, RESFlow, RESFlow+routing)"
"${MPIRUN[@]}" resflow evaluate "$CFG" --out demo-out/run
echo
echo "== demo summary ($(( $(date +%s) - start )) s after install)"
python - <<'PY'
import json
r = json.load(open("demo-out/run/run_report.json"))
t = r["throughput"]
print(f"scenes mapped: {sum(s['complete'] for s in r['scenes'])}/{len(r['scenes'])}, tiles: {r['tiles']}, "
      f"{r['megapixels']:.1f} Mpx = {r['area_km2']:.2f} km2 in {r['wall_s']:.1f} s on {r['ranks']} ranks "
      f"({t['mpixel_per_s']:.2f} Mpx/s, {t['km2_per_s']:.3f} km2/s)")
for s in r["scenes"]:
    print("  ", s["outputs"][0] if s["outputs"] else s["path"],
          f"({s.get('ood_tiles', 0)} tile(s) flagged out of distribution)")
k = json.load(open("demo-out/gallery/k_selection.json"))
m = json.load(open("demo-out/gallery/manifest.json"))["summary"]
print(f"buckets chosen: {k['chosen_k']} (curve: demo-out/gallery/k_selection.png), hash mAP {m['hash_map']:.3f}")
print(open("demo-out/run/evaluation.md").read())
print("How to read it: evaluation.md at the repository root (one seed here; --seeds N for spread)")
import os
if os.path.exists("demo-out/run/report.html"):
    print("HTML report: demo-out/run/report.html")
PY
