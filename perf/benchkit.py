"""Shared plumbing of the perf/ studies: workloads, the cached gallery, engine runs, JSON and plots.

Every study is a script run as ``python perf/<study>.py``; this module sits beside them, so they
import it by its bare name. It never imports torch, GDAL or MPI at module level: the studies' driver
processes stay light and start ranks with ``mpirun`` themselves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PERF_DIR = REPO / "perf"
RESULTS_DIR = PERF_DIR / "results"
# Workloads and the trained benchmark gallery are kept here between studies (tests point it elsewhere).
CACHE_DIR = Path(os.environ.get("RESFLOW_PERF_CACHE", RESULTS_DIR / "cache")).resolve()
VENV_BIN = Path(sys.executable).parent
PYTHON = sys.executable

# Open MPI refuses root without these; one thread per rank unless a study says otherwise.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "H5PY_ALWAYS_USE_MPI": "1",
           "PYTHONWARNINGS": "ignore"}

# Small training settings for the one benchmark gallery: speed does not depend on model quality,
# and these still give masks good enough for the IoU check of paper_scale.py.
BENCH_TRAINING = {"tile_px": 128, "tiles_per_scene": 24, "cem_epochs": 8, "hash_epochs": 30,
                  "seg_epochs": 6, "k_min": 2, "k_max": 6, "batch_size": 16}
BENCH_PIXEL_M = 0.5
BENCH_EPSG = 32637


class BenchError(RuntimeError):
    """A benchmark step failed (command output attached)."""


def resflow_exe() -> str:
    """The ``resflow`` console script of this interpreter's environment."""
    exe = VENV_BIN / "resflow"
    if exe.exists():
        return str(exe)
    found = shutil.which("resflow")
    if not found:
        raise BenchError("resflow command not found: install the project (launch/install.sh)")
    return found


def bench_env(threads: int = 1) -> dict[str, str]:
    """Environment for child processes: MPI as root, ``threads`` BLAS/OpenMP threads, venv on PATH."""
    env = dict(os.environ)
    env.update(MPI_ENV)
    # RESFLOW_BENCH_TREE: run another checkout of the project (before/after studies).
    tree = os.environ.get("RESFLOW_BENCH_TREE") or str(REPO)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "PYTHONPATH": os.pathsep.join(p for p in (tree, env.get("PYTHONPATH", "")) if p)})
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def mpirun(ranks: int) -> list[str]:
    """The launcher prefix for ``ranks`` processes on this node.

    Ranks float over the cores (``--bind-to none``, as launch/mpirun.sh does by default) unless
    RESFLOW_PERF_BIND=core: on a shared machine a pinned rank cannot escape a busy core."""
    launcher = shutil.which("mpirun") or "mpirun"
    bind = os.environ.get("RESFLOW_PERF_BIND", "none")
    return [launcher, "-n", str(ranks), "--oversubscribe", "--bind-to", bind]


def run_command(cmd: Sequence[str], env: Optional[dict[str, str]] = None, timeout_s: float = 3600,
                cwd: Optional[Path] = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command; return it and its wall seconds; BenchError with the output tail on failure."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), env=env or bench_env(), capture_output=True, text=True,
                              timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)}: did not finish within {timeout_s:.0f} s") from None
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-25:])
        raise BenchError(f"{' '.join(cmd)} failed with exit status {proc.returncode}:\n{tail}")
    return proc, wall_s


def shell_line(cmd: Sequence[str]) -> str:
    """A command as one line a reader can paste (paths shortened to the repository)."""
    import shlex
    text = " ".join(shlex.quote(str(c)) for c in cmd)
    return text.replace(str(REPO) + "/", "").replace(str(VENV_BIN) + "/", "")


def this_command() -> str:
    """How the running study was invoked."""
    return shell_line(["python", *sys.argv])


# -- machine ----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, memory, OS, library versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    os_name = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    info: dict[str, Any] = {"host": socket.gethostname(), "cpu": cpu, "arch": platform.machine(),
                            "cores": os.cpu_count(), "memory_gb": mem_gb, "os": os_name,
                            "kernel": platform.release(), "python": platform.python_version(),
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                            # Other work on the machine skews timings: keep the load beside them.
                            "load_average_1_5_15min": list(os.getloadavg())}
    try:
        import torch
        info["torch"] = torch.__version__
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        info["torch"] = None
    return info


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Hold the cache's lock: concurrent studies (a Slurm array) must not write the same scene or
    train the same gallery at once; the second waits and then reuses the first one's files."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- workloads ----------------------------------------------------------------------------------
@dataclass
class Workload:
    """A set of single-CRS synthetic scenes and its size (what a study maps)."""

    name: str
    archive: Path
    scenes: list[str]
    width_px: int
    height_px: int
    bands: int = 3
    bytes_per_sample: int = 1
    pixel_m: float = BENCH_PIXEL_M

    @property
    def megapixels(self) -> float:
        return len(self.scenes) * self.width_px * self.height_px / 1e6

    @property
    def gigabytes(self) -> float:
        """Raw image bytes (all bands) in GB (1e9 bytes)."""
        return self.megapixels * 1e6 * self.bands * self.bytes_per_sample / 1e9

    @property
    def area_km2(self) -> float:
        return self.megapixels * 1e6 * self.pixel_m ** 2 / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "archive": str(self.archive), "n_scenes": len(self.scenes),
                "scene_px": [self.width_px, self.height_px], "bands": self.bands,
                "megapixels": self.megapixels, "gigabytes": self.gigabytes,
                "area_km2": self.area_km2}


def make_workload(n_scenes: int, size_px: int, height_px: Optional[int] = None, seed: int = 0,
                  collar: bool = False, root: Optional[Path] = None) -> Workload:
    """``n_scenes`` scenes of ``size_px`` (x ``height_px``) in one CRS, regimes taken in turn so
    tiles land in several buckets; cached under perf/results/cache/workloads (kept when valid)."""
    with cache_lock():
        return _make_workload(n_scenes, size_px, height_px or size_px, seed, collar, root)


def _make_workload(n_scenes: int, size_px: int, height_px: int, seed: int, collar: bool,
                   root: Optional[Path]) -> Workload:
    from resflow_mpi.synth import REGIME_ORDER, REGIMES, SceneSpec, scene_is_complete, \
        scene_paths, write_scene
    name = f"w{n_scenes}x{size_px}x{height_px}-s{seed}" + ("-collar" if collar else "")
    out = (root or CACHE_DIR / "workloads") / name
    entries, scenes = [], []
    for i in range(n_scenes):
        regime = REGIMES[REGIME_ORDER[i % len(REGIME_ORDER)]]
        spec = SceneSpec(name=f"bench-{i:03d}-{regime.name}", width=size_px, height=height_px,
                         regime=regime.name, region="benchmark", split="test",
                         seed=seed * 1009 + i + 1, epsg=BENCH_EPSG,
                         origin_xy=(400000.0 + i * size_px * BENCH_PIXEL_M, 1000000.0),
                         pixel_m=BENCH_PIXEL_M, nodata_collar=collar and i % 2 == 0)
        image, mask = scene_paths(spec, out)
        if not scene_is_complete(spec, out):
            image, mask = write_scene(spec, out)
        scenes.append(str(image))
        entries.append({"name": spec.name, "image": image.name, "mask": mask.name,
                        "regime": spec.regime, "region": spec.region, "split": spec.split,
                        "width": spec.width, "height": spec.height, "dtype": spec.dtype,
                        "bands": spec.bands, "epsg": spec.epsg})
    archive = out / "archive.json"
    text = json.dumps(entries, indent=1) + "\n"
    if not archive.is_file() or archive.read_text() != text:
        archive.write_text(text)
    return Workload(name, archive, scenes, size_px, height_px)


# -- gallery ------------------------------------------------------------------------------------
def gallery_manifest(gallery: Path) -> dict[str, Any]:
    """The gallery's manifest.json (BenchError when there is none)."""
    m = Path(gallery) / "manifest.json"
    if not m.is_file():
        raise BenchError(f"{gallery}: not a model gallery (no manifest.json); pass --gallery with a "
                         "gallery written by `resflow init`, or leave it out to train the cached one")
    return json.loads(m.read_text())


def ensure_gallery(gallery: Optional[str | Path] = None, log: bool = True) -> Path:
    """The given gallery, or the cached benchmark gallery (trained once on the demo archive)."""
    if gallery:
        gallery_manifest(Path(gallery))
        return Path(gallery).resolve()
    with cache_lock():
        return _train_gallery(CACHE_DIR / "gallery", log)


def _train_gallery(cached: Path, log: bool) -> Path:
    if (cached / "manifest.json").is_file():
        return cached
    from resflow_mpi.synth import synth_archive
    if log:
        print(f"[bench] training the benchmark gallery once into {cached} (about 3 minutes on 2 "
              "cores)", file=sys.stderr, flush=True)
    archive = synth_archive(CACHE_DIR / "demo-archive", preset="demo", seed=0)
    cfg = {"scenes": {"inputs": [str(archive)], "split": "train"},
           "tiling": {"tile_px": 256, "halo_px": 16},
           "models": {"gallery": str(cached), "arch": "unet", "preset": "tiny", "hash_bits": 32},
           "inference": {"batch_size": 8, "threads_per_rank": 1},
           "output": {"dir": str(CACHE_DIR / "init-out"), "quicklooks": False},
           "training": dict(BENCH_TRAINING)}
    path = CACHE_DIR / "init.yaml"
    write_yaml(path, cfg)
    run_command([*mpirun(2), resflow_exe(), "init", str(path)], timeout_s=3600)
    return cached


# -- configs and runs ---------------------------------------------------------------------------
def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write a mapping as YAML (creating the folder)."""
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_config(path: Path, inputs: Sequence[str], gallery: Path, out_dir: Path, tile_px: int = 256,
               halo_px: int = 16, batch_size: int = 8, threads_per_rank: int = 1,
               device: str = "cpu", **sections: dict[str, Any]) -> Path:
    """A run config for a benchmark: the gallery's architecture, mask GeoTIFF only (no COG, no
    bucket map, no quicklooks: they measure GDAL, not the pipeline)."""
    m = gallery_manifest(gallery)
    cfg: dict[str, Any] = {
        "scenes": {"inputs": [str(p) for p in inputs], "split": "all"},
        "tiling": {"tile_px": tile_px, "halo_px": halo_px},
        "models": {"gallery": str(gallery), "arch": m.get("arch", "unet"),
                   "preset": m.get("preset", "tiny"), "hash_bits": int(m["hash_head"]["n_bits"])},
        "inference": {"batch_size": batch_size, "threads_per_rank": threads_per_rank,
                      "device": device},
        "output": {"dir": str(out_dir), "geotiff": True, "cog": False, "bucket_map": False,
                   "quicklooks": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return write_yaml(path, cfg)


@dataclass
class EngineRun:
    """One ``resflow run``: its run_report.json, the command's own wall time, and the command."""

    engine: str
    ranks: int
    report: dict[str, Any]
    command_wall_s: float
    command: str
    out_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        """In-process wall time from the run report (interpreter and MPI start-up excluded)."""
        return float(self.report["wall_s"])

    def summary(self) -> dict[str, Any]:
        r = self.report
        return {"engine": self.engine, "ranks": self.ranks, "wall_s": self.wall_s,
                "command_wall_s": self.command_wall_s, "tiles": r["tiles"],
                "tiles_computed": r.get("tiles_computed", r["tiles"]),
                "megapixels": r["megapixels"], "area_km2": r["area_km2"],
                "bytes_read": r["bytes_read"], "throughput": r["throughput"],
                "stage_s_total": r["stage_s_total"], "command": self.command,
                "out_dir": str(self.out_dir), **self.extra}


def run_engine(config: Path, out_dir: Path, ranks: int = 2, engine: str = "mpi",
               threads_per_rank: int = 1, sets: Sequence[str] = (),
               wrapper: Sequence[str] = (), timeout_s: float = 3600) -> EngineRun:
    """Map the config's scenes into a fresh ``out_dir`` with ``ranks`` MPI ranks (engine mpi) or
    ``spark.master=local[ranks]`` (engine spark); return the run report and wall times."""
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a leftover output would be resumed, not recomputed
    common = ["run", str(config), "--set", f"output.dir={out_dir}",
              "--set", f"inference.threads_per_rank={threads_per_rank}", "--quiet",
              "--no-report-html", "--restart", *(x for s in sets for x in ("--set", s))]
    if engine == "mpi":
        body = [*wrapper, *common] if wrapper else [resflow_exe(), *common]
        cmd = [*mpirun(ranks), *body]
    elif engine == "spark":
        cmd = [resflow_exe(), *common, "--engine", "spark", "--set", f"spark.master=local[{ranks}]"]
    else:
        raise ValueError(f"engine must be mpi or spark, got {engine!r}")
    _, wall_s = run_command(cmd, env=bench_env(threads_per_rank), timeout_s=timeout_s)
    report_path = out_dir / "run_report.json"
    if not report_path.is_file():
        raise BenchError(f"{report_path}: the {engine} run wrote no run report")
    report = json.loads(report_path.read_text())
    return EngineRun(engine, ranks, report, wall_s, shell_line(cmd), out_dir)


def rss_wrapper(rss_dir: Path) -> list[str]:
    """Prefix that runs each rank under perf/rss_wrapper.py (peak RSS and CPU seconds per rank)."""
    for old in Path(rss_dir).glob("rss-rank*.json"):
        old.unlink()
    return [PYTHON, str(PERF_DIR / "rss_wrapper.py"), "--rss-dir", str(rss_dir), "--"]


def read_rss(rss_dir: Path) -> list[dict[str, Any]]:
    """The per-rank records rss_wrapper.py wrote, by rank."""
    return sorted((json.loads(p.read_text()) for p in Path(rss_dir).glob("rss-rank*.json")),
                  key=lambda r: r["rank"])


def mask_outputs(out_dir: Path) -> list[Path]:
    """The exported mask GeoTIFFs of a run, in scene order."""
    return sorted(p for p in Path(out_dir).glob("*.resflow-mask.tif"))


# -- results ------------------------------------------------------------------------------------
def default_out(study: str) -> Path:
    """perf/results/<study>/."""
    return RESULTS_DIR / study


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (numbers, dataclasses and paths converted)."""
    def conv(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"cannot serialise {type(o).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, default=conv) + "\n")
    os.replace(tmp, path)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def target(name: str, value: Optional[float], goal: float, unit: str = "") -> dict[str, Any]:
    """One performance target: measured value, goal (>=), and whether it is met."""
    return {"name": name, "value": value, "goal": goal, "unit": unit,
            "met": None if value is None else bool(value >= goal)}


def header(study: str, args: Any) -> dict[str, Any]:
    """Fields every study's JSON starts with."""
    return {"study": study, "command": this_command(), "machine": machine_info(),
            "arguments": {k: v for k, v in vars(args).items()}}


def print_done(study: str, path: Path) -> None:
    """Tell the user where a study's JSON went."""
    print(f"[{study}] results: {path}", flush=True)
