"""Lookahead under the Hugging Face Trainer with DeepSpeed: :class:`LookaheadTrainer` reads the ``"lookahead"`` block.

    from lookahead_dist.hf import LookaheadTrainer

    args = TrainingArguments(output_dir="out", deepspeed="ds_config.json", ...)
    trainer = LookaheadTrainer(model=model, args=args, train_dataset=data)   # as Trainer(...)
    trainer.train()

with ``"lookahead": {"k": 5, "alpha": 0.5}`` in ``ds_config.json`` beside the rest of the DeepSpeed
config. The Trainer builds its optimizer as it always does (``optim``, ``learning_rate``,
``weight_decay``, ``optimizer_cls_and_kwargs``); :class:`LookaheadTrainer` puts a
:class:`~lookahead_dist.Lookahead` with the block's ``k``, ``alpha``, ``pullback`` and
``slow_dtype`` around it before DeepSpeed sees it, so the engine steps the Lookahead and its
checkpoints carry the slow weights and cycle positions. On resume the block's k and alpha win over
the checkpoint's (Note [Resuming with another k or alpha] in :mod:`lookahead_dist.deepspeed.engine`).

Why a subclass: the plain ``transformers.Trainer`` does not know the block (DeepSpeed ignores
top-level keys it does not know), and under DeepSpeed it discards an optimizer given as
``optimizers=(Lookahead(...), scheduler)`` and builds AdamW: both run without Lookahead and
without a word. :class:`LookaheadTrainer` refuses what it cannot honour, when it is constructed:

- ``optimizers=(Lookahead(...), ...)`` under DeepSpeed (``ValueError``: write the block instead);
- a block with a config ``"optimizer"`` block (DeepSpeed would build that optimizer itself, out of
  the Trainer's reach), with an ``optimizer_cls_and_kwargs`` class that already is a Lookahead
  (two k's), or with ``"local_sgd"`` other than false (the Trainer builds the engine through
  accelerate, with no place for the node groups or the all-reduce switch: use
  :func:`lookahead_dist.accelerate.prepare` or :func:`lookahead_dist.deepspeed.initialize`);
- a top-level key that looks like a misspelled ``"lookahead"``;

and checks when training begins that the engine steps a Lookahead (``RuntimeError`` otherwise).
Under optimizer offload it sets ``"zero_force_ds_cpu_optimizer": false`` if unset (with a
warning), as :func:`lookahead_dist.accelerate.prepare` does. Without DeepSpeed it is the plain
Trainer (pass ``optimizers=(Lookahead(...), scheduler)`` there: the Trainer keeps it).

transformers is imported when ``LookaheadTrainer`` is first used, not by ``import lookahead_dist.hf``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from .lookahead import Lookahead, find_lookahead

__all__ = ["LookaheadTrainer"]

if TYPE_CHECKING:
    from transformers import Trainer as LookaheadTrainer


def _make_trainer_class() -> type:
    from transformers import Trainer, TrainerCallback

    from .accelerate import _keep_client_optimizer_under_offload, lookahead_config_from
    from .deepspeed.engine import _config_wins_on_load

    class _StepsLookahead(TrainerCallback):
        """At ``on_train_begin`` (the engine is built): the engine must step a Lookahead."""

        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            engine = self.trainer.model_wrapped
            if find_lookahead(engine) is None:
                stepped = getattr(getattr(engine, "optimizer", None), "optimizer", getattr(engine, "optimizer", None))
                raise RuntimeError(
                    'LookaheadTrainer: the DeepSpeed config has a "lookahead" block but the engine steps '
                    f"{type(stepped).__name__}, not a Lookahead (was create_optimizer overridden?); Lookahead "
                    "would silently not run"
                )

    class LookaheadTrainer(Trainer):  # type: ignore[misc,valid-type]
        """``transformers.Trainer`` that honours the ``"lookahead"`` block of its DeepSpeed config.

        Same arguments as ``Trainer``. See :mod:`lookahead_dist.hf`.
        """

        _lookahead_block: dict[str, Any] | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not self.is_deepspeed_enabled:
                return
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            if self.args.world_size == 1 < launched and not self.args.use_cpu and not torch.cuda.is_available():
                # DeepSpeed would stop in its batch-size assertion (train_batch_size != micro x accumulation x world)
                raise ValueError(
                    f"TrainingArguments see 1 process but {launched} were launched (WORLD_SIZE): on a machine "
                    "without CUDA, set TrainingArguments(use_cpu=True, ddp_backend=\"gloo\") and DS_ACCELERATOR=cpu "
                    "(docs/deepspeed.md, \"The Hugging Face Trainer\")"
                )
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            block = lookahead_config_from(config)  # also refuses a misspelled block name
            if isinstance(self.optimizer, Lookahead):
                raise ValueError(
                    "under DeepSpeed the Trainer discards optimizers=(...) and builds its own optimizer, so the "
                    'Lookahead passed would not run: write its k and alpha in a "lookahead" block of the DeepSpeed '
                    "config and pass the plain optimizer settings (optim, learning_rate, ...) to TrainingArguments"
                )
            if block is None:
                return
            if "optimizer" in config:
                raise ValueError(
                    'DeepSpeed config has a "lookahead" block and an "optimizer" block: under the Trainer DeepSpeed '
                    'then builds the optimizer itself, out of reach of a wrapper. Remove the "optimizer" block '
                    "(the Trainer builds the optimizer from TrainingArguments: optim, learning_rate, weight_decay)"
                )
            if block["local_sgd"]:
                value = "true" if block["local_sgd"] is True else '{"across": "nodes", ...}'
                raise ValueError(
                    f'"lookahead.local_sgd": {value} is '
                    "not supported under the Hugging Face Trainer (it builds the DeepSpeed engine through "
                    "accelerate, with no place for local SGD's process groups); set it to false, or train with "
                    "lookahead_dist.accelerate.prepare or lookahead_dist.deepspeed.initialize"
                )
            cls = (self.optimizer_cls_and_kwargs or (None,))[0]
            if isinstance(cls, type) and issubclass(cls, Lookahead):
                raise ValueError(
                    f'DeepSpeed config has a "lookahead" block and optimizer_cls_and_kwargs builds a Lookahead '
                    f"({cls.__name__}): give k and alpha in one place (a plain optimizer class, or no block)"
                )
            _keep_client_optimizer_under_offload(config, "LookaheadTrainer", stacklevel=3)
            self._lookahead_block = block
            self.add_callback(_StepsLookahead(self))

        def create_optimizer(self, model: Any = None) -> Any:
            """The Trainer's optimizer, in a Lookahead with the block's settings (when there is a block)."""
            super().create_optimizer(model)
            block = self._lookahead_block
            if block is not None and not isinstance(self.optimizer, Lookahead):
                self.optimizer = Lookahead(self.optimizer, k=block["k"], alpha=block["alpha"],
                                           pullback=block["pullback"], slow_dtype=block["slow_dtype"])
                _config_wins_on_load(self.optimizer, block["k"], block["alpha"])
            return self.optimizer

    LookaheadTrainer.__module__ = __name__
    return LookaheadTrainer


def __getattr__(name: str) -> Any:
    if name == "LookaheadTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
