"""Lookahead with the Hugging Face Trainer: pass it in ``optimizers=(Lookahead(...), scheduler)``.

    python launch/hf_trainer.py --output-dir out                        # one process
    torchrun --nproc-per-node 2 launch/hf_trainer.py --output-dir out   # DDP (gloo on CPU)
    python launch/hf_trainer.py --output-dir out2 --resume out/checkpoint-5

A tiny GPT-2 built from its config (nothing downloaded; run with ``HF_HUB_OFFLINE=1`` to be
sure), a synthetic token dataset, ``Lookahead(AdamW, k=3)`` and a linear-decay schedule.
The Trainer saves ``optimizer.pt`` from ``optimizer.state_dict()``, which for a Lookahead holds
the slow weights and the cycle counters beside AdamW's moments, so ``--resume`` from a checkpoint
taken mid-cycle (step 5 of k=3 by default) continues the uninterrupted run exactly
(``tests/distributed/test_hf_trainer.py``). The last line printed is ``RESULT step=... checksum=...``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from lookahead_dist import Lookahead
from lookahead_dist.distributed import exit_process

VOCAB, SEQ = 64, 16


def build_model(seed: int = 0) -> torch.nn.Module:
    """A 1-layer GPT-2 (about 30k parameters) constructed from its config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def build_dataset(n: int = 96, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Token sequences that repeat a short random pattern: a model can learn them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        pattern = torch.randint(0, VOCAB, (4,), generator=g)
        ids = pattern.repeat(SEQ // 4)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


class LookaheadAdamW(Lookahead):
    """``Lookahead(AdamW(params, **kwargs), k, alpha)`` as a class, for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer builds an optimizer from a class only when it is an ``Optimizer`` subclass (other
    callables it treats as factories of another shape). Needed where the Trainer must build the
    optimizer itself: under DeepSpeed it discards ``optimizers=(...)`` and builds its own.
    """

    def __init__(self, params: Any, k: int = 5, alpha: float = 0.5, **adamw_kwargs: Any) -> None:
        super().__init__(torch.optim.AdamW(params, **adamw_kwargs), k=k, alpha=alpha)


def build_trainer(output_dir: str, *, k: int = 3, alpha: float = 0.5, lr: float = 3e-3, max_steps: int = 8,
                  save_steps: int = 5, batch: int = 4, seed: int = 0, deepspeed: dict[str, Any] | None = None,
                  **args: Any):
    """A Trainer whose optimizer is ``Lookahead(AdamW)`` with a linear-decay LR schedule.

    Plain (DDP or one process): ``optimizers=(Lookahead(...), scheduler)``. With a DeepSpeed config
    the Trainer discards a given optimizer, so it gets the class instead
    (``optimizer_cls_and_kwargs=(LookaheadAdamW, {...})``) and builds its own linear schedule.
    """
    from transformers import Trainer, TrainingArguments

    model = build_model(seed)
    adamw = {"lr": lr, "weight_decay": 0.01}
    if deepspeed is None:
        optimizer = Lookahead(torch.optim.AdamW(model.parameters(), **adamw), k=k, alpha=alpha)
        # The schedule sees the inner optimizer's param groups: Lookahead's *are* those.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (2 * max_steps))
        optimizers: dict[str, Any] = {"optimizers": (optimizer, scheduler)}
    else:
        optimizers = {"optimizer_cls_and_kwargs": (LookaheadAdamW, {"k": k, "alpha": alpha, **adamw})}
        args.update(deepspeed=deepspeed, learning_rate=lr, lr_scheduler_type="linear")
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch,
        save_strategy="steps",
        save_steps=save_steps,
        logging_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and distributed else None,  # several CPU processes: DDP over gloo
        dataloader_num_workers=0,
        disable_tqdm=True,
        **args,
    )
    return Trainer(model=model, args=training_args, train_dataset=build_dataset(), **optimizers)


def checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resume", default=None, help="a Trainer checkpoint folder (output_dir/checkpoint-N)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    trainer = build_trainer(args.output_dir, k=args.k, alpha=args.alpha, max_steps=args.max_steps,
                            save_steps=args.save_steps)
    trainer.train(resume_from_checkpoint=args.resume)
    if trainer.is_world_process_zero():
        print(f"RESULT step={trainer.state.global_step} checksum={checksum(trainer.model):.10f}", flush=True)
    return 0


if __name__ == "__main__":
    exit_process(main() or 0)  # past gloo's teardown race at interpreter exit (lookahead_dist.distributed.exit_process)
