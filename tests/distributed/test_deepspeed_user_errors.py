"""What a DeepSpeed user sees where a ``"lookahead"`` block used to do nothing without a word.

One spawn of 2 gloo ranks (one machine: ``LOCAL_WORLD_SIZE=2``), each scenario written as a user's
script: a small model, a DeepSpeed config with the block, ``lookahead_dist.deepspeed.initialize``.

1. ``"local_sgd": {"across": "nodes"}`` on one machine: a single node, so no local SGD; initialize
   warns, naming ``LOCAL_WORLD_SIZE`` and ``ranks_per_node``.
2. ``"local_sgd": true`` at ZeRO stage 0 (accepted, as by ``lookahead_dist.accelerate.prepare``):
   the ranks train apart (no per-step all-reduce) and meet every k steps, at the reference's
   weights (two SGD replicas, then slow + alpha * (mean - slow)).
3. Resume with another k/alpha in the block than in the checkpoint: the config wins for k and
   alpha (one warning naming both), the checkpoint for the cycle positions.

The checks that need no engine (misspelled block names, bad values, the stage rule's message, the
op-build notice) are in ``tests/unit/test_deepspeed_block.py``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from tests.distributed._spawn import run_ranks

pytest.importorskip("deepspeed")

D_IN, D_OUT, MICRO, LR, K, ALPHA = 6, 3, 4, 0.05, 3, 0.5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, D_OUT))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(MICRO, D_IN, generator=g), torch.randn(MICRO, D_OUT, generator=g)


def _config(world: int, stage: int, lookahead: dict[str, Any], optimizer: str = "AdamW") -> dict[str, Any]:
    params = {"lr": LR} if optimizer == "SGD" else {"lr": LR, "weight_decay": 0.0, "torch_adam": True}
    return {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
            "optimizer": {"type": optimizer, "params": params},
            "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
            "lookahead": lookahead}


def _train(engine, rank: int, steps: int, first: int = 0) -> list[list[float]]:
    out = []
    for step in range(first, first + steps):
        x, y = _batch(step, rank)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        out.append([v for p in engine.module.parameters() for v in p.detach().reshape(-1).tolist()])
    return out


def _scenarios(rank: int, world: int, root: str) -> dict[str, Any]:
    import logging

    import deepspeed

    from lookahead_dist.deepspeed import find_lookahead, initialize, skip_cpu_shm_kernel
    from lookahead_dist.lookahead import ALPHA_KEY, K_KEY, STEP_KEY

    deepspeed.utils.logger.setLevel(logging.ERROR)
    skip_cpu_shm_kernel()
    out: dict[str, Any] = {}

    # 1. across nodes on one machine
    model = _model()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        initialize(model=model, model_parameters=model.parameters(),
                   config=_config(world, 1, {"k": K, "local_sgd": {"across": "nodes"}}))
    out["one_node"] = [str(w.message) for w in seen if "local SGD across nodes" in str(w.message)]

    # 2. "local_sgd": true at ZeRO stage 0
    model = _model()
    engine, *_ = initialize(model=model, model_parameters=model.parameters(),
                            config=_config(world, 0, {"k": K, "alpha": ALPHA, "local_sgd": True}, "SGD"))
    out["local_sgd_weights"] = _train(engine, rank, K)

    # 3. resume with another k and alpha in the block
    model = _model()
    engine, *_ = initialize(model=model, model_parameters=model.parameters(),
                            config=_config(world, 1, {"k": 5, "alpha": 0.5}))
    _train(engine, rank, 2)
    engine.save_checkpoint(root, tag="two")
    model = _model()
    engine, *_ = initialize(model=model, model_parameters=model.parameters(),
                            config=_config(world, 1, {"k": 3, "alpha": 0.8}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine.load_checkpoint(root, tag="two")
    la = find_lookahead(engine)
    out["resume_warnings"] = [str(w.message) for w in seen if "config wins" in str(w.message)]
    out["resume_groups"] = sorted({(g[K_KEY], g[ALPHA_KEY]) for g in la.param_groups})
    out["resume_counters"] = sorted({int(s[STEP_KEY]) for s in la.state.values() if STEP_KEY in s})
    _train(engine, rank, 1, first=2)  # count 3 of the new k=3: the cycle ends
    out["after_counters"] = sorted({int(s[STEP_KEY]) for s in la.state.values() if STEP_KEY in s})
    return out


def _reference_local_sgd(world: int) -> list[float]:
    """Two SGD replicas apart for K steps from the same start, then slow + alpha * (mean - slow).

    (The config sets "gradient_clipping": 0.0: DeepSpeed clips to norm 1.0 by default.)"""
    base = _model()
    start = [p.detach().clone() for p in base.parameters()]
    replicas = [copy.deepcopy(base) for _ in range(world)]
    for rank, m in enumerate(replicas):
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        for step in range(K):
            x, y = _batch(step, rank)
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    out = []
    for i, s in enumerate(start):
        mean = sum(list(m.parameters())[i].detach() for m in replicas) / world
        out += (s + ALPHA * (mean - s)).reshape(-1).tolist()
    return out


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_deepspeed_block_is_never_silent(tmp_path):
    results = run_ranks(_scenarios, 2, (str(tmp_path),), timeout=220)
    for rank, r in enumerate(results):
        assert len(r["one_node"]) == 1, (rank, r["one_node"])
        assert "found 1 node (ranks_per_node=2 from the launcher's LOCAL_WORLD_SIZE=2" in r["one_node"][0]
        assert 'set "ranks_per_node" in the "lookahead.local_sgd" block' in r["one_node"][0]

        assert len(r["resume_warnings"]) == 1, (rank, r["resume_warnings"])
        msg = r["resume_warnings"][0]
        assert "saved with k=5, alpha=0.5" in msg and "says k=3, alpha=0.8: the config wins" in msg, msg
        assert r["resume_groups"] == [(3, 0.8)], r["resume_groups"]
        assert r["resume_counters"] == [2] and r["after_counters"] == [0], (r["resume_counters"], r["after_counters"])

    # 2. local SGD at stage 0: apart before the k-th step, together (at the reference) after it
    w0, w1 = results[0]["local_sgd_weights"], results[1]["local_sgd_weights"]
    for step in range(K - 1):
        assert max(abs(a - b) for a, b in zip(w0[step], w1[step])) > 1e-4, f"ranks equal after step {step + 1}"
    assert w0[-1] == w1[-1]
    want = _reference_local_sgd(2)
    assert max(abs(a - b) for a, b in zip(w0[-1], want)) < 1e-6
