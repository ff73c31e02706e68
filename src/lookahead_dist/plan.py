r"""A cost model of one training step, and a planner that picks k, F, tau and the wire format.

The model predicts the time of one inner step as compute plus the *exposed* part of each
collective (the part no computation runs beside), from nothing but the link's bandwidth and
latency, the parameter count and the step time measured without communication. It is what
``lookahead-dist plan`` prints and what ``benchmarks/plan_projection.py`` projects to large
clusters (docs/benchmarks.md, "Scaling: the cost model").

Note [Alpha-beta collectives]
-----------------------------
A message of ``b`` bytes over a link of bandwidth :math:`\beta` (bytes/s, each direction) and
latency :math:`\alpha` (s) takes :math:`\alpha + b / \beta`. The collectives over ``n`` ranks, as the
bandwidth-optimal ring algorithms run them (the same per-rank wire bytes as the library's own
counter, Note [Payload and wire bytes] of :mod:`lookahead_dist._comm`), with a payload of ``S``
bytes:

.. math::
    \begin{aligned}
    T_\text{all-reduce}(S)     &= 2 (n-1)\,\alpha + \tfrac{2 (n-1)}{n}\, S / \beta \\
    T_\text{reduce-scatter}(S) &= T_\text{all-gather}(S) = (n-1)\,\alpha + \tfrac{n-1}{n}\, S / \beta \\
    T_\text{all-to-all}(S)     &= (n-1)\,\alpha + \tfrac{n-1}{n}\, S / \beta
    \end{aligned}

so a reduce-scatter followed by an all-gather costs one all-reduce.

**Quantised mean** (``comm_dtype="int8"/"int4"/"int2"``, :func:`lookahead_dist._quant.quantized_all_reduce`):
``m`` values are padded to ``n C`` with :math:`C = \lceil m / (n B) \rceil B` (``B`` values per
fp32 scale, default 512); each rank's chunk is a segment of
:math:`s = C\,\text{bits}/8 + 4\,C/B` bytes; an all-to-all and an all-gather of ``n`` segments:

.. math::
    T_\text{qmean} = 2 (n-1)\,\alpha + 2 (n-1)\, s / \beta

(about ``bits / 32 * (1 + 32 / (bits B))`` of an fp32 all-reduce's bytes).

**Sparse all-gather** (``topk_fraction=f``, :func:`lookahead_dist._sparse.sparse_all_reduce`,
the encoding of :func:`lookahead_dist._sparse.sparse_nbytes`): ``m`` values are padded to
:math:`P = \lceil m / G \rceil G` (``G = 2048`` values per fp32 scale); in every index block of 256
values the :math:`k_b = \text{clamp}(\text{round}(256 f), 1, 256)` largest are sent, each with a
1-byte index and ``bits`` (8, 4 or 2, from ``comm_dtype``) of value. One rank's payload:

.. math::
    S = 4\,P / G + \tfrac{P}{256}\, k_b + \tfrac{P}{256}\, k_b\, \text{bits} / 8
    \quad\text{bytes} \;(\approx k_b (8 + \text{bits}) / 256 + 32 / G \text{ bits per value})

(0.2109 bits per value at ``f = 0.02``, int2). Sparse values cannot be summed on the way, so the
payloads are all-gathered: every rank receives the other ``n - 1`` (ring all-gather):

.. math::
    T_\text{sparse} = (n-1)\,\alpha + (n-1)\, S / \beta

It grows with ``n`` where the all-reduce does not.

**Hierarchical** (``N`` nodes of ``R`` ranks; the inter-node link is the node's, shared by its
``R`` ranks; the intra-node link :math:`(\alpha_i, \beta_i)`): an all-reduce of ``S`` bytes over all
``N R`` ranks is a reduce-scatter inside the node, ``R`` concurrent all-reduces of ``S / R``
across nodes (one per local rank, all through the node's link) and an all-gather inside the node:

.. math::
    T_\text{hier}(S) = 2 (R-1)\,\alpha_i + \tfrac{2 (R-1)}{R}\, S / \beta_i
                     + 2 (N-1)\,\alpha + \tfrac{2 (N-1)}{N}\, S / \beta

The node's link carries :math:`\tfrac{2 (N-1)}{N} S` whatever ``R`` is.

Note [Step model]
-----------------
With ``t`` the inner step's time without communication:

- **DDP** all-reduces the gradients (``g`` bytes per value, fp32 by default) every step; the
  all-reduce overlaps the backward pass up to the share ``o`` of the step (default 2/3: backward is
  4 of the 6 FLOPs per parameter and token):

  .. math:: t_\text{DDP} = t + \max(0,\ T(P g) - o\,t)

- **Local SGD** (k, F fragments, delay tau): every ``k / F`` steps one fragment of ``P / F``
  values is averaged (its transfer :math:`T_F`); the transfer overlaps the tau inner steps before
  the result is applied (tau = 0: blocking). Per k steps:

  .. math::
      t_\text{LSGD} = t + \frac{F}{k} \max(0,\ T_F - \tau\, t) + \max(0,\ T^\text{intra}_\text{DDP} - o\,t)

  where the last term is the DDP all-reduce *inside* a node (hierarchical, ``R > 1``). With
  ``R > 1`` the fragment's transfer is the hierarchical-sharded sync: each local rank carries
  ``1 / R`` of the fragment across nodes (all ``R`` through the node's link, so each at
  :math:`\beta / R`), then the node all-gathers the fragment's fp32 weights (eager updates and
  top-k too: each local rank all-gathers across nodes the sparse payload of its chunk).

- **Eager updates** (``eager_update=True``, Note [Eager outer updates] in
  :mod:`lookahead_dist.sync._outer`; tau = 0 only): a fragment's collective, launched at the
  fragment's sync, is applied at that fragment's *next* sync, k steps later. The F fragments'
  transfers share the link, so in steady state it must carry one fragment per ``k / F`` steps:
  the window that binds is :math:`(k / F)\, t` (for F = 1 it is the whole k steps):

  .. math:: t_\text{eager} = t + \frac{F}{k} \max\big(0,\ T_F - \tfrac{k}{F}\, t\big) + \max(0,\ T^\text{intra}_\text{DDP} - o\,t)

  (with latency only, :math:`T_F` would have the whole :math:`k\,t`; the throughput bound is the
  tighter one). ``eager_update="naive"`` has the same cost and is not modelled separately.

- **Utilisation** is the fraction of the no-communication throughput: :math:`t / t_\text{mode}`.

What the model leaves out: the loss cost of staleness, quantisation, top-k and eager updates
(hence :func:`plan`'s order of preference); compute slowed by communication sharing the device
or CPU (on the 2-core test machine gloo's threads compete with training), stragglers,
topology-aware (tree) algorithms, congestion, encoding/decoding time, and the outer step's own
time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_INTRA_LINK",
    "DEFAULT_K_CHOICES",
    "DEFAULT_TOPK_FRACTIONS",
    "SPARSE_FORMATS",
    "WIRE_FORMATS",
    "Cost",
    "Link",
    "Cluster",
    "Workload",
    "Option",
    "Prediction",
    "Plan",
    "ring_all_reduce",
    "reduce_scatter",
    "all_gather",
    "all_to_all",
    "quantized_mean",
    "sparse_all_gather",
    "sparse_payload_bytes",
    "hierarchical_all_reduce",
    "value_bytes",
    "predict",
    "plan",
    "parse_count",
    "parse_rate",
    "parse_seconds",
    "step_time_from_mfu",
    "config_blocks",
    "render",
]

#: Wire formats of the local-SGD sync, most precise first (the order of preference).
WIRE_FORMATS = ("fp32", "bf16", "int8", "int4", "int2")
_BITS = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4, "int2": 2}
_SCALE_BYTES = 4      # one fp32 scale per block (lookahead_dist._quant)
_SPARSE_INDEX_BLOCK = 256   # values per top-k selection, a 1-byte index each (lookahead_dist._sparse)
_SPARSE_SCALE_BLOCK = 2048   # values per fp32 scale of the sparse values (lookahead_dist._sparse)
#: Wire formats whose bits the sparse (top-k) values can take (``topk_fraction`` needs one).
SPARSE_FORMATS = ("int8", "int4", "int2")
#: ``topk_fraction`` values tried by :func:`plan`, largest (most precise) first.
DEFAULT_TOPK_FRACTIONS = (0.03, 0.02, 0.01)
#: k tried by :func:`plan` when k is not fixed.
DEFAULT_K_CHOICES = (8, 16, 32, 64, 128, 256, 512)


# -- inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One link: ``bandwidth`` bytes/s in each direction, ``latency`` seconds per message."""

    bandwidth: float
    latency: float = 1e-3

    def __post_init__(self) -> None:
        if not (0.0 < self.bandwidth < math.inf):
            raise ValueError(f"Link `bandwidth` must be a positive number of bytes/s, got {self.bandwidth!r}")
        if not (0.0 <= self.latency < math.inf):
            raise ValueError(f"Link `latency` must be a number of seconds >= 0, got {self.latency!r}")

    def time(self, nbytes: float, rounds: float) -> float:
        """:math:`\\text{rounds}\\,\\alpha + \\text{nbytes} / \\beta`."""
        return rounds * self.latency + nbytes / self.bandwidth


#: Default intra-node link (hierarchical set-ups): 100 GB/s, 10 us (an NVLink-class node; a
#: PCIe-only node is nearer 25 GB/s).
DEFAULT_INTRA_LINK = Link(100e9, 10e-6)


@dataclass(frozen=True)
class Cluster:
    """``nodes`` nodes of ``ranks_per_node`` ranks; ``link`` is each node's inter-node link."""

    nodes: int
    link: Link
    ranks_per_node: int = 1
    intra_link: Link = DEFAULT_INTRA_LINK

    def __post_init__(self) -> None:
        for name in ("nodes", "ranks_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Cluster `{name}` must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class Workload:
    """The model and its step: ``params`` values, ``step_time`` seconds per inner step measured
    without communication; DDP's gradients travel as ``ddp_dtype`` and its all-reduce overlaps
    the share ``ddp_overlap`` of the step; ``block_size`` values per scale for int8/int4/int2."""

    params: int
    step_time: float
    ddp_overlap: float = 2.0 / 3.0
    ddp_dtype: str = "fp32"
    block_size: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.params, bool) or not isinstance(self.params, int) or self.params < 1:
            raise ValueError(f"Workload `params` must be an integer >= 1, got {self.params!r}")
        if not (0.0 < self.step_time < math.inf):
            raise ValueError(f"Workload `step_time` must be a positive number of seconds, got {self.step_time!r}")
        if not (0.0 <= self.ddp_overlap <= 1.0):
            raise ValueError(f"Workload `ddp_overlap` must be in [0, 1], got {self.ddp_overlap!r}")
        if self.ddp_dtype not in ("fp32", "bf16"):
            raise ValueError(f"Workload `ddp_dtype` must be 'fp32' or 'bf16', got {self.ddp_dtype!r}")
        if self.block_size < 2 or self.block_size % 4:
            raise ValueError(f"Workload `block_size` must be a multiple of 4 (int2 packs four codes per byte), "
                             f"got {self.block_size!r}")


@dataclass(frozen=True)
class Option:
    """One configuration: ``mode`` "ddp" (k = 1, F = 1, tau = 0, fp32) or "local_sgd".

    ``eager_update=True`` (:class:`~lookahead_dist.LocalSGDOptions`' ``eager_update``) needs
    ``fragment_sync_delay == 0``; ``topk_fraction`` needs ``comm_dtype`` int8, int4 or int2 (the
    bits of the sent values), as the library requires."""

    mode: Literal["ddp", "local_sgd"] = "local_sgd"
    k: int = 1
    num_fragments: int = 1
    fragment_sync_delay: int = 0
    comm_dtype: str = "fp32"
    eager_update: bool = False          # LocalSGDOptions(eager_update=True)
    topk_fraction: float | None = None  # LocalSGDOptions(topk_fraction=...)

    def __post_init__(self) -> None:
        if self.mode not in ("ddp", "local_sgd"):
            raise ValueError(f"Option `mode` must be 'ddp' or 'local_sgd', got {self.mode!r}")
        if self.comm_dtype not in _BITS:
            raise ValueError(f"Option `comm_dtype` must be one of {WIRE_FORMATS}, got {self.comm_dtype!r}")
        k, f, tau = self.k, self.num_fragments, self.fragment_sync_delay
        if min(k, f) < 1 or tau < 0 or k % f or (tau >= k // f and not (f == 1 and tau == 0)):
            raise ValueError(f"Option needs k >= 1, F dividing k and 0 <= tau < k / F; got k={k}, F={f}, tau={tau}")
        if self.topk_fraction is not None and not (0.0 < self.topk_fraction <= 1.0):
            raise ValueError(f"Option `topk_fraction` must be in (0, 1] or None, got {self.topk_fraction!r}")
        if self.topk_fraction is not None and self.comm_dtype not in SPARSE_FORMATS:
            raise ValueError(f"Option `topk_fraction` needs `comm_dtype` in {SPARSE_FORMATS} (the bits of the sent "
                             f"values), got {self.comm_dtype!r}")
        if not isinstance(self.eager_update, bool):
            raise TypeError(f"Option `eager_update` must be a bool, got {self.eager_update!r}")
        if self.eager_update and (self.mode != "local_sgd" or tau != 0):
            raise ValueError(f"Option `eager_update=True` needs local SGD with fragment_sync_delay=0 (the collective "
                             f"is applied at the fragment's next sync), got mode={self.mode!r}, tau={tau}")

    @property
    def available(self) -> bool:
        """Always True: every option of the model exists in the library (kept for ``--json``)."""
        return True

    def describe(self) -> str:
        if self.mode == "ddp":
            return "DDP"
        if self.eager_update:
            kind = "eager"
        else:
            kind = "blocking" if self.fragment_sync_delay == 0 and self.num_fragments == 1 else "streaming"
        sparse = f"top-{100 * self.topk_fraction:g}% " if self.topk_fraction is not None else ""
        return f"local SGD {sparse}{kind}"


# -- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """One collective (or a sequence of them): ``seconds``, bytes one rank sends (``rank_bytes``)
    and bytes through one node's inter-node link (``node_bytes``)."""

    seconds: float = 0.0
    rank_bytes: float = 0.0
    node_bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, self.rank_bytes + other.rank_bytes, self.node_bytes + other.node_bytes)


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for one :class:`Option` (Note [Step model])."""

    option: Option
    step_seconds: float           # per inner step: compute + exposed communication
    exposed_seconds: float        # per inner step
    sync_seconds: float           # one sync (DDP: one step's all-reduce; local SGD: one fragment) on the link
    utilization: float            # fraction of the no-communication throughput
    bytes_per_step: float         # bytes one rank sends per step (all its collectives, ring model)
    node_bytes_per_step: float    # bytes through one node's inter-node link per step

    def as_dict(self, recommended: bool = False) -> dict:
        """The ``--json`` object of ``lookahead-dist plan``."""
        o = self.option
        return {
            "mode": o.mode, "k": o.k, "num_fragments": o.num_fragments,
            "fragment_sync_delay": o.fragment_sync_delay, "comm_dtype": o.comm_dtype,
            "eager_update": o.eager_update, "topk_fraction": o.topk_fraction,
            "utilization": round(self.utilization, 6), "bytes_per_step": round(self.bytes_per_step),
            "node_bytes_per_step": round(self.node_bytes_per_step),
            "sync_seconds": round(self.sync_seconds, 6), "step_seconds": round(self.step_seconds, 6),
            "available": o.available, "recommended": recommended,
        }


@dataclass(frozen=True)
class Plan:
    """:func:`plan`'s answer: every option considered (DDP first) and the recommended one."""

    workload: Workload
    cluster: Cluster
    options: tuple[Prediction, ...]
    recommended: Prediction
    best_local_sgd: Prediction
    target: float
    notes: tuple[str, ...] = field(default=())

    @property
    def ddp(self) -> Prediction:
        return self.options[0]


# -- the collectives (Note [Alpha-beta collectives]) ----------------------------------------------
def ring_all_reduce(nbytes: float, n: int, link: Link) -> Cost:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks: :math:`2(n-1)\\alpha + 2(n-1)/n \\cdot S/\\beta`."""
    if n <= 1:
        return Cost()
    wire = 2.0 * (n - 1) / n * nbytes
    return Cost(link.time(wire, 2 * (n - 1)), wire, wire)


def reduce_scatter(nbytes: float, n: int, link: Link) -> Cost:
    """Ring reduce-scatter of an ``nbytes`` input: :math:`(n-1)\\alpha + (n-1)/n \\cdot S/\\beta`."""
    if n <= 1:
        return Cost()
    wire = (n - 1) / n * nbytes
    return Cost(link.time(wire, n - 1), wire, wire)


def all_gather(nbytes: float, n: int, link: Link) -> Cost:
    """Ring all-gather of an ``nbytes`` output: :math:`(n-1)\\alpha + (n-1)/n \\cdot S/\\beta`."""
    return reduce_scatter(nbytes, n, link)


def all_to_all(nbytes: float, n: int, link: Link) -> Cost:
    """All-to-all of an ``nbytes`` input per rank (pairwise, ``n - 1`` rounds)."""
    return reduce_scatter(nbytes, n, link)


def quantized_mean(numel: int, n: int, link: Link, *, bits: int, block_size: int = 512) -> Cost:
    """The int8/int4/int2 reduce of :mod:`lookahead_dist._quant`: all-to-all + all-gather of ``n``
    segments of ``C bits/8 + 4 C/B`` bytes, ``C = ceil(numel / (n B)) B``."""
    if n <= 1:
        return Cost()
    chunk = -(-numel // (n * block_size)) * block_size
    seg = chunk * bits // 8 + _SCALE_BYTES * (chunk // block_size)
    return all_to_all(n * seg, n, link) + all_gather(n * seg, n, link)


def sparse_payload_bytes(numel: int, *, fraction: float, bits: int,
                         scale_block: int = _SPARSE_SCALE_BLOCK) -> int:
    """One rank's top-k payload for ``numel`` values, as :func:`lookahead_dist._sparse.sparse_nbytes`
    lays it out: ``numel`` padded to ``P``, a multiple of ``scale_block``; per index block of 256,
    ``k_b = clamp(round(256 fraction), 1, 256)`` values of ``bits`` each and a 1-byte index; one
    fp32 scale per ``scale_block``: ``4 P / G + (P / 256) k_b (1 + bits / 8)``."""
    if not (0.0 < fraction <= 1.0) or bits not in (8, 4, 2):
        raise ValueError(f"sparse_payload_bytes needs fraction in (0, 1] and bits 8, 4 or 2, got {fraction!r}, {bits!r}")
    kb = min(_SPARSE_INDEX_BLOCK, max(1, round(fraction * _SPARSE_INDEX_BLOCK)))
    padded = -(-numel // scale_block) * scale_block
    rows = padded // _SPARSE_INDEX_BLOCK
    return _SCALE_BYTES * (padded // scale_block) + rows * kb + rows * kb * bits // 8


def sparse_all_gather(numel: int, n: int, link: Link, *, fraction: float, bits: int,
                      scale_block: int = _SPARSE_SCALE_BLOCK) -> Cost:
    """The top-k exchange of :mod:`lookahead_dist._sparse`: a ring all-gather of every rank's
    payload ``S`` (:func:`sparse_payload_bytes`): :math:`(n-1)\\alpha + (n-1) S / \\beta`."""
    if n <= 1:
        return Cost()
    payload = sparse_payload_bytes(numel, fraction=fraction, bits=bits, scale_block=scale_block)
    return all_gather(n * payload, n, link)


def hierarchical_all_reduce(nbytes: float, cluster: Cluster) -> Cost:
    """Reduce-scatter in the node, ``R`` concurrent all-reduces of ``S / R`` across nodes sharing
    the node's link, all-gather in the node. ``node_bytes`` = :math:`2(N-1)/N \\cdot S`."""
    r, intra = cluster.ranks_per_node, cluster.intra_link
    inside = reduce_scatter(nbytes, r, intra) + all_gather(nbytes, r, intra)
    inside = Cost(inside.seconds, inside.rank_bytes, 0.0)  # stays inside the node
    across = _across_nodes(ring_all_reduce, nbytes, cluster)
    return inside + across


def _shared(cluster: Cluster) -> Link:
    """The node's link as one of its ``R`` concurrent users sees it."""
    link = cluster.link
    return Link(link.bandwidth / cluster.ranks_per_node, link.latency)


def _across_nodes(collective, nbytes: float, cluster: Cluster) -> Cost:
    r = cluster.ranks_per_node
    c = collective(nbytes / r, cluster.nodes, _shared(cluster))
    return Cost(c.seconds, c.rank_bytes, c.node_bytes * r)


def value_bytes(comm_dtype: str, block_size: int = 512) -> float:
    """Bytes per value on the wire, scales included: 4, 2, 1 + 4/B, 0.5 + 4/B, 0.25 + 4/B."""
    bits = _BITS[comm_dtype]
    return bits / 8 + (_SCALE_BYTES / block_size if bits < 16 else 0.0)


# -- one option -----------------------------------------------------------------------------------
def _fragment_sync(option: Option, workload: Workload, cluster: Cluster) -> Cost:
    """One fragment's average across nodes (+ the node's all-gather when ``R > 1`` and sharded)."""
    r, n = cluster.ranks_per_node, cluster.nodes
    numel = -(-workload.params // option.num_fragments)
    # hierarchical-sharded: local rank r carries chunk r across nodes (top-k too: its payload for
    # chunk r), then the node all-gathers the new chunks
    sharded = r > 1
    per_rank = -(-numel // r) if sharded else numel
    link = _shared(cluster)
    bits = _BITS[option.comm_dtype]
    if option.topk_fraction is not None:
        c = sparse_all_gather(per_rank, n, link, fraction=option.topk_fraction, bits=bits)
    elif bits < 16:
        c = quantized_mean(per_rank, n, link, bits=bits, block_size=workload.block_size)
    else:
        c = ring_all_reduce(per_rank * bits / 8, n, link)
    c = Cost(c.seconds, c.rank_bytes, c.node_bytes * r)
    if sharded:  # the node all-gathers the fragment's (fp32) weights
        g = all_gather(numel * 4.0, r, cluster.intra_link)
        c = c + Cost(g.seconds, g.rank_bytes, 0.0)
    return c


def _ddp_allreduce(workload: Workload, cluster: Cluster, *, inside_only: bool) -> Cost:
    nbytes = workload.params * _BITS[workload.ddp_dtype] / 8
    if inside_only:
        c = ring_all_reduce(nbytes, cluster.ranks_per_node, cluster.intra_link)
        return Cost(c.seconds, c.rank_bytes, 0.0)
    if cluster.ranks_per_node == 1:
        return ring_all_reduce(nbytes, cluster.nodes, cluster.link)
    return hierarchical_all_reduce(nbytes, cluster)


def predict(option: Option, workload: Workload, cluster: Cluster) -> Prediction:
    """Step time, utilisation and bytes of ``option`` (Note [Step model])."""
    t, o = workload.step_time, workload.ddp_overlap
    if option.mode == "ddp":
        c = _ddp_allreduce(workload, cluster, inside_only=False)
        exposed = max(0.0, c.seconds - o * t)
        return Prediction(option, t + exposed, exposed, c.seconds, t / (t + exposed), c.rank_bytes, c.node_bytes)
    k, f, tau = option.k, option.num_fragments, option.fragment_sync_delay
    sync = _fragment_sync(option, workload, cluster)
    # eager: applied k steps after launch, but the F fragments share the link: k / F steps each
    window = (k // f) * t if option.eager_update else tau * t
    exposed = f / k * max(0.0, sync.seconds - window)
    inside = _ddp_allreduce(workload, cluster, inside_only=True)
    exposed += max(0.0, inside.seconds - o * t)
    return Prediction(option, t + exposed, exposed, sync.seconds, t / (t + exposed),
                      f / k * sync.rank_bytes + inside.rank_bytes, f / k * sync.node_bytes)


# -- choosing -------------------------------------------------------------------------------------
def _best_schedule(k: int, comm_dtype: str, workload: Workload, cluster: Cluster, *, target: float,
                   max_delay: int, max_fragments: int, eager: bool = False,
                   topk_fraction: float | None = None) -> Prediction:
    """For one k and wire format: the (F, tau) reaching ``target`` with the least staleness
    (smallest tau, then smallest F); else the highest utilisation. ``eager``: tau = 0, any F."""
    best, best_key = None, None
    for f in range(1, min(k, max_fragments) + 1):
        if k % f:
            continue
        for tau in ((0,) if eager else range(min(k // f - 1, max_delay) + 1)):
            if tau == 0 and f > 1 and not eager:
                continue  # fragments without overlap only add latency
            p = predict(Option("local_sgd", k, f, tau, comm_dtype, eager_update=eager, topk_fraction=topk_fraction),
                        workload, cluster)
            ok = p.utilization >= target
            key = (not ok, 0.0 if ok else -round(p.utilization, 9), tau, f)
            if best_key is None or key < best_key:
                best, best_key = p, key
    assert best is not None
    return best


def _precision(o: Option) -> tuple:
    """Order of preference of the wire: fp32, bf16, int8, int4, int2, then top-k by decreasing
    fraction (then more bits first)."""
    if o.topk_fraction is None:
        return (0, WIRE_FORMATS.index(o.comm_dtype), 0)
    return (1, -o.topk_fraction, -_BITS[o.comm_dtype])


def _preference(p: Prediction, target: float) -> tuple:
    """:func:`plan`'s order: reaching ``target`` first (else by utilisation), then the smallest k,
    the most precise wire, non-eager before eager, the smallest tau, the smallest F."""
    o = p.option
    ok = p.utilization >= target
    return (not ok, 0.0 if ok else -round(p.utilization, 9), o.k, _precision(o), o.eager_update,
            o.fragment_sync_delay, o.num_fragments)


def plan(workload: Workload, cluster: Cluster, *, k: int | None = None,
         k_choices: Sequence[int] = DEFAULT_K_CHOICES, comm_dtypes: Iterable[str] = WIRE_FORMATS,
         target: float = 0.95, max_delay: int = 5, max_fragments: int = 64, eager: bool = True,
         topk_fractions: Iterable[float] = DEFAULT_TOPK_FRACTIONS,
         topk_dtypes: Iterable[str] = ("int2",)) -> Plan:
    r"""Every option worth considering and the one to use.

    For each k (``k``, or each of ``k_choices``) and each wire format of ``comm_dtypes``: the
    blocking sync, the streaming (F, tau) with the least staleness that reaches ``target``
    utilisation (F dividing k, up to ``max_fragments``; ``1 <= tau <= max_delay``, tau < k / F;
    the Streaming-DiLoCo paper advises tau <= 5) and, with ``eager``, the eager update
    (tau = 0) with the smallest F that reaches it. The same three for the top-k exchange at each
    of ``topk_fractions`` with values in each of ``topk_dtypes`` (int2 by default; pass ``()``
    to leave sparse out). Each is the best-of-its-kind; options that cannot reach the target are
    kept with their highest utilisation.

    The recommendation, among the options that reach ``target``: DDP if it does (unless ``k`` is
    fixed), else the smallest k, then the most precise wire (fp32, bf16, int8, int4, int2, then
    top-k by decreasing fraction, more value bits first), then non-eager before eager (eager
    updates are a different algorithm with some quality cost; the naive delayed rule is never
    recommended), then the smallest tau, then the smallest F -- k costs the most quality per unit
    of staleness; quantised wires with error feedback and tau <= 5 cost little
    (docs/local-sgd.md). If none reaches it, the highest utilisation.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"plan `k` must be an integer >= 1 or None, got {k!r}")
    if not (0.0 < target <= 1.0):
        raise ValueError(f"plan `target` must be in (0, 1], got {target!r}")
    if max_delay < 0 or max_fragments < 1:
        raise ValueError(f"plan needs max_delay >= 0 and max_fragments >= 1, got {max_delay}, {max_fragments}")
    fractions = sorted(set(topk_fractions), reverse=True)
    if any(not (0.0 < f <= 1.0) for f in fractions):
        raise ValueError(f"plan `topk_fractions` must be in (0, 1], got {fractions!r}")
    ks = [k] if k is not None else sorted(set(k_choices))
    dtypes = [d for d in WIRE_FORMATS if d in set(comm_dtypes)]
    sparse_dtypes = [d for d in SPARSE_FORMATS if d in set(topk_dtypes)]
    ddp = predict(Option("ddp"), workload, cluster)
    local: list[Prediction] = []
    wires = [(d, None) for d in dtypes] + [(d, f) for f in fractions for d in sparse_dtypes]
    for kk in ks:
        for d, frac in wires:
            kinds = [predict(Option("local_sgd", kk, 1, 0, d, topk_fraction=frac), workload, cluster)]
            kinds.append(_best_schedule(kk, d, workload, cluster, target=target, max_delay=max_delay,
                                        max_fragments=max_fragments, topk_fraction=frac))
            if eager:
                kinds.append(_best_schedule(kk, d, workload, cluster, target=target, max_delay=max_delay,
                                            max_fragments=max_fragments, eager=True, topk_fraction=frac))
            seen: set[Option] = set()
            for p in kinds:
                if p.option not in seen:
                    seen.add(p.option)
                    local.append(p)

    best_local = min(local, key=lambda p: _preference(p, target))
    recommended = ddp if (k is None and ddp.utilization >= target) else best_local
    notes = []
    if recommended.utilization < target:
        notes.append(f"no option reaches {100 * target:.0f}% utilisation: the best is shown; a larger k, "
                     "a faster link or fewer nodes would help")
    o = best_local.option
    if o.eager_update:
        notes.append("eager update: each fragment's average is applied at its next sync, one outer step late "
                     "(docs/local-sgd.md, \"Eager outer updates\"); check the loss against a non-eager run")
    if o.topk_fraction is not None:
        notes.append(f"top-k: about {100 * _sparse_kept(o.topk_fraction):.2g}% of the progress per sync, the rest "
                     "waits in the error-feedback residual (docs/local-sgd.md, \"Fewer bits\"); check the loss")
    return Plan(workload, cluster, (ddp, *local), recommended, best_local, target, tuple(notes))


def _sparse_kept(fraction: float) -> float:
    """The effective fraction sent: ``k_b / 256``."""
    return min(_SPARSE_INDEX_BLOCK, max(1, round(fraction * _SPARSE_INDEX_BLOCK))) / _SPARSE_INDEX_BLOCK


# -- parsing (shared with the CLI) ----------------------------------------------------------------
_COUNT_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> int:
    """A parameter count: ``1300000``, ``1.3B``, ``350M``, ``125k``, ``7e9``."""
    import re

    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise ValueError(f"expected a positive count such as 1300000, 1.3B or 350M, got {text!r}")
    value = float(m.group(1).replace("_", "")) * _COUNT_SUFFIX[m.group(2).lower()]
    if not (1 <= value < math.inf):
        raise ValueError(f"expected a positive count such as 1300000, 1.3B or 350M, got {text!r}")
    return round(value)


def parse_rate(text: str) -> float:
    """A link rate in **bytes** per second from ``200Mbit``, ``1Gbit``, ``10Gbit/s``, ``100Mbps``,
    ``1gbit`` (bits, any case) or ``125MB/s``, ``1.25GBps`` (bytes: capital ``B``); SI prefixes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(bit|Bit|BIT|bps|Bps|B|b)(/s)?\s*",
                     text)
    if not m or m.group(3) == "b" or (m.group(3) == "Bps" and m.group(4)):
        raise ValueError(f"unknown link rate {text!r}: expected a number and a unit such as 200Mbit, 1Gbit, "
                         "10Gbit/s, 100Mbps (bits per second) or 125MB/s (bytes per second)")
    value = float(m.group(1)) * _SI[m.group(2).lower()]
    unit = m.group(3)
    per_byte = unit in ("B", "Bps")
    rate = value if per_byte else value / 8
    if not (0.0 < rate < math.inf):
        raise ValueError(f"link rate must be positive, got {text!r}")
    return rate


def parse_seconds(text: str) -> float:
    """A duration: ``0.5`` or ``0.5s`` (seconds), ``250ms``, ``50us``; >= 0."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|ms|us|µs|ns)?\s*", text)
    if not m:
        raise ValueError(f"expected a duration such as 0.5, 0.5s, 250ms or 50us, got {text!r}")
    scale = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}[m.group(2)]
    value = float(m.group(1)) * scale
    if not math.isfinite(value):
        raise ValueError(f"expected a finite duration, got {text!r}")
    return value


def step_time_from_mfu(params: float, tokens_per_step: float, *, peak_flops: float, mfu: float) -> float:
    r"""Seconds per step from :math:`6 \cdot \text{params} \cdot \text{tokens}` FLOPs at ``mfu`` of ``peak_flops``."""
    if min(params, tokens_per_step, peak_flops) <= 0 or not (0.0 < mfu <= 1.0):
        raise ValueError("step_time_from_mfu needs positive params, tokens, peak FLOP/s and mfu in (0, 1]")
    return 6.0 * params * tokens_per_step / (peak_flops * mfu)



# -- what ``lookahead-dist plan`` prints ----------------------------------------------------------
def format_bytes(n: float) -> str:
    """``n`` bytes with a decimal unit: 512 B, 1.20 MB, 9.10 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_rate(bytes_per_s: float) -> str:
    """A link rate as bits per second: 200 Mbit/s, 1 Gbit/s."""
    bits = bytes_per_s * 8
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def format_seconds(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def format_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def config_blocks(prediction: Prediction, cluster: Cluster, *, alpha: float = 0.5) -> dict[str, str]:
    """The local-SGD option as a DeepSpeed ``"lookahead"`` block (JSON), Python
    :class:`~lookahead_dist.LocalSGDOptions` and ``lookahead-dist train`` flags.

    With ``R > 1`` ranks per node: hierarchical, sharded (``sharded=True``,
    ``--local-sgd-sharded``), top-k included."""
    import json

    o = prediction.option
    if o.mode != "local_sgd":
        raise ValueError(f"config_blocks needs a local-SGD option, got {o}")
    hier = cluster.ranks_per_node > 1
    sharded = hier
    local = {"across": "nodes", "ranks_per_node": cluster.ranks_per_node, "comm_dtype": o.comm_dtype,
             "num_fragments": o.num_fragments, "fragment_sync_delay": o.fragment_sync_delay}
    dtype = {"fp32": "None", "bf16": "torch.bfloat16", "int8": '"int8"', "int4": '"int4"',
             "int2": '"int2"'}[o.comm_dtype]
    kwargs = f"num_fragments={o.num_fragments}, fragment_sync_delay={o.fragment_sync_delay}, comm_dtype={dtype}"
    flags = (f"lookahead-dist train --mode local-sgd --k {o.k} --alpha {alpha} --num-fragments {o.num_fragments} "
             f"--fragment-sync-delay {o.fragment_sync_delay} --comm-dtype {o.comm_dtype}")
    if o.eager_update:
        local["eager_update"] = True
        kwargs += ", eager_update=True"
        flags += " --eager-update"
    if o.topk_fraction is not None:
        local["topk_fraction"] = o.topk_fraction
        kwargs += f", topk_fraction={o.topk_fraction!r}"
        flags += f" --topk-fraction {o.topk_fraction!r}"
    ds = {"lookahead": {"k": o.k, "alpha": alpha, "local_sgd": local}}
    if hier:
        make = ('local_sgd = LocalSGDOptions.from_mesh(mesh, across="inter", within="intra", module=ddp,\n'
                + ('                                       sharded=True, **local_sgd_kwargs)' if sharded else
                   '                                       **local_sgd_kwargs)')
                + '  # mesh, ddp: docs/local-sgd.md "Hierarchical"')
    else:
        make = "local_sgd = LocalSGDOptions(**local_sgd_kwargs)"
    python = "\n".join([
        "import torch",
        "from lookahead_dist import Lookahead, LocalSGDOptions",
        "",
        f"local_sgd_kwargs = dict({kwargs})",
        make,
        f"# opt = Lookahead(torch.optim.AdamW(model.parameters()), k={o.k}, alpha={alpha}, local_sgd=local_sgd)",
    ])
    if hier:
        flags += " --hierarchical" + (" --local-sgd-sharded" if sharded else "")
    return {"deepspeed": json.dumps(ds, indent=2), "python": python, "trainer": flags}


def _shown(result: Plan) -> tuple[list[Prediction], str]:
    """The rows of the table: DDP, then at the chosen k for each dense wire its blocking sync and
    least stale streaming schedule; eager and top-k rows only where they add something -- when no
    dense non-eager option at that k reaches the target (an eager row only where its wire's
    non-eager rows do not reach it and it beats them) -- and the recommended row always. Second:
    why rows were left out (``"reached"``: a dense non-eager option reaches the target;
    ``"eager"``: eager rows that add nothing; ``""``: none left out)."""
    best, target = result.best_local_sgd, result.target
    at_k = [p for p in result.options[1:] if p.option.k == best.option.k]
    plain = [p for p in at_k if not p.option.eager_update and p.option.topk_fraction is None]
    needed = not any(p.utilization >= target for p in plain)
    rows, hidden = [result.ddp], ""
    for p in at_k:
        o = p.option
        show = p in plain or p is best
        if not show and needed:
            same_wire = [q.utilization for q in at_k if not q.option.eager_update
                         and (q.option.comm_dtype, q.option.topk_fraction) == (o.comm_dtype, o.topk_fraction)]
            plain_best = max(same_wire, default=0.0)
            show = not o.eager_update or (plain_best < target and p.utilization > plain_best)
        if show:
            rows.append(p)
        else:
            hidden = "eager" if needed else "reached"
    return rows, hidden


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(result: Plan, *, alpha: float = 0.5) -> str:
    """The text ``lookahead-dist plan`` prints."""
    w, c, rec = result.workload, result.cluster, result.recommended
    best = result.best_local_sgd
    lines = [
        (f"{format_count(w.params)} parameters, {c.nodes} node(s) x {c.ranks_per_node} rank(s), "
         f"{format_rate(c.link.bandwidth)} link, {format_seconds(c.link.latency)} latency, "
         f"{format_seconds(w.step_time)} per step without communication"),
        (f"model: step = compute + exposed communication (alpha-beta, ring collectives; DDP overlaps "
         f"{100 * w.ddp_overlap:.0f}% of the step)"),
        "",
        (f"{'option':<28}{'k':>5}{'F':>4}{'tau':>5}  {'wire':<5}{'one sync':>11}{'bytes/step/rank':>17}"
         f"{'utilisation':>13}"),
    ]
    shown, hidden = _shown(result)
    for p in shown:
        o = p.option
        mark = " *" if p is rec else ""
        lines.append(f"{o.describe():<28}{o.k:>5}{o.num_fragments:>4}{o.fragment_sync_delay:>5}  {o.comm_dtype:<5}"
                     f"{format_seconds(p.sync_seconds):>11}{format_bytes(p.bytes_per_step):>17}"
                     f"{100 * p.utilization:>12.1f}%{mark}")
    if hidden == "reached":
        lines.append(f"(eager and top-k rows left out: a dense schedule without eager updates reaches "
                     f"{100 * result.target:.0f}%; all are in --json)")
    elif hidden:
        lines.append("(eager rows left out where they add nothing to their wire's blocking/streaming rows; "
                     "all are in --json)")
    o = rec.option
    lines.append("")
    if o.mode == "ddp":
        lines.append(f"recommended (*): DDP: it already reaches {100 * rec.utilization:.1f}% of the "
                     "no-communication throughput; the best local-SGD option, if wanted anyway:")
        o = best.option
    else:
        lines.append("recommended (*):")
    topk = "no" if o.topk_fraction is None else f"{o.topk_fraction:g}"
    lines += [
        (f"  k={o.k}, num_fragments={o.num_fragments}, fragment_sync_delay={o.fragment_sync_delay}, "
         f"comm_dtype={o.comm_dtype}, eager update: {_yes(o.eager_update)}, top-k: {topk}"),
        (f"  predicted utilisation {100 * best.utilization:.1f}% (DDP: {100 * result.ddp.utilization:.1f}%), "
         f"{format_bytes(best.bytes_per_step)} per step per rank (DDP: {format_bytes(result.ddp.bytes_per_step)})"),
    ]
    lines += [f"  note: {n}" for n in result.notes]
    blocks = config_blocks(best, c, alpha=alpha)
    lines += ["", 'DeepSpeed config ("lookahead" block):', blocks["deepspeed"], "",
              "Python:", blocks["python"], "", "Trainer:", blocks["trainer"]]
    return "\n".join(lines)
