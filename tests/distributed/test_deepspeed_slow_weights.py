"""``lookahead_dist.deepspeed.use_slow_weights(engine)`` / ``sync_now(engine)`` on ZeRO-1/2/3 (2 gloo ranks).

Per case, one engine from ``lookahead_dist.deepspeed.initialize`` (k=3) is trained 4 steps (mid-cycle)
and then: forward on a fixed batch (fast weights); the same inside ``use_slow_weights`` (slow
weights); again after it (fast weights back, bit for bit); one more step; ``sync_now``; forward;
two more steps. fp32 cases are checked against a single-process plain-torch Lookahead doing the
same (slow weights evaluated through a copy of the model, ``Lookahead.sync_now()``): outputs,
master weights, slow weights and counters. bf16 cases check that the module holds exactly the
bf16-cast slow weights inside the block and the cast master weights after it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from tests.distributed._spawn import run_ranks

pytest.importorskip("deepspeed")

WORLD, MICRO, K, ALPHA = 2, 3, 3, 0.5
D_IN, D_HID, D_OUT = 5, 9, 2
LR, WD = 0.02, 0.1

CASES = [
    dict(name="zero1", stage=1),
    dict(name="zero2", stage=2),
    dict(name="zero3", stage=3),  # every parameter persistent (below the threshold): re-gathered
    dict(name="zero2_offload", stage=2, offload=True),
    dict(name="zero3_offload_subgroups", stage=3, offload=True, zero3={"sub_group_size": 30,
                                                                     "stage3_param_persistence_threshold": 0}),
    dict(name="zero1_bf16_fp32acc", stage=1, bf16=True, fp32_acc=True),  # DeepSpeed's BF16_Optimizer
    dict(name="zero3_bf16", stage=3, bf16=True),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.Tanh(), torch.nn.Linear(D_HID, D_OUT))


def _data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(WORLD * MICRO, D_IN, generator=g), torch.randn(WORLD * MICRO, D_OUT, generator=g))
               for _ in range(7)]
    return batches, torch.randn(4, D_IN, generator=g)


def _config(case: dict[str, Any]) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": case["stage"], **case.get("zero3", {})}
    if case.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_batch_size": WORLD * MICRO,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "torch_adam": True}},
        "zero_optimization": zero,
        "lookahead": {"k": K, "alpha": ALPHA},
        "steps_per_print": 10**9,
    }
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
        if case.get("fp32_acc"):
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


# -- ranks --------------------------------------------------------------------------------------------
def _module_weights(engine) -> list[torch.Tensor]:
    """The weights the module computes with now (ZeRO-3: gathered from the partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().float().clone() for p in params]


def _padding_values(zero_opt) -> torch.Tensor:
    """The elements of this rank's ZeRO-3 flat partitions (fp32 master and module copy) that lie past
    a parameter's end: ZeRO-3 allocates them with torch.empty and never writes them."""
    pads = []
    for sg, params in enumerate(zero_opt.fp16_groups):
        flats = [t for t in (zero_opt.fp32_partitioned_groups_flat[sg], zero_opt.fp16_partitioned_groups_flat[sg])
                 if t is not None and t.numel() > 0]
        offset = 0
        for p in params:
            size = p.partition_numel()
            rank = torch.distributed.get_rank(group=p.ds_process_group)
            valid = max(0, min(p.ds_numel - rank * size, size))
            pads += [flat.narrow(0, offset + valid, size - valid).float() for flat in flats]
            offset += size
    return torch.cat(pads) if pads else torch.zeros(0)


def _run_case(case: dict[str, Any], rank: int) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param

    from lookahead_dist import STEP_KEY
    from lookahead_dist.deepspeed import find_lookahead, full_slow_weight, initialize, sync_now, use_slow_weights

    model = _model()
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=_config(case))
    la = find_lookahead(engine)
    batches, x_eval = _data()
    dtype = next(engine.module.parameters()).dtype
    sl = slice(rank * MICRO, (rank + 1) * MICRO)

    def train(steps: range) -> None:
        for i in steps:
            x, y = batches[i]
            engine.backward(torch.nn.functional.mse_loss(engine(x[sl].to(dtype)).float(), y[sl]))
            engine.step()

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return engine(x_eval.to(dtype)).float().clone()

    params = list(engine.module.parameters())
    out: dict[str, Any] = {}
    if case["stage"] == 3:  # initialize() zeroes the padding ZeRO-3 leaves uninitialised
        out["padding"] = _padding_values(engine.optimizer)
    train(range(4))
    out["nonfinite_syncs"] = la.nonfinite_syncs
    out["module_fast_before"] = _module_weights(engine)
    out["master_before"] = [safe_get_full_fp32_param(p).clone() for p in params]
    out["slow_full"] = [full_slow_weight(engine, p).clone() for p in params]
    out["fast_before"] = forward()  # last: ZeRO-3 keeps the persistent parameters gathered after it
    with use_slow_weights(engine):
        out["slow_out"] = forward()
        out["module_slow"] = _module_weights(engine)
        out["master_inside"] = [safe_get_full_fp32_param(p).clone() for p in params]
    out["fast_after"] = forward()
    out["module_fast_after"] = _module_weights(engine)
    train(range(4, 5))
    out["counters_before_sync"] = sorted(s[STEP_KEY] for s in la.state.values() if STEP_KEY in s)
    sync_now(engine)
    out["counters_after_sync"] = sorted(s[STEP_KEY] for s in la.state.values() if STEP_KEY in s)
    out["synced_out"] = forward()
    out["synced_master"] = [safe_get_full_fp32_param(p).clone() for p in params]
    out["synced_module"] = _module_weights(engine)
    train(range(5, 7))
    out["final_master"] = [safe_get_full_fp32_param(p).clone() for p in params]
    out["final_slow"] = [full_slow_weight(engine, p).clone() for p in params]
    out["final_out"] = forward()
    return out


def _np(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _np(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_np(v) for v in obj]
    return obj


def _all_cases(rank: int, world: int) -> dict[str, Any]:
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    return {case["name"]: _np(_run_case(case, rank)) for case in CASES}


# -- single-process reference ------------------------------------------------------------------------
def _reference() -> dict[str, Any]:
    from lookahead_dist import Lookahead

    model = _model()
    la = Lookahead(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD), k=K, alpha=ALPHA)
    batches, x_eval = _data()

    def train(steps: range) -> None:
        for i in steps:
            x, y = batches[i]
            la.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            la.step()

    out: dict[str, Any] = {}
    train(range(4))
    with torch.no_grad():
        out["fast_before"] = model(x_eval)
        slow_model = copy.deepcopy(model)
        for p, q in zip(model.parameters(), slow_model.parameters()):
            q.copy_(la.slow_weight(p))
        out["slow_out"] = slow_model(x_eval)
    out["slow_full"] = [la.slow_weight(p).clone() for p in model.parameters()]
    train(range(4, 5))
    la.sync_now()
    with torch.no_grad():
        out["synced_out"] = model(x_eval)
    out["synced_master"] = [p.detach().clone() for p in model.parameters()]
    train(range(5, 7))
    out["final_master"] = [p.detach().clone() for p in model.parameters()]
    out["final_slow"] = [la.slow_weight(p).clone() for p in model.parameters()]
    with torch.no_grad():
        out["final_out"] = model(x_eval)
    return _np(out)


def _err(a: Any, b: Any) -> float:
    if isinstance(a, list):
        return max(_err(x, y) for x, y in zip(a, b))
    return float(abs(a - b.reshape(a.shape)).max())


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_slow_weights_in_the_module_on_every_zero_stage():
    failures = _check(run_ranks(_all_cases, WORLD, timeout=280), _reference())
    assert not failures, "\n".join(failures)


def _check(results: list[dict[str, Any]], ref: dict[str, Any]) -> list[str]:
    tol = 1e-5  # DeepSpeed reduces gradients over 2 ranks: the reference differs by reduction order only
    failures = []
    for case in CASES:
        name = case["name"]
        try:
            for rank, r in enumerate(results):
                r = r[name]
                # 1. inside the block the module holds the slow weights (cast to its dtype), the master is fast
                cast = torch.bfloat16 if case.get("bf16") else torch.float32
                for m, s in zip(r["module_slow"], r["slow_full"]):
                    want = torch.from_numpy(s).reshape(m.shape).to(cast).float().numpy()
                    assert (m == want).all(), (rank, "module != slow weights", _err(m, want))
                assert _err(r["master_inside"], r["master_before"]) == 0.0, (rank, "master moved")
                # 2. after it the fast weights are back, bit for bit
                assert _err(r["module_fast_after"], r["module_fast_before"]) == 0.0, rank
                assert _err(r["fast_after"], r["fast_before"]) == 0.0, rank
                # 3. sync_now: counters restart, module == cast(master)
                assert set(r["counters_before_sync"]) == {5 % K} and set(r["counters_after_sync"]) == {0}, r
                assert r["nonfinite_syncs"] == 0, (rank, "syncs skipped", r["nonfinite_syncs"])
                if "padding" in r:
                    assert (r["padding"] == 0).all(), (rank, "partition padding not zeroed", r["padding"])
                for m, w in zip(r["synced_module"], r["synced_master"]):
                    assert (m == torch.from_numpy(w).to(cast).float().numpy()).all(), (rank, "synced module")
                assert _err(r["slow_out"], r["fast_before"]) > 1e-3, (rank, "slow and fast weights too close to tell")
                if case.get("bf16"):
                    continue
                # 4. fp32: the reference, step for step
                for key in ("fast_before", "slow_out", "slow_full", "synced_out", "synced_master", "final_master",
                            "final_slow", "final_out"):
                    assert _err(r[key], ref[key]) < tol, (rank, key, _err(r[key], ref[key]))
        except AssertionError as e:
            failures.append(f"{name}: {str(e)[:300]}")
    return failures
