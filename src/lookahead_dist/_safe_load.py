"""Reading checkpoint files without running code from them.

Note [Safe loading]
-------------------
A ``.pt`` file is a pickle: loaded with ``torch.load(..., weights_only=False)`` it may call any
Python function it names (``os.system``, ...), so a checkpoint that someone else could write is a
way to run code in the training job. Every file this package reads is loaded with
``weights_only=True``: torch's restricted unpickler, which builds tensors, containers and plain
values and refuses every other global. What our own files need beyond that default is
allow-listed here, per call (``torch.serialization.safe_globals``), never process-wide:

- ``lookahead_dist.checkpointing`` rank files: nothing. Model and optimizer state dicts (a
  Lookahead's included), torch's LR schedulers' and GradScaler's state dicts and the RNG state are
  tensors, dicts, lists, tuples, numbers and strings, all of which torch's default allows.
- DeepSpeed's files (``*_optim_states.pt``, ``*_model_states.pt`` and a universal checkpoint's
  ``zero/optimizer_state.pt``; found by saving ZeRO-0/1/2/3 and bf16 checkpoints with DeepSpeed
  0.19): :func:`deepspeed_safe_globals`. They are a loss scaler, an enum and a two-field dataclass,
  whose constructors only store their arguments.

A file that names anything else (a user's ``extra`` object that is not plain data, a
``client_state`` object, or a tampered file) is refused with :class:`UnsafeCheckpointError`,
which names the global and the explicit opt-in of the function that read it (``trust_pickle=True``:
unpickle fully, for files the user trusts; or ``safe_globals=[...]``: allow just those types).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "check_files", "deepspeed_safe_globals", "load"]

_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds a pickled global (a class or function) that safe loading refuses.

    Attributes:
        path: the file.
        global_name: the refused global, as the pickle names it (``"posix.system"``, ``"mymod.Cls"``).
    """

    def __init__(self, message: str, *, path: str, global_name: str) -> None:
        super().__init__(message)
        self.path = path
        self.global_name = global_name


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed types its checkpoint files pickle (Note [Safe loading]); [] without DeepSpeed."""
    import importlib

    found = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def _refused_global(exc: BaseException) -> tuple[str, bool] | None:
    """(global name, whether its module is blocked outright) of a weights-only refusal, else None."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    m = _GLOBAL.search(text)
    if m is None:
        return None
    return m.group(1), "is blocked" in text[m.end():m.end() + 200]


def load(path: str | os.PathLike, *, map_location: Any = "cpu", safe_globals: Iterable[Any] = (),
         trust_pickle: bool = False, opt_in: str, mmap: bool = False) -> Any:
    """``torch.load(path)`` with ``weights_only=True`` and ``safe_globals`` allowed, or fully if trusted.

    ``opt_in`` says, for the error message, what a user who trusts the file does (e.g. ``"load it
    with load_latest(..., trust_pickle=True)"``).

    Raises:
        UnsafeCheckpointError: the file names a global that is not allowed.
    """
    if trust_pickle:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    allowed = list(safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc)
        if refused is None:
            raise
        name, blocked = refused
        if blocked:
            narrower = " (its module is one that weights-only loading never allows, so safe_globals cannot help)"
        else:
            narrower = f"; or, if {name} is a data type of yours, allow just it with safe_globals=[{name}]"
        raise UnsafeCheckpointError(
            f"{os.fspath(path)} holds a pickled {name}, which safe loading refuses: unpickling it could run "
            f"code from the file. If you trust this file (your own job wrote it and nobody else can write "
            f"its directory), {opt_in}{narrower}",
            path=os.fspath(path),
            global_name=name,
        ) from None


def check_files(paths: Sequence[str | os.PathLike], *, safe_globals: Iterable[Any] = (), opt_in: str) -> None:
    """Unpickle each file with :func:`load` (tensors memory-mapped, not read) and drop the result.

    For files that another library then loads with ``weights_only=False``: a refused global stops
    the load before that library unpickles anything.

    Raises:
        UnsafeCheckpointError: a file names a global that is not allowed.
        RuntimeError: a file cannot be read (damaged), naming it.
    """
    allowed = list(safe_globals)
    for path in paths:
        try:
            try:
                load(path, safe_globals=allowed, opt_in=opt_in, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # a file in torch's legacy (non-zip) format cannot be mapped
                    raise
                load(path, safe_globals=allowed, opt_in=opt_in)
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise RuntimeError(f"checkpoint file {os.fspath(path)} cannot be read ({type(exc).__name__}: {exc}); "
                               "it is damaged") from exc
