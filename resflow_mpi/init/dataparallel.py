"""Data-parallel training steps over the ranks of a job (the shared models of ``resflow init``).

Every rank draws the same batch from the same seeded generator, computes the forward and backward
pass of its contiguous share of it, and the shares' gradients are summed weighted by share size,
so every rank takes the same optimizer step on (up to floating-point order) the gradient of the
whole batch. BatchNorm running statistics are averaged the same way, so the models stay
identical on every rank at every step, and ``check_identical`` proves it at the end.

Backends: ``mpi`` sums through the job's communicator (``Communicator.sum_to_all``: a reduce to
rank 0 and a broadcast of its bytes); ``torch`` through ``torch.distributed.all_reduce`` over the
same ranks (gloo for CPU models, nccl for CUDA ones: the sum stays on the GPU), the rendezvous
address being rank 0's, sent through the communicator. Either way every rank receives the same
bits (``check_identical`` proves it) and a run is repeatable for a fixed rank count; a different
rank count sums in another order and gives a (slightly) different model. Pure torch and numpy:
the communicator is passed in, nothing here imports MPI.
"""
from __future__ import annotations

import hashlib
import socket
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

from ..tiling import split_block


class DataParallel:
    """Batch sharing and gradient summation over ``comm``'s ranks (see the module docstring)."""

    def __init__(self, comm: Any, backend: str = "mpi"):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.backend = backend
        self._group_started = False

    def _torch_group(self, device: torch.device) -> None:
        """Start torch.distributed over the communicator's ranks (once): gloo, or nccl for CUDA."""
        import torch.distributed as dist
        if self._group_started or dist.is_initialized():
            return

        def rendezvous() -> tuple[str, int]:
            try:
                addr = socket.gethostbyname(socket.gethostname())
            except OSError:
                addr = "127.0.0.1"
            with socket.socket() as s:
                s.bind(("", 0))
                return addr, int(s.getsockname()[1])
        addr, port = self.comm.bcast(rendezvous() if self.rank == 0 else None)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=self.size, timeout=timedelta(minutes=10))
        self._group_started = True

    def close(self) -> None:
        """End the torch.distributed group this object started (the mpi backend has none)."""
        if self._group_started:
            import torch.distributed as dist
            dist.destroy_process_group()
            self._group_started = False

    def _sum(self, flat: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Element-wise sum over ranks of a flat float32 tensor, the same bits on every rank."""
        if self.backend == "torch":
            import torch.distributed as dist
            self._torch_group(device)
            t = flat.contiguous()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        arr = self.comm.sum_to_all(np.ascontiguousarray(flat.cpu().numpy(), np.float32))
        return torch.from_numpy(arr).to(device)

    def share(self, n: int) -> slice:
        """This rank's contiguous share of a batch of ``n`` samples (possibly empty)."""
        r = split_block(n, self.rank, self.size)
        return slice(r.start, r.stop)

    def sum_gradients(self, module: nn.Module, n_mine: int, n_total: int,
                      loss: float = 0.0) -> float:
        """Replace each parameter's gradient (None on a rank with an empty share: zero) by the
        share-weighted sum over ranks, average the float buffers (BatchNorm statistics) the same
        way, and return the batch loss (each rank's ``loss`` weighted by its share)."""
        w = n_mine / max(1, n_total)
        params = [p for p in module.parameters() if p.requires_grad]
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                 for p in params]
        parts += [b.detach().reshape(-1) for b in buffers]
        device = params[0].device if params else torch.device("cpu")
        flat = torch.cat([t.float() for t in parts]
                         + [torch.tensor([float(loss)], device=device)]) * np.float32(w)
        out = self._sum(flat, device)
        pos = 0
        for p in params:
            g = out[pos:pos + p.numel()].view_as(p).to(p.device, p.dtype)
            pos += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        with torch.no_grad():
            for b in buffers:
                b.copy_(out[pos:pos + b.numel()].view_as(b))
                pos += b.numel()
        return float(out[pos].item())

    def check_identical(self, module: nn.Module, what: str) -> None:
        """Raise on every rank if the ranks' copies of ``module`` differ (a bug, never input:
        the CLI reports it as one, with ``training.data_parallel: false`` as the way round)."""
        h = hashlib.sha256()
        for t in module.state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        digests = self.comm.allgather(h.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel training: the ranks' copies of the {what} differ "
                               f"({len(set(digests))} versions over {self.size} ranks); "
                               "training.data_parallel: false avoids it")
