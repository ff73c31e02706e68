"""Convergence of the real trainer on two real tasks: loss against steps and against wall-clock.

Tasks (both byte-level next-token prediction with the demo's transformer, real text, no download):

* ``pydoc``: Python's documentation topics (prose), the main job's data;
* ``stdlib``: the interpreter's standard-library source code (the first 1 MB of its sorted
  top-level modules).

Runs, on ``--nproc`` local ranks (gloo, spawned by the demo's launcher), the same batches and
initial weights: DDP + AdamW, DDP + Lookahead(AdamW) (k=5, alpha=0.5), and local-SGD Lookahead
with k=16 and alpha in {0.5, 1.0} (1.0 = plain periodic averaging) and with Nesterov outer momentum
(alpha=0.7, beta=0.9, DiLoCo's outer step). Output: a table (final train/val loss, gap to DDP +
AdamW) and one PNG per task in ``docs/img/``. The wall-clock axis spreads the run's measured loop
time evenly over its steps (the trainer reports the total, not per-step times).

    python -m benchmarks.convergence --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"

RUNS = [  # label, RunConfig overrides
    ("DDP + AdamW", dict(mode="ddp", optimizer="adamw")),
    ("DDP + Lookahead(AdamW) k=5 a=0.5", dict(mode="ddp", optimizer="lookahead", k=5, alpha=0.5)),
    ("local-SGD k=16 a=1.0 (averaging)", dict(mode="local-sgd", k=16, alpha=1.0)),
    ("local-SGD k=16 a=0.5", dict(mode="local-sgd", k=16, alpha=0.5)),
    ("local-SGD k=16 a=0.7 Nesterov b=0.9", dict(mode="local-sgd", k=16, alpha=0.7, outer_momentum=0.9,
                                                 nesterov=True)),
]


def run(corpus: str, steps: int, batch: int, nproc: int) -> list[dict]:
    from lookahead_dist.demo.config import RunConfig
    from lookahead_dist.demo.launch import run_local
    from lookahead_dist.demo.train import train_rank

    out = []
    for label, over in RUNS:
        cfg = RunConfig(**{**dict(steps=steps, batch_size=batch, nproc=nproc, eval_batches=8, corpus=corpus), **over})
        res = run_local(train_rank, nproc, (cfg, False, label))
        res["label"] = label
        out.append(res)
        print(f"[{corpus}] {label}: train {res['train_loss']:.3f} val {res['val_loss']:.3f} "
              f"({res['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return out


def plot(corpus: str, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        steps = [s for s, _ in r["loss_curve"]]
        loss = [v for _, v in r["loss_curve"]]
        per_step = r["seconds"] / r["config"]["steps"]
        a.plot(steps, loss, label=r["label"])
        b.plot([s * per_step for s in steps], loss, label=r["label"])
    a.set_xlabel("step")
    b.set_xlabel("wall-clock (s, loop time spread evenly over steps)")
    a.set_ylabel("training loss (nats/byte, mean over ranks)")
    a.set_title(f"{corpus}: loss vs steps")
    b.set_title(f"{corpus}: loss vs wall-clock")
    a.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[dict]) -> str:
    base = results[0]
    lines = ["| run | final train loss | val loss | val gap to DDP + AdamW | samples/s | comm MB/step/rank |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} "
                     f"| {r['val_loss'] - base['val_loss']:+.3f} | {r['samples_per_s']:.0f} "
                     f"| {r['comm_bytes_per_step'] / 1e6:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="loss vs steps / wall-clock on two real tasks")
    p.add_argument("--corpora", default="pydoc,stdlib")
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16, help="global")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--json-out", default=None)
    p.add_argument("--write", action="store_true", help="PNGs to docs/img/ and a section in docs/benchmarks.md")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    all_results = {c: run(c, args.steps, args.batch_size, args.nproc) for c in args.corpora.split(",")}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(all_results, indent=1))
    parts = []
    for corpus, results in all_results.items():
        png = IMG / f"convergence_{corpus}.png"
        if args.write:
            plot(corpus, results, png)
        first = results[0]
        m = first["config"]["model"]
        parts.append(f"### Task `{corpus}`\n\n![{corpus}](img/{png.name})\n\n{table(results)}\n\n"
                     f"{first['params']:,} parameters ({m['n_layer']} layers, d={m['d_model']}, ctx {m['seq_len']}), "
                     f"{args.steps} steps x {args.batch_size} sequences over {args.nproc} ranks (gloo, CPU), "
                     "AdamW lr 3e-3, weight decay 0.01, clip 1.0, seed 0; val loss on 8 held-out batches.")
    body = "\n\n".join(parts)
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        write_section("Convergence on real data (real trainer)",
                      f"OMP_NUM_THREADS=1 python -m benchmarks.convergence --corpora {args.corpora} --steps "
                      f"{args.steps} --batch-size {args.batch_size} --nproc {args.nproc} --write", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
