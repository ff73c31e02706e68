"""The torchft-managed sync (sync/ft.py) against a mocked ``torchft.Manager``.

The mock plays one live peer: its ``allreduce`` averages our flat buffer with a fixed peer buffer
the way torchft does (sum over the participants, divided by their number), so every expected value
below is the outer step of Note [The outer step] worked by hand in float64.
"""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist

torchft = pytest.importorskip("torchft", reason="torchft is not installed (extra [ft]: pip install -e .[ft])")

from lookahead_dist import Lookahead  # noqa: E402
from lookahead_dist.sync.ft import STATE_DICT_KEY, FaultTolerantLocalSGD  # noqa: E402
from lookahead_dist.sync.local_sgd import OUTER_MOMENTUM_KEY, LocalSGDOptions  # noqa: E402

K, ALPHA, BETA, LR = 2, 0.5, 0.5, 0.1
W0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
GRADS = [torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64), torch.tensor([0.1, 0.4, -0.3], dtype=torch.float64),
         torch.tensor([-0.2, 0.2, 0.1], dtype=torch.float64), torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)]
PEER_PROGRESS = torch.tensor([-0.06, 0.02, 0.04], dtype=torch.float64)  # the peer's theta - phi


class FakeManager:
    """A create_autospec'd torchft.Manager with one peer; records the call order."""

    def __init__(self, commit: bool | list[bool] = True, peer: torch.Tensor | None = PEER_PROGRESS,
                 participants: int = 2) -> None:
        self.m = mock.create_autospec(torchft.Manager, instance=True)
        self.calls: list[str] = []
        self.sent: list[torch.Tensor] = []
        self.fns: dict[str, tuple] = {}
        self.commits = list(commit) if isinstance(commit, list) else None
        self.commit = commit
        self.peer = peer
        self.participants = participants
        self.on_quorum = None  # callable run inside start_quorum (a heal)
        self.on_commit = None  # callable run inside should_commit (the async quorum's heal)
        self.m.start_quorum.side_effect = self._start_quorum
        self.m.wait_quorum.side_effect = lambda: self.calls.append("wait_quorum")
        self.m.allreduce.side_effect = self._allreduce
        self.m.should_commit.side_effect = self._should_commit
        self.m.register_state_dict_fn.side_effect = self._register
        self.m.num_participants.return_value = participants

    def _register(self, key, load, save):
        assert key not in self.fns  # what torchft asserts
        self.fns[key] = (load, save)

    def _start_quorum(self, *a, **kw):
        self.calls.append("start_quorum")
        if self.on_quorum is not None:
            self.on_quorum()

    def _allreduce(self, t, *a, **kw):
        self.calls.append("allreduce")
        self.sent.append(t.clone())
        if self.peer is not None:  # peer's progress and its weight 1
            t.add_(torch.cat([self.peer.to(t.dtype), torch.ones(1, dtype=t.dtype)]))
        t.div_(self.participants)
        work = mock.Mock()
        work.wait.return_value = True
        return work

    def _should_commit(self, *a, **kw):
        self.calls.append("should_commit")
        if self.on_commit is not None:
            self.on_commit()
        if self.commits is not None:
            return self.commits.pop(0)
        return self.commit


def build(fm: FakeManager, **opts) -> tuple[torch.nn.Parameter, Lookahead, torch.optim.SGD]:
    w = torch.nn.Parameter(W0.clone())
    inner = torch.optim.SGD([w], lr=LR, momentum=0.9)
    o = dict(outer_momentum=BETA, nesterov=True)
    o.update(opts)
    opt = Lookahead(inner, k=K, alpha=ALPHA, local_sgd=LocalSGDOptions(manager=fm.m, **o))
    return w, opt, inner


def run_window(w, opt, grads):
    for g in grads:
        w.grad = g.clone()
        opt.step()


def inner_window(theta: torch.Tensor, buf: torch.Tensor | None, grads) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD(lr, momentum=0.9) by hand."""
    theta = theta.clone()
    for g in grads:
        buf = g.clone() if buf is None else 0.9 * buf + g
        theta = theta - LR * buf
    return theta, buf


def outer(phi, mom, mean_progress):
    d = -mean_progress
    mom = BETA * mom + d
    return phi - ALPHA * (d + BETA * mom), mom


def test_call_order_and_outer_step_without_process_group():
    assert not dist.is_initialized()
    fm = FakeManager()
    w, opt, _ = build(fm)
    assert isinstance(opt.sync_strategy, FaultTolerantLocalSGD)
    snapshot = {}

    def check_nothing_moved():  # should_commit comes before any slow weight changes
        snapshot["slow"] = opt.slow_weight(w).clone()
        snapshot["fast"] = w.detach().clone()

    fm.on_commit = check_nothing_moved
    run_window(w, opt, GRADS[:2])
    assert fm.calls == ["start_quorum", "wait_quorum", "allreduce", "should_commit"]
    assert [c.args[0] for c in fm.m.register_state_dict_fn.call_args_list] == [STATE_DICT_KEY]
    theta, _ = inner_window(W0, None, GRADS[:2])
    torch.testing.assert_close(snapshot["slow"], W0, rtol=0, atol=0)
    torch.testing.assert_close(snapshot["fast"], theta, rtol=0, atol=0)
    # What went on the wire: our progress, then our weight 1.
    torch.testing.assert_close(fm.sent[0], torch.cat([theta - W0, torch.ones(1, dtype=torch.float64)]))
    phi, mom = outer(W0, torch.zeros(3, dtype=torch.float64), (theta - W0 + PEER_PROGRESS) / 2)
    torch.testing.assert_close(w.detach(), phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.slow_weight(w), phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[w][OUTER_MOMENTUM_KEY], mom, rtol=1e-12, atol=1e-12)
    ft = opt.local_sgd.ft
    assert (ft.syncs, ft.committed, ft.discarded, ft.healed) == (1, 1, 0, 0)
    assert opt.local_sgd.stats.total("calls") == 1


def test_failed_commit_discards_the_window():
    fm = FakeManager(commit=[False, True])
    w, opt, inner = build(fm)
    run_window(w, opt, GRADS[:2])
    assert fm.calls[-1] == "should_commit"
    # fast <- slow; slow weights and outer momentum untouched; the inner momentum is kept.
    torch.testing.assert_close(w.detach(), W0, rtol=0, atol=0)
    torch.testing.assert_close(opt.slow_weight(w), W0, rtol=0, atol=0)
    assert not opt.state[w][OUTER_MOMENTUM_KEY].any()
    _, buf = inner_window(W0, None, GRADS[:2])
    torch.testing.assert_close(inner.state[w]["momentum_buffer"], buf, rtol=1e-12, atol=1e-12)
    assert (opt.local_sgd.ft.discarded, opt.local_sgd.ft.committed) == (1, 0)
    # The next window starts from the slow weights again, as if the first had not happened
    # (apart from the inner momentum it left).
    run_window(w, opt, GRADS[2:])
    theta, _ = inner_window(W0, buf, GRADS[2:])
    phi, _ = outer(W0, torch.zeros(3, dtype=torch.float64), (theta - W0 + PEER_PROGRESS) / 2)
    torch.testing.assert_close(w.detach(), phi, rtol=1e-12, atol=1e-12)
    assert fm.calls.count("should_commit") == 2 and opt.local_sgd.ft.committed == 1


def _peer_state() -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A live peer mid-run: after one committed sync and a second window (its state at the quorum)."""
    pm = FakeManager()
    pw, peer, _ = build(pm)
    run_window(pw, peer, GRADS[:2])
    run_window(pw, peer, GRADS[2:3])  # 1 of k=2 steps: theta differs from phi
    sd = peer.state_dict()
    return ({"state": {0: {key: (v.clone() if torch.is_tensor(v) else v) for key, v in sd["state"][0].items()}},
             "param_groups": sd["param_groups"]}, pw.detach().clone(), peer.slow_weight(pw).clone(),
            peer.state[pw][OUTER_MOMENTUM_KEY].clone())


@pytest.mark.parametrize("quorum", ["sync", "async"])
def test_heal_loads_the_peer_and_contributes_nothing(quorum):
    sd, theta_p, phi_p, mom_p = _peer_state()
    fm = FakeManager(participants=2 if quorum == "sync" else 1)
    w, opt, inner = build(fm)

    def heal():  # what torchft does: the user's "model" fn, then ours
        with torch.no_grad():
            w.copy_(theta_p)
        fm.fns[STATE_DICT_KEY][0](sd)

    if quorum == "sync":
        fm.on_quorum = heal  # use_async_quorum=False: healed inside start_quorum
    else:
        fm.on_commit = heal  # async quorum: torchft zeroes our buffer and heals in should_commit
        real = fm.m.allreduce.side_effect

        def zeroing(t, *a, **kw):
            t.zero_()
            return real(t, *a, **kw)

        fm.m.allreduce.side_effect = zeroing
    run_window(w, opt, GRADS[:2])  # this group's own window: stale, must not count
    if quorum == "sync":
        assert not fm.sent[0].any(), "a healed group must send zeros (weight 0)"
    progress = PEER_PROGRESS  # the mean over groups that did the work: the peer's alone
    phi, mom = outer(phi_p, mom_p, progress)
    torch.testing.assert_close(w.detach(), phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.slow_weight(w), phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[w][OUTER_MOMENTUM_KEY], mom, rtol=1e-12, atol=1e-12)
    # The inner optimizer state is the peer's too.
    torch.testing.assert_close(inner.state[w]["momentum_buffer"], sd["state"][0]["momentum_buffer"])
    assert opt.local_sgd.ft.healed == 1 and opt.local_sgd.ft.committed == 1


def test_heal_makes_every_param_group_window_stale():
    """Two param groups sync at the same step; the heal happens at the first group's quorum. The
    second group's fast weights are then the peer's too, so it must send zeros as well."""

    def two_groups(fm):
        w1, w2 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(2 * W0.clone())
        opt = Lookahead(torch.optim.SGD([{"params": [w1]}, {"params": [w2]}], lr=LR), k=K, alpha=ALPHA,
                        local_sgd=LocalSGDOptions(manager=fm.m))
        return w1, w2, opt

    def window(w1, w2, opt):
        for g in GRADS[:K]:
            w1.grad, w2.grad = g.clone(), g.clone()
            opt.step()

    pm = FakeManager()
    p1, p2, peer = two_groups(pm)
    captured = []  # the peer's state as torchft sends it: taken inside its first unit's quorum

    def capture():
        if not captured:
            captured.append(copy.deepcopy(peer.state_dict()))

    pm.on_quorum = capture
    window(p1, p2, peer)
    sd = captured[0]
    fm = FakeManager()
    w1, w2, opt = two_groups(fm)
    fm.on_quorum = lambda: (fm.fns[STATE_DICT_KEY][0](sd), setattr(fm, "on_quorum", None))
    window(w1, w2, opt)
    assert fm.calls.count("start_quorum") == 2 and len(fm.sent) == 2
    assert not fm.sent[0].any() and not fm.sent[1].any()
    assert opt.local_sgd.ft.healed == 1
    # The mean over contributors is the peer's progress (PEER_PROGRESS) for both groups.
    for i, w in enumerate((w1, w2)):
        phi = sd["state"][i]["lookahead_slow"] + ALPHA * PEER_PROGRESS  # beta = 0: phi - alpha * d
        torch.testing.assert_close(w.detach(), phi, rtol=1e-12, atol=1e-12)


def test_nonfinite_average_skips_the_outer_step_everywhere():
    fm = FakeManager(peer=torch.tensor([float("nan"), 0.0, 0.0], dtype=torch.float64))
    w, opt, _ = build(fm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_window(w, opt, GRADS[:2])
    assert fm.calls[-1] == "should_commit"
    torch.testing.assert_close(w.detach(), W0, rtol=0, atol=0)
    torch.testing.assert_close(opt.slow_weight(w), W0, rtol=0, atol=0)
    assert opt.nonfinite_syncs == 1
    assert any("averaged pseudo-gradient" in str(c.message) for c in caught)


def test_buffers_are_averaged_over_contributors():
    fm = FakeManager(peer=None, participants=1)  # alone in the quorum
    model = torch.nn.BatchNorm1d(2).double()
    w = torch.nn.Parameter(W0.clone())
    opt = Lookahead(torch.optim.SGD([w], lr=LR), k=1, alpha=1.0,
                    local_sgd=LocalSGDOptions(manager=fm.m, module=model))
    model.running_mean.fill_(3.0)
    w.grad = GRADS[0].clone()
    opt.step()
    # One participant with weight 1: the average is its own value; alpha=1, beta=0: phi = theta.
    torch.testing.assert_close(model.running_mean, torch.full((2,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(w.detach(), W0 - LR * GRADS[0], rtol=1e-12, atol=1e-12)
    assert fm.sent[0].numel() == 3 + 2 + 2 + 1  # progress, running_mean, running_var, weight


def test_one_manager_per_lookahead():
    fm = FakeManager()
    w1, opt1, _ = build(fm)
    run_window(w1, opt1, GRADS[:1])
    w2 = torch.nn.Parameter(W0.clone())
    opt2 = Lookahead(torch.optim.SGD([w2], lr=LR), k=K, alpha=ALPHA, local_sgd=LocalSGDOptions(manager=fm.m))
    w2.grad = GRADS[0].clone()
    with pytest.raises(ValueError, match="already has a state dict registered under 'lookahead'"):
        opt2.step()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sharded=True), ValueError, "sharded=True` is not supported with a torchft `manager`"),
    (dict(comm_dtype=torch.bfloat16), ValueError, "comm_dtype=torch.bfloat16` is not supported"),
    (dict(process_group=object()), ValueError, "`process_group` cannot be combined with `manager`"),
    (dict(num_fragments=2), ValueError, "`num_fragments=2` is not supported with a torchft `manager`"),
    (dict(timeout=5.0), ValueError, "`timeout=5.0` is not supported .* timeouts on the Manager"),
])
def test_unsupported_options_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LocalSGDOptions(manager=FakeManager().m, **kwargs)


def test_manager_must_look_like_a_manager():
    with pytest.raises(TypeError, match="must be a torchft.Manager, got str"):
        LocalSGDOptions(manager="localhost:29510")
