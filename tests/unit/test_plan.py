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
    c = P.sparse_all_gather(1_000_000, 8, link, fraction=0.01, value_bytes=4)
    # 10,000 values of 4 bytes + 4-byte index, sent to each of the 7 others (ring all-gather)
    assert c.rank_bytes == pytest.approx(7 * 10_000 * 8)
    assert c.seconds == pytest.approx(7e-3 + 7 * 10_000 * 8 / (10 * MB))
    c64 = P.sparse_all_gather(1_000_000, 64, link, fraction=0.01, value_bytes=4)
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
    # bf16 halves the bytes; eager (model only) overlaps k / F steps
    assert P.predict(P.Option("local_sgd", 16, comm_dtype="bf16"), w, cluster).bytes_per_step == pytest.approx(
        50 * MB / 16)
    eager = P.predict(P.Option("local_sgd", 16, eager_update=True), w, cluster)
    assert eager.utilization == 1.0 and not eager.option.available


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


def _any_reaches(w: P.Workload, c: P.Cluster, target: float = 0.95) -> bool:
    """Brute force over the planner's space (k grid, F | k up to 64, tau <= 5, every wire format)."""
    for k in P.DEFAULT_K_CHOICES:
        for f in (f for f in range(1, min(k, 64) + 1) if k % f == 0):
            for tau in range(min(k // f - 1, 5) + 1):
                for d in P.WIRE_FORMATS:
                    if P.predict(P.Option("local_sgd", k, f, tau, d), w, c).utilization >= target:
                        return True
    return False


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
            if rec.utilization < 0.95:  # only where nothing in the space reaches it
                assert result.notes and not _any_reaches(w, c), (params, rate, rec)
                assert rec.utilization == max(p.utilization for p in result.options[1:])
                unreached.append((params, rate))
                continue
            if rec.option.mode == "local_sgd":  # the smallest k that reaches the target
                assert result.ddp.utilization < 0.95
                reaching = [p.option.k for p in result.options[1:] if p.utilization >= 0.95]
                assert rec.option.k == min(reaching)
    # up to 64 nodes every case is hidden; at 1024 nodes the ring's 2 (N-1) latency rounds (2 s at
    # 1 ms per sync) exceed 5 steps of the 125M model (62 ms each) on every link, and of 1B on the slowest
    assert unreached == ([] if nodes <= 64 else [(125_000_000, r) for r in ("100Mbit", "1Gbit", "10Gbit", "100Gbit")]
                         + [(1_000_000_000, "100Mbit")])


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


def _check_blocks(blocks: dict[str, str], ranks_per_node: int, expect) -> None:
    # DeepSpeed: the block parser accepts it and it carries the option
    parsed = parse_lookahead_block(json.loads(blocks["deepspeed"])["lookahead"])
    opts = parsed["local_sgd"]["options"]
    assert parsed["k"] == expect.k and parsed["local_sgd"]["ranks_per_node"] == ranks_per_node
    assert (opts.num_fragments, opts.fragment_sync_delay) == (expect.num_fragments, expect.fragment_sync_delay)
    # Python: runs as printed (one node of ranks: the kwargs build LocalSGDOptions)
    ns: dict = {}
    if ranks_per_node == 1:
        exec(blocks["python"], ns)  # noqa: S102 - the printed block, run as a user would
        built = ns["local_sgd"]
    else:
        code = "\n".join(ln for ln in blocks["python"].splitlines() if "from_mesh" not in ln and "sharded=True" not in ln)
        exec(code, ns)  # noqa: S102
        assert "LocalSGDOptions.from_mesh(mesh" in blocks["python"]
        built = LocalSGDOptions(**ns["local_sgd_kwargs"])
    assert isinstance(built, LocalSGDOptions)
    assert (built.num_fragments, built.fragment_sync_delay) == (expect.num_fragments, expect.fragment_sync_delay)
    wire = {"fp32": None, "bf16": torch.bfloat16, "int8": "int8", "int4": "int4"}[expect.comm_dtype]
    assert built.comm_dtype == wire
    streaming.check_schedule(expect.k, built.num_fragments, built.fragment_sync_delay, "test")
    # Trainer flags: the CLI's own parser and run-config validation accept them
    argv = blocks["trainer"].split()
    assert argv[0] == "lookahead-dist"
    args = cli.build_parser().parse_args(argv[1:])
    (config,) = cli._configs(args, [(args.mode, "lookahead")])
    assert (config.k, config.num_fragments, config.fragment_sync_delay, config.comm_dtype) == (
        expect.k, expect.num_fragments, expect.fragment_sync_delay, expect.comm_dtype)
    assert config.hierarchical == (ranks_per_node > 1)


@pytest.mark.parametrize("extra, rpn", [([], 1), (["--ranks-per-node", "4"], 4), (["--k", "64"], 1)])
def test_printed_config_blocks_parse(extra, rpn, capsys):
    code, out, _ = _run(_BASE + extra, capsys)
    assert code == 0
    code, js, _ = _run(_BASE + extra + ["--json"], capsys)
    rec = next(o for o in json.loads(js) if o["recommended"])
    assert rec["mode"] == "local_sgd"
    expect = P.Option("local_sgd", rec["k"], rec["num_fragments"], rec["fragment_sync_delay"], rec["comm_dtype"])
    _check_blocks(_blocks(out), rpn, expect)
    assert f"k={rec['k']}, num_fragments={rec['num_fragments']}" in out
    assert "eager update: no (not yet available in the library)" in out


@pytest.mark.parametrize("dtype", P.WIRE_FORMATS)
@pytest.mark.parametrize("rpn", [1, 2])
def test_config_blocks_every_wire_format(dtype, rpn):
    c = P.Cluster(nodes=4, ranks_per_node=rpn, link=P.Link(125 * MB))
    w = P.Workload(params=10**8, step_time=0.2)
    opt = P.Option("local_sgd", 32, 4, 2, dtype)
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
        assert r["mode"] in ("ddp", "local_sgd") and r["comm_dtype"] in ("fp32", "bf16", "int8", "int4")
        assert r["eager_update"] is False and r["topk_fraction"] is None
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
