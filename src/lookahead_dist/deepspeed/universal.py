"""Universal checkpoints: resuming at another world size with the Lookahead state (Note [Universal checkpoints])."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..lookahead import ALPHA_KEY, K_KEY, SLOW_KEY, STEP_KEY, Lookahead
from .introspect import (
    _quiet_deepspeed_collectives,
    _stepped_optimizer,
    master_partitions,
    require_lookahead,
)
from .node_checkpoints import _node_dir
from .nodes import NodeMPU

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

    from .._safe_load import deepspeed_safe_globals, load

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

    from .._safe_load import check_files, deepspeed_safe_globals, load

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
    (Note [Checkpoints across nodes] in :mod:`.node_checkpoints`).

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
    # Local SGD across nodes: <load_dir>/node<i> (Note [Checkpoints across nodes] in node_checkpoints.py).
    load_dir = _node_dir(engine, load_dir)
    if tag is None:
        with open(os.path.join(load_dir, "latest_universal")) as f:
            tag = f.read().strip()
    _restore_universal(engine, os.path.join(load_dir, str(tag)))
    return path, client_state


def _check_tag_folder(engine: Any, load_dir: str, tag: str | None) -> None:
    """Check the folder ``engine.load_checkpoint(load_dir, tag)`` will read, as DeepSpeed resolves it."""
    from .. import _safe_load
    from ..checkpointing import _agree, _check_mine, _checkpoint_files

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
    la = require_lookahead(engine)
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
    if keep_config is not None:  # a block made this Lookahead: its k and alpha win (Note [Resuming ...] in engine.py)
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
