"""Lookahead adds no device->host synchronisation to a step that neither launches nor applies a sync.

On a GPU every ``bool(tensor)``, ``.item()``, ``.tolist()``, ``float(tensor)``... blocks the host
until the device has caught up. On CPU they cost nothing, but they are the same Python calls, so
a ``TorchFunctionMode`` that counts them inside ``step()`` finds them here (Note [Host syncs] in
``lookahead_dist.lookahead``). Each case counts the reads of ``Lookahead(inner).step()`` on quiet
steps and of the bare ``inner.step()`` under the same conditions; the difference must be zero.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lookahead_dist import Lookahead, LocalSGDOptions

# The Tensor methods that read a value on the host (each is a blocking copy on a CUDA tensor).
HOST_READS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "__complex__", "numpy"}


class CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _inner(model: torch.nn.Module) -> torch.optim.Optimizer:
    # A tensor lr and the fused kernel: the configuration a GPU user picks to avoid host syncs.
    return torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True)


def _reads_per_step(make_opt: Callable[[torch.optim.Optimizer], Any], scaler: bool, steps: int = 8) -> list[int]:
    """Host reads inside each ``step()`` call (GradScaler's own reads outside it are not counted)."""
    model = _model()
    opt = make_opt(_inner(model))
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6) if scaler else None
    counts = []
    for t in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(t))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        if grad_scaler is None:
            loss.backward()
            with CountHostReads() as mode:
                opt.step()
        else:
            grad_scaler.scale(loss).backward()
            # GradScaler.step calls opt.step (it hands found_inf over); count only inside that call.
            real_step = opt.step
            modes: list[CountHostReads] = []

            def counted(*a: Any, _real: Any = real_step, _modes: list = modes, **kw: Any) -> Any:
                with CountHostReads() as m:
                    _modes.append(m)
                    return _real(*a, **kw)

            opt.step = counted
            grad_scaler.step(opt)
            del opt.step
            grad_scaler.update()
            mode = modes[0]
        counts.append(len(mode.reads))
    return counts


QUIET_K = 10**6  # no sync within the run: every step after the first is quiet

MODES: dict[str, Callable[[], Any]] = {
    "in-place": lambda: False,
    "blocking": lambda: True,
    "streaming": lambda: LocalSGDOptions(num_fragments=2, fragment_sync_delay=1),
    "sharded": lambda: LocalSGDOptions(sharded=True),
    "int8": lambda: LocalSGDOptions(comm_dtype="int8"),
    "eager": lambda: LocalSGDOptions(eager_update=True, num_fragments=2),
    "eager-sharded": lambda: LocalSGDOptions(eager_update=True, sharded=True, num_fragments=2),
    "sparse": lambda: LocalSGDOptions(comm_dtype="int2", topk_fraction=0.02),
}


CASES = [(mode, scaler) for mode in MODES for scaler in (False, True)]


@pytest.mark.parametrize("mode, scaler", CASES, ids=[f"{m}-{'gradscaler' if s else 'plain'}" for m, s in CASES])
def test_quiet_steps_add_no_host_sync(mode, scaler, one_rank_group):
    bare = _reads_per_step(lambda inner: inner, scaler)
    ours = _reads_per_step(lambda inner: Lookahead(inner, k=QUIET_K, local_sgd=MODES[mode]()), scaler)
    # The first step takes the slow weights (and reads a tensor lr once: the fake-step test on an
    # empty state); every later step must read exactly what the bare optimizer reads.
    assert ours[1:] == bare[1:], (ours, bare)


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "gradscaler"])
def test_in_place_sync_steps_read_what_the_note_says(scaler):
    # In place, k=3: calls 3 and 6 sync. The non-finite decision is one read; under GradScaler with
    # a fused inner optimizer the skip tally is read on those calls too (Note [Host syncs]), and
    # every other call reads nothing.
    bare = _reads_per_step(lambda inner: inner, scaler)
    ours = _reads_per_step(lambda inner: Lookahead(inner, k=3), scaler)
    extra = [o - b for o, b in zip(ours[1:], bare[1:])]
    per_sync = 2 if scaler else 1
    assert extra == [0, per_sync, 0, 0, per_sync, 0, 0], (ours, bare)


def test_counter_sees_a_host_read():
    # The counter itself can fail: a bool() of a tensor inside the block is counted.
    with CountHostReads() as mode:
        bool(torch.tensor(1.0) != 0)
        torch.tensor([1.0]).item()
    assert mode.reads == ["__bool__", "item"]
