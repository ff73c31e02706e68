"""ZeRO inside each node, local SGD across nodes: the node groups, DeepSpeed's ``mpu``, equal starting weights.

Note [Local SGD across nodes] is at :func:`_across_nodes`, the part of :func:`~lookahead_dist.deepspeed.initialize`
that sets the layout up.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .config import LOOKAHEAD_CONFIG_KEY


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
def align_across_world(model: torch.nn.Module) -> None:
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


_align_across_world = align_across_world  # the name it had before it was public


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
        align_across_world(call["model"])
    options = dataclasses.replace(across["options"], process_group=groups.inter)
    return NodeMPU(groups), options
