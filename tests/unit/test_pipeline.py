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
