"""Lookahead under Hugging Face accelerate: a drop-in for ``accelerator.prepare``.

    import lookahead_dist.accelerate as la_acc

    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-3), k=5, alpha=0.5)
    model, opt, loader = la_acc.prepare(accelerator, model, opt, loader)

``accelerator.prepare`` alone keeps a Lookahead for plain data parallelism (DDP, CPU or GPU) and
for DeepSpeed without optimizer offload, and ``save_state``/``load_state`` carry its slow weights
(they are entries of the inner optimizer's state). :func:`prepare` adds what accelerate does
not know about:

- Note [Optimizer offload swap]: with DeepSpeed optimizer offload and ``zero_force_ds_cpu_optimizer``
  unset, accelerate replaces the optimizer it is given by a ``DeepSpeedCPUAdam`` built from its
  learning rate, silently dropping the Lookahead. :func:`prepare` sets
  ``zero_force_ds_cpu_optimizer: false`` in the DeepSpeed config when an optimizer is a
  Lookahead, so accelerate and DeepSpeed keep it (the inner optimizer then steps the offloaded
  fp32 partitions on the CPU; for speed, make the inner optimizer ``DeepSpeedCPUAdam``). A config
  that sets ``zero_force_ds_cpu_optimizer: true`` explicitly asks for the swap, which cannot keep
  the Lookahead, and is refused with a ``ValueError`` naming the setting.
- The ``"lookahead"`` block of a DeepSpeed config (``{"k": 5, "alpha": 0.5, "local_sgd": false}``,
  as for :func:`lookahead_dist.deepspeed.initialize`) wraps the plain optimizer given to
  :func:`prepare` in a Lookahead. Passing a Lookahead as well is a ``ValueError`` (two sources of
  truth for k and alpha); so is a config ``"optimizer"`` block (accelerate then lets DeepSpeed
  build the optimizer, out of reach of a wrapper).
- ``"local_sgd": {"across": "nodes", ...}`` in the block: ZeRO (any stage) inside each node, local
  SGD across nodes (Note [Local SGD across nodes] in :mod:`lookahead_dist.deepspeed.nodes`): the node
  groups are built, the model is broadcast from global rank 0, the Lookahead gets local-SGD options
  over the across-node group, and accelerate's ``deepspeed.initialize`` call gets the node ``mpu``
  (``_initialize_with_mpu``; an accelerate-filled ``train_batch_size`` is rescaled to one node).
- Local-SGD mode (a ``Lookahead(..., local_sgd=True)``): the ranks must not all-reduce gradients
  at every step. Under DDP the prepared module is put in permanent ``no_sync`` (its
  ``require_backward_grad_sync`` is cleared, which is what ``DDP.no_sync()`` does for one
  block); under DeepSpeed, ZeRO stage 0 is required (stages 1-3 partition the optimizer step, so
  the ranks cannot hold diverging fast weights) and the engine's backward all-reduce is turned
  off. accelerate's own ``LocalSGD`` refuses DeepSpeed altogether.
- After preparing, each Lookahead is checked to be the optimizer the host actually steps; a
  swap by any other path is a ``RuntimeError`` instead of a silently plain run.

accelerate is imported only when a function of this module is called.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .lookahead import Lookahead

__all__ = ["prepare", "lookahead_config", "parse_lookahead_block"]


def _deepspeed_plugin(accelerator: Any) -> Any | None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin


def parse_lookahead_block(block: Any) -> dict[str, Any]:
    """Validate a ``"lookahead"`` block: the keys and checks of :func:`lookahead_dist.deepspeed.initialize`
    (``k``, ``alpha``, ``pullback``, ``slow_dtype``, ``local_sgd``: false, true -- ZeRO stage 0 only,
    checked by :func:`prepare` as by ``initialize`` -- or ``{"across": "nodes", ...}``).
    Returns the parsed values (``local_sgd``: False, True or the across-nodes entry)."""
    from .deepspeed.config import parse_lookahead_block  # one parser for the block; imports no DeepSpeed

    parsed = parse_lookahead_block(block)
    if parsed["local_sgd"] is None:
        parsed["local_sgd"] = False
    return parsed


def lookahead_config(accelerator: Any) -> dict[str, Any] | None:
    """The validated ``"lookahead"`` block of the accelerator's DeepSpeed config, or None.

    None without DeepSpeed, or when the config has no such block.
    """
    plugin = _deepspeed_plugin(accelerator)
    if plugin is None:
        return None
    return lookahead_config_from(plugin.deepspeed_config)


def _offload_device(config: dict[str, Any]) -> str:
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none") or "none").lower()


def _prepare_deepspeed_config(plugin: Any, objects: list[Any]) -> Any:
    """Check and adjust the DeepSpeed config for the Lookaheads in ``objects`` (wraps per the block).

    Returns the ``mpu`` to hand to ``deepspeed.initialize`` for ``"local_sgd": {"across": "nodes"}``, else None.
    """
    config = plugin.deepspeed_config
    block = lookahead_config_from(config)
    optimizers = [i for i, o in enumerate(objects) if isinstance(o, torch.optim.Optimizer)]
    if block is not None:
        if "optimizer" in config:
            raise ValueError(
                'DeepSpeed config has a "lookahead" block and an "optimizer" block: under accelerate the '
                "optimizer DeepSpeed builds cannot be wrapped. Remove the \"optimizer\" block and pass "
                "your own optimizer to prepare()"
            )
        if any(isinstance(objects[i], Lookahead) for i in optimizers):
            raise ValueError(
                'DeepSpeed config has a "lookahead" block and prepare() got a Lookahead: give k/alpha '
                "in one place (pass the plain inner optimizer, or remove the block)"
            )
    wanted = [i for i in optimizers if block is not None or isinstance(objects[i], Lookahead)]
    if not wanted:
        return None
    across = block["local_sgd"] if block is not None and isinstance(block["local_sgd"], dict) else None
    local = block["local_sgd"] is True if block is not None else any(objects[i].local_sgd is not None for i in wanted)
    if local:
        from .deepspeed.config import _check_local_sgd_stage  # the rule and message of lookahead_dist.deepspeed.initialize

        _check_local_sgd_stage(int((config.get("zero_optimization") or {}).get("stage", 0)))
    _keep_client_optimizer_under_offload(config, "lookahead_dist.accelerate.prepare", stacklevel=4)
    mpu = None
    if block is not None:
        local_sgd: Any = block["local_sgd"]
        if across is not None:  # Note [Local SGD across nodes] in lookahead_dist.deepspeed.nodes
            from .deepspeed.nodes import NodeMPU, align_across_world, inter_node_backend, node_groups

            groups = node_groups(across["ranks_per_node"], inter_backend=inter_node_backend(config))
            for obj in objects:
                if isinstance(obj, torch.nn.Module):
                    align_across_world(obj)
            mpu = NodeMPU(groups)
            local_sgd = dataclasses.replace(across["options"], process_group=groups.inter)
        from .deepspeed.engine import _config_wins_on_load

        for i in optimizers:
            objects[i] = Lookahead(objects[i], k=block["k"], alpha=block["alpha"], pullback=block["pullback"],
                                   slow_dtype=block["slow_dtype"], local_sgd=local_sgd)
            _config_wins_on_load(objects[i], block["k"], block["alpha"])  # on resume, the block's k and alpha
    return mpu


def _keep_client_optimizer_under_offload(config: dict[str, Any], caller: str, stacklevel: int) -> None:
    """Note [Optimizer offload swap]: under optimizer offload, keep a client Lookahead (a ``ValueError`` if
    the config asks explicitly for the swap to DeepSpeedCPUAdam)."""
    device = _offload_device(config)
    if device == "none":
        return
    force = config.get("zero_force_ds_cpu_optimizer")
    if force is True or (isinstance(force, str) and force.lower() == "true"):
        raise ValueError(
            f'DeepSpeed config sets "zero_force_ds_cpu_optimizer": true with optimizer offload to {device!r}: '
            "accelerate would replace the Lookahead by DeepSpeedCPUAdam. Set \"zero_force_ds_cpu_optimizer\": "
            "false (Lookahead(DeepSpeedCPUAdam(...)) keeps the fast CPU kernel) or turn optimizer offload off"
        )
    if force is None:
        # Unset means true to accelerate and DeepSpeed, which would drop the wrapper.
        config["zero_force_ds_cpu_optimizer"] = False
        warnings.warn(
            f'{caller} set "zero_force_ds_cpu_optimizer": false so that accelerate '
            "keeps the Lookahead under optimizer offload (it would replace it by DeepSpeedCPUAdam). For the "
            "fast CPU step, wrap DeepSpeedCPUAdam: Lookahead(DeepSpeedCPUAdam(params), ...)",
            UserWarning,
            stacklevel=stacklevel,
        )


@contextmanager
def _initialize_with_mpu(mpu: Any) -> Iterator[None]:
    """During ``accelerator.prepare``: accelerate's ``deepspeed.initialize`` call gets ``mpu=mpu``.

    accelerate passes no ``mpu`` of its own (except for its sequence parallelism, refused here), and
    fills ``train_batch_size`` for all processes; with the node as DeepSpeed's data-parallel group
    it is one node's batch, so an accelerate-filled value (micro x accumulation x processes) is
    rescaled to the node. ``deepspeed.initialize`` is restored when the block ends.
    """
    if mpu is None:
        yield
        return
    import deepspeed
    import torch.distributed as dist

    original = deepspeed.initialize

    def initialize(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("mpu") is not None:
            raise ValueError('"lookahead.local_sgd": {"across": "nodes"} cannot be combined with accelerate\'s '
                             "DeepSpeed sequence parallelism (both need DeepSpeed's mpu)")
        kwargs["mpu"] = mpu
        key = "config_params" if "config_params" in kwargs else "config"
        cfg = kwargs.get(key)
        if isinstance(cfg, dict) and isinstance(cfg.get("train_batch_size"), int):
            per = cfg.get("train_micro_batch_size_per_gpu", 0) * cfg.get("gradient_accumulation_steps", 1)
            if isinstance(per, int) and cfg["train_batch_size"] == per * dist.get_world_size():
                kwargs[key] = {**cfg, "train_batch_size": per * mpu.get_data_parallel_world_size()}
        return original(*args, **kwargs)

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = original


def lookahead_config_from(config: dict[str, Any]) -> dict[str, Any] | None:
    """The validated ``"lookahead"`` block of a DeepSpeed config dict, or None.

    A top-level key that looks like a misspelled ``"lookahead"`` (``"lookahaed"``, ``"LookAhead"``,
    ...) is a ``ValueError`` naming it, with or without the block.
    """
    from .deepspeed.config import _check_block_name

    _check_block_name(config)
    return parse_lookahead_block(config["lookahead"]) if "lookahead" in config else None


def prepare(accelerator: Any, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)``, keeping every Lookahead (see module notes).

    Returns exactly what ``accelerator.prepare`` returns (one object, or a tuple in order).
    """
    from accelerate.utils import DistributedType

    objs = list(objects)
    plugin = _deepspeed_plugin(accelerator)
    mpu = None
    if plugin is not None:
        mpu = _prepare_deepspeed_config(plugin, objs)
    elif accelerator.distributed_type == DistributedType.FSDP and any(
            isinstance(o, Lookahead) and o.local_sgd is not None for o in objs):
        raise ValueError("Lookahead local-SGD mode under accelerate's FSDP plugin is not supported; "
                         "use the DDP or DeepSpeed (stage 0) configs, or local_sgd=False")
    lookaheads = [o for o in objs if isinstance(o, Lookahead)]
    with _initialize_with_mpu(mpu):
        out = accelerator.prepare(*objs, **kwargs)
    prepared = list(out) if isinstance(out, tuple) else [out]
    _check_kept(accelerator, lookaheads, prepared)
    if mpu is not None:  # across nodes: save_state/load_state write and read <dir>/node<i>
        from .deepspeed.node_checkpoints import _node_checkpoints

        wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None:
            _node_checkpoints(wrapped.engine)
    if mpu is None and any(la.local_sgd is not None for la in lookaheads):  # across nodes: the node reduces
        _stop_gradient_allreduce(accelerator, prepared)
    return out


def _check_kept(accelerator: Any, lookaheads: list[Lookahead], prepared: list[Any]) -> None:
    if not lookaheads:
        return
    stepped: list[Any] = []
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is not None:
        stepped.append(getattr(engine.engine, "basic_optimizer", None))
    else:
        for o in prepared:  # an AcceleratedOptimizer around the Lookahead, or the Lookahead itself
            if isinstance(o, torch.optim.Optimizer):
                stepped += [o, getattr(o, "optimizer", None)]
    for la in lookaheads:
        if not any(s is la for s in stepped):
            raise RuntimeError(
                "lookahead_dist.accelerate.prepare: the host replaced the Lookahead optimizer (it now steps "
                f"{[type(s).__name__ for s in stepped]}); Lookahead would silently not run"
            )


def _stop_gradient_allreduce(accelerator: Any, prepared: list[Any]) -> None:
    """Local-SGD mode: the Lookahead sync is the only communication (module notes)."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        # The engine's own switch (DeepSpeed turns it off for 1-bit optimizers): stage 0 reduces in backward only.
        wrapped.engine.enable_backward_allreduce = False
        return
    for obj in prepared:
        if isinstance(obj, DistributedDataParallel):
            # What DDP.no_sync() sets for one block, here for good: forward passes do not arm the reducer.
            obj.require_backward_grad_sync = False
