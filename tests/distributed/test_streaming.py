"""Streaming local SGD on real gloo processes: fragments, delayed application, int8/int4, outer
optimizers, checkpoints in flight, the non-finite guard and timeouts.

One 2-rank spawn runs every scenario but the timeouts (a spawn costs more than the scenarios); the
test functions assert on its results. References:

- ``tests/distributed/golden/local_sgd_blocking.json``: final weights of the *blocking* implementation
  as it was before streaming existed (commit 728bfc1), written by this file's ``__main__`` (see there);
  ``num_fragments=1, fragment_sync_delay=0`` must reproduce them bit for bit;
- :func:`simulate_stream`: a single-process simulation of 2 workers following the documented rule
  (Note [Streaming schedule] in ``lookahead_dist/sync/streaming.py``), whose outer step is a
  ``torch.optim`` optimizer over the slow weights with gradient ``slow - mean(fast at launch)``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lookahead_dist import LocalSGDOptions, Lookahead
from tests.distributed._spawn import run_ranks

pytestmark = pytest.mark.distributed

GOLDEN = Path(__file__).parent / "golden" / "local_sgd_blocking.json"
LR = 0.1
STEPS = 10
K = 4


# -- shared pieces (module level: spawn pickles them by name) ----------------------------------
def make_model(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def make_blocks(seed: int = 0) -> nn.Module:
    """Four equal tensors: fragments of exactly 1/F of the bytes for F = 1, 2, 4."""
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(4, 4, bias=False), nn.Tanh())][:-1])


def batch(rank: int, t: int, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + t)
    return torch.randn(4, width, generator=g), torch.randn(4, 4, generator=g)


def loss_on(model: nn.Module, rank: int, t: int) -> torch.Tensor:
    x, y = batch(rank, t, model[0].in_features)
    return F.mse_loss(model(x), y)


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def slow_flat(model: nn.Module, opt: Lookahead) -> np.ndarray:
    with opt.use_slow_weights():
        return flat(model)


def train(model, opt, rank, start, stop, sched=None, hook=None) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        loss_on(model, rank, t).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if hook is not None:
            hook(t)


def _run(rank, options, *, k=K, alpha=0.5, steps=STEPS, seed=None, bn=False, blocks=False, sched=None, hook=None):
    model = make_blocks(0) if blocks else make_model(rank if seed is None else seed, bn)
    if bn:
        options.module = model
    opt = Lookahead(sgd(model.parameters()), k=k, alpha=alpha, local_sgd=options)
    s = sched(opt.local_sgd.outer_optimizer) if sched is not None else None
    train(model, opt, rank, 0, steps, s, hook)
    return model, opt


def split_midpoint(nbytes: list[int], num_fragments: int) -> list[list[int]]:
    """The documented rule, written out again: tensor i goes to floor(F * midpoint_i / total)."""
    total, start, out = sum(nbytes), 0, [[] for _ in range(num_fragments)]
    for i, nb in enumerate(nbytes):
        out[min(num_fragments - 1, int(num_fragments * (start + nb / 2) / total))].append(i)
        start += nb
    return out


def simulate_stream(steps, k, num_fragments, delay, *, merge=0.0, outer=None, bn=False, sched=None):
    """Two workers from model 0 on ranks 0 and 1's data; Note [Streaming schedule] by hand.

    ``outer(slow_params) -> Optimizer`` (default: the Lookahead step, SGD with lr 0.5).
    """
    base = make_model(0, bn)
    workers = [copy.deepcopy(base) for _ in range(2)]
    inner = [sgd(w.parameters()) for w in workers]
    slow = [p.detach().clone() for p in base.parameters()]
    outer_opt = (outer or (lambda ps: torch.optim.SGD(ps, lr=0.5)))(slow)
    s = sched(outer_opt) if sched is not None else None
    frags = split_midpoint([p.numel() * 4 for p in slow], num_fragments)
    stride, pending = k // num_fragments, None

    def apply(f, mean):
        with torch.no_grad():
            for j in frags[f]:
                slow[j].grad = slow[j] - mean[j]
            outer_opt.step()
            for j in frags[f]:
                slow[j].grad = None
                for w in workers:
                    p = list(w.parameters())[j]
                    p.copy_(merge * p + (1 - merge) * slow[j])

    for t in range(steps):
        for r, (w, o) in enumerate(zip(workers, inner)):
            o.zero_grad()
            loss_on(w, r, t).backward()
            o.step()
        n = t % k + 1
        if pending is not None:
            pending[1] -= 1
            if pending[1] == 0:
                apply(pending[0], pending[2])
                pending = None
        if n % stride == 0:
            f = (n // stride) % num_fragments
            with torch.no_grad():
                fast = [list(w.parameters()) for w in workers]
                mean = {j: (fast[0][j] + fast[1][j]) / 2 for j in frags[f]}
                if f == 0 and bn:
                    for a, b in zip(workers[0].buffers(), workers[1].buffers()):
                        if a.is_floating_point():
                            a.copy_((a + b) / 2)
                            b.copy_(a)
            if delay == 0:
                apply(f, mean)
            else:
                pending = [f, delay, mean]
        if s is not None:
            s.step()
    return [flat(w) for w in workers], torch.cat([x.detach().reshape(-1) for x in slow]).numpy()


def _state_tensors(opt: Lookahead) -> list[torch.Tensor]:
    sd = opt.state_dict()["state"]
    return [v if isinstance(v, torch.Tensor) else torch.tensor(v)
            for idx in sorted(sd) for _, v in sorted(sd[idx].items())]


# -- scenarios ------------------------------------------------------------------------------------
GOLDEN_CASES = {
    "flat_nesterov": dict(outer_momentum=0.9, nesterov=True),
    "sharded_momentum": dict(outer_momentum=0.5, sharded=True, bucket_cap_mb=1e-4),
    "flat_bf16": dict(comm_dtype=torch.bfloat16),
}


def _golden_runs(rank: int, extra: dict) -> dict:
    out = {}
    for name, opts in GOLDEN_CASES.items():
        model, opt = _run(rank, LocalSGDOptions(**opts, **extra), bn=True)
        out[name] = {"fast": flat(model).tolist(), "slow": slow_flat(model, opt).tolist(),
                     "running_mean": model[1].running_mean.tolist()}
    return out


def _adam(ps):
    return torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-3)  # eps: d ~ 0 elements stay well-conditioned


def _nesterov(ps):
    return torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)


def _decay(o):
    return torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)


STREAM_CASES = {
    # name: (options, simulation kwargs)
    "lookahead_f2_t1": (dict(num_fragments=2, fragment_sync_delay=1), dict(num_fragments=2, delay=1)),
    "lookahead_f2_t0": (dict(num_fragments=2), dict(num_fragments=2, delay=0)),
    "merge_f1_t3": (dict(fragment_sync_delay=3, fragment_update_alpha=0.25),
                    dict(num_fragments=1, delay=3, merge=0.25)),
    "nesterov_f2_t1": (dict(num_fragments=2, fragment_sync_delay=1, outer_momentum=0.9, nesterov=True),
                       dict(num_fragments=2, delay=1, outer=_nesterov)),
    "sharded_nesterov_f2_t1": (dict(num_fragments=2, fragment_sync_delay=1, outer_momentum=0.9, nesterov=True,
                                    sharded=True, bucket_cap_mb=1e-4),
                               dict(num_fragments=2, delay=1, outer=_nesterov)),
    "user_sgd_f2_t1": (dict(num_fragments=2, fragment_sync_delay=1, outer_optimizer=_nesterov),
                       dict(num_fragments=2, delay=1, outer=_nesterov)),
    "user_adam_sched_f2_t1": (dict(num_fragments=2, fragment_sync_delay=1, outer_optimizer=_adam),
                              dict(num_fragments=2, delay=1, outer=_adam, sched=_decay)),
    "user_adam_sharded_f4_t0": (dict(num_fragments=4, outer_optimizer=_adam, sharded=True),
                                dict(num_fragments=4, delay=0, outer=_adam)),
}


def _stream_runs(rank: int) -> dict:
    out = {}
    for name, (opts, sim) in STREAM_CASES.items():
        alpha = 0.7 if "nesterov" in name and "user" not in name else 0.5
        model, opt = _run(rank, LocalSGDOptions(**opts), alpha=alpha, sched=sim.get("sched"), bn=True)
        out[name] = {"fast": flat(model), "slow": slow_flat(model, opt), "in_flight": opt.local_sgd.in_flight()}
    return out


def _non_blocking(rank: int) -> dict:
    """Rank 1 is late for the launch step: rank 0's step() returns with the collective pending."""
    out = {}
    for name, opts in {"fp32_t2": dict(fragment_sync_delay=2), "int8_t1": dict(fragment_sync_delay=1,
                                                                               comm_dtype="int8"),
                       "blocking": dict()}.items():
        model = make_model(0)
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=0.5, local_sgd=LocalSGDOptions(**opts))
        seen = {}

        def hook(t, opt=opt, seen=seen):
            if t == K - 2 and rank == 1:
                time.sleep(1.0)  # before its launch step (t = K - 1)
            if t == K - 1 and rank == 0:
                seen["pending"] = opt.local_sgd.pending()
                seen["in_flight"] = opt.local_sgd.in_flight()

        train(model, opt, rank, 0, STEPS, hook=hook)
        out[name] = {**seen, "fast": flat(model)}
    return out


def _peak_bytes(rank: int) -> dict:
    out = {}
    for name, opts in {"f1": {}, "f2": dict(num_fragments=2), "f4": dict(num_fragments=4),
                       "f2_t1": dict(num_fragments=2, fragment_sync_delay=1),
                       "int8_f2": dict(num_fragments=2, comm_dtype="int8", quant_block_size=8),
                       "int4_f2": dict(num_fragments=2, comm_dtype="int4", quant_block_size=8)}.items():
        per_step = []
        model = make_blocks(0)
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=0.5, local_sgd=LocalSGDOptions(**opts))
        stats = opt.local_sgd.stats
        for t in range(2 * K):
            before = stats.total("wire", label="params")
            opt.zero_grad()
            loss_on(model, rank, t).backward()
            opt.step()
            per_step.append(stats.total("wire", label="params") - before)
        out[name] = {"per_step": per_step, "total_payload": stats.total("payload", label="params"),
                     "param_bytes": sum(p.numel() * 4 for p in model.parameters())}
    return out


def _checkpoint_in_flight(rank: int) -> dict:
    """Save after step 6 (k=4, F=2, tau=1: fragment 1 launched at step 6, due at step 7)."""
    out = {}
    for name, opts in {
        "flat_nesterov": dict(num_fragments=2, fragment_sync_delay=1, outer_momentum=0.9, nesterov=True),
        "sharded": dict(num_fragments=2, fragment_sync_delay=1, sharded=True, outer_momentum=0.5),
        "int8_ef_adam": dict(num_fragments=2, fragment_sync_delay=1, comm_dtype="int8", quant_block_size=8,
                             outer_optimizer=_adam),
    }.items():
        straight, straight_opt = _run(rank, LocalSGDOptions(**opts), bn=True)
        model, opt = _run(rank, LocalSGDOptions(**opts), bn=True, steps=6)
        blob = io.BytesIO()
        sd = opt.state_dict()  # flush(): waits for fragment 1, parks it, does not apply it
        torch.save({"model": model.state_dict(), "opt": sd}, blob)
        due = sorted({int(s.get("lookahead_inflight_due", -1)) for s in sd["state"].values()})
        train(model, opt, rank, 6, STEPS)  # the saving run goes on: flush() changed nothing
        blob.seek(0)
        saved = torch.load(blob, weights_only=True)
        model2 = make_model(123, bn=True)
        opt2 = Lookahead(sgd(model2.parameters()), k=K, alpha=0.5,
                         local_sgd=LocalSGDOptions(module=model2, **opts))
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        train(model2, opt2, rank, 6, 7)
        resumed_in_flight = [(f, d) for f, d in opt2.local_sgd.in_flight()]  # applied at step 7: empty again
        train(model2, opt2, rank, 7, STEPS)
        ref = (flat(straight), slow_flat(straight, straight_opt), _state_tensors(straight_opt))
        out[name] = {
            "due": due,
            "after_resume_step": resumed_in_flight,
            "continued_equal": bool(np.array_equal(flat(model), ref[0])),
            "fast_equal": bool(np.array_equal(flat(model2), ref[0])),
            "slow_equal": bool(np.array_equal(slow_flat(model2, opt2), ref[1])),
            "state_equal": all(torch.equal(a, b) for a, b in zip(_state_tensors(opt2), ref[2])),
        }
    return out


def _nonfinite(rank: int) -> dict:
    """A NaN in rank 1's fast weights just before a sync: both ranks skip that outer update."""
    out = {}
    for name, (opts, t_bad) in {
        "flat": ({}, K - 1),
        "sharded": (dict(sharded=True), K - 1),
        "int8": (dict(comm_dtype="int8", quant_block_size=8), K - 1),
        "f2_t1": (dict(num_fragments=2, fragment_sync_delay=1), 1),  # fragment 1: launched at t=1, applied t=2
    }.items():
        model = make_model(0)
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=0.5, local_sgd=LocalSGDOptions(**opts))
        snap = {}

        def hook(t, model=model, snap=snap, t_bad=t_bad, opt=opt):
            if t == t_bad - 1 and rank == 1:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")  # in fragment 1 (the last Linear)
            if t == t_bad + opts.get("fragment_sync_delay", 0):
                snap["after"] = flat(model)  # just after the sync that saw the NaN
                snap["count"] = opt.nonfinite_syncs

        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, rank, 0, STEPS, hook=hook)
        out[name] = {**snap, "final": flat(model), "warned": [str(w.message) for w in caught
                                                              if "non-finite" in str(w.message)]}
    out["theta0"] = flat(make_model(0))
    return out


def _quantised(rank: int) -> dict:
    out = {}
    for name, opts in {"fp32": {}, "int8": dict(comm_dtype="int8", quant_block_size=8),
                       "int4": dict(comm_dtype="int4", quant_block_size=8),
                       "int8_f2_t1": dict(comm_dtype="int8", quant_block_size=8, num_fragments=2,
                                          fragment_sync_delay=1)}.items():
        model, opt = _run(rank, LocalSGDOptions(**opts), steps=3 * K, seed=0)
        out[name] = {"slow": slow_flat(model, opt), "fast": flat(model)}
    return out


def _two_rank_body(rank: int, world_size: int) -> dict:
    torch.use_deterministic_algorithms(True)
    return {
        "golden": _golden_runs(rank, dict(num_fragments=1, fragment_sync_delay=0)),
        "stream": _stream_runs(rank),
        "non_blocking": _non_blocking(rank),
        "peak": _peak_bytes(rank),
        "checkpoint": _checkpoint_in_flight(rank),
        "nonfinite": _nonfinite(rank),
        "quantised": _quantised(rank),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_two_rank_body, world_size=2, timeout=200)


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_f1_tau0_is_the_blocking_sync_bit_for_bit(two_ranks, case):
    golden = json.loads(GOLDEN.read_text())
    for rank, res in enumerate(two_ranks):
        got, want = res["golden"][case], golden[str(rank)][case]
        for key in ("fast", "slow", "running_mean"):
            assert np.array_equal(np.array(got[key], dtype=np.float32), np.array(want[key], dtype=np.float32)), key


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_streaming_matches_simulation_of_two_workers(two_ranks, case):
    _, sim = STREAM_CASES[case]
    fast, slow = simulate_stream(STEPS, K, bn=True, **sim)
    for rank, res in enumerate(two_ranks):
        v = res["stream"][case]
        np.testing.assert_allclose(v["fast"], fast[rank], rtol=0, atol=2e-6, err_msg=case)
        np.testing.assert_allclose(v["slow"], slow, rtol=0, atol=2e-6, err_msg=case)
    # The ranks really trained apart since their last sync (the comparison is not vacuous).
    assert np.abs(two_ranks[0]["stream"][case]["fast"] - two_ranks[1]["stream"][case]["fast"]).max() > 1e-3


def test_delay_keeps_a_fragment_in_flight_across_steps(two_ranks):
    # k=4, F=2, tau=1: fragment 1 launched at step 10 (count 2) is still in flight after the run.
    assert two_ranks[0]["stream"]["lookahead_f2_t1"]["in_flight"] == [(1, 1)]
    assert two_ranks[0]["stream"]["lookahead_f2_t0"]["in_flight"] == []


def test_builtin_outer_step_equals_torch_sgd_outer_optimizer(two_ranks):
    for res in two_ranks:
        a, b = res["stream"]["nesterov_f2_t1"], res["stream"]["user_sgd_f2_t1"]
        np.testing.assert_allclose(a["fast"], b["fast"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(a["slow"], b["slow"], rtol=0, atol=1e-7)


def test_step_does_not_block_at_a_sync_step_when_tau_positive(two_ranks):
    nb = two_ranks[0]["non_blocking"]
    assert nb["fp32_t2"]["pending"] is True and nb["fp32_t2"]["in_flight"] == [(0, 2)]
    assert nb["int8_t1"]["pending"] is True and nb["int8_t1"]["in_flight"] == [(0, 1)]
    assert nb["blocking"]["pending"] is False and nb["blocking"]["in_flight"] == []
    fast, _ = simulate_stream(STEPS, K, 1, 2)
    np.testing.assert_allclose(nb["fp32_t2"]["fast"], fast[0], rtol=0, atol=2e-6)


def test_peak_bytes_per_sync_is_one_fth(two_ranks):
    peak = two_ranks[0]["peak"]
    pb = peak["f1"]["param_bytes"]
    # Ring model on 2 ranks: an all-reduce of S bytes puts S bytes on the wire.
    for name, f in (("f1", 1), ("f2", 2), ("f4", 4), ("f2_t1", 2)):
        steps = peak[name]["per_step"]
        assert max(steps) == pb // f, (name, steps)
        assert sum(steps) == 2 * pb  # two cycles of k steps: the whole model twice, whatever F
        assert sum(1 for s in steps if s) == 2 * f
    # int8/int4 (block 8): codes of bits/8 bytes per value plus one fp32 scale per 8 values; the
    # quantised mean is an all-to-all plus an all-gather, each (N-1)/N of N chunks: P/F bytes x ratio.
    for name, bits in (("int8_f2", 8), ("int4_f2", 4)):
        ratio = bits / 32 * (1 + 32 / (bits * 8))
        assert max(peak[name]["per_step"]) == round(pb // 2 * ratio)
        assert sum(peak[name]["per_step"]) == round(2 * pb * ratio)


def test_checkpoint_with_a_fragment_in_flight_resumes_exactly(two_ranks):
    for res in two_ranks:
        for name, c in res["checkpoint"].items():
            assert c["due"] == [0, 1], name  # fragment 1's tensors parked, due in 1 step
            assert c["after_resume_step"] == [], name
            assert {k: c[k] for k in ("continued_equal", "fast_equal", "slow_equal", "state_equal")} == {
                "continued_equal": True, "fast_equal": True, "slow_equal": True, "state_equal": True}, name


def test_nan_on_one_rank_skips_the_outer_update_on_both(two_ranks):
    theta0 = two_ranks[0]["nonfinite"]["theta0"]
    for name in ("flat", "sharded", "int8", "f2_t1"):
        a, b = two_ranks[0]["nonfinite"][name], two_ranks[1]["nonfinite"][name]
        assert a["count"] == b["count"] == 1, name
        assert len(a["warned"]) == len(b["warned"]) == 1 and "outer update was skipped" in a["warned"][0]
        # The skipped sync restored fast <- slow = theta_0 (no sync before) on both ranks; with
        # fragments the whole unit restarts (the NaN had spread to fragment 0 by the next step).
        np.testing.assert_array_equal(a["after"], theta0, err_msg=name)
        np.testing.assert_array_equal(b["after"], theta0, err_msg=name)
        assert np.isfinite(a["final"]).all() and np.isfinite(b["final"]).all(), name
    # The quantised sync names the culprit as the fp32 one does (its per-tensor views of the result
    # are made only for this, Reduced.d)
    culprit = [re.search(r"averaged pseudo-gradient of (param_groups\[\d+\]\[\d+\])", two_ranks[0]["nonfinite"][name]
                         ["warned"][0]) for name in ("flat", "int8")]
    assert culprit[0] and culprit[1] and culprit[0].group(1) == culprit[1].group(1), culprit


def test_quantised_sync_is_close_to_fp32_and_error_feedback_helps(two_ranks):
    q = two_ranks[0]["quantised"]
    err = {name: np.abs(q[name]["slow"] - q["fp32"]["slow"]).max() for name in q if name != "fp32"}
    assert 0 < err["int8"] < 2e-3, err
    assert 0 < err["int4"] < 2e-2, err
    assert err["int8"] < err["int4"], err
    for name in q:  # every rank ends from the same slow weights
        np.testing.assert_array_equal(q[name]["slow"], two_ranks[1]["quantised"][name]["slow"])


# -- a hung peer ----------------------------------------------------------------------------------
def _hung_body(rank: int, world_size: int) -> dict:
    out = {}
    for name, opts, calls in (("blocking", dict(timeout=1.0), K), ("streaming", dict(timeout=1.0, fragment_sync_delay=1), K + 1),
                              ("int8", dict(timeout=1.0, comm_dtype="int8"), K)):
        group = dist.new_group([0, 1])  # a fresh group: the hung collective stays on its own
        model = make_model(0)
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=0.5,
                        local_sgd=LocalSGDOptions(process_group=group, **opts))
        if rank == 1:  # the hung peer: never reaches the sync
            train(model, opt, rank, 0, K - 1)
            time.sleep(2.5)
            out[name] = "hung"
            continue
        start = time.monotonic()
        try:
            train(model, opt, rank, 0, calls)
            out[name] = "no error"
        except TimeoutError as e:
            out[name] = {"error": str(e), "seconds": time.monotonic() - start}
    return out


@pytest.mark.timeout(120)
def test_hung_peer_becomes_a_timeout_error_naming_the_sync():
    res = run_ranks(_hung_body, world_size=2, timeout=90)
    for name, step in (("blocking", K), ("streaming", K), ("int8", K)):
        err = res[0][name]
        assert isinstance(err, dict), (name, err)
        msg = err["error"]
        assert "timeout=1.0 s" in msg and "fragment 0 of 1 of param group 0" in msg, msg
        assert f"step() call {step}" in msg and "ranks [0, 1]" in msg, msg
        assert res[1][name] == "hung"


# -- regenerate the golden file with the pre-streaming implementation -------------------------------
def _write_golden(rank: int, world_size: int) -> dict:
    torch.use_deterministic_algorithms(True)
    return _golden_runs(rank, {})


if __name__ == "__main__":
    # git archive 728bfc1 src | tar -x -C /tmp/old
    # PYTHONPATH=/tmp/old/src:. .venv/bin/python tests/distributed/test_streaming.py --write-golden
    if "--write-golden" in sys.argv:
        import lookahead_dist

        print("writing with", lookahead_dist.__file__)
        res = run_ranks(_write_golden, world_size=2, timeout=200)
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({str(r): v for r, v in enumerate(res)}, indent=None) + "\n")
        print("wrote", GOLDEN, os.path.getsize(GOLDEN), "bytes")
