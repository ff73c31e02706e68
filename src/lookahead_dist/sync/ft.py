r"""Fault-tolerant local SGD: the Lookahead sync through a torchft ``Manager``.

``Lookahead(inner, k, alpha, local_sgd=LocalSGDOptions(manager=m))`` with ``m`` a
``torchft.Manager`` makes every k-th step a fault-tolerant outer step across *replica groups*
(each may be one process, with no default ``torch.distributed`` process group). A replica group
that dies is dropped from the next quorum and the others go on without it; one that is restarted
joins a later quorum and heals from a live peer. See ``docs/fault-tolerance.md`` for a measured
run and how to launch one.

Note [The managed sync]
-----------------------
At the k-th step of a unit, on every live replica group:

1. ``m.start_quorum()``: agree on the participants. A group that is behind (a restarted one)
   *heals* here: the manager fetches a live peer's registered state over HTTP and calls our
   load function (and the user's, for the model), so it now holds that peer's fast weights,
   slow weights, outer momentum, counters and inner optimizer state.
2. Each group packs its *progress* :math:`\theta_i - \phi` (flat, per device and dtype) with one
   extra element, its weight :math:`w_i` (1, or 0 for a group that has healed since the unit's
   last sync: its window was spent on stale weights and its fast weights are now a copy of its
   source's; this holds for every param group of the Lookahead, not only the one whose quorum
   healed), and
   ``m.allreduce`` averages the packs over the participants. The ratio of the two averages is
   the mean progress of the groups that did the window's work,
   :math:`\sum_i w_i(\theta_i - \phi) / \sum_i w_i`, whatever the number of participants or
   healers; no other collective is needed.
3. ``m.should_commit()``, before any slow weight changes. On ``True`` the outer step of
   Note [The outer step] in :mod:`~lookahead_dist.sync._outer` (alpha, ``outer_momentum``,
   ``nesterov``) with :math:`d = \phi - \text{mean}`, then :math:`\theta \leftarrow \phi` and the
   host's pullback/reset. On ``False`` (a peer died in the all-reduce, too few replicas, any
   error the manager saw) the k-step window is discarded: :math:`\theta \leftarrow \phi`, slow
   weights and outer momentum untouched, inner optimizer state kept (as torchft's own
   ``DiLoCo`` does); the next sync forms a new quorum. A group whose commit failed while others
   committed is one step behind and heals at the next quorum.

The averaged buffer is the same on every participant, so the non-finite guard (Note
[Non-finite syncs] in ``lookahead.py``) checks it after a successful commit and every group skips
the outer update together.

Note [Who reads the registered state, and when]
-----------------------------------------------
The Lookahead registers ``state_dict``/``load_state_dict`` under the key ``"lookahead"`` with
``m.register_state_dict_fn``, lazily at its first ``step()`` (the strategy is built before the
optimizer it serves). The manager calls them only inside ``start_quorum`` (the quorum thread; in
the recommended ``use_async_quorum=False`` the main thread waits there, and with the async quorum
this strategy waits for it with ``wait_quorum()`` before reading any state). Its HTTP transport
then serves the *live* CPU tensors until ``should_commit`` closes it; this strategy writes no
state between ``start_quorum`` and ``should_commit``, and the inner steps happen outside any
quorum. So ``disallow_state_dict_read``/``allow_state_dict_read`` (which torchft's ``DiLoCo``
needs because its quorum overlaps inner steps) are not needed and not called.

What is not supported: ``sharded=True`` (torchft's gloo process group has no reduce-scatter, and
sharded slow weights across replica groups would make healing from one peer impossible);
``process_group``/``intra_group`` (the manager's process group replaces them); ``comm_dtype``
other than float32; streaming (``num_fragments``, ``fragments``, ``fragment_sync_delay``,
``fragment_update_alpha``); ``outer_optimizer``; ``timeout`` (the manager's and its process
group's timeouts apply).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import _sync
from .._comm import CommStats
from .._keys import OUTER_MOMENTUM_KEY, SLOW_KEY
from .._sync import local_tensor
from ._outer import outer_step_
from .base import SyncHost, SyncStrategy
from .options import check_manager_options

if TYPE_CHECKING:
    from .options import LocalSGDOptions

__all__ = ["STATE_DICT_KEY", "FTStats", "FaultTolerantLocalSGD", "check_options"]

#: Key under which a Lookahead registers its state with the manager.
STATE_DICT_KEY = "lookahead"

#: The checks ``LocalSGDOptions(manager=...)`` runs (they live with the options).
check_options = check_manager_options


@dataclass
class FTStats:
    """What the managed syncs did, and where their time went (seconds, this process's clock)."""

    syncs: int = 0
    committed: int = 0
    discarded: int = 0  #: failed commits: the window was dropped (fast <- slow)
    healed: int = 0  #: syncs at which this group loaded a peer's state
    quorum_s: float = 0.0  #: total time in start_quorum (waiting for peers, healing)
    allreduce_s: float = 0.0
    commit_s: float = 0.0
    last_quorum_s: float = 0.0
    last_sync_s: float = 0.0


@dataclass
class _Pack:
    """One flat all-reduce buffer: progress of parameters, then buffers, then (first pack) a weight."""

    flat: torch.Tensor
    param_idx: list[int]   # indices into the unit's params, in pack order
    buffers: list[torch.Tensor]
    param_views: list[torch.Tensor]
    buffer_views: list[torch.Tensor]


class FaultTolerantLocalSGD(SyncStrategy):
    """Local SGD whose sync goes through a ``torchft.Manager`` (Note [The managed sync]).

    Built by ``Lookahead(..., local_sgd=LocalSGDOptions(manager=m, outer_momentum=...,
    nesterov=..., module=...))``. ``opt.local_sgd.stats`` counts the bytes all-reduced;
    ``opt.local_sgd.ft`` (:class:`FTStats`) counts commits, discarded windows and heals.

    The user registers only the model with the manager (``m.register_state_dict_fn("model",
    model.load_state_dict, model.state_dict)``, as in torchft's examples); the Lookahead
    registers its own state. A group that heals takes its peer's weights at the next sync even
    without the model registered, but buffers and anything outside the optimizer need it.
    """

    communicates = True

    # Pickling drops the manager (sockets, threads) and the options holding it (SyncStrategy.__getstate__).
    _unpicklable = ("manager", "options", "_host")

    def __init__(self, options: LocalSGDOptions) -> None:
        if options.manager is None:  # LocalSGDOptions(manager=...) checked everything else already
            check_manager_options(options)
        self.options = options
        self.manager = options.manager
        self.beta = options.outer_momentum
        self.nesterov = options.nesterov
        self.stats = CommStats()
        self.ft = FTStats()
        self._host: SyncHost | None = None
        self._healed_now = False
        # ids of the units (first tensors) whose current window predates a heal: weight 0 at their next sync
        self._stale: set[int] = set()

    # -- state ---------------------------------------------------------------------------------
    def new_entry(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        slow = local_tensor(p).detach().to(dtype=dtype, copy=True)
        entry = {SLOW_KEY: slow}
        if self.beta > 0:  # allocated now: a state-dict template made before the first sync has it
            entry[OUTER_MOMENTUM_KEY] = torch.zeros_like(slow)
        return entry

    def expected_shape(self, p: torch.Tensor) -> torch.Size:
        return local_tensor(p).shape

    def restore_entry(self, p: torch.Tensor, saved: dict[str, Any], dtype: torch.dtype,
                      name: str) -> dict[str, Any]:
        out = super().restore_entry(p, saved, dtype, name)
        key = OUTER_MOMENTUM_KEY
        if self.beta > 0 and key in saved:
            out[key] = self._restore_tensor(p, saved[key], dtype, name, key)
        return out

    # -- registration with the manager ---------------------------------------------------------
    def _bind(self, host: SyncHost) -> None:
        if self._host is host:
            return
        if self._host is not None:
            raise RuntimeError("a FaultTolerantLocalSGD strategy serves one Lookahead; build one per optimizer")
        if not (callable(getattr(host, "state_dict", None)) and callable(getattr(host, "load_state_dict", None))):
            raise TypeError(f"FaultTolerantLocalSGD needs a host with state_dict/load_state_dict (a Lookahead), "
                            f"got {type(host).__name__}")
        try:
            self.manager.register_state_dict_fn(STATE_DICT_KEY, self._load, host.state_dict)  # type: ignore[attr-defined]
        except AssertionError as e:  # torchft asserts on a duplicate key
            raise ValueError(f"the torchft Manager already has a state dict registered under {STATE_DICT_KEY!r}: "
                             "use one Manager per Lookahead (put several parameter sets in param groups of "
                             "one Lookahead)") from e
        self._host = host

    def _load(self, state_dict: dict[str, Any]) -> None:
        """Called by the manager while healing this group from a peer."""
        assert self._host is not None
        self._host.load_state_dict(state_dict)  # type: ignore[attr-defined]
        self._healed_now = True
        # Every unit's fast weights are now the peer's: a unit that syncs later (another param
        # group, maybe another k) would send progress the peer already counts.
        self._stale = {id(g["params"][0]) for g in self._host.param_groups if g["params"]}

    # -- the sync ------------------------------------------------------------------------------
    def advance(self, host: SyncHost, params: list[torch.Tensor], n: int, k: int, alpha: float) -> None:
        self._bind(host)  # before the first quorum, which may serve or load our state
        if n >= k:
            self.sync(host, params, alpha)

    @torch.no_grad()
    def sync(self, host: SyncHost, params: list[torch.Tensor], alpha: float) -> None:
        """One managed sync of ``params`` (Note [The managed sync]); every live group calls it."""
        self._bind(host)
        m, ft = self.manager, self.ft
        t0 = time.perf_counter()
        self._healed_now = False
        m.start_quorum()
        wait = getattr(m, "wait_quorum", None)
        if callable(wait):  # async quorum: the heal/serve must be over before we read state
            wait()
        t1 = time.perf_counter()
        healed = self._healed_now
        stale = id(params[0]) in self._stale
        first_unit = bool(host.param_groups) and params is host.param_groups[0]["params"]
        buffers = [b for b in self.options.buffer_list() if b.is_floating_point()] if first_unit else []
        packs = self._pack(host, params, buffers, weight=0.0 if stale else 1.0)
        works = []
        for pk in packs:
            works.append(m.allreduce(pk.flat))
            self.stats.record("all_reduce", "params", pk.flat.numel() * pk.flat.element_size(),
                              _participants(m))
        for w in works:
            w.wait()
        t2 = time.perf_counter()
        committed = bool(m.should_commit())
        t3 = time.perf_counter()
        # A heal under the async quorum happens inside should_commit: read the state only now.
        healed = healed or self._healed_now
        self._stale.discard(id(params[0]))
        fast = [local_tensor(p) for p in params]
        entries = [host.state_entry(p) for p in params]
        slow = [local_tensor(e[SLOW_KEY]) for e in entries]
        weight = float(packs[0].flat[-1]) if committed else 0.0
        ft.syncs += 1
        ft.healed += healed
        ft.quorum_s += t1 - t0
        ft.allreduce_s += t2 - t1
        ft.commit_s += t3 - t2
        ft.last_quorum_s = t1 - t0
        if not committed or not weight > 0.0:
            # The window is dropped; the next sync forms a new quorum (a group left behind heals).
            _sync.copy_(fast, slow)
            ft.discarded += 1
            ft.last_sync_s = time.perf_counter() - t0
            return
        ft.committed += 1
        d_all: list[torch.Tensor] = []
        for pk in packs:
            body = pk.flat[:-1] if pk is packs[0] else pk.flat
            body.div_(weight)  # mean over the groups that did the work
            d = pk.param_views
            if d:
                torch._foreach_neg_(d)  # d = phi - mean_i theta_i
            d_all += d + pk.buffer_views
        bad = _sync.first_nonfinite(d_all)
        if bad is not None:  # the same on every participant: all skip together
            _sync.copy_(fast, slow)
            host.on_nonfinite(params, f"averaged pseudo-gradient (tensor {bad} of the sync, shape "
                                      f"{tuple(d_all[bad].shape)})")
            ft.last_sync_s = time.perf_counter() - t0
            return
        for pk in packs:
            if pk.param_idx:
                s = [slow[i] for i in pk.param_idx]
                mom = [_momentum(entries[i], slow[i]) for i in pk.param_idx] if self.beta > 0 else []
                outer_step_(s, mom, pk.param_views, alpha, self.beta, self.nesterov)
            if pk.buffers:
                _sync.copy_(pk.buffers, [v.view_as(b) for v, b in zip(pk.buffer_views, pk.buffers)])
        _sync.copy_(fast, slow)
        host.on_synced(params, alpha)
        ft.last_sync_s = time.perf_counter() - t0

    def _pack(self, host: SyncHost, params: list[torch.Tensor], buffers: list[torch.Tensor],
              weight: float) -> list[_Pack]:
        """Flat buffers of (progress theta - phi, buffers) per (device, dtype); the first ends with ``weight``."""
        groups: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
        fast = [local_tensor(p) for p in params]
        slow = [local_tensor(host.state_entry(p)[SLOW_KEY]) for p in params]
        for i, s in enumerate(slow):
            groups.setdefault((fast[i].device, s.dtype), ([], []))[0].append(i)
        for b in buffers:
            groups.setdefault((b.device, b.dtype), ([], []))[1].append(b)
        packs = []
        for j, ((device, dtype), (idx, bufs)) in enumerate(groups.items()):
            sizes = [fast[i].numel() for i in idx] + [b.numel() for b in bufs]
            extra = 1 if j == 0 else 0
            flat = torch.empty(sum(sizes) + extra, dtype=dtype, device=device)
            views = list(flat.split(sizes + [extra] if extra else sizes))
            pv, bv = views[:len(idx)], views[len(idx):len(idx) + len(bufs)]
            if weight == 0.0:
                flat.zero_()  # a healed group contributes nothing but its presence
            else:
                if idx:
                    _sync.copy_(pv, [fast[i].reshape(-1) for i in idx])
                    torch._foreach_sub_(pv, [slow[i].reshape(-1) for i in idx])
                if bufs:
                    _sync.copy_(bv, [b.detach().reshape(-1) for b in bufs])
                if extra:
                    flat[-1] = weight
            packs.append(_Pack(flat, idx, bufs, pv, bv))
        if not packs:  # nothing to send but the weight: still one all-reduce, so every group agrees
            flat = torch.full((1,), weight, dtype=torch.float32)
            packs.append(_Pack(flat, [], [], [], []))
        return packs


def _momentum(entry: dict[str, Any], slow: torch.Tensor) -> torch.Tensor:
    key = OUTER_MOMENTUM_KEY
    if key not in entry:
        entry[key] = torch.zeros_like(slow)
    return local_tensor(entry[key])


def _participants(manager: Any) -> int:
    try:
        n = manager.num_participants()
    except Exception:  # noqa: BLE001 - only for the byte estimate
        return 1
    return n if isinstance(n, int) and not math.isnan(n) else 1
