"""lookahead_dist.memory on one process: every slow weight counted once, wherever it waits."""

from __future__ import annotations

import torch

from lookahead_dist import Lookahead
from lookahead_dist.memory import optimizer_state_bytes


def test_slow_weights_waiting_outside_the_inner_state_are_counted():
    a = torch.nn.Parameter(torch.ones(5))
    b = torch.nn.Parameter(torch.ones(7))
    opt = Lookahead(torch.optim.AdamW([a, b], lr=0.1), k=3)
    a.sum().backward()  # b has no gradient: AdamW keeps no state for it, its slow weight waits
    opt.step()
    assert b not in opt.optimizer.state and opt.slow_weight(b) is not None
    got = optimizer_state_bytes(opt)
    assert got.slow == (5 + 7) * 4
    assert got.inner == 2 * 5 * 4 + 4  # exp_avg, exp_avg_sq of a, and its fp32 step
    assert got.lookahead_other == 0
    # Plain optimizers count as inner state only.
    assert optimizer_state_bytes(opt.optimizer).slow == 5 * 4
