"""What a DeepSpeed engine steps: the optimizer, its wrapper, the fp32 master partitions, the Lookahead."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..lookahead import Lookahead, find_lookahead


def require_lookahead(engine: Any) -> Lookahead:
    """The :class:`~lookahead_dist.Lookahead` the engine steps; TypeError if it steps none."""
    la = find_lookahead(engine)
    if la is None:
        raise TypeError("the engine's optimizer is not a lookahead_dist.Lookahead (use initialize() or wrap_engine())")
    return la


def master_partitions(engine_or_optimizer: Any) -> list[torch.Tensor]:
    """The fp32 master tensors this rank's optimizer steps: the tensors slow weights shadow.

    ZeRO-1/2: one flat partition per param group; bf16 ZeRO-1 optimizer: the same; ZeRO-3: one
    flat partition per sub-group (``sub_group_size``).
    """
    zero = getattr(engine_or_optimizer, "optimizer", engine_or_optimizer)
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        parts = getattr(zero, attr, None)
        if parts:
            return list(parts)
    raise TypeError(
        f"{type(zero).__name__} is not a DeepSpeed ZeRO or bf16 optimizer with fp32 master partitions"
    )


def _stepped_optimizer(engine: Any) -> tuple[Any, torch.optim.Optimizer]:
    """(holder, optimizer): the torch optimizer the engine steps, and the object whose ``.optimizer`` it is.

    DeepSpeed's wrappers (ZeRO-1/2/3, the bf16 and fp16 optimizers) are not torch optimizers and
    keep the one they step as ``.optimizer``; without a wrapper the engine steps it directly.
    """
    holder: Any = engine
    opt = getattr(engine, "optimizer", None)
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        holder, opt = opt, getattr(opt, "optimizer", None)
    if opt is None:
        raise ValueError(
            "the DeepSpeed engine has no optimizer to wrap (built without an optimizer, e.g. ZeRO-3 "
            'inference): pass optimizer=... or add an "optimizer" block to the DeepSpeed config'
        )
    return holder, opt


@contextmanager
def _quiet_deepspeed_collectives() -> Iterator[None]:
    """Within our own calls: drop the FutureWarnings torch raises for DeepSpeed's collective calls.

    torch 2.13 deprecates ``all_gather_into_tensor``/``reduce_scatter_tensor``, which DeepSpeed's
    comm layer calls; the warning is DeepSpeed's to fix, and says nothing to our caller.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        yield
