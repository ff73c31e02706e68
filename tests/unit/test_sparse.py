"""Sparse outer gradients (single process): top-k per 256, values at 2/4/8 bits, payload layout.

The reference (:func:`ref_sparse`) follows the format of ``lookahead_dist._sparse``'s docstring in
numpy float32, one index block and one scale block at a time. The exchange is tested on real gloo
ranks in tests/distributed/test_sparse_reduce.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lookahead_dist import _sparse
from lookahead_dist._sparse import (
    DEFAULT_SCALE_BLOCK,
    INDEX_BLOCK,
    bits_per_parameter,
    decode,
    encode,
    sparse_format,
    sparse_nbytes,
    topk_per_block,
)
from tests.unit.test_quant import QMAX, mixed_magnitudes


def ref_sparse(x: np.ndarray, fraction: float, bits: int, scale_block: int = DEFAULT_SCALE_BLOCK):
    """(dense decoded values, selected mask, per-element scale) of the documented format."""
    x = np.asarray(x, dtype=np.float32)
    n = x.size
    k = min(256, max(1, round(fraction * 256)))
    padded = np.zeros(-(-n // scale_block) * scale_block, dtype=np.float32)
    padded[:n] = x
    out = np.zeros_like(padded)
    mask = np.zeros(padded.size, dtype=bool)
    scales = np.zeros_like(padded)
    qmax = np.float32(QMAX[bits])
    for g in range(0, padded.size, scale_block):
        sel = []
        for b in range(g, g + scale_block, INDEX_BLOCK):
            order = np.argsort(-np.abs(padded[b: b + INDEX_BLOCK]), kind="stable")[:k]
            sel.extend(b + np.sort(order))
        sel = np.array(sel)
        mask[sel] = True
        vals = padded[sel]
        s = np.max(np.abs(vals)) / qmax
        q = np.clip(np.round(vals / s), -qmax, qmax) if s > 0 else np.zeros_like(vals)
        out[sel] = q * s
        scales[g: g + scale_block] = s
    return out[:n], mask[:n], scales[:n]


def distinct(n: int, seed: int) -> torch.Tensor:
    # distinct magnitudes (no ties for top-k to choose between)
    x = mixed_magnitudes(n, seed)
    return x + torch.sign(x) * torch.arange(n) * 1e-7 * x.abs().max()


def test_topk_per_block_and_the_byte_formula():
    assert [topk_per_block(f) for f in (0.02, 0.01, 0.03, 1e-6, 1.0)] == [5, 3, 8, 1, 256]
    for bits in (2, 4, 8):
        for n in (1, 2048, 5000, 2 * 2048):
            f = sparse_format(n, fraction=0.02, bits=bits)
            padded = -(-n // 2048) * 2048
            assert f.nbytes == sparse_nbytes(n, fraction=0.02, bits=bits)
            # values + indices + scales
            assert f.nbytes == padded // 256 * 5 * bits // 8 + padded // 256 * 5 + 4 * padded // 2048
            x = distinct(n, seed=n)
            assert encode(x, f).numel() == f.nbytes  # the actual encoded size
    # the target: <= 0.25 bits per parameter per sync at topk_fraction=0.02, 2-bit values
    assert bits_per_parameter(0.02, 2) == 5 * 10 / 256 + 32 / 2048 == 0.2109375
    assert bits_per_parameter(0.02, 4) == 0.25 and bits_per_parameter(0.02, 8) == 0.328125
    n = 64 * 2048  # no padding: the payload is exactly that many bits per parameter
    assert 8 * sparse_nbytes(n, fraction=0.02, bits=2) / n == bits_per_parameter(0.02, 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n,fraction", [(1, 0.02), (300, 0.02), (5000, 0.02), (4096, 0.1), (2500, 1.0)])
def test_encode_decode_equals_the_reference(bits, n, fraction):
    x = distinct(n, seed=n + bits)
    fmt = sparse_format(n, fraction=fraction, bits=bits)
    got = decode(encode(x, fmt), fmt)
    want, mask, scale = ref_sparse(x.numpy(), fraction, bits)
    assert got.shape == (n,) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    # error bound on what was sent: half a grid step; nothing outside the selection
    err = np.abs(x.numpy() - got.numpy())
    assert np.all(err[mask] <= scale[mask] / 2 * (1 + 1e-6) + 1e-45)
    assert np.all(got.numpy()[~mask] == 0)


def test_top_k_selection_and_payload_layout():
    # One scale block (2048 elements, 8 index blocks); block b has its largest entries at known places.
    x = torch.zeros(2048)
    for b in range(8):
        x[256 * b + torch.tensor([3, 250, 17, 99, 128])] = torch.tensor([1.0, -2.0, 3.0, -4.0, 8.0]) * (b + 1)
        x[256 * b + 5] = 0.01 * (b + 1)  # the 6th largest: not sent
    fmt = sparse_format(2048, fraction=0.02, bits=2)
    payload = encode(x, fmt)
    scales = payload[:4].clone().view(torch.float32)
    assert scales.tolist() == [64.0]  # max over the selected entries (8 * 8) / qmax (1)
    idx = payload[4: 4 + 40].view(8, 5)
    assert idx.tolist() == [[3, 17, 99, 128, 250]] * 8  # sorted positions within each index block
    codes = _sparse._quant._unpack(payload[44:], 2).view(8, 5)  # ternary codes in index order
    # block 7 sends [8, 24, -32, 64, -16] / 64 on the ternary grid: only 64 survives (-0.5 ties to 0)
    assert codes[7].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert payload.numel() == 4 + 40 + 10
    got = decode(payload, fmt)
    assert torch.count_nonzero(got) == int((codes != 0).sum())


def test_error_feedback_keeps_everything_not_sent():
    # x_t = c + noise: the running sum of what was sent tracks the running sum of x within the
    # residual, which stays bounded (entries wait until they are large enough to be selected).
    # (fraction 0.1: the residual settles after ~1 / fraction steps, at a few times |c| / fraction)
    n, steps = 4096, 100
    g = torch.Generator().manual_seed(0)
    c = torch.randn(n, generator=g)
    fmt = sparse_format(n, fraction=0.1, bits=2)
    e = torch.zeros(n)
    sum_x = torch.zeros(n, dtype=torch.float64)
    sum_sent = torch.zeros(n, dtype=torch.float64)
    sizes = []
    for _ in range(steps):
        x = c + 1e-3 * torch.randn(n, generator=g)
        y = x + e
        sent = decode(encode(x, fmt, residual=e), fmt)
        np.testing.assert_allclose(e.numpy(), (y - sent).numpy(), atol=1e-6)  # e <- (x + e) - sent
        sum_x += x.double()
        sum_sent += sent.double()
        np.testing.assert_allclose((sum_x - sum_sent).numpy(), e.double().numpy(), atol=1e-3)
        sizes.append(e.abs().max().item())
    # bounded: the residual does not grow like the running sum (steps * |c|): it settles
    assert max(sizes[steps // 2:]) < 0.1 * steps * c.abs().max().item()
    assert max(sizes[steps // 2:]) <= 1.2 * max(sizes[: steps // 2])
    # without feedback the same entries are dropped every step: the error grows linearly
    plain = sum(decode(encode(c, fmt), fmt).double() for _ in range(steps))
    assert (steps * c.double() - plain).abs().max() > 5 * max(sizes)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_makes_its_scale_block_nan(bad):
    x = distinct(3 * 2048, seed=4)
    fmt = sparse_format(x.numel(), fraction=0.02, bits=4)
    clean = decode(encode(x, fmt), fmt)
    x[2048 + 700] = bad
    e = torch.zeros(x.numel())
    got = decode(encode(x, fmt, residual=e), fmt)
    assert torch.isnan(got[2048:4096]).all()
    assert torch.equal(got[:2048], clean[:2048]) and torch.equal(got[4096:], clean[4096:])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"topk_fraction must be a float in \(0, 1\], got 0"):
        sparse_format(10, fraction=0, bits=2)
    with pytest.raises(ValueError, match="got 1.5"):
        sparse_format(10, fraction=1.5, bits=2)
    with pytest.raises(ValueError, match="bits must be 8, 4 or 2, got 3"):
        sparse_format(10, fraction=0.1, bits=3)
    with pytest.raises(ValueError, match="scale_block must be a positive multiple of 1024 elements, got 512"):
        sparse_format(10, fraction=0.1, bits=2, scale_block=512)
    fmt = sparse_format(10, fraction=0.1, bits=2)
    with pytest.raises(ValueError, match="x has 11 elements, the format 10"):
        encode(torch.zeros(11), fmt)
    with pytest.raises(ValueError, match="residual must be a contiguous fp32 tensor of 10 elements"):
        encode(torch.zeros(10), fmt, residual=torch.zeros(9))
    with pytest.raises(ValueError, match="payload must be"):
        decode(torch.zeros(3, dtype=torch.uint8), fmt)
    with pytest.raises(TypeError, match="floating-point"):
        encode(torch.arange(10), fmt)


# -- LocalSGDOptions -------------------------------------------------------------------------------
def test_options_accept_int2_and_topk_fraction():
    from lookahead_dist.sync.options import COMM_DTYPES, LocalSGDOptions

    assert COMM_DTYPES["int2"] == "int2"
    assert LocalSGDOptions(comm_dtype="int2").quant_bits == 2
    o = LocalSGDOptions(comm_dtype="int2", topk_fraction=0.02)
    assert o.topk_fraction == 0.02 and o.quant_bits == 2
    assert LocalSGDOptions(comm_dtype="int8", topk_fraction=1).topk_fraction == 1.0
    assert LocalSGDOptions().topk_fraction is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"comm_dtype": "int2", "topk_fraction": 0.0}, r"`topk_fraction` must be None or a float in \(0, 1\], got 0.0"),
        ({"comm_dtype": "int2", "topk_fraction": 1.5}, r"`topk_fraction` must be None .* got 1.5"),
        ({"comm_dtype": "int2", "topk_fraction": math.nan}, r"`topk_fraction` must be None .* got nan"),
        ({"comm_dtype": "int2", "topk_fraction": True}, r"`topk_fraction` must be None .* got True"),
        ({"comm_dtype": "int2", "topk_fraction": "0.02"}, r"`topk_fraction` must be None .* got '0.02'"),
        ({"topk_fraction": 0.02}, r"`topk_fraction=0.02` sends its values at the bits of `comm_dtype`.*got comm_dtype=None"),
        ({"comm_dtype": torch.bfloat16, "topk_fraction": 0.02}, r"got comm_dtype=torch.bfloat16"),
        ({"comm_dtype": "int2", "quant_block_size": 6}, r"`quant_block_size` must be a multiple of 4 with comm_dtype='int2'.*got 6"),
        ({"comm_dtype": "int3"}, r"`comm_dtype` must be None, .* or 'int8'/'int4'/'int2', got 'int3'"),
    ],
)
def test_options_refuse_bad_values_naming_them(kwargs, match):
    from lookahead_dist.sync.options import LocalSGDOptions

    with pytest.raises(ValueError, match=match):
        LocalSGDOptions(**kwargs)


def test_options_sharded_topk_needs_eager_or_an_intra_group():
    # sharded=True without intra_group is refused for any integer comm_dtype without eager_update
    # already; with eager_update it is the sparse reduce-scatter. A non-eager plain sharded sync is
    # refused by the sparse check by name, the hierarchical mode (an intra_group, which needs ranks to
    # build) accepted: run that check on options whose fields are set after construction.
    from lookahead_dist.sync.options import LocalSGDOptions

    with pytest.raises(ValueError, match=r"`comm_dtype=int2` needs the full slow weights"):
        LocalSGDOptions(comm_dtype="int2", topk_fraction=0.02, sharded=True)
    ok = LocalSGDOptions(comm_dtype="int2", topk_fraction=0.02, sharded=True, eager_update=True)
    assert ok.topk_fraction == 0.02 and ok.sharded
    LocalSGDOptions(comm_dtype="int4", topk_fraction=0.05, sharded=True, eager_update="naive")
    o = LocalSGDOptions(comm_dtype="int2")
    o.sharded, o.topk_fraction = True, 0.02
    with pytest.raises(ValueError, match=r"`topk_fraction=0.02` with `sharded=True`: without `eager_update`"):
        o._check_sparse()
    o.intra_group = object()  # hierarchical: sends progress, eager or not
    o._check_sparse()
    o.sharded, o.intra_group, o.manager = False, None, object()
    with pytest.raises(ValueError, match=r"`topk_fraction=0.02` is not supported with `manager=<object"):
        o._check_sparse()


@pytest.mark.parametrize("k", [1, 3, 4, 5, 8, 13, 16, 17, 31, 32, 33, 64, 200, 256])
def test_two_level_selection_keeps_the_k_largest_of_every_row(k):
    # Note [Top-k selection]: the positions are those of one topk over the row (distinct
    # magnitudes); with ties, NaN and inf, every kept entry is >= every dropped one.
    from lookahead_dist._sparse import _select

    mag = distinct(64 * INDEX_BLOCK, seed=k).abs().view(64, INDEX_BLOCK)
    want = mag.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(_select(mag, k), want)
    g = torch.Generator().manual_seed(k)
    tied = torch.randint(0, 6, (64, INDEX_BLOCK), generator=g).float()
    tied[3, 17] = math.inf
    tied[5, 200] = math.nan
    idx = _select(tied, k)
    assert idx.shape == (64, k) and bool((idx.diff(dim=1) > 0).all())  # k distinct positions, ascending
    kept = torch.zeros_like(tied, dtype=torch.bool).scatter_(1, idx, True)
    low = torch.where(kept, tied, math.inf).nan_to_num(nan=math.inf).amin(dim=1)
    high = torch.where(kept, -math.inf, tied).amax(dim=1)
    assert bool((low >= high).all())
    assert bool(kept[3, 17]) and bool(kept[5, 200])  # inf and NaN rank first
