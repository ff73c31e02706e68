"""Lookahead under the torch hosts: DDP, ZeroRedundancyOptimizer, FSDP1 (flat and orig params),
FSDP2 ``fully_shard`` and HSDP on a 2-D mesh. Real gloo processes on CPU.

Each host row is checked for
1. numerics: 3k+2 steps on the same global batches equal a single-process Lookahead run;
2. memory: the slow-weight bytes a rank holds, measured from its state tensors, are its shard;
3. communication: no collective inside ``Lookahead.step``, syncs included;
4. checkpoints: save mid-cycle, load in fresh processes, finish: identical to not stopping
   (DCP for DDP/FSDP2/HSDP/FSDP1-orig-params, FSDP1's full optim state dict, ZeroRedundancyOptimizer's
   consolidated state dict), an FSDP2 checkpoint resharded 2 -> 4 ranks, and DCP's fake step.

Four spawns in all (2, 2, 4, 4 ranks), each sweeping several hosts; the tests below only read
their results.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.distributed import _torch_hosts as H
from tests.distributed._spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

NAMES_2 = [name for name, *_ in H.SCENARIOS_2]
SYNC_STEPS = [t for t in range(H.STEPS) if (t + 1) % H.K == 0]
ATOL, RTOL = 1e-6, 1e-5  # reduction order only


# -- the spawns -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("torch_hosts"))


@pytest.fixture(scope="module")
def two(ckpt: str) -> list[dict]:
    return run_ranks(H.phase_train, 2, (ckpt,), timeout=300)


@pytest.fixture(scope="module")
def resumed(two: list[dict], ckpt: str) -> list[dict]:
    return run_ranks(H.phase_resume, 2, (ckpt,), timeout=300)


@pytest.fixture(scope="module")
def four(two: list[dict], ckpt: str) -> list[dict]:
    return run_ranks(H.phase_four, 4, (ckpt,), timeout=300)


@pytest.fixture(scope="module")
def four_resumed(four: list[dict], ckpt: str) -> list[dict]:
    return run_ranks(H.phase_four_resume, 4, (ckpt,), timeout=300)


@pytest.fixture(scope="module")
def refs() -> dict[str, dict]:
    return {
        "adamw": H.reference("adamw", H.STEPS),
        "sgdm": H.reference("sgdm", H.STEPS, pullback="pullback"),
        "adamw_fake": H.reference("adamw", H.STEPS, fake_first=True),
        "adamw_plain": H.reference("adamw", H.STEPS, lookahead=False),
    }


def results(name: str, two: list[dict], four: list[dict]) -> list[dict]:
    return [r[name] for r in (four if name == "hsdp" else two)]


def ref_for(name: str, refs: dict[str, dict]) -> dict:
    if name.endswith("_fake"):
        return refs["adamw_fake"]
    return refs["sgdm" if "sgdm" in name else "adamw"]


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], *, exact: bool = False) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if exact:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=RTOL, err_msg=key)


# -- expected shard sizes, from the model's shapes alone ----------------------------------------------
def _shapes() -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in H.make_model().parameters()]


def _chunk_rows(d0: int, n: int, r: int) -> int:
    """Rows of a Shard(0) DTensor on shard rank r: torch.chunk's split, ceil(d0/n) per rank."""
    c = math.ceil(d0 / n)
    return max(0, min(d0, (r + 1) * c) - r * c)


def expected_slow_bytes(kind: str, n: int, r: int) -> int | None:
    shapes = _shapes()
    total = sum(math.prod(s) for s in shapes)
    if kind == "ddp":
        return 4 * total
    if kind == "fsdp2":
        return 4 * sum(_chunk_rows(s[0], n, r) * math.prod(s[1:]) for s in shapes)
    if kind == "hsdp":  # 2 x (n/2) mesh: sharded over the second dim only
        return expected_slow_bytes("fsdp2", n // 2, r % (n // 2))
    if kind == "fsdp1":  # one FlatParameter per Linear, padded to a multiple of n
        units = [math.prod(shapes[0]) + math.prod(shapes[1]), math.prod(shapes[2]) + math.prod(shapes[3])]
        return 4 * sum(math.ceil(u / n) for u in units)
    return None  # ZeroRedundancyOptimizer, FSDP1 orig params: layout-dependent, bounded below


TOTAL_BYTES = 4 * sum(math.prod(s) for s in _shapes())


# -- 0. the collective counter counts -----------------------------------------------------------------
def test_collective_counter_sees_real_collectives(two: list[dict]) -> None:
    for rank in two:
        seen = rank["counter_check"]
        assert seen["local_op"] == 0
        for what in ("all_reduce", "broadcast", "dtensor_full_tensor", "fsdp2_forward"):
            assert seen[what] >= 1, (what, seen)


def test_reference_differs_from_plain_inner(refs: dict[str, dict]) -> None:
    # Matching the reference means something only if Lookahead changes the trajectory.
    diff = max(np.abs(refs["adamw"]["params"][k] - refs["adamw_plain"]["params"][k]).max()
               for k in refs["adamw"]["params"])
    assert diff > 1e-2
    assert refs["adamw"]["counter"] and all(c == H.STEPS % H.K for c in refs["adamw"]["counter"].values())


# -- 1. numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES_2 + ["hsdp"])
def test_numerics_match_single_process_reference(name: str, two, four, refs) -> None:
    ranks = results(name, two, four)
    ref = ref_for(name, refs)
    for rank in ranks:
        assert_close(rank["params"], ref["params"])
        if rank["slow"] is not None:  # ZeroRedundancyOptimizer consolidates on rank 0 only
            assert_close(rank["slow"], ref["slow"])
        assert rank["counters"] == [H.STEPS % H.K]
    assert ranks[0]["slow"] is not None


# -- 2. memory --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES_2 + ["hsdp"])
def test_slow_weight_bytes_are_the_rank_shard(name: str, two, four) -> None:
    ranks = results(name, two, four)
    kind = name if name == "hsdp" else dict((n, k) for n, k, *_ in H.SCENARIOS_2)[name]
    n = len(ranks)
    got = [r["slow_bytes"] for r in ranks]
    # A slow weight mirrors exactly what the rank's optimizer steps, nothing more.
    assert got == [r["param_local_bytes"] for r in ranks]
    want = [expected_slow_bytes(kind, n, r) for r in range(n)]
    if want[0] is not None:
        assert got == want
    if kind == "ddp":
        return
    replicas = 2 if kind == "hsdp" else 1
    # Sharded: each rank holds a strict part; together the shards hold the model once (plus padding).
    assert all(b < TOTAL_BYTES for b in got)
    if kind in ("zero", "fsdp1_orig", "fsdp2", "hsdp"):
        assert sum(got) == replicas * TOTAL_BYTES
    else:
        assert TOTAL_BYTES <= sum(got) <= TOTAL_BYTES + 4 * n * 2  # <= n-1 padding per FlatParameter


# -- 3. communication -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES_2 + ["hsdp"])
def test_sync_step_issues_no_collective(name: str, two, four) -> None:
    for rank in results(name, two, four):
        log = rank["comm"]
        assert len(log) == H.STEPS  # one entry per Lookahead.step
        for t in SYNC_STEPS:
            assert log[t] == [], (t, log[t])
        assert all(calls == [] for calls in log)


def test_zero_sync_steps_communicate_like_other_steps(two) -> None:
    # ZeroRedundancyOptimizer broadcasts the owned params after every step; the counter sees those
    # broadcasts, and a sync step issues exactly as many as any other step.
    for rank in two:
        per_step = rank["zero"]["host_comm"]
        assert len(per_step) == H.STEPS and per_step[0] > 0
        assert len(set(per_step)) == 1, per_step


# -- 4. checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES_2)
def test_resume_mid_cycle_in_fresh_processes_is_exact(name: str, two, resumed) -> None:
    for before, after in zip(two, resumed):
        run, res = before[name], after[name]
        assert res["after_load"]["counters"] == [H.SAVE_AT % H.K]
        if run["at_save"]["slow"] is not None:
            assert_close(res["after_load"]["slow"], run["at_save"]["slow"], exact=True)
            assert_close(res["slow"], run["slow"], exact=True)
        assert_close(res["params"], run["params"], exact=True)
        assert res["counters"] == run["counters"]
        assert all(calls == [] for calls in res["comm"])


def test_zero_rollback_into_a_running_optimizer(two, resumed) -> None:
    # Loading into a ZeroRedundancyOptimizer that has already synced replaces the state entries
    # under Lookahead's cached tensor lists; the result must still equal the uninterrupted run.
    for before, after in zip(two, resumed):
        if before["zero"]["slow"] is not None:
            assert_close(after["zero_rollback"]["slow"], before["zero"]["slow"], exact=True)
        assert_close(after["zero_rollback"]["params"], before["zero"]["params"], exact=True)


def test_hsdp_resume_in_fresh_processes_is_exact(four, four_resumed) -> None:
    for before, after in zip(four, four_resumed):
        run, res = before["hsdp"], after["hsdp"]
        assert res["after_load"]["counters"] == [H.SAVE_AT % H.K]
        assert_close(res["after_load"]["slow"], run["at_save"]["slow"], exact=True)
        assert_close(res["params"], run["params"], exact=True)
        assert_close(res["slow"], run["slow"], exact=True)


def test_fsdp2_checkpoint_reshards_from_2_to_4_ranks(two, four) -> None:
    saved = two[0]["fsdp2"]
    ranks = [r["fsdp2_reshard"] for r in four]
    for rank_id, rank in enumerate(ranks):
        # The slow weights and the counter arrive intact, now in quarters.
        assert_close(rank["after_load"]["slow"], saved["at_save"]["slow"], exact=True)
        assert rank["after_load"]["counters"] == [H.SAVE_AT % H.K]
        assert rank["after_load"]["slow_bytes"] == expected_slow_bytes("fsdp2", 4, rank_id)
        # Finishing on 4 ranks equals finishing on 2, up to reduction order.
        assert_close(rank["params"], saved["params"])
        assert_close(rank["slow"], saved["slow"])
    assert sum(r["after_load"]["slow_bytes"] for r in ranks) == TOTAL_BYTES


@pytest.mark.parametrize("name", ["ddp_fake", "fsdp2_fake"])
def test_dcp_fake_step_moves_no_counter_and_no_slow_weight(name: str, two, refs) -> None:
    for rank in two:
        run = rank[name]
        assert run["fake_inner_state"]  # DCP did run its fake step on the inner optimizer
        assert run["fake_counters"] == [0]
        assert run["fake_slow_is_theta0"] and run["fake_params_unchanged"]
        # The trajectory after it is the reference whose *inner* optimizer alone took the fake
        # step: had Lookahead counted it, every sync would come one step early.
        assert_close(run["params"], refs["adamw_fake"]["params"])
        assert_close(run["slow"], refs["adamw_fake"]["slow"])


@pytest.mark.parametrize("name", ["ddp", "fsdp1_orig", "fsdp2", "fsdp2_sgdm"])
def test_dcp_load_path_fake_step_is_harmless(name: str, resumed) -> None:
    for rank in resumed:
        res = rank[name]
        assert res["fake_counters"] == [0] and res["fake_slow_is_theta0"] and res["fake_params_unchanged"]
