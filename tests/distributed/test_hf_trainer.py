"""The Hugging Face Trainer example (``launch/hf_trainer.py``) on 2 gloo ranks (DDP), resumed mid-cycle.

One spawn, three Trainer runs of ``Lookahead(AdamW, k=3)`` on a tiny GPT-2 built from its config
(``HF_HUB_OFFLINE=1``: nothing is downloaded), 8 steps with a checkpoint after step 5:

1. uninterrupted;
2. a fresh Trainer resumed from ``checkpoint-5`` (``train(resume_from_checkpoint=...)``): its final
   weights equal run 1's bit for bit;
3. the same resume from a copy of ``checkpoint-5`` whose ``optimizer.pt`` lost the Lookahead entries
   (``strip_lookahead_state``): different final weights, so the check in 2 can fail.

Also: ``checkpoint-5/optimizer.pt`` holds the slow weights (not equal to the weights, mid-cycle)
and the cycle position 5 mod 3.

Then the same under DeepSpeed (ZeRO-2 with optimizer offload, the Trainer's ``deepspeed=`` config),
where the Trainer discards ``optimizers=(...)`` and builds its own from
``optimizer_cls_and_kwargs=(LookaheadAdamW, {...})``: the engine steps the Lookahead, the resumed
run starts at the saved cycle position and ends with the uninterrupted run's weights, bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

import pytest
import torch

from tests.distributed._spawn import run_ranks

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

K, MAX_STEPS, SAVE_STEPS = 3, 8, 5


def _weights(trainer) -> list[Any]:
    return [p.detach().clone().numpy() for p in trainer.model.parameters()]


def _runs(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from transformers.utils import logging

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.set_verbosity_error()
    from launch.hf_trainer import build_trainer
    from lookahead_dist import SLOW_KEY, STEP_KEY, Lookahead, strip_lookahead_state

    out: dict[str, Any] = {}
    first = build_trainer(os.path.join(root, "straight"), k=K, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    first.train()
    out["straight"] = _weights(first)
    out["stepped_lookahead"] = isinstance(getattr(first.optimizer, "optimizer", first.optimizer), Lookahead)
    ckpt = os.path.join(root, "straight", f"checkpoint-{SAVE_STEPS}")

    second = build_trainer(os.path.join(root, "resumed"), k=K, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    second.train(resume_from_checkpoint=ckpt)
    out["resumed"] = _weights(second)

    stripped = os.path.join(root, "stripped-ckpt")
    if rank == 0:
        shutil.copytree(ckpt, stripped)
        sd = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=False)
        saved = [s for s in sd["state"].values() if SLOW_KEY in s]
        out["saved_counters"] = sorted({int(s[STEP_KEY]) for s in sd["state"].values() if STEP_KEY in s})
        out["saved_slow_count"] = len(saved)
        from safetensors.torch import load_file

        from launch.hf_trainer import build_model

        model = build_model()  # the checkpoint's weights, in the optimizer's parameter order
        model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")), strict=False)
        out["slow_vs_weights"] = max(float((sd["state"][i][SLOW_KEY] - p.detach()).abs().max())
                                     for i, p in enumerate(model.parameters()))
        torch.save(strip_lookahead_state(sd), os.path.join(stripped, "optimizer.pt"))
    dist.barrier()
    third = build_trainer(os.path.join(root, "restarted"), k=K, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    third.train(resume_from_checkpoint=stripped)
    out["restarted"] = _weights(third)
    if importlib.util.find_spec("deepspeed") is not None:
        out["deepspeed"] = _deepspeed_runs(root)
    return out


def _deepspeed_runs(root: str) -> dict[str, Any]:
    import logging

    import deepspeed
    from transformers import TrainerCallback

    from launch.hf_trainer import build_trainer
    from lookahead_dist import STEP_KEY
    from lookahead_dist.deepspeed import find_lookahead, skip_cpu_shm_kernel

    deepspeed.utils.logger.setLevel(logging.ERROR)
    skip_cpu_shm_kernel()
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
              # else accelerate swaps any optimizer for DeepSpeedCPUAdam under offload
              "zero_force_ds_cpu_optimizer": False}

    class Probe(TrainerCallback):  # what the engine steps, and the cycle position, before each step
        def __init__(self, trainer) -> None:
            self.trainer, self.seen = trainer, []

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            la = find_lookahead(self.trainer.model_wrapped)
            counters = sorted({s[STEP_KEY] for s in la.state.values() if STEP_KEY in s}) if la else None
            self.seen.append((state.global_step, la is not None, counters))

    out: dict[str, Any] = {}
    for name, resume in (("straight", None), ("resumed", os.path.join(root, "ds-straight", f"checkpoint-{SAVE_STEPS}"))):
        trainer = build_trainer(os.path.join(root, f"ds-{name}"), k=K, max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                                deepspeed=config)
        probe = Probe(trainer)
        trainer.add_callback(probe)
        trainer.train(resume_from_checkpoint=resume)
        out[name] = [p.detach().clone().numpy() for p in trainer.model_wrapped.module.parameters()]
        out[f"{name}_seen"] = probe.seen
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_trainer_resumes_lookahead_mid_cycle(tmp_path):
    results = run_ranks(_runs, 2, (str(tmp_path),), timeout=280)
    r0 = results[0]
    assert r0["stepped_lookahead"]
    assert r0["saved_counters"] == [SAVE_STEPS % K] and r0["saved_slow_count"] > 0, r0["saved_counters"]
    assert r0["slow_vs_weights"] > 1e-4  # mid-cycle: the slow weights are not the weights
    for rank, r in enumerate(results):
        for a, b in zip(r["straight"], results[0]["straight"]):  # DDP: the ranks agree
            assert (a == b).all(), rank
        for a, b in zip(r["resumed"], r["straight"]):
            assert (a == b).all(), (rank, float(abs(a - b).max()))
        gap = max(float(abs(a - b).max()) for a, b in zip(r["restarted"], r["straight"]))
        assert gap > 1e-5, (rank, "losing the Lookahead state on resume should change the run", gap)
        if "deepspeed" not in r:
            continue
        ds = r["deepspeed"]
        assert all(kept for _, kept, _ in ds["straight_seen"] + ds["resumed_seen"]), ds["straight_seen"]
        # position before step 6: 5 mod 3, in the uninterrupted and in the resumed run
        assert ds["resumed_seen"][0][0] == SAVE_STEPS and ds["resumed_seen"][0][2] == [SAVE_STEPS % K], ds
        assert (SAVE_STEPS, True, [SAVE_STEPS % K]) in ds["straight_seen"], ds["straight_seen"]
        for a, b in zip(ds["resumed"], ds["straight"]):
            assert (a == b).all(), (rank, "deepspeed", float(abs(a - b).max()))
