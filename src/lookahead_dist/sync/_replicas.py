"""Keeping the replicas of local SGD alike: the same starting weights, averaged buffers, and a watch
on a DDP module that still all-reduces every step.

Note [Same starting weights]
----------------------------
Ranks that start from different weights average into a meaningless point at the first sync.
``init="broadcast"`` (default) copies the first rank's parameters and buffers to the others at
construction (over ``process_group``, then ``intra_group``), before the first forward pass,
as DDP does; ``init="check"`` compares fingerprints instead and raises ``ValueError`` naming
the ranks that differ; ``init="none"`` trusts the caller. Either way the parameter shapes are
checked first, so a mismatch is an error rather than a hang. Parameters added later with
``add_param_group`` are aligned when added. Resuming *mid-cycle* (fast weights legitimately
differ per rank): build the optimizer first, then load each rank's model and optimizer state,
or pass ``init="none"``.

Note [Buffers]
--------------
The optimizer sees parameters only, so buffers are declared: ``module=model`` (its buffers are
re-read at each sync, so ``model.to(...)`` is fine) or ``buffers=[...]``. Floating-point buffers
(BatchNorm running statistics) are averaged at the sync of the first param group; integer
buffers (``num_batches_tracked``) advance identically on every rank and are left alone. They are
plain averages: no outer step, no slow copy.

Note [DDP still all-reducing]
-----------------------------
A DDP module whose forward runs outside ``no_sync()`` all-reduces gradients every step, so the
mode would save nothing. When ``module`` is such a DDP (over ranks of ``process_group``; DDP
inside an ``intra_group`` is the hierarchical set-up and is fine), a forward pre-hook counts the
forwards that will synchronise, and the next sync emits a ``UserWarning`` (``on_ddp_sync="warn"``,
once) or raises ``RuntimeError`` (``"raise"``). Cheaper still: train the plain module.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .. import _comm
from .._sync import local_tensor
from . import streaming

__all__ = ["ReplicaSync", "ranks_in", "ranks_of"]


def ranks_in(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` (None: the world)."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def ranks_of(group: dist.ProcessGroup | None, group_ranks: list[int]) -> list[int]:
    """The global ranks of the ranks ``group_ranks`` of ``group``."""
    return [dist.get_global_rank(group, r) if group is not None else r for r in group_ranks]


class ReplicaSync:
    """Alignment, buffer averaging and the DDP watch of :class:`~lookahead_dist.sync.local_sgd.LocalSGD`
    (a mixin: it reads the strategy's groups, ``options``, ``stats`` and ``timeout``)."""

    def close(self) -> None:
        """Remove the forward pre-hook that watches a DDP module (``module=`` a DDP)."""
        if self._ddp_handle is not None:
            self._ddp_handle.remove()
            self._ddp_handle = None

    # -- construction: same starting point on every rank ---------------------------------------
    @torch.no_grad()
    def align(self, params: Iterable[torch.Tensor]) -> None:
        """Make (or check) ``params`` -- and, the first time, the buffers -- equal on every rank."""
        params = list(params)
        tensors = [local_tensor(p).detach() for p in params]
        if not self._buffers_aligned:
            tensors += [b.detach() for b in self.options.buffer_list()]
            self._buffers_aligned = True
        for group in [self.group] + ([self.intra] if self.intra is not None else []):
            self._check_shapes(tensors, group)
            if self.options.init == "broadcast":
                self._broadcast(tensors, group)
            elif self.options.init == "check":
                self._check_equal(tensors, group)
        if self.options.outer_optimizer is not None:
            self._add_outer_group(params)

    def _device(self, tensors: list[torch.Tensor]) -> torch.device:
        return tensors[0].device if tensors else torch.device("cpu")

    def _check_shapes(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        # Mismatched shapes would make the collectives below hang or garble; fail clearly instead.
        code = sum((i + 1) * t.numel() for i, t in enumerate(tensors)) % (2**61)
        row = torch.tensor([len(tensors), sum(t.numel() for t in tensors), code], dtype=torch.int64,
                           device=self._device(tensors))
        rows, bad = self._ranks_unlike_first(row, group)
        if bad:
            raise ValueError(
                f"local SGD: ranks {ranks_of(group, bad)} hold parameters (or buffers) of other shapes than "
                f"rank {ranks_of(group, [0])[0]} (count, total numel per rank: "
                f"{[tuple(r[:2].tolist()) for r in rows]}); every rank must build the same model"
            )

    def _ranks_unlike_first(self, row: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, list[int]]:
        """Every rank's ``row`` (gathered over ``group``) and the group ranks whose row differs from rank 0's."""
        rows = _comm.all_gather_rows(row, group, self.stats, "init")
        return rows, [r for r in range(rows.shape[0]) if not torch.equal(rows[r], rows[0])]

    def _packed(self, tensors: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        out = []
        by_key = _comm.split_by_key(tensors, lambda t: (t.device, t.dtype))
        for ts in by_key.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            out.append((ts, flat))
        return out

    def _broadcast(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        for ts, flat in self._packed(tensors):
            _comm.broadcast(flat, group, self.stats, "init")
            torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in ts]), ts)])

    def _check_equal(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        sums = []
        for _, flat in self._packed(tensors):
            x = flat.double()
            w = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64, device=x.device)
            sums += [x.sum(), (x * w).sum(), (x * x).sum()]
        row = torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64, device=self._device(tensors))
        _, bad = self._ranks_unlike_first(row, group)
        if bad:
            raise ValueError(
                f"local SGD (init='check'): ranks {ranks_of(group, bad)} start from other weights than rank "
                f"{ranks_of(group, [0])[0]}; seed the model identically or use init='broadcast'"
            )

    # -- buffers -------------------------------------------------------------------------------
    def _average_buffers(self, describe: str) -> None:
        bufs = [b for b in self.options.buffer_list() if b.is_floating_point()]
        if not bufs:
            return
        launched = []
        for ts, flat in self._packed([b.detach() for b in bufs]):
            launched.append((ts, flat, _comm.all_reduce(flat, self.group, self.stats, "buffers")))
        for ts, flat, work in launched:
            streaming.wait_work(work, self.timeout, f"the buffer average of {describe}",
                                self._traits(self.group, flat.device))
            flat.div_(self.group_size)
            if self.intra is not None:  # mean of equal-sized group means = mean over all ranks
                work = _comm.all_reduce(flat, self.intra, self.stats, "buffers")
                streaming.wait_work(work, self.timeout, f"the intra-group buffer average of {describe}",
                                    self._traits(self.intra, flat.device))
                flat.div_(dist.get_world_size(self.intra))
            torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in ts]), ts)])

    # -- DDP that still all-reduces ------------------------------------------------------------
    def _watch_ddp(self, ddp: torch.nn.Module) -> None:
        ddp_ranks = set(ranks_in(getattr(ddp, "process_group", None)))
        if len(ddp_ranks & set(ranks_in(self.group))) < 2:
            return  # DDP inside an intra group only: the hierarchical set-up, expected to sync

        def count_syncing_forward(module: torch.nn.Module, args: Any) -> None:
            if torch.is_grad_enabled() and module.require_backward_grad_sync:
                self._ddp_syncs += 1

        self._ddp_handle = ddp.register_forward_pre_hook(count_syncing_forward)

    def _check_ddp(self) -> None:
        if not self._ddp_syncs:
            return
        n, self._ddp_syncs = self._ddp_syncs, 0
        msg = (
            f"Lookahead local SGD: the DistributedDataParallel module ran {n} forward pass(es) outside "
            "no_sync() since the last sync, so it all-reduced gradients every step and local SGD saves "
            "no communication. Run forward and backward inside `with model.no_sync():`, or train the "
            "plain module (the optimizer aligns the starting weights itself)"
        )
        if self.options.on_ddp_sync == "raise":
            raise RuntimeError(msg)
        if not self._ddp_warned:
            self._ddp_warned = True
            warnings.warn(msg, UserWarning, stacklevel=6)
