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
        out["lookahead_trainer"] = _lookahead_trainer_runs(root)
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


def _lookahead_trainer_runs(root: str) -> dict[str, Any]:
    """``lookahead_dist.hf.LookaheadTrainer`` with the block in the Trainer's DeepSpeed config: no optimizer
    given, the Trainer builds AdamW from TrainingArguments. Then a resume with another k/alpha in the block,
    and the set-ups it refuses (each one a plain Trainer would run without Lookahead, without a word)."""
    import warnings

    from transformers import TrainerCallback, TrainingArguments

    from launch.hf_trainer import build_dataset, build_model
    from lookahead_dist import STEP_KEY, Lookahead
    from lookahead_dist.deepspeed import find_lookahead
    from lookahead_dist.hf import LookaheadTrainer
    from lookahead_dist.lookahead import ALPHA_KEY, K_KEY

    def config(**extra) -> dict[str, Any]:
        return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, **extra}

    def trainer(name: str, ds_config: dict[str, Any], **kwargs: Any):
        args = TrainingArguments(output_dir=os.path.join(root, name), max_steps=MAX_STEPS, per_device_train_batch_size=4,
                                 save_strategy="steps", save_steps=SAVE_STEPS, logging_strategy="no", report_to=[],
                                 seed=0, data_seed=0, use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0,
                                 disable_tqdm=True, learning_rate=3e-3, deepspeed=ds_config)
        return LookaheadTrainer(model=build_model(0), args=args, train_dataset=build_dataset(), **kwargs)

    class Probe(TrainerCallback):
        def __init__(self, t) -> None:
            self.t, self.seen = t, []

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            la = find_lookahead(self.t.model_wrapped)
            self.seen.append((state.global_step, sorted({(g[K_KEY], g[ALPHA_KEY]) for g in la.param_groups}),
                              sorted({int(s[STEP_KEY]) for s in la.state.values() if STEP_KEY in s})))

    out: dict[str, Any] = {}
    for name, block, resume in (("block", {"k": K, "alpha": 0.5}, None),
                                ("block-resumed", {"k": 4, "alpha": 0.6},
                                 os.path.join(root, "block", f"checkpoint-{SAVE_STEPS}"))):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            t = trainer(name, config(lookahead=block))
            probe = Probe(t)
            t.add_callback(probe)
            t.train(resume_from_checkpoint=resume)
        out[name] = probe.seen
        out[f"{name}_warnings"] = [str(w.message) for w in seen if "lookahead" in str(w.message).lower()
                                   or "zero_force_ds_cpu_optimizer" in str(w.message)]

    refused = {
        "optimizer-block": config(lookahead={"k": K}, optimizer={"type": "AdamW", "params": {"lr": "auto"}}),
        "misspelled": config(lookahaed={"k": K}),
        "local-sgd": config(lookahead={"k": K, "local_sgd": True}),
    }
    for name, ds_config in refused.items():
        try:
            trainer(f"refused-{name}", ds_config)
            out[f"refused-{name}"] = None
        except ValueError as e:
            out[f"refused-{name}"] = str(e)
    model = build_model(0)
    try:
        trainer("refused-optimizers", config(), optimizers=(Lookahead(torch.optim.AdamW(model.parameters())), None))
        out["refused-optimizers"] = None
    except ValueError as e:
        out["refused-optimizers"] = str(e)
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
        _check_lookahead_trainer(r["lookahead_trainer"])


def _check_lookahead_trainer(lt: dict[str, Any]) -> None:
    # the block is read: the engine steps Lookahead(k=3, alpha=0.5) from the first step, cycling 0, 1, 2
    assert [s for s, _, _ in lt["block"]] == list(range(MAX_STEPS)), lt["block"]
    assert all(groups == [(K, 0.5)] for _, groups, _ in lt["block"]), lt["block"]
    assert (SAVE_STEPS, [(K, 0.5)], [SAVE_STEPS % K]) in lt["block"], lt["block"]
    assert any("zero_force_ds_cpu_optimizer" in w for w in lt["block_warnings"]), lt["block_warnings"]
    # resumed with k=4, alpha=0.6 in the block: the config wins, the cycle position comes from the checkpoint
    first = lt["block-resumed"][0]
    assert first == (SAVE_STEPS, [(4, 0.6)], [SAVE_STEPS % K]), lt["block-resumed"]
    wins = [w for w in lt["block-resumed_warnings"] if "the config wins" in w]
    assert len(wins) == 1 and "saved with k=3, alpha=0.5" in wins[0] and "says k=4, alpha=0.6" in wins[0], wins
    assert 'an "optimizer" block' in lt["refused-optimizer-block"], lt
    assert "'lookahaed' looks like a misspelled" in lt["refused-misspelled"], lt
    assert "not supported under the Hugging Face Trainer" in lt["refused-local-sgd"], lt
    assert "discards optimizers=(...)" in lt["refused-optimizers"], lt
