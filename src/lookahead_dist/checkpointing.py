"""Periodic checkpoints that survive a killed rank: atomic, per rank, resumable under torchrun.

::

    from lookahead_dist.checkpointing import load_latest, save_checkpoint

    start = load_latest(ckpt_dir, model, opt)           # 0 when there is no checkpoint yet
    for step in range(start + 1, steps + 1):
        x, y = batch_for(step)                          # data a function of the step: exact resume
        ...
        opt.step()
        if step % every == 0:
            save_checkpoint(ckpt_dir, model, opt, step)

Started as ``torchrun --max-restarts=3 ... train.py``, a rank killed by SIGKILL (or a lost node)
makes torchrun stop the other ranks and start them all again; each calls :func:`load_latest` and
goes on from the last complete checkpoint. The run ends with the same weights, bit for bit, as one
that was never interrupted (``launch/train_resumable.py``, ``docs/reliability.md``).

Note [Checkpoint layout and commit]
-----------------------------------
::

    ckpt_dir/
      latest                     "step_00000010": the last *complete* checkpoint
      step_00000005/rank_0.pt    one file per rank: model, optimizer, extras, RNG, step, world size
      step_00000005/rank_1.pt
      step_00000010/...          (DeepSpeed: the engine's own files, plus our rank_<r>.pt)

A save is committed in three steps: (1) every rank writes ``rank_<r>.pt.tmp``, flushes it to disk
and renames it to ``rank_<r>.pt`` (a rename is atomic on POSIX file systems); (2) a barrier over
all ranks; (3) rank 0 writes ``latest.tmp`` and renames it to ``latest``. A process killed at any
point leaves ``latest`` naming the previous complete checkpoint: a half-written file is only ever
a ``.tmp`` or sits in a directory ``latest`` does not name. Older checkpoints beyond ``keep`` are
deleted only after ``latest`` has moved on. The ``latest`` file holds the directory name, as
DeepSpeed's own ``latest`` does, so ``engine.load_checkpoint(ckpt_dir)`` also finds it.

Note [What loading trusts]
--------------------------
:func:`load_latest` reads the rank files with ``torch.load(..., weights_only=True)``: a tampered
file that names a function or class (a pickled ``os.system`` call, ...) is refused with
:class:`UnsafeCheckpointError` before anything in it runs (Note [Safe loading] in ``_safe_load``).
Our own records need nothing beyond torch's default allow-list. An ``extra`` object whose
``state_dict()`` holds other types (an enum, a dataclass, a numpy array) needs an explicit opt-in:
``safe_globals=[those types]``, or ``trust_pickle=True`` to unpickle the files fully when the
directory is one only the job itself can write. For a DeepSpeed engine, DeepSpeed's own loader
unpickles its files fully, so before calling it the ranks check every ``.pt`` file of the
checkpoint with the safe unpickler (:func:`check_safe_to_load`, the files split among the ranks),
allowing the few DeepSpeed types those files hold.

Note [Why per-rank files]
-------------------------
Every rank saves what it holds, with ``torch.save``: its model (unwrapped from DDP), its
optimizer's ``state_dict()`` (a :class:`~lookahead_dist.Lookahead`'s includes the slow weights and
cycle counters) and the extras. That is the one layout right for every mode here: in local-SGD
mode the ranks' fast weights differ between syncs, and with ``sharded=True`` each rank holds its
own chunk of the slow weights, so no rank can save for another. The cost: a DDP job writes its
replicated model N times, and a checkpoint loads only into the same world size (an error says so;
to change the world size, save with ``torch.distributed.checkpoint``, which reshards). A DeepSpeed
engine is saved with its own ``engine.save_checkpoint`` (which shards ZeRO state itself) and
committed the same way.

The directory must be one every rank can read and write (a shared file system across nodes);
:func:`load_latest` checks that all ranks found the same checkpoint.

Note [torchrun's shared store]
------------------------------
By default torchrun's agent hosts the TCPStore that the workers' ``init_process_group`` uses, and
keeps it across restarts; the restarted workers then read the previous attempt's addresses from
it and fail with ``Gloo connectFullMesh failed ... Connection refused`` (NCCL: a stale unique id;
pytorch/pytorch#135712; seen here with torch 2.13, both ``--standalone`` and the static
rendezvous). With the c10d rendezvous (``--standalone`` or ``--rdzv-backend c10d``), exporting
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun makes worker rank 0 host a fresh store in
every attempt, and restarts work. The static rendezvous (``--master-port`` without
``--rdzv-backend``) has no such switch. :func:`load_latest` warns when restarts are allowed and
the store is shared.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import _safe_load
from ._safe_load import UnsafeCheckpointError
from .lookahead import find_lookahead

__all__ = ["save_checkpoint", "load_latest", "latest_step", "check_safe_to_load", "UnsafeCheckpointError",
           "LATEST", "FORMAT"]

#: Name of the file that names the last complete checkpoint directory.
LATEST = "latest"
#: Format tag stored in every rank file.
FORMAT = "lookahead_dist.checkpointing/1"
_TAG = re.compile(r"^step_(\d{8,})$")


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint `step` must be an int >= 0, got {step!r}")
    return step


def _rank_world(group: Any = None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group)


def _is_deepspeed_engine(model: Any) -> bool:
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _check_extra(extra: Any, fn: str) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"{fn} `extra` must be a dict of name -> object with state_dict/load_state_dict, "
                        f"got {type(extra).__name__}")
    bad = [name for name, obj in extra.items()
           if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)))]
    if bad:
        raise TypeError(f"{fn} `extra` entries {bad} have no state_dict()/load_state_dict(); pass stateful "
                        "objects (LR scheduler, GradScaler, ...) and keep plain values inside one of them")
    return extra


def _check_optimizer(model: Any, optimizer: Any, fn: str) -> None:
    if _is_deepspeed_engine(model):
        if optimizer is None:
            return
        if optimizer is getattr(model, "optimizer", None) or optimizer is find_lookahead(model):
            return
        raise ValueError(f"{fn}: with a DeepSpeed engine pass optimizer=None (or the engine's own optimizer); "
                         f"got a {type(optimizer).__name__} the engine does not step")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn} `model` must be a torch.nn.Module or a DeepSpeed engine, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn} `optimizer` must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp``, flush it to disk, rename over ``path`` (Note [... commit])."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync directories
        pass
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: Any,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: dict[str, Any] | None = None,
    *,
    keep: int = 2,
    group: Any = None,
) -> Path:
    """Save this rank's training state after ``step`` and commit it as the latest checkpoint.

    A collective: every rank of ``group`` (default: the world) calls it with the same ``step``.
    Atomic (Note [Checkpoint layout and commit]): killed at any point, ``latest`` still names a
    complete checkpoint, the previous one.

    Args:
        path: the checkpoint directory (created if missing; shared by all ranks).
        model: the module (a DDP wrapper is unwrapped) or a DeepSpeed engine, saved through
            ``engine.save_checkpoint``.
        optimizer: its optimizer (a :class:`~lookahead_dist.Lookahead` saves its slow weights and
            counters in its state dict); None with a DeepSpeed engine, which saves its own.
        step: the number of optimizer steps taken; :func:`load_latest` returns it.
        extra: name -> object with ``state_dict()``/``load_state_dict()`` (LR scheduler,
            GradScaler, ...), saved per rank.
        keep: how many complete checkpoints to keep (>= 1); older ones are deleted after commit.
        group: the process group of the job (default: the world).

    Returns:
        The directory of this checkpoint.
    """
    step = _check_step(step)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_checkpoint `keep` must be an int >= 1, got {keep!r}")
    _check_optimizer(model, optimizer, "save_checkpoint")
    extra = _check_extra(extra, "save_checkpoint")
    rank, world = _rank_world(group)
    root = Path(path)
    tag = _tag(step)
    ckpt = root / tag
    steps = _gather_int(step, group)
    if len(set(steps)) > 1:
        raise ValueError(f"save_checkpoint: the ranks passed different steps {steps}; every rank must save "
                         "the same step, at the same point of the loop")
    record: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "rank": rank,
        "world_size": world,
        "extra": {name: obj.state_dict() for name, obj in extra.items()},
        "rng": _rng_state(),
    }
    ckpt.mkdir(parents=True, exist_ok=True)
    if _is_deepspeed_engine(model):
        # The engine writes its own sharded files (and ends with a barrier); its `latest` is ours.
        model.save_checkpoint(str(root), tag=tag, client_state={"lookahead_dist_step": step}, save_latest=False)
        record["deepspeed"] = True
    else:
        record["model"] = _unwrap(model).state_dict()
        record["optimizer"] = None if optimizer is None else optimizer.state_dict()
    _atomic_save(record, ckpt / f"rank_{rank}.pt")
    _fsync_dir(ckpt)
    _barrier(group)  # every rank's file is in place: the checkpoint is complete
    if rank == 0:
        _atomic_write_text(tag, root / LATEST)
        _prune(root, keep, tag)
    return ckpt


def _prune(root: Path, keep: int, current: str) -> None:
    tags = sorted((p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)),
                  key=lambda name: int(_TAG.match(name).group(1)))
    if current not in tags:
        return
    # The `keep` newest up to the current one stay. A directory newer than the current one is a
    # partial save from before a restart (the run writes it again) or a user's: left alone.
    upto = tags.index(current) + 1
    for name in tags[:max(0, upto - keep)]:
        shutil.rmtree(root / name, ignore_errors=True)


def latest_step(path: str | os.PathLike) -> int | None:
    """The step of the last complete checkpoint under ``path``, or None. Reads one small file."""
    latest = Path(path) / LATEST
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    m = _TAG.match(tag)
    if m is None:
        raise ValueError(f"{latest} names {tag!r}, not a checkpoint directory step_NNNNNNNN; it was not "
                         "written by lookahead_dist.checkpointing.save_checkpoint")
    return int(m.group(1))


def load_latest(
    path: str | os.PathLike,
    model: Any,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
    *,
    group: Any = None,
    map_location: Any = "cpu",
    trust_pickle: bool = False,
    safe_globals: Iterable[Any] = (),
) -> int:
    """Load the last complete checkpoint under ``path`` into ``model``, ``optimizer`` and ``extra``.

    A collective when a process group exists (all ranks must find the same checkpoint). Call it
    after building the model, its wrappers and the optimizer (in local-SGD mode, after the
    optimizer has aligned the ranks' initial weights), with the objects passed to
    :func:`save_checkpoint`.

    Files are loaded safely (Note [What loading trusts]): with ``weights_only=True``, so a file that
    names any class or function beyond tensors and plain data is refused and nothing in it runs.

    Args:
        path, model, optimizer, extra, group: as for :func:`save_checkpoint`.
        map_location: ``torch.load``'s, for the rank file.
        trust_pickle: unpickle the files fully (``weights_only=False``), as ``torch.load`` did before
            torch 2.6: only for a checkpoint directory that nobody but your own job can write, whose
            ``extra`` state holds objects that are not plain data. A tampered file can then run any
            code in this process.
        safe_globals: the narrower opt-in: classes (or functions) that your ``extra`` state dicts
            pickle, allowed in addition to torch's default (e.g. ``[MyEnum]``); see
            ``torch.serialization.add_safe_globals``.

    Returns:
        The step of the loaded checkpoint: continue with step ``returned + 1``. 0 when ``path``
        holds no checkpoint yet (nothing is loaded).

    Raises:
        ValueError: the checkpoint was saved by another world size, or with other ``extra`` names.
        FileNotFoundError: ``latest`` names a checkpoint whose file for this rank is missing.
        UnsafeCheckpointError: a file of the checkpoint pickles a global that safe loading does not
            allow (it names the global, ``trust_pickle=True`` and ``safe_globals``).
    """
    if not isinstance(trust_pickle, bool):
        raise TypeError(f"load_latest `trust_pickle` must be a bool, got {trust_pickle!r}")
    safe_globals = list(safe_globals)
    _check_optimizer(model, optimizer, "load_latest")
    extra = _check_extra(extra, "load_latest")
    rank, world = _rank_world(group)
    if rank == 0:
        _warn_if_shared_store()
    root = Path(path)
    step = latest_step(root)
    seen = _gather_int(-1 if step is None else step, group)
    if len(set(seen)) > 1:
        raise RuntimeError(
            f"ranks found different latest checkpoints (step per rank: {['none' if s < 0 else s for s in seen]}); "
            "the checkpoint directory must be one shared file system that every rank reads"
        )
    if step is None:
        return 0
    tag = _tag(step)
    file = root / tag / f"rank_{rank}.pt"
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {root / tag} has no file for rank {rank} ({file.name}); the checkpoint is incomplete "
            f"or was saved by fewer ranks than this job's {world}. Delete {root / LATEST} to start afresh, or "
            "point it at a complete checkpoint"
        )
    deepspeed = _is_deepspeed_engine(model)
    failed: Exception | None = None
    try:
        record = _safe_load.load(file, map_location=map_location, safe_globals=safe_globals,
                                 trust_pickle=trust_pickle, opt_in=_OPT_IN)
    except UnsafeCheckpointError as exc:
        failed = exc
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        older = sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and p.name < tag)
        hint = f"write {older[-1]} into {root / LATEST}" if older else f"delete {root / LATEST} to start afresh"
        damaged = RuntimeError(f"checkpoint file {file} cannot be read ({type(exc).__name__}: {exc}); it is "
                               f"damaged. To resume from the checkpoint before it, {hint}")
        damaged.__cause__ = exc
        if not (deepspeed and not trust_pickle):
            raise damaged from exc
        failed = damaged
    if deepspeed and not trust_pickle:
        # DeepSpeed's loader unpickles its files fully: check them first, and agree, so that every
        # rank raises and none enters DeepSpeed's collectives alone.
        if failed is None:
            try:
                _check_mine(_checkpoint_files(root / tag), safe_globals + _safe_load.deepspeed_safe_globals(),
                            group, _OPT_IN)
            except Exception as exc:  # noqa: BLE001 - raised below, on every rank
                failed = exc
        _agree(failed, root / tag, group)
    elif failed is not None:
        raise failed
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{file} is not a lookahead_dist.checkpointing file (format "
                         f"{record.get('format') if isinstance(record, dict) else type(record).__name__!r})")
    if record["world_size"] != world:
        raise ValueError(
            f"checkpoint {root / tag} was saved by {record['world_size']} ranks, this job has {world}: per-rank "
            f"checkpoints do not reshard. Resume with {record['world_size']} ranks, or save with "
            "torch.distributed.checkpoint to change the world size"
        )
    saved_extra = record["extra"]
    if sorted(saved_extra) != sorted(extra):
        raise ValueError(f"checkpoint {root / tag} has extra entries {sorted(saved_extra)}, load_latest got "
                         f"{sorted(extra)}; pass the same `extra` names as to save_checkpoint")
    if record.get("deepspeed"):
        if not _is_deepspeed_engine(model):
            raise TypeError(f"checkpoint {root / tag} was saved from a DeepSpeed engine; load it into one "
                            f"(got {type(model).__name__})")
        loaded, _ = model.load_checkpoint(str(root), tag=tag)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    else:
        if _is_deepspeed_engine(model):
            raise TypeError(f"checkpoint {root / tag} was saved from a plain module, not a DeepSpeed engine")
        _unwrap(model).load_state_dict(record["model"])
        if optimizer is not None:
            if record["optimizer"] is None:
                raise ValueError(f"checkpoint {root / tag} holds no optimizer state (saved with optimizer=None)")
            optimizer.load_state_dict(record["optimizer"])
    for name, obj in extra.items():
        obj.load_state_dict(saved_extra[name])
    _set_rng_state(record["rng"])
    return step


_OPT_IN = "load it with load_latest(..., trust_pickle=True)"


def check_safe_to_load(path: str | os.PathLike, *, safe_globals: Iterable[Any] = (), group: Any = None) -> int:
    """Check that every ``.pt`` file under ``path`` loads with ``weights_only=True``; unpickle nothing else.

    For a checkpoint that another library loads with ``weights_only=False``, checked first: a
    DeepSpeed checkpoint folder (``lookahead_dist.deepspeed.load_checkpoint``, including a
    universal one, and ``engine.load_checkpoint`` read their files fully). The DeepSpeed types
    its files hold are allowed, and ``safe_globals`` besides. Only the pickled structure is read
    (tensors are memory-mapped, not loaded). A collective when a process group exists: the files
    are split among the ranks of ``group``, and every rank raises if any rank refused a file.

    Returns:
        The number of files this rank checked.

    Raises:
        UnsafeCheckpointError: a file names another global (it names the file and the global).
        FileNotFoundError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"check_safe_to_load: {root} is not a directory")
    failed = None
    count = 0
    try:
        count = _check_mine(_checkpoint_files(root), list(safe_globals) + _safe_load.deepspeed_safe_globals(),
                            group, "skip check_safe_to_load for it")
    except Exception as exc:  # noqa: BLE001 - raised below, on every rank
        failed = exc
    _agree(failed, root, group)
    return count


def _checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.pt") if p.is_file())


def _check_mine(files: list[Path], allowed: list[Any], group: Any, opt_in: str) -> int:
    """Check this rank's share of ``files`` (every world-th, from its rank on); returns how many."""
    rank, world = _rank_world(group)
    mine = files[rank::world]
    _safe_load.check_files(mine, safe_globals=allowed, opt_in=opt_in)
    return len(mine)


def _agree(failed: Exception | None, where: Path, group: Any) -> None:
    """Raise on every rank if any rank failed to check its files (one small all-gather)."""
    flags = _gather_int(0 if failed is None else 1 if isinstance(failed, UnsafeCheckpointError) else 2, group)
    if failed is not None:
        raise failed
    if 1 in flags:
        raise UnsafeCheckpointError(
            f"rank(s) {[r for r, f in enumerate(flags) if f == 1]} refused a file of checkpoint {where}: it pickles "
            "a global that safe loading does not allow (the error on those ranks names the file, the global and "
            "the opt-in)", path=str(where), global_name="")
    if 2 in flags:
        raise RuntimeError(f"rank(s) {[r for r, f in enumerate(flags) if f == 2]} could not read a file of "
                           f"checkpoint {where} (their error names it); it is damaged")


def _warn_if_shared_store() -> None:
    """Note [torchrun's shared store]: restarts would fail to form the process group."""
    try:
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        warnings.warn(
            f"torchrun may restart this job (--max-restarts {restarts}) but shares its TCPStore with the "
            "workers (TORCHELASTIC_USE_AGENT_STORE=True): restarted workers would fail to form the process "
            "group (pytorch/pytorch#135712). Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun and use "
            "the c10d rendezvous (--standalone or --rdzv-backend c10d)",
            UserWarning,
            stacklevel=3,
        )


def _gather_int(value: int, group: Any) -> list[int]:
    """Every rank's ``value`` (one small all-gather; ``[value]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [value]
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return [int(r.item()) for r in rows]
