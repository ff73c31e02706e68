"""Cost of the blockwise int8/int4 quantisation (lookahead_dist._quant) on this machine's CPU.

For a flat fp32 buffer of ``--numel`` elements it times, per MB of fp32 input (2**20 bytes):

- ``quantise``: :func:`quantize` (scales, rounding, int4 packing);
- ``dequantise``: :func:`dequantize`;
- ``q+dq``: the two together, the compute one quantised sync adds per rank at least twice over
  (stage 1 on the sender, stages 3-5 on the chunk owner and every receiver);
- ``feedback``: :func:`quantize_with_feedback` (quantise + update the residual), what
  ``quantized_all_reduce_async`` does on the caller's thread before it returns;

and reports the bytes per element that go on the wire (codes + fp32 scales), against a bf16
cast (``x.bfloat16().float()``) for scale. Rows are interleaved round by round and the median of
``--rounds`` rounds is printed. Run::

    python -m benchmarks.quant                       # 4M elements (16 MB), 1 thread
    python -m benchmarks.quant --numel 16777216 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lookahead_dist._quant import (
    dequantize,
    quantize,
    quantize_with_feedback,
    quantized_nbytes,
)


def _time(fn, reps: int) -> float:
    fn()  # warm-up (allocator, first-call paths)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Quantise/dequantise time per MB and bytes per element.")
    parser.add_argument("--numel", type=int, default=4 * 2**20, help="elements of the fp32 buffer")
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024], help="block sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="calls per timing")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    mb = x.numel() * 4 / 2**20

    rows: dict[str, dict[str, list[float]]] = {}
    configs = [(bits, block) for bits in (8, 4) for block in args.blocks]
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

    def bytes_per_elem(name: str) -> float:
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


if __name__ == "__main__":
    main()
