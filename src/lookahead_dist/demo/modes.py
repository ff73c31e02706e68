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
torchft-diloco  baseline: torchft's ``DiLoCo`` (AdamW inner, outer SGD with lr = alpha; the
           model cut into F fragments, streaming with the same k, F and tau as local-sgd); each
           rank is a replica group with its own ``Manager`` (gloo), lighthouse at
           ``$TORCHFT_LIGHTHOUSE``
traffic-only  benchmark control: ``Lookahead(AdamW, local_sgd=True)`` that never syncs, beside a
           bare asynchronous all-reduce of a fragment's wire bytes every k / F steps, waited
           for tau steps later: local SGD's traffic without its CPU work (no packing,
           quantisation or outer step); see ``_traffic_only``
=========  ==============================================================================

Every mode sees the same global batches (see :mod:`.data`), so ddp, zero2 and fsdp2 with the
same optimizer follow the same trajectory up to reduction order.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import Lookahead, LocalSGDOptions
from .config import MODES
from .model import lm_loss

__all__ = ["MODES", "Runner", "build_runner", "mode_unavailable_reason"]


def mode_unavailable_reason(mode: str, optimizer: str) -> str | None:
    """Why ``mode`` cannot run here (checked in the launching process), or None if it can."""
    if mode == "accelerate-local-sgd" and importlib.util.find_spec("accelerate") is None:
        return "mode 'accelerate-local-sgd' needs accelerate: pip install 'lookahead-dist[accelerate]'"
    if mode == "zero2" and importlib.util.find_spec("deepspeed") is None:
        return "mode 'zero2' needs DeepSpeed: pip install 'lookahead-dist[deepspeed]'"
    if mode == "torchft-diloco":
        if importlib.util.find_spec("torchft") is None:
            return "mode 'torchft-diloco' needs torchft: pip install 'lookahead-dist[ft]'"
        if not os.environ.get("TORCHFT_LIGHTHOUSE"):
            return ("mode 'torchft-diloco' needs a torchft lighthouse: start `torchft_lighthouse --min_replicas N "
                    "--bind [::]:29510` and set TORCHFT_LIGHTHOUSE=http://HOST:29510 for every rank")
    return None


@dataclass
class Runner:
    """One training set-up.

    Attributes:
        step: ``step(inputs, targets) -> loss`` (detached scalar): forward, backward, optimizer step.
        logits: forward for evaluation (called under ``torch.no_grad()``).
        optimizer: the optimizer the user built (the ``Lookahead`` or the plain ``AdamW``).
        train: ``train(mode: bool)`` for the module that is called.
        finish: called once after the last step, inside the timed loop: waits for communication
            still in flight (a streaming fragment sent at the last step), so that its time counts.
        waited: host seconds spent blocked waiting for the sync's collectives so far (the exposed
            communication), where the set-up measures it (local SGD, the traffic-only control).
    """

    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    train: Callable[[bool], Any]
    finish: Callable[[], None] | None = None
    waited: Callable[[], float] | None = None


def _optimizer(params: Any, run: Any, **lookahead_kwargs: Any) -> torch.optim.Optimizer:
    # foreach: one kernel per op over all tensors, also for DTensor shards.
    inner = torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.95), weight_decay=run.weight_decay, foreach=True)
    if run.optimizer == "adamw":
        return inner
    return Lookahead(inner, k=run.k, alpha=run.alpha, **lookahead_kwargs)


def _plain_step(module: nn.Module, opt: torch.optim.Optimizer, clip: float) -> Callable:
    params = [p for p in module.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(module(x), y)
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
        loss = lm_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return Runner(step=step, logits=engine, optimizer=opt, train=engine.train)


def _local_sgd(model: nn.Module, run: Any, device: torch.device) -> Runner:
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": "int8", "int4": "int4",
              "int2": "int2"}
    opts = dict(outer_momentum=run.outer_momentum, nesterov=run.nesterov, sharded=run.sharded,
                comm_dtype=dtypes[run.comm_dtype])
    # Streaming and quantisation options, passed only when set (so a library without them still runs
    # the plain modes).
    for name, default in (("num_fragments", 1), ("fragment_sync_delay", 0), ("fragment_update_alpha", 0.0),
                          ("quant_block_size", 512), ("error_feedback", True), ("eager_update", False),
                          ("topk_fraction", None), ("fused_kernels", False)):
        if getattr(run, name) != default:
            opts[name] = getattr(run, name)
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
        options = LocalSGDOptions.from_mesh(mesh, across="inter", within="intra", module=module, **opts)
    else:
        options = LocalSGDOptions(module=model, **opts)
    # Ranks start from the same weights: same seed here, and Lookahead(local_sgd=...) aligns them.
    opt = _optimizer(module.parameters(), run, local_sgd=options)

    def finish() -> None:
        strategy = getattr(opt, "local_sgd", None)
        if strategy is not None and hasattr(strategy, "flush"):
            strategy.flush(opt)  # waits for a fragment still in flight; applies nothing

    def waited() -> float:
        return opt.local_sgd.stats.wait_seconds

    step = _plain_step(module, opt, run.grad_clip)
    return Runner(step=step, logits=model, optimizer=opt, train=module.train, finish=finish, waited=waited)


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


def split_modules(model: nn.Module, num_fragments: int) -> list[nn.Module]:
    """``model`` cut into ``num_fragments`` modules of about equal bytes, in parameter order.

    The pieces are the model's direct parameters and children, a ``ModuleList`` counted child by
    child; piece i goes to fragment ``floor(F * m_i / B)`` with ``m_i`` the byte offset of its
    midpoint and ``B`` the total (the rule of Note [Fragments] in
    :mod:`lookahead_dist.sync.streaming`, at module granularity). Each fragment is a container that
    shares the model's parameters (no copies); a parameter is in exactly one fragment.
    """
    pieces: list[tuple[str, Any]] = []
    for name, p in model.named_parameters(recurse=False):
        pieces.append((name, p))
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            pieces += [(f"{name}_{i}", c) for i, c in enumerate(child)]
        else:
            pieces.append((name, child))
    sizes = [p.numel() * p.element_size() if isinstance(p, nn.Parameter)
             else sum(q.numel() * q.element_size() for q in p.parameters()) for _, p in pieces]
    total = sum(sizes)
    frags = [nn.Module() for _ in range(num_fragments)]
    offset = 0
    for (name, piece), size in zip(pieces, sizes):
        f = min(num_fragments - 1, int(num_fragments * (offset + size / 2) / max(total, 1)))
        offset += size
        if isinstance(piece, nn.Parameter):
            frags[f].register_parameter(name, piece)
        else:
            frags[f].add_module(name, piece)
    return frags


def _torchft_diloco(model: nn.Module, run: Any, device: torch.device) -> Runner:
    """torchft's ``DiLoCo``: each rank is a replica group with its own ``Manager``; AdamW inner steps,
    the fragments' pseudo-gradients averaged through the manager, outer SGD with lr = alpha (momentum
    and Nesterov from the flags), so the default equals Lookahead's slow step."""
    import socket
    from datetime import timedelta

    from torchft import Manager
    from torchft.local_sgd import DiLoCo

    lighthouse = os.environ.get("TORCHFT_LIGHTHOUSE")
    if not lighthouse:
        raise RuntimeError(mode_unavailable_reason("torchft-diloco", run.optimizer))
    if device.type == "cuda":
        from torchft import ProcessGroupNCCL as FtGroup
    else:
        from torchft import ProcessGroupGloo as FtGroup
    # The address other replica groups reach this one at: the node address a cluster launcher gives
    # (tools/netcluster.py sets LKD_NODE_ADDR), localhost when every rank is on this machine.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())) == dist.get_world_size()
    addr = os.environ.get("LKD_NODE_ADDR") or ("localhost" if local else socket.gethostname())
    timeout = timedelta(seconds=120)
    # The replica group's own rendezvous store (one process per group here).
    store = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=FtGroup(timeout=timeout), load_state_dict=None, state_dict=None, min_replica_size=1,
                      use_async_quorum=False, timeout=timeout, quorum_timeout=timedelta(seconds=600),
                      connect_timeout=timeout, rank=0, world_size=1, store_addr=addr, store_port=store.port,
                      lighthouse_addr=lighthouse, replica_id=f"lkd_rank{dist.get_rank()}", hostname=addr,
                      init_sync=False)  # same seed on every rank: identical initial weights
    manager.register_state_dict_fn("model", model.load_state_dict, model.state_dict)
    inner = _optimizer(model.parameters(), run)
    frags = split_modules(model, run.num_fragments)
    outer = [torch.optim.SGD(f.parameters(), lr=run.alpha, momentum=run.outer_momentum, nesterov=run.nesterov)
             for f in frags]
    diloco = DiLoCo(manager, frags, inner, outer, sync_every=run.k, backup_device=device, pin_memory=False,
                    use_bucketization=True, fragment_sync_delay=run.fragment_sync_delay,
                    fragment_update_alpha=run.fragment_update_alpha)
    diloco.__enter__()  # registers its optimizer hooks for the whole run (the `with` form of its docs)
    # Nothing is in flight after a step that is a multiple of k / F (DiLoCo waits there), so no
    # `finish`; the manager's server threads stop at exit.
    def close() -> None:
        manager.shutdown(wait=False)
        del store_ref[:]

    store_ref = [store]  # the store's server lives as long as this object: keep it until exit
    atexit.register(close)
    return Runner(step=_plain_step(model, inner, run.grad_clip), logits=model, optimizer=inner, train=model.train)


def wire_bytes_per_fragment(numel: int, comm_dtype: str, n: int, *, topk_fraction: float | None = None,
                            block: int = 512) -> tuple[int, torch.dtype]:
    """(elements, dtype) of the bare all-reduce that puts one fragment's wire bytes on the link
    per rank, as local SGD sends them: a dense all-reduce of the fragment in fp32/bf16; the
    quantised reduce's all-to-all plus all-gather of N segments (a uint8 all-reduce of N segments
    moves the same 2 (N-1) segments per rank in a ring); the sparse all-gather of N payloads
    ((N-1) payloads per rank, as a uint8 all-reduce of N/2 payloads)."""
    if comm_dtype in ("fp32", "bf16", "fp16"):
        return numel, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[comm_dtype]
    from .. import _quant, _sparse

    bits = int(comm_dtype[3:])
    if topk_fraction is not None:
        return max(1, n * _sparse.sparse_nbytes(numel, fraction=topk_fraction, bits=bits) // 2), torch.uint8
    chunk = _quant.reduce_chunk_numel(numel, n, block_size=block)
    seg = chunk * bits // 8 + chunk // block * 4
    return n * seg, torch.uint8


def _traffic_only(model: nn.Module, run: Any, device: torch.device) -> Runner:
    """The traffic-only control of the streaming benchmark (issue 16): what local SGD's bytes cost on
    the link and in gloo's threads when none of the sync's own CPU work runs. Lookahead keeps its
    local-SGD step (k so large that it never syncs); every k / F steps a bare asynchronous all-reduce
    of one fragment's wire bytes (:func:`wire_bytes_per_fragment`) starts on its own group and is
    waited for tau steps later (at once when tau = 0)."""
    opt = _optimizer(model.parameters(), run, local_sgd=LocalSGDOptions(module=model))
    for group in opt.param_groups:
        group["lookahead_k"] = 10**9  # Lookahead's own step, never a sync
    group_ = dist.new_group(list(range(dist.get_world_size())))  # collective: the same point on every rank
    numel = sum(p.numel() for p in model.parameters()) // run.num_fragments
    elems, dtype = wire_bytes_per_fragment(numel, run.comm_dtype, dist.get_world_size(),
                                           topk_fraction=run.topk_fraction, block=run.quant_block_size)
    payload = torch.zeros(elems, dtype=dtype, device=device)
    stride, tau = run.k // run.num_fragments, run.fragment_sync_delay
    pending: list[tuple[int, Any]] = []  # (due count, work)
    count = [0]
    waited = [0.0]  # host seconds blocked in the waits, as CommStats.wait_seconds of local SGD
    base = _plain_step(model, opt, run.grad_clip)

    def wait(work: Any) -> None:
        start = time.perf_counter()
        work.wait()
        waited[0] += time.perf_counter() - start

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = base(x, y)
        count[0] += 1
        while pending and pending[0][0] <= count[0]:
            wait(pending.pop(0)[1])
        if count[0] % stride == 0:
            work = dist.all_reduce(payload, group=group_, async_op=True)
            if tau == 0:
                wait(work)
            else:
                pending.append((count[0] + tau, work))
        return loss

    def finish() -> None:
        while pending:
            wait(pending.pop(0)[1])

    return Runner(step=step, logits=model, optimizer=opt, train=model.train, finish=finish,
                  waited=lambda: waited[0])


_BUILDERS = {"ddp": _ddp, "zero2": _zero2, "fsdp2": _fsdp2, "local-sgd": _local_sgd,
             "post-local-sgd": _post_local_sgd, "accelerate-local-sgd": _accelerate_local_sgd,
             "torchft-diloco": _torchft_diloco, "traffic-only": _traffic_only}


def build_runner(model: nn.Module, run: Any, device: torch.device) -> Runner:
    """Wrap ``model`` (already on ``device``) for ``run.mode`` and build its optimizer."""
    return _BUILDERS[run.mode](model, run, device)
