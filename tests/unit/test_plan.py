"""The cost model (lookahead_dist.plan) and ``lookahead-dist plan``: formulas against hand-computed
cases, the recommendation, the printed config blocks, bad input and the ``--json`` schema."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lookahead_dist import LocalSGDOptions, cli
from lookahead_dist import plan as P
from lookahead_dist.deepspeed import parse_lookahead_block
from lookahead_dist.sync import streaming

MB = 1e6


# -- the collectives ------------------------------------------------------------------------------
def test_ring_all_reduce_hand_computed():
    link = P.Link(100 * MB, 1e-3)  # 100 MB/s, 1 ms
    c = P.ring_all_reduce(100 * MB, 4, link)
    # 2 (N-1)/N * S = 1.5 * 100 MB; 2 (N-1) = 6 latency rounds
    assert c.rank_bytes == pytest.approx(150 * MB)
    assert c.seconds == pytest.approx(6e-3 + 1.5)
    assert P.ring_all_reduce(100 * MB, 1, link).seconds == 0.0
    # reduce-scatter + all-gather costs one all-reduce, bytes and rounds
    rs_ag = P.reduce_scatter(100 * MB, 4, link) + P.all_gather(100 * MB, 4, link)
    assert (rs_ag.seconds, rs_ag.rank_bytes) == pytest.approx((c.seconds, c.rank_bytes))
    # the bandwidth term tends to 2 S / beta, the latency term grows with N
    big = P.ring_all_reduce(100 * MB, 1024, link)
    assert big.seconds == pytest.approx(2 * 1023 * 1e-3 + 2 * 1023 / 1024)


def test_hierarchical_all_reduce_hand_computed():
    inter, intra = P.Link(10 * MB, 1e-3), P.Link(1000 * MB, 1e-5)
    cluster = P.Cluster(nodes=4, ranks_per_node=2, link=inter, intra_link=intra)
    s = 80 * MB
    c = P.hierarchical_all_reduce(s, cluster)
    # in the node: RS + AG over R=2 of S: 2 * (1/2) * 80 MB / 1000 MB/s + 2 * 1 * 10 us
    inside = 2 * 0.5 * 80 / 1000 + 2e-5
    # across: 2 concurrent all-reduces of S/2 = 40 MB over N=4 at 10/2 MB/s each:
    # 2 * 3/4 * 40 / 5 + 6 ms  (= 2 (N-1)/N * S / beta through the node's link)
    across = 2 * 0.75 * 40 / 5 + 6e-3
    assert c.seconds == pytest.approx(inside + across)
    assert c.node_bytes == pytest.approx(2 * 0.75 * s)  # independent of R
    assert c.rank_bytes == pytest.approx(80 * MB + 2 * 0.75 * 40 * MB)
    # R = 1: the plain ring
    flat = P.hierarchical_all_reduce(s, P.Cluster(nodes=4, link=inter, intra_link=intra))
    assert flat.seconds == pytest.approx(P.ring_all_reduce(s, 4, inter).seconds)


def test_sparse_all_gather_hand_computed_and_grows_with_n():
    link = P.Link(10 * MB, 1e-3)
    # 1,048,576 values (a multiple of 2048), f = 0.02 -> 5 per block of 256, int2:
    # 4096 blocks * 5 = 20,480 values: 20,480 index bytes + 20,480 / 4 code bytes + 512 scales * 4
    m = 2**20
    payload = 20_480 + 5_120 + 2_048
    assert P.sparse_payload_bytes(m, fraction=0.02, bits=2) == payload
    assert 8 * payload / m == pytest.approx(5 * 10 / 256 + 32 / 2048)  # 0.2109 bits per value
    c = P.sparse_all_gather(m, 8, link, fraction=0.02, bits=2)
    # ring all-gather: each rank sends (and receives) 7 payloads; 7 latency rounds
    assert c.rank_bytes == pytest.approx(7 * payload)
    assert c.seconds == pytest.approx(7e-3 + 7 * payload / (10 * MB))
    assert P.sparse_all_gather(m, 1, link, fraction=0.02, bits=2).seconds == 0.0
    # padding to 2048 and the clamp of k_b: 1000 values pad to 2048 (8 blocks), f = 0.001 -> 1
    assert P.sparse_payload_bytes(1000, fraction=0.001, bits=8) == 4 + 8 * 1 * 2
    c64 = P.sparse_all_gather(m, 64, link, fraction=0.02, bits=2)
    assert c64.rank_bytes == pytest.approx(63 / 7 * c.rank_bytes)
    # the dense all-reduce's bytes hardly grow
    d8, d64 = (P.ring_all_reduce(4e6, n, link).rank_bytes for n in (8, 64))
    assert d64 / d8 < 1.15


def test_quantized_mean_bytes_match_the_real_reduce():
    from lookahead_dist import _quant

    link = P.Link(1 * MB, 0.0)
    # block 8, 1000 values, 2 ranks: C = ceil(1000 / 16) * 8 = 504 values per chunk;
    # segment = 504 code bytes + 63 scales * 4 = 756; all-to-all + all-gather: 2 (N-1) segments
    c = P.quantized_mean(1000, 2, link, bits=8, block_size=8)
    assert c.rank_bytes == 2 * 756
    assert c.seconds == pytest.approx(2 * 756 / MB)
    for numel, n, bits, block in [(1000, 2, 8, 8), (12345, 3, 4, 512), (10**6, 8, 8, 512), (77, 5, 4, 2)]:
        seg = _quant._plan(numel, n, bits, block).seg_bytes
        assert P.quantized_mean(numel, n, link, bits=bits, block_size=block).rank_bytes == 2 * (n - 1) * seg
    # against an fp32 all-reduce of a large buffer: x 0.252 (int8), x 0.127 (int4) at block 512
    m = 2**24
    fp32 = P.ring_all_reduce(4 * m, 4, link).rank_bytes
    assert P.quantized_mean(m, 4, link, bits=8).rank_bytes / fp32 == pytest.approx(0.25 * (1 + 32 / 4096), rel=1e-6)
    assert P.quantized_mean(m, 4, link, bits=4).rank_bytes / fp32 == pytest.approx(0.125 * (1 + 32 / 2048), rel=1e-6)
    assert P.value_bytes("int8") == pytest.approx(1 + 4 / 512)
    assert P.value_bytes("int4") == pytest.approx(0.5 + 4 / 512)
    assert (P.value_bytes("fp32"), P.value_bytes("bf16")) == (4, 2)


def test_sparse_payload_matches_the_library_encoding():
    from lookahead_dist import _sparse

    for numel in (1, 1000, 2048, 12_345, 1_000_000, 6_300_000):
        for fraction in (0.001, 0.01, 0.02, 0.03, 0.5, 1.0):
            for bits in (8, 4, 2):
                assert P.sparse_payload_bytes(numel, fraction=fraction, bits=bits) == _sparse.sparse_nbytes(
                    numel, fraction=fraction, bits=bits), (numel, fraction, bits)
    link = P.Link(1 * MB, 0.0)
    for numel, n in ((6_300_000, 2), (12_345, 5)):
        expect = (n - 1) * _sparse.sparse_nbytes(numel, fraction=0.02, bits=2)
        assert P.sparse_all_gather(numel, n, link, fraction=0.02, bits=2).rank_bytes == pytest.approx(expect)
    # one fragment of a model in predict: the whole fragment's payload, to the N - 1 others
    w = P.Workload(params=6_300_000, step_time=0.1)
    c = P.Cluster(nodes=3, link=link)
    p = P.predict(P.Option("local_sgd", 16, 4, 1, "int2", topk_fraction=0.02), w, c)
    frag = -(-6_300_000 // 4)
    assert p.bytes_per_step == pytest.approx(4 / 16 * 2 * _sparse.sparse_nbytes(frag, fraction=0.02, bits=2))
    assert p.sync_seconds == pytest.approx(2 * _sparse.sparse_nbytes(frag, fraction=0.02, bits=2) / MB)


def test_int2_value_bytes_and_quantized_mean():
    from lookahead_dist import _quant

    # 2 bits per value + one fp32 scale per 512 values: 0.25 + 4/512 bytes
    assert P.value_bytes("int2") == pytest.approx(0.25 + 4 / 512)
    assert P.value_bytes("int2", 1024) == pytest.approx(0.25 + 4 / 1024)
    link = P.Link(1 * MB, 0.0)
    # 4096 values, 2 ranks, block 512: C = 2048 values per chunk, segment = 512 code bytes + 4 scales * 4
    assert P.quantized_mean(4096, 2, link, bits=2).rank_bytes == 2 * (512 + 16)
    for numel, n in ((4096, 2), (12_345, 3), (10**6, 8)):
        seg = _quant._plan(numel, n, 2, 512).seg_bytes
        assert P.quantized_mean(numel, n, link, bits=2).rank_bytes == 2 * (n - 1) * seg
    w = P.Workload(params=2**20, step_time=1.0)
    c = P.Cluster(nodes=2, link=link)
    int2 = P.predict(P.Option("local_sgd", 8, comm_dtype="int2"), w, c)
    fp32 = P.predict(P.Option("local_sgd", 8), w, c)
    assert int2.bytes_per_step / fp32.bytes_per_step == pytest.approx(2 / 32 * (1 + 32 / (2 * 512)))
    assert "int2" in P.WIRE_FORMATS and P.WIRE_FORMATS[-1] == "int2"


def test_option_checks_follow_the_library():
    with pytest.raises(ValueError, match="fragment_sync_delay=0"):
        P.Option("local_sgd", 16, 4, 1, eager_update=True)
    with pytest.raises(ValueError, match="comm_dtype"):
        P.Option("local_sgd", 16, topk_fraction=0.02)  # fp32 values: refused, as by LocalSGDOptions
    with pytest.raises(ValueError, match="comm_dtype"):
        P.Option("local_sgd", 16, comm_dtype="int3")
    for o in (P.Option("local_sgd", 16, 4, 0, "int2", eager_update=True),
              P.Option("local_sgd", 16, 2, 1, "int4", topk_fraction=0.02), P.Option("ddp")):
        assert o.available
    assert P.Option("local_sgd", 16, 1, 0, "int2", eager_update=True, topk_fraction=0.01).describe() == (
        "local SGD top-1% eager")


# -- one option -----------------------------------------------------------------------------------
def test_predict_ddp_and_local_sgd_hand_computed():
    link = P.Link(125 * MB, 0.0)  # 1 Gbit/s
    cluster = P.Cluster(nodes=2, link=link)
    w = P.Workload(params=25_000_000, step_time=0.3, ddp_overlap=0.5)
    # DDP: 100 MB of fp32 gradients, 2 (1/2) * 100 MB / 125 MB/s = 0.8 s; 0.15 s hidden
    ddp = P.predict(P.Option("ddp"), w, cluster)
    assert ddp.sync_seconds == pytest.approx(0.8)
    assert ddp.step_seconds == pytest.approx(0.3 + 0.65)
    assert ddp.utilization == pytest.approx(0.3 / 0.95)
    assert ddp.bytes_per_step == pytest.approx(100 * MB)
    # blocking local SGD, k = 16: 0.8 s every 16 steps
    blk = P.predict(P.Option("local_sgd", 16), w, cluster)
    assert blk.utilization == pytest.approx(16 * 0.3 / (16 * 0.3 + 0.8))
    assert blk.bytes_per_step == pytest.approx(100 * MB / 16)
    # streaming F = 4, tau = 1: 0.2 s per fragment, hidden behind 0.3 s
    st = P.predict(P.Option("local_sgd", 16, 4, 1), w, cluster)
    assert st.sync_seconds == pytest.approx(0.2)
    assert (st.utilization, st.exposed_seconds) == (1.0, 0.0)
    # F = 2, tau = 1: 0.4 s per fragment, 0.1 s exposed twice per 16 steps
    st2 = P.predict(P.Option("local_sgd", 16, 2, 1), w, cluster)
    assert st2.exposed_seconds == pytest.approx(2 * 0.1 / 16)
    # bf16 halves the bytes
    assert P.predict(P.Option("local_sgd", 16, comm_dtype="bf16"), w, cluster).bytes_per_step == pytest.approx(
        50 * MB / 16)


def test_eager_window_hand_computed():
    link = P.Link(125 * MB, 0.0)
    cluster = P.Cluster(nodes=2, link=link)
    w = P.Workload(params=25_000_000, step_time=0.3, ddp_overlap=0.5)  # one fp32 sync: 0.8 s
    # F = 1: launched at the sync, applied at the next one, k steps later: 8 * 0.3 = 2.4 s > 0.8 s
    e8 = P.predict(P.Option("local_sgd", 8, eager_update=True), w, cluster)
    assert (e8.utilization, e8.exposed_seconds) == (1.0, 0.0)
    # k = 2: 0.6 s of window, 0.2 s exposed per 2 steps
    e2 = P.predict(P.Option("local_sgd", 2, eager_update=True), w, cluster)
    assert e2.exposed_seconds == pytest.approx(0.2 / 2)
    assert e2.utilization == pytest.approx(0.3 / (0.3 + 0.1))
    # the blocking sync at k = 2 exposes all of it
    assert P.predict(P.Option("local_sgd", 2), w, cluster).exposed_seconds == pytest.approx(0.8 / 2)
    # F = 4 at k = 8: each fragment (0.2 s) has its next sync 8 steps later, but the 4 fragments share
    # the link: one per k / F = 2 steps (0.6 s), the binding window
    e84 = P.predict(P.Option("local_sgd", 8, 4, 0, eager_update=True), w, cluster)
    assert e84.sync_seconds == pytest.approx(0.2) and e84.exposed_seconds == 0.0
    slow = P.Cluster(nodes=2, link=P.Link(12.5 * MB, 0.0))  # 8 s per full sync, 2 s per fragment
    e84s = P.predict(P.Option("local_sgd", 8, 4, 0, eager_update=True), w, slow)
    assert e84s.exposed_seconds == pytest.approx(4 / 8 * (2.0 - 2 * 0.3))
    # = the link's throughput bound: F fragments' transfers per k steps minus k steps of compute
    assert e84s.exposed_seconds * 8 == pytest.approx(8.0 - 8 * 0.3)
    # eager with R > 1 runs hierarchical-sharded, as the blocking sync does: each of the 4 local ranks
    # carries 1/4 of the fragment (1 MB at 10/4 MB/s = 0.4 s), then the node all-gathers 4 MB
    hier = P.Cluster(nodes=2, ranks_per_node=4, link=P.Link(10 * MB, 0.0), intra_link=P.Link(1000 * MB, 0.0))
    w1 = P.Workload(params=1_000_000, step_time=0.01, ddp_overlap=0.0)
    e = P.predict(P.Option("local_sgd", 8, eager_update=True), w1, hier)
    blocking = P.predict(P.Option("local_sgd", 8), w1, hier)
    assert e.sync_seconds == pytest.approx(blocking.sync_seconds) and e.sync_seconds > 0.4
    assert e.node_bytes_per_step == pytest.approx(4 * MB / 8)
    # top-k with R > 1 too: each local rank carries the sparse payload of its 1/4 chunk, so the node
    # sends what one rank per node would (up to the padding of 4 chunks instead of one), not 4 times it
    t = P.predict(P.Option("local_sgd", 8, 1, 0, "int2", eager_update=True, topk_fraction=0.02), w1, hier)
    flat1 = P.predict(P.Option("local_sgd", 8, 1, 0, "int2", eager_update=True, topk_fraction=0.02), w1,
                      P.Cluster(nodes=2, ranks_per_node=1, link=P.Link(10 * MB, 0.0)))
    per_chunk = P.sparse_payload_bytes(250_000, fraction=0.02, bits=2)
    assert t.node_bytes_per_step == pytest.approx(4 * per_chunk / 8)
    assert t.node_bytes_per_step == pytest.approx(flat1.node_bytes_per_step, rel=1e-2)


def test_hierarchical_local_sgd_hand_computed():
    inter, intra = P.Link(10 * MB, 0.0), P.Link(1000 * MB, 0.0)
    cluster = P.Cluster(nodes=2, ranks_per_node=4, link=inter, intra_link=intra)
    w = P.Workload(params=1_000_000, step_time=0.01, ddp_overlap=0.0)
    p = P.predict(P.Option("local_sgd", 8, 1, 0, "fp32"), w, cluster)
    # across: each of 4 ranks all-reduces 250k fp32 values (1 MB) over 2 nodes at 2.5 MB/s: 0.4 s;
    # then the node all-gathers 4 MB of weights: 3/4 * 4 MB / 1000 MB/s = 3 ms
    assert p.sync_seconds == pytest.approx(0.4 + 0.003)
    # DDP inside the node every step: 2 * 3/4 * 4 MB / 1000 MB/s = 6 ms, not overlapped
    assert p.exposed_seconds == pytest.approx(0.403 / 8 + 0.006)
    assert p.node_bytes_per_step == pytest.approx(4 * MB / 8)


def test_matches_suggest_schedule_on_its_case():
    # the narrower helper (2 ranks, fp32 ring, no scales) and the model agree where both apply
    s = streaming.suggest_schedule(4 * 6.3e6, 200e6 / 8, 0.1, k=16, latency_s=1e-3, verbose=False)
    w = P.Workload(params=6_300_000, step_time=0.1)
    c = P.Cluster(nodes=2, link=P.Link(200e6 / 8, 0.5e-3))  # the helper counts one latency per collective
    p = P.predict(P.Option("local_sgd", 16, s.num_fragments, s.fragment_sync_delay), w, c)
    assert p.sync_seconds == pytest.approx(s.fragment_seconds, rel=1e-6)
    assert p.utilization == pytest.approx(s.utilisation)


# -- the recommendation ---------------------------------------------------------------------------
def _h100_step(params: float) -> float:
    return P.step_time_from_mfu(params, 262_144, peak_flops=8 * 989e12, mfu=0.4)


def _space(ks=P.DEFAULT_K_CHOICES):
    """The planner's space: k grid, F | k up to 64, tau <= 5, every wire format and top-k at int2, eager."""
    wires = [(d, None) for d in P.WIRE_FORMATS] + [("int2", f) for f in P.DEFAULT_TOPK_FRACTIONS]
    for k in ks:
        for f in (f for f in range(1, min(k, 64) + 1) if k % f == 0):
            for tau in range(min(k // f - 1, 5) + 1):
                for d, frac in wires:
                    yield P.Option("local_sgd", k, f, tau, d, topk_fraction=frac)
                    if tau == 0:
                        yield P.Option("local_sgd", k, f, 0, d, eager_update=True, topk_fraction=frac)


def _any_reaches(w: P.Workload, c: P.Cluster, target: float = 0.95) -> bool:
    """Brute force over the planner's space."""
    return any(P.predict(o, w, c).utilization >= target for o in _space())


@pytest.mark.parametrize("nodes", [2, 8, 64, 1024])
def test_recommendation_hides_the_transfer(nodes):
    unreached = []
    for params in (125_000_000, 1_000_000_000, 8_000_000_000, 70_000_000_000):
        for rate in ("100Mbit", "1Gbit", "10Gbit", "100Gbit"):
            w = P.Workload(params=params, step_time=_h100_step(params))
            c = P.Cluster(nodes=nodes, link=P.Link(P.parse_rate(rate), 1e-3))
            result = P.plan(w, c)
            rec = result.recommended
            assert rec.option.available and rec in result.options and result.options[0].option.mode == "ddp"
            _check_order(result)
            if rec.utilization < 0.95:  # only where nothing in the space reaches it
                assert result.notes and not _any_reaches(w, c), (params, rate, rec)
                assert rec.utilization == max(p.utilization for p in result.options[1:])
                unreached.append((params, rate))
                continue
            if rec.option.mode == "local_sgd":  # the smallest k that reaches the target
                assert result.ddp.utilization < 0.95
                reaching = [p.option.k for p in result.options[1:] if p.utilization >= 0.95]
                assert rec.option.k == min(reaching)
    # every case is hidden: at 1024 nodes the ring's 2 (N-1) latency rounds (2 s at 1 ms per sync)
    # exceed 5 steps of the 125M model (62 ms each), but an eager update has k steps (32 s at k = 512)
    assert unreached == []


def _pref(p: P.Prediction):
    o = p.option
    prec = (0, P.WIRE_FORMATS.index(o.comm_dtype), 0) if o.topk_fraction is None else (
        1, -o.topk_fraction, -int(o.comm_dtype[3:]))
    return (o.k, prec, o.eager_update, o.fragment_sync_delay, o.num_fragments)


def _check_order(result: P.Plan, target: float = 0.95) -> None:
    """The recommendation is the first option reaching the target in the documented order."""
    reaching = [p for p in result.options[1:] if p.utilization >= target]
    if reaching:
        assert result.best_local_sgd.option == min(reaching, key=_pref).option
        assert result.best_local_sgd.utilization >= target
    else:
        assert result.best_local_sgd.utilization == max(p.utilization for p in result.options[1:])
        assert result.notes


@pytest.mark.parametrize("step, link", [(0.1, "10Mbit"), (0.046, "10Mbit"), (0.046, "50Mbit"), (0.1, "1Mbit"),
                                        (0.046, "1Mbit")])
def test_slow_link_recommendation(step, link):
    w = P.Workload(params=6_300_000, step_time=step)
    c = P.Cluster(nodes=2, link=P.Link(P.parse_rate(link), 1e-3))
    result = P.plan(w, c)
    rec = result.recommended
    assert rec.option.mode == "local_sgd"
    if _any_reaches(w, c):
        assert rec.utilization >= 0.95 and not any(n.startswith("no option") for n in result.notes)
    else:
        assert rec.utilization < 0.95 and result.notes[0].startswith("no option reaches 95%")
    _check_order(result)
    # the documented cases (docs/local-sgd.md, "Choosing F and tau")
    o = rec.option
    if (step, link) == (0.1, "10Mbit"):  # no dense wire reaches 95% at k = 8: top-3% int2 streaming does
        assert (o.k, o.comm_dtype, o.topk_fraction, o.eager_update) == (8, "int2", 0.03, False)
    if (step, link) == (0.046, "50Mbit"):  # dense int2 streaming does
        assert (o.k, o.comm_dtype, o.topk_fraction, o.eager_update) == (8, "int2", None, False)


def test_ordering_rules():
    w = P.Workload(params=6_300_000, step_time=0.1)
    c = P.Cluster(nodes=2, link=P.Link(P.parse_rate("10Mbit"), 1e-3))
    # k = 16, dense wires only: streaming int2 hides 12 of the 13 steps of a sync (94%); eager, k steps
    dense = P.plan(w, c, topk_fractions=(), k=16)
    _check_order(dense)
    o = dense.recommended.option
    assert (o.comm_dtype, o.eager_update, o.topk_fraction, o.fragment_sync_delay) == ("int2", True, None, 0)
    assert max(p.utilization for p in dense.options[1:] if not p.option.eager_update) < 0.95
    # with top-k as well, dense int2 eager still comes first (a more precise wire), ...
    assert P.plan(w, c, k=16).recommended.option == o
    # ... but with k free, k = 8 with top-3% streaming comes first (the smallest k)
    free = P.plan(w, c).recommended.option
    assert (free.k, free.topk_fraction, free.eager_update) == (8, 0.03, False)
    # no eager at all: never recommended
    no_eager = P.plan(w, c, eager=False)
    assert not any(p.option.eager_update for p in no_eager.options)
    _check_order(no_eager)
    # a precise wire that reaches beats a sparse one at the same k; non-eager beats eager
    fast = P.plan(w, P.Cluster(nodes=2, link=P.Link(P.parse_rate("1Gbit"), 1e-3)), k=16)
    assert fast.recommended.option.comm_dtype == "fp32" and not fast.recommended.option.eager_update
    assert fast.recommended.option.topk_fraction is None
    # eager is recommended where it alone reaches the target at the fixed k and wire
    only = P.plan(w, c, k=64, comm_dtypes=("int2",), topk_fractions=())
    kinds = {(p.option.eager_update, p.utilization >= 0.95) for p in only.options[1:]}
    if (True, True) in kinds and (False, True) not in kinds:
        assert only.recommended.option.eager_update
    _check_order(only)
    for p in P.plan(w, c).options[1:]:  # every option is one LocalSGDOptions accepts
        o = p.option
        LocalSGDOptions(num_fragments=o.num_fragments, fragment_sync_delay=o.fragment_sync_delay,
                        comm_dtype={"fp32": None, "bf16": torch.bfloat16}.get(o.comm_dtype, o.comm_dtype),
                        eager_update=o.eager_update, topk_fraction=o.topk_fraction, init="none")
        streaming.check_schedule(o.k, o.num_fragments, o.fragment_sync_delay, "test")


def test_plan_rules():
    w = P.Workload(params=1_300_000_000, step_time=0.5)
    fast = P.plan(w, P.Cluster(nodes=4, link=P.Link(P.parse_rate("800Gbit"), 5e-6)))
    assert fast.recommended.option.mode == "ddp"  # DDP hides it: keep DDP
    assert fast.best_local_sgd.option.mode == "local_sgd"
    fixed = P.plan(w, P.Cluster(nodes=8, link=P.Link(P.parse_rate("1Gbit"))), k=64)
    assert {p.option.k for p in fixed.options[1:]} == {64} and fixed.recommended.option.k == 64
    hopeless = P.plan(w, P.Cluster(nodes=8, link=P.Link(P.parse_rate("1Mbit"))), k=8)
    assert hopeless.recommended.utilization < 0.95 and hopeless.notes
    assert hopeless.recommended.utilization == max(p.utilization for p in hopeless.options[1:])
    for p in fixed.options[1:]:  # every option is a valid schedule
        o = p.option
        streaming.check_schedule(o.k, o.num_fragments, o.fragment_sync_delay, "test")
        assert o.fragment_sync_delay <= 5


@pytest.mark.parametrize("text, bytes_per_s", [
    ("200Mbit", 25e6), ("1Gbit", 125e6), ("10Gbit/s", 1.25e9), ("100Mbps", 12.5e6), ("1gbit", 125e6),
    ("125MB/s", 125e6), ("1.25GBps", 1.25e9), ("100 Mbit/s", 12.5e6)])
def test_parse_rate(text, bytes_per_s):
    assert P.parse_rate(text) == pytest.approx(bytes_per_s)


def test_parsers_reject():
    for bad in ("1Gb", "10", "fast", "1 Gbits", "-1Gbit", "0Mbit"):
        with pytest.raises(ValueError):
            P.parse_rate(bad)
    assert P.parse_count("1.3B") == 1_300_000_000 and P.parse_count("350M") == 350_000_000
    assert P.parse_count("7e9") == 7_000_000_000 and P.parse_count("125k") == 125_000
    for bad in ("-5", "0", "1x", ""):
        with pytest.raises(ValueError):
            P.parse_count(bad)
    assert P.parse_seconds("250ms") == pytest.approx(0.25) and P.parse_seconds("50us") == pytest.approx(5e-5)


# -- the command ----------------------------------------------------------------------------------
_BASE = ["plan", "--params", "1.3B", "--step-time", "0.5", "--nodes", "8", "--link", "1Gbit"]


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _blocks(text: str) -> dict[str, str]:
    """The three config blocks of the text output."""
    lines = text.splitlines()
    ds = lines.index('DeepSpeed config ("lookahead" block):') + 1
    py, tr = lines.index("Python:") + 1, lines.index("Trainer:")
    return {"deepspeed": "\n".join(lines[ds:lines.index("}", ds) + 1]),
            "python": "\n".join(lines[py:tr]).strip(),
            "trainer": lines[tr + 1]}


def _trainer_has(flag: str) -> bool:
    """Whether ``lookahead-dist train`` knows ``flag`` (--eager-update, --topk-fraction)."""
    return any(flag in a.option_strings for sub in cli.build_parser()._subparsers._group_actions
               for a in sub.choices["train"]._actions)


def _check_blocks(blocks: dict[str, str], ranks_per_node: int, expect) -> None:
    from lookahead_dist.deepspeed import config as ds_config
    from lookahead_dist.sync.options import COMM_DTYPES

    eager, topk = expect.eager_update, expect.topk_fraction
    sharded = ranks_per_node > 1  # hierarchical sharded, top-k included
    # DeepSpeed: the block parser accepts it and it carries the option
    block = json.loads(blocks["deepspeed"])["lookahead"]
    local = block["local_sgd"]
    assert local.get("eager_update", False) is eager and local.get("topk_fraction") == topk
    if all(k in ds_config._LOCAL_SGD_KEYS for k in local):
        parsed = parse_lookahead_block(block)
        opts = parsed["local_sgd"]["options"]
        assert parsed["k"] == expect.k and parsed["local_sgd"]["ranks_per_node"] == ranks_per_node
    else:  # the block parser does not know eager_update/topk_fraction yet: the options must still be valid
        assert eager or topk is not None
        opts = LocalSGDOptions(comm_dtype=COMM_DTYPES[local["comm_dtype"]], init="none",
                               **{k: v for k, v in local.items() if k not in ("across", "ranks_per_node", "comm_dtype")})
    assert (opts.num_fragments, opts.fragment_sync_delay) == (expect.num_fragments, expect.fragment_sync_delay)
    assert (opts.eager_update, opts.topk_fraction) == (eager, topk)
    # Python: runs as printed (one node of ranks: the kwargs build LocalSGDOptions)
    ns: dict = {}
    if ranks_per_node == 1:
        exec(blocks["python"], ns)  # noqa: S102 - the printed block, run as a user would
        built = ns["local_sgd"]
    else:
        code = "\n".join(ln for ln in blocks["python"].splitlines() if "from_mesh" not in ln
                         and not ln.lstrip().startswith(("sharded=True", "**local_sgd_kwargs")))
        exec(code, ns)  # noqa: S102
        assert "LocalSGDOptions.from_mesh(mesh" in blocks["python"]
        assert ("sharded=True" in blocks["python"]) == sharded
        built = LocalSGDOptions(**ns["local_sgd_kwargs"])  # from_mesh adds the groups (and sharded)
    assert isinstance(built, LocalSGDOptions)
    assert (built.num_fragments, built.fragment_sync_delay) == (expect.num_fragments, expect.fragment_sync_delay)
    assert (built.eager_update, built.topk_fraction) == (eager, topk)
    wire = {"fp32": None, "bf16": torch.bfloat16, "int8": "int8", "int4": "int4", "int2": "int2"}[expect.comm_dtype]
    assert built.comm_dtype == wire
    streaming.check_schedule(expect.k, built.num_fragments, built.fragment_sync_delay, "test")
    # Trainer flags: the CLI's own parser and run-config validation accept them
    argv = blocks["trainer"].split()
    assert argv[0] == "lookahead-dist"
    assert ("--eager-update" in argv) == eager
    assert ("--local-sgd-sharded" in argv) == sharded
    if topk is not None:
        assert argv[argv.index("--topk-fraction") + 1] == repr(topk)
    new = [f for f in ("--eager-update", "--topk-fraction") if f in argv and not _trainer_has(f)]
    if "--topk-fraction" in new:  # the trainer learns the flag in the same change: check the rest
        i = argv.index("--topk-fraction")
        argv = argv[:i] + argv[i + 2:]
    argv = [a for a in argv if a not in new]
    args = cli.build_parser().parse_args(argv[1:])
    (config,) = cli._configs(args, [(args.mode, "lookahead")])
    assert (config.k, config.num_fragments, config.fragment_sync_delay, config.comm_dtype) == (
        expect.k, expect.num_fragments, expect.fragment_sync_delay, expect.comm_dtype)
    assert config.hierarchical == (ranks_per_node > 1)
    if not new:
        assert getattr(config, "eager_update", False) == eager and getattr(config, "topk_fraction", None) == topk


@pytest.mark.parametrize("extra, rpn", [([], 1), (["--ranks-per-node", "4"], 4), (["--k", "64"], 1)])
def test_printed_config_blocks_parse(extra, rpn, capsys):
    _printed(_BASE + extra, rpn, capsys)


def _printed(argv, rpn, capsys) -> P.Option:
    """Run ``plan`` (text and --json) and check the recommendation's printed blocks."""
    code, out, _ = _run(argv, capsys)
    assert code == 0
    code, js, _ = _run(argv + ["--json"], capsys)
    rec = next(o for o in json.loads(js) if o["recommended"])
    assert rec["mode"] == "local_sgd"
    expect = P.Option("local_sgd", rec["k"], rec["num_fragments"], rec["fragment_sync_delay"], rec["comm_dtype"],
                      eager_update=rec["eager_update"], topk_fraction=rec["topk_fraction"])
    _check_blocks(_blocks(out), rpn, expect)
    assert f"k={rec['k']}, num_fragments={rec['num_fragments']}" in out
    assert "not yet available" not in out and "not in the library" not in out
    return expect


_SLOW = ["plan", "--params", "6.3M", "--step-time", "100ms", "--nodes", "2", "--link", "10Mbit"]


@pytest.mark.parametrize("extra, rpn, kind", [([], 1, "sparse"), (["--k", "16"], 1, "eager"),
                                              (["--ranks-per-node", "2"], 2, "sparse")])
def test_printed_config_blocks_parse_eager_and_sparse(extra, rpn, kind, capsys):
    """10 Mbit/s: no dense non-eager schedule reaches 95%; the recommendation's blocks still build."""
    expect = _printed(_SLOW + extra, rpn, capsys)
    if kind == "sparse":
        assert expect.topk_fraction is not None and expect.comm_dtype == "int2"
    else:
        assert expect.eager_update and expect.topk_fraction is None and expect.fragment_sync_delay == 0


@pytest.mark.parametrize("dtype", P.WIRE_FORMATS)
@pytest.mark.parametrize("rpn", [1, 2])
def test_config_blocks_every_wire_format(dtype, rpn):
    c = P.Cluster(nodes=4, ranks_per_node=rpn, link=P.Link(125 * MB))
    w = P.Workload(params=10**8, step_time=0.2)
    opts = [P.Option("local_sgd", 32, 4, 2, dtype), P.Option("local_sgd", 32, 2, 0, dtype, eager_update=True)]
    if dtype in P.SPARSE_FORMATS:
        opts += [P.Option("local_sgd", 32, 4, 2, dtype, topk_fraction=0.02),
                 P.Option("local_sgd", 32, 1, 0, dtype, eager_update=True, topk_fraction=0.01)]
    for opt in opts:
        _check_blocks(P.config_blocks(P.predict(opt, w, c), c), rpn, opt)


_KEYS = {"mode", "k", "num_fragments", "fragment_sync_delay", "comm_dtype", "eager_update", "topk_fraction",
         "utilization", "bytes_per_step", "recommended"}


@pytest.mark.parametrize("argv", [_BASE, ["plan", "--params", "125M", "--step-time", "1", "--nodes", "4",
                                          "--link", "100Gbit"]])
def test_json_schema(argv, capsys):
    code, out, _ = _run(argv + ["--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert isinstance(rows, list) and rows[0]["mode"] == "ddp"
    assert sum(r["recommended"] is True for r in rows) == 1
    for r in rows:
        assert _KEYS <= set(r)
        assert r["mode"] in ("ddp", "local_sgd") and r["comm_dtype"] in P.WIRE_FORMATS
        assert isinstance(r["eager_update"], bool) and r["available"] is True
        assert r["topk_fraction"] is None or (0 < r["topk_fraction"] <= 1 and r["comm_dtype"] in P.SPARSE_FORMATS)
        if r["eager_update"]:
            assert r["fragment_sync_delay"] == 0
        assert 0.0 < r["utilization"] <= 1.0 and isinstance(r["bytes_per_step"], int) and r["bytes_per_step"] > 0
        assert all(isinstance(r[k], int) for k in ("k", "num_fragments", "fragment_sync_delay"))
    ddp = rows[0]
    assert (ddp["k"], ddp["num_fragments"], ddp["fragment_sync_delay"]) == (1, 1, 0)
    # DDP: 2 (N-1)/N of the fp32 gradients per step
    n = int(argv[argv.index("--nodes") + 1])
    params = P.parse_count(argv[argv.index("--params") + 1])
    assert ddp["bytes_per_step"] == pytest.approx(2 * (n - 1) / n * 4 * params, rel=1e-9)


def test_model_file(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(100, 10), "nested": {"b": torch.zeros(24)}, "step": 3}, path)
    code, out, _ = _run(["plan", "--model-file", str(path), "--step-time", "0.1", "--nodes", "2",
                         "--link", "1Gbit", "--json"], capsys)
    assert code == 0
    assert json.loads(out)[0]["bytes_per_step"] == 4 * 1024  # 2 (1/2) * 4 bytes * 1024 values


@pytest.mark.parametrize("swap, flag", [
    (("--params", "-5"), "--params"), (("--params", "0"), "--params"), (("--params", "lots"), "--params"),
    (("--nodes", "0"), "--nodes"), (("--nodes", "-2"), "--nodes"), (("--link", "1Gb"), "--link"),
    (("--link", "10 furlongs"), "--link"), (("--link", "0Mbit"), "--link"), (("--step-time", "0"), "--step-time"),
    (("--step-time", "soon"), "--step-time"), (("--k", "0"), "--k"), (("--latency", "1 fortnight"), "--latency"),
])
def test_bad_input_names_the_flag(swap, flag, capsys):
    argv = list(_BASE)
    if swap[0] in argv:
        argv[argv.index(swap[0]) + 1] = swap[1]
    else:
        argv += list(swap)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err or f"{flag}:" in err, err


def test_bad_input_after_parsing(tmp_path, capsys):
    for argv, flag in [
        (["plan", "--probe", "node1", "--params", "1B", "--step-time", "1", "--nodes", "2"], "--probe"),
        (["plan", "--model-file", str(tmp_path / "missing.pt"), "--step-time", "1", "--nodes", "2", "--link", "1Gbit"],
         "--model-file"),
        (["plan", "--params", "1B", "--step-time", "1", "--nodes", "2"], "--link"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert flag in err, err
    assert math.isfinite(P.step_time_from_mfu(1e9, 1e5, peak_flops=989e12, mfu=0.4))


def test_docs_show_the_output_as_run(capsys):
    """docs/local-sgd.md, "Choosing F and tau": the `lookahead-dist plan` block is what it prints."""
    import shlex

    from tests._docblocks import collect

    key = ("docs/local-sgd.md", "$ lookahead-dist plan --params 6.3M --step-time 100ms --nodes 2 --link 200Mbit --k 16")
    lines = collect()[key].code.rstrip("\n").splitlines()
    argv = shlex.split(lines[0][2:])
    assert argv[0] == "lookahead-dist"
    code, out, _ = _run(argv[1:], capsys)
    assert code == 0
    assert out.rstrip("\n").splitlines() == lines[1:]
