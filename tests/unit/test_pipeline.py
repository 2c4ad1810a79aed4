"""The one pipeline's pieces that need no files: task sources, the serial communicator, layering."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from resflow_mpi.errors import InputError
from resflow_mpi.processor import TileTask, counter_source, list_source
from resflow_mpi.runtime.comm import Communicator
from resflow_mpi.tiling import tile_grid

PKG = Path(__file__).resolve().parents[2] / "resflow_mpi"


def tasks(n: int) -> list[TileTask]:
    grid = list(tile_grid(0, 64 * n, 64, 64, 8))
    assert len(grid) == n
    return [TileTask(t) for t in grid]


@pytest.mark.parametrize("chunk,batch", [(4, 8), (3, 8), (8, 8), (16, 8), (1, 5)])
def test_counter_source_fills_whole_batches(chunk: int, batch: int) -> None:
    todo = tasks(29)
    source = counter_source(todo, Communicator(None).counter(), chunk, batch)
    sizes, seen = [], []
    while (got := source()) is not None:
        sizes.append(len(got))
        seen += [t.tile.index for t in got]
    assert seen == list(range(29))                      # every task once, in order
    assert all(s == batch for s in sizes[:-1])          # no padded slot while tiles remain
    assert sizes[-1] == 29 - batch * (len(sizes) - 1)


def test_list_source_batches() -> None:
    source = list_source(tasks(5), 2)
    assert [len(b) for b in iter(source, None)] == [2, 2, 1]


def test_serial_communicator() -> None:
    comm = Communicator(None)
    assert (comm.rank, comm.size, comm.is_root, comm.parallel) == (0, 1, True, False)
    assert comm.bcast(3) == 3 and comm.gather(4) == [4] and comm.allreduce_max(5) == 5
    assert comm.map_split([1, 2, 3], lambda x: x * 10) == [10, 20, 30]
    with pytest.raises(InputError, match="bad scene"):
        comm.root_call(lambda: (_ for _ in ()).throw(InputError("bad scene")))
    counter = comm.counter()
    assert (counter.add(3), counter.add(2), counter.read()) == (0, 3, 5)


def test_only_runtime_imports_mpi4py() -> None:
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG).parts[0] == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "mpi4py" or n.startswith("mpi4py.") for n in names):
                offenders.append(str(path.relative_to(PKG)))
    assert offenders == []


def test_processor_keeps_a_bounded_number_of_scenes_open(unit_fixtures: dict[str, Path],
                                                         tmp_path: Path, monkeypatch) -> None:
    """Tiles of 12 scenes interleaved (the worst order for a cache): never more than
    OPEN_SCENES GDAL handles at once, and the same results as with every scene kept open."""
    import numpy as np
    import torch

    from resflow_mpi import processor
    from resflow_mpi.config import load_config
    from resflow_mpi.galleries import ModelGallery
    from resflow_mpi.io import geotiff
    from resflow_mpi.pipeline import build_stages, build_tasks, plan_scenes
    from tests.conftest import write_config

    rng = np.random.default_rng(3)
    paths = [str(geotiff.write_array(tmp_path / f"s{i:02d}.tif",
                                     rng.integers(1, 256, (3, 64, 128), dtype=np.uint8), 32637,
                                     (500000.0 + 64 * i, 0.5, 0.0, 4000000.0, 0.0, -0.5), 0))
             for i in range(12)]
    cfg = load_config(write_config(tmp_path / "run.yaml", scenes={"inputs": paths},
                                   models={"gallery": str(unit_fixtures["gallery"])},
                                   output={"dir": str(tmp_path / "out")}))
    plan = plan_scenes(cfg)
    todo = build_tasks(plan, cfg)
    order = sorted(range(len(todo)), key=lambda j: (todo[j].tile.index, todo[j].tile.scene))
    interleaved = [todo[j] for j in order]  # s00 t0, s01 t0, ..., s00 t1, ...
    assert len({t.tile.scene for t in interleaved[:12]}) == 12

    live: list[int] = [0, 0]  # open now, most at once

    class CountingReader(processor.WindowReader):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            live[0] += 1
            live[1] = max(live[1], live[0])

        def close(self) -> None:
            live[0] -= 1
            super().close()

    def run(open_scenes: int) -> list:
        monkeypatch.setattr(processor, "OPEN_SCENES", open_scenes)
        monkeypatch.setattr(processor, "WindowReader", CountingReader)
        live[:] = [0, 0]
        stages = build_stages(cfg, ModelGallery(cfg.models.gallery), torch.device("cpu"))
        proc = processor.TileProcessor(plan.scenes, cfg, stages)
        out = sorted(proc.process(processor.list_source(interleaved, 4)),
                     key=lambda r: (r.tile.scene, r.tile.index))
        assert live[0] == 0  # every handle closed at the end
        return out

    bounded = run(3)
    assert live[1] == 3
    unbounded = run(100)
    assert live[1] == 12
    assert len(bounded) == len(unbounded) == 24
    for a, b in zip(bounded, unbounded):
        assert (a.tile, a.bucket) == (b.tile, b.bucket)
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.code, b.code)
