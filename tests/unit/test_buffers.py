"""The sync's buffer pool (Note [Buffer reuse] in _buffers.py), and that a sync reuses its buffers."""

from __future__ import annotations

import gc

import torch

from lookahead_dist import LocalSGDOptions, Lookahead
from lookahead_dist._buffers import MAX_FREE, MIN_BYTES, BufferPool

BIG = MIN_BYTES // 2  # fp32 elements: twice the smallest pooled buffer


def test_a_given_back_buffer_is_handed_out_again():
    pool = BufferPool()
    a = pool.take(BIG, torch.float32, "cpu")
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.take(BIG - 10, torch.float32, "cpu")
    assert b.data_ptr() == ptr and b.numel() == BIG - 10
    c = pool.take(BIG, torch.float32, "cpu")  # b is out: a new buffer
    assert c.data_ptr() != ptr


def test_a_buffer_is_never_handed_out_twice():
    pool = BufferPool()
    a = pool.take(BIG, torch.float32, "cpu")
    pool.give(a)
    pool.give(a)  # twice: the second is ignored
    b, c = pool.take(BIG, torch.float32, "cpu"), pool.take(BIG, torch.float32, "cpu")
    assert b.data_ptr() != c.data_ptr()


def test_foreign_and_small_tensors_are_not_pooled():
    pool = BufferPool()
    pool.give(torch.empty(BIG), None)
    assert pool.free_bytes() == 0
    s = pool.take(16, torch.float32, "cpu")
    pool.give(s)
    assert pool.free_bytes() == 0


def test_a_request_wastes_at_most_half_of_a_buffer():
    pool = BufferPool()
    a = pool.take(4 * BIG, torch.float32, "cpu")
    pool.give(a)
    b = pool.take(BIG, torch.float32, "cpu")  # 4x smaller: not that buffer
    assert b.data_ptr() != a.data_ptr()
    assert pool.free_bytes() == 4 * BIG * 4


def test_dtypes_do_not_mix_and_the_free_list_is_bounded():
    pool = BufferPool()
    a = pool.take(BIG, torch.float32, "cpu")
    pool.give(a)
    assert pool.take(4 * BIG, torch.uint8, "cpu").data_ptr() != a.data_ptr()
    bufs = [pool.take(BIG + i, torch.float32, "cpu") for i in range(MAX_FREE + 4)]
    pool.give(*bufs)
    assert pool.free_bytes() <= MAX_FREE * (BIG + MAX_FREE + 4) * 4
    pool.clear()
    assert pool.free_bytes() == 0


def test_the_smallest_is_dropped_wherever_it_sits_in_the_free_list():
    # Given back largest first, the smallest is last: dropping it must not compare tensors with ==
    # (elementwise, an error for two sizes). Seen on a 6-layer model's streaming int8 run, whose
    # buckets give back more than MAX_FREE buffers of several sizes.
    pool = BufferPool()
    sizes = [BIG * (2 + i) for i in reversed(range(MAX_FREE + 3))]
    bufs = [pool.take(n, torch.float32, "cpu") for n in sizes]
    pool.give(*bufs)
    kept = sorted(b.numel() for b in pool._free[(torch.float32, torch.device("cpu"))])
    assert kept == sorted(sizes)[3:]  # the MAX_FREE largest
    same = [pool.take(BIG, torch.float32, "cpu") for _ in range(MAX_FREE + 2)]  # equal sizes too
    pool.give(*reversed(same))
    assert len(pool._free[(torch.float32, torch.device("cpu"))]) == MAX_FREE


def test_a_buffer_never_given_back_is_freed_as_usual():
    pool = BufferPool()
    a = pool.take(BIG, torch.float32, "cpu")
    ref = __import__("weakref").ref(a._base)
    del a
    gc.collect()
    assert ref() is None
    assert pool.free_bytes() == 0


def test_a_dequantized_tensor_handed_back_to_quantize_stays_the_callers():
    """dequantize() returns a pooled buffer the caller owns: quantising it must not give it back."""
    from lookahead_dist._quant import dequantize, quantize

    x = torch.randn(2 * BIG)
    y = dequantize(quantize(x, bits=8))
    kept = y.clone()
    quantize(y, bits=8)  # y is a whole number of blocks in fp32: used in place, not padded
    for _ in range(3):  # later round trips take buffers from the pool
        dequantize(quantize(torch.randn(2 * BIG), bits=8)).fill_(7.0)
    assert torch.equal(y, kept)


def test_a_local_sgd_sync_reuses_its_buffers(monkeypatch):
    """One rank (world of 1, gloo): after the first sync, every later int8 sync takes its stage,
    quantised stage and segments from the pool, so the pool stops growing."""
    import torch.distributed as dist

    from lookahead_dist import _buffers

    pool = BufferPool()
    for mod in ("lookahead_dist._buffers", "lookahead_dist._quant", "lookahead_dist.sync.local_sgd",
                "lookahead_dist.sync._wire", "lookahead_dist._sparse"):
        monkeypatch.setattr(f"{mod}.POOL", pool)
    assert _buffers.POOL is pool
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.randn(BIG)) for _ in range(2)]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2, alpha=0.5,
                        local_sgd=LocalSGDOptions(comm_dtype="int8", fragment_sync_delay=1))
        held = []
        for _ in range(10):
            opt.step()
            held.append(pool.free_bytes())
        # after each apply step (calls 3, 5, ..., 9; k=2, tau=1) every buffer is back: the same
        # bytes, cycle after cycle (after a launch step the reduce's worker may still hold some)
        assert held[2] > 0
        assert held[2::2] == [held[2]] * 4, held
    finally:
        dist.destroy_process_group()
