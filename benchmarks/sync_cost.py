"""The CPU cost of a local-SGD sync, per step of the cycle, for the sync step alone, or for the
quantisation inside it. Three modes:

``--mode cycle`` (default; torchrun, 2 ranks on loopback, no shaping: the CPU cost alone): where a
sync's time goes, step by step of the cycle. ``opt.step()`` and forward+backward are timed
separately at each position ``t mod k``, median over the cycles after two warm-up cycles, printed
by rank 0. The streaming benchmark's model (4.82M parameters, batch 2 x 64 tokens),
Lookahead(AdamW), k = 16; a run with ``--k 1000000`` (no sync) gives a step without one::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/sync_cost.py --num-fragments 2 --delay 3
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/sync_cost.py --num-fragments 4 --delay 2 --comm-dtype int4

``--mode sync-step`` (torchrun, one rank per node of the simulated cluster): the blocking sync
step of Lookahead(AdamW) alone. The same model, k = 4, 8 syncs; rank 0 prints ``RESULT {json}``
with every sync step's ``opt.step()`` time and the median of the other steps. Compare two versions
of the library by putting one first on PYTHONPATH (``git archive <commit> src | tar -x -C /tmp/base``)::

    PYTHONPATH=/tmp/base/src python tools/netcluster.py --nodes 2 --rate 200mbit --log-dir /tmp/st \\
        --torchrun benchmarks/sync_cost.py --mode sync-step && grep RESULT /tmp/st/node0.log

``--mode quant`` (one process, no torchrun): the blockwise int8/int4/int2 quantisation of
``lookahead_dist._quant`` on this CPU, per MB of fp32 input (2**20 bytes), for a flat buffer of
``--numel`` elements: ``quantise``, ``dequantise``, ``q+dq`` (the compute one quantised sync adds
per rank at least twice over), ``feedback`` (quantise + update the residual, what
``quantized_all_reduce_async`` does on the caller's thread), and the bytes per element on the
wire (codes + fp32 scales), beside a bf16 cast for scale; ``--compiled`` adds the library's
fused sender kernel (``LocalSGDOptions(fused_kernels=True)``, Note [Fused quantisation kernels] in
_fused.py) in the feedback column. Rows interleave round by round; the median of ``--rounds``
rounds is printed::

    python -m benchmarks.sync_cost --mode quant                 # 4M elements (16 MB), 1 thread
    python -m benchmarks.sync_cost --mode quant --numel 16777216 --threads 2

``--mode topk`` (one process): the sparse launch's top-k selection (Note [Top-k selection] in
``lookahead_dist/_sparse.py``) against one ``torch.topk`` over every 256-entry row, and the whole
``encode`` of a top-k fraction, per k, ``--rounds`` interleaved rounds (median [min-max])::

    python -m benchmarks.sync_cost --mode topk --numel 6291456 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch


def _model() -> torch.nn.Module:
    from lookahead_dist.demo.model import ModelConfig, TinyLM

    torch.manual_seed(0)
    return TinyLM(ModelConfig(n_layer=6, d_model=256, n_head=8, seq_len=64))


def cycle(args: argparse.Namespace) -> None:
    """``opt.step()`` and forward+backward at each position of the cycle (rank 0 prints)."""
    import torch.distributed as dist

    from lookahead_dist import LocalSGDOptions, Lookahead
    from lookahead_dist.demo.model import lm_loss

    dist.init_process_group("gloo")
    model = _model()
    cd = torch.bfloat16 if args.comm_dtype == "bf16" else args.comm_dtype
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-4), k=args.k, alpha=0.5,
                    local_sgd=LocalSGDOptions(num_fragments=args.num_fragments,
                                              fragment_sync_delay=args.delay, comm_dtype=cd))
    x, y = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))
    period = min(args.k, 16)
    fwd: dict[int, list[float]] = {}
    stp: dict[int, list[float]] = {}
    for t in range(period * args.cycles):
        t0 = time.perf_counter()
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if t >= 2 * period:
            fwd.setdefault(t % period, []).append(t1 - t0)
            stp.setdefault(t % period, []).append(t2 - t1)
    if dist.get_rank() == 0:
        what = f"k={args.k} F={args.num_fragments} tau={args.delay} wire={args.comm_dtype or 'fp32'}"
        for label, d in (("forward+backward", fwd), ("opt.step()", stp)):
            print(f"{what}: {label + ' ms at t mod ' + str(period) + ':':<34}",
                  " ".join(f"{1e3 * statistics.median(d[i]):.1f}" for i in range(period)))
        total = sum(statistics.median(fwd[i]) + statistics.median(stp[i]) for i in range(period))
        print(f"{what}: one cycle {1e3 * total:.0f} ms")
    dist.destroy_process_group()


def sync_step(args: argparse.Namespace) -> None:
    """The blocking sync step alone: k = 4, 8 syncs (rank 0 prints ``RESULT {json}``)."""
    import torch.distributed as dist

    import lookahead_dist
    from lookahead_dist import Lookahead

    try:
        from lookahead_dist import LocalSGDOptions
    except ImportError:  # a library older than the top-level export (PYTHONPATH=<commit>/src)
        from lookahead_dist.sync.local_sgd import LocalSGDOptions

    dist.init_process_group("gloo")
    m = _model()
    k = 4
    opt = Lookahead(torch.optim.AdamW(m.parameters(), lr=3e-3, foreach=True), k=k, alpha=0.5,
                    local_sgd=LocalSGDOptions(module=m))
    x = torch.randint(0, 256, (2, 64))
    sync, other = [], []
    for i in range(1, 8 * k + 1):
        loss = m(x).float().mean()
        opt.zero_grad()
        loss.backward()
        dist.barrier()
        t = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t
        (sync if i % k == 0 else other).append(dt)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"lib": lookahead_dist.__file__, "sync_s": [round(s, 4) for s in sorted(sync)],
                                      "sync_median": statistics.median(sync),
                                      "other_median": statistics.median(other)}))
    dist.destroy_process_group()


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (allocator, first-call paths)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def quant(args: argparse.Namespace) -> None:
    """Quantise/dequantise time per MB and bytes per element (one process)."""
    from lookahead_dist._quant import (
        dequantize,
        quantize,
        quantize_with_feedback,
        quantized_nbytes,
    )

    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    mb = x.numel() * 4 / 2**20
    rows: dict[str, dict[str, list[float]]] = {}
    configs = [(bits, block) for bits in (8, 4, 2) for block in args.blocks]
    for _ in range(args.rounds):
        r = rows.setdefault("bf16 cast", {"q": [], "dq": [], "qdq": [], "fb": []})
        r["q"].append(_time(lambda: x.bfloat16(), args.reps))
        xb = x.bfloat16()
        r["dq"].append(_time(xb.float, args.reps))
        r["qdq"].append(_time(lambda: x.bfloat16().float(), args.reps))
        r["fb"].append(float("nan"))
        for bits, block in configs:
            r = rows.setdefault(f"int{bits} B={block}", {"q": [], "dq": [], "qdq": [], "fb": []})
            q = quantize(x, bits=bits, block_size=block)
            e = torch.zeros_like(x)
            kw = {"bits": bits, "block_size": block}
            r["q"].append(_time(lambda kw=kw: quantize(x, **kw), args.reps))
            r["dq"].append(_time(lambda q=q: dequantize(q), args.reps))
            r["qdq"].append(_time(lambda kw=kw: dequantize(quantize(x, **kw)), args.reps))
            r["fb"].append(_time(lambda e=e, kw=kw: quantize_with_feedback(x, e, **kw), args.reps))

    if args.compiled:  # the library's fused sender kernel (LocalSGDOptions(fused_kernels=True))
        from lookahead_dist import _fused

        t0 = time.perf_counter()
        for bits, block in configs:
            _fused.send(x.view(-1, block), torch.zeros_like(x).view(-1, block), bits)
        compile_s = time.perf_counter() - t0
        for _ in range(args.rounds):
            for bits, block in configs:
                r = rows.setdefault(f"int{bits} B={block} compiled", {"q": [], "dq": [], "qdq": [], "fb": []})
                e = torch.zeros_like(x).view(-1, block)
                for key in ("q", "dq", "qdq"):
                    r[key].append(float("nan"))
                r["fb"].append(_time(lambda e=e, b=bits, B=block: _fused.send(x.view(-1, B), e, b), args.reps))
        print(f"torch.compile of the fused sender kernel (all configurations): {compile_s:.1f} s")

    def bytes_per_elem(name: str) -> float:
        name = name.removesuffix(" compiled")
        if name == "bf16 cast":
            return 2.0
        bits, block = name[3], int(name.split("B=")[1])
        return quantized_nbytes(args.numel, bits=int(bits), block_size=block) / args.numel

    print(f"numel={args.numel} ({mb:.0f} MB fp32), threads={args.threads}, torch {torch.__version__}, "
          f"median of {args.rounds} rounds x {args.reps} calls; times in ms per MB of fp32 input")
    print()
    print("| format | bytes/elem | vs fp32 | quantise | dequantise | q+dq | with feedback |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        med = {k: statistics.median(v) * 1e3 / mb for k, v in r.items()}
        b = bytes_per_elem(name)
        fb = "-" if name == "bf16 cast" else f"{med['fb']:.2f}"
        print(f"| {name} | {b:.4f} | {b / 4:.4f} | {med['q']:.2f} | {med['dq']:.2f} | {med['qdq']:.2f} | {fb} |")


# -- the sync against its memory-traffic floor ---------------------------------------------------
FLOOR_FORMATS = ("fp32", "int8", "int4", "int2", "top2%-int2", "int8-fused", "int4-fused", "int2-fused")
"""``-fused``: ``LocalSGDOptions(fused_kernels=True)`` (Note [Fused quantisation kernels])."""


def _floor_options(fmt: str) -> dict[str, object]:
    if fmt.endswith("-fused"):
        return {**_floor_options(fmt.removesuffix("-fused")), "fused_kernels": True}
    if fmt == "fp32":
        return {}
    if fmt.startswith("top"):
        frac, wire = fmt[3:].split("%-")
        return {"comm_dtype": wire, "topk_fraction": float(frac) / 100}
    return {"comm_dtype": fmt}


def floor_bytes(fmt: str, numel: int, n: int) -> dict[str, float]:
    """The bytes one sync of ``numel`` fp32 elements must read and write on one of ``n`` ranks, if
    every buffer were touched once per pass the algorithm needs (Note [Quantised sync] and Note
    [Sparse outer gradients] name the passes):

    - launch: read the fast and slow weights (and, with error feedback, read and write the residual),
      write what is sent;
    - the wire: what this rank sends and receives (each crosses memory once here);
    - the owner's stage of a quantised reduce: read the N received chunks of its 1/N, read and write
      its owner residual, write the requantised chunk;
    - apply: read the mean (the codes, or the dense fp32 mean), read and write the slow weights,
      write the fast weights.
    The outer step here is plain Lookahead (no outer momentum); a fused format has its base's floor."""
    fmt = fmt.removesuffix("-fused")
    p = float(numel)
    if fmt == "fp32":
        wire = 2 * 2 * (n - 1) / n * 4 * p  # ring all-reduce: sent + received
        return {"launch": 12 * p, "wire": wire, "owner": 0.0, "apply": 16 * p}
    if fmt.startswith("top"):
        from lookahead_dist._sparse import sparse_nbytes

        frac, wire_dtype = fmt[3:].split("%-")
        payload = sparse_nbytes(numel, fraction=float(frac) / 100, bits=int(wire_dtype[3:]))
        # launch: fast, slow, residual read, residual written, payload written; all-gather: (n-1)
        # payloads in, ours out; apply: n payloads read, the dense mean written and read, slow r/w, fast w
        return {"launch": 16 * p + payload, "wire": n * payload, "owner": 0.0,
                "apply": n * payload + 8 * p + 8 * p + 4 * p}
    from lookahead_dist._quant import quantized_nbytes

    codes = quantized_nbytes(numel, bits=int(fmt[3:]))
    wire = 2 * 2 * (n - 1) / n * codes  # all-to-all of chunks, then all-gather of owned chunks
    owner = codes + 8 * p / n + codes / n
    return {"launch": 16 * p + codes, "wire": wire, "owner": owner, "apply": codes + 12 * p}


def _copy_bandwidth(numel: int, reps: int = 7) -> float:
    """Bytes per second of one thread's ``copy_`` (read + write), the median of ``reps``."""
    a, b = torch.randn(numel), torch.empty(numel)
    b.copy_(a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    return 2 * 4 * numel / statistics.median(times)


def _bare_collectives(fmt: str, numel: int, group) -> Callable[[], None]:
    """The collectives one sync of ``fmt`` issues, with the same payloads and nothing else: what
    gloo's transport alone costs the CPU (the loopback TCP copies, its threads), measured beside
    the sync. The floor counts the wire bytes once at memory bandwidth; this is what they cost."""
    import torch.distributed as dist

    from lookahead_dist import _comm

    n = dist.get_world_size(group)
    fmt = fmt.removesuffix("-fused")
    if fmt == "fp32":
        buf = torch.randn(numel)
        return lambda: _comm.all_reduce(buf, group, None, "bare").wait()
    if fmt.startswith("top"):
        from lookahead_dist._sparse import sparse_nbytes

        frac, wire_dtype = fmt[3:].split("%-")
        payload = torch.zeros(sparse_nbytes(numel, fraction=float(frac) / 100, bits=int(wire_dtype[3:])),
                              dtype=torch.uint8)
        gathered = torch.empty(n * payload.numel(), dtype=torch.uint8)
        return lambda: _comm.all_gather(gathered, payload, group, None, "bare")
    from lookahead_dist._quant import _plan

    plan = _plan(numel, n, int(fmt[3:]), 512)
    send = torch.zeros(n * plan.seg_bytes, dtype=torch.uint8)
    recv = torch.empty_like(send)
    mine = torch.zeros(plan.seg_bytes, dtype=torch.uint8)
    gathered = torch.empty_like(send)

    def run() -> None:
        _comm.all_to_all(recv, send, group, None, "bare")
        _comm.all_gather(gathered, mine, group, None, "bare")
    return run


def _transport_cpu(fmt: str, numel: int, group, calls: int) -> list[float]:
    """CPU seconds (this process, all threads) of each of ``calls`` bare-collective rounds."""
    import torch.distributed as dist

    fn = _bare_collectives(fmt, numel, group)
    fn()  # warm-up: gloo's buffers for these sizes
    out = []
    for _ in range(calls):
        dist.barrier()
        c0 = time.process_time()
        fn()
        out.append(time.process_time() - c0)
    return out


def _floor_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    import os

    import torch.distributed as dist

    from lookahead_dist import LocalSGDOptions, Lookahead

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bare_group = dist.new_group(list(range(world)))  # the bare collectives, apart from the sync's groups
    # The bandwidth a rank gets while the other copies too (both ranks sync at once on shared cores)
    dist.barrier()
    both_bw = _copy_bandwidth(args.floor_numel, reps=41)  # long enough that the two loops overlap
    k = 4  # F = 1, tau = 1: count k launches, count 1 of the next cycle applies
    per = args.floor_numel // args.floor_tensors
    rows: dict[str, dict[str, list[float]]] = {}
    order = [f for _ in range(args.rounds) for f in args.formats]
    import random

    random.Random(0).shuffle(order)
    for fmt in order:
        params = [torch.nn.Parameter(torch.randn(per, generator=torch.Generator().manual_seed(i)))
                  for i in range(args.floor_tensors)]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = Lookahead(torch.optim.SGD(params, lr=1e-3, foreach=True), k=k, alpha=0.5,
                        local_sgd=LocalSGDOptions(fragment_sync_delay=0 if args.blocking else 1,
                                                  **_floor_options(fmt)))
        marks: list[tuple[int, float, float, float]] = []  # (count, wall start, wall end, cpu)
        for i in range(1, k * args.cycles + 1):
            dist.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            opt.step()
            t1 = time.perf_counter()
            time.sleep(args.gap)  # the transfer and the worker thread finish here
            marks.append(((i - 1) % k + 1, t0, t1, time.process_time() - c0))
        warm = 2 * k
        quiet_wall = statistics.median(t1 - t0 for n, t0, t1, _ in marks[warm:] if n in (2, 3))
        quiet_cpu = statistics.median(c for n, _, _, c in marks[warm:] if n in (2, 3))
        r = rows.setdefault(fmt, {"launch": [], "apply": [], "cpu": [], "transport": []})
        r["transport"] += _transport_cpu(fmt, args.floor_numel, bare_group, args.cycles - 2)
        for j in range(warm, len(marks) - 1):
            if marks[j][0] == k and (args.blocking or marks[j + 1][0] == 1):
                r["launch"].append(marks[j][2] - marks[j][1] - quiet_wall)
                if not args.blocking:
                    r["apply"].append(marks[j + 1][2] - marks[j + 1][1] - quiet_wall)
                    r["cpu"].append(marks[j][3] + marks[j + 1][3] - 2 * quiet_cpu)
                else:
                    r["cpu"].append(marks[j][3] - quiet_cpu)
        del opt, params
    if rank == 0:
        out.update(rows)
        out["_both_bw"] = both_bw
    dist.destroy_process_group()


def floor(args: argparse.Namespace) -> None:
    """The sync's CPU time per fragment against its memory-traffic floor (2 ranks, one process each)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bw = _copy_bandwidth(args.floor_numel)
    mgr = mp.Manager()
    out = mgr.dict()
    mp.spawn(_floor_worker, args=(2, port, args, out), nprocs=2)
    rows = dict(out)
    both_bw = rows.pop("_both_bw")
    mb = args.floor_numel * 4 / 1e6
    print(f"fragment of {args.floor_numel} fp32 elements ({mb:.0f} MB) in {args.floor_tensors} tensors, 2 ranks "
          f"on loopback, 1 thread each, F=1 tau={0 if args.blocking else 1}; copy bandwidth {bw / 1e9:.2f} GB/s "
          f"(one thread alone), {both_bw / 1e9:.2f} GB/s (rank 0 while rank 1 copies too); medians of "
          f"{args.rounds} shuffled rounds x {args.cycles - 2} syncs")
    print()
    print("| format | launch ms (caller) | apply ms (caller) | CPU ms, all threads | floor MB | floor ms | CPU / floor "
          "| floor ms, both ranks copying | CPU / that floor | bare collectives, CPU ms "
          "| (CPU - collectives) / floor with both copying |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    result = {}
    for fmt in args.formats:
        r = rows[fmt]
        fb = floor_bytes(fmt, args.floor_numel, 2)
        total = sum(fb.values())
        fl = total / bw
        cpu = statistics.median(r["cpu"])
        spread = (min(r["cpu"]), max(r["cpu"]))
        tr = statistics.median(r["transport"])
        ap = f"{1e3 * statistics.median(r['apply']):.1f}" if r["apply"] else "-"
        print(f"| {fmt} | {1e3 * statistics.median(r['launch']):.1f} | {ap} | {1e3 * cpu:.1f} "
              f"[{1e3 * spread[0]:.1f}-{1e3 * spread[1]:.1f}] | {total / 1e6:.0f} | {1e3 * fl:.1f} | {cpu / fl:.2f} "
              f"| {1e3 * total / both_bw:.1f} | {cpu * both_bw / total:.2f} "
              f"| {1e3 * tr:.1f} [{1e3 * min(r['transport']):.1f}-{1e3 * max(r['transport']):.1f}] "
              f"| {(cpu - tr) * both_bw / total:.2f} |")
        result[fmt] = {"cpu_s": r["cpu"], "launch_s": r["launch"], "apply_s": r["apply"], "floor_bytes": fb,
                       "bandwidth": bw, "ratio": cpu / fl, "transport_s": r["transport"],
                       "bandwidth_both_ranks": both_bw, "ratio_both_ranks": cpu * both_bw / total,
                       "ratio_without_transport": (cpu - tr) / fl,
                       "ratio_without_transport_both_ranks": (cpu - tr) * both_bw / total}
    print("RESULT " + json.dumps(result))


def topk(args: argparse.Namespace) -> None:
    """The two-level top-k selection against one ``torch.topk`` per row, and ``encode`` (ms)."""
    from lookahead_dist import _sparse

    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    mag = x.view(-1, _sparse.INDEX_BLOCK).abs()
    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for k in args.topk_k:
            frac = k / _sparse.INDEX_BLOCK
            fmt = _sparse.sparse_format(args.numel, fraction=frac, bits=2)
            res = torch.zeros(args.numel)
            cases = {f"k={k} torch.topk per row": lambda k=k: mag.topk(k, dim=1, sorted=False).indices.sort(dim=1),
                     f"k={k} _select (two-level)": lambda k=k: _sparse._select(mag, k),
                     f"k={k} encode, int2 + feedback": lambda fmt=fmt, res=res: _sparse.encode(x, fmt, res)}
            for name, fn in cases.items():
                rows.setdefault(name, []).append(_time(fn, args.reps))
    print(f"numel={args.numel}, threads={args.threads}, torch {torch.__version__}, {args.rounds} rounds x "
          f"{args.reps} calls")
    print("| case | ms, median [min-max] |")
    print("|---|---|")
    for name, ts in rows.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} [{1e3 * min(ts):.1f}-{1e3 * max(ts):.1f}] |")
    print("RESULT " + json.dumps({name: ts for name, ts in rows.items()}))


MODES = {"cycle": cycle, "sync-step": sync_step, "quant": quant, "floor": floor, "topk": topk}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=tuple(MODES), default="cycle")
    g = ap.add_argument_group("--mode cycle")
    g.add_argument("--k", type=int, default=16)
    g.add_argument("--num-fragments", type=int, default=1)
    g.add_argument("--delay", type=int, default=0, help="fragment_sync_delay (tau)")
    g.add_argument("--comm-dtype", default=None, choices=(None, "bf16", "int8", "int4"))
    g.add_argument("--cycles", type=int, default=12, help="(also --mode floor)")
    g = ap.add_argument_group("--mode floor")
    g.add_argument("--formats", nargs="+", default=list(FLOOR_FORMATS), choices=FLOOR_FORMATS)
    g.add_argument("--floor-numel", type=int, default=6 * 2**20, help="elements of the synced fragment")
    g.add_argument("--floor-tensors", type=int, default=6)
    g.add_argument("--gap", type=float, default=0.08, help="seconds of sleep after each step")
    g.add_argument("--blocking", action="store_true", help="tau = 0 (the wait inside the step)")
    g = ap.add_argument_group("--mode quant")
    g.add_argument("--numel", type=int, default=4 * 2**20, help="elements of the fp32 buffer")
    g.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024], help="block sizes")
    g.add_argument("--rounds", type=int, default=5, help="(also --mode floor)")
    g.add_argument("--reps", type=int, default=3, help="calls per timing")
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    g.add_argument("--topk-k", type=int, nargs="+", default=[3, 5, 8, 13], help="--mode topk: k per 256")
    g.add_argument("--compiled", action="store_true",
                   help="also the library's fused sender kernel (fused_kernels=True; compiles first)")
    args = ap.parse_args(argv)
    if args.mode != "quant":
        torch.set_num_threads(1)
    MODES[args.mode](args)


if __name__ == "__main__":
    main()
