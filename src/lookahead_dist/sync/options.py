"""The settings of the local-SGD strategies: :class:`LocalSGDOptions` and all of its checks.

Every field is checked when the options are built, including what a torchft ``manager`` rules out
(:func:`check_manager_options`), so a strategy never re-checks. :data:`COMM_DTYPES` is the one table
of wire dtypes by name, shared by the DeepSpeed config block and the demo's command line.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["COMM_DTYPES", "DDPPolicy", "InitMode", "LocalSGDOptions", "check_manager_options", "is_ddp"]

#: ``comm_dtype`` by the name configs and command lines use: a torch dtype sent as is, or a
#: blockwise-quantised format (Note [Quantised sync] in local_sgd.py).
COMM_DTYPES: dict[str, torch.dtype | str] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": "int8",
    "int4": "int4",
    "int2": "int2",
}

InitMode = Literal["broadcast", "check", "none"]
DDPPolicy = Literal["warn", "raise"]
_COMM_DTYPES = tuple(v for v in COMM_DTYPES.values() if isinstance(v, torch.dtype))
_QUANT_BITS = {"int8": 8, "int4": 4, "int2": 2}
_MANAGER_METHODS = ("start_quorum", "allreduce", "should_commit", "register_state_dict_fn")


def is_ddp(module: Any) -> bool:
    """True for a ``DistributedDataParallel`` wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel)


@dataclass
class LocalSGDOptions:
    """Settings of the local-SGD mode; every field is checked at construction.

    Args:
        process_group: the ranks whose fast weights are averaged (default: the world).
        outer_momentum: beta in [0, 1) of Note [The outer step]; 0 = Lookahead (default).
        nesterov: Nesterov outer momentum (DiLoCo); needs ``outer_momentum > 0``.
        sharded: keep 1/N of the slow weights and outer momenta per rank (Note [What goes on the wire]).
        comm_dtype: dtype of the pseudo-gradient on the wire (``torch.bfloat16``/``float16``), or
            ``"int8"``/``"int4"``/``"int2"``: blockwise absmax-quantised, summed in fp32 (Note [Quantised sync]);
            None sends the slow weights' dtype. Not with ``sharded=True`` unless ``intra_group`` is set
            (or, a float dtype, with ``eager_update``: it sends progress).
        module: the trained module (or its DDP wrapper): its buffers are averaged at each sync,
            and a DDP wrapper is watched for per-step gradient all-reduces.
        buffers: explicit buffers to average instead of ``module``'s.
        intra_group: hierarchical mode: this rank's group of identical replicas (DDP inside).
        init: ``"broadcast"`` | ``"check"`` | ``"none"``: Note [Same starting weights].
        on_ddp_sync: ``"warn"`` | ``"raise"``: Note [DDP still all-reducing].
        bucket_cap_mb: largest flat communication bucket, in MiB (a larger tensor gets its own).
        num_fragments: F, the step unit is split into F fragments synced at staggered steps, each
            moving 1/F of the model; ``k % F == 0`` (Note [Fragments], Note [Streaming schedule]).
        fragment_sync_delay: tau, counted steps between a fragment's launch and its application
            (0: blocking); ``tau < k / F``. torchtitan/torchft name it alike.
        fragment_update_alpha: a in [0, 1]: at the apply step the fragment's fast weights become
            ``a * theta_local + (1 - a) * phi_new`` (Note [What the tau steps keep]).
        fragments: explicit fragments, a list (one per fragment) of lists of module FQN prefixes;
            needs ``module``. Overrides the equal-bytes split; ``num_fragments`` is its length.
        outer_optimizer: a callable ``params -> torch.optim.Optimizer`` (``params``: one param-group
            dict per Lookahead param group) stepped on the (sharded) slow weights with the averaged
            pseudo-gradient as ``.grad``; replaces the built-in outer step (``alpha``,
            ``outer_momentum``, ``nesterov``). Reach it as ``opt.local_sgd.outer_optimizer``.
        quant_block_size: elements per fp32 scale with ``comm_dtype="int8"/"int4"/"int2"`` (even, a
            multiple of 4 for int2; default 512).
        error_feedback: with ``comm_dtype="int8"/"int4"/"int2"``, keep each rank's quantisation error and
            add it to the next send (per parameter, checkpointed); default True.
        topk_fraction: None (default: dense) or a float in (0, 1]: send only the largest
            ``round(topk_fraction * 256)`` of every 256 entries of the progress, their values at the
            bits of ``comm_dtype`` (``"int8"``/``"int4"``/``"int2"``, required), exchanged by
            all-gather; with ``error_feedback`` what was not sent is kept for the next sync (Note
            [Sparse outer gradients] in _sparse.py). With ``sharded=True``: with an ``intra_group``
            (each local rank's chunk of the progress all-gathered across the groups), or with
            ``eager_update`` (reduce-scattered: each chunk encoded on its own, one all-to-all). Not
            with a ``manager``.
        timeout: seconds (or a ``datetime.timedelta``) a sync waits for its collectives before
            raising ``TimeoutError`` naming the sync, the step and the group; None: the process
            group's own timeout.
        manager: a ``torchft.Manager``: the sync goes through it and survives lost replica groups
            (:mod:`lookahead_dist.sync.ft`, ``docs/fault-tolerance.md``; extra ``[ft]``).
        eager_update: ``True``: each fragment's collective is applied at that fragment's *next* sync
            (a delay of one whole outer step) with the eager rule of Kale, Douillard & Donchev
            (2025, arXiv 2502.12996); ``"naive"``: the same delay with the naive delayed rule (for
            comparison); ``False`` (default): off (Note [Eager outer updates] in sync/_outer.py).
            With ``sharded=True`` the outer gradient (progress) is reduce-scattered in
            ``comm_dtype`` (int8/int4/int2: quantised, or with ``topk_fraction`` top-k encoded, by
            each sender with a whole-size error-feedback residual, summed by the owner in fp32; hierarchical: chunk r
            all-reduced across the groups), each rank steps its own chunk, and the new slow
            weights are all-gathered at the sync (in the parameters' dtype). Not with ``fragment_sync_delay > 0``,
            ``fragment_update_alpha > 0`` or a ``manager``.
        fused_kernels: with ``comm_dtype="int8"/"int4"/"int2"`` (dense), run the sender's
            quantisation with error feedback and the owner's sum-and-requantise as
            ``torch.compile``d kernels: the same numbers (bit for bit), a few passes over the
            fragment instead of about ten each (Note [Fused quantisation kernels] in _fused.py).
            Opt-in: each kernel compiles at its first sync (seconds; a CPU needs a C++ compiler).
            Not with ``topk_fraction`` (the sparse encoder has no fused kernel).
    """

    process_group: dist.ProcessGroup | None = None
    outer_momentum: float = 0.0
    nesterov: bool = False
    sharded: bool = False
    comm_dtype: torch.dtype | None = None
    module: torch.nn.Module | None = None
    buffers: Iterable[torch.Tensor] | None = None
    intra_group: dist.ProcessGroup | None = None
    init: InitMode = "broadcast"
    on_ddp_sync: DDPPolicy = "warn"
    bucket_cap_mb: float = 25.0
    num_fragments: int = 1
    fragment_sync_delay: int = 0
    fragment_update_alpha: float = 0.0
    fragments: list[list[str]] | None = None
    outer_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None
    quant_block_size: int = 512
    error_feedback: bool = True
    timeout: float | datetime.timedelta | None = None
    manager: Any = None
    eager_update: bool | Literal["naive"] = False
    topk_fraction: float | None = None
    fused_kernels: bool = False
    _buffers: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        beta = self.outer_momentum
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"LocalSGDOptions `outer_momentum` must be a float in [0, 1), got {beta!r}")
        if math.isnan(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"LocalSGDOptions `outer_momentum` must be in [0, 1), got {beta}")
        self.outer_momentum = float(beta)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"LocalSGDOptions `nesterov` must be a bool, got {self.nesterov!r}")
        if self.nesterov and self.outer_momentum == 0.0:
            raise ValueError("LocalSGDOptions `nesterov=True` needs `outer_momentum` > 0, got 0.0")
        if not isinstance(self.sharded, bool):
            raise TypeError(f"LocalSGDOptions `sharded` must be a bool, got {self.sharded!r}")
        if self.comm_dtype is not None and self.comm_dtype not in _COMM_DTYPES and not (
                isinstance(self.comm_dtype, str) and self.comm_dtype in _QUANT_BITS):
            raise ValueError(
                f"LocalSGDOptions `comm_dtype` must be None, one of {_COMM_DTYPES} or 'int8'/'int4'/'int2', got "
                f"{self.comm_dtype!r}")
        if self.sharded and self.intra_group is None and self.comm_dtype not in (None, torch.float32):
            eager = self.eager_update is True or self.eager_update == "naive"
            if not eager:
                raise ValueError(
                    f"LocalSGDOptions `comm_dtype={self.comm_dtype}` needs the full slow weights on each rank to "
                    "send progress; with `sharded=True` the fast weights themselves are reduce-scattered. Use "
                    "sharded=False, an intra_group (hierarchical sharding sends progress), or eager_update=True (the "
                    "eager rule reduce-scatters progress)"
                )
        self._check_streaming()
        self._check_sparse()
        self._check_fused()
        if self.init not in ("broadcast", "check", "none"):
            raise ValueError(f"LocalSGDOptions `init` must be 'broadcast', 'check' or 'none', got {self.init!r}")
        if self.on_ddp_sync not in ("warn", "raise"):
            raise ValueError(f"LocalSGDOptions `on_ddp_sync` must be 'warn' or 'raise', got {self.on_ddp_sync!r}")
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or math.isinf(cap):
            raise ValueError(f"LocalSGDOptions `bucket_cap_mb` must be a finite number > 0, got {cap!r}")
        if self.module is not None and not isinstance(self.module, torch.nn.Module):
            raise TypeError(f"LocalSGDOptions `module` must be a torch.nn.Module, got {type(self.module).__name__}")
        if self.buffers is not None:
            bufs = list(self.buffers)
            bad = [type(b).__name__ for b in bufs if not isinstance(b, torch.Tensor)]
            if bad:
                raise TypeError(f"LocalSGDOptions `buffers` must hold tensors, got {bad[:3]}")
            # An iterator (module.buffers()) would be spent after one read: keep the list.
            self.buffers = self._buffers = bufs
        if self.manager is not None:
            check_manager_options(self)
        for name in ("process_group", "intra_group"):
            pg = getattr(self, name)
            if pg is not None and not isinstance(pg, dist.ProcessGroup):
                raise TypeError(f"LocalSGDOptions `{name}` must be a torch.distributed.ProcessGroup or None, "
                                f"got {type(pg).__name__}")

    def _check_streaming(self) -> None:
        """Checks of the streaming, quantisation, outer-optimizer and timeout fields."""
        for name in ("num_fragments", "fragment_sync_delay", "quant_block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LocalSGDOptions `{name}` must be an int, got {v!r}")
        if self.num_fragments < 1:
            raise ValueError(f"LocalSGDOptions `num_fragments` must be >= 1, got {self.num_fragments}")
        if self.fragment_sync_delay < 0:
            raise ValueError(f"LocalSGDOptions `fragment_sync_delay` must be >= 0, got {self.fragment_sync_delay}")
        a = self.fragment_update_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or math.isnan(a) or not 0.0 <= a <= 1.0:
            raise ValueError(f"LocalSGDOptions `fragment_update_alpha` must be a float in [0, 1], got {a!r}")
        self.fragment_update_alpha = float(a)
        if self.fragments is not None:
            fr = self.fragments
            if (isinstance(fr, (str, bytes)) or not isinstance(fr, (list, tuple)) or not fr
                    or any(isinstance(g, (str, bytes)) or not isinstance(g, (list, tuple)) or not g
                           or not all(isinstance(x, str) and x for x in g) for g in fr)):
                raise TypeError(
                    "LocalSGDOptions `fragments` must be a non-empty list of non-empty lists of module FQN "
                    f"prefixes (str), one list per fragment, e.g. [['layers.0', 'layers.1'], ['layers.2']]; got {fr!r}")
            if self.module is None:
                raise ValueError("LocalSGDOptions `fragments` names module parameters: pass `module=` too")
            if self.num_fragments not in (1, len(fr)):
                raise ValueError(f"LocalSGDOptions `num_fragments={self.num_fragments}` disagrees with the "
                                 f"{len(fr)} lists in `fragments`; drop num_fragments")
            self.fragments = [list(g) for g in fr]
            self.num_fragments = len(fr)
        if self.outer_optimizer is not None:
            if not callable(self.outer_optimizer) or isinstance(self.outer_optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "LocalSGDOptions `outer_optimizer` must be a callable params -> torch.optim.Optimizer, e.g. "
                    "lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True); got "
                    f"{type(self.outer_optimizer).__name__}")
            if self.outer_momentum or self.nesterov:
                raise ValueError(
                    "LocalSGDOptions `outer_optimizer` replaces the built-in outer step; drop `outer_momentum`/"
                    f"`nesterov` (got outer_momentum={self.outer_momentum}, nesterov={self.nesterov}) and give "
                    "them to the outer optimizer")
        if self.quant_block_size < 2 or self.quant_block_size % 2:
            raise ValueError(f"LocalSGDOptions `quant_block_size` must be an even number >= 2, got "
                             f"{self.quant_block_size}")
        if not isinstance(self.error_feedback, bool):
            raise TypeError(f"LocalSGDOptions `error_feedback` must be a bool, got {self.error_feedback!r}")
        self._check_eager()
        t = self.timeout
        if t is not None:
            secs = t.total_seconds() if isinstance(t, datetime.timedelta) else t
            if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not secs > 0 or math.isinf(secs):
                raise ValueError(f"LocalSGDOptions `timeout` must be None, a number of seconds > 0 or a "
                                 f"datetime.timedelta, got {t!r}")

    def _check_sparse(self) -> None:
        """Checks of ``topk_fraction`` and of int2's block size (Note [Sparse outer gradients] in _sparse.py)."""
        if self.comm_dtype == "int2" and self.quant_block_size % 4:
            raise ValueError(f"LocalSGDOptions `quant_block_size` must be a multiple of 4 with comm_dtype='int2' "
                             f"(four codes per byte), got {self.quant_block_size}")
        f = self.topk_fraction
        if f is None:
            return
        if isinstance(f, bool) or not isinstance(f, (int, float)) or math.isnan(f) or not 0.0 < f <= 1.0:
            raise ValueError(f"LocalSGDOptions `topk_fraction` must be None or a float in (0, 1], got {f!r}")
        self.topk_fraction = float(f)
        if not (isinstance(self.comm_dtype, str) and self.comm_dtype in _QUANT_BITS):
            raise ValueError(
                f"LocalSGDOptions `topk_fraction={f}` sends its values at the bits of `comm_dtype`: set "
                f"comm_dtype='int8', 'int4' or 'int2', got comm_dtype={self.comm_dtype!r}")
        if self.manager is not None:
            raise ValueError(
                f"LocalSGDOptions `topk_fraction={f}` is not supported with `manager={self.manager!r}`: the sparse "
                "exchange is implemented for the process groups of the flat and plain sharded modes; use no "
                "manager, or topk_fraction=None")
        if self.sharded and self.intra_group is None and self.eager_update is False:
            raise ValueError(
                f"LocalSGDOptions `topk_fraction={f}` with `sharded=True`: without `eager_update` the sharded "
                "sync reduce-scatters weights, which cannot be sparsified; use eager_update=True (each rank's "
                "progress is top-k encoded per chunk and reduce-scattered), an intra_group (hierarchical: each "
                "rank's chunk of the progress is exchanged), sharded=False, or topk_fraction=None")

    def _check_fused(self) -> None:
        """Checks of ``fused_kernels`` (Note [Fused quantisation kernels] in _fused.py)."""
        if not isinstance(self.fused_kernels, bool):
            raise TypeError(f"LocalSGDOptions `fused_kernels` must be a bool, got {self.fused_kernels!r}")
        if not self.fused_kernels:
            return
        if self.quant_bits is None:
            raise ValueError(
                "LocalSGDOptions `fused_kernels=True` fuses the quantised wire's kernels: set comm_dtype='int8', "
                f"'int4' or 'int2', got comm_dtype={self.comm_dtype!r} (nothing would be fused)")
        if self.topk_fraction is not None:
            raise ValueError(
                f"LocalSGDOptions `fused_kernels=True` has no kernel for the sparse exchange "
                f"(`topk_fraction={self.topk_fraction}`); drop one of them")

    def _check_eager(self) -> None:
        """Checks of ``eager_update`` (Note [Eager outer updates] in sync/_outer.py)."""
        e = self.eager_update
        if not (e is True or e is False or e == "naive"):
            raise ValueError(f"LocalSGDOptions `eager_update` must be True, False or 'naive', got {e!r}")
        if e is False:
            return
        for name, bad in (("fragment_sync_delay", self.fragment_sync_delay),
                          ("fragment_update_alpha", self.fragment_update_alpha)):
            if bad:
                raise ValueError(
                    f"LocalSGDOptions `eager_update={e!r}` cannot be combined with `{name}={bad!r}`: the eager "
                    "and naive delayed rules apply each collective one whole outer step later and restart the "
                    f"fragment from the global slow weights; leave `{name}` at its default")

    @property
    def eager_rule(self) -> str | None:
        """``"eager"`` or ``"naive"`` with ``eager_update=True``/``"naive"``, else None."""
        return None if self.eager_update is False else ("naive" if self.eager_update == "naive" else "eager")

    @property
    def quant_bits(self) -> int | None:
        """8, 4 or 2 with ``comm_dtype="int8"/"int4"/"int2"``, else None."""
        return _QUANT_BITS.get(self.comm_dtype) if isinstance(self.comm_dtype, str) else None

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, across: str | int = 0, within: str | int | None = None,
                  **kwargs: Any) -> LocalSGDOptions:
        """Options for a 2-D mesh: local SGD across dimension ``across``; ``within`` is the
        dimension of identical replicas (DDP inside a node), or None for FSDP2/HSDP inside."""
        if mesh.ndim not in (1, 2):
            raise ValueError(f"LocalSGDOptions.from_mesh needs a 1-D or 2-D DeviceMesh, got {mesh.ndim}-D")
        intra = None if within is None else mesh.get_group(within)
        return cls(process_group=mesh.get_group(across), intra_group=intra, **kwargs)

    def buffer_list(self) -> list[torch.Tensor]:
        if self._buffers is not None:
            return self._buffers
        if self.module is None:
            return []
        module = getattr(self.module, "module", self.module) if is_ddp(self.module) else self.module
        return list(module.buffers())


def check_manager_options(o: LocalSGDOptions) -> None:
    """The checks ``LocalSGDOptions(manager=...)`` adds for the torchft strategy (from ``__post_init__``)."""
    missing = [name for name in _MANAGER_METHODS if not callable(getattr(o.manager, name, None))]
    if missing:
        raise TypeError(f"LocalSGDOptions `manager` must be a torchft.Manager, got {type(o.manager).__name__} "
                        f"(no {', '.join(missing)})")
    for name in ("process_group", "intra_group"):
        if getattr(o, name) is not None:
            raise ValueError(f"LocalSGDOptions `{name}` cannot be combined with `manager`: the torchft "
                             f"Manager's process group connects the replica groups; drop `{name}`")
    if o.sharded:
        raise ValueError("LocalSGDOptions `sharded=True` is not supported with a torchft `manager`: its gloo "
                         "process group has no reduce-scatter, and a lost replica group would take its chunk "
                         "of the slow weights with it; use sharded=False")
    if o.comm_dtype not in (None, torch.float32):
        raise ValueError(f"LocalSGDOptions `comm_dtype={o.comm_dtype}` is not supported with a torchft `manager`; "
                         "use comm_dtype=None")
    # Streaming and the other blocking-mode extras are not implemented on the managed path.
    for name, default in (("num_fragments", 1), ("fragments", None), ("fragment_sync_delay", 0),
                          ("fragment_update_alpha", 0.0), ("outer_optimizer", None), ("timeout", None),
                          ("eager_update", False)):
        value = getattr(o, name, default)
        if value != default if default is not None else value is not None:
            hint = ("set the timeouts on the Manager and its ProcessGroupGloo instead" if name == "timeout"
                    else "use the blocking managed sync (leave it at its default)")
            raise ValueError(f"LocalSGDOptions `{name}={value!r}` is not supported with a torchft `manager`; {hint}")

