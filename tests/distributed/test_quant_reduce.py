"""The quantised all-reduce on real gloo ranks (2, and 3 for uneven chunks), against a reference.

The reference (computed here, in one process, with the per-block numpy quantiser of
tests/unit/test_quant.py) is the documented rule: quantise each rank's zero-padded buffer,
dequantise, add in fp32 in rank order, divide by N, quantise and dequantise again. One spawn per
group size runs every scenario; the test functions assert on its results.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed._spawn import run_ranks
from tests.unit.test_quant import ref_roundtrip

pytestmark = pytest.mark.distributed

# (bits, block_size, numel): uneven lengths and small blocks, and the default block with an exact
# multiple of N * 512 elements (no padding) for the byte count.
CASES = [(8, 8, 1000), (4, 8, 1000), (4, 512, 6 * 512 * 2), (8, 512, 777)]
FB_STEPS, FB_NUMEL, FB_BLOCK = 40, 200, 8
FUSED_BLOCK = 8


def data(rank: int, case: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case + rank)
    return torch.randn(numel, generator=g) * torch.logspace(-3, 1, numel)


def fb_data(rank: int, t: int) -> torch.Tensor:
    # A fixed part per rank plus small noise: quantising without feedback errs the same way each step.
    base = torch.randn(FB_NUMEL, generator=torch.Generator().manual_seed(rank))
    return base + 1e-3 * torch.randn(FB_NUMEL, generator=torch.Generator().manual_seed(7919 * t + rank))


def _body(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from lookahead_dist._comm import CommStats
    from lookahead_dist._quant import (
        quantize_with_feedback,
        quantized_all_reduce,
        quantized_all_reduce_async,
        reduce_chunk_numel,
    )

    res: dict = {"reduce": [], "stats": []}
    # 1. the reduce for every case, bytes counted under one label per case
    stats = CommStats()
    for i, (bits, block, numel) in enumerate(CASES):
        x = data(rank, i, numel)
        x0 = x.clone()
        out = quantized_all_reduce(x, None, bits=bits, block_size=block, stats=stats, label=f"case{i}")
        assert torch.equal(x, x0)  # the input is not modified
        res["reduce"].append(out.numpy().copy())
        res["stats"].append({(op, kind): stats.total(kind, label=f"case{i}", op=op)
                             for op in ("all_to_all", "all_gather") for kind in ("payload", "wire", "calls")})
    # 2. sum instead of mean, written in place
    x = data(rank, 0, 1000)
    out = quantized_all_reduce(x, None, bits=8, block_size=8, average=False, out=x)
    res["sum_in_place"] = (out is x, x.numpy().copy())
    st = CommStats()
    res["empty"] = (quantized_all_reduce(torch.zeros(0), None, bits=8, stats=st).numel(), st.total("calls"))
    # 3. a NaN on the last rank reaches every rank, in its block only
    x = data(rank, 0, 100)
    if rank == world - 1:
        x[5] = float("nan")
    res["nan"] = quantized_all_reduce(x, None, bits=4, block_size=8).numpy().copy()
    # 4. error feedback over FB_STEPS reduces: running sums of outputs vs of the true means
    chunk = reduce_chunk_numel(FB_NUMEL, world, block_size=FB_BLOCK)
    e, o = torch.zeros(FB_NUMEL), torch.zeros(chunk)
    sum_true = torch.zeros(FB_NUMEL, dtype=torch.float64)
    sum_fb, sum_plain = sum_true.clone(), sum_true.clone()
    drift_fb, drift_plain = [], []
    for t in range(FB_STEPS):
        x = fb_data(rank, t)
        sum_true += sum(fb_data(r, t).double() for r in range(world)) / world
        sum_fb += quantized_all_reduce(x, None, bits=4, block_size=FB_BLOCK, residual=e, owner_residual=o).double()
        sum_plain += quantized_all_reduce(x, None, bits=4, block_size=FB_BLOCK).double()
        drift_fb.append((sum_fb - sum_true).abs().max().item())
        drift_plain.append((sum_plain - sum_true).abs().max().item())
    res["feedback"] = (drift_fb, drift_plain)
    # 5. async on a dedicated group; rank 0 launches first and checks the work is still pending
    group = dist.new_group(backend="gloo")
    try:
        quantized_all_reduce_async(x, None, bits=8, block_size=8)
    except ValueError as exc:
        res["default_group_error"] = str(exc)
    bits, block, numel = CASES[1]
    xa, xb = data(rank, 1, numel), data(rank, 2, numel)
    want_a = quantized_all_reduce(xa, None, bits=bits, block_size=block)
    want_b = quantized_all_reduce(xb, None, bits=bits, block_size=block)
    e = torch.zeros(numel)
    stats = CommStats()
    if rank == 0:
        ha = quantized_all_reduce_async(xa, group, bits=bits, block_size=block, residual=e, stats=stats, label="a")
        res["pending_after_launch"] = not ha.is_completed()
        # the residual is updated at launch, before the transfer
        e_ref = torch.zeros(numel)
        quantize_with_feedback(xa, e_ref, bits=bits, block_size=block)
        res["residual_at_launch"] = torch.equal(e, e_ref)
        res["stats_at_launch"] = stats.total("calls")
        xa.fill_(123.0)  # the input is free once launch returns
        dist.barrier()  # releases the other rank; the default group works while ours is busy
    else:
        dist.barrier()
        ha = quantized_all_reduce_async(xa, group, bits=bits, block_size=block, residual=e)
    hb = quantized_all_reduce_async(xb, group, bits=bits, block_size=block)  # two in flight
    t = torch.ones(3)
    dist.all_reduce(t)  # a collective on the default group while both are in flight
    got_b, got_a = hb.wait(), ha.wait()
    got_sync = quantized_all_reduce(data(rank, 1, numel), group, bits=bits, block_size=block)  # via the worker
    res["async"] = (torch.equal(got_a, want_a), torch.equal(got_b, want_b), torch.equal(got_sync, want_a),
                    ha.wait() is got_a, t.tolist())
    # 6. the fused kernels (Note [Fused quantisation kernels]) on the worker thread: outputs and both
    # residuals equal the eager ones over 3 reduces with error feedback, a NaN on the last rank in one
    res["fused"] = {}
    for bits in (8,) if world == 2 else (4, 2):  # each kernel compiles per rank count: one share each
        numel = world * 4 * FUSED_BLOCK  # whole blocks: the fused path (a padded buffer stays eager)
        chunk = reduce_chunk_numel(numel, world, block_size=FUSED_BLOCK)
        state = {fused: (torch.zeros(numel), torch.zeros(chunk)) for fused in (False, True)}
        outs = {False: [], True: []}
        for t in range(3):
            x = data(rank, 10 + t, numel)
            if t == 1 and rank == world - 1:
                x[3] = float("nan")
            for fused in (False, True):
                e, o = state[fused]
                outs[fused].append(quantized_all_reduce_async(
                    x.clone(), group, bits=bits, block_size=FUSED_BLOCK, residual=e, owner_residual=o,
                    fused=fused).wait().clone())
            if t == 1:  # as the sync does after a non-finite reduce: start the residuals afresh
                for e, o in state.values():
                    e.zero_()
                    o.zero_()
        res["fused"][bits] = (all(same(a, b) for a, b in zip(outs[False], outs[True])),
                              all(same(a, b) for a, b in zip(state[False], state[True])),
                              bool(outs[True][1].isnan().any()), bool(outs[True][1].isfinite().any()))
    res["fused_lookahead"] = _fused_lookahead(world)
    res["scatter"] = _scatter(rank, world, group)
    dist.destroy_process_group(group)
    return res


# The quantised reduce-scatter (sharded eager sync): (bits, block, numel, average), two reduces each
# with error feedback carried over; the padded cases leave the fused kernel's path.
SCATTER_CASES = [(8, 8, 1000, True), (2, 8, 1000, False), (4, 8, 777, True)]


def scatter_data(rank: int, case: int, t: int, numel: int) -> torch.Tensor:
    return data(rank, 100 + 10 * case + t, numel)


def _scatter(rank: int, world: int, group) -> dict:
    from lookahead_dist._comm import CommStats
    from lookahead_dist._quant import quantized_reduce_scatter_async, reduce_chunk_numel

    out: dict = {"cases": [], "fused": {}}
    for i, (bits, block, numel, average) in enumerate(SCATTER_CASES):
        chunk = reduce_chunk_numel(numel, world, block_size=block)
        e, stats, got = torch.zeros(numel), CommStats(), []
        for t in range(2):
            x = scatter_data(rank, i, t, numel)
            o = torch.full((chunk,), 7.0)
            work = quantized_reduce_scatter_async(x, group, o, bits=bits, block_size=block, average=average,
                                                  residual=e, stats=stats, label="rs")
            got.append(work.wait().numpy().copy())
            assert work.wait() is o
        out["cases"].append({"got": got, "residual": e.numpy().copy(),
                             "stats": {(op, k): stats.total(k, label="rs", op=op)
                                       for op in ("all_to_all", "all_gather") for k in ("payload", "calls")}})
    for bits in (8,) if world == 2 else (4, 2):  # the sender kernels compiled above
        numel = world * 4 * FUSED_BLOCK
        chunk = reduce_chunk_numel(numel, world, block_size=FUSED_BLOCK)
        state = {fused: torch.zeros(numel) for fused in (False, True)}
        outs = {False: [], True: []}
        for t in range(3):
            x = data(rank, 40 + t, numel)
            for fused in (False, True):
                o = torch.empty(chunk)
                outs[fused].append(quantized_reduce_scatter_async(
                    x, group, o, bits=bits, block_size=FUSED_BLOCK, residual=state[fused], fused=fused).wait())
        out["fused"][bits] = (all(same(a, b) for a, b in zip(outs[False], outs[True])),
                              same(state[False], state[True]))
    try:
        quantized_reduce_scatter_async(torch.zeros(100), group, torch.zeros(3), bits=8, block_size=8)
    except ValueError as exc:
        out["bad_out"] = str(exc)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _fused_lookahead(world: int) -> tuple[bool, bool, list[tuple]]:
    """Lookahead(SGD) with int4 streaming (F=2, tau=1) and fused_kernels=True against the same run
    with the eager kernels: the option reaches the reduce, and the weights are bit for bit equal."""
    import torch.distributed as dist

    from lookahead_dist import LocalSGDOptions, Lookahead, _fused

    _fused._COMPILED.clear()
    calls = {"send": 0, "owner": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    _fused.send, _fused.owner = counted("send", _fused.send), counted("owner", _fused.owner)
    finals, init = [], None
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
        init = [p.detach().clone() for p in model.parameters()]
        opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, alpha=0.5,
                        local_sgd=LocalSGDOptions(comm_dtype="int4", quant_block_size=FUSED_BLOCK, num_fragments=2,
                                                  fragment_sync_delay=1, fused_kernels=fused))
        assert calls == ({"send": 0, "owner": 0} if not fused else {"send": 1, "owner": 1})  # the warm-up
        for t in range(12):
            g = torch.Generator().manual_seed(100 * t + dist.get_rank())
            loss = model(torch.randn(8, 16, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt.sync_now()  # nothing in flight when the group goes
        finals.append([p.detach().clone() for p in model.parameters()])
    return (all(torch.equal(a, b) for a, b in zip(*finals)),
            all(not torch.equal(a, b) for a, b in zip(finals[1], init)),
            sorted(_fused._COMPILED), dict(calls))


def reference(world: int, bits: int, block: int, xs: list[np.ndarray], average: bool = True) -> np.ndarray:
    numel = xs[0].size
    chunk = -(-numel // (world * block)) * block
    parts = []
    for x in xs:
        padded = np.zeros(world * chunk, dtype=np.float32)
        padded[:numel] = x
        parts.append(ref_roundtrip(padded, bits, block)[0])
    acc = parts[0].copy()
    for p in parts[1:]:
        acc += p
    if average:
        acc /= np.float32(world)
    return ref_roundtrip(acc, bits, block)[0][:numel]


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request):
    world = request.param
    return world, run_ranks(_body, world_size=world, timeout=180)


def test_reduce_equals_the_single_process_reference(ranks):
    world, results = ranks
    for i, (bits, block, numel) in enumerate(CASES):
        want = reference(world, bits, block, [data(r, i, numel).numpy() for r in range(world)])
        for res in results:  # every rank ends with the same values
            np.testing.assert_array_equal(res["reduce"][i], want, err_msg=f"case {CASES[i]}")
        # and the quantisation matters: the exact fp32 mean differs
        exact = np.mean([data(r, i, numel).numpy() for r in range(world)], axis=0)
        assert not np.array_equal(want, exact)


def test_bytes_counted_are_bits_over_32_of_fp32_plus_scales(ranks):
    world, results = ranks
    for i, (bits, block, numel) in enumerate(CASES):
        chunk = -(-numel // (world * block)) * block
        seg = chunk * bits // 8 + 4 * chunk // block  # codes + fp32 scales of one rank's chunk
        st = results[0]["stats"][i]
        assert st[("all_to_all", "calls")] == st[("all_gather", "calls")] == 1
        assert st[("all_to_all", "payload")] == st[("all_gather", "payload")] == world * seg
        wire = st[("all_to_all", "wire")] + st[("all_gather", "wire")]
        assert wire == pytest.approx(2 * (world - 1) / world * world * seg, abs=2)
        if block == 512 and numel % (world * block) == 0:  # no padding: exactly P bits/8 + scales
            fp32_allreduce_wire = 2 * (world - 1) / world * 4 * numel
            overhead = wire / (fp32_allreduce_wire * bits / 32) - 1
            assert world * seg == numel * bits // 8 + 4 * numel // block
            assert overhead == pytest.approx(32 / (bits * block), abs=1e-6) and overhead <= 0.02


def test_sum_variant_in_place(ranks):
    world, results = ranks
    want = reference(world, 8, 8, [data(r, 0, 1000).numpy() for r in range(world)], average=False)
    for res in results:
        is_x, got = res["sum_in_place"]
        assert is_x
        np.testing.assert_array_equal(got, want)


def test_empty_buffer_sends_nothing(ranks):
    _, results = ranks
    assert all(res["empty"] == (0, 0) for res in results)


def test_nan_on_one_rank_reaches_every_rank_in_its_block(ranks):
    _, results = ranks
    for res in results:
        got = res["nan"]
        assert np.isnan(got[:8]).all()
        assert np.isfinite(got[8:]).all()


def test_error_feedback_tracks_the_running_mean(ranks):
    world, results = ranks
    drift_fb, drift_plain = results[0]["feedback"]
    amax = max(fb_data(r, 0).abs().max().item() for r in range(world))
    # stage-1 residuals (mean over ranks) and the owner's residual: each within half a step, amax / 14
    assert max(drift_fb) <= 2 * amax / 14 * 1.05
    assert drift_plain[-1] > 5 * max(drift_fb)
    assert drift_plain[-1] > 3 * drift_plain[FB_STEPS // 10 - 1]  # grows with the number of steps


def test_fused_kernels_equal_the_eager_reduce(ranks):
    world, results = ranks
    for res in results:
        for bits, (outputs, residuals, nan_kept, finite_kept) in res["fused"].items():
            assert outputs and residuals, f"int{bits}: fused and eager differ"
            assert nan_kept and finite_kept, f"int{bits}: the NaN must stay in its block only"


def test_fused_kernels_option_reaches_the_sync(ranks):
    world, results = ranks
    for res in results:
        equal, trained, compiled, calls = res["fused_lookahead"]
        assert equal and trained
        assert ("send", 4, True) in compiled and ("owner", 4, world, True, True) in compiled
        # compiled at construction (one call each), then one call per fragment sync: 12 steps,
        # k=4, F=2 -> 6 launches, and sync_now() launches the fragment not yet in flight
        assert calls["send"] == calls["owner"] >= 1 + 6, calls


def test_async_on_a_dedicated_group(ranks):
    world, results = ranks
    assert "new_group" in results[0]["default_group_error"]
    assert results[0]["pending_after_launch"]
    assert results[0]["residual_at_launch"]
    assert results[0]["stats_at_launch"] == 2
    for res in results:
        assert res["async"] == (True, True, True, True, [world] * 3)


def test_quantized_reduce_scatter_equals_compress_decompress_and_sum(ranks):
    # Each rank's contribution (plus its residual) compressed and decompressed by the documented
    # format, summed in fp32 in rank order (/N with average): rank r holds chunk r, exactly; the
    # residual is what its send left out, carried into the second reduce.
    world, results = ranks
    for i, (bits, block, numel, average) in enumerate(SCATTER_CASES):
        chunk = -(-numel // (world * block)) * block
        e = [np.zeros(world * chunk, dtype=np.float32) for _ in range(world)]
        for t in range(2):
            sent = []
            for r in range(world):
                y = np.zeros(world * chunk, dtype=np.float32)
                y[:numel] = scatter_data(r, i, t, numel).numpy()
                y += e[r]
                deq = ref_roundtrip(y, bits, block)[0]
                e[r] = y - deq
                e[r][numel:] = 0
                sent.append(deq)
            acc = sent[0].copy()
            for v in sent[1:]:
                acc += v
            if average:
                acc /= np.float32(world)
            for r, res in enumerate(results):
                got = res["scatter"]["cases"][i]["got"][t]
                np.testing.assert_array_equal(got, acc[r * chunk:(r + 1) * chunk], err_msg=f"{SCATTER_CASES[i]} t={t}")
        for r, res in enumerate(results):
            np.testing.assert_array_equal(res["scatter"]["cases"][i]["residual"], e[r][:numel])
        # only the all-to-all moves bytes: N segments of codes + fp32 scales
        st = results[0]["scatter"]["cases"][i]["stats"]
        seg = chunk * bits // 8 + 4 * chunk // block
        assert st[("all_to_all", "payload")] == 2 * world * seg and st[("all_to_all", "calls")] == 2
        assert st[("all_gather", "calls")] == 0


def test_quantized_reduce_scatter_fused_equals_eager(ranks):
    _, results = ranks
    for res in results:
        for bits, (outputs, residual) in res["scatter"]["fused"].items():
            assert outputs and residual, f"int{bits}: fused and eager reduce-scatter differ"
        assert "this rank's chunk" in res["scatter"]["bad_out"]


def _many_pooled_buckets(rank: int, world: int) -> np.ndarray:
    """12 tensors of ~300K elements, one int8 bucket each (bucket_cap_mb=1.5): every sync gives
    more large temporaries back to the buffer pool than it keeps (MAX_FREE), in no size order."""
    from lookahead_dist import LocalSGDOptions, Lookahead

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(300_000 + 1000 * i)) for i in range(12)]
    opt = Lookahead(torch.optim.SGD(ps, lr=0.01), k=2,
                    local_sgd=LocalSGDOptions(comm_dtype="int8", bucket_cap_mb=1.5))
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):  # syncs at steps 2, 4 and 6
        for p in ps:
            p.grad = 0.01 * torch.randn(p.shape, generator=g)
        opt.step()
    return torch.cat([p.detach() for p in ps]).numpy()


def test_a_sync_that_gives_back_more_buffers_than_the_pool_keeps():
    # Regression: BufferPool.give dropped the smallest free buffer with list.remove, which compared
    # tensors with == and raised at the first sync of a model with many large buckets.
    a, b = run_ranks(_many_pooled_buckets, world_size=2, timeout=120)
    assert np.array_equal(a, b) and np.isfinite(a).all()  # the last step synced: identical replicas
