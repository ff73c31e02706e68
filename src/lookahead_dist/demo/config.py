"""What one demo run trains: :class:`RunConfig`, validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..sync.options import COMM_DTYPES as _COMM_DTYPE_TABLE
from .model import ModelConfig

__all__ = ["BASELINE_MODES", "COMM_DTYPES", "MODES", "OPTIMIZERS", "STREAMING_MODES", "WIRE_MODES", "RunConfig"]

# The one home of these names: the command line (lookahead_dist.cli) and the mode builders use them.
OPTIMIZERS = ("adamw", "lookahead")
#: Every training set-up (see :mod:`.modes`).
MODES = ("ddp", "zero2", "fsdp2", "local-sgd", "post-local-sgd", "accelerate-local-sgd", "torchft-diloco",
         "traffic-only")
#: Baselines from other libraries (plain AdamW, periodic averaging every k steps; benchmarks only).
BASELINE_MODES = ("post-local-sgd", "accelerate-local-sgd", "torchft-diloco")
#: ``comm_dtype`` names: those of the one table in :mod:`lookahead_dist.sync.options`.
COMM_DTYPES = tuple(_COMM_DTYPE_TABLE)
#: Modes with a fragment schedule (``num_fragments``, ``fragment_sync_delay``, ``fragment_update_alpha``).
STREAMING_MODES = ("local-sgd", "torchft-diloco", "traffic-only")
#: Modes that take a wire format (``comm_dtype``, ``topk_fraction``).
WIRE_MODES = ("local-sgd", "traffic-only")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run of the demo.

    Attributes:
        mode: ``ddp`` | ``zero2`` | ``fsdp2`` | ``local-sgd`` (see :mod:`.modes`).
        optimizer: ``adamw``, or ``lookahead`` for ``Lookahead(AdamW)``.
        k: Lookahead sync period (inner steps).
        alpha: Lookahead slow step size, in (0, 1].
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: clip the global gradient norm to this value before each step (0: off).
        steps: optimizer steps.
        batch_size: sequences per step over all ranks (split evenly between them).
        nproc: number of ranks.
        seed: seeds the model initialisation and the batch order.
        eval_batches: validation batches (each ``batch_size`` sequences) for the final val loss.
        model: the transformer's shape.
        device: ``cpu`` or ``cuda`` (resolved, not ``auto``).
        outer_momentum: local-sgd: outer momentum beta in [0, 1) (0: Lookahead's own slow step).
        nesterov: local-sgd: Nesterov outer momentum (needs ``outer_momentum > 0``).
        sharded: local-sgd: each rank keeps 1/N of the slow weights (reduce-scatter + all-gather).
        comm_dtype: local-sgd: dtype of the averaged progress on the wire, ``fp32`` | ``bf16`` | ``fp16``,
            or ``int8`` | ``int4`` | ``int2`` (blockwise absmax-quantised, summed in fp32).
        hierarchical: local-sgd: DDP inside each node (the ``LOCAL_WORLD_SIZE`` ranks of a node),
            local SGD across nodes.
        num_fragments: local-sgd, torchft-diloco: F, fragments synced at staggered steps (``k % F == 0``).
        fragment_sync_delay: local-sgd, torchft-diloco: tau, inner steps between a fragment's send and
            its application (0: blocking; ``tau < k / F``).
        fragment_update_alpha: local-sgd, torchft-diloco: share of the local weights kept when a
            fragment's result is applied, in [0, 1].
        quant_block_size: local-sgd with ``comm_dtype`` int8/int4/int2: values per fp32 scale (even).
        error_feedback: local-sgd with ``comm_dtype`` int8/int4/int2: carry each rank's quantisation
            error into its next send.
        eager_update: local-sgd: False, True (the eager rule: each sync's collective is applied at
            the next sync, the rank's own fresh outer gradient standing in for its share) or
            ``"naive"`` (the delayed average alone), Note [Eager outer updates].
        topk_fraction: local-sgd: send only this fraction of the outer gradient (top-k per block of
            256 values, at the bits of ``comm_dtype`` int8/int4/int2), or None (dense).
        fused_kernels: local-sgd with ``comm_dtype`` int8/int4/int2: the quantisation as compiled
            kernels (Note [Fused quantisation kernels]).
        corpus: training text, ``pydoc`` (documentation prose) or ``stdlib`` (standard-library source).
    """

    mode: str = "ddp"
    optimizer: str = "lookahead"
    k: int = 5
    alpha: float = 0.5
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    steps: int = 300
    batch_size: int = 32
    nproc: int = 2
    seed: int = 0
    eval_batches: int = 8
    model: ModelConfig = ModelConfig()
    device: str = "cpu"
    outer_momentum: float = 0.0
    nesterov: bool = False
    sharded: bool = False
    comm_dtype: str = "fp32"
    hierarchical: bool = False
    num_fragments: int = 1
    fragment_sync_delay: int = 0
    fragment_update_alpha: float = 0.0
    quant_block_size: int = 512
    error_feedback: bool = True
    eager_update: bool | str = False
    topk_fraction: float | None = None
    fused_kernels: bool = False
    corpus: str = "pydoc"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.mode in ("local-sgd", "traffic-only") and self.optimizer != "lookahead":
            raise ValueError(
                f"mode {self.mode!r} runs Lookahead's local-SGD mode and needs optimizer 'lookahead', got {self.optimizer!r}"
            )
        if self.mode in BASELINE_MODES and self.optimizer != "adamw":
            raise ValueError(
                f"mode {self.mode!r} is another library's local SGD around plain AdamW; it needs optimizer "
                f"'adamw', got {self.optimizer!r}"
            )
        if not (0.0 <= self.outer_momentum < 1.0):
            raise ValueError(f"`outer_momentum` must be in [0, 1), got {self.outer_momentum}")
        if self.nesterov and self.outer_momentum == 0.0:
            raise ValueError("`nesterov` needs `outer_momentum` > 0, got 0.0")
        if self.corpus not in ("pydoc", "stdlib"):
            raise ValueError(f"`corpus` must be 'pydoc' or 'stdlib', got {self.corpus!r}")
        if self.comm_dtype not in COMM_DTYPES:
            raise ValueError(f"`comm_dtype` must be one of {', '.join(COMM_DTYPES)}, got {self.comm_dtype!r}")
        if self.mode not in STREAMING_MODES and (self.outer_momentum or self.nesterov):
            raise ValueError(
                f"outer_momentum and nesterov are options of modes {', '.join(STREAMING_MODES)}, not of {self.mode!r}"
            )
        if self.mode not in WIRE_MODES and self.comm_dtype != "fp32" or self.mode != "local-sgd" and (
                self.sharded or self.hierarchical):
            hint = (" (torchft's DiLoCo quantises with Triton kernels only, so on the wire it is fp32 here)"
                    if self.mode == "torchft-diloco" and self.comm_dtype != "fp32" else "")
            raise ValueError(
                f"sharded and hierarchical are options of mode 'local-sgd', comm_dtype of modes "
                f"{', '.join(WIRE_MODES)}; not of {self.mode!r}{hint}"
            )
        self._check_streaming()
        for name in ("k", "steps", "batch_size", "nproc", "eval_batches"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0, got {self.seed!r}")
        if not (0.0 < self.alpha <= 1.0) or math.isnan(self.alpha):
            raise ValueError(f"`alpha` must be in (0, 1], got {self.alpha}")
        if not (self.lr > 0.0) or math.isinf(self.lr):
            raise ValueError(f"`lr` must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0.0) or math.isinf(self.weight_decay):
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if not (self.grad_clip >= 0.0) or math.isinf(self.grad_clip):
            raise ValueError(f"`grad_clip` must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if self.batch_size % self.nproc:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be divisible by the number of ranks `nproc` ({self.nproc})"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"`device` must be 'cpu' or 'cuda', got {self.device!r}")

    def _check_streaming(self) -> None:
        for name in ("num_fragments", "quant_block_size"):
            _positive_int(name, getattr(self, name))
        tau, F, a = self.fragment_sync_delay, self.num_fragments, self.fragment_update_alpha
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
            raise ValueError(f"`fragment_sync_delay` must be an integer >= 0, got {tau!r}")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"`fragment_update_alpha` must be a number in [0, 1], got {a!r}")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"`error_feedback` must be a bool, got {self.error_feedback!r}")
        if self.mode not in STREAMING_MODES and (F != 1 or tau or a):
            raise ValueError(
                "num_fragments, fragment_sync_delay and fragment_update_alpha are options of modes "
                f"{', '.join(STREAMING_MODES)}, not of {self.mode!r}"
            )
        if self.mode in STREAMING_MODES and isinstance(self.k, int) and self.k >= 1:
            if self.k % F:
                raise ValueError(f"`k` ({self.k}) must be a multiple of `num_fragments` ({F}): fragment f syncs "
                                 f"at step f * k / F of each period; choose F among the divisors of k")
            if tau >= self.k // F:
                raise ValueError(f"`fragment_sync_delay` ({tau}) must be < k / num_fragments = {self.k // F}: a "
                                 "fragment must be applied before it is sent again; lower it or use fewer fragments")
        if self.comm_dtype not in ("int8", "int4", "int2") and (self.quant_block_size != 512 or not self.error_feedback):
            raise ValueError(f"quant_block_size and error_feedback apply to comm_dtype int8/int4/int2, not to "
                             f"{self.comm_dtype!r}")
        if self.topk_fraction is not None and self.mode not in WIRE_MODES:
            raise ValueError(f"topk_fraction is an option of modes {', '.join(WIRE_MODES)}, not of {self.mode!r}")
        if self.eager_update is not False and self.mode != "local-sgd":
            raise ValueError(f"eager_update is an option of mode 'local-sgd', not of {self.mode!r}")
        if self.fused_kernels and self.mode != "local-sgd":
            raise ValueError(f"fused_kernels is an option of mode 'local-sgd', not of {self.mode!r}")
        if self.eager_update is not False or self.topk_fraction is not None or self.fused_kernels:
            from ..sync.options import COMM_DTYPES as _TABLE, LocalSGDOptions

            # The library's own checks (the combinations it refuses), before any process starts.
            LocalSGDOptions(eager_update=self.eager_update, topk_fraction=self.topk_fraction,
                            fused_kernels=self.fused_kernels,
                            comm_dtype=_TABLE[self.comm_dtype] if self.comm_dtype != "fp32" else None,
                            # hierarchical sharding (an intra group, made at run time) sends progress,
                            # so comm_dtype is allowed there: checked as flat here
                            sharded=self.sharded and not self.hierarchical, num_fragments=self.num_fragments,
                            fragment_sync_delay=self.fragment_sync_delay,
                            fragment_update_alpha=self.fragment_update_alpha,
                            quant_block_size=self.quant_block_size, init="none")

    @property
    def name(self) -> str:
        """Short label, e.g. ``ddp/lookahead``."""
        return f"{self.mode}/{self.optimizer}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
