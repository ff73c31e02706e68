"""The fused (torch.compile'd) quantisation kernels against the eager stages, bit for bit.

Note [Fused quantisation kernels] in lookahead_dist/_fused.py promises the same codes, scales and
residuals as the eager path of lookahead_dist/_quant.py, non-finite and all-zero blocks included.
The reduce across real ranks (the owner's kernel) is checked in
tests/distributed/test_quant_reduce.py; here the sender's stage and the options.
"""

from __future__ import annotations

import pytest
import torch

from lookahead_dist import LocalSGDOptions
from lookahead_dist._buffers import POOL
from lookahead_dist._quant import _plan, _stage_send

BLOCK = 16
N = 2


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN equal to NaN (torch.equal says NaN != NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def payload(seed: int) -> torch.Tensor:
    """N chunks of 8 blocks: ordinary blocks over 6 decades, one all-zero, one whose absmax
    underflows the scale, one with a NaN, one with an inf, one with a -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N * 8 * BLOCK, generator=g) * torch.logspace(-4, 2, N * 8 * BLOCK)
    blocks = x.view(-1, BLOCK)
    blocks[1] = 0.0
    blocks[2] = 1e-45
    blocks[3, 5] = float("nan")
    blocks[9, 0] = float("-inf")
    blocks[10, 3] = -0.0
    return x


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_send_equals_the_eager_stage_bit_for_bit(bits):
    eager, fused = _plan(N * 8 * BLOCK, N, bits, BLOCK), _plan(N * 8 * BLOCK, N, bits, BLOCK, fused=True)
    res_e = torch.randn(N * 8 * BLOCK, generator=torch.Generator().manual_seed(1)) * 1e-2
    res_f = res_e.clone()
    for step in range(3):  # the residual carries over
        x = payload(step)
        want = _stage_send(x, eager, res_e).clone()
        got = _stage_send(x, fused, res_f).clone()
        assert torch.equal(want, got), f"send bytes differ at step {step}"
        assert same(res_e, res_f), f"residual differs at step {step}"
        assert same(x, payload(step))  # the input is not modified
        POOL.clear()
    assert res_e.isnan().any()  # the NaN block poisoned its residual, alike on both paths


def test_send_without_residual():
    x = payload(5)
    want = _stage_send(x, _plan(x.numel(), N, 8, BLOCK), None)
    got = _stage_send(x, _plan(x.numel(), N, 8, BLOCK, fused=True), None)
    assert torch.equal(want, got)


def test_a_padded_buffer_takes_the_eager_path():
    # 3 elements short of N chunks of whole blocks: the zero padding is eager-only, the result the same
    x = payload(6)[:-3]
    res_e = torch.zeros(x.numel())
    res_f = res_e.clone()
    want = _stage_send(x, _plan(x.numel(), N, 4, BLOCK), res_e)
    got = _stage_send(x, _plan(x.numel(), N, 4, BLOCK, fused=True), res_f)
    assert torch.equal(want, got) and same(res_e, res_f)


def test_options_name_what_cannot_be_fused():
    assert LocalSGDOptions(comm_dtype="int4", fused_kernels=True).fused_kernels is True
    with pytest.raises(ValueError, match="fused_kernels=True.*comm_dtype='int8'.*got comm_dtype=None"):
        LocalSGDOptions(fused_kernels=True)
    with pytest.raises(ValueError, match="fused_kernels=True.*got comm_dtype=torch.bfloat16"):
        LocalSGDOptions(comm_dtype=torch.bfloat16, fused_kernels=True)
    with pytest.raises(ValueError, match="sparse exchange.*topk_fraction=0.02"):
        LocalSGDOptions(comm_dtype="int2", topk_fraction=0.02, fused_kernels=True)
    with pytest.raises(TypeError, match="fused_kernels` must be a bool, got 'yes'"):
        LocalSGDOptions(comm_dtype="int8", fused_kernels="yes")
