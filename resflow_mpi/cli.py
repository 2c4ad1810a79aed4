"""The ``resflow`` command: info, synth, init, run, evaluate, search, sample, vectorize, config-doc."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Optional, Sequence

from .errors import ResflowError


def _load(args: argparse.Namespace) -> Any:
    from .config import load_config
    return load_config(args.config, args.set)


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, MPI library, parallel HDF5, and every rank's device binding."""
    from .runtime.mpi import bind_device, init_runtime, mpi4py_version, mpi_library
    comm = init_runtime()
    import h5py
    import numpy
    import sklearn
    import torch
    import yaml
    from .io.gdalenv import gdal_version
    binding = bind_device(comm, args.device)
    lines = comm.gather(binding.line(), root=0)
    if comm.is_root:
        print(f"resflow-mpi {__import__('resflow_mpi').__version__} on Python {sys.version.split()[0]}")
        print(f"MPI library: {mpi_library()}  (mpi4py {mpi4py_version()}, {comm.size} rank(s))")
        print(f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}, parallel HDF5: "
              f"{h5py.get_config().mpi}")
        print(f"GDAL {gdal_version()}, numpy {numpy.__version__}, torch {torch.__version__} "
              f"(CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}), "
              f"scikit-learn {sklearn.__version__}, pyyaml {yaml.__version__}")
        try:
            import pyspark
            print(f"pyspark {pyspark.__version__}")
        except ImportError:
            print("pyspark: not installed (needed only for --engine spark)")
        for ln in lines:
            print(f"binding: {ln}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic archive of georeferenced scenes with ground truth."""
    from .synth import synth_archive
    path = synth_archive(args.out, preset=args.preset, seed=args.seed, dtype=args.dtype,
                         size_px=args.size, bands=args.bands, mixed_crs=args.mixed_crs)
    entries = json.loads(open(path).read())
    print(f"wrote {len(entries)} scene(s) to {args.out} ({path})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Map scenes to masks (MPI engine by default; Spark, or one process with --engine local)."""
    if args.model:
        args.set.append(f"inference.model={args.model}")
    cfg = _load(args)
    from .pipeline import run_job
    report = run_engine(args.engine, lambda runner: run_job(
        cfg, runner, restart=args.restart, quiet=args.quiet, html_report=args.report_html))
    if report is None:  # ranks other than 0
        return 0
    return 0 if all(s["complete"] for s in report["scenes"]) else 3


def run_engine(engine: str, work: Any) -> Any:
    """Build the runner for ``engine`` and call ``work(runner)``; under MPI every rank takes part
    and a failure on any rank ends the whole job with one line (never a hang)."""
    if engine == "spark":
        from .runners.spark_runner import SparkRunner
        runner = SparkRunner()
        try:
            return work(runner)
        finally:
            runner.close()
    if engine == "local":
        from .runners.local import LocalRunner
        return work(LocalRunner())
    from .runners.mpi_runner import MPIRunner
    from .runtime.mpi import abort_on_error, init_runtime
    comm = init_runtime()
    result = None
    with abort_on_error(comm):
        result = work(MPIRunner(comm))
    return result


def cmd_init(args: argparse.Namespace) -> int:
    """Train the galleries: CEM, clustering, hashing, per-bucket and Mono models."""
    cfg = _load(args)
    from .init.workflow import run_init
    from .runtime.mpi import abort_on_error, init_runtime
    comm = init_runtime()
    with abort_on_error(comm):
        run_init(cfg, comm)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """IoU/F1 per held-out region: RESFlow, RESFlow+routing, Mono and trivial baselines, with
    bootstrap intervals over tiles and (--seeds N) mean and spread over N trained galleries."""
    cfg = _load(args)
    from .init.evaluate import run_evaluate
    run_engine(args.engine, lambda runner: run_evaluate(cfg, runner, out=args.out,
                                                        seeds=args.seeds))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Tiles most similar to a tile (by index) or to an image (by its hash code)."""
    from .init.search import search_command
    return search_command(args)


def cmd_sample(args: argparse.Namespace) -> int:
    """N tiles per bucket as georeferenced GeoTIFF chips plus a GeoPackage index, for labelling."""
    from .init.sample import sample_command
    return sample_command(args)


def cmd_vectorize(args: argparse.Namespace) -> int:
    """Building polygons from exported masks (GeoPackage/GeoJSON), masks spread over ranks."""
    from .io import vectorize as vec
    from .runtime.device import launched_by_mpi
    vec.prepare_outputs(args)

    def work(runner: Any) -> Optional[int]:
        comm = runner.comm
        masks = comm.root_call(lambda: vec.expand_mask_inputs(args.masks))
        results = comm.map_split(masks, lambda m: vec.vectorize_one(m, args))
        if results is None:
            return None
        for r in results:
            print(vec.result_line(r), flush=True)
        code = vec.summarise(results, comm.size)
        if getattr(args, "merged", None) and code == 0:
            merged = vec.merge_layers([r["gpkg"] for r in results], args.merged,
                                      getattr(args, "merged_crs", "EPSG:4326"))
            print(f"merged {merged['polygons']} polygon(s) of {len(results)} scene(s) in "
                  f"{merged['crs']} -> {merged['path']}", flush=True)
        return code
    return int(run_engine("mpi" if launched_by_mpi() else "local", work) or 0)


def cmd_config_doc(args: argparse.Namespace) -> int:
    """Print the configuration reference (Markdown) generated from the schema."""
    from .config import config_reference_markdown
    print(config_reference_markdown(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resflow", description=__doc__)
    p.add_argument("--debug", action="store_true",
                   help="show full tracebacks (also RESFLOW_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="YAML configuration file")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (YAML syntax), repeatable")

    sp = sub.add_parser("info", help=cmd_info.__doc__)
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.set_defaults(func=cmd_info)
    sp = sub.add_parser("synth", help=cmd_synth.__doc__)
    sp.add_argument("--out", required=True)
    sp.add_argument("--preset", default="demo", choices=["tiny", "demo", "large", "tiny-single", "tiny-eval"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"])
    sp.add_argument("--size", type=int, default=None, help="scene side in pixels (overrides preset)")
    sp.add_argument("--bands", type=int, default=3)
    sp.add_argument("--mixed-crs", action="store_true",
                    help="each regime's scenes in its own UTM zone (an archive spanning CRSs)")
    sp.set_defaults(func=cmd_synth)
    sp = sub.add_parser("run", help=cmd_run.__doc__)
    with_config(sp)
    sp.add_argument("--engine", default="mpi", choices=["mpi", "spark", "local"],
                    help="mpi (default; also a plain one-process start), spark (the paper's "
                         "cluster mode), local (one process, no MPI: for debugging)")
    sp.add_argument("--model", choices=["buckets", "mono"], default=None,
                    help="buckets: RESFlow's per-bucket models (default); mono: map every tile "
                         "with the Mono model (same as --set inference.model=mono)")
    sp.add_argument("--restart", action="store_true",
                    help="discard a partial output made with another config/gallery and start over")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--no-report-html", dest="report_html", action="store_false")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("init", help=cmd_init.__doc__)
    with_config(sp)
    sp.set_defaults(func=cmd_init)
    sp = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    with_config(sp)
    sp.add_argument("--out", default=None, help="directory for the table (default: output.dir)")
    sp.add_argument("--engine", default="mpi", choices=["mpi", "local"])
    sp.add_argument("--seeds", type=int, default=1,
                    help="evaluate N galleries trained with training.seed + 0..N-1: mean and "
                         "spread. A seed's gallery is models.gallery when that was trained with "
                         "this training section and seed (only read), else <out>/seed-galleries/"
                         "seed<S> (trained there when missing; models.gallery is never written)")
    sp.set_defaults(func=cmd_evaluate)
    sp = sub.add_parser("search", help=cmd_search.__doc__)
    sp.add_argument("gallery", help="image gallery HDF5 (gallery/images.h5)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--tile", type=int, help="index of a tile in the gallery")
    g.add_argument("--image", help="a GeoTIFF (or window of one) to hash and search with")
    sp.add_argument("--window", type=int, nargs=4, metavar=("COL", "ROW", "W", "H"))
    sp.add_argument("--models", default=None, help="model gallery (for --image; default: beside)")
    sp.add_argument("-k", type=int, default=10)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_search)
    sp = sub.add_parser("sample", help=cmd_sample.__doc__)
    sp.add_argument("gallery", nargs="?", default=None,
                    help="image gallery HDF5 (gallery/images.h5); or --from-run")
    sp.add_argument("--from-run", default=None, metavar="OUT",
                    help="draw from a mapped archive (a run's output folder): per bucket, the "
                         "flagged tiles and the least confident ones (what to label next)")
    sp.add_argument("--per-bucket", type=int, required=True, metavar="N")
    sp.add_argument("--lowest", type=int, default=None, metavar="M",
                    help="with --from-run: the M least confident tiles too (default: N)")
    sp.add_argument("--scenes", nargs="+", default=None, help="only these scenes (names or paths)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="folder for the chips and chips.gpkg")
    sp.set_defaults(func=cmd_sample)
    sp = sub.add_parser("vectorize", help=cmd_vectorize.__doc__)
    sp.add_argument("masks", nargs="+", help="mask GeoTIFFs (or an output directory)")
    sp.add_argument("--out", default=None, help="output directory (default: beside each mask)")
    sp.add_argument("--min-area-m2", "--min-area", dest="min_area_m2", type=float, default=0.0,
                    metavar="M2", help="drop polygons under this ground area in m2")
    sp.add_argument("--simplify-m", "--simplify", dest="simplify_m", type=float, default=0.0,
                    metavar="M", help="Douglas-Peucker tolerance in metres (with --regularize: "
                                      "of the outline before its edges are snapped; default "
                                      "1.5 pixels)")
    sp.add_argument("--regularize", action="store_true",
                    help="right-angle corners: near-rectangular polygons become their minimum "
                         "rotated rectangle, others have their edges snapped to the dominant "
                         "orientation and its perpendicular")
    sp.add_argument("--geojson", action="store_true", help="also write GeoJSON")
    sp.add_argument("--merged", default=None, metavar="PATH",
                    help="also write every scene's polygons into one layer in --merged-crs "
                         "(.gpkg, .geojson, .shp or .fgb), for archives that span several CRSs")
    sp.add_argument("--merged-crs", default="EPSG:4326")
    sp.set_defaults(func=cmd_vectorize)
    sp = sub.add_parser("config-doc", help=cmd_config_doc.__doc__)
    sp.set_defaults(func=cmd_config_doc)
    return p


def _raise_interrupted(signum: int, frame: Any) -> None:
    from .errors import Interrupted
    name = signal.Signals(signum).name
    raise Interrupted(f"stopped by {name}; rerun the same command to resume (finished work "
                      "is kept)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Debian's h5py loads its parallel build only under mpirun unless told so; resflow always wants
    # it (a one-rank run still writes through mpio). Must precede the first h5py import.
    os.environ.setdefault("H5PY_ALWAYS_USE_MPI", "1")
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["RESFLOW_DEBUG"] = "1"
    # Slurm's time limit and mpirun's forwarding send SIGTERM: end like Ctrl-C, with a line.
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        from .io.gdalenv import configure
        configure()  # GDAL exceptions and block cache, once per process (never at import)
        return int(args.func(args) or 0)
    except ResflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT); rerun the same command to resume: finished tiles "
              "are kept", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line unless --debug
        from .runtime.mpi import BUG_HINT, debug_enabled
        if debug_enabled():
            raise
        print(f"error: {type(exc).__name__}: {str(exc)[:300]}; {BUG_HINT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
