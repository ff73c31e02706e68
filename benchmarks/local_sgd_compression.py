"""Loss cost of the local-SGD wire formats and of streaming, with the real trainer.

Same task, batches and initial weights for every row (the demo's byte-level transformer on the
``pydoc`` corpus, 2 ranks, gloo): local-SGD Lookahead k=16, alpha=0.5, with the sync sent as
fp32, bf16, int8 and int4 (error feedback on and off), blocking and streamed (F fragments,
delay tau). Prints a markdown table (final train loss, validation loss, gap to the blocking fp32
row, bytes per step per rank as counted at the collectives).

    OMP_NUM_THREADS=1 python -m benchmarks.local_sgd_compression --steps 300
"""

from __future__ import annotations

import argparse
import json
import sys

ROWS = [  # label, RunConfig overrides
    ("blocking fp32", {}),
    ("blocking bf16", dict(comm_dtype="bf16")),
    ("blocking int8", dict(comm_dtype="int8")),
    ("blocking int4", dict(comm_dtype="int4")),
    ("blocking int4, no error feedback", dict(comm_dtype="int4", error_feedback=False)),
    ("streaming F=2 tau=1 fp32", dict(num_fragments=2, fragment_sync_delay=1)),
    ("streaming F=2 tau=1 int8", dict(num_fragments=2, fragment_sync_delay=1, comm_dtype="int8")),
    ("streaming F=4 tau=3 int4", dict(num_fragments=4, fragment_sync_delay=3, comm_dtype="int4")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--corpus", default="pydoc")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()

    from lookahead_dist.demo.config import RunConfig
    from lookahead_dist.demo.launch import run_local
    from lookahead_dist.demo.train import train_rank

    results = []
    for label, over in ROWS:
        cfg = RunConfig(mode="local-sgd", k=16, alpha=0.5, steps=args.steps, batch_size=args.batch_size, nproc=2,
                        eval_batches=8, corpus=args.corpus, **over)
        res = run_local(train_rank, 2, (cfg, False, label))
        res["label"] = label
        results.append(res)
        print(f"{label}: train {res['train_loss']:.4f} val {res['val_loss']:.4f} "
              f"bytes/step {res['comm_bytes_per_step']:.0f}", file=sys.stderr, flush=True)
    base = results[0]["val_loss"]
    print("| run | final train loss | val loss | val gap to blocking fp32 | wire bytes/step/rank |")
    print("|---|---|---|---|---|")
    for r in results:
        gap = 100 * (r["val_loss"] - base) / base
        print(f"| {r['label']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | {gap:+.2f}% | "
              f"{r['comm_bytes_per_step']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in results], f, indent=1)


if __name__ == "__main__":
    main()
