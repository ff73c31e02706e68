"""The closing summary table of the demo (plain text, fixed-width columns)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_bytes", "format_table", "summary_table"]


def format_bytes(n: float) -> str:
    """``1751040 -> '1.67 MiB'`` (binary units)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


HEADER = ("run", "k", "alpha", "train loss", "val loss", "samples/s", "comm/step/rank", "slow weights/rank", "time")


def _row(r: dict[str, Any]) -> list[str]:
    cfg = r["config"]
    if r.get("skipped"):
        return [r["name"], "", "", "skipped", "", "", "", "", ""]
    la = cfg["optimizer"] == "lookahead"
    slow = r["slow_bytes_per_rank"]
    return [
        r["name"],
        str(cfg["k"]) if la or cfg["mode"].endswith("local-sgd") else "-",
        f"{cfg['alpha']:g}" if la else "-",
        f"{r['train_loss_start']:.3f} -> {r['train_loss']:.3f}",
        f"{r['val_loss']:.3f}",
        f"{r['samples_per_s']:.0f}",
        format_bytes(r["comm_bytes_per_step"]),
        format_bytes(max(slow)) if la else "-",
        f"{r['seconds']:.0f} s",
    ]


def summary_table(results: Sequence[dict[str, Any]]) -> str:
    """The table for one or more runs, followed by a line per skipped run and the column notes."""
    text = format_table(HEADER, [_row(r) for r in results])
    notes = [f"  {r['name']}: skipped: {r['reason']}" for r in results if r.get("skipped")]
    ran = [r for r in results if not r.get("skipped")]
    if ran:
        first = ran[0]
        cfg = first["config"]
        m = cfg["model"]
        notes.append(
            f"  {first['params']:,} params ({m['n_layer']} layers, d={m['d_model']}, ctx {m['seq_len']}), "
            f"{cfg['steps']} steps x {cfg['batch_size']} sequences, {first['world_size']} ranks "
            f"({first['device']}, {first['backend']})"
        )
    notes.append(
        "  train loss: mean of the first -> last 10 steps; val loss: held-out text, final weights; "
        "comm: bytes each rank sends per step (ring estimate, counted at the collective calls); "
        "time: training loop only"
    )
    return text + "\n" + "\n".join(notes)
