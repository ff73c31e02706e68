"""Building an engine with a Lookahead: :func:`initialize`, :func:`wrap_engine`, and what they need around
``deepspeed.initialize`` (the CPU shared-memory kernel skipped, ZeRO-3's partition padding zeroed, the
block's k and alpha kept on resume)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..lookahead import ALPHA_KEY, K_KEY, Lookahead
from .config import (
    LOOKAHEAD_CONFIG_KEY,
    _check_block_name,
    _check_local_sgd_stage,
    _load_config,
    parse_lookahead_block,
)
from .introspect import _quiet_deepspeed_collectives, _stepped_optimizer
from .node_checkpoints import _node_checkpoints
from .nodes import _across_nodes
from .op_build import _notice_op_build
from .universal import _refuse_unfinished_universal_load


def skip_cpu_shm_kernel() -> None:
    """On DeepSpeed's CPU accelerator, never JIT-build its shared-memory communication kernel.

    A global, lasting setting (for scripts and tests that call ``deepspeed.initialize``
    themselves); :func:`initialize` does the same only for the duration of its own call. DeepSpeed's
    CPU communication backend compiles that kernel when it starts (minutes on a small machine, a
    C++ compiler needed, and ranks race on the build lock). The kernel serves only
    ``inference_all_reduce``, never training collectives, so marking it unavailable in DeepSpeed's
    own compatibility table changes nothing for training. A no-op on any other accelerator.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextmanager
def _shm_kernel_skipped() -> Iterator[None]:
    """:func:`skip_cpu_shm_kernel` for the duration of the block, then the table as it was."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    table = deepspeed.ops.__compatible_ops__
    if get_accelerator().device_name() != "cpu":
        yield
        return
    had, before = "deepspeed_shm_comm" in table, table.get("deepspeed_shm_comm")
    table["deepspeed_shm_comm"] = False
    try:
        yield
    finally:
        if had:
            table["deepspeed_shm_comm"] = before
        else:
            table.pop("deepspeed_shm_comm", None)


def _check_wrappable(holder: Any, opt: torch.optim.Optimizer) -> None:
    name = type(holder).__name__
    if "muon" in type(opt).__name__.lower() and name == "DeepSpeedZeroOptimizer":
        # DeepSpeed's ZeRO-1/2 decides at every step, from the type of the optimizer it steps
        # (isinstance(..., MuonWithAuxAdam), 'muon' in its class name), whether to orthogonalise
        # gradients; a Lookahead in that place would silently turn Muon into momentum SGD.
        raise NotImplementedError(
            f"Lookahead around DeepSpeed's {type(opt).__name__} under ZeRO stage 1/2 is not supported: "
            "DeepSpeed tests the type of the optimizer it steps at every step to run Muon's "
            "orthogonalisation, which a wrapper would hide. Use ZeRO stage 3, or another optimizer type"
        )
    if getattr(holder, "backup_optimizer", None) is not None:
        raise NotImplementedError(
            "Lookahead under ZeRO-3 partial optimizer offload (offload_optimizer.ratio < 1) is not "
            "supported: DeepSpeed steps the sub-groups kept on the accelerator with a second optimizer. "
            "Offload all of the optimizer (ratio 1) or none of it"
        )
    if getattr(holder, "zenflow", False):
        raise NotImplementedError("Lookahead under DeepSpeed ZenFlow is not supported: ZenFlow steps the "
                                  "optimizer outside its step() method")


def wrap_engine(engine: Any, k: int = 5, alpha: float = 0.5, *, pullback: str = "none",
                slow_dtype: torch.dtype | None = None, local_sgd: Any = None) -> Lookahead:
    """Put a :class:`~lookahead_dist.Lookahead` around the optimizer a built engine steps.

    For an engine from a plain ``deepspeed.initialize`` (:func:`initialize` calls this): whatever
    optimizer DeepSpeed built or was given -- ``FusedAdam``, ``DeepSpeedCPUAdam`` under optimizer
    offload, the ``Adagrad`` ZeRO rebuilds over its partitions, a client optimizer -- becomes the
    Lookahead's inner optimizer, in the place the engine steps it. Everything DeepSpeed decided
    from the optimizer's type at construction stays as it decided. The slow weights are taken at
    the next step from the tensors stepped (Note [When a slow weight is taken] in
    :mod:`lookahead_dist.lookahead`), so wrap before the first step or after loading a checkpoint.

    Returns the Lookahead. Raises ``ValueError`` if the engine has no optimizer or already steps a
    Lookahead, ``NotImplementedError`` where DeepSpeed needs to see the optimizer's own type at
    every step (Muon under ZeRO-1/2) or steps part of it elsewhere (ZeRO-3 partial offload, ZenFlow).

    ``local_sgd``: a :class:`~lookahead_dist.LocalSGDOptions` whose ``process_group`` connects
    ranks that hold the same partition of replicas trained apart (Note [Local SGD across nodes] in :mod:`.nodes`),
    or None (the in-place slow step, no communication).
    """
    holder, opt = _stepped_optimizer(engine)
    if isinstance(opt, Lookahead):
        raise ValueError("the DeepSpeed engine already steps a Lookahead; wrap the optimizer once")
    _check_wrappable(holder, opt)
    if local_sgd is None:
        la = Lookahead(opt, k, alpha, pullback=pullback, slow_dtype=slow_dtype)
    else:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        saved = [g["params"] for g in opt.param_groups]
        if isinstance(holder, DeepSpeedZeroOptimizer_Stage3):
            # ZeRO-3 empties the groups between steps: show local SGD's construction-time shape check
            # each group's sub-group partitions, as ZeRO-3's step does one at a time.
            for gi, g in enumerate(opt.param_groups):
                g["params"] = [hp for sg, hp in enumerate(holder.fp32_partitioned_groups_flat)
                               if holder.sub_group_to_group_id[sg] == gi]
        try:
            la = Lookahead(opt, k, alpha, pullback=pullback, slow_dtype=slow_dtype, local_sgd=local_sgd)
        finally:
            for g, params in zip(opt.param_groups, saved):
                g["params"] = params
    la.register_step_pre_hook(_refuse_unfinished_universal_load)
    _zero_partition_padding(holder)
    holder.optimizer = la
    if getattr(engine, "basic_optimizer", None) is opt:
        engine.basic_optimizer = la
    return la


@torch.no_grad()
def _zero_partition_padding(holder: Any) -> None:
    """Zero the padding of ZeRO-3's flat partitions (fp32 master and low-precision copy) on this rank.

    ZeRO-3 gives every parameter a partition of ``ceil(numel / world)`` elements per rank and
    allocates it with ``torch.empty``: the tail that lies past the parameter's end (on the last
    ranks) is never written, and the fp32 master partition is copied from it. DeepSpeed never reads
    those elements back into a parameter, but the Lookahead steps the whole flat partition: the
    slow weights, the non-finite check of a sync and local SGD's averaged pseudo-gradients all see
    them, and a NaN/inf bit pattern left there by earlier allocations made syncs be skipped now and
    then (docs/deepspeed.md, "Partition padding"). Zeroed, they stay zero: their gradient is zero.
    A no-op for other wrappers and for partitions that are swapped out (NVMe) or offloaded.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(holder, DeepSpeedZeroOptimizer_Stage3):
        return
    for sg, params in enumerate(holder.fp16_groups):
        flats = [t for t in (holder.fp32_partitioned_groups_flat[sg], holder.fp16_partitioned_groups_flat[sg])
                 if t is not None and t.numel() > 0]
        offset = 0
        for p in params:
            n = p.partition_numel()
            rank = _partition_rank(p)
            valid = max(0, min(p.ds_numel - rank * n, n))
            for flat in flats:
                if offset + n <= flat.numel():
                    flat.narrow(0, offset + valid, n - valid).zero_()
            offset += n
        for flat in flats:  # alignment after the last parameter, if any
            if flat.numel() > offset:
                flat.narrow(0, offset, flat.numel() - offset).zero_()


def _partition_rank(p: Any) -> int:
    import deepspeed.comm as dist

    return dist.get_rank(group=p.ds_process_group)


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Drop-in for ``deepspeed.initialize`` that reads a ``"lookahead"`` block from the config.

    Same arguments and return values as ``deepspeed.initialize``. With a block such as
    ``{"lookahead": {"k": 5, "alpha": 0.5}}`` in the config (dict or JSON path), DeepSpeed builds
    the engine from the rest of the config exactly as ``deepspeed.initialize`` would -- its own
    optimizer from the ``"optimizer"`` block (``FusedAdam``, ``DeepSpeedCPUAdam`` under optimizer
    offload, every type and parameter DeepSpeed accepts), or your client optimizer or factory --
    and then :func:`wrap_engine` puts the Lookahead around the optimizer the engine steps. With
    ``k`` larger than the number of steps the run equals plain ``deepspeed.initialize`` bit for bit.

    Keys: ``k`` (int >= 1, default 5), ``alpha`` (float in (0, 1], default 0.5), ``pullback``
    (``"none"``/``"reset"``/``"pullback"``), ``slow_dtype`` (``"fp32"`` or null), ``local_sgd``
    (false; true: local SGD over all ranks, ZeRO stage 0 only, the engine's gradient all-reduce
    turned off; or ``{"across": "nodes", ...}``: ZeRO inside each node, local SGD across nodes, Note
    [Local SGD across nodes]). An unknown key or bad value raises an error naming it, before
    DeepSpeed builds anything (the fragment schedule against ``k`` included); so does a client
    optimizer that already is a Lookahead (two k's), and a top-level key that looks like a
    misspelled ``"lookahead"`` (:func:`_check_block_name`), with or without the block. On resume
    the block's k and alpha win over the checkpoint's (Note [Resuming with another k or alpha]).
    Before DeepSpeed compiles the op its ``"optimizer"`` block needs, one line says so
    (:func:`_notice_op_build`). Without the block this is otherwise exactly ``deepspeed.initialize``.

    Nothing outside the call changes: the caller's config dict and ``args`` are not modified (a
    config given as ``args.deepspeed_config`` is read and passed on through a copy of ``args``), and
    DeepSpeed's CPU shared-memory kernel is skipped (:func:`skip_cpu_shm_kernel`) only during the call.
    """
    import deepspeed

    config_arg = "config" if "config" in kwargs else ("config_params" if "config_params" in kwargs else None)
    raw = kwargs.get(config_arg) if config_arg else None
    from_args = raw is None and getattr(kwargs.get("args"), "deepspeed_config", None) is not None
    if from_args:
        raw = kwargs["args"].deepspeed_config
    config = _load_config(raw)
    if config is not None:
        _check_block_name(config)
        _notice_op_build(config)
    if config is None or LOOKAHEAD_CONFIG_KEY not in config:
        with _shm_kernel_skipped(), _quiet_deepspeed_collectives():
            return deepspeed.initialize(*args, **kwargs)
    if args:
        raise TypeError("lookahead_dist.deepspeed.initialize takes keyword arguments only (as deepspeed.initialize)")

    block = parse_lookahead_block(config[LOOKAHEAD_CONFIG_KEY])
    local_sgd = block["local_sgd"]
    across = local_sgd if isinstance(local_sgd, dict) else None
    if local_sgd is True:
        _check_local_sgd_stage((config.get("zero_optimization") or {}).get("stage", 0))
    client = kwargs.get("optimizer")
    if isinstance(client, Lookahead):
        raise ValueError(
            f'the optimizer is already a Lookahead and the config has a "{LOOKAHEAD_CONFIG_KEY}" '
            "block: use one or the other"
        )
    ds_config = {key: v for key, v in config.items() if key != LOOKAHEAD_CONFIG_KEY}
    if client is None and "optimizer" not in ds_config:
        raise ValueError(
            f'a "{LOOKAHEAD_CONFIG_KEY}" block needs an optimizer: pass optimizer=... or add an '
            '"optimizer" block to the DeepSpeed config'
        )
    call = dict(kwargs)
    call.pop("config_params", None)
    call["config"] = ds_config
    if from_args:  # DeepSpeed refuses a config in both places; the caller's args stay as they are
        call["args"] = copy.copy(kwargs["args"])
        call["args"].deepspeed_config = None
    options: Any = True if local_sgd is True else None
    with _shm_kernel_skipped(), _quiet_deepspeed_collectives():
        if across is not None:
            call["mpu"], options = _across_nodes(call, across)
        engine, _, loader, scheduler = deepspeed.initialize(**call)
    la = wrap_engine(engine, block["k"], block["alpha"], pullback=block["pullback"], slow_dtype=block["slow_dtype"],
                     local_sgd=options)
    if local_sgd is True:  # stage 0: the Lookahead's sync is the only communication (as accelerate's prepare)
        engine.enable_backward_allreduce = False
    _config_wins_on_load(la, block["k"], block["alpha"])
    _node_checkpoints(engine)  # across nodes: <dir>/node<i> (Note [Checkpoints across nodes] in node_checkpoints.py)
    return engine, engine.optimizer, loader, scheduler


# Note [Resuming with another k or alpha]
# ---------------------------------------
# A checkpoint keeps k and alpha in the Lookahead's param groups, and Lookahead.load_state_dict
# restores them. A "lookahead" block is what the user wrote for this run, so where the Lookahead
# comes from a block (initialize, accelerate's prepare, LookaheadTrainer) the block wins for the
# hyperparameters k and alpha, and the checkpoint for the state: slow weights, cycle positions,
# outer momenta. A cycle position at or past the new k ends its cycle at the next step. The first
# load that finds other values says so once (a UserWarning naming both).

def _config_wins_on_load(la: Lookahead, k: int, alpha: float) -> None:
    """Note [Resuming with another k or alpha]: after each ``la.load_state_dict``, set the block's k and alpha."""
    told = False

    def keep_config(optimizer: Lookahead) -> None:
        nonlocal told
        saved = sorted({(g.get(K_KEY), g.get(ALPHA_KEY)) for g in optimizer.param_groups} - {(k, alpha)}, key=str)
        for g in optimizer.param_groups:
            g[K_KEY], g[ALPHA_KEY] = k, alpha
        if saved and not told:
            told = True
            was = "; ".join(f"k={sk}, alpha={sa}" for sk, sa in saved)
            warnings.warn(
                f'the checkpoint was saved with {was}; the config\'s "{LOOKAHEAD_CONFIG_KEY}" block says k={k}, '
                f"alpha={alpha}: the config wins (the new k and alpha apply from the next step; slow weights and "
                "cycle positions come from the checkpoint, and a position at or past the new k ends its cycle at "
                "the next step)",
                UserWarning,
                stacklevel=2,
            )

    la.register_load_state_dict_post_hook(keep_config)
    la._lookahead_keep_config = keep_config  # type: ignore[attr-defined]  # universal loads bypass the hook
