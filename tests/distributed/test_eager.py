"""Eager outer updates (``LocalSGDOptions(eager_update=True | "naive")``) on real gloo processes.

The reference is :func:`simulate_eager`, a single-process simulation of 2 workers following the
rule of Note [Eager outer updates] in ``lookahead_dist/sync/_outer.py`` (Kale, Douillard & Donchev
2025, arXiv 2502.12996), written out again here: each fragment's averaged outer gradient (measured
from each worker's own start point) is applied to the global slow weights at the fragment's next
sync; the eager rule restarts each worker from the global slow weights minus ``lr / N`` of its own
fresh outer gradient, the naive rule from the global slow weights. One 2-rank spawn runs every
scenario; the test functions assert on its results.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lookahead_dist import LocalSGDOptions, Lookahead
from lookahead_dist._quant import dequantize, quantize_with_feedback
from lookahead_dist._sparse import decode, encode, sparse_format, sparse_nbytes
from tests.distributed._spawn import run_ranks

pytestmark = pytest.mark.distributed

LR = 0.1
K = 4
STEPS = 14  # syncs of F=1 at steps 3, 7, 11: two results applied, one still in flight
ALPHA = 0.5


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def loss_on(model: nn.Module, rank: int, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + t)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)
    return F.mse_loss(model(x), y)


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def nesterov(ps):
    return torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)


def flat(tensors) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in tensors]).numpy().copy()


def train(model, opt, rank, start, stop) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        loss_on(model, rank, t).backward()
        opt.step()


def slow_state(opt: Lookahead) -> np.ndarray:
    """This rank's ``lookahead_slow`` (the global slow weights), in parameter order."""
    return flat(opt.state[p]["lookahead_slow"] for g in opt.param_groups for p in g["params"])


def state_tensors(opt: Lookahead) -> list[torch.Tensor]:
    sd = opt.state_dict()["state"]
    return [v if isinstance(v, torch.Tensor) else torch.tensor(v)
            for idx in sorted(sd) for _, v in sorted(sd[idx].items())]


def split_midpoint(nbytes: list[int], num_fragments: int) -> list[list[int]]:
    total, start, out = sum(nbytes), 0, [[] for _ in range(num_fragments)]
    for i, nb in enumerate(nbytes):
        out[min(num_fragments - 1, int(num_fragments * (start + nb / 2) / total))].append(i)
        start += nb
    return out


def _segments(tensors, n: int, block: int) -> torch.Tensor:
    """The sharded quantised reduce-scatter's layout, written out again: segment s holds chunk s
    (``tensor_split(n)``) of every tensor, zero-padded to a common length of whole blocks."""
    parts = [[t.reshape(-1).tensor_split(n)[s] for t in tensors] for s in range(n)]
    length = max(sum(c.numel() for c in seg) for seg in parts)
    length = -(-length // block) * block
    return torch.cat([F.pad(torch.cat(seg), (0, length - sum(c.numel() for c in seg))) for seg in parts])


def _unsegment(buf: torch.Tensor, like, n: int) -> list[torch.Tensor]:
    length, out = buf.numel() // n, [[] for _ in like]
    for s in range(n):
        o = s * length
        for i, t in enumerate(like):
            c = t.reshape(-1).tensor_split(n)[s].numel()
            out[i].append(buf[o:o + c])
            o += c
    return [torch.cat(pieces).view_as(t) for pieces, t in zip(out, like)]


def _sparse_sent(x: torch.Tensor, e: torch.Tensor, n: int, fraction: float, bits: int) -> torch.Tensor:
    """Each of the ``n`` segments top-k encoded on its own (with its slice of ``e``), decoded."""
    fmt = sparse_format(x.numel() // n, fraction=fraction, bits=bits)
    return torch.cat([decode(encode(xs, fmt, es), fmt) for xs, es in zip(x.chunk(n), e.chunk(n))])


def quantized_mean(own, res, bits: int, block: int, fraction: float | None = None) -> list[torch.Tensor]:
    """The sharded quantised reduce-scatter of the outer gradients ``own[r]`` (per worker, per
    tensor), by hand: each worker quantises its whole outer gradient in the layout above with its
    own error-feedback residual ``res[r]`` (updated), the dequantised values are summed in fp32 in
    worker order and halved. With ``fraction``: the sparse reduce-scatter, each segment top-k
    encoded on its own."""
    total = None
    for r in range(len(own)):
        x, e = _segments(own[r], len(own), block), _segments(res[r], len(own), block)
        if fraction is not None:
            sent = _sparse_sent(x, e, len(own), fraction, bits)
        else:
            sent = dequantize(quantize_with_feedback(x, e, bits=bits, block_size=block))
        for t, v in zip(res[r], _unsegment(e, res[r], len(own))):
            t.copy_(v)
        total = sent.clone() if total is None else total + sent
    return _unsegment(total * (1 / len(own)), own[0], len(own))


def simulate_eager(steps, k, num_fragments, rule, outer=None, lr=ALPHA, quant=None):
    """Two workers from model 0 on ranks 0 and 1's data, Note [Eager outer updates] by hand.

    ``outer(slow_params) -> Optimizer`` (default: the Lookahead step, SGD with lr ``ALPHA``);
    ``lr`` is its learning rate (eta of the eager restart point); ``quant=(bits, block)``: the
    outer gradients travel by :func:`quantized_mean` (sharded, quantised; ``(bits, block, fraction)``:
    sparse)."""
    base = make_model(0)
    workers = [copy.deepcopy(base) for _ in range(2)]
    inner = [sgd(w.parameters()) for w in workers]
    slow = [p.detach().clone() for p in base.parameters()]
    start = [[p.clone() for p in slow] for _ in workers]
    outer_opt = (outer or (lambda ps: torch.optim.SGD(ps, lr=ALPHA)))(slow)
    frags = split_midpoint([p.numel() * 4 for p in slow], num_fragments)
    stride, pending = k // num_fragments, {}
    residual = [[torch.zeros_like(p) for p in slow] for _ in workers]
    for t in range(steps):
        for r, (w, o) in enumerate(zip(workers, inner)):
            o.zero_grad()
            loss_on(w, r, t).backward()
            o.step()
        n = t % k + 1
        if n % stride:
            continue
        f = (n // stride) % num_fragments
        with torch.no_grad():
            fast = [list(w.parameters()) for w in workers]
            own = [{j: start[r][j] - fast[r][j] for j in frags[f]} for r in range(2)]  # Delta_i(t)
            old = pending.get(f)
            if quant is None:
                pending[f] = {j: (own[0][j] + own[1][j]) / 2 for j in frags[f]}
            else:
                mean = quantized_mean([[o[j] for j in frags[f]] for o in own],
                                      [[res[j] for j in frags[f]] for res in residual], *quant)
                pending[f] = dict(zip(frags[f], mean))
            if old is not None:  # D(t-1) arrives: the global outer step
                for j in frags[f]:
                    slow[j].grad = old[j]
                outer_opt.step()
                for j in frags[f]:
                    slow[j].grad = None
            for r in range(2):
                for j in frags[f]:
                    start[r][j] = slow[j] - (lr / 2) * own[r][j] if rule == "eager" else slow[j].clone()
                    fast[r][j].copy_(start[r][j])
    return [flat(w.parameters()) for w in workers], flat(slow)


# -- scenarios ------------------------------------------------------------------------------------
CASES = {  # name: (options, simulation)
    "eager_f1_nesterov": (dict(eager_update=True, outer_optimizer=nesterov),
                          dict(num_fragments=1, rule="eager", outer=nesterov, lr=0.7)),
    "naive_f1_nesterov": (dict(eager_update="naive", outer_optimizer=nesterov),
                          dict(num_fragments=1, rule="naive", outer=nesterov, lr=0.7)),
    "eager_f2_nesterov": (dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov),
                          dict(num_fragments=2, rule="eager", outer=nesterov, lr=0.7)),
    "naive_f2_nesterov": (dict(eager_update="naive", num_fragments=2, outer_optimizer=nesterov),
                          dict(num_fragments=2, rule="naive", outer=nesterov, lr=0.7)),
    "eager_f2_builtin_momentum": (
        dict(eager_update=True, num_fragments=2, outer_momentum=0.9, nesterov=True),
        dict(num_fragments=2, rule="eager", lr=ALPHA,
             outer=lambda ps: torch.optim.SGD(ps, lr=ALPHA, momentum=0.9, nesterov=True))),
    "eager_f1_lookahead": (dict(eager_update=True), dict(num_fragments=1, rule="eager")),
    # Sharded slow weights: the outer gradient is reduce-scattered, each rank steps its own chunk.
    "sharded_eager_f1_nesterov": (dict(eager_update=True, sharded=True, outer_optimizer=nesterov),
                                  dict(num_fragments=1, rule="eager", outer=nesterov, lr=0.7)),
    "sharded_naive_f2_nesterov": (dict(eager_update="naive", sharded=True, num_fragments=2,
                                       outer_optimizer=nesterov),
                                  dict(num_fragments=2, rule="naive", outer=nesterov, lr=0.7)),
    "sharded_eager_f2_builtin_momentum": (
        dict(eager_update=True, sharded=True, num_fragments=2, outer_momentum=0.9, nesterov=True),
        dict(num_fragments=2, rule="eager", lr=ALPHA,
             outer=lambda ps: torch.optim.SGD(ps, lr=ALPHA, momentum=0.9, nesterov=True))),
    # Sharded and quantised: each rank's whole outer gradient quantised (error feedback), the
    # owner sums its chunk in fp32.
    "sharded_eager_f2_int8": (
        dict(eager_update=True, sharded=True, num_fragments=2, outer_optimizer=nesterov, comm_dtype="int8",
             quant_block_size=8),
        dict(num_fragments=2, rule="eager", outer=nesterov, lr=0.7, quant=(8, 8))),
    "sharded_naive_f1_int2_momentum": (
        dict(eager_update="naive", sharded=True, outer_momentum=0.9, comm_dtype="int2", quant_block_size=8),
        dict(num_fragments=1, rule="naive", lr=ALPHA, quant=(2, 8),
             outer=lambda ps: torch.optim.SGD(ps, lr=ALPHA, momentum=0.9))),
    # Sharded and sparse: each chunk of each rank's outer gradient top-k encoded on its own, one
    # all-to-all, the owner sums its chunk in fp32.
    "sharded_eager_f2_top10_int4": (
        dict(eager_update=True, sharded=True, num_fragments=2, outer_optimizer=nesterov, comm_dtype="int4",
             topk_fraction=0.1, quant_block_size=8),
        dict(num_fragments=2, rule="eager", outer=nesterov, lr=0.7, quant=(4, 8, 0.1))),
    "sharded_naive_f1_top5_int2_momentum": (
        dict(eager_update="naive", sharded=True, outer_momentum=0.9, comm_dtype="int2", topk_fraction=0.05,
             quant_block_size=8),
        dict(num_fragments=1, rule="naive", lr=ALPHA, quant=(2, 8, 0.05),
             outer=lambda ps: torch.optim.SGD(ps, lr=ALPHA, momentum=0.9))),
}
SHARDED = sorted(c for c in CASES if c.startswith("sharded_"))


def own_chunks(full: np.ndarray, rank: int, n: int = 2) -> np.ndarray:
    """Rank ``rank``'s chunk (``tensor_split(n)``) of every parameter of ``make_model`` in ``full``,
    concatenated: what a sharded Lookahead keeps as ``lookahead_slow``."""
    out, o = [], 0
    for p in make_model(0).parameters():
        out.append(torch.from_numpy(full[o:o + p.numel()]).tensor_split(n)[rank].numpy())
        o += p.numel()
    return np.concatenate(out)


def _runs(rank: int) -> dict:
    out = {}
    for name, (opts, _) in CASES.items():
        model = make_model(rank)  # init="broadcast": rank 0's weights
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=ALPHA, local_sgd=LocalSGDOptions(**opts))
        train(model, opt, rank, 0, STEPS)
        st = opt.local_sgd.stats
        out[name] = {"fast": flat(model.parameters()), "slow": slow_state(opt),
                     "in_flight": sorted(opt.local_sgd.in_flight()),
                     "ops": {(op, kind): st.total(kind, label="params", op=op) for kind in ("payload", "calls")
                             for op in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")}}
    # Compression: int8 with error feedback on the wire of the eager rule.
    for name, opts in {"eager_f2_int8": dict(eager_update=True, num_fragments=2, comm_dtype="int8",
                                             quant_block_size=8, outer_optimizer=nesterov),
                       "eager_f2_fp32": dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov),
                       "eager_f2_bf16": dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov,
                                             comm_dtype=torch.bfloat16),
                       "sharded_eager_f2_bf16": dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov,
                                                     comm_dtype=torch.bfloat16, sharded=True)}.items():
        model = make_model(rank)
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=ALPHA, local_sgd=LocalSGDOptions(**opts))
        train(model, opt, rank, 0, STEPS)
        out[name] = {"fast": flat(model.parameters()), "slow": slow_state(opt),
                     "sent": opt.local_sgd.stats.total("payload", label="params")}
    return out


CKPT_CASES = {
    "f2_nesterov": dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov),
    "sharded_f2_nesterov": dict(eager_update=True, sharded=True, num_fragments=2, outer_optimizer=nesterov),
    "sharded_f1_naive_momentum": dict(eager_update="naive", sharded=True, outer_momentum=0.9),
    "sharded_f2_int4_ef_nesterov": dict(eager_update=True, sharded=True, num_fragments=2, comm_dtype="int4",
                                        quant_block_size=8, outer_optimizer=nesterov),
    "sharded_f2_top10_int2_ef_nesterov": dict(eager_update=True, sharded=True, num_fragments=2, comm_dtype="int2",
                                              topk_fraction=0.1, quant_block_size=8, outer_optimizer=nesterov),
    "f1_int8_ef_momentum": dict(eager_update=True, comm_dtype="int8", quant_block_size=8, outer_momentum=0.9),
    "f1_naive": dict(eager_update="naive", outer_momentum=0.5),
}


def _checkpoint_in_flight(rank: int) -> dict:
    """Save after step 6 (k=4: the collective launched at step 3, F=1; at step 5, F=2, in flight)."""
    out = {}
    for name, opts in CKPT_CASES.items():
        straight = make_model(rank)
        straight_opt = Lookahead(sgd(straight.parameters()), k=K, alpha=ALPHA, local_sgd=LocalSGDOptions(**opts))
        train(straight, straight_opt, rank, 0, STEPS)
        model = make_model(rank)
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=ALPHA, local_sgd=LocalSGDOptions(**opts))
        train(model, opt, rank, 0, 6)
        in_flight = sorted(opt.local_sgd.in_flight())
        blob = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)  # every rank its own
        train(model, opt, rank, 6, STEPS)  # the saving run goes on: flush() changed nothing
        blob.seek(0)
        saved = torch.load(blob, weights_only=True)
        model2 = make_model(123)
        opt2 = Lookahead(sgd(model2.parameters()), k=K, alpha=ALPHA, local_sgd=LocalSGDOptions(**opts))
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        train(model2, opt2, rank, 6, STEPS)
        ref_state = state_tensors(straight_opt)
        out[name] = {
            "in_flight_at_save": in_flight,
            "continued_equal": bool(np.array_equal(flat(model.parameters()), flat(straight.parameters()))),
            "fast_equal": bool(np.array_equal(flat(model2.parameters()), flat(straight.parameters()))),
            "slow_equal": bool(np.array_equal(slow_state(opt2), slow_state(straight_opt))),
            "state_equal": all(torch.equal(a, b) for a, b in zip(state_tensors(opt2), ref_state)),
        }
    return out


def _sync_now(rank: int, sharded: bool = False, **wire) -> dict:
    """``sync_now()`` with collectives in flight: every rank ends on the same weights."""
    model = make_model(rank)
    opt = Lookahead(sgd(model.parameters()), k=K, alpha=ALPHA,
                    local_sgd=LocalSGDOptions(eager_update=True, num_fragments=2, outer_momentum=0.9,
                                              sharded=sharded, **wire))
    train(model, opt, rank, 0, 6)
    opt.sync_now()
    after = flat(model.parameters())
    train(model, opt, rank, 6, 10)
    return {"after": after, "slow": slow_state(opt), "in_flight": opt.local_sgd.in_flight()}


def _nonfinite(rank: int, sharded: bool = False, **wire) -> dict:
    """A NaN in rank 1's fast weights before step 6 (F=1, k=4): its outer gradient launched at step 7
    is non-finite, so the average applied at step 11 is skipped by both ranks, which restart from
    the same slow weights and drop the collective launched at step 11."""
    import warnings

    model = make_model(rank)
    opt = Lookahead(sgd(model.parameters()), k=K, alpha=ALPHA,
                    local_sgd=LocalSGDOptions(eager_update=True, outer_optimizer=nesterov, sharded=sharded, **wire))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, opt, rank, 0, 6)
        if rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        train(model, opt, rank, 6, 12)  # syncs at steps 7 and 11
        after = flat(model.parameters())
        in_flight = opt.local_sgd.in_flight()
        train(model, opt, rank, 12, STEPS + 4)
    residuals = [v for st in opt.state.values() for key, v in st.items() if key == "lookahead_ef_residual"]
    return {"after": after, "in_flight": in_flight, "skipped": opt.nonfinite_syncs, "slow": slow_state(opt),
            "fast": flat(model.parameters()), "residuals_finite": [bool(r.isfinite().all()) for r in residuals]}


def _body(rank: int, world_size: int) -> dict:
    torch.use_deterministic_algorithms(True)
    return {"runs": _runs(rank), "checkpoint": _checkpoint_in_flight(rank),
            "sync_now": {"flat": _sync_now(rank), "sharded": _sync_now(rank, sharded=True),
                         "sharded_int8": _sync_now(rank, sharded=True, comm_dtype="int8", quant_block_size=8)},
            "nonfinite": {"flat": _nonfinite(rank), "sharded": _nonfinite(rank, sharded=True),
                          "sharded_int8": _nonfinite(rank, sharded=True, comm_dtype="int8", quant_block_size=8),
                          "sharded_sparse": _nonfinite(rank, sharded=True, comm_dtype="int2", topk_fraction=0.1,
                                                       quant_block_size=8)}}


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_body, world_size=2, timeout=200)


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_and_naive_match_simulation_of_two_workers(two_ranks, case):
    _, sim = CASES[case]
    fast, slow = simulate_eager(STEPS, K, **sim)
    for rank, res in enumerate(two_ranks):
        v = res["runs"][case]
        np.testing.assert_allclose(v["fast"], fast[rank], rtol=0, atol=2e-6, err_msg=case)
        want = own_chunks(slow, rank) if case in SHARDED else slow
        assert v["slow"].shape == want.shape, case
        np.testing.assert_allclose(v["slow"], want, rtol=0, atol=2e-6, err_msg=case)
    # The ranks really trained apart since their last sync (the comparison is not vacuous).
    assert np.abs(two_ranks[0]["runs"][case]["fast"] - two_ranks[1]["runs"][case]["fast"]).max() > 1e-3


@pytest.mark.parametrize("case", sorted(set(CASES) - set(SHARDED)) + ["eager_f2_int8"])
def test_global_slow_weights_are_bit_identical_across_ranks(two_ranks, case):
    a, b = (res["runs"][case]["slow"] for res in two_ranks)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("case,flat_case", [("sharded_eager_f1_nesterov", "eager_f1_nesterov"),
                                            ("sharded_naive_f2_nesterov", "naive_f2_nesterov"),
                                            ("sharded_eager_f2_builtin_momentum", "eager_f2_builtin_momentum")])
def test_sharded_eager_equals_flat_eager_bit_for_bit(two_ranks, case, flat_case):
    # The same sums (2 ranks: a reduce-scatter adds the same two values as the all-reduce) and the
    # same elementwise outer step on each chunk: the sharded run is the flat run, bit for bit.
    for rank, res in enumerate(two_ranks):
        sh, fl = res["runs"][case], res["runs"][flat_case]
        assert np.array_equal(sh["fast"], fl["fast"]), case
        assert np.array_equal(sh["slow"], own_chunks(fl["slow"], rank)), case


def test_each_fragment_stays_in_flight_until_its_next_sync(two_ranks):
    # k=4, 14 steps: F=1 launched at step 11, due at its next sync (step 15): 4 counted steps on.
    assert two_ranks[0]["runs"]["eager_f1_nesterov"]["in_flight"] == [(0, 2)]
    # F=2 (syncs every 2 steps): both fragments in flight, fragment 1 launched at step 13.
    assert two_ranks[0]["runs"]["eager_f2_nesterov"]["in_flight"] == [(0, 2), (1, 4)]


def test_eager_and_naive_differ(two_ranks):
    r = two_ranks[0]["runs"]
    assert np.abs(r["eager_f1_nesterov"]["fast"] - r["naive_f1_nesterov"]["fast"]).max() > 1e-4


def test_int8_error_feedback_eager_stays_close_to_fp32(two_ranks):
    for res in two_ranks:
        q, ref = res["runs"]["eager_f2_int8"], res["runs"]["eager_f2_fp32"]
        assert np.abs(q["slow"] - ref["slow"]).max() < 2e-2
        assert np.abs(q["slow"] - ref["slow"]).max() > 0  # it really was quantised


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_checkpoint_with_a_collective_in_flight_resumes_exactly(two_ranks, case):
    for res in two_ranks:
        v = res["checkpoint"][case]
        assert v["in_flight_at_save"], v
        assert v["continued_equal"] and v["fast_equal"] and v["slow_equal"] and v["state_equal"], v


@pytest.mark.parametrize("mode", ["flat", "sharded", "sharded_int8"])
def test_sync_now_applies_what_is_in_flight_and_aligns_the_ranks(two_ranks, mode):
    a, b = (res["sync_now"][mode] for res in two_ranks)
    assert np.array_equal(a["after"], b["after"])
    if mode == "sharded_int8":  # the in-flight int8 averages applied, then a blocking fp32 sync
        flat_ = two_ranks[0]["sync_now"]["sharded"]
        assert 0 < np.abs(a["after"] - flat_["after"]).max() < 2e-2
    elif mode == "flat":
        assert np.array_equal(a["slow"], b["slow"])
    else:  # each rank's chunk of the weights the flat run ends on (the blocking sharded sync
        # averages weights, the flat one progress: equal up to rounding)
        flat_ = two_ranks[0]["sync_now"]["flat"]
        np.testing.assert_allclose(a["after"], flat_["after"], rtol=0, atol=1e-6)
        for rank, res in enumerate(two_ranks):
            np.testing.assert_allclose(res["sync_now"]["sharded"]["slow"], own_chunks(flat_["slow"], rank),
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["flat", "sharded", "sharded_int8", "sharded_sparse"])
def test_nan_on_one_rank_is_skipped_alike_and_the_ranks_recover(two_ranks, mode):
    a, b = (res["nonfinite"][mode] for res in two_ranks)
    assert a["skipped"] == b["skipped"] == 1
    assert np.array_equal(a["after"], b["after"]) and np.isfinite(a["after"]).all()  # both restart from phi
    assert a["in_flight"] == b["in_flight"] == []  # the collective launched with the NaN was dropped
    if mode in ("sharded_int8", "sharded_sparse"):  # the residuals that absorbed the NaN were zeroed
        assert a["residuals_finite"] and all(a["residuals_finite"]) and all(b["residuals_finite"])
    elif mode == "flat":
        assert np.array_equal(a["slow"], b["slow"]) and np.isfinite(a["slow"]).all()
    else:  # each rank's chunk of the flat run's slow weights, and its fast weights: the same skip
        for rank, res in enumerate(two_ranks):
            flat_ = res["nonfinite"]["flat"]
            assert np.array_equal(res["nonfinite"]["sharded"]["slow"], own_chunks(flat_["slow"], rank))
            assert np.array_equal(res["nonfinite"]["sharded"]["fast"], flat_["fast"])
    assert np.isfinite(a["fast"]).all() and np.isfinite(b["fast"]).all()


# -- hierarchical sharded: 4 ranks, 2 groups (the replicas) of 2 -----------------------------------------
HIER_CASES = {  # name: (options, simulation of the 2 replicas)
    "eager_f1_momentum": (dict(eager_update=True, outer_momentum=0.9, nesterov=True),
                          dict(num_fragments=1, rule="eager", lr=ALPHA,
                               outer=lambda ps: torch.optim.SGD(ps, lr=ALPHA, momentum=0.9, nesterov=True))),
    "naive_f2_nesterov": (dict(eager_update="naive", num_fragments=2, outer_optimizer=nesterov),
                          dict(num_fragments=2, rule="naive", outer=nesterov, lr=0.7)),
    "eager_f2_nesterov": (dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov),
                          dict(num_fragments=2, rule="eager", outer=nesterov, lr=0.7)),
}


def _hier_body(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.use_deterministic_algorithms(True)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("inter", "intra"))
    replica = rank // 2  # both ranks of a group train on the replica's data: identical replicas
    out = {}
    quantised = {"eager_f2_int8": dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov,
                                       comm_dtype="int8", quant_block_size=8),
                 "eager_f2_int2": dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov,
                                       comm_dtype="int2", quant_block_size=8),
                 "eager_f2_top": dict(eager_update=True, num_fragments=2, outer_optimizer=nesterov,
                                      comm_dtype="int4", topk_fraction=0.5)}
    for name, opts in [*((n, o) for n, (o, _) in HIER_CASES.items()), *quantised.items()]:
        model = make_model(rank)
        options = LocalSGDOptions.from_mesh(mesh, across="inter", within="intra", sharded=True, **opts)
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=ALPHA, local_sgd=options)
        assert opt.local_sgd.mode == "hier_sharded"
        train(model, opt, replica, 0, STEPS)
        stats = opt.local_sgd.stats
        out[name] = {"fast": flat(model.parameters()), "slow": slow_state(opt),
                     "across": stats.total("payload", label="params", op="all_reduce"),
                     "quantised": stats.total("payload", label="params", op="all_to_all"),
                     "gathered": stats.total("payload", label="params", op="all_gather")}
    # FSDP2 (HSDP) inside each group: each rank runs the eager rule on its own DTensor shard with
    # the same shard of the other group (flat), or keeps half of that shard's slow weights (sharded).
    from torch.distributed.fsdp import fully_shard

    for name, extra in (("fsdp_flat", {}), ("fsdp_sharded", {"sharded": True})):
        model = fully_shard(make_model(replica), mesh=mesh["intra"])  # equal inside a group: the same seed
        opts = {**HIER_CASES["eager_f2_nesterov"][0], **extra}
        opt = Lookahead(sgd(model.parameters()), k=K, alpha=ALPHA,
                        local_sgd=LocalSGDOptions.from_mesh(mesh, across="inter", **opts))
        train(model, opt, replica, 0, STEPS)
        out[name] = {"fast": torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).numpy()}
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_hier_body, world_size=4, timeout=200)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(HIER_CASES))
def test_hierarchical_sharded_eager_matches_simulation_of_two_replicas(four_ranks, case):
    _, sim = HIER_CASES[case]
    fast, slow = simulate_eager(STEPS, K, **sim)
    params = sum(p.numel() for p in make_model(0).parameters())
    for rank, res in enumerate(four_ranks):
        v = res[case]
        np.testing.assert_allclose(v["fast"], fast[rank // 2], rtol=0, atol=2e-6, err_msg=case)
        np.testing.assert_allclose(v["slow"], own_chunks(slow, rank % 2), rtol=0, atol=2e-6, err_msg=case)
        # each local rank carries its chunk across the groups: about half the parameters per sync
        syncs = (STEPS // (K // sim["num_fragments"]))
        assert v["across"] <= 4 * (params // 2 + 8) * syncs, (case, v["across"])


@pytest.mark.parametrize("wire,tol", [("int8", 2e-2), ("int2", 0.5)])
def test_hierarchical_sharded_eager_compressed(four_ranks, wire, tol):
    # What `lookahead-dist plan` prints for R > 1 ranks per node: eager, hierarchical-sharded, a
    # quantised wire. The replicas inside a group stay identical, the two groups' owners of a chunk
    # hold the same slow weights, and the run stays near its fp32 twin.
    res = [r[f"eager_f2_{wire}"] for r in four_ranks]
    ref = [r["eager_f2_nesterov"] for r in four_ranks]
    assert np.array_equal(res[0]["fast"], res[1]["fast"]) and np.array_equal(res[2]["fast"], res[3]["fast"])
    assert np.array_equal(res[0]["slow"], res[2]["slow"]) and np.array_equal(res[1]["slow"], res[3]["slow"])
    for got, want in zip(res, ref):
        assert got["quantised"] > 0 and got["across"] == 0  # the quantised reduce carried it
        assert 0 < np.abs(got["slow"] - want["slow"]).max() < tol


def test_hierarchical_sharded_eager_sparse(four_ranks):
    # Top-k across the groups: each local rank's chunk of its replica's progress, all-gathered. The
    # replicas inside a group stay identical, the owners of a chunk agree, near the fp32 twin, and
    # more goes through the all-gathers (the sparse payloads besides the group's gathers) than in
    # the fp32 run, with no all-reduce and no all-to-all.
    res = [r["eager_f2_top"] for r in four_ranks]
    ref = [r["eager_f2_nesterov"] for r in four_ranks]
    assert np.array_equal(res[0]["fast"], res[1]["fast"]) and np.array_equal(res[2]["fast"], res[3]["fast"])
    assert np.array_equal(res[0]["slow"], res[2]["slow"]) and np.array_equal(res[1]["slow"], res[3]["slow"])
    for got, want in zip(res, ref):
        assert got["across"] == got["quantised"] == 0 and got["gathered"] > want["gathered"]
        assert 0 < np.abs(got["slow"] - want["slow"]).max() < 5e-2, np.abs(got["slow"] - want["slow"]).max()


def test_hierarchical_sharded_eager_int8_is_closer_to_fp32_than_int2(four_ranks):
    for r in four_ranks:
        err = {w: np.abs(r[f"eager_f2_{w}"]["slow"] - r["eager_f2_nesterov"]["slow"]).mean() for w in ("int8", "int2")}
        assert err["int8"] < err["int2"] / 4, err


@pytest.mark.parametrize("case", ["fsdp_flat", "fsdp_sharded"])
def test_fsdp2_inside_the_groups_eager_matches_simulation(four_ranks, case):
    fast, _ = simulate_eager(STEPS, K, **HIER_CASES["eager_f2_nesterov"][1])
    for rank, res in enumerate(four_ranks):
        np.testing.assert_allclose(res[case]["fast"], fast[rank // 2], rtol=0, atol=2e-6, err_msg=case)


def test_sharded_eager_with_a_bf16_wire_is_the_flat_bf16_run(two_ranks):
    # Eager + sharded reduce-scatters progress, so comm_dtype=bf16 applies as on the flat wire: the
    # same bf16 sums of the same two values, bit for bit, and half the fp32 bytes for the scatter.
    for rank, res in enumerate(two_ranks):
        sh, fl, fp32 = (res["runs"][k] for k in ("sharded_eager_f2_bf16", "eager_f2_bf16", "eager_f2_fp32"))
        assert np.array_equal(sh["fast"], fl["fast"])
        assert np.array_equal(sh["slow"], own_chunks(fl["slow"], rank))
        assert np.abs(fl["slow"] - fp32["slow"]).max() > 0  # it really went through bf16
        assert fl["sent"] * 2 == fp32["sent"]


def test_sharded_quantised_eager_bytes_are_the_formula(two_ranks):
    # int8, F=2, k=4, 14 steps: 7 launches (fragment 1 at counts 2, fragment 0 at counts 4: 4 + 3).
    # Each puts N segments of codes + fp32 scales on the all-to-all (segment: the larger rank's
    # chunks of the fragment, padded to whole blocks of 8); the all-gathers of the new slow chunks
    # are those of the fp32 run, and nothing is reduce-scattered in fp32.
    ops = two_ranks[0]["runs"]["sharded_eager_f2_int8"]["ops"]
    fp32 = two_ranks[0]["runs"]["sharded_eager_f2_builtin_momentum"]["ops"]
    sizes = [p.numel() for p in make_model(0).parameters()]
    frags = split_midpoint([n * 4 for n in sizes], 2)

    def payload(f: int) -> int:
        seg = _segments([torch.zeros(sizes[j]) for j in frags[f]], 2, 8).numel() // 2
        return 2 * (seg + 4 * seg // 8)

    assert ops[("all_to_all", "calls")] == 7
    assert ops[("all_to_all", "payload")] == 4 * payload(1) + 3 * payload(0)
    assert ops[("reduce_scatter", "calls")] == ops[("all_reduce", "calls")] == 0
    assert ops[("all_gather", "payload")] == fp32[("all_gather", "payload")] > 0
    assert ops[("all_to_all", "payload")] < fp32[("reduce_scatter", "payload")] / 2


def test_sharded_sparse_eager_bytes_are_the_formula(two_ranks):
    # top-10 % int4, F=2, k=4, 14 steps: 7 launches, each one all-to-all of N payloads of one
    # segment (sparse_nbytes of the segment: scales + indices + codes, padded to a scale block);
    # N times less than the all-gather of the flat sparse wire would put on it.
    ops = two_ranks[0]["runs"]["sharded_eager_f2_top10_int4"]["ops"]
    sizes = [p.numel() for p in make_model(0).parameters()]
    frags = split_midpoint([n * 4 for n in sizes], 2)

    def payload(f: int) -> int:
        seg = _segments([torch.zeros(sizes[j]) for j in frags[f]], 2, 8).numel() // 2
        return 2 * sparse_nbytes(seg, fraction=0.1, bits=4)

    assert ops[("all_to_all", "calls")] == 7
    assert ops[("all_to_all", "payload")] == 4 * payload(1) + 3 * payload(0)
    assert ops[("reduce_scatter", "calls")] == ops[("all_reduce", "calls")] == 0
