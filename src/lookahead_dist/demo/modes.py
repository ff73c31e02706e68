"""The four ways the demo trains the model, each behind the same small interface.

=========  ==============================================================================
mode       what runs
=========  ==============================================================================
ddp        ``DistributedDataParallel`` + (``Lookahead``) ``AdamW``; full slow weights per rank
zero2      DeepSpeed ZeRO-2 with the (``Lookahead``) ``AdamW`` as client optimizer; the slow
           weights live in the flat fp32 partitions, 1/N per rank
fsdp2      ``fully_shard`` per block and at the root + (``Lookahead``) ``AdamW``; DTensor
           shards, 1/N per rank
local-sgd  plain module on each rank, ``Lookahead(AdamW, local_sgd=True)``: no per-step
           gradient all-reduce, the fast weights are averaged every k steps (options: outer
           momentum, sharded slow weights, bf16 on the wire; hierarchical: DDP inside a node)
post-local-sgd  baseline: torch's ``PostLocalSGDOptimizer`` (AdamW, ``PeriodicModelAverager``
           every k steps, DDP with ``post_localSGD_hook`` from step 0, subgroups of one rank)
accelerate-local-sgd  baseline: accelerate's ``LocalSGD`` (AdamW inside ``no_sync``, parameters
           averaged one tensor at a time every k steps)
=========  ==============================================================================

Every mode sees the same global batches (see :mod:`.data`), so ddp, zero2 and fsdp2 with the
same optimizer follow the same trajectory up to reduction order.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..lookahead import Lookahead
from .commcount import counting_ddp_hook

__all__ = ["MODES", "ModeUnavailable", "Runner", "build_runner", "local_sgd_supported", "mode_unavailable_reason"]

MODES = ("ddp", "zero2", "fsdp2", "local-sgd", "post-local-sgd", "accelerate-local-sgd")


class ModeUnavailable(RuntimeError):
    """The mode cannot run in this installation (a missing package or library feature)."""


def local_sgd_supported() -> bool:
    """Whether :class:`Lookahead` accepts ``local_sgd=True`` in this version of the library."""
    try:
        return "local_sgd" in inspect.signature(Lookahead.__init__).parameters
    except (TypeError, ValueError):
        return False


def mode_unavailable_reason(mode: str, optimizer: str) -> str | None:
    """Why ``mode`` cannot run here (checked in the launching process), or None if it can."""
    if mode == "local-sgd" and not local_sgd_supported():
        return (
            "mode 'local-sgd' needs Lookahead(..., local_sgd=True), which this version of "
            "lookahead_dist does not provide yet"
        )
    if mode == "accelerate-local-sgd" and importlib.util.find_spec("accelerate") is None:
        return "mode 'accelerate-local-sgd' needs accelerate: pip install 'lookahead-dist[accelerate]'"
    if mode == "zero2" and importlib.util.find_spec("deepspeed") is None:
        return "mode 'zero2' needs DeepSpeed: pip install 'lookahead-dist[deepspeed]'"
    return None


@dataclass
class Runner:
    """One training set-up.

    Attributes:
        step: ``step(inputs, targets) -> loss`` (detached scalar): forward, backward, optimizer step.
        logits: forward for evaluation (called under ``torch.no_grad()``).
        optimizer: the optimizer the user built (the ``Lookahead`` or the plain ``AdamW``).
        train: ``train(mode: bool)`` for the module that is called.
    """

    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    train: Callable[[bool], Any]


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _optimizer(params: Any, run: Any, **lookahead_kwargs: Any) -> torch.optim.Optimizer:
    # foreach: one kernel per op over all tensors, also for DTensor shards.
    inner = torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.95), weight_decay=run.weight_decay, foreach=True)
    if run.optimizer == "adamw":
        return inner
    return Lookahead(inner, k=run.k, alpha=run.alpha, **lookahead_kwargs)


def _plain_step(module: nn.Module, opt: torch.optim.Optimizer, clip: float) -> Callable:
    params = [p for p in module.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = _loss(module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            # The global norm: DDP grads are already averaged, FSDP2 DTensor grads reduce their
            # norm over the mesh; under local SGD each rank clips its own gradient.
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        return loss.detach()

    return step


def _ddp(model: nn.Module, run: Any, device: torch.device) -> Runner:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # Gradient all-reduce through dist.all_reduce, so that the byte counter sees it.
    ddp.register_comm_hook(None, counting_ddp_hook)
    opt = _optimizer(ddp.parameters(), run)
    return Runner(step=_plain_step(ddp, opt, run.grad_clip), logits=model, optimizer=opt, train=ddp.train)


def _fsdp2(model: nn.Module, run: Any, device: torch.device) -> Runner:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _optimizer(model.parameters(), run)
    return Runner(step=_plain_step(model, opt, run.grad_clip), logits=model, optimizer=opt, train=model.train)


def _zero2(model: nn.Module, run: Any, device: torch.device) -> Runner:
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probing
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    from lookahead_dist.deepspeed import skip_cpu_shm_kernel

    skip_cpu_shm_kernel()  # inference-only kernel; its JIT build takes minutes on a CPU machine
    world = dist.get_world_size()
    opt = _optimizer(model.parameters(), run)
    config = {
        "train_batch_size": run.batch_size,
        "train_micro_batch_size_per_gpu": run.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        # The client optimizer is a Lookahead, which DeepSpeed does not know by name.
        "zero_allow_untested_optimizer": True,
        # Set explicitly: DeepSpeed's own default (1.0) would otherwise differ from the other modes.
        "gradient_clipping": run.grad_clip,
        "steps_per_print": 1 << 30,
    }
    # Expected noise for this set-up: DeepSpeed warns about any client optimizer it does not know
    # ("untested optimizer") and still calls torch's deprecated all_gather_into_tensor.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    finally:
        deepspeed.utils.logger.setLevel(logging.WARNING)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = _loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return Runner(step=step, logits=engine, optimizer=opt, train=engine.train)


def _local_sgd(model: nn.Module, run: Any, device: torch.device) -> Runner:
    if not local_sgd_supported():
        raise ModeUnavailable(mode_unavailable_reason("local-sgd", run.optimizer))
    from ..local_sgd import LocalSGDOptions

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    opts = dict(outer_momentum=run.outer_momentum, nesterov=run.nesterov, sharded=run.sharded,
                comm_dtype=dtypes[run.comm_dtype])
    module: nn.Module = model
    if run.hierarchical:
        # Ranks of one node (consecutive, LOCAL_WORLD_SIZE of them) are DDP replicas, synced every
        # step over the node's fast local link; local SGD runs across nodes only.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.nn.parallel import DistributedDataParallel as DDP

        world = dist.get_world_size()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if per_node < 1 or world % per_node:
            raise ValueError(f"hierarchical: world size {world} is not a multiple of LOCAL_WORLD_SIZE {per_node}")
        mesh = init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("inter", "intra"))
        intra = mesh.get_group("intra")
        module = DDP(model, process_group=intra, device_ids=[device.index] if device.type == "cuda" else None)
        module.register_comm_hook(intra, counting_ddp_hook)
        options = LocalSGDOptions.from_mesh(mesh, across="inter", within="intra", module=module, **opts)
    else:
        options = LocalSGDOptions(module=model, **opts)
    # Ranks start from the same weights: same seed here, and Lookahead(local_sgd=...) aligns them.
    opt = _optimizer(module.parameters(), run, local_sgd=options)
    return Runner(step=_plain_step(module, opt, run.grad_clip), logits=model, optimizer=opt, train=module.train)


def _post_local_sgd(model: nn.Module, run: Any, device: torch.device) -> Runner:
    """torch's own local SGD: ``PostLocalSGDOptimizer`` over AdamW, averaging every k steps."""
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # Local phase from step 0: the hook all-reduces inside subgroups of one rank (no traffic).
    own, _ = dist.new_subgroups(group_size=1)
    ddp.register_comm_hook(PostLocalSGDState(process_group=None, subgroup=own, start_localSGD_iter=0),
                           post_localSGD_hook)
    inner = _optimizer(ddp.parameters(), run)
    opt = PostLocalSGDOptimizer(optim=inner, averager=PeriodicModelAverager(period=run.k, warmup_steps=0))
    return Runner(step=_plain_step(ddp, opt, run.grad_clip), logits=model, optimizer=inner, train=ddp.train)


def _accelerate_local_sgd(model: nn.Module, run: Any, device: torch.device) -> Runner:
    """accelerate's ``LocalSGD``: DDP inside ``no_sync``, parameters averaged every k steps."""
    from accelerate import Accelerator
    from accelerate.local_sgd import LocalSGD

    accelerator = Accelerator(cpu=device.type == "cpu")
    inner = _optimizer(model.parameters(), run)
    ddp, opt = accelerator.prepare(model, inner)
    local = LocalSGD(accelerator=accelerator, model=ddp, local_sgd_steps=run.k, enabled=True)
    local.__enter__()  # enters ddp.no_sync() for the whole run (the `with` form of its docs)
    base = _plain_step(ddp, opt, run.grad_clip)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = base(x, y)
        local.step()
        return loss

    return Runner(step=step, logits=model, optimizer=inner, train=ddp.train)


_BUILDERS = {"ddp": _ddp, "zero2": _zero2, "fsdp2": _fsdp2, "local-sgd": _local_sgd,
             "post-local-sgd": _post_local_sgd, "accelerate-local-sgd": _accelerate_local_sgd}


def build_runner(model: nn.Module, run: Any, device: torch.device) -> Runner:
    """Wrap ``model`` (already on ``device``) for ``run.mode`` and build its optimizer."""
    return _BUILDERS[run.mode](model, run, device)
