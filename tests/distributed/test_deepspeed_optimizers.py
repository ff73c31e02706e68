"""``lookahead_dist.deepspeed.initialize`` keeps the optimizer DeepSpeed builds from its ``"optimizer"`` block.

For each optimizer type the CPU accelerator can build, on ZeRO-1/2/3 (2 gloo ranks, 3 steps): a
plain ``deepspeed.initialize`` and ``lookahead_dist.deepspeed.initialize`` with ``"lookahead":
{"k": 10**6}`` (no sync within the run) end with the same fp32 master weights and optimizer
state, bit for bit; the Lookahead wraps the very optimizer DeepSpeed built (``FusedAdam``,
``DeepSpeedCPUAdam`` under optimizer offload, ``torch.optim.AdamW`` for ``torch_adam``, the
``Adagrad`` ZeRO rebuilds over its partitions, ...) and counted every step. One spawn runs every
case; each case is reported on its own (skipped, with the reason, where an op cannot be built).

DeepSpeed JIT-compiles its C++ optimizers on first use (FusedAdam on CPU ~100 s, CPUAdam ~140 s
on 2 cores): ``launch/test.sh`` builds them once before the suite (``launch/build_ds_ops.py``,
cached in ``~/.cache/torch_extensions``), and the spawn below builds any still missing first, so a
fresh machine runs every case. Only the optimizers with no CPU build at all are skipped.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tests._docblocks import ensure_ops
from tests.distributed._spawn import run_ranks

pytest.importorskip("deepspeed")

WORLD, MICRO, STEPS = 2, 2, 3
STAGES = (1, 2, 3)
LR = {"lr": 0.01, "weight_decay": 0.1}
ADAM = {**LR, "betas": [0.8, 0.95], "eps": 1e-7}

# name, "optimizer" block, offload_optimizer, the class DeepSpeed builds, the ops it needs (builder names)
OPTIMIZERS: list[dict[str, Any]] = [
    dict(name="adam", block={"type": "Adam", "params": ADAM}, inner="FusedAdam", ops=["fused_adam"]),
    dict(name="adam_l2", block={"type": "Adam", "params": {**ADAM, "adam_w_mode": False}}, inner="FusedAdam",
         ops=["fused_adam"]),
    dict(name="adamw", block={"type": "AdamW", "params": ADAM}, inner="FusedAdam", ops=["fused_adam"]),
    dict(name="adamw_torch", block={"type": "AdamW", "params": {**ADAM, "torch_adam": True}}, inner="AdamW"),
    dict(name="adam_torch_l2", block={"type": "Adam", "params": {**ADAM, "torch_adam": True, "adam_w_mode": False}},
         inner="Adam"),
    dict(name="adagrad", block={"type": "Adagrad", "params": LR}, inner="Adagrad"),
    dict(name="adam_offload", block={"type": "Adam", "params": ADAM}, offload=True, inner="DeepSpeedCPUAdam",
         ops=["cpu_adam"]),
    dict(name="adamw_torch_offload", block={"type": "AdamW", "params": {**ADAM, "torch_adam": True}}, offload=True,
         inner="AdamW"),
    dict(name="adagrad_offload", block={"type": "Adagrad", "params": LR}, offload=True, inner="DeepSpeedCPUAdagrad",
         ops=["cpu_adagrad"]),
    dict(name="lion_offload", block={"type": "Lion", "params": {**LR, "betas": [0.9, 0.99]}}, offload=True,
         inner="DeepSpeedCPULion", ops=["cpu_lion"]),
    dict(name="lion", block={"type": "Lion", "params": LR},
         skip="FusedLion has no implementation on DeepSpeed's CPU accelerator (only with optimizer offload)"),
    dict(name="lamb", block={"type": "Lamb", "params": LR},
         skip="FusedLamb has no implementation on DeepSpeed's CPU accelerator"),
    dict(name="muon", block={"type": "Muon", "params": {**LR, "momentum": 0.9}}, inner="MuonWithAuxAdam",
         ops=["fused_adam"], zero3={"reduce_scatter": False}),
]
CASES = [dict(opt, stage=stage, id=f"{opt['name']}-zero{stage}") for opt in OPTIMIZERS for stage in STAGES]


def _skip_reason(case: dict[str, Any]) -> str | None:
    """Only reasons no set-up can remove (no CPU build of the op); missing ops are built first."""
    return case.get("skip")


def _expected_error(case: dict[str, Any]) -> str | None:
    if case["name"] == "muon" and case["stage"] in (1, 2):
        return "Muon"  # NotImplementedError: ZeRO-1/2 checks the optimizer's type at every step
    return None


# -- ranks --------------------------------------------------------------------------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _config(case: dict[str, Any]) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": case["stage"]}
    if case["stage"] == 3:
        zero.update(case.get("zero3", {}))
    if case.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": WORLD * MICRO,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_clipping": 0.0,
        "optimizer": case["block"],
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


def _run(case: dict[str, Any], rank: int, lookahead: bool) -> dict[str, Any]:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from lookahead_dist import STEP_KEY
    from lookahead_dist.deepspeed import find_lookahead, initialize, master_partitions

    model = _model()
    cfg = _config(case)
    if lookahead:
        cfg["lookahead"] = {"k": 10**6, "alpha": 0.5}
        engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(WORLD * MICRO, 6, generator=g), torch.randn(WORLD * MICRO, 3, generator=g)
        sl = slice(rank * MICRO, (rank + 1) * MICRO)
        engine.backward(torch.nn.functional.mse_loss(engine(x[sl]), y[sl]))
        engine.step()
    la = find_lookahead(engine)
    inner = la.optimizer if la is not None else engine.optimizer.optimizer
    parts = master_partitions(engine)  # this rank's fp32 master tensors
    keys = sorted({key for t in parts for key, v in inner.state[t].items()
                   if torch.is_tensor(v) and v.dim() > 0 and not key.startswith("lookahead_")})
    params = list(engine.module.parameters())
    state: dict[str, list[Any]] = {}
    for key in keys:  # each parameter's whole state, gathered (without the partitions' padding)
        for i, p in enumerate(params):
            try:
                state[f"{key}/{i}"] = safe_get_full_optimizer_state(p, key).detach().clone().numpy()
            except KeyError:  # the same on every rank: Muon keeps momentum_buffer, its Adam exp_avg
                pass
    out = {
        "module": [safe_get_full_fp32_param(p).detach().clone().numpy() for p in params],
        "state": state,
        "inner": type(inner).__name__,
    }
    if la is not None:
        out["counters"] = sorted(s[STEP_KEY] for s in la.state.values() if STEP_KEY in s)
        out["n_slow"] = sum(1 for t in parts if la.slow_weight(t) is not None)
        out["n_parts"] = len(parts)
    return out


def _speed_up_rank() -> None:
    """Rank-local shortcuts around two slow spots of DeepSpeed on a small CPU machine (no effect on numerics).

    - ``DeepSpeedCPUAdam``/``Lion``/``Adagrad`` and their op builders call ``cpuinfo.get_cpu_info()``
      (a subprocess, ~2 s) at every construction: answer it once.
    - ZeRO-3's init runs ``gc.collect()``, whose cost grows with every object alive: freeze the
      objects of the imports first.
    - Muon's update is a ``torch.compile``d function (~10 s to compile here): run it eagerly, in
      the plain and the Lookahead run alike.
    """
    import functools
    import gc

    import cpuinfo
    import torch._dynamo

    torch._dynamo.config.disable = True

    cached = functools.cache(cpuinfo.get_cpu_info)
    cpuinfo.get_cpu_info = cpuinfo.cpuinfo.get_cpu_info = cached
    import deepspeed  # noqa: F401  (after the patch: its modules bind get_cpu_info at import)

    gc.collect()
    gc.freeze()


def _caller_state_kept(rank: int) -> dict[str, Any]:
    """initialize() with the config in ``args.deepspeed_config`` (a JSON file): what it leaves behind."""
    import argparse
    import copy
    import json
    import tempfile

    import deepspeed

    from lookahead_dist.deepspeed import initialize

    case = dict(OPTIMIZERS[3], stage=1)  # adamw_torch: no op to build
    config = {**_config(case), "lookahead": {"k": 2, "alpha": 0.5}}
    path = os.path.join(tempfile.mkdtemp(), "ds.json")
    with open(path, "w") as f:
        json.dump(config, f)
    args = argparse.Namespace(deepspeed_config=path, local_rank=rank)
    before_args, before_table = copy.deepcopy(vars(args)), dict(deepspeed.ops.__compatible_ops__)
    model = _model()
    engine, *_ = initialize(args=args, model=model, model_parameters=model.parameters())
    from lookahead_dist.deepspeed import find_lookahead

    return {"args": vars(args) == before_args, "table": dict(deepspeed.ops.__compatible_ops__) == before_table,
            "wrapped": find_lookahead(engine) is not None and find_lookahead(engine).defaults["lookahead_k"] == 2}


def _all_cases(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    import logging

    _speed_up_rank()
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    out: dict[str, Any] = {"caller_state": _caller_state_kept(rank)}
    from lookahead_dist.deepspeed import skip_cpu_shm_kernel

    skip_cpu_shm_kernel()  # the plain deepspeed.initialize runs would JIT-build it
    for case in cases:
        if _expected_error(case):
            try:
                _run(case, rank, lookahead=True)
                out[case["id"]] = {"error": None}
            except NotImplementedError as e:
                out[case["id"]] = {"error": str(e)}
            continue
        out[case["id"]] = {"plain": _run(case, rank, lookahead=False), "lookahead": _run(case, rank, lookahead=True)}
    return out


# -- the test -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    runnable = [c for c in CASES if _skip_reason(c) is None]
    ensure_ops(sorted({op for c in runnable for op in c.get("ops", [])}))
    per_rank = run_ranks(_all_cases, WORLD, (runnable,), timeout=600)
    return {cid: [r[cid] for r in per_rank] for cid in per_rank[0]}


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_initialize_leaves_the_callers_state_alone(results):
    # A config given as args.deepspeed_config is passed on through a copy of args; DeepSpeed's CPU
    # shared-memory kernel is marked unavailable only during the call.
    for r in results["caller_state"]:
        assert r == {"args": True, "table": True, "wrapped": True}, r


@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_optimizer_block_matches_plain_deepspeed(case, results):
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    got = results[case["id"]]
    expected_error = _expected_error(case)
    if expected_error:
        for r in got:
            assert r["error"] and expected_error in r["error"], r
        return
    for rank, r in enumerate(got):
        plain, la = r["plain"], r["lookahead"]
        assert plain["inner"] == case["inner"] and la["inner"] == case["inner"], (rank, plain["inner"], la["inner"])
        # Lookahead.step ran at every step of every unit, and took a slow weight for each partition.
        assert la["counters"] and set(la["counters"]) == {STEPS}, la["counters"]
        assert la["n_slow"] == la["n_parts"] == len(la["counters"]), (la["n_slow"], la["n_parts"])
        assert len(plain["module"]) == len(la["module"])
        for a, b in zip(plain["module"], la["module"]):
            assert (a == b).all(), (rank, float(abs(a - b).max()))
        assert sorted(plain["state"]) == sorted(la["state"]) and plain["state"], (plain["state"].keys(), la["state"].keys())
        for key in plain["state"]:
            a, b = plain["state"][key], la["state"][key]
            assert (a == b).all(), (rank, key, float(abs(a - b).max()))
    # The trajectory moved: equal weights are not equal because nothing trained.
    start = [p.detach().numpy() for p in _model().parameters()]
    assert max(float(abs(a - b).max()) for a, b in zip(got[0]["plain"]["module"], start)) > 1e-3
