"""DeepSpeed adapter: a ``"lookahead"`` config block, slow weights in the module, universal checkpoints.

Two ways in, both under ZeRO-1/2/3 (fp32 or bf16, optimizer offload included):

- a :class:`~lookahead_dist.Lookahead` passed as the client optimizer to ``deepspeed.initialize``
  (config: :func:`lookahead_config`);
- :func:`initialize`, a drop-in for ``deepspeed.initialize`` that reads a ``"lookahead"`` block and
  puts the Lookahead around the optimizer DeepSpeed itself builds (:func:`wrap_engine`).

With ``"local_sgd": {"across": "nodes", ...}`` in the block, ZeRO runs inside each node and the
nodes' replicas are averaged every k steps (Note [Local SGD across nodes]: :func:`node_groups`,
:class:`NodeMPU`). Then :func:`use_slow_weights` / :func:`sync_now` act on the module's weights, and
:func:`convert_to_universal` / :func:`load_checkpoint` resume at another world size with the slow
weights. DeepSpeed is imported lazily (``import lookahead_dist.deepspeed`` does not import it).

How it fits (Note [Where slow weights live] in :mod:`lookahead_dist.lookahead`): DeepSpeed hands
the optimizer it steps its own fp32 master tensors -- one flat partition per param group (ZeRO-1/2,
and the bf16 ZeRO-1 optimizer), or one flat partition per sub-group, set into ``params`` only
around each ``step()`` call (ZeRO-3). The slow weight of such a tensor is an fp32 tensor of the
same shape in the inner optimizer's state, so each rank keeps ``total / N`` slow weights (plus
DeepSpeed's alignment padding) beside Adam's moments, syncs them in place with no communication,
and DeepSpeed's ``save_checkpoint``/``load_checkpoint`` carry them with the optimizer state.

What DeepSpeed needs in its config for a *client* Lookahead: ``"zero_allow_untested_optimizer":
true`` (ZeRO accepts only a fixed list of optimizer types otherwise) and, with
``offload_optimizer``, ``"zero_force_ds_cpu_optimizer": false`` (else DeepSpeed refuses any
client optimizer that is not DeepSpeedCPUAdam; ``Lookahead(DeepSpeedCPUAdam(...))`` is fine).
:func:`lookahead_config` sets both. :func:`initialize` needs neither: DeepSpeed sees its own optimizer.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .lookahead import ALPHA_KEY, K_KEY, SLOW_KEY, STEP_KEY, Lookahead, check_alpha, check_k, find_lookahead
from .memory import optimizer_state_bytes

__all__ = [
    "find_lookahead",
    "parse_lookahead_block",
    "master_partitions",
    "DeepSpeedStateBytes",
    "state_bytes",
    "full_slow_weight",
    "lookahead_config",
    "LOOKAHEAD_CONFIG_KEY",
    "initialize",
    "wrap_engine",
    "use_slow_weights",
    "sync_now",
    "convert_to_universal",
    "load_checkpoint",
    "UNIVERSAL_GROUPS_KEY",
    "skip_cpu_shm_kernel",
    "NodeGroups",
    "NodeMPU",
    "node_groups",
]

#: Top-level DeepSpeed config key of the Lookahead block read by :func:`initialize`.
LOOKAHEAD_CONFIG_KEY = "lookahead"
_BLOCK_KEYS = ("k", "alpha", "pullback", "slow_dtype", "local_sgd")


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
    la = find_lookahead(engine)
    if la is None:
        raise TypeError("the engine's optimizer is not a lookahead_dist.Lookahead")
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

    la = find_lookahead(engine)
    if la is None:
        raise TypeError("the engine's optimizer is not a lookahead_dist.Lookahead")
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


def lookahead_config(config: dict[str, Any], *, offload_client_optimizer: bool = True) -> dict[str, Any]:
    """A copy of a DeepSpeed config with what a client Lookahead needs set (unless set already).

    - ``zero_allow_untested_optimizer: true``: ZeRO otherwise rejects any optimizer type outside
      its list (a ``Lookahead`` is not on it, whatever it wraps).
    - with ``offload_optimizer`` and ``offload_client_optimizer``: ``zero_force_ds_cpu_optimizer:
      false``, so that DeepSpeed keeps the client Lookahead (around ``DeepSpeedCPUAdam`` or a
      torch optimizer) instead of refusing it.
    """
    if not isinstance(config, dict):
        raise TypeError(f"DeepSpeed config must be a dict here, got {type(config).__name__}")
    out = dict(config)
    zero = out.get("zero_optimization") or {}
    if zero.get("stage", 0):
        out.setdefault("zero_allow_untested_optimizer", True)
    offload = zero.get("offload_optimizer") or {}
    if offload_client_optimizer and offload.get("device", "none") not in ("none", None):
        out.setdefault("zero_force_ds_cpu_optimizer", False)
    return out


def parse_lookahead_block(block: Any) -> dict[str, Any]:
    """The checked ``"lookahead"`` block of a DeepSpeed config (also read by :mod:`lookahead_dist.accelerate`).

    Imports no DeepSpeed; raises TypeError/ValueError naming the bad key or value.
    """
    if not isinstance(block, dict):
        raise TypeError(f'DeepSpeed config "{LOOKAHEAD_CONFIG_KEY}" must be a JSON object, got {block!r}')
    unknown = sorted(set(block) - set(_BLOCK_KEYS), key=str)
    if unknown:
        raise ValueError(
            f'unknown key(s) {unknown} in DeepSpeed config "{LOOKAHEAD_CONFIG_KEY}"; allowed: {list(_BLOCK_KEYS)}'
            + _did_you_mean(unknown, _BLOCK_KEYS)
        )
    out: dict[str, Any] = {
        "k": check_k(block.get("k", 5), f"{LOOKAHEAD_CONFIG_KEY}.k"),
        "alpha": check_alpha(block.get("alpha", 0.5), f"{LOOKAHEAD_CONFIG_KEY}.alpha"),
        "pullback": block.get("pullback", "none"),
    }
    from .lookahead import PULLBACK_MODES

    if out["pullback"] not in PULLBACK_MODES:
        raise ValueError(f'"{LOOKAHEAD_CONFIG_KEY}.pullback" must be one of {PULLBACK_MODES}, got {out["pullback"]!r}')
    slow_dtype = block.get("slow_dtype")
    dtypes = {None: None, "fp32": torch.float32, "float32": torch.float32}
    if slow_dtype not in dtypes:
        raise ValueError(f'"{LOOKAHEAD_CONFIG_KEY}.slow_dtype" must be "fp32" or null, got {slow_dtype!r}')
    out["slow_dtype"] = dtypes[slow_dtype]
    out["local_sgd"] = _parse_local_sgd(block.get("local_sgd", False))
    if isinstance(out["local_sgd"], dict):  # the fragment schedule needs k: checked now, not at the first step
        from .sync import streaming

        options = out["local_sgd"]["options"]
        try:
            streaming.check_schedule(out["k"], options.num_fragments, options.fragment_sync_delay,
                                     f'the "{LOOKAHEAD_CONFIG_KEY}" block')
        except ValueError as e:
            raise ValueError(f'"{LOOKAHEAD_CONFIG_KEY}.local_sgd" does not fit "{LOOKAHEAD_CONFIG_KEY}.k" = {out["k"]}: {e}') from e
    return out


def _normalized(key: str) -> str:
    return "".join(c for c in key.lower() if c not in " _-\t")


def _did_you_mean(unknown: list[Any], allowed: tuple[str, ...]) -> str:
    """`` (did you mean "k"?)`` for the unknown keys close to an allowed one (case, ``_``/``-`` ignored), or ""."""
    by_norm = {_normalized(a): a for a in allowed}
    hints = []
    for key in unknown:
        if not isinstance(key, str):
            continue
        close = difflib.get_close_matches(_normalized(key), list(by_norm), n=1, cutoff=0.75)
        if close:
            hints.append(f"{key!r} -> {by_norm[close[0]]!r}")
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def _check_block_name(config: dict[str, Any]) -> None:
    """Raise if a top-level key of a DeepSpeed config looks like a misspelled ``"lookahead"``.

    DeepSpeed ignores top-level keys it does not know, so ``"lookahaed"``, ``"LookAhead"``,
    ``"look_ahead"`` or ``"lookahead "`` would train the plain optimizer without a word. Compared
    case-insensitively, with spaces, ``_`` and ``-`` ignored, by :mod:`difflib` similarity (0.8).
    Called by :func:`initialize`, :func:`lookahead_dist.accelerate.prepare` and
    :class:`lookahead_dist.hf.LookaheadTrainer`, with or without a ``"lookahead"`` block.
    """
    if not isinstance(config, dict):
        return
    want = _normalized(LOOKAHEAD_CONFIG_KEY)
    for key in config:
        if key == LOOKAHEAD_CONFIG_KEY or not isinstance(key, str):
            continue
        if difflib.SequenceMatcher(None, _normalized(key), want).ratio() >= 0.8:
            raise ValueError(
                f'DeepSpeed config key {key!r} looks like a misspelled "{LOOKAHEAD_CONFIG_KEY}": DeepSpeed ignores '
                f'keys it does not know, so this run would train without Lookahead. Rename it to "{LOOKAHEAD_CONFIG_KEY}" '
                "(lower case, no spaces) or remove it"
            )


# -- local SGD across nodes (Note [Local SGD across nodes]) ---------------------------------------------
_LOCAL_SGD_KEYS = ("across", "ranks_per_node", "outer_momentum", "nesterov", "comm_dtype", "num_fragments",
                   "fragment_sync_delay", "fragment_update_alpha", "bucket_cap_mb", "timeout")
_COMM_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "int8": "int8", "int4": "int4"}


def _parse_local_sgd(value: Any) -> dict[str, Any] | bool | None:
    """The ``"local_sgd"`` entry of the block: None (off), True (local SGD over all ranks: ZeRO stage 0
    only, :func:`_check_local_sgd_stage`), or ``{"ranks_per_node", "options"}`` (across nodes)."""
    where = f'"{LOOKAHEAD_CONFIG_KEY}.local_sgd"'
    if value is False or value is None:
        return None
    if value is True:
        return True
    if not isinstance(value, dict):
        raise TypeError(f'{where} must be true, false or an object such as {{"across": "nodes"}}, got {value!r}')
    unknown = sorted(set(value) - set(_LOCAL_SGD_KEYS), key=str)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {list(_LOCAL_SGD_KEYS)}"
                         + _did_you_mean(unknown, _LOCAL_SGD_KEYS))
    if value.get("across") != "nodes":
        raise ValueError(f'{where}.across must be "nodes" (the only supported layout), got {value.get("across")!r}')
    rpn = value.get("ranks_per_node")
    if rpn is not None and (isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1):
        raise ValueError(f"{where}.ranks_per_node must be an int >= 1 or null (LOCAL_WORLD_SIZE), got {rpn!r}")
    cd = value.get("comm_dtype")
    if cd not in _COMM_DTYPES:
        raise ValueError(f"{where}.comm_dtype must be one of {list(_COMM_DTYPES)}, got {cd!r}")
    from .sync.local_sgd import LocalSGDOptions

    kwargs = {key: value[key] for key in _LOCAL_SGD_KEYS[2:] if key in value and key != "comm_dtype"}
    try:  # LocalSGDOptions checks every field (no process group needed yet)
        options = LocalSGDOptions(comm_dtype=_COMM_DTYPES[cd], init="none", **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from e
    return {"ranks_per_node": rpn, "options": options}


def _check_local_sgd_stage(stage: Any) -> None:
    """Local SGD over all ranks (``"local_sgd": true``, or a ``Lookahead(..., local_sgd=True)``) under
    DeepSpeed: ZeRO stage 0 only. One rule and one message for :func:`initialize` and
    :func:`lookahead_dist.accelerate.prepare`."""
    if stage != 0:
        raise ValueError(
            f"Lookahead local-SGD mode (\"local_sgd\": true) under DeepSpeed needs ZeRO stage 0, got stage {stage}: "
            "stages 1-3 partition the optimizer step across ranks, so no rank can keep its own fast weights. Set "
            '"zero_optimization": {"stage": 0}, or write "local_sgd": {"across": "nodes"} for ZeRO inside each node '
            'and local SGD across nodes (docs/deepspeed.md), or local_sgd false'
        )


@dataclass(frozen=True)
class NodeGroups:
    """The two process groups of ZeRO inside each node and local SGD across nodes.

    Attributes:
        intra: this rank's node (``ranks_per_node`` consecutive global ranks): DeepSpeed's
            data-parallel/ZeRO group.
        inter: rank ``r`` of every node (global ranks ``r, r + ranks_per_node, ...``): the
            local-SGD group. Its members hold the same ZeRO partition of their node's replica.
        ranks_per_node: ranks in each node.
        num_nodes: number of nodes.
        node: this rank's node index (``rank // ranks_per_node``).
    """

    intra: Any
    inter: Any
    ranks_per_node: int
    num_nodes: int
    node: int


def node_groups(ranks_per_node: int | None = None, *, inter_backend: str | None = None) -> NodeGroups:
    """Build :class:`NodeGroups` (a collective: every rank calls it, in the same order).

    ``inter_backend`` is the backend of the across-node groups (default: the world's). Under ZeRO
    optimizer offload the fp32 partitions that local SGD averages live on the CPU, which NCCL
    cannot reduce, so :func:`initialize` and accelerate's ``prepare`` build those groups on
    ``"gloo"`` there (:func:`inter_node_backend`).

    ``ranks_per_node`` defaults to the launcher's ``LOCAL_WORLD_SIZE``. Global ranks must be laid
    out node by node, as torchrun and the deepspeed launcher do (``rank = node * ranks_per_node +
    local_rank``); ``LOCAL_RANK``, where set, is checked against that when ``ranks_per_node`` is
    the launcher's ``LOCAL_WORLD_SIZE`` (a smaller explicit value splits each machine into several
    "nodes", e.g. to try the set-up on one machine). One node in all is a ``UserWarning`` saying how
    the nodes were counted: the inter-node groups have one rank each, so no local SGD runs.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("node_groups() needs torch.distributed to be initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    source = f'ranks_per_node={ranks_per_node} set in "lookahead.local_sgd"'
    if ranks_per_node is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            raise ValueError('local SGD across nodes: set "ranks_per_node" in the "lookahead.local_sgd" block, or '
                             "launch with torchrun/deepspeed, which set LOCAL_WORLD_SIZE")
        ranks_per_node = int(env)
        source = f"ranks_per_node={ranks_per_node} from the launcher's LOCAL_WORLD_SIZE={env}"
    if ranks_per_node < 1 or world % ranks_per_node:
        raise ValueError(f"local SGD across nodes: the world size {world} is not a multiple of "
                         f"ranks_per_node={ranks_per_node}")
    local = os.environ.get("LOCAL_RANK")
    launcher_node = os.environ.get("LOCAL_WORLD_SIZE") == str(ranks_per_node)  # else a deliberate split
    if launcher_node and local is not None and int(local) != rank % ranks_per_node:
        raise ValueError(
            f"local SGD across nodes: rank {rank} has LOCAL_RANK={local}, expected {rank % ranks_per_node} with "
            f"ranks_per_node={ranks_per_node}: global ranks must be numbered node by node (torchrun, deepspeed), "
            "and ranks_per_node must be the number of ranks of each node")
    nodes = world // ranks_per_node
    if nodes == 1:
        warnings.warn(
            f"local SGD across nodes found 1 node ({source}, world size {world}), so no local SGD runs: this is "
            "ZeRO over that node's ranks with the Lookahead slow step. Launch on several machines (torchrun "
            '--nnodes N, or the deepspeed launcher with a hostfile), or, to try it on one machine, set "ranks_per_node" '
            f'in the "lookahead.local_sgd" block to a divisor of {world} smaller than it (1: each rank its own "node")',
            UserWarning,
            stacklevel=2,
        )
    intra, _ = dist.new_subgroups_by_enumeration(
        [[n * ranks_per_node + i for i in range(ranks_per_node)] for n in range(nodes)])
    inter, _ = dist.new_subgroups_by_enumeration(
        [[n * ranks_per_node + i for n in range(nodes)] for i in range(ranks_per_node)], backend=inter_backend)
    return NodeGroups(intra, inter, ranks_per_node, nodes, rank // ranks_per_node)


def inter_node_backend(config: dict[str, Any]) -> str | None:
    """The backend of the across-node groups for a DeepSpeed ``config``: ``"gloo"`` under optimizer
    offload (the fp32 partitions local SGD averages are CPU tensors; NCCL reduces only CUDA ones),
    else None (the world's backend)."""
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    device = str(offload.get("device", "none") or "none").lower()
    return "gloo" if device in ("cpu", "nvme") else None


class NodeMPU:
    """DeepSpeed's ``mpu`` (model-parallel unit) whose data-parallel group is this rank's node.

    Passed as ``deepspeed.initialize(mpu=...)`` it makes the node DeepSpeed's data-parallel/ZeRO
    group (gradient reduction, partitioning, ``train_batch_size`` = one node's batch); model
    parallelism is off (a one-rank model-parallel group). DeepSpeed keeps it in
    ``deepspeed.utils.groups.mpu``, as for any ``mpu``.
    """

    def __init__(self, groups: NodeGroups) -> None:
        import torch.distributed as dist

        self.groups = groups
        # One single-rank group per rank, every rank creating all of them in the same order: a plain
        # collective (no use_local_synchronization, which is a blocking split of the world
        # communicator when init_process_group got device_id=, and unsupported under TorchComms).
        self._mp, _ = dist.new_subgroups_by_enumeration([[r] for r in range(dist.get_world_size())])

    def get_data_parallel_group(self) -> Any:
        return self.groups.intra

    def get_data_parallel_world_size(self) -> int:
        return self.groups.ranks_per_node

    def get_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.groups.intra)

    def get_data_parallel_group_ranks(self) -> list[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(self.groups.intra)

    def get_model_parallel_group(self) -> Any:
        return self._mp

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


@torch.no_grad()
def _align_across_world(model: torch.nn.Module) -> None:
    """Broadcast the module's parameters and buffers from global rank 0 (before DeepSpeed sees them).

    DeepSpeed broadcasts inside its data-parallel group only (here: the node); local SGD needs every
    node to start from the same weights (Note [Same starting weights] in :mod:`~lookahead_dist.sync.local_sgd`).
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())  # where the backend communicates
    tensors = [t.data for t in list(model.parameters()) + list(model.buffers()) if not hasattr(t, "ds_id")]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        ts = by_dtype[dtype]
        flat = torch.cat([t.reshape(-1).to(device) for t in ts])
        dist.broadcast(flat, src=0)
        for t, v in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(v.view_as(t))


def _load_config(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    if isinstance(config, str):
        import json

        with open(config) as f:
            return json.load(f)
    return None  # a DeepSpeedConfig object or anything else: left to DeepSpeed


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


# -- wrapping the optimizer an engine steps ---------------------------------------------------------
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
    ranks that hold the same partition of replicas trained apart (Note [Local SGD across nodes]),
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


def _refuse_unfinished_universal_load(optimizer: Lookahead, args: Any, kwargs: Any) -> None:
    # A universal checkpoint from convert_to_universal loaded by engine.load_checkpoint alone leaves
    # its Lookahead entry in the param groups (Note [Universal checkpoints]): the cycle positions
    # (and under ZeRO-3 the slow weights) would be lost without a word.
    for group in optimizer.param_groups:
        if UNIVERSAL_GROUPS_KEY in group:
            raise RuntimeError(
                "a universal checkpoint made by lookahead_dist.deepspeed.convert_to_universal was loaded with "
                "engine.load_checkpoint, which does not restore the Lookahead cycle positions (nor, under ZeRO-3, "
                "the slow weights): load it with lookahead_dist.deepspeed.load_checkpoint(engine, load_dir, tag)"
            )


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
    _node_checkpoints(engine)  # across nodes: checkpoints in <dir>/node<i> (Note [Checkpoints across nodes])
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


# DeepSpeed's JIT-compiled optimizer ops: op name -> builder class, as the accelerator names them.
_OP_BUILDERS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder", "cpu_adagrad": "CPUAdagradBuilder",
                "cpu_lion": "CPULionBuilder", "fused_lion": "FusedLionBuilder", "fused_lamb": "FusedLambBuilder"}
_ops_noticed: set[str] = set()


def _op_for_optimizer(config: dict[str, Any]) -> str | None:
    """The compiled op the config's ``"optimizer"`` block makes DeepSpeed load (its engine's choice), or None."""
    block = config.get("optimizer")
    if not isinstance(block, dict):
        return None
    name = str(block.get("type", "")).lower()
    params = block.get("params") or {}
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    cpu = str(offload.get("device", "none") or "none").lower() in ("cpu", "nvme")
    if name in ("adam", "adamw"):
        return None if params.get("torch_adam") else ("cpu_adam" if cpu else "fused_adam")
    if name == "adagrad":
        return "cpu_adagrad" if cpu else None
    if name == "lion":
        return "cpu_lion" if cpu else "fused_lion"
    if name == "lamb":
        return "fused_lamb"
    return None


def _op_is_built(name: str) -> bool | None:
    """True: the op loads without compiling (prebuilt, or in the JIT cache); False: it would compile;
    None: no build of it for this accelerator (DeepSpeed reports that itself)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(name):
        return True
    builder = get_accelerator().create_op_builder(_OP_BUILDERS[name])
    if builder is None or not builder.is_compatible(verbose=False):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(getattr(builder, "name", name), verbose=False)
    except Exception:  # noqa: BLE001 - a torch-internal helper: without it, assume nothing is built
        return False
    return os.path.exists(os.path.join(folder, f"{getattr(builder, 'name', name)}.so"))


def _notice_op_build(config: dict[str, Any]) -> str | None:
    """One line on stderr (first local rank, once per op and process) before DeepSpeed compiles an op.

    Returns the notice (also where it is not printed), or None when nothing will compile.
    """
    name = _op_for_optimizer(config)
    if name is None or name in _ops_noticed:
        return None
    try:
        built = _op_is_built(name)
    except Exception:  # noqa: BLE001 - a notice must never stop the run
        return None
    if built is not False:
        return None
    _ops_noticed.add(name)
    notice = (f"[lookahead_dist] DeepSpeed will build its {name} op for the config's optimizer: first run only, "
              "about 1-3 minutes (then cached in TORCH_EXTENSIONS_DIR; for Adam/AdamW, "
              '"torch_adam": true in the optimizer params needs no build)')
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0":
        import sys

        print(notice, file=sys.stderr, flush=True)
    return notice


# Note [Local SGD across nodes]
# -----------------------------
# With "local_sgd": {"across": "nodes", ...} DeepSpeed's data-parallel group is the node: initialize
# passes deepspeed.initialize an mpu (NodeMPU) whose data-parallel group is this rank's node, so ZeRO
# reduces gradients and partitions the optimizer state inside the node only, and each node trains
# its own replica. Rank r of every node runs the same ZeRO partitioning of the same model, so it
# holds the same flat fp32 partitions (ZeRO-1/2: one per param group; ZeRO-3: one per sub-group)
# of its node's replica: averaging those partitions over the inter-node group {r, r + P, ...}
# averages the replicas. The Lookahead around the optimizer DeepSpeed steps therefore gets a
# flat-mode LocalSGD over that group (LocalSGDOptions.process_group = NodeGroups.inter, no
# intra_group: the node's ranks hold different partitions, not identical replicas, the HSDP case of
# Note [What goes on the wire]): every k counted steps of a partition, its pseudo-gradient is
# all-reduced across nodes and the outer step (Note [The outer step]) runs on it in place; DeepSpeed's
# own post-step copy (ZeRO-1/2: all-gather of the module's flat buffers; ZeRO-3: the partitioned
# parameters) carries the result into the module, inside the same engine.step(). Nodes must start
# equal: initialize broadcasts the module's parameters and buffers from global rank 0 before
# DeepSpeed sees them (DeepSpeed itself broadcasts only inside its data-parallel group), and the
# LocalSGD is built with init="none" (its construction still checks the partition shapes across
# nodes). Under ZeRO-3, whose param groups are empty between steps, wrap_engine shows that check each
# group's sub-group partitions.


def _across_nodes(call: dict[str, Any], across: dict[str, Any]) -> tuple[NodeMPU, Any]:
    """Note [Local SGD across nodes]: the node groups, DeepSpeed's ``mpu`` and the local-SGD options."""
    import deepspeed.comm
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    if call.get("mpu") is not None:
        raise ValueError(
            f'"{LOOKAHEAD_CONFIG_KEY}.local_sgd": {{"across": "nodes"}} makes each node DeepSpeed\'s data-parallel group '
            "through an mpu of its own; it cannot be combined with mpu=... (tensor/pipeline/sequence parallelism)")
    deepspeed.comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                    distributed_port=call.get("distributed_port", TORCH_DISTRIBUTED_DEFAULT_PORT),
                                    dist_init_required=call.get("dist_init_required"))
    groups = node_groups(across["ranks_per_node"], inter_backend=inter_node_backend(call.get("config") or {}))
    if call.get("model") is not None:
        _align_across_world(call["model"])
    options = dataclasses.replace(across["options"], process_group=groups.inter)
    return NodeMPU(groups), options


# -- slow weights in the module ------------------------------------------------------------------------
@contextmanager
def _quiet_deepspeed_collectives() -> Iterator[None]:
    """Within our own calls: drop the FutureWarnings torch raises for DeepSpeed's collective calls.

    torch 2.13 deprecates ``all_gather_into_tensor``/``reduce_scatter_tensor``, which DeepSpeed's
    comm layer calls; the warning is DeepSpeed's to fix, and says nothing to our caller.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        yield


class _Layout:
    """Where an engine keeps what the module holds and what Lookahead steps (Note [Slow weights in the module])."""

    def __init__(self, engine: Any) -> None:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        holder, _ = _stepped_optimizer(engine)
        la = find_lookahead(engine)
        if la is None:
            raise TypeError("the engine's optimizer is not a lookahead_dist.Lookahead (use initialize() or wrap_engine())")
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


# -- universal checkpoints: resuming at another world size ---------------------------------------------
#: Param-group key, in a universal checkpoint made by :func:`convert_to_universal`, of the Lookahead
#: state that is not per element: per param group the cycle position, k and alpha (the same dict in
#: every group, because DeepSpeed's ZeRO-3 universal loader gives every group the first group's keys).
UNIVERSAL_GROUPS_KEY = "lookahead_universal"

# Note [Universal checkpoints]
# ----------------------------
# DeepSpeed's ds_to_universal writes one folder per parameter, zero/<name>/, with the whole
# (unpartitioned) fp32 weight and Adam moments as <key>.pt, and zero/optimizer_state.pt with the
# param groups; loading at any world size re-partitions them. It converts only fp32, exp_avg,
# exp_avg_sq and step. convert_to_universal runs it, then adds zero/<name>/lookahead_slow.pt (the
# slow weight, assembled from the ranks' flat partitions the way ds_to_universal assembles
# exp_avg) and, in the param groups, UNIVERSAL_GROUPS_KEY (cycle positions, k, alpha). On load:
# - ZeRO-1/2 (and the bf16 optimizer): DeepSpeed's loader reads every <key>.pt in a parameter's
#   folder into the optimizer state of the flat partitions, so the slow weights arrive by
#   themselves, under SLOW_KEY, where Lookahead keeps them.
# - ZeRO-3: DeepSpeed's loader reads only fp32/exp_avg/exp_avg_sq; load_checkpoint reads
#   lookahead_slow.pt with ZeRO-3's own per-parameter partitioning (load_hp_checkpoint_state), one
#   sub-group at a time, as DeepSpeed does for exp_avg.
# - Both: load_checkpoint moves the cycle positions into the units' STEP_KEY (every unit of a
#   group -- the group's partition, or each of its ZeRO-3 sub-groups -- steps at every step, so a
#   group has one position, whatever the partitioning) and restores k and alpha per group.


def _optim_files(folder: str, *, trust_pickle: bool = False) -> tuple[list[tuple[int, str]], int]:
    """[(dp rank, path)] of a ZeRO checkpoint's optimizer files, and its ZeRO stage."""
    import glob
    import re

    from ._safe_load import deepspeed_safe_globals, load

    found = []
    for path in glob.glob(os.path.join(folder, "*_optim_states.pt")):
        m = re.fullmatch(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt", os.path.basename(path))
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise NotImplementedError(
                f"{path}: convert_to_universal supports data parallelism only (ZeRO-1/2/3 without tensor or "
                "pipeline parallelism); use deepspeed.checkpoint.ds_to_universal, which drops the slow weights"
            )
        found.append((int(m.group(1)), path))
    if not found:
        raise FileNotFoundError(f"no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt) in {folder!r}")
    found.sort()
    if [d for d, _ in found] != list(range(len(found))):
        raise ValueError(f"ZeRO optimizer files of {folder!r} do not cover ranks 0..{len(found) - 1}: {found}")
    first = load(found[0][1], safe_globals=deepspeed_safe_globals(), trust_pickle=trust_pickle,
                 opt_in=_UNIVERSAL_OPT_IN)["optimizer_state_dict"]
    return found, int(first.get("zero_stage", 1))


def _slow_pieces_zero12(osd: dict[str, Any], path: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One rank's slice of each parameter's slow weight, and each group's cycle position (ZeRO-1/2)."""
    base = osd["base_optimizer_state"]
    pieces: dict[str, torch.Tensor] = {}
    steps = []
    for g, mapping in enumerate(osd["param_slice_mappings"]):
        st = base["state"].get(g, {})
        if SLOW_KEY not in st:
            raise ValueError(f"{path}: param group {g} has no {SLOW_KEY!r}: not a Lookahead checkpoint, or saved "
                             "before the first step; use deepspeed.checkpoint.ds_to_universal")
        steps.append(int(st.get(STEP_KEY, 0)))
        flat = st[SLOW_KEY]
        for name, frag in mapping.items():
            pieces[name] = flat.narrow(0, frag.start, frag.numel).clone()
    return pieces, steps


def _slow_pieces_zero3(osd: dict[str, Any], shapes: list[dict[str, Any]], rank: int,
                       path: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One rank's slice of each parameter's slow weight, and each group's cycle position (ZeRO-3)."""
    inner = osd["optimizer_state_dict"]
    partition_groups = osd.get("ds_zero_partition_groups") or []
    pieces: dict[str, torch.Tensor] = {}
    for sg, sub_shapes in enumerate(shapes):
        st = inner["state"].get(sg, {})
        if SLOW_KEY not in st:
            raise ValueError(f"{path}: sub-group {sg} has no {SLOW_KEY!r}: not a Lookahead checkpoint, or saved "
                             "before the first step; use deepspeed.checkpoint.ds_to_universal")
        meta = partition_groups[sg] if sg < len(partition_groups) else {}
        count = int(meta.get("partition_count", osd["partition_count"]))
        part_rank = int(meta.get("partition_rank", rank))
        offset = 0
        for name, shape in sub_shapes.items():  # ZeRO-3: each parameter split evenly, padded at the end
            numel = math.prod(shape)
            per_rank = math.ceil(numel / count)
            real = max(0, min(per_rank, numel - part_rank * per_rank))
            pieces[name] = st[SLOW_KEY].narrow(0, offset, real).clone()
            offset += per_rank
    steps = []
    for g, group in enumerate(inner["param_groups"]):
        counts = {int(inner["state"][sg].get(STEP_KEY, 0)) for sg in group["params"]}
        if len(counts) != 1:
            raise ValueError(f"{path}: the ZeRO-3 sub-groups of param group {g} are at different cycle positions "
                             f"{sorted(counts)}; such a checkpoint cannot be re-partitioned")
        steps.append(counts.pop())
    return pieces, steps


_UNIVERSAL_OPT_IN = "convert it with convert_to_universal(..., trust_pickle=True)"


def convert_to_universal(input_folder: str, output_folder: str, *, inject_missing_state: bool = False,
                         num_workers: int = 1, keep_temp_folder: bool = False, verbose: bool = False,
                         trust_pickle: bool = False) -> None:
    """``deepspeed.checkpoint.ds_to_universal``, keeping the Lookahead state (Note [Universal checkpoints]).

    Converts the ZeRO-1/2/3 checkpoint in ``input_folder`` (one tag's folder) into a universal
    checkpoint in ``output_folder`` that loads at any data-parallel world size with
    :func:`load_checkpoint` (``"checkpoint": {"load_universal": true}`` in the DeepSpeed config):
    weights, the inner optimizer's state, every slow weight, and each param group's cycle position,
    k and alpha. Runs DeepSpeed's converter itself (its options: ``inject_missing_state``,
    ``num_workers`` for its extract and merge pools, ``keep_temp_folder``), then adds
    ``zero/<param>/lookahead_slow.pt`` per parameter and the groups' Lookahead entries to
    ``zero/optimizer_state.pt``. Data parallelism only (no tensor or pipeline parallelism). From the
    command line: ``python -m lookahead_dist.deepspeed to-universal INPUT OUTPUT``.

    Safe loading (Note [Safe loading] in ``lookahead_dist._safe_load``): DeepSpeed's converter
    unpickles the input files fully (``weights_only=False``), so first every ``.pt`` file of
    ``input_folder`` is checked with ``weights_only=True``, allowing only the DeepSpeed types those
    files hold, and the files read here are loaded the same way. A file that names another global
    (a tampered file, or an object in ``client_state``) raises
    :class:`~lookahead_dist.checkpointing.UnsafeCheckpointError` before anything is unpickled
    fully. ``trust_pickle=True`` skips the check and loads fully: only for a checkpoint that
    nobody but your own job can have written.
    """
    import argparse
    import contextlib
    import glob
    import io

    from deepspeed.checkpoint import ds_to_universal as d2u
    from deepspeed.checkpoint.constants import PARAM

    from ._safe_load import check_files, deepspeed_safe_globals, load

    if not isinstance(trust_pickle, bool):
        raise TypeError(f"convert_to_universal `trust_pickle` must be a bool, got {trust_pickle!r}")
    allowed = deepspeed_safe_globals()
    files, stage = _optim_files(input_folder, trust_pickle=trust_pickle)  # the layout, before the converter runs
    if not trust_pickle:
        check_files(sorted(glob.glob(os.path.join(input_folder, "**", "*.pt"), recursive=True)),
                    safe_globals=allowed, opt_in=_UNIVERSAL_OPT_IN)
    args = argparse.Namespace(input_folder=input_folder, output_folder=output_folder,
                              num_extract_workers=num_workers, num_merge_workers=num_workers,
                              keep_temp_folder=keep_temp_folder, strict=True,
                              inject_missing_state=inject_missing_state)
    out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with out:
        try:
            d2u.main(args)
        except AssertionError as e:
            if "universal_checkpoint_info" in str(e) and not inject_missing_state:
                raise ValueError(
                    f"{input_folder!r} has no universal_checkpoint_info (only Megatron-style clients write it): "
                    "pass inject_missing_state=True (command line: --inject-missing-state), as for ds_to_universal"
                ) from e
            raise

    # Each rank's slice of every slow weight, then whole weights in rank order (ds_to_universal's merge).
    by_name: dict[str, list[torch.Tensor]] = {}
    steps: list[int] | None = None
    for rank, path in files:
        osd = load(path, safe_globals=allowed, trust_pickle=trust_pickle, opt_in=_UNIVERSAL_OPT_IN)
        osd = osd["optimizer_state_dict"]
        if stage <= 2:
            pieces, rank_steps = _slow_pieces_zero12(osd, path)
        else:
            model_file = os.path.join(input_folder, os.path.basename(path).replace("optim_states", "model_states"))
            shapes = load(model_file, safe_globals=allowed, trust_pickle=trust_pickle,
                          opt_in=_UNIVERSAL_OPT_IN)["param_shapes"]
            pieces, rank_steps = _slow_pieces_zero3(osd, shapes, rank, path)
        if steps is not None and rank_steps != steps:
            raise ValueError(f"{path}: cycle positions {rank_steps} differ from rank 0's {steps}")
        steps = rank_steps
        for name, piece in pieces.items():
            by_name.setdefault(name, []).append(piece)
    zero_dir = os.path.join(output_folder, "zero")
    for name, parts in by_name.items():
        # Written like the fp32 weight beside it: ZeRO-1/2 a dict {PARAM: tensor, ...}, ZeRO-3 a flat tensor.
        fp32 = load(os.path.join(zero_dir, name, "fp32.pt"), safe_globals=allowed, trust_pickle=trust_pickle,
                    opt_in=_UNIVERSAL_OPT_IN)
        like = fp32[PARAM] if isinstance(fp32, dict) else fp32
        full = torch.cat(parts)
        if full.numel() != like.numel():
            raise ValueError(f"slow weight of {name!r}: {full.numel()} elements from the ranks, "
                             f"{like.numel()} in its fp32 weight")
        slow = {**fp32, PARAM: full.view_as(like)} if isinstance(fp32, dict) else full.view_as(like)
        torch.save(slow, os.path.join(zero_dir, name, f"{SLOW_KEY}.pt"))

    state_path = os.path.join(zero_dir, "optimizer_state.pt")
    sd = load(state_path, safe_globals=allowed, trust_pickle=trust_pickle, opt_in=_UNIVERSAL_OPT_IN)
    group_lists = [sd["param_groups"]]
    if "optimizer_state_dict" in sd:  # ZeRO-3's loader reads the groups from here
        group_lists.append(sd["optimizer_state_dict"]["param_groups"])
    groups = group_lists[0]
    if steps is None or len(steps) != len(groups):
        raise ValueError(f"{state_path}: {len(groups)} param groups, cycle positions for {steps}")
    entry = {"steps": steps, "k": [g.get(K_KEY) for g in groups], "alpha": [g.get(ALPHA_KEY) for g in groups]}
    for group_list in group_lists:
        for g in group_list:
            g[UNIVERSAL_GROUPS_KEY] = entry
    torch.save(sd, state_path)


def load_checkpoint(engine: Any, load_dir: str, tag: str | None = None, *, trust_pickle: bool = False,
                    **kwargs: Any) -> tuple[Any, Any]:
    """``engine.load_checkpoint(load_dir, tag, **kwargs)``, completing the Lookahead state of a universal one.

    Same arguments and return value. For a regular checkpoint it is exactly
    ``engine.load_checkpoint`` (which restores slow weights and counters itself). For a universal
    checkpoint (config ``"checkpoint": {"load_universal": true}``) made by
    :func:`convert_to_universal`, at any data-parallel world size: ZeRO-3's slow weights are read
    (DeepSpeed's own loader reads them only under ZeRO-1/2), and every group's cycle position, k and
    alpha are restored, so training continues the saved cycle. A universal checkpoint made by
    ``ds_to_universal`` alone has no Lookahead state: a ``UserWarning`` says so, and Lookahead
    starts a new cycle from the loaded weights at the next step. A collective, like
    ``engine.load_checkpoint``. Under local SGD across nodes, node i reads ``load_dir/node<i>``
    (Note [Checkpoints across nodes]).

    DeepSpeed unpickles its checkpoint files in full (``weights_only=False``), so a tampered file
    could run code. Unless ``trust_pickle=True``, the tag folder about to be loaded is first checked
    with :func:`lookahead_dist.checkpointing.check_safe_to_load` (DeepSpeed's own types allowed,
    nothing else): a file naming any other global raises
    :class:`~lookahead_dist.checkpointing.UnsafeCheckpointError` on every rank before DeepSpeed
    reads anything.
    """
    if not isinstance(trust_pickle, bool):
        raise TypeError(f"load_checkpoint: trust_pickle must be a bool, got {trust_pickle!r}")
    if not trust_pickle:
        _check_tag_folder(engine, load_dir, tag)
    with _quiet_deepspeed_collectives():
        path, client_state = engine.load_checkpoint(load_dir, tag, **kwargs)
    if path is None or not engine.load_universal_checkpoint() or not kwargs.get("load_optimizer_states", True) \
            or kwargs.get("load_module_only", False):
        return path, client_state
    load_dir = _node_dir(engine, load_dir)  # local SGD across nodes: <load_dir>/node<i> (Note [Checkpoints across nodes])
    if tag is None:
        with open(os.path.join(load_dir, "latest_universal")) as f:
            tag = f.read().strip()
    _restore_universal(engine, os.path.join(load_dir, str(tag)))
    return path, client_state


def _check_tag_folder(engine: Any, load_dir: str, tag: str | None) -> None:
    """Check the folder ``engine.load_checkpoint(load_dir, tag)`` will read, as DeepSpeed resolves it."""
    from . import _safe_load
    from .checkpointing import _agree, _check_mine, _checkpoint_files

    folder = _node_dir(engine, load_dir)
    if tag is None:
        latest = os.path.join(folder, "latest_universal" if engine.load_universal_checkpoint() else "latest")
        if not os.path.isfile(latest):
            return  # DeepSpeed finds nothing to load and says so; nothing is unpickled
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(folder, str(tag))
    if not os.path.isdir(path):
        return  # DeepSpeed reports the missing folder itself
    mpu = getattr(engine, "mpu", None)
    # The ranks that read the same folder split its files: the node's ranks under local SGD across
    # nodes (each node has its own folder), else the whole world.
    group = mpu.get_data_parallel_group() if isinstance(mpu, NodeMPU) else None
    failed = None
    try:  # as checkpointing.check_safe_to_load, with the opt-in of this call in the message
        _check_mine(_checkpoint_files(Path(path)), _safe_load.deepspeed_safe_globals(), group,
                    "load it with lookahead_dist.deepspeed.load_checkpoint(..., trust_pickle=True)")
    except Exception as exc:  # noqa: BLE001 - raised below, on every rank
        failed = exc
    _agree(failed, Path(path), group)


def _restore_universal(engine: Any, folder: str) -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    holder, _ = _stepped_optimizer(engine)
    la = find_lookahead(engine)
    if la is None:
        raise TypeError("the engine's optimizer is not a lookahead_dist.Lookahead (use initialize() or wrap_engine())")
    groups = la.param_groups
    entry = None
    for g in groups:
        entry = g.pop(UNIVERSAL_GROUPS_KEY, None) or entry
    zero3 = isinstance(holder, DeepSpeedZeroOptimizer_Stage3)
    if zero3:
        units = list(holder.fp32_partitioned_groups_flat)
        unit_group = [holder.sub_group_to_group_id[sg] for sg in range(len(units))]
        names = [[holder.param_names[p] for p in sub] for sub in holder.fp16_groups]
        if entry is not None:
            with torch.no_grad():
                for sg, hp in enumerate(units):
                    slow = torch.zeros_like(hp)
                    offset = 0
                    for p, name in zip(holder.fp16_groups[sg], names[sg]):
                        part = holder.load_hp_checkpoint_state(os.path.join(folder, "zero", name), SLOW_KEY, param=p)
                        slow.narrow(0, offset, part.numel()).copy_(part)
                        offset += part.numel()
                    la.state[hp][SLOW_KEY] = slow
            _unshare_step_tensors(la, units)
    else:
        units = master_partitions(engine)
        unit_group = list(range(len(units)))
    if entry is None:
        warnings.warn(
            f"the universal checkpoint {folder!r} has no Lookahead state (made by ds_to_universal alone?): the "
            "weights and the inner optimizer resume exactly, and Lookahead starts a new cycle with slow weights = "
            "the loaded weights. Convert with lookahead_dist.deepspeed.convert_to_universal to keep them.",
            UserWarning,
            stacklevel=3,
        )
        return
    if len(entry["steps"]) != len(groups):
        raise ValueError(f"the universal checkpoint {folder!r} has Lookahead state for {len(entry['steps'])} param "
                         f"groups, the optimizer has {len(groups)}")
    for g, group in enumerate(groups):
        if entry["k"][g] is not None:
            group[K_KEY] = entry["k"][g]
        if entry["alpha"][g] is not None:
            group[ALPHA_KEY] = entry["alpha"][g]
    for unit, g in zip(units, unit_group):
        st = la.state.get(unit)
        if not st or SLOW_KEY not in st:
            raise RuntimeError(f"after loading {folder!r} a partition of param group {g} has no slow weight: the "
                               f"checkpoint's zero/<param>/{SLOW_KEY}.pt files are missing or unread")
        st[STEP_KEY] = entry["steps"][g]
    keep_config = getattr(la, "_lookahead_keep_config", None)
    if keep_config is not None:  # a block made this Lookahead: its k and alpha win (Note [Resuming with ...])
        keep_config(la)


def _unshare_step_tensors(la: Lookahead, units: list[torch.Tensor]) -> None:
    """Give each ZeRO-3 sub-group its own ``step`` tensor after a universal load.

    DeepSpeed's ZeRO-3 universal loader puts one and the same ``step`` object into the state of
    every sub-group. torch's Adam/AdamW count a tensor ``step`` in place, once per sub-group and
    step, so the shared counter would run ahead by the number of sub-groups and Adam's bias
    correction would go wrong (an int ``step`` or a fused optimizer's per-group count is unaffected).
    """
    seen: set[int] = set()
    for unit in units:
        st = la.state.get(unit) or {}
        step = st.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                st["step"] = step.clone()
            seen.add(id(step))


# -- checkpoints of local SGD across nodes -------------------------------------------------------------
# Note [Checkpoints across nodes]
# -------------------------------
# With "local_sgd": {"across": "nodes"} each node is DeepSpeed's data-parallel group and trains a
# replica of its own between syncs. DeepSpeed names its checkpoint files by the data-parallel rank
# (zero_pp_rank_<r>_*, mp_rank_00_model_states.pt), which repeats on every node, and only global
# rank 0 writes `latest` (and creates the directory). Saved as is into one directory the nodes
# overwrite each other's files, the last writer winning; saved into a directory per node, only node
# 0 finds `latest`, and DeepSpeed's load_checkpoint returns (None, None) on the others. So
# initialize gives the engine its own save_checkpoint/load_checkpoint (_node_checkpoints): node i
# saves and loads <dir>/node<i>/, a complete DeepSpeed checkpoint of that node's ranks (with its
# own `latest`, written by the node's first rank once the node's files are written), whether <dir>
# is shared by the nodes or is a directory of each node's own. On load, every rank finds its tag
# (the one given, or its node's `latest`) and the ranks compare them before DeepSpeed reads
# anything: a node that lacks the checkpoint (a node-local disk, a node directory missing) or finds
# another tag raises on every rank, instead of starting that node alone from scratch (or hanging in
# DeepSpeed's collectives). No checkpoint on any node is DeepSpeed's (None, None), as before.
# DeepSpeed's own methods stay reachable as type(engine).save_checkpoint(engine, ...).

_NODE_SUBDIR = "node{}"


def _node_checkpoints(engine: Any) -> None:
    """Note [Checkpoints across nodes]: node i's ``engine.save_checkpoint(d)`` / ``load_checkpoint(d)`` use ``d/node<i>``.

    Does nothing unless the engine's ``mpu`` is a :class:`NodeMPU` (local SGD across nodes), or
    when already done.
    """
    mpu = getattr(engine, "mpu", None)
    if not isinstance(mpu, NodeMPU) or getattr(engine, "_lookahead_node", None) is not None:
        return
    import functools

    import torch.distributed as dist

    groups = mpu.groups
    subdir = _NODE_SUBDIR.format(groups.node)
    ds_save, ds_load = engine.save_checkpoint, engine.load_checkpoint

    @functools.wraps(ds_save)
    def save_checkpoint(save_dir: str, tag: Any = None, client_state: Any = None, save_latest: bool = True,
                        **kwargs: Any) -> Any:
        client_state = {} if client_state is None else client_state
        if not save_dir:
            return ds_save(save_dir, tag, client_state, save_latest, **kwargs)  # DeepSpeed's error
        decoupled = getattr(getattr(engine, "checkpoint_engine", None), "is_decoupled", None)
        if decoupled is not None and decoupled():
            raise NotImplementedError(
                "local SGD across nodes: a decoupled DeepSpeed checkpoint engine writes `latest` later, from global "
                "rank 0 only; use DeepSpeed's default checkpoint engine (docs/deepspeed.md, 'Checkpoints across nodes')")
        node_dir = os.path.join(save_dir, subdir)
        os.makedirs(node_dir, exist_ok=True)  # DeepSpeed creates save_dir on global rank 0 only
        tag = f"global_step{engine.global_steps}" if tag is None else str(tag)  # DeepSpeed's default tag
        result = ds_save(node_dir, tag, client_state, False, **kwargs)  # no `latest`; ends with a barrier of all ranks
        if save_latest and dist.get_rank(groups.intra) == 0:
            tmp = os.path.join(node_dir, f".latest.{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(node_dir, "latest"))
        dist.barrier()
        return result

    @functools.wraps(ds_load)
    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        node_dir = os.path.join(load_dir, subdir)
        found = _node_tag(engine, node_dir, tag)
        legacy = found is None and (os.path.isfile(os.path.join(load_dir, "latest")) if tag is None
                                    else os.path.isdir(os.path.join(load_dir, str(tag))))
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (groups.node, found, legacy))
        by_node = {n: t for n, t, _ in everyone}
        if len({t for _, t, _ in everyone}) > 1:
            seen = ", ".join(f"node {n}: {'no checkpoint' if t is None else repr(t)}" for n, t in sorted(by_node.items()))
            raise RuntimeError(
                f"local SGD across nodes: the nodes do not find the same checkpoint under {load_dir!r} ({seen}; node i "
                f"reads {os.path.join(load_dir, 'node<i>')!r}, tag {'from its latest file' if tag is None else repr(str(tag))}). "
                "Every node must find the directory its ranks saved: copy the missing node directories there, or pass "
                "a tag that every node has")
        if found is None and any(old for _, _, old in everyone):
            raise FileNotFoundError(
                f"local SGD across nodes: {load_dir!r} holds a checkpoint saved without node directories (by "
                "DeepSpeed's own save_checkpoint: where the nodes shared the directory, it holds the files of whichever "
                f"node wrote last) and no {os.path.join(load_dir, subdir)!r}. A directory of one node's own saved that way "
                "loads with DeepSpeed's own method and an explicit tag: type(engine).load_checkpoint(engine, load_dir, tag)")
        return ds_load(node_dir, tag, *args, **kwargs)

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    engine._lookahead_node = groups.node


def _node_tag(engine: Any, node_dir: str, tag: Any) -> str | None:
    """The tag a node finds in ``node_dir`` (the given one, or its latest file's), None without a checkpoint."""
    if tag is None:
        latest = os.path.join(node_dir, "latest_universal" if engine.load_universal_checkpoint() else "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    return str(tag) if os.path.isdir(os.path.join(node_dir, str(tag))) else None


def _node_dir(engine: Any, directory: str) -> str:
    """Where this rank's node keeps the checkpoints of ``directory`` (Note [Checkpoints across nodes])."""
    node = getattr(engine, "_lookahead_node", None)
    return directory if node is None else os.path.join(directory, _NODE_SUBDIR.format(node))


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lookahead_dist.deepspeed",
                                     description="DeepSpeed helpers of lookahead-dist")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-universal", help="ds_to_universal that keeps the Lookahead slow weights and counters")
    conv.add_argument("input_folder", help="a ZeRO checkpoint tag folder (e.g. ckpt/global_step100)")
    conv.add_argument("output_folder", help="the universal checkpoint folder to write (e.g. ckpt/global_step100_universal)")
    conv.add_argument("--inject-missing-state", action="store_true", help="as ds_to_universal --inject_missing_state")
    conv.add_argument("--num-workers", type=int, default=1, help="processes for ds_to_universal's extract and merge")
    conv.add_argument("--keep-temp-folder", action="store_true")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="skip the check that every input file loads with weights_only=True (only for files "
                           "you trust: DeepSpeed's converter unpickles them in full)")
    args = parser.parse_args(argv)
    convert_to_universal(args.input_folder, args.output_folder, inject_missing_state=args.inject_missing_state,
                         num_workers=args.num_workers, keep_temp_folder=args.keep_temp_folder, verbose=True,
                         trust_pickle=args.trust_pickle)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
