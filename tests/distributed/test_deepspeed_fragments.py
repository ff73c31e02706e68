"""Streaming local SGD splits large tensors over fragments (Note [Fragments] in
``lookahead_dist/sync/streaming.py``): a DeepSpeed ZeRO partition, one flat tensor per param group
(ZeRO-1/2) or sub-group (ZeRO-3), is spread over the F fragments, so each sync moves 1/F of it.

- DeepSpeed (2 gloo ranks on the CPU accelerator, each its own "node": ZeRO over a 1-rank data-parallel
  group, local SGD across the 2 nodes): the bytes every sync step puts on the wire, counted where the
  collectives pass (:class:`~lookahead_dist.demo.commcount.CommCounter`), are 1/F of the F=1 bytes within
  one quantisation block, on ZeRO-1/2/3, fp32 and int8; and the F=2, tau=1 run equals a single-process
  simulation of 2 replicas whose flat weight vector is split by hand at the documented cut.
- Plain torch (2 ranks): a model with tensors larger than the block, split over fragments, in the flat
  (Nesterov), sharded and int8 + error-feedback modes: equal to the same by-hand simulation (fp32 modes),
  close to it (int8), and a checkpoint taken with a split fragment in flight resumes bit for bit.
"""

from __future__ import annotations

import copy
import functools
import io
import itertools
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.distributed._spawn_warm import run_ranks

pytestmark = [pytest.mark.distributed]

BLOCK = 512  # LocalSGDOptions.quant_block_size default: the split granularity (elements)


# -- the rule, written out again for one flat vector ----------------------------------------------------
def cut_by_hand(m: int, f: int, block: int) -> list[tuple[int, int]]:
    """Pieces of a single tensor of m elements: cut at j*m/f, rounded to the nearest multiple of block."""
    bounds = [0]
    for j in range(1, f):
        x = int(np.floor(j * m / f / block + 0.5)) * block
        if bounds[-1] < x < m:
            bounds.append(x)
    bounds.append(m)
    return list(itertools.pairwise(bounds))


def _load(model: nn.Module, vec: torch.Tensor) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), vec.split([q.numel() for q in model.parameters()])):
            p.copy_(v.view_as(p))


def simulate(vectors: list[torch.Tensor], k: int, f: int, tau: int, pieces: list[list[tuple[int, int]]],
             alpha: float, beta: float, nesterov: bool, steps: int, inner_step) -> list[list[np.ndarray]]:
    """Note [Streaming schedule] on flat vectors: ``vectors`` are the replicas' flat fast weights, updated
    by ``inner_step(t)`` in place; pieces[g] = element ranges of fragment g. Returns per step the replicas."""
    slow = vectors[0].detach().clone()
    mom = torch.zeros_like(slow)
    stride, pending, out = k // f, None, []

    def apply(g, mean):
        for a, b in pieces[g]:
            d = slow[a:b] - mean[a:b]
            mom[a:b].mul_(beta).add_(d)
            upd = d + beta * mom[a:b] if nesterov else (mom[a:b] if beta else d)
            slow[a:b] -= alpha * upd
            for v in vectors:
                v.data[a:b] = slow[a:b]

    for t in range(steps):
        inner_step(t)
        n = t % k + 1
        if pending is not None:
            pending[1] -= 1
            if pending[1] == 0:
                apply(pending[0], pending[2])
                pending = None
        if n % stride == 0:
            g = (n // stride) % f
            mean = sum(v.detach() for v in vectors) / len(vectors)
            if tau == 0:
                apply(g, mean)
            else:
                pending = [g, tau, mean.clone()]
        out.append([v.detach().numpy().copy() for v in vectors])
    return out


# -- DeepSpeed ----------------------------------------------------------------------------------------
DS_K, DS_STEPS, DS_ALPHA, DS_LR, DS_MICRO = 4, 8, 0.5, 0.02, 3
D_IN, D_HID, D_OUT = 32, 96, 24  # 32*96 + 96 + 96*24 + 24 = 5496 elements (10+ blocks)


def _ds_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def _ds_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(DS_MICRO, D_IN, generator=g), torch.randn(DS_MICRO, D_OUT, generator=g)


# reduce_bucket_size (DeepSpeed's default: 5e8 elements) sizes the gradient buffer that ZeRO-1/2 allocate at
# every backward and ZeRO-3 at initialisation; any size >= the model's 5496 elements behaves as the default
# does here (all gradients in one bucket, reduced once per step: the same bytes and weights, bit for bit).
# The default costs seconds per step or engine here: 2 GB allocated and, under
# torch.use_deterministic_algorithms (fill_uninitialized_memory), filled with NaN each time.
_ONE_BUCKET = {"reduce_bucket_size": 1 << 16}
DS_STAGES = {
    "zero1": {"stage": 1, **_ONE_BUCKET},
    "zero2": {"stage": 2, **_ONE_BUCKET},
    "zero3": {"stage": 3, "stage3_param_persistence_threshold": 0, **_ONE_BUCKET},
}
# name -> (local_sgd block entries)
DS_RUNS = {
    "f1": dict(num_fragments=1),
    "f2_t1": dict(num_fragments=2, fragment_sync_delay=1),
    "f4": dict(num_fragments=4),
}
DS_INT8 = {"int8_f1": dict(num_fragments=1, comm_dtype="int8"),
           "int8_f2": dict(num_fragments=2, comm_dtype="int8")}
# Issue 16 from a DeepSpeed config: eager outer updates, fp32 and top-2% at int2 (ZeRO-2).
DS_EAGER = {"eager_f1": dict(num_fragments=1, eager_update=True),
            "eager_sparse_f1": dict(num_fragments=1, eager_update=True, comm_dtype="int2", topk_fraction=0.02)}


def _ds_config(zero: dict[str, Any], local_sgd: dict[str, Any]) -> dict[str, Any]:
    return {
        "train_batch_size": DS_MICRO,
        "train_micro_batch_size_per_gpu": DS_MICRO,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": DS_LR, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": zero,
        "lookahead": {"k": DS_K, "alpha": DS_ALPHA, "local_sgd": {"across": "nodes", **local_sgd}},
        "steps_per_print": 10**9,
    }


def _ds_weights(engine) -> list[float]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return torch.cat([p.detach().float().reshape(-1) for p in params]).tolist()


def _ds_case(zero: dict[str, Any], local_sgd: dict[str, Any], rank: int) -> dict[str, Any]:
    from lookahead_dist.deepspeed import find_lookahead, initialize
    from lookahead_dist.demo.commcount import CommCounter

    model = _ds_model(seed=rank)
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=_ds_config(zero, local_sgd))
    la = find_lookahead(engine)
    stats = la.local_sgd.stats
    out: dict[str, Any] = {"per_step": [], "stats_per_step": [], "weights": []}
    for step in range(DS_STEPS):
        x, y = _ds_batch(step, rank)
        with CommCounter() as comm:  # the whole step: DeepSpeed's own collectives are on a 1-rank group
            before = stats.total("wire", label="params")
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
        out["per_step"].append(comm.bytes)
        out["stats_per_step"].append(stats.total("wire", label="params") - before)
        out["weights"].append(_ds_weights(engine))
    # ZeRO-3 empties its param groups between steps: read the partitions from the state
    out["partitions"] = [int(v["lookahead_slow"].numel()) for v in la.state.values() if "lookahead_slow" in v]
    out["slow"] = torch.cat([v["lookahead_slow"].reshape(-1) for v in la.state.values()
                             if "lookahead_slow" in v]).tolist()
    out["quant_numel"] = [plan.quant.numel for unit in la.local_sgd._units.values() for fr in unit.fragments
                          for plan in fr if plan.quant is not None]
    return out


def _torch_eager(rank: int) -> list[list[float]]:
    """The plain-torch twin of ``zero2/eager_f1``: Lookahead(AdamW) with the eager rule on the same
    model and batches (F=1: elementwise, so ZeRO's flat partition and the per-tensor layout agree)."""
    from lookahead_dist import LocalSGDOptions, Lookahead

    model = _ds_model(seed=rank)
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=DS_LR, weight_decay=0.0), k=DS_K, alpha=DS_ALPHA,
                    local_sgd=LocalSGDOptions(eager_update=True))
    weights = []
    for step in range(DS_STEPS):
        x, y = _ds_batch(step, rank)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist())
    return weights


def _ds_all(rank: int, world: int) -> dict[str, Any]:
    os.environ["LOCAL_WORLD_SIZE"] = "1"  # each rank its own node: local SGD across the 2 ranks
    os.environ["LOCAL_RANK"] = "0"
    from lookahead_dist.deepspeed import skip_cpu_shm_kernel

    skip_cpu_shm_kernel()
    torch.use_deterministic_algorithms(True)
    out = {}
    for stage, zero in DS_STAGES.items():
        for name, ls in DS_RUNS.items():
            out[f"{stage}/{name}"] = _ds_case(zero, ls, rank)
    for name, ls in DS_INT8.items():
        out[f"zero2/{name}"] = _ds_case(DS_STAGES["zero2"], ls, rank)
    for name, ls in DS_EAGER.items():
        out[f"zero2/{name}"] = _ds_case(DS_STAGES["zero2"], ls, rank)
    out["torch/eager_f1"] = _torch_eager(rank)
    return out


def _two_rank_all(rank: int, world: int, with_deepspeed: bool) -> dict[str, Any]:
    """The plain torch cases, then (their environment changed only after) the DeepSpeed cases: one spawn
    of 2 ranks for both, as each spawn pays for importing torch's compiler stack in every rank."""
    out = {"pt": _pt_all(rank, world)}
    if with_deepspeed:
        out["ds"] = _ds_all(rank, world)
    return out


@pytest.fixture(scope="module")
def two_rank_runs() -> list[dict[str, Any]]:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with_deepspeed = False
    else:
        with_deepspeed = True
    return run_ranks(_two_rank_all, world_size=2, args=(with_deepspeed,), timeout=540)


@pytest.fixture(scope="module")
def ds_runs(two_rank_runs):
    pytest.importorskip("deepspeed")
    return [res["ds"] for res in two_rank_runs]


@functools.cache  # the same for every ZeRO stage: computed once per (F, tau)
def _ds_reference(f: int, tau: int) -> list[list[np.ndarray]]:
    base = _ds_model(seed=0)  # initialize broadcasts rank 0's model
    replicas = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=DS_LR, weight_decay=0.0) for m in replicas]
    vecs = [torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone() for m in replicas]

    def inner(t):
        for r, (m, o) in enumerate(zip(replicas, opts)):
            _load(m, vecs[r])
            o.zero_grad()
            x, y = _ds_batch(t, r)
            F.mse_loss(m(x), y).backward()
            o.step()
            vecs[r].copy_(torch.nn.utils.parameters_to_vector(m.parameters()).detach())

    # One flat partition (a 1-rank ZeRO group) of the model's elements, cut by hand.
    pieces = [[pc] for pc in cut_by_hand(vecs[0].numel(), f, BLOCK)]
    return simulate(vecs, DS_K, f, tau, pieces, DS_ALPHA, 0.0, False, DS_STEPS, inner)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", sorted(DS_STAGES))
def test_deepspeed_bytes_per_sync_are_one_fth(ds_runs, stage):
    elems = sum(p.numel() for p in _ds_model(0).parameters())
    for res in ds_runs:
        full = res[f"{stage}/f1"]
        assert sum(full["partitions"]) >= elems, full["partitions"]
        # DeepSpeed's own collectives in the step (ZeRO-3: a few small ones over the world; ZeRO-1/2:
        # none counted, their group has 1 rank): the same at every step whatever F, so the rest of what
        # the collectives carried is the sync, and equals what the local SGD recorded.
        background = [a - b for a, b in zip(full["per_step"], full["stats_per_step"])]
        assert max(background) < 1024, background
        if stage != "zero3":
            assert max(background) == 0, background
        net = {name: [a - b for a, b in zip(res[f"{stage}/{name}"]["per_step"], background)] for name in DS_RUNS}
        base = max(net["f1"])
        assert base >= 4 * elems, net["f1"]  # fp32, 2 ranks: an all-reduce of S bytes sends S
        assert sorted(net["f1"]) == [0] * (DS_STEPS - 2) + [base, base]
        for name, f in (("f2_t1", 2), ("f4", 4)):
            steps = net[name]
            assert steps == res[f"{stage}/{name}"]["stats_per_step"], (stage, name, steps)
            syncs = [s for s in steps if s]
            assert len(syncs) == 2 * f, (stage, name, steps)  # every fragment sends, twice (2 cycles)
            for s in syncs:  # 1/F within one block (BLOCK fp32 values) per partition
                assert abs(s - base / f) <= 4 * BLOCK * len(full["partitions"]), (stage, name, steps, base)
            assert sum(steps) == 2 * base


def test_deepspeed_int8_bytes_per_sync_are_one_half(ds_runs):
    for res in ds_runs:
        base = max(res["zero2/int8_f1"]["per_step"])
        syncs = [s for s in res["zero2/int8_f2"]["per_step"] if s]
        assert len(syncs) == 4
        per_block = BLOCK + 4  # int8 codes plus one fp32 scale
        for s in syncs:
            assert abs(s - base / 2) <= per_block, (syncs, base)


def test_deepspeed_eager_equals_the_plain_torch_eager_run(ds_runs):
    # A "lookahead.local_sgd" block with eager_update=true on ZeRO-2 runs the eager rule of the
    # library: step by step the same weights as Lookahead(AdamW, eager_update=True) in plain torch.
    for rank, res in enumerate(ds_runs):
        got, want = res["zero2/eager_f1"]["weights"], res["torch/eager_f1"]
        for t in range(DS_STEPS):
            err = np.abs(np.asarray(got[t]) - np.asarray(want[t])).max()
            assert err < 1e-5, f"rank {rank} step {t + 1}: max |w - torch eager| = {err:.3g}"
        # and it is not the blocking run: the second sync (step 8) applies the delayed average
        assert np.abs(np.asarray(got[-1]) - np.asarray(res["zero2/f1"]["weights"][-1])).max() > 1e-4


def test_deepspeed_eager_sparse_sends_its_formula_and_keeps_the_replicas_together(ds_runs):
    from lookahead_dist._sparse import sparse_nbytes

    for res in ds_runs:
        run = res["zero2/eager_sparse_f1"]
        payload = sum(sparse_nbytes(n, fraction=0.02, bits=2) for n in run["quant_numel"])
        # an all-gather of 2 payloads: each rank sends its own once (ring), at the k-th steps only
        assert run["stats_per_step"] == [0, 0, 0, payload] * (DS_STEPS // DS_K), run["stats_per_step"]
        assert 8 * payload / sum(run["partitions"]) < 0.5  # bits per parameter (tiny model: padding)
    assert ds_runs[0]["zero2/eager_sparse_f1"]["slow"] == ds_runs[1]["zero2/eager_sparse_f1"]["slow"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", sorted(DS_STAGES))
def test_deepspeed_fragments_match_simulation(ds_runs, stage):
    for name, f, tau in (("f2_t1", 2, 1), ("f4", 4, 0), ("f1", 1, 0)):
        ref = _ds_reference(f, tau)
        assert np.abs(ref[1][0] - ref[1][1]).max() > 1e-3  # the replicas really part between syncs
        for rank, res in enumerate(ds_runs):
            got = res[f"{stage}/{name}"]["weights"]
            for t in range(DS_STEPS):
                err = np.abs(np.asarray(got[t]) - ref[t][rank]).max()
                assert err < 1e-5, f"{stage} {name} rank {rank} step {t + 1}: max |w - ref| = {err:.3g}"


# -- plain torch: split tensors in the flat, sharded and int8 modes --------------------------------------
PT_K, PT_STEPS, PT_LR, PT_ALPHA, PT_BLOCK = 4, 10, 0.1, 0.7, 8


def _pt_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 4))  # 240, 40, 160, 4 elements


def _pt_batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + t)
    return torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)


PT_CASES = {
    "flat_nesterov_f2_t1": dict(num_fragments=2, fragment_sync_delay=1, outer_momentum=0.9, nesterov=True),
    "flat_f4": dict(num_fragments=4),
    "sharded_momentum_f2_t1": dict(num_fragments=2, fragment_sync_delay=1, outer_momentum=0.5, sharded=True,
                                   bucket_cap_mb=1e-4),
    "int8_ef_f2_t1": dict(num_fragments=2, fragment_sync_delay=1, comm_dtype="int8"),
}


def _pt_train(model, opt, rank, start, stop):
    for t in range(start, stop):
        opt.zero_grad()
        x, y = _pt_batch(rank, t)
        F.mse_loss(model(x), y).backward()
        opt.step()


def _flat(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def _state_tensors(opt) -> list[torch.Tensor]:
    sd = opt.state_dict()["state"]
    return [v if isinstance(v, torch.Tensor) else torch.tensor(v)
            for idx in sorted(sd) for _, v in sorted(sd[idx].items())]


def _pt_all(rank: int, world: int) -> dict[str, Any]:
    from lookahead_dist import LocalSGDOptions, Lookahead

    torch.use_deterministic_algorithms(True)

    def build(opts, seed):
        model = _pt_model(seed)
        opt = Lookahead(torch.optim.SGD(model.parameters(), lr=PT_LR, momentum=0.9), k=PT_K, alpha=PT_ALPHA,
                        local_sgd=LocalSGDOptions(quant_block_size=PT_BLOCK, **opts))
        return model, opt

    out: dict[str, Any] = {}
    for name, opts in PT_CASES.items():
        model, opt = build(opts, rank)
        stats, per_step = opt.local_sgd.stats, []
        for t in range(PT_STEPS):
            before = stats.total("wire", label="params")
            _pt_train(model, opt, rank, t, t + 1)
            per_step.append(stats.total("wire", label="params") - before)
        plans = opt.local_sgd._units[opt.param_groups[0]["params"][0]].fragments
        res: dict[str, Any] = {"fast": _flat(model), "per_step": per_step,
                               "names": [[n for plan in fr for n in plan.names] for fr in plans]}
        if opts.get("comm_dtype"):
            res["ef_shapes"] = [(tuple(opt.state[p]["lookahead_ef_residual"].shape),
                                 tuple(opt.state[p]["lookahead_ef_owner"].shape)) for p in model.parameters()]
        if opts.get("fragment_sync_delay"):  # checkpoint after step 6: fragment 1 in flight, due at step 7
            straight, straight_opt = model, opt
            model, opt = build(opts, rank)
            _pt_train(model, opt, rank, 0, 6)
            blob = io.BytesIO()
            sd = opt.state_dict()
            torch.save(sd, blob)
            res["due"] = sorted({int(s.get("lookahead_inflight_due", -1)) for s in sd["state"].values()})
            blob.seek(0)
            model2, opt2 = build(opts, 123)
            with torch.no_grad():
                for p, q in zip(model2.parameters(), model.parameters()):
                    p.copy_(q)
            opt2.load_state_dict(torch.load(blob, weights_only=True))
            _pt_train(model2, opt2, rank, 6, 7)
            res["resumed_in_flight_after_step7"] = opt2.local_sgd.in_flight()
            _pt_train(model2, opt2, rank, 7, PT_STEPS)
            res["resume_fast_equal"] = bool(np.array_equal(_flat(model2), _flat(straight)))
            res["resume_state_equal"] = all(torch.equal(a, b) for a, b in zip(_state_tensors(opt2),
                                                                               _state_tensors(straight_opt)))
        out[name] = res
    return out


@pytest.fixture(scope="module")
def pt_runs(two_rank_runs):
    return [res["pt"] for res in two_rank_runs]


def _pt_reference(f: int, tau: int, beta: float, nesterov: bool, sharded: bool = False) -> list[list[np.ndarray]]:
    base = _pt_model(0)
    replicas = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=PT_LR, momentum=0.9) for m in replicas]
    vecs = [torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone() for m in replicas]

    def inner(t):
        for r, (m, o) in enumerate(zip(replicas, opts)):
            _load(m, vecs[r])
            o.zero_grad()
            x, y = _pt_batch(r, t)
            F.mse_loss(m(x), y).backward()
            o.step()
            vecs[r].copy_(torch.nn.utils.parameters_to_vector(m.parameters()).detach())

    # By hand for this model (240 | 40 | 160 | 4 elements, block 8): F=2 cuts at 222 -> 224 (inside the
    # first weight); F=4 at 111 -> 112, 222 -> 224 and 333 -> 280 + 56 (inside the second weight); the
    # pieces go by their midpoints: F=4 puts [224, 240) of the first weight, its bias and [0, 56) of the
    # second weight in fragment 2.
    pieces = {2: [[(0, 224)], [(224, 444)]],
              4: [[(0, 112)], [(112, 224)], [(224, 336)], [(336, 444)]]}[f]
    if sharded:  # the piece [0, 224) of the first weight is the same fraction of each of its 2 shard chunks
        pieces = [[(0, 112), (120, 232)], [(112, 120), (232, 444)]]
    return simulate(vecs, PT_K, f, tau, pieces, PT_ALPHA, beta, nesterov, PT_STEPS, inner)


def test_plain_torch_split_plans(pt_runs):
    names = pt_runs[0]["flat_f4"]["names"]
    assert names == [["param_groups[0][0][0:112]"], ["param_groups[0][0][112:224]"],
                     ["param_groups[0][0][224:240]", "param_groups[0][1]", "param_groups[0][2][0:56]"],
                     ["param_groups[0][2][56:160]", "param_groups[0][3]"]]
    # sharded: each piece has one part per shard chunk
    assert pt_runs[0]["sharded_momentum_f2_t1"]["names"][0] == ["param_groups[0][0][0:224]"] * 2


@pytest.mark.parametrize("name, f, tau, beta, nesterov", [
    ("flat_nesterov_f2_t1", 2, 1, 0.9, True),
    ("flat_f4", 4, 0, 0.0, False),
    ("sharded_momentum_f2_t1", 2, 1, 0.5, False),
])
def test_plain_torch_split_matches_simulation(pt_runs, name, f, tau, beta, nesterov):
    ref = _pt_reference(f, tau, beta, nesterov, sharded=name.startswith("sharded"))
    for rank, res in enumerate(pt_runs):
        np.testing.assert_allclose(res[name]["fast"], ref[-1][rank], rtol=0, atol=2e-6, err_msg=name)


def test_plain_torch_bytes_per_sync(pt_runs):
    total = 4 * 444
    for name, f in (("flat_f4", 4), ("flat_nesterov_f2_t1", 2)):
        syncs = [s for s in pt_runs[0][name]["per_step"] if s]
        assert len(syncs) == sum(1 for t in range(PT_STEPS) if (t % PT_K + 1) % (PT_K // f) == 0), syncs
        assert all(abs(s - total / f) <= 4 * PT_BLOCK for s in syncs), (name, syncs)


def test_plain_torch_int8_split_is_close_and_error_feedback_state_keeps_its_shape(pt_runs):
    # The quantised reduce has 2 owner chunks per tensor: a piece is the same fraction of each (like sharded).
    ref = _pt_reference(2, 1, 0.0, False, sharded=True)
    other = _pt_reference(2, 1, 0.0, False)
    shapes = [tuple(p.shape) for p in _pt_model().parameters()]
    for rank, res in enumerate(pt_runs):
        r = res["int8_ef_f2_t1"]
        err = np.abs(r["fast"] - ref[-1][rank]).max()
        assert err < 2e-2, err
        assert err < np.abs(r["fast"] - other[-1][rank]).max()
        assert r["ef_shapes"] == [(s, (int(np.prod(s)) // 2 + (rank < int(np.prod(s)) % 2),)) for s in shapes]


@pytest.mark.parametrize("name", [n for n, o in PT_CASES.items() if o.get("fragment_sync_delay")])
def test_checkpoint_with_a_split_fragment_in_flight_resumes_exactly(pt_runs, name):
    for res in pt_runs:
        r = res[name]
        assert r["due"] == [1], r["due"]  # every tensor touches fragment 1; the split one is in fragment 0 too
        assert r["resumed_in_flight_after_step7"] == []
        assert r["resume_fast_equal"] and r["resume_state_equal"], name


# -- plain torch, hierarchical: 4 ranks, 2 groups of 2 (DDP inside), sharded inside the group ------------
HIER_CASES = {
    "hier_sharded_f2_t1": dict(num_fragments=2, fragment_sync_delay=1, sharded=True),
    "hier_sharded_int8_f2_t1": dict(num_fragments=2, fragment_sync_delay=1, sharded=True, comm_dtype="int8"),
}


def _hier_all(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lookahead_dist import LocalSGDOptions, Lookahead

    torch.use_deterministic_algorithms(True)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("inter", "intra"))

    def build(opts, seed):
        ddp = DDP(_pt_model(seed), process_group=mesh.get_group("intra"))
        options = LocalSGDOptions.from_mesh(mesh, across="inter", within="intra", module=ddp,
                                            quant_block_size=PT_BLOCK, **opts)
        return ddp, Lookahead(torch.optim.SGD(ddp.parameters(), lr=PT_LR, momentum=0.9), k=PT_K, alpha=PT_ALPHA,
                              local_sgd=options)

    out: dict[str, Any] = {}
    for name, opts in HIER_CASES.items():
        ddp, opt = build(opts, rank)
        _pt_train(ddp, opt, rank, 0, PT_STEPS)
        res: dict[str, Any] = {"fast": _flat(ddp.module)}
        model, opt2 = build(opts, rank)
        _pt_train(model, opt2, rank, 0, 6)
        blob = io.BytesIO()
        torch.save(opt2.state_dict(), blob)
        blob.seek(0)
        model3, opt3 = build(opts, 123)
        with torch.no_grad():
            for p, q in zip(model3.parameters(), model.parameters()):
                p.copy_(q)
        opt3.load_state_dict(torch.load(blob, weights_only=True))
        _pt_train(model3, opt3, rank, 6, PT_STEPS)
        res["resume_fast_equal"] = bool(np.array_equal(_flat(model3.module), res["fast"]))
        res["resume_state_equal"] = all(torch.equal(a, b) for a, b in zip(_state_tensors(opt3), _state_tensors(opt)))
        out[name] = res
    return out


def _hier_reference(pieces: list[list[tuple[int, int]]]) -> list[list[np.ndarray]]:
    """2 replicas (groups), each SGD on the mean loss of its 2 ranks' batches (DDP), fragments by hand."""
    base = _pt_model(0)
    replicas = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=PT_LR, momentum=0.9) for m in replicas]
    vecs = [torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone() for m in replicas]

    def inner(t):
        for g, (m, o) in enumerate(zip(replicas, opts)):
            _load(m, vecs[g])
            o.zero_grad()
            loss = 0
            for r in (2 * g, 2 * g + 1):
                x, y = _pt_batch(r, t)
                loss = loss + F.mse_loss(m(x), y) / 2
            loss.backward()
            o.step()
            vecs[g].copy_(torch.nn.utils.parameters_to_vector(m.parameters()).detach())

    return simulate(vecs, PT_K, 2, 1, pieces, PT_ALPHA, 0.0, False, PT_STEPS, inner)


@pytest.fixture(scope="module")
def hier_runs():
    return run_ranks(_hier_all, world_size=4, timeout=300)


@pytest.mark.timeout(360)
def test_hierarchical_sharded_split_matches_simulation_and_resumes(hier_runs):
    # Shard chunks of the first weight (240 elements): 2 x 120; the piece [0, 224) is 112 of each.
    fp32 = _hier_reference([[(0, 112), (120, 232)], [(112, 120), (232, 444)]])
    # int8 adds the 2 owner chunks of the quantised reduce inside each shard chunk: 4 x 60, 56 of each.
    q = [(0, 56), (60, 116), (120, 176), (180, 236)]
    int8 = _hier_reference([q, [(56, 60), (116, 120), (176, 180), (236, 444)]])
    for rank, res in enumerate(hier_runs):
        np.testing.assert_allclose(res["hier_sharded_f2_t1"]["fast"], fp32[-1][rank // 2], rtol=0, atol=2e-6)
        err = np.abs(res["hier_sharded_int8_f2_t1"]["fast"] - int8[-1][rank // 2]).max()
        assert err < 2e-2, err
        for name in HIER_CASES:
            assert res[name]["resume_fast_equal"] and res[name]["resume_state_equal"], (rank, name)
