"""What one demo run trains: :class:`RunConfig`, validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .model import ModelConfig

__all__ = ["OPTIMIZERS", "RunConfig"]

OPTIMIZERS = ("adamw", "lookahead")
_MODES = ("ddp", "zero2", "fsdp2", "local-sgd")


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

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.mode == "local-sgd" and self.optimizer != "lookahead":
            raise ValueError(
                f"mode 'local-sgd' is Lookahead's local-SGD mode and needs optimizer 'lookahead', got {self.optimizer!r}"
            )
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

    @property
    def name(self) -> str:
        """Short label, e.g. ``ddp/lookahead``."""
        return f"{self.mode}/{self.optimizer}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
