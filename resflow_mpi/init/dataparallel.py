"""Data-parallel training steps over the ranks of a job (the shared models of ``resflow init``).

Every rank draws the same batch from the same seeded generator, computes the forward and backward
pass of its contiguous share of it, and the shares' gradients are summed weighted by share size,
so every rank takes the same optimizer step on (up to floating-point order) the gradient of the
whole batch. BatchNorm running statistics are averaged the same way and integer buffers (BatchNorm's
``num_batches_tracked``) are taken from rank 0, whose share is never empty: a batch with fewer
samples than ranks leaves some ranks without a forward pass, yet the models stay identical on
every rank at every step, and ``check_identical`` proves it at the end. :func:`data_parallel_step`
is the one training step every trainer calls.

Backends: ``mpi`` sums through the job's communicator (``Communicator.sum_to_all``: a reduce to
rank 0 and a broadcast of its bytes); ``torch`` through ``torch.distributed.all_reduce`` (gloo;
init trains the shared models on the CPU) over the same ranks, the rendezvous address being the
address rank 0 reaches the other ranks' hosts from (``RESFLOW_DIST_ADDR`` overrides it), sent
through the communicator. Either way every rank receives the same bits (``check_identical``
proves it) and a run is repeatable for a fixed rank count; a different rank count sums in another
order and gives a (slightly) different model. Pure torch and numpy: the communicator is passed
in, nothing here imports MPI.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..tiling import split_block

DIST_ADDR_ENV = "RESFLOW_DIST_ADDR"
# A documentation-only address (RFC 5737): connecting a UDP socket to it sends nothing but makes
# the kernel choose the interface of the default route.
UNROUTED_PROBE_ADDR = "192.0.2.1"


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def source_address_towards(dest: str) -> Optional[str]:
    """This host's IPv4 address on the interface the kernel routes ``dest`` through (a UDP
    connect, no packet sent), or None when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))
            addr = str(s.getsockname()[0])
    except OSError:
        return None
    return None if addr == "0.0.0.0" else addr


def rendezvous_address(this_host: str, peer_hosts: Sequence[str]) -> str:
    """The address rank 0 (on ``this_host``) offers the other ranks (on ``peer_hosts``):
    ``RESFLOW_DIST_ADDR`` when set; 127.0.0.1 when every rank is on this host; else this host's
    address on the interface that routes to the first peer host that resolves, else the default
    route's. Never a loopback address for a job that spans hosts (Debian maps the host name to
    127.0.1.1, which other nodes cannot reach)."""
    override = os.environ.get(DIST_ADDR_ENV, "").strip()
    if override:
        return override
    others = sorted({h for h in peer_hosts if h != this_host})
    if not others:
        return "127.0.0.1"
    candidates = []
    for host in others:
        try:
            peer = socket.gethostbyname(host)
        except OSError:
            continue
        if not _is_loopback(peer):
            candidates.append(source_address_towards(peer))
            break
    candidates.append(source_address_towards(UNROUTED_PROBE_ADDR))
    for addr in candidates:
        if addr and not _is_loopback(addr):
            return addr
    raise ConfigError(f"training.data_parallel_backend=torch: no address of {this_host} that "
                      f"ranks on {', '.join(others[:3])} can reach was found; set {DIST_ADDR_ENV} "
                      "to rank 0's address on the cluster network, or use "
                      "training.data_parallel_backend=mpi")


class DataParallel:
    """Batch sharing and gradient summation over ``comm``'s ranks (see the module docstring)."""

    def __init__(self, comm: Any, backend: str = "mpi"):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.backend = backend
        self._group_started = False

    def _torch_group(self) -> None:
        """Start torch.distributed (gloo) over the communicator's ranks, once."""
        import torch.distributed as dist
        if self._group_started or dist.is_initialized():
            return
        hosts = self.comm.allgather(socket.gethostname())

        def rendezvous() -> tuple[str, int]:
            addr = rendezvous_address(hosts[0], hosts[1:])
            with socket.socket() as s:
                s.bind(("", 0))
                return addr, int(s.getsockname()[1])
        addr, port = self.comm.root_call(rendezvous)  # a ConfigError reaches every rank
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=self.size, timeout=timedelta(minutes=10))
        self._group_started = True

    def close(self) -> None:
        """End the torch.distributed group this object started (the mpi backend has none)."""
        if self._group_started:
            import torch.distributed as dist
            dist.destroy_process_group()
            self._group_started = False

    def _sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a flat float32 CPU tensor, the same bits on every rank."""
        if self.backend == "torch":
            import torch.distributed as dist
            self._torch_group()
            t = flat.contiguous()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        return torch.from_numpy(self.comm.sum_to_all(np.ascontiguousarray(flat.numpy(),
                                                                          np.float32)))

    def share(self, n: int) -> slice:
        """This rank's contiguous share of a batch of ``n`` samples (possibly empty)."""
        r = split_block(n, self.rank, self.size)
        return slice(r.start, r.stop)

    def sum_gradients(self, module: nn.Module, n_mine: int, n_total: int,
                      loss: float = 0.0) -> float:
        """Replace each parameter's gradient (None on a rank with an empty share: zero) by the
        share-weighted sum over ranks, average the float buffers (BatchNorm statistics) the same
        way, take the integer buffers (``num_batches_tracked``) from rank 0, whose share is never
        empty, and return the batch loss (each rank's ``loss`` weighted by its share)."""
        w = np.float32(n_mine / max(1, n_total))
        params = [p for p in module.parameters() if p.requires_grad]
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        counters = [b for b in module.buffers() if not b.is_floating_point()]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                 for p in params]
        parts += [b.detach().reshape(-1) for b in buffers]
        weighted = torch.cat([t.float().cpu() for t in parts] + [torch.tensor([float(loss)])]) * w
        out = self._sum(weighted)
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
        if counters:
            values = self.comm.bcast([b.detach().cpu().clone() for b in counters])
            with torch.no_grad():
                for b, v in zip(counters, values):
                    b.copy_(v)
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


def data_parallel_step(module: nn.Module, optimizer: torch.optim.Optimizer,
                       batch: Sequence[torch.Tensor],
                       loss_of: Callable[..., torch.Tensor],
                       dp: Optional[DataParallel] = None) -> float:
    """One optimizer step of ``module`` on ``batch`` (tensors sharing their first dimension):
    ``loss_of(*share)`` on this rank's share, backward, gradients summed over ranks when ``dp``
    is given (a rank with an empty share computes nothing and still takes the same step), then
    ``optimizer.step()``. Returns the whole batch's loss (the same on every rank)."""
    n_batch = len(batch[0])
    share = [t[dp.share(n_batch)] for t in batch] if dp is not None else list(batch)
    n_mine = len(share[0])
    optimizer.zero_grad()
    loss_value = 0.0
    if n_mine:
        loss = loss_of(*share)
        loss.backward()
        loss_value = float(loss.detach())
    if dp is not None:
        loss_value = dp.sum_gradients(module, n_mine, n_batch, loss_value)
    optimizer.step()
    return loss_value
