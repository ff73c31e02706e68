"""Slow weights on a DeepSpeed engine: measuring them, gathering one, and putting them in the module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..lookahead import SLOW_KEY
from ..memory import optimizer_state_bytes
from .introspect import (
    _quiet_deepspeed_collectives,
    _stepped_optimizer,
    master_partitions,
    require_lookahead,
)


@dataclass(frozen=True)
class DeepSpeedStateBytes:
    """Optimizer-state bytes one rank holds under DeepSpeed (local tensors only).

    Attributes:
        slow: Lookahead slow-weight bytes.
        inner: the inner optimizer's own state bytes (Adam's moments, ...).
        master: bytes of the fp32 master partitions (the tensors the inner optimizer steps).
        master_numel: elements in those partitions (includes DeepSpeed's alignment padding).
    """

    slow: int
    inner: int
    master: int
    master_numel: int


def state_bytes(engine: Any) -> DeepSpeedStateBytes:
    """Measure :class:`DeepSpeedStateBytes` on this rank from the state tensors themselves."""
    la = require_lookahead(engine)
    measured = optimizer_state_bytes(la)
    parts = master_partitions(engine)
    return DeepSpeedStateBytes(
        slow=measured.slow,
        inner=measured.inner,
        master=sum(t.numel() * t.element_size() for t in parts),
        master_numel=sum(t.numel() for t in parts),
    )


def full_slow_weight(engine: Any, param: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole fp32 slow weight of a model parameter, assembled from every rank's partition.

    A collective: every rank of the data-parallel group must call it (one all-reduce of the
    parameter's size). Returns None on every rank before the first step. For checks and export,
    not for the training loop.

    ZeRO-3 goes through DeepSpeed's own state gathering. ZeRO-1/2 and the bf16 optimizer read the
    slow weight straight from the Lookahead's state: DeepSpeed links its per-parameter
    optimizer-state views only once, after the first group's first step, so groups stepped later
    have none.
    """
    import torch.distributed as dist

    la = require_lookahead(engine)
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        if not any(SLOW_KEY in s for s in la.state.values()):
            return None
        return param._z3_optimizer.get_full_hp_param(param, SLOW_KEY)
    if not hasattr(param, "_hp_mapping"):
        raise TypeError("param is not a parameter of a DeepSpeed ZeRO-1/2 or bf16-optimizer engine")
    buf = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    have = torch.zeros(1, device=param.device)
    mapping = param._hp_mapping
    if mapping is not None:
        frag = mapping.hp_fragment  # a view into one of this rank's fp32 master partitions
        for part in master_partitions(engine):
            if part.untyped_storage().data_ptr() != frag.untyped_storage().data_ptr():
                continue
            start = frag.storage_offset() - part.storage_offset()
            if not 0 <= start < part.numel():
                continue
            slow = la.slow_weight(part)
            if slow is not None:
                lp = mapping.lp_fragment_address
                buf.narrow(0, lp.start, lp.numel).copy_(slow.narrow(0, start, lp.numel))
                have.fill_(1)
            break
    group = getattr(param, "_dp_group", None)
    dist.all_reduce(buf, group=group)
    dist.all_reduce(have, group=group)
    return buf.view(param.shape) if have.item() > 0 else None


class _Layout:
    """Where an engine keeps what the module holds and what Lookahead steps (Note [Slow weights in the module])."""

    def __init__(self, engine: Any) -> None:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        holder, _ = _stepped_optimizer(engine)
        la = require_lookahead(engine)
        self.la, self.holder = la, holder
        if isinstance(holder, DeepSpeedZeroOptimizer_Stage3):
            self.kind = "zero3"
            if holder.swap_optimizer or any(t is None for t in holder.fp16_partitioned_groups_flat):
                raise NotImplementedError(
                    "slow weights in the module under ZeRO-3 with NVMe offload (offload_optimizer/offload_param "
                    "device 'nvme') or parameter offload are not supported: the partitions are swapped out"
                )
        elif isinstance(holder, DeepSpeedZeroOptimizer):  # ZeRO-1/2
            self.kind = "flat"
            self.lp = holder.parallel_partitioned_bit16_groups
            self.hp = holder.single_partition_of_fp32_groups
            self.lp_flat = holder.bit16_groups_flat
        elif isinstance(holder, BF16_Optimizer):  # bf16 without ZeRO, or ZeRO-1 with fp32 gradient accumulation
            self.kind = "flat"
            self.lp = holder.bf16_partitioned_groups
            self.hp = holder.fp32_groups_flat_partition
            self.lp_flat = holder.bf16_groups_flat
        elif holder is engine:  # no wrapper: the module's parameters are what Lookahead steps
            self.kind = "plain"
        else:
            raise NotImplementedError(
                f"slow weights in the module are not supported under DeepSpeed's {type(holder).__name__} "
                "(fp16 without ZeRO); use ZeRO stage 1-3 or bf16"
            )

    # ZeRO-1/2, bf16 optimizer: each rank owns one flat partition per group of the module's weights
    def _all_gather_flat(self) -> None:
        from deepspeed.runtime.utils import all_gather_dp_groups

        h = self.holder
        all_gather_dp_groups(groups_flat=self.lp_flat, partitioned_param_groups=self.lp,
                             dp_process_group=h.real_dp_process_group,
                             start_alignment_factor=h.nccl_start_alignment_factor,
                             allgather_bucket_size=h.allgather_bucket_size)

    def _flat_partition(self, i: int) -> torch.Tensor:
        import deepspeed.comm as dist

        return self.lp[i][dist.get_rank(group=self.holder.real_dp_process_group[i])]

    # ZeRO-3: each rank owns one flat partition per sub-group; the module gathers them in forward
    def _z3_release(self) -> None:
        self.holder._partition_all_parameters()  # as ZeRO-3's step() starts

    def _z3_regather(self) -> None:
        h = self.holder  # as ZeRO-3's step() ends (_post_step)
        if len(h.persistent_parameters) > 0:
            h.persistent_parameters[0].all_gather(h.persistent_parameters)
        h.invalidate_secondary_tensor()

    @torch.no_grad()
    def load_slow(self) -> None:
        """The module's weights := the slow weights (cast to the module's dtype); master weights untouched."""
        if self.kind == "flat":
            for i, hp in enumerate(self.hp):
                slow = self.la.slow_weight(hp)
                if slow is not None:
                    self._flat_partition(i).copy_(slow)
            self._all_gather_flat()
        else:  # zero3
            h = self.holder
            self._z3_release()
            for sg, hp in enumerate(h.fp32_partitioned_groups_flat):
                slow = self.la.slow_weight(hp)
                if slow is not None:
                    h.fp16_partitioned_groups_flat[sg].copy_(slow)
                    h._unflatten_partitioned_parameters(sg)
            self._z3_regather()

    @torch.no_grad()
    def load_master(self) -> None:
        """The module's weights := the fp32 master weights, exactly as DeepSpeed's step leaves them."""
        if self.kind == "flat":
            self.holder.update_lp_params()
        else:
            h = self.holder
            self._z3_release()
            for sg in range(len(h.fp32_partitioned_groups_flat)):
                h._reassign_or_swap_out_partitioned_parameters(sg)
            self._z3_regather()

    @torch.no_grad()
    def sync_master(self) -> None:
        """``Lookahead.sync_now()`` on the fp32 master partitions (ZeRO-3: one sub-group at a time)."""
        if self.kind != "zero3":
            self.la.sync_now()
            return
        h = self.holder
        groups = self.la.param_groups
        for sg, hp in enumerate(h.fp32_partitioned_groups_flat):
            group = groups[h.sub_group_to_group_id[sg]]
            group["params"] = [hp]  # what ZeRO-3's _optimizer_step does around each step() call
            try:
                self.la.sync_now()
            finally:
                group["params"] = []


# Note [Slow weights in the module]
# ---------------------------------
# Under DeepSpeed the Lookahead steps fp32 master partitions, not the module: ZeRO-1/2 (and the
# bf16 optimizer) keep the module's weights in flat low-precision buffers of which each rank owns
# one partition per group, refreshed after each step by copying the rank's fp32 partition into its
# own piece and all-gathering the pieces; ZeRO-3 keeps only each rank's partition of every
# sub-group and gathers parameters in forward. To evaluate the slow weights we write each rank's
# slow partition into its piece of the module's buffers and gather as DeepSpeed's step does
# (ZeRO-3: release the gathered parameters first, re-gather the persistent ones after). To return,
# we run DeepSpeed's own master-to-module copy, which reproduces the fast weights exactly (the
# module holds the cast master weights after every step), so no copy of the fast weights is kept.


@contextmanager
def use_slow_weights(engine: Any) -> Iterator[None]:
    """Within the block the engine's module holds the Lookahead slow weights; after it, the fast ones.

    For evaluating the slow weights mid-cycle under DeepSpeed, on every ZeRO stage::

        with lookahead_dist.deepspeed.use_slow_weights(engine):
            val_loss = evaluate(engine)

    A collective (every data-parallel rank enters and leaves it together): under ZeRO-1/2 and the
    bf16 optimizer one all-gather of the module's weights each way, as after a step; under ZeRO-3
    the parameters are released and gathered again in forward as usual. The slow weights are cast
    to the module's dtype (bf16 modules see bf16 slow weights). The fp32 master weights, optimizer
    state and cycle counters are not touched, so training after the block continues exactly. Before
    the first step there are no slow weights yet and the block sees the weights as they are. Do not
    step inside the block. Without a ZeRO/bf16 wrapper this is ``optimizer.use_slow_weights()``.
    Not supported (``NotImplementedError``): fp16 without ZeRO, ZeRO-3 with NVMe or parameter offload.
    """
    layout = _Layout(engine)
    if layout.kind == "plain":
        with layout.la.use_slow_weights():
            yield
        return
    with _quiet_deepspeed_collectives():
        layout.load_slow()
    try:
        yield
    finally:
        with _quiet_deepspeed_collectives():
            layout.load_master()


def sync_now(engine: Any) -> None:
    """Run the Lookahead slow update now on every partition, and put the result in the module too.

    The DeepSpeed counterpart of ``Lookahead.sync_now()`` (e.g. before exporting the model): the
    fp32 master weights and slow weights both become ``slow + alpha * (fast - slow)``, every cycle
    counter restarts at 0, and the module's weights are refreshed from the master weights as
    DeepSpeed's step does. A collective: every data-parallel rank calls it. Supported as for
    :func:`use_slow_weights`.
    """
    layout = _Layout(engine)
    layout.sync_master()
    if layout.kind != "plain":
        with _quiet_deepspeed_collectives():
            layout.load_master()
