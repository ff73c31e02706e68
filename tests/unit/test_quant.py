"""Blockwise int8/int4/int2 quantisation (single process), against a per-block numpy reference.

The reference (:func:`ref_roundtrip`) follows the format of the module docstring one block at a
time in numpy float32: scale = absmax / qmax, q = round-half-even(x / scale) clipped to
[-qmax, qmax], value = q * scale. The quantised all-reduce is tested on real gloo ranks in
tests/distributed/test_quant_reduce.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lookahead_dist._quant import (
    DEFAULT_BLOCK_SIZE,
    dequantize,
    quantize,
    quantize_with_feedback,
    quantized_nbytes,
    reduce_chunk_numel,
    scale_overhead,
)

QMAX = {8: 127, 4: 7, 2: 1}


def ref_roundtrip(x: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(dequantised values, per-element scale) of the documented format, block by block."""
    x = np.asarray(x, dtype=np.float32)
    qmax = np.float32(QMAX[bits])
    n = x.size
    padded = np.zeros(-(-n // block) * block, dtype=np.float32)
    padded[:n] = x
    vals = np.empty_like(padded)
    scales = np.empty_like(padded)
    for b in range(0, padded.size, block):
        blk = padded[b: b + block]
        amax = np.max(np.abs(blk))
        if not np.isfinite(amax):
            s = np.float32(np.nan)
            vals[b: b + block] = np.nan
        else:
            s = amax / qmax
            q = np.clip(np.round(blk / s), -qmax, qmax) if s > 0 else np.zeros_like(blk)
            vals[b: b + block] = q * s
        scales[b: b + block] = s
    return vals[:n], scales[:n]


def mixed_magnitudes(n: int, seed: int) -> torch.Tensor:
    # Blocks of very different scales, as in a pseudo-gradient of a real model.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.logspace(-4, 2, n).roll(seed)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,block", [(1, 2), (3, 2), (7, 4), (1000, 16), (512, 512), (1025, 512), (4096, 256)])
def test_roundtrip_equals_reference_and_error_bound(bits, n, block):
    x = mixed_magnitudes(n, seed=n + bits)
    q = quantize(x, bits=bits, block_size=block)
    got = dequantize(q)
    want, scale = ref_roundtrip(x.numpy(), bits, block)
    assert got.shape == (n,) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    # |x - deQ(Q(x))| <= scale / 2 per element (plus the fp32 rounding of x / scale).
    err = (x - got).abs().numpy()
    assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-45)
    # Layout: codes and scales as documented, bytes as quantized_nbytes says.
    blocks = -(-n // block)
    assert q.scales.shape == (blocks,) and q.scales.dtype == torch.float32
    assert q.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.codes.numel() == blocks * block * bits // 8
    assert q.nbytes == quantized_nbytes(n, bits=bits, block_size=block)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_absmax_element_is_exact_and_padding_does_not_change_the_scale(bits):
    x = torch.tensor([0.5, -3.0, 1.25], dtype=torch.float32)  # 3 of a block of 8: 5 zeros of padding
    q = quantize(x, bits=bits, block_size=8)
    assert q.scales.tolist() == [pytest.approx(3.0 / QMAX[bits], rel=1e-7)]
    assert dequantize(q)[1].item() == pytest.approx(-3.0, rel=1e-6)


@pytest.mark.parametrize("n,block", [(7, 4), (1000, 16), (512, 512), (1025, 512), (4096, 256)])
def test_int2_roundtrip_equals_reference_and_error_bound(n, block):
    # The ternary grid {-s, 0, s}, s = absmax: error <= absmax / 2 per element.
    x = mixed_magnitudes(n, seed=n + 2)
    q = quantize(x, bits=2, block_size=block)
    got = dequantize(q)
    want, scale = ref_roundtrip(x.numpy(), 2, block)
    np.testing.assert_array_equal(got.numpy(), want)
    assert set(np.unique(np.sign(got.numpy()) * (got.numpy() != 0))) <= {-1.0, 0.0, 1.0}
    err = (x - got).abs().numpy()
    assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-45)
    blocks = -(-n // block)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == blocks * block // 4
    assert q.nbytes == quantized_nbytes(n, bits=2, block_size=block) == blocks * (block // 4 + 4)


def test_int2_packing_layout_and_rounding():
    # absmax 1 -> scale 1; codes [1, -1, 0, 1] -> offset-binary u = q + 2 = [3, 1, 2, 3], element 4j+m
    # in bits 2m..2m+1: 3 | 1 << 2 | 2 << 4 | 3 << 6.
    q = quantize(torch.tensor([1.0, -1.0, 0.0, 1.0, 0.5, -0.5, 0.75, -0.25]), bits=2, block_size=4)
    assert q.codes.tolist() == [3 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 1 << 2 | 3 << 4 | 2 << 6]
    assert q.scales.tolist() == [1.0, 0.75]
    # 0.5 / 0.75 = 0.67 -> 1; -0.5 / 0.75 -> -1; 0.75 -> 1; -0.25 / 0.75 -> 0 (ties to even at 0.5)
    assert dequantize(q).tolist() == [1.0, -1.0, 0.0, 1.0, 0.75, -0.75, 0.75, -0.0]
    half = quantize(torch.tensor([1.0, 0.5, -0.5, 0.0]), bits=2, block_size=4)
    assert dequantize(half).tolist() == [1.0, 0.0, -0.0, 0.0]


def test_int4_nibble_layout():
    # Block of 4 with absmax 7 -> scale 1, codes [7, -7, 0, 1] -> offset-binary [15, 1, 8, 9];
    # element 2j in the low nibble, 2j+1 in the high one: bytes [15 | 1 << 4, 8 | 9 << 4].
    q = quantize(torch.tensor([7.0, -7.0, 0.0, 1.0]), bits=4, block_size=4)
    assert q.codes.tolist() == [15 | 1 << 4, 8 | 9 << 4]
    assert q.scales.tolist() == [1.0]
    q8 = quantize(torch.tensor([127.0, -127.0, 0.0, 1.0]), bits=8, block_size=4)
    assert q8.codes.tolist() == [127, -127, 0, 1]


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_is_half_to_even(bits):
    qmax = QMAX[bits]
    # absmax = qmax -> scale 1; 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0
    x = torch.tensor([float(qmax), 0.5, 1.5, 2.5, -0.5, -2.5])
    got = dequantize(quantize(x, bits=bits, block_size=6)).tolist()
    assert got == [qmax, 0.0, 2.0, 2.0, -0.0, -2.0]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_zero_blocks_are_exact_zeros(bits):
    x = torch.zeros(24)
    x[16:] = torch.arange(1.0, 9.0)  # block 2 non-zero, blocks 0 and 1 zero
    q = quantize(x, bits=bits, block_size=8)
    assert q.scales[:2].tolist() == [0.0, 0.0]
    got = dequantize(q)
    assert torch.equal(got[:16], torch.zeros(16))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_makes_its_block_nan_and_leaves_the_others(bits, bad):
    x = mixed_magnitudes(40, seed=3)
    clean = dequantize(quantize(x, bits=bits, block_size=8))
    x[13] = bad  # block 1 (elements 8..15)
    got = dequantize(quantize(x, bits=bits, block_size=8))
    assert torch.isnan(got[8:16]).all()  # propagates: a caller's isfinite guard sees it
    assert torch.equal(got[:8], clean[:8]) and torch.equal(got[16:], clean[16:])


def test_other_float_dtypes_are_read_as_fp32():
    x = mixed_magnitudes(100, seed=1)
    got = dequantize(quantize(x.to(torch.bfloat16), bits=8, block_size=10))
    want, _ = ref_roundtrip(x.to(torch.bfloat16).float().numpy(), 8, 10)
    np.testing.assert_array_equal(got.numpy(), want)


def test_dequantize_into_out():
    x = mixed_magnitudes(30, seed=2).view(5, 6)
    out = torch.empty(5, 6)
    assert dequantize(quantize(x, bits=4, block_size=4), out=out) is out
    np.testing.assert_array_equal(out.reshape(-1).numpy(), ref_roundtrip(x.reshape(-1).numpy(), 4, 4)[0])
    with pytest.raises(ValueError, match="out has 7 elements"):
        dequantize(quantize(x, bits=4, block_size=4), out=torch.empty(7))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_error_feedback_tracks_the_running_sum(bits):
    # x_t = c + noise: a fixed part, so quantising it alone makes the same error every step and
    # the running sums drift apart linearly; with feedback, sum(sent) - sum(x) = -e_T stays within
    # one rounding step (scale / 2) at every step.
    block, steps = 16, 100
    g = torch.Generator().manual_seed(bits)
    c = torch.randn(256, generator=g)
    e = torch.zeros(256)
    sum_true = torch.zeros(256, dtype=torch.float64)
    sum_fb = torch.zeros(256, dtype=torch.float64)
    sum_plain = torch.zeros(256, dtype=torch.float64)
    drift_fb, drift_plain = [], []
    for _ in range(steps):
        x = c + 1e-3 * torch.randn(256, generator=g)
        q = quantize_with_feedback(x, e, bits=bits, block_size=block)
        sent = dequantize(q)
        sum_true += x.double()
        sum_fb += sent.double()
        sum_plain += dequantize(quantize(x, bits=bits, block_size=block)).double()
        # the identity behind error feedback: what was not sent is in the residual
        np.testing.assert_allclose((sum_true - sum_fb).numpy(), e.double().numpy(), atol=1e-4)
        half_step = q.scales.repeat_interleave(block) / 2
        assert torch.all(e.abs() <= half_step * (1 + 1e-5) + 1e-6)
        drift_fb.append((sum_fb - sum_true).abs().max().item())
        drift_plain.append((sum_plain - sum_true).abs().max().item())
    bound = max(drift_fb)
    assert bound <= c.abs().max().item() * 1.5 / QMAX[bits]  # about one step of the largest block
    assert drift_plain[-1] > 10 * bound  # without feedback the drift keeps growing ...
    assert drift_plain[-1] > 5 * drift_plain[9]  # ... about linearly (x10 steps)


def test_error_feedback_handles_shapes_and_validates_the_residual():
    x = mixed_magnitudes(12, seed=5).view(3, 4)
    e = torch.zeros(3, 4)
    q = quantize_with_feedback(x, e, bits=8, block_size=4)
    np.testing.assert_allclose(e.numpy(), (x.reshape(-1) - dequantize(q)).view(3, 4).numpy(), atol=0)
    with pytest.raises(ValueError, match="residual must be a contiguous fp32 tensor of 12 elements"):
        quantize_with_feedback(x, torch.zeros(11), bits=8, block_size=4)
    with pytest.raises(ValueError, match="got dtype torch.bfloat16"):
        quantize_with_feedback(x, torch.zeros(12, dtype=torch.bfloat16), bits=8, block_size=4)


def test_scale_overhead_of_the_default_block_is_within_two_percent():
    assert DEFAULT_BLOCK_SIZE == 512
    assert scale_overhead(4) == 4 / 256 <= 0.02  # 1.5625 %
    assert scale_overhead(8) == 4 / 512  # 0.78 %
    assert scale_overhead(4, 256) > 0.02  # why the default is not 256
    n = 10 * DEFAULT_BLOCK_SIZE
    assert quantized_nbytes(n, bits=4) == n // 2 * (1 + scale_overhead(4))
    assert quantized_nbytes(n, bits=8) == n * (1 + scale_overhead(8))


def test_reduce_chunk_numel():
    assert reduce_chunk_numel(1000, 3, block_size=8) == 336  # ceil(1000 / 24) * 8; padding 8
    assert reduce_chunk_numel(4096, 2, block_size=512) == 2048  # no padding
    assert reduce_chunk_numel(1, 4, block_size=512) == 512
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        reduce_chunk_numel(10, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3}, "bits must be 8, 4 or 2, got 3"),
        ({"bits": 2, "block_size": 6}, r"block_size must be a multiple of 4 with bits=2 \(four codes per byte\), got 6"),
        ({"bits": 8, "block_size": 7}, "block_size must be a positive even number of elements, got 7"),
        ({"bits": 4, "block_size": 0}, "got 0; the default is 512"),
        ({"bits": 4, "block_size": True}, "got True"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.ones(4), **kwargs)


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        quantize(torch.arange(4), bits=8)
