"""Local-SGD mode on real gloo processes, against independent references.

One 2-rank spawn runs every 2-rank scenario (a spawn costs more than the scenarios), one 4-rank
spawn runs the hierarchical ones; the test functions assert on their results. References:

- DDP (k=1, alpha=1, plain SGD), with a comm hook counting its all-reduce bytes;
- torch's PostLocalSGDOptimizer + PeriodicModelAverager on gloo CPU (alpha=1). Its averager
  counts from 0 and averages when ``step >= warmup_steps and (step - warmup_steps) % period == 0``
  after each optimizer step; ``warmup_steps = period - 1`` puts its averages after steps
  period, 2 period, ..., where Lookahead syncs;
- a single-process simulation of N workers on the same data shards, whose outer step is
  ``torch.optim.SGD(lr=alpha, momentum=beta, nesterov=...)`` with gradient ``slow - mean(fast)``.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lookahead_dist import OUTER_MOMENTUM_KEY, SLOW_KEY, Lookahead, LocalSGDOptions
from tests.distributed._spawn import run_ranks

pytestmark = pytest.mark.distributed

LR = 0.1
STEPS = 10  # with k=4: two syncs, then two local steps (fast weights differ per rank at the end)


# -- shared pieces (module level: spawn pickles them by name) ----------------------------------
def make_model(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    # Every parameter has an even number of elements: no shard padding, exact byte counts for N=2.
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + t)
    return torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)


def loss_on(model: nn.Module, ranks: list[int], t: int) -> torch.Tensor:
    # The mean over ranks' batches: what DDP's gradient average computes for a group.
    return sum(F.mse_loss(model(x), y) for x, y in (batch(r, t) for r in ranks)) / len(ranks)


def sgd(params, momentum: float = 0.9):
    return torch.optim.SGD(params, lr=LR, momentum=momentum)


def train(model, opt, ranks: list[int], start: int, stop: int, ddp_no_sync: bool = False) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        if ddp_no_sync:
            with model.no_sync():
                loss_on(model, ranks, t).backward()
        else:
            loss_on(model, ranks, t).backward()
        opt.step()


def flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def slow_flat(model: nn.Module, opt: Lookahead) -> np.ndarray:
    with opt.use_slow_weights():  # gathers the chunks in sharded mode
        return flat(model)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(opt: Lookahead, key: str) -> int:
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            entry = opt.state.get(p) if SLOW_KEY in opt.state.get(p, {}) else opt._pending.get(p, {})
            if key in entry:
                total += entry[key].numel() * entry[key].element_size()
    return total


def simulate(workers_data: list[list[int]], steps: int, k: int, alpha: float, *, beta: float = 0.0,
             nesterov: bool = False, bn: bool = False, momentum: float = 0.9):
    """N workers from model 0, each on its shards; every k steps the outer SGD step and averaging."""
    base = make_model(0, bn)
    workers = [copy.deepcopy(base) for _ in workers_data]
    inner = [sgd(w.parameters(), momentum) for w in workers]
    slow = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
    outer = torch.optim.SGD(slow, lr=alpha, momentum=beta, nesterov=nesterov)
    for t in range(steps):
        for w, o, ranks in zip(workers, inner, workers_data):
            o.zero_grad()
            loss_on(w, ranks, t).backward()
            o.step()
        if (t + 1) % k:
            continue
        with torch.no_grad():
            fast = [list(w.parameters()) for w in workers]
            for j, s in enumerate(slow):
                s.grad = s - sum(f[j] for f in fast) / len(workers)
            outer.step()
            for f in fast:
                for p, s in zip(f, slow):
                    p.copy_(s)
            bufs = [[b for b in w.buffers() if b.is_floating_point()] for w in workers]
            for j in range(len(bufs[0])):
                mean = sum(b[j] for b in bufs) / len(workers)
                for b in bufs:
                    b[j].copy_(mean)
    return [flat(w) for w in workers], torch.cat([s.detach().reshape(-1) for s in slow]).numpy(), workers


# -- the 2-rank scenarios -----------------------------------------------------------------------
def _ddp_vs_k1(rank: int) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model(0))
    ddp_bytes = [0]

    def counting_hook(state, bucket):
        ddp_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    train(ddp, sgd(ddp.parameters(), momentum=0.0), [rank], 0, STEPS)

    model = make_model(0)
    opt = Lookahead(sgd(model.parameters(), momentum=0.0), k=1, alpha=1.0, local_sgd=True)
    train(model, opt, [rank], 0, STEPS)
    return {"ddp": flat(ddp.module), "ours": flat(model), "ddp_bytes": ddp_bytes[0],
            "ours_bytes": opt.local_sgd.stats.total("payload", label="params"),
            "param_bytes": param_bytes(model)}


def _post_local_sgd(rank: int, k: int = 3) -> dict:
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    ref = make_model(0)
    ref_opt = PostLocalSGDOptimizer(sgd(ref.parameters()), PeriodicModelAverager(period=k, warmup_steps=k - 1))
    train(ref, ref_opt, [rank], 0, STEPS)
    model = make_model(0)
    opt = Lookahead(sgd(model.parameters()), k=k, alpha=1.0, local_sgd=True)
    train(model, opt, [rank], 0, STEPS)
    return {"ref": flat(ref), "ours": flat(model)}


def _run(rank: int, options: LocalSGDOptions | bool, *, k: int = 4, alpha: float = 0.5, bn: bool = False,
         steps: int = STEPS, seed: int | None = None) -> tuple[nn.Module, Lookahead]:
    model = make_model(rank if seed is None else seed, bn)
    if isinstance(options, LocalSGDOptions) and bn:
        options.module = model
    opt = Lookahead(sgd(model.parameters()), k=k, alpha=alpha, local_sgd=options)
    train(model, opt, [rank], 0, steps)
    return model, opt


def _outer_variants(rank: int) -> dict:
    out: dict = {}
    # Different seeds per rank: init="broadcast" must make them start from rank 0's model.
    for name, opts in {
        "lookahead": LocalSGDOptions(),
        "slowmo": LocalSGDOptions(outer_momentum=0.5),
        "diloco": LocalSGDOptions(outer_momentum=0.9, nesterov=True),
        "sharded_diloco": LocalSGDOptions(outer_momentum=0.9, nesterov=True, sharded=True, bucket_cap_mb=1e-4),
        "bf16": LocalSGDOptions(comm_dtype=torch.bfloat16),
    }.items():
        model, opt = _run(rank, opts, bn=True)
        stats = opt.local_sgd.stats
        out[name] = {
            "fast": flat(model), "slow": slow_flat(model, opt), "running_mean": model[1].running_mean.numpy().copy(),
            "payload": stats.total("payload", label="params"), "wire": stats.total("wire", label="params"),
            "slow_bytes": state_bytes(opt, SLOW_KEY), "mom_bytes": state_bytes(opt, OUTER_MOMENTUM_KEY),
            "buckets": stats.total("calls", label="params", op="reduce_scatter"),
        }
    out["param_bytes"] = param_bytes(model)
    return out


def _checkpoint(rank: int) -> dict:
    """Stop mid-cycle (step 6 of k=4), save, rebuild from other weights, load, finish: bit-exact."""
    out = {}
    for name, opts in {"flat": dict(outer_momentum=0.9, nesterov=True),
                       "sharded": dict(outer_momentum=0.9, sharded=True)}.items():
        straight, straight_opt = _run(rank, LocalSGDOptions(**opts), bn=True)
        model, opt = _run(rank, LocalSGDOptions(**opts), bn=True, steps=6)
        blob = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
        blob.seek(0)
        saved = torch.load(blob, weights_only=True)
        # A fresh run (other initial weights). Build the optimizer first -- its init broadcast
        # aligns the fresh weights -- then load this rank's own (mid-cycle) model and state.
        model2 = make_model(123, bn=True)
        opt2 = Lookahead(sgd(model2.parameters()), k=4, alpha=0.5, local_sgd=LocalSGDOptions(module=model2, **opts))
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        train(model2, opt2, [rank], 6, STEPS)
        out[name] = {
            "fast_equal": bool(np.array_equal(flat(straight), flat(model2))),
            "slow_equal": bool(np.array_equal(slow_flat(straight, straight_opt), slow_flat(model2, opt2))),
            "buffers_equal": all(torch.equal(a, b) for a, b in zip(straight.buffers(), model2.buffers())),
            "state_equal": all(
                torch.equal(a, b) for a, b in zip(_state_tensors(straight_opt), _state_tensors(opt2))),
        }
    return out


def _state_tensors(opt: Lookahead) -> list[torch.Tensor]:
    sd = opt.state_dict()["state"]
    return [v if isinstance(v, torch.Tensor) else torch.tensor(v)
            for idx in sorted(sd) for _, v in sorted(sd[idx].items())]


def _guards(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    # DDP outside no_sync: warned at the sync (or raised); inside no_sync: silent.
    for mode in ("warn", "raise", "no_sync"):
        ddp = DDP(make_model(0))
        opt = Lookahead(sgd(ddp.parameters()), k=2, local_sgd=LocalSGDOptions(
            module=ddp, on_ddp_sync="raise" if mode == "raise" else "warn"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train(ddp, opt, [rank], 0, 2, ddp_no_sync=mode == "no_sync")
                out[mode] = [str(w.message) for w in caught if "no_sync" in str(w.message)]
            except RuntimeError as e:
                out[mode] = f"RuntimeError: {e}"
        if mode == "warn":  # close() removes the watch: DDP outside no_sync is then not looked at
            hooks = len(ddp._forward_pre_hooks)
            opt.close()
            out["close_removed_hooks"] = hooks - len(ddp._forward_pre_hooks)
    # init="check" with different weights: a ValueError on every rank (no hang).
    try:
        Lookahead(sgd(make_model(rank).parameters()), local_sgd=LocalSGDOptions(init="check"))
        out["check"] = "no error"
    except ValueError as e:
        out["check"] = str(e)
    Lookahead(sgd(make_model(0).parameters()), local_sgd=LocalSGDOptions(init="check"))  # equal: passes
    # Different architectures: a clear ValueError rather than a hang in the broadcast.
    try:
        Lookahead(sgd(make_model(0, bn=rank == 1).parameters()), local_sgd=True)
        out["shapes"] = "no error"
    except ValueError as e:
        out["shapes"] = str(e)
    # The broadcast really aligns: every rank holds rank 0's weights after construction.
    model = make_model(rank)
    Lookahead(sgd(model.parameters()), local_sgd=True)
    out["aligned"] = bool(np.array_equal(flat(model), flat(make_model(0))))
    return out


def _two_rank_body(rank: int, world_size: int) -> dict:
    torch.use_deterministic_algorithms(True)
    return {
        "ddp": _ddp_vs_k1(rank),
        "post_local": _post_local_sgd(rank),
        "variants": _outer_variants(rank),
        "checkpoint": _checkpoint(rank),
        "guards": _guards(rank),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_two_rank_body, world_size=2, timeout=200)


@pytest.mark.timeout(240)
def test_k1_alpha1_plain_sgd_equals_ddp_and_bytes(two_ranks):
    for res in two_ranks:
        d = res["ddp"]
        np.testing.assert_allclose(d["ours"], d["ddp"], rtol=0, atol=2e-6)
        # Counted at the collectives: DDP all-reduces the parameter bytes every step; so does k=1.
        assert d["ddp_bytes"] == STEPS * d["param_bytes"]
        assert d["ours_bytes"] == STEPS * d["param_bytes"]


def test_alpha1_equals_torch_post_local_sgd(two_ranks):
    for res in two_ranks:
        np.testing.assert_allclose(res["post_local"]["ours"], res["post_local"]["ref"], rtol=0, atol=2e-6)
    # Mid-cycle at the end: the ranks really trained locally (the comparison is not vacuous).
    assert np.abs(two_ranks[0]["post_local"]["ours"] - two_ranks[1]["post_local"]["ours"]).max() > 1e-3


@pytest.mark.parametrize("name,beta,nesterov", [("lookahead", 0.0, False), ("slowmo", 0.5, False),
                                                ("diloco", 0.9, True), ("sharded_diloco", 0.9, True)])
def test_matches_simulation_of_two_workers(two_ranks, name, beta, nesterov):
    fast, slow, workers = simulate([[0], [1]], STEPS, 4, 0.5, beta=beta, nesterov=nesterov, bn=True)
    for rank, res in enumerate(two_ranks):
        v = res["variants"][name]
        np.testing.assert_allclose(v["fast"], fast[rank], rtol=0, atol=2e-6)
        np.testing.assert_allclose(v["slow"], slow, rtol=0, atol=2e-6)
        # BatchNorm running stats averaged at the syncs (then two local steps of drift).
        np.testing.assert_allclose(v["running_mean"], workers[rank][1].running_mean.numpy(), rtol=0, atol=2e-6)


def test_bytes_per_step_is_param_bytes_over_k(two_ranks):
    v = two_ranks[0]["variants"]
    pb = two_ranks[0]["variants"]["param_bytes"]
    syncs = STEPS // 4
    assert v["lookahead"]["payload"] == syncs * pb  # i.e. pb / k per step over whole cycles
    # Sharded: a reduce-scatter and an all-gather, the same ring-model wire bytes as one all-reduce.
    assert v["sharded_diloco"]["wire"] == v["lookahead"]["wire"] == syncs * pb  # 2(N-1)/N = 1 at N=2
    assert v["sharded_diloco"]["buckets"] > 2 * syncs  # the tiny bucket cap split the model
    assert v["bf16"]["payload"] == syncs * pb // 2


def test_sharded_holds_one_nth_of_the_slow_state(two_ranks):
    for res in two_ranks:
        v, pb = res["variants"], res["variants"]["param_bytes"]
        assert v["diloco"]["slow_bytes"] == v["diloco"]["mom_bytes"] == pb
        assert v["sharded_diloco"]["slow_bytes"] == v["sharded_diloco"]["mom_bytes"] == pb // 2
        assert v["lookahead"]["mom_bytes"] == 0  # no momentum, no allocation
        np.testing.assert_allclose(v["sharded_diloco"]["fast"], v["diloco"]["fast"], rtol=0, atol=1e-6)


def test_bf16_communication_close_to_fp32(two_ranks):
    for res in two_ranks:
        v = res["variants"]
        err = np.abs(v["bf16"]["slow"] - v["lookahead"]["slow"]).max()
        assert 0 < err < 2e-3, err  # compressed (not identical) yet close
        np.testing.assert_allclose(v["bf16"]["fast"], v["lookahead"]["fast"], rtol=0, atol=2e-3)


def test_checkpoint_mid_cycle_resume_is_exact(two_ranks):
    for res in two_ranks:
        for name, c in res["checkpoint"].items():
            assert c == {"fast_equal": True, "slow_equal": True, "buffers_equal": True, "state_equal": True}, name


def test_guards(two_ranks):
    for res in two_ranks:
        g = res["guards"]
        assert len(g["warn"]) == 1 and "all-reduced gradients" in g["warn"][0]
        assert g["close_removed_hooks"] == 1, g["close_removed_hooks"]  # Lookahead.close() drops the DDP watch
        assert g["raise"].startswith("RuntimeError") and "no_sync" in g["raise"]
        assert g["no_sync"] == []
        assert "ranks [1] start from other weights than rank 0" in g["check"]
        assert "other shapes" in g["shapes"]
        assert g["aligned"] is True


# -- hierarchical: 4 ranks, 2 groups of 2 ---------------------------------------------------------
def _hier_body(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.use_deterministic_algorithms(True)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("inter", "intra"))
    group = rank // 2
    out = {}
    for name, opts in {"flat": dict(outer_momentum=0.5),
                       "sharded": dict(outer_momentum=0.5, sharded=True, bucket_cap_mb=1e-4),
                       "sharded_bf16": dict(sharded=True, comm_dtype=torch.bfloat16),
                       "flat_int8": dict(comm_dtype="int8", quant_block_size=8),
                       "sharded_int8_stream": dict(sharded=True, comm_dtype="int8", quant_block_size=8,
                                                   fragment_sync_delay=1),
                       # the fused kernels on the hierarchical-sharded path: bit for bit the row above
                       "sharded_int8_stream_fused": dict(sharded=True, comm_dtype="int8", quant_block_size=8,
                                                         fragment_sync_delay=1, fused_kernels=True),
                       # sparse across groups: each rank's chunk of its group's progress, top-k encoded
                       "sharded_top": dict(sharded=True, comm_dtype="int4", topk_fraction=0.5)}.items():
        ddp = DDP(make_model(rank), process_group=mesh.get_group("intra"))  # DP every step inside a group
        options = LocalSGDOptions.from_mesh(mesh, across="inter", within="intra", module=ddp, **opts)
        opt = Lookahead(sgd(ddp.parameters()), k=3, alpha=0.5, local_sgd=options)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # DDP inside the group must not trigger the DDP warning
            train(ddp, opt, [rank], 0, 7)
        stats = opt.local_sgd.stats
        out[name] = {
            "group": group, "fast": flat(ddp.module), "slow": slow_flat(ddp.module, opt),
            "inter_payload": stats.total("payload", label="params", op="all_reduce"),
            "quant_payload": stats.total("payload", label="params", op="all_to_all"),
            "intra_gather": stats.total("payload", label="params", op="all_gather"),
            "slow_bytes": state_bytes(opt, SLOW_KEY), "param_bytes": param_bytes(ddp.module),
            "quant_numels": [plan.quant.numel for unit in opt.local_sgd._units.values()
                             for plans in unit.fragments for plan in plans if plan.quant is not None],
        }
    # FSDP2 inside each group: parameters are DTensor shards over "intra"; each rank averages its
    # own local shard with the same shard of the other group (no intra_group: shards differ).
    from torch.distributed.fsdp import fully_shard

    fsdp_variants = {"fsdp": dict(outer_momentum=0.5), "fsdp_sharded": dict(outer_momentum=0.5, sharded=True)}
    for name, opts in fsdp_variants.items():
        # FSDP2 does not broadcast at construction: within a group, equal initial weights are the
        # caller's job (same seed here); across groups, the optimizer's init broadcast aligns them.
        model = fully_shard(make_model(group), mesh=mesh["intra"])
        opt = Lookahead(sgd(model.parameters()), k=3, alpha=0.5,
                        local_sgd=LocalSGDOptions.from_mesh(mesh, across="inter", **opts))
        train(model, opt, [rank], 0, 7)
        full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).numpy().copy()
        with opt.use_slow_weights():
            slow = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).numpy().copy()
        out[name] = {"fast": full, "slow": slow, "slow_bytes": state_bytes(opt, SLOW_KEY),
                     "param_bytes": out["flat"]["param_bytes"]}
    return out


@pytest.mark.timeout(240)
def test_hierarchical_two_groups_of_two():
    res = run_ranks(_hier_body, world_size=4, timeout=200)
    data = [[0, 1], [2, 3]]  # group g = ranks 2g, 2g+1 (DDP averages their gradients)
    sims = {name: simulate(data, 7, 3, 0.5, beta=beta) for name, beta in (("m", 0.5), ("0", 0.0))}
    for rank, r in enumerate(res):
        for name, sim in (("flat", "m"), ("sharded", "m"), ("sharded_bf16", "0"), ("flat_int8", "0"),
                          ("fsdp", "m"), ("fsdp_sharded", "m")):
            fast, slow, _ = sims[sim]
            v = r[name]
            atol = 2e-3 if "bf16" in name or "int8" in name else 2e-6
            np.testing.assert_allclose(v["fast"], fast[rank // 2], rtol=0, atol=atol, err_msg=name)
            np.testing.assert_allclose(v["slow"], slow, rtol=0, atol=atol, err_msg=name)
        for key in ("fast", "slow"):
            np.testing.assert_array_equal(r["sharded_int8_stream_fused"][key], r["sharded_int8_stream"][key])
        pb, syncs = r["flat"]["param_bytes"], 7 // 3
        assert r["flat"]["inter_payload"] == syncs * pb and r["flat"]["slow_bytes"] == pb
        # Sharded inside the group: each rank carries half the model across groups, keeps half the
        # slow weights, and the group all-gathers the result.
        assert r["sharded"]["inter_payload"] == syncs * pb // 2
        assert r["sharded"]["intra_gather"] == syncs * pb
        assert r["sharded"]["slow_bytes"] == pb // 2
        assert r["sharded_bf16"]["inter_payload"] == syncs * pb // 4
        # int8 across groups: an all-to-all and an all-gather of quantised chunks, no fp32 all-reduce;
        # sharded inside the group, each rank quantises only its half.
        assert r["flat_int8"]["inter_payload"] == r["sharded_int8_stream"]["inter_payload"] == 0
        assert 0 < r["sharded_int8_stream"]["quant_payload"] * 2 == r["flat_int8"]["quant_payload"]
        # FSDP2 holds half of each parameter (rows); sharding the slow weights over the other group
        # as well leaves a quarter.
        assert r["fsdp"]["slow_bytes"] == pb // 2 and r["fsdp_sharded"]["slow_bytes"] == pb // 4
    # Top-k across groups (hierarchical sharded): replicas agree in a group, every rank holds the same
    # slow weights, near the fp32 run; on the wire, per sync, each rank's payload for its chunk to the
    # other group (all-gathered) besides the group's fp32 all-gather of the new chunks.
    from lookahead_dist._sparse import sparse_nbytes

    fast0, slow0, _ = sims["0"]
    pb, syncs = res[0]["flat"]["param_bytes"], 7 // 3
    for rank, r in enumerate(res):
        v = r["sharded_top"]
        np.testing.assert_array_equal(v["slow"], res[0]["sharded_top"]["slow"])
        np.testing.assert_allclose(v["fast"], fast0[rank // 2], rtol=0, atol=2e-2)  # 6.5e-3 measured
        assert np.abs(v["fast"] - r["sharded_bf16"]["fast"]).max() > 1e-4  # it really was sparse
        sparse = sum(2 * sparse_nbytes(n, fraction=0.5, bits=4) for n in v["quant_numels"])
        assert v["intra_gather"] == syncs * (sparse + pb) and v["inter_payload"] == v["quant_payload"] == 0
    assert np.array_equal(res[0]["sharded_top"]["fast"], res[1]["sharded_top"]["fast"])
    # Streaming int8 across groups: every rank ends with the same slow weights, replicas agree in a group.
    for r in res:
        np.testing.assert_array_equal(r["sharded_int8_stream"]["slow"], res[0]["sharded_int8_stream"]["slow"])
    assert np.array_equal(res[2]["sharded_int8_stream"]["fast"], res[3]["sharded_int8_stream"]["fast"])
    # The groups really differ mid-cycle, and agree inside a group.
    assert np.array_equal(res[0]["flat"]["fast"], res[1]["flat"]["fast"])
    assert np.abs(res[0]["flat"]["fast"] - res[2]["flat"]["fast"]).max() > 1e-3
