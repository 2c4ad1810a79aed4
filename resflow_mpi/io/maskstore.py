"""The HDF5 mask store: one file per run, one group per scene, written in parallel with ``mpio``.

Layout: ``/scenes/<i>/mask`` (H, W) uint8 — 0 background, 1 building, 255 nodata — chunked by
tile (optional ``prob`` float16 beside it); the group's attributes carry the CRS (WKT),
geotransform, source path, the source's identity (``source_identity``, see ``scene_identity``:
a resumed run refuses a scene file replaced since the layout), tile grid, ``tile_offset`` and
``complete``. Per-tile records are
archive-wide 1-D datasets under ``/tiles/``, indexed by ``tile_offset`` of the scene + tile index
(``/tiles/scene_offset`` holds the offsets, n_scenes + 1): ``bucket`` int16 (-1: not computed,
nodata; -2: out of distribution), ``code`` (n, bytes) uint8 packed hash codes, ``writer_rank``
int16, ``done`` uint8 (the resume bitmap). So a write round costs one record write per dataset
however many scenes its tiles come from. The root carries config/gallery checksums.

Rules of parallel HDF5 honoured here: the whole layout (groups, datasets, attributes) is created
before any write, by rank 0 alone with the serial driver (no collective metadata operation per
scene), and the file is then opened by every rank with ``mpio``; in a collective write every rank
takes part, with an empty selection when it has nothing left; buffers have the dataset's exact
dtype; datasets are allocated early, ``done`` zero-filled and the others never filled (every tile,
nodata ones included, is written once), and are not compressed (filters would force collective
I/O everywhere). The mask is written before its tile's ``done`` flag, so after a crash ``done``
never claims a tile whose pixels are missing. Scenes are flagged ``complete`` by one process after
every writer has closed the file.

Each store gets a random ``store_id`` when it is laid out: outputs exported from it carry that id
(``io/export.py``), so an output of an earlier store (before ``--restart``) is never taken for
one of this store.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import h5py
import numpy as np

from ..errors import InputError, OutputError, os_error_cause
from .oserrors import write_failure
from ..tiling import PixelGrid, Tile, grid_shape
from . import OPEN_SCENES, vsi
from .raster import SceneInfo

FORMAT_VERSION = 2
RECORDS = ("bucket", "writer_rank", "done", "code")  # per-tile datasets under /tiles


@dataclass
class TileResult:
    """What the pipeline produces for one tile (owned region only)."""

    tile: Tile
    mask: np.ndarray               # (h, w) uint8: 0/1, 255 nodata
    bucket: int                    # -1 for all-nodata tiles
    code: np.ndarray               # (n_bytes,) uint8 packed hash code (zeros when not computed)
    prob: Optional[np.ndarray] = None  # (h, w) float16 when probabilities are kept
    ood_score: float = float("nan")    # out-of-distribution score (NaN: not scored)


def _dxpl(collective: bool) -> Any:
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    if collective:
        dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    return dxpl


def parallel_hdf5() -> bool:
    """True when h5py was built with MPI support (the ``mpio`` driver is available) and the user
    did not ask for serialized writes (``RESFLOW_SERIAL_HDF5=1``: masks go through rank 0 without
    MPI-IO, for filesystems whose MPI-IO file locking fails, e.g. some NFS mounts)."""
    if os.environ.get("RESFLOW_SERIAL_HDF5", "") not in ("", "0"):
        return False
    return bool(h5py.get_config().mpi)


class MaskStore:
    """Reconstructs full-scene masks from tile results in one HDF5 file.

    ``comm`` given: the file is opened with the ``mpio`` driver on that communicator (all of its
    ranks must construct the store together). ``comm`` None: an ordinary single-writer file.
    """

    kind = "store"  # a result sink written by the runner's writer policy

    def __init__(self, path: str, scenes: Sequence[SceneInfo], tile_px: int, halo_px: int,
                 code_bytes: int, config_checksum: str, gallery_checksum: str,
                 comm: Any = None, restart: bool = False, save_probabilities: bool = False,
                 writer_rank: Optional[int] = None):
        self.path = path
        self.scenes = list(scenes)
        self.tile_px, self.halo_px, self.code_bytes = tile_px, halo_px, code_bytes
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else (writer_rank or 0)
        self.save_probabilities = save_probabilities
        self.bytes_written = 0
        self.tiles_written = 0
        exists = os.path.exists(path)
        if comm is not None:
            exists = comm.bcast(exists, root=0)
        if restart or not exists:
            self._lay_out(config_checksum, gallery_checksum)
        else:
            self._check_identities()
        kw: dict[str, Any] = {"driver": "mpio", "comm": comm} if comm is not None else {}
        try:
            self.file = h5py.File(path, "r+", **kw)
        except (OSError, ValueError) as exc:
            raise OutputError(f"{path}: cannot open the HDF5 output ({exc}); if the file is a "
                              "leftover of another run, rerun with --restart") from None
        if exists and not restart:
            self._check(config_checksum, gallery_checksum)
        self.store_id = str(self.file.attrs.get("store_id", ""))
        self._open: OrderedDict[int, dict[str, h5py.Dataset]] = OrderedDict()
        self._offsets = tile_offsets(self.scenes, tile_px)
        self._records = {name: self.file[f"tiles/{name}"] for name in RECORDS}

    def _datasets(self, scene: int) -> dict[str, h5py.Dataset]:
        """The scene's open datasets by name; at most OPEN_SCENES scenes' (least recently used
        closed first): a lookup by path costs more than a small tile's write."""
        ds = self._open.get(scene)
        if ds is None:
            if len(self._open) >= OPEN_SCENES:
                self._open.popitem(last=False)
            g = self.file[f"scenes/{scene}"]
            ds = self._open[scene] = {name: g[name] for name in g}  # mask (and prob)
        else:
            self._open.move_to_end(scene)
        return ds

    # -- layout --------------------------------------------------------------------------------
    def _new_dataset(self, group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any,
                     chunks: Optional[tuple[int, ...]] = None, zero: bool = False) -> None:
        """Allocated at creation; zero-filled only when ``zero`` (other datasets are written
        whole before they are read)."""
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if chunks is not None:
            dcpl.set_chunk(chunks)
        if zero:
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
            dcpl.set_fill_value(np.zeros(1, dtype))
        else:
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        space = h5py.h5s.create_simple(shape)
        tid = h5py.h5t.py_create(np.dtype(dtype))
        h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)

    def _lay_out(self, config_checksum: str, gallery_checksum: str) -> None:
        """Create the file's whole layout on one process with the serial driver, then every rank
        opens it for parallel writes: creating groups, datasets and attributes through ``mpio``
        is collective metadata work, one synchronisation per object and so per scene; serially
        it is a few milliseconds per scene, once per job, with no other rank involved."""
        failure = ""
        if self.rank == 0 or self.comm is None:
            try:
                with h5py.File(self.path, "w") as f:
                    self._create(f, config_checksum, gallery_checksum)
            except (OSError, ValueError) as exc:
                failure = write_failure(Path(self.path), exc, "cannot lay out the HDF5 output")
        if self.comm is not None:
            failure = self.comm.bcast(failure, root=0)
        if failure:
            raise OutputError(failure)

    def _create(self, f: h5py.File, config_checksum: str, gallery_checksum: str) -> None:
        f.attrs.update({"format_version": FORMAT_VERSION, "store_id": uuid.uuid4().hex,
                        "config_checksum": config_checksum,
                        "gallery_checksum": gallery_checksum, "tile_px": self.tile_px,
                        "halo_px": self.halo_px, "n_scenes": len(self.scenes),
                        "driver": "mpio" if self.comm is not None else f.driver,
                        "mpi_size": self.comm.Get_size() if self.comm is not None else 1})
        offsets = tile_offsets(self.scenes, self.tile_px)
        n = int(offsets[-1])
        t = f.create_group("tiles")
        t["scene_offset"] = offsets
        for name, dt in (("bucket", np.int16), ("writer_rank", np.int16)):
            self._new_dataset(t, name, (n,), dt)
        self._new_dataset(t, "done", (n,), np.uint8, zero=True)  # the resume bitmap
        self._new_dataset(t, "code", (n, self.code_bytes), np.uint8)
        for i, s in enumerate(self.scenes):
            g = f.create_group(f"scenes/{i}")
            rows, cols = grid_shape(s.width, s.height, self.tile_px)
            chunk = (min(self.tile_px, s.height), min(self.tile_px, s.width))
            self._new_dataset(g, "mask", (s.height, s.width), np.uint8, chunk)
            if self.save_probabilities:
                self._new_dataset(g, "prob", (s.height, s.width), np.float16, chunk)
            g.attrs.update({"source_path": s.path, "crs_wkt": s.crs_wkt,
                            "source_identity": json.dumps(scene_identity(s)),
                            "geotransform": np.asarray(s.geotransform, np.float64),
                            "width": s.width, "height": s.height, "grid_rows": rows,
                            "grid_cols": cols, "tile_offset": int(offsets[i]), "complete": 0})
            if s.native_grid is not None:  # scenes.gsd_m: exports go back to the file's grid
                n = s.native_grid
                g.attrs.update({"native_width": n.width, "native_height": n.height,
                                "native_geotransform": np.asarray(n.geotransform, np.float64)})

    def _check_identities(self) -> None:
        """Before resuming: every scene file is still the one laid out (``scene_identity``).
        Checked by one process with the serial driver before the parallel open; a store whose
        layout does not match the scene list is left to ``_check``."""
        failure = ""
        if self.rank == 0 or self.comm is None:
            failure = self._identity_problem()
        if self.comm is not None:
            failure = self.comm.bcast(failure, root=0)
        if failure:
            raise OutputError(failure)

    def _identity_problem(self) -> str:
        try:
            f = h5py.File(self.path, "r")
        except OSError:
            return ""  # reported by the open that follows
        with f:
            if f.attrs.get("format_version") != FORMAT_VERSION or \
                    int(f.attrs.get("n_scenes", -1)) != len(self.scenes):
                return ""
            for i, s in enumerate(self.scenes):
                g = f.get(f"scenes/{i}")
                if g is None or g.attrs.get("source_path") != s.path:
                    return ""
                recorded = g.attrs.get("source_identity")
                if recorded is None:
                    return (f"{self.path}: partial output records no identity of scene {i} "
                            f"({s.path}) (made by an older resflow); rerun with --restart to "
                            "start over")
                change = identity_change(json.loads(str(recorded)), scene_identity(s))
                if change:
                    return (f"{self.path}: scene {i} ({s.path}) changed since this output was "
                            f"started ({change}); its finished tiles belong to the old file: "
                            "rerun with --restart to start over")
        return ""

    def _check(self, config_checksum: str, gallery_checksum: str) -> None:
        a = self.file.attrs
        if a.get("format_version") != FORMAT_VERSION:
            raise OutputError(f"{self.path}: not a resflow mask store of format {FORMAT_VERSION}; "
                              "rerun with --restart to overwrite it")
        problems = []
        if a.get("config_checksum") != config_checksum:
            problems.append("configuration")
        if a.get("gallery_checksum") != gallery_checksum:
            problems.append("model gallery")
        if int(a.get("n_scenes", -1)) != len(self.scenes) or int(a.get("tile_px", -1)) != self.tile_px:
            problems.append("scene list/tiling")
        for i, s in enumerate(self.scenes):
            g = self.file.get(f"scenes/{i}")
            if g is None or g.attrs.get("source_path") != s.path:
                problems.append(f"scene {i}")
                break
        if problems:
            raise OutputError(f"{self.path}: partial output was made with a different "
                              f"{' and '.join(problems)}; rerun with --restart to start over")

    # -- writes --------------------------------------------------------------------------------
    def _write_rows(self, dset: h5py.Dataset, start: int, rows: np.ndarray, collective: bool) -> None:
        fspace = dset.id.get_space()
        if len(rows):
            count = (len(rows),) + tuple(dset.shape[1:])
            fspace.select_hyperslab((start,) + (0,) * (dset.ndim - 1), count)
            mspace = h5py.h5s.create_simple(count)
        else:
            fspace.select_none()
            mspace = h5py.h5s.create_simple((1,) + tuple(dset.shape[1:]))
            mspace.select_none()
            rows = np.zeros((1,) + tuple(dset.shape[1:]), dset.dtype)
        dset.id.write(mspace, fspace, np.ascontiguousarray(rows, dtype=dset.dtype),
                      dxpl=_dxpl(collective))

    def _write_block(self, dset: h5py.Dataset, tile: Optional[Tile], block: Optional[np.ndarray],
                     collective: bool) -> None:
        fspace = dset.id.get_space()
        if tile is None or block is None:
            fspace.select_none()
            mspace = h5py.h5s.create_simple((1, 1))
            mspace.select_none()
            block = np.zeros((1, 1), dset.dtype)
        else:
            o = tile.owned
            fspace.select_hyperslab((o.row, o.col), (o.height, o.width))
            mspace = h5py.h5s.create_simple((o.height, o.width))
        dset.id.write(mspace, fspace, np.ascontiguousarray(block, dtype=dset.dtype),
                      dxpl=_dxpl(collective))

    def write_results(self, results: Sequence[TileResult], collective: bool = False,
                      n_calls: Optional[int] = None) -> None:
        """Write tile results; in collective mode every rank passes the same ``n_calls`` (the
        round's maximum) and pads with empty selections so all ranks make identical calls."""
        try:
            self._write_results(results, collective, n_calls)
        except OSError as exc:
            raise OutputError(write_failure(Path(self.path), exc,
                                            f"writing masks failed on rank {self.rank}")) from None

    def _write_results(self, results: Sequence[TileResult], collective: bool,
                       n_calls: Optional[int]) -> None:
        calls = len(results) if n_calls is None else n_calls
        # Collective rounds: every rank learns which scenes the round's k-th calls touch (one
        # small allgather), so the collective calls are per scene *with data*, never per scene
        # of the archive: a 1,000-scene job costs what a one-scene job costs per tile.
        touched: list[list[int]] = []
        if collective:
            lists = self.comm.allgather([r.tile.scene for r in results])
            touched = [sorted({lst[k] for lst in lists if k < len(lst)}) for k in range(calls)]
        for k in range(calls):
            r = results[k] if k < len(results) else None
            # One collective call per touched scene dataset, in the same order on every rank.
            for i in touched[k] if collective else ([r.tile.scene] if r else []):
                mine = r is not None and r.tile.scene == i
                g = self._datasets(i)
                self._write_block(g["mask"], r.tile if mine else None, r.mask if mine else None,
                                  collective)
                if self.save_probabilities:
                    self._write_block(g["prob"], r.tile if mine else None,
                                      r.prob if mine else None, collective)
        # Small per-tile records: one independent write per record dataset for the whole round
        # (a row selection over the archive-wide index), after the pixels; the done flags last.
        for r in results:
            self.bytes_written += r.mask.nbytes + (r.prob.nbytes if r.prob is not None else 0)
            self.tiles_written += 1
        if not results:
            return
        rs = sorted(results, key=self._record_index)  # file order = buffer order
        idx = np.array([self._record_index(r) for r in rs], np.int64)
        rec = self._records
        self._write_points(rec["bucket"], idx, np.array([r.bucket for r in rs], np.int16))
        self._write_points(rec["writer_rank"], idx, np.full(len(rs), self.rank, np.int16))
        self._write_points(rec["code"], idx, np.stack([r.code for r in rs]).astype(np.uint8))
        self._write_points(rec["done"], idx, np.ones(len(idx), np.uint8))

    def _record_index(self, r: TileResult) -> int:
        return int(self._offsets[r.tile.scene]) + r.tile.index

    def _write_points(self, dset: h5py.Dataset, idx: np.ndarray, rows: np.ndarray) -> None:
        """Independent write of rows ``idx`` (ascending) of a 1-D or 2-D dataset in one call."""
        fspace = dset.id.get_space()
        fspace.select_none()
        width = tuple(dset.shape[1:])
        for i in idx:  # union of row hyperslabs; HDF5 walks it in file (ascending) order
            fspace.select_hyperslab((int(i),) + (0,) * len(width), (1,) + width,
                                    op=h5py.h5s.SELECT_OR)
        mspace = h5py.h5s.create_simple((len(idx),) + width)
        dset.id.write(mspace, fspace, np.ascontiguousarray(rows, dtype=dset.dtype),
                      dxpl=_dxpl(False))

    # -- state ---------------------------------------------------------------------------------
    def done_mask(self, scene: int) -> np.ndarray:
        """The resume bitmap of a scene, (n_tiles,) bool."""
        lo, hi = int(self._offsets[scene]), int(self._offsets[scene + 1])
        return self._records["done"][lo:hi].astype(bool)

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            raise OutputError(write_failure(Path(self.path), exc,
                                            f"flushing masks failed on rank {self.rank}")) from None

    def close(self) -> None:
        """Close the file (collective under mpio). HDF5 writes its cached chunks and metadata
        here, so a full disk can first show at close: an OutputError naming it."""
        if getattr(self, "file", None) is not None:
            self._open.clear()
            self._records.clear()
            f, self.file = self.file, None  # type: ignore[assignment]
            try:
                f.close()
            except OSError as exc:
                raise OutputError(write_failure(Path(self.path), exc,
                                                f"closing the mask store failed on rank "
                                                f"{self.rank}")) from None


IDENTITY_HEAD_BYTES = 1 << 16  # the header (and first blocks) checksummed per scene


def scene_identity(info: SceneInfo) -> dict[str, Any]:
    """What tells a scene file from another put at its path: size in px, band count, data type,
    geotransform, file size, modification time (ns) and a checksum of the first 64 KiB."""
    found = vsi.stat(info.path)
    if found is None:
        raise InputError(f"{info.path}: scene file not found (or not reachable) when recording "
                         "its identity; check the path or the connection")
    head = hashlib.sha256(vsi.read_head(info.path, IDENTITY_HEAD_BYTES)).hexdigest()
    return {"size_px": [info.width, info.height], "bands": info.band_count, "dtype": info.dtype,
            "geotransform": [float(v) for v in info.geotransform], "file_bytes": found[0],
            "mtime_ns": found[1], "head_sha256": head}


def identity_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two ``scene_identity`` records, in words ('' when nothing)."""
    def when(ns: Any) -> str:
        t = datetime.datetime.fromtimestamp(int(ns) / 1e9, datetime.timezone.utc)
        return t.strftime("%Y-%m-%d %H:%M:%S UTC")
    shown = {"size_px": lambda v: f"{v[0]}x{v[1]} px", "bands": lambda v: f"{v} band(s)",
             "file_bytes": lambda v: f"{v} bytes", "mtime_ns": when}
    names = {"size_px": "size", "bands": "bands", "dtype": "data type",
             "geotransform": "geotransform", "file_bytes": "file size",
             "mtime_ns": "modified", "head_sha256": "header checksum"}
    parts = []
    for key, name in names.items():
        if old.get(key) != new.get(key):
            fmt = shown.get(key)
            parts.append(f"{name} {fmt(old.get(key))} -> {fmt(new.get(key))}" if fmt and
                         old.get(key) is not None else f"{name} differs")
    return ", ".join(parts)


def tile_offsets(scenes: Sequence[SceneInfo], tile_px: int) -> np.ndarray:
    """(n_scenes + 1,) int64: scene i's tiles are records offsets[i] .. offsets[i + 1] - 1."""
    counts = [int(np.prod(grid_shape(s.width, s.height, tile_px))) for s in scenes]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def mark_complete_scenes(path: str) -> list[int]:
    """After every writer closed the store: flag each scene whose every tile is done (attribute
    ``complete``), on one process with the serial driver; the indices of the complete scenes.
    Reads the archive's done flags once (one byte per tile)."""
    try:
        with h5py.File(path, "r+") as f:
            done = f["tiles/done"][...].astype(bool)
            off = f["tiles/scene_offset"][...]
            complete = []
            for i in range(len(off) - 1):
                ok = bool(done[off[i]:off[i + 1]].all())
                g = f[f"scenes/{i}"]
                if int(g.attrs["complete"]) != int(ok):
                    g.attrs["complete"] = int(ok)
                if ok:
                    complete.append(i)
            return complete
    except OSError as exc:
        raise OutputError(write_failure(Path(path), exc, "cannot flag the finished scenes")
                          ) from None


@dataclass(frozen=True)
class SceneMeta:
    """What a finished store records about one scene (no pixels)."""

    width: int
    height: int
    geotransform: tuple[float, ...]
    crs_wkt: str
    source_path: str
    grid_rows: int
    grid_cols: int
    tile_px: int
    native: Optional[PixelGrid] = None  # the scene file's grid when the mask is resampled


class MaskReader:
    """Read side of a mask store (export, reports): scene records, mask rows, bucket grids.

    The only reader of the HDF5 layout besides ``MaskStore``; a plain (serial) h5py file."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.file: Optional[h5py.File] = h5py.File(path, "r")
        except OSError as exc:
            raise OutputError(f"{path}: cannot read the HDF5 mask store ({os_error_cause(exc)}); "
                              "rerun the run that writes it") from None

    def __enter__(self) -> "MaskReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _group(self, scene: int) -> h5py.Group:
        assert self.file is not None, "MaskReader is closed"
        return self.file[f"scenes/{scene}"]

    def scene_meta(self, scene: int) -> SceneMeta:
        """Size, georeferencing, source and tile grid of scene ``scene``."""
        g = self._group(scene)
        h, w = g["mask"].shape
        native = None
        if "native_width" in g.attrs:
            native = PixelGrid(int(g.attrs["native_width"]), int(g.attrs["native_height"]),
                               tuple(float(v) for v in g.attrs["native_geotransform"]))
        return SceneMeta(int(w), int(h), tuple(float(v) for v in g.attrs["geotransform"]),
                         str(g.attrs["crs_wkt"]), str(g.attrs["source_path"]),
                         int(g.attrs["grid_rows"]), int(g.attrs["grid_cols"]),
                         int(self.file.attrs["tile_px"]), native)  # type: ignore[union-attr]

    def iter_mask_rows(self, scene: int, rows_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (rows, W) uint8 block) over the scene's mask, top to bottom."""
        mask = self._group(scene)["mask"]
        height = mask.shape[0]
        for r0 in range(0, height, rows_per_block):
            yield r0, mask[r0:min(height, r0 + rows_per_block), :]

    def has_probabilities(self, scene: int) -> bool:
        """Whether the store kept the scene's probabilities (``save_probabilities``)."""
        return "prob" in self._group(scene)

    def iter_probability_rows(self, scene: int, rows_per_block: int
                              ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, (rows, W) float16 probabilities, the same rows of the uint8 mask) over
        the scene, top to bottom; the mask's 255 marks nodata."""
        g = self._group(scene)
        prob, mask = g["prob"], g["mask"]
        height = mask.shape[0]
        for r0 in range(0, height, rows_per_block):
            r1 = min(height, r0 + rows_per_block)
            yield r0, prob[r0:r1, :], mask[r0:r1, :]

    def scene_attrs(self, scene: int) -> dict[str, Any]:
        """The scene group's attributes (georeferencing, grid, ``complete``, ...)."""
        return dict(self._group(scene).attrs)

    def tile_records(self, scene: int) -> dict[str, np.ndarray]:
        """The scene's per-tile records, each indexed by tile index: ``bucket``, ``code``,
        ``writer_rank``, ``done``."""
        assert self.file is not None, "MaskReader is closed"
        lo = int(self._group(scene).attrs["tile_offset"])
        hi = int(self.file["tiles/scene_offset"][scene + 1])
        return {name: self.file[f"tiles/{name}"][lo:hi] for name in RECORDS}

    def mask(self, scene: int) -> np.ndarray:
        """The scene's whole mask (H, W) uint8 (small scenes, tests; export streams rows)."""
        return self._group(scene)["mask"][...]

    def n_scenes(self) -> int:
        assert self.file is not None, "MaskReader is closed"
        return int(self.file.attrs["n_scenes"])

    @property
    def store_id(self) -> str:
        """The store's random id, made when it was laid out ("" for stores older than ids)."""
        assert self.file is not None, "MaskReader is closed"
        return str(self.file.attrs.get("store_id", ""))

    @property
    def config_checksum(self) -> str:
        """Checksum of the configuration the store's masks were made with."""
        assert self.file is not None, "MaskReader is closed"
        return str(self.file.attrs.get("config_checksum", ""))

    def bucket_grid(self, scene: int) -> np.ndarray:
        """(grid_rows, grid_cols) int64 bucket of every tile (-1: nodata / not computed)."""
        g = self._group(scene)
        rows, cols = int(g.attrs["grid_rows"]), int(g.attrs["grid_cols"])
        return self.tile_records(scene)["bucket"].reshape(rows, cols).astype(np.int64)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
