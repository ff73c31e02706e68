"""Backend traits (``lookahead_dist._backend``), host deadlines, and host reads at sync steps.

Everything NCCL-specific that can be observed on a CPU is forced onto gloo here: the
stream-ordered (caller-thread) path of the quantised reduce, the host-polled deadline with a work
that never completes, errors told apart by type rather than by text, and the count of host reads
(``Tensor.__bool__``/``item``/... -- each a device sync on a GPU) at the steps that launch or apply
a sync. The two-rank bit-for-bit comparison of the caller-thread and worker paths is in
``tests/distributed/test_nccl_paths.py``.
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Any

import pytest
import torch

from lookahead_dist import LocalSGDOptions, Lookahead, _backend, _comm, _quant, _sync
from lookahead_dist.sync import streaming
from tests.unit.test_host_syncs import CountHostReads


# -- the traits -------------------------------------------------------------------------------------
def test_traits_by_device_and_backend(monkeypatch):
    import torch.distributed as dist

    assert _backend.traits(None, "cpu") is _backend.HOST_BLOCKING  # CPU tensors: always host threads
    for name, device, want in (("nccl", "cuda", _backend.STREAM_ORDERED),
                               ("cpu:gloo,cuda:nccl", "cuda", _backend.STREAM_ORDERED),
                               ("cpu:gloo,cuda:nccl", "cpu", _backend.HOST_BLOCKING),
                               ("gloo", "cuda", _backend.HOST_BLOCKING),
                               ("xccl", "xpu", _backend.STREAM_ORDERED)):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, _n=name: _n)
        assert _backend.traits(object(), device) is want, (name, device)
    t = _backend.STREAM_ORDERED
    assert not t.blocks_host and not t.needs_worker_thread and t.host_deadline
    t = _backend.HOST_BLOCKING
    assert t.blocks_host and t.needs_worker_thread and not t.host_deadline
    with _backend.forced(_backend.STREAM_ORDERED):
        assert _backend.traits(None, "cpu") is _backend.STREAM_ORDERED
    assert _backend.traits(None, "cpu") is _backend.HOST_BLOCKING


# -- host deadlines, errors by type ---------------------------------------------------------------
class StalledWork:
    """A collective that never completes; records how it was waited for."""

    def __init__(self) -> None:
        self.waits: list[Any] = []

    def is_completed(self) -> bool:
        return False

    def wait(self, timeout: Any = None) -> None:
        self.waits.append(timeout)
        if timeout is not None:  # what TorchComms answers
            raise RuntimeError("wait timeout not supported")
        raise AssertionError("a stalled stream-ordered work must not be waited for without a deadline")


class DoneWork:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.waits: list[Any] = []

    def is_completed(self) -> bool:
        return True

    def wait(self, timeout: Any = None) -> bool:
        self.waits.append(timeout)
        if timeout is not None:
            raise RuntimeError("wait timeout not supported")  # TorchComms: the text a substring test mistook
        if self.error is not None:
            raise self.error
        return True


def test_stream_ordered_deadline_is_a_host_poll():
    work = StalledWork()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"fragment 3 of 4 .*timeout=0.3 s"):
        streaming.wait_work(work, 0.3, "the sync of fragment 3 of 4", _backend.STREAM_ORDERED)
    took = time.monotonic() - start
    assert 0.3 <= took < 1.5, took
    assert work.waits == []  # never wait(timeout): NCCL would block the host and abort the communicators


def test_stream_ordered_never_passes_a_timeout_to_wait():
    # Under TorchComms wait(timeout) raises "wait timeout not supported"; the sync never calls it.
    work = DoneWork()
    assert streaming.wait_work(work, datetime.timedelta(seconds=5), "x", _backend.STREAM_ORDERED) is True
    assert work.waits == [None]


def test_errors_are_matched_by_type_not_text():
    # A failure whose text mentions a timeout, raised well before the deadline, is a failure.
    work = DoneWork(RuntimeError("NCCL communicator was aborted: watchdog timed out (timeout)"))
    with pytest.raises(RuntimeError, match="failed") as info:
        streaming.wait_work(work, 30.0, "the sync of fragment 0 of 1", _backend.STREAM_ORDERED)
    assert not isinstance(info.value, TimeoutError)
    # A TimeoutError is a timeout whatever it says.
    work = DoneWork(TimeoutError("x"))
    with pytest.raises(TimeoutError, match="did not complete within timeout=None"):
        streaming.wait_work(work, None, "s", _backend.STREAM_ORDERED)


class GlooLikeWork:
    """gloo's wait(timedelta): blocks until the deadline, then raises a RuntimeError."""

    def __init__(self, text: str) -> None:
        self.text = text

    def wait(self, timeout: Any = None) -> None:
        time.sleep(timeout.total_seconds())
        raise RuntimeError(self.text)


def test_host_blocking_timeout_is_told_by_the_clock():
    with pytest.raises(TimeoutError, match="fragment 0"):
        streaming.wait_work(GlooLikeWork("Connection closed"), 0.2, "the sync of fragment 0", _backend.HOST_BLOCKING)


class NeverEvent:
    def query(self) -> bool:
        return False


def test_quantized_work_enforces_a_host_deadline():
    result = torch.zeros(3)
    work = _quant.QuantizedAllReduceWork(None, torch.device("cpu"), result=result, done=NeverEvent())
    assert not work.is_completed()  # honest: the stages have not finished
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        work.wait(0.2)
    assert 0.2 <= time.monotonic() - start < 1.5
    with pytest.raises(TimeoutError, match="fragment 0 of 1"):
        streaming.wait_work(work, 0.2, "the sync of fragment 0 of 1", _backend.STREAM_ORDERED)
    done = _quant.QuantizedAllReduceWork(None, torch.device("cpu"), result=result)
    assert done.is_completed() and done.wait(0.1) is result


# -- through the optimizer: a stalled stage becomes a TimeoutError naming the fragment ------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _train(model: torch.nn.Module, opt: Any, steps: int, counts: list[int] | None = None) -> None:
    for t in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if counts is None:
            opt.step()
        else:
            with CountHostReads() as mode:
                opt.step()
            counts.append(len(mode.reads))


@pytest.mark.parametrize("mode", ["fp32-streaming", "int8"])
def test_stalled_stage_times_out_naming_the_fragment(mode, one_rank_group, monkeypatch):
    if mode == "int8":
        def stalled(send, plan, group, average, owner_residual, out, label, device):
            return _quant.QuantizedAllReduceWork(None, device, result=out, done=NeverEvent())

        monkeypatch.setattr(_quant, "_launch_inline", stalled)
        opts = LocalSGDOptions(comm_dtype="int8", timeout=0.3)
        steps, where = 4, "fragment 0 of 1 of param group 0"
    else:
        real = _comm.all_reduce

        def stalled_all_reduce(t, group, stats, label, async_op=True):
            real(t, group, stats, label, async_op=async_op).wait()
            return StalledWork()

        monkeypatch.setattr(_comm, "all_reduce", stalled_all_reduce)
        opts = LocalSGDOptions(num_fragments=2, fragment_sync_delay=1, timeout=0.3)
        steps, where = 3, "fragment 1 of 2 of param group 0"
    model = _model()
    with _backend.forced(_backend.STREAM_ORDERED):
        opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, local_sgd=opts)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=where) as info:
            _train(model, opt, steps)
    assert "timeout=0.3 s" in str(info.value)
    assert time.monotonic() - start < 5


# -- host reads at sync steps --------------------------------------------------------------------
K = 4
SYNC_MODES = {
    # name: (options, {count n: what the step does})  with k = 4
    "blocking": (lambda: LocalSGDOptions(), {4: "launch+apply"}),
    "streaming": (lambda: LocalSGDOptions(num_fragments=2, fragment_sync_delay=1), {2: "launch", 3: "apply",
                                                                                  4: "launch", 1: "apply"}),
    "sharded": (lambda: LocalSGDOptions(sharded=True), {4: "launch+apply"}),
    "sharded-streaming": (lambda: LocalSGDOptions(sharded=True, num_fragments=2, fragment_sync_delay=1),
                          {2: "launch", 3: "apply", 4: "launch", 1: "apply"}),
    "int8": (lambda: LocalSGDOptions(comm_dtype="int8"), {4: "launch+apply"}),
    "int8-streaming": (lambda: LocalSGDOptions(comm_dtype="int8", num_fragments=2, fragment_sync_delay=1),
                       {2: "launch", 3: "apply", 4: "launch", 1: "apply"}),
}


@pytest.mark.parametrize("mode", list(SYNC_MODES))
def test_a_launch_adds_no_host_read_and_an_apply_at_most_one(mode, one_rank_group):
    make, schedule = SYNC_MODES[mode]
    steps = 3 * K + 1
    bare: list[int] = []
    model = _model()
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps, bare)
    ours: list[int] = []
    model = _model()
    _train(model, Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=K, local_sgd=make()), steps, ours)
    extra = [o - b for o, b in zip(ours, bare)]
    for t in range(1, steps):  # call t + 1 is count n of the cycle
        n = t % K + 1
        what = schedule.get(n if t >= K or n > 1 else 0, "quiet")
        limit = {"quiet": 0, "launch": 0, "apply": 1, "launch+apply": 1}[what]
        assert extra[t] <= limit, (mode, t, n, what, extra)
    assert max(extra[1:]) == 1, extra  # the apply's one read (the non-finite decision) is there


# -- the probe ------------------------------------------------------------------------------------
def test_probe_is_exact_and_the_scale_poisons_only_non_finite():
    ts = [torch.randn(n) for n in (3, 40000, 7, 100000, 0, 5)]
    assert _sync.first_nonfinite(ts) is None
    assert torch.equal(_sync.finite_scale(ts), torch.tensor(1.0))
    for i, v in ((0, math.nan), (1, -math.inf), (3, math.inf), (5, math.nan)):
        bad = [t.clone() for t in ts]
        bad[i][-1] = v
        assert _sync.first_nonfinite(bad) == i
        assert _sync.first_nonfinite_of([ts, bad]) == (1, i)
        assert torch.isnan(_sync.finite_scale(bad))
    # finite values whose fp32 sum overflows: not reported (the hit is confirmed exactly)
    assert _sync.first_nonfinite([torch.full((10,), 3e38)]) is None
    # fp16 sums in fp32: no false hit at 65504
    assert _sync.first_nonfinite([torch.full((64,), 60000.0, dtype=torch.float16)]) is None
    # x * 1 keeps every finite value, signed zeros included
    x = torch.tensor([-0.0, 0.0, 1e-45, -3e38])
    y = x.clone().mul_(_sync.finite_scale([x]))
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))
    # a bucket's cached plan follows the tensors' values
    cache: dict = {}
    assert _sync.first_nonfinite(ts, cache) is None and cache
    ts[1][7] = math.nan
    assert _sync.first_nonfinite(ts, cache) == 1


def test_quantiser_reads_nothing_on_the_host():
    x = torch.randn(4096)
    x[100] = math.inf
    with CountHostReads() as mode:
        q = _quant.quantize(x, bits=8, block_size=512)
    assert mode.reads == []
    assert torch.isnan(q.scales[0]) and (q.codes[:512] == 0).all()
    assert torch.isfinite(q.scales[1:]).all()
