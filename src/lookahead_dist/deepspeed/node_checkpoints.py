"""Checkpoints of local SGD across nodes: node i saves and loads ``<dir>/node<i>`` (Note [Checkpoints across nodes])."""

from __future__ import annotations

import os
from typing import Any

from .nodes import NodeMPU

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
