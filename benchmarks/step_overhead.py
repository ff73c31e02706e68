"""What Lookahead costs on top of its inner optimizer, measured side by side in one run.

For two parameter sets -- a few large tensors, and several hundred small ones -- it times:

- ``adamw``: one inner ``torch.optim.AdamW`` step (the default foreach implementation);
- ``sync``: lookahead-dist's slow update over all tensors (the real path: cached buckets);
- ``floor``: a bare ``torch._foreach_lerp_`` + ``torch._foreach_copy_`` over the same tensors, the
  memory-bound floor of any Lookahead sync;
- each peer's slow update, where the peer installs here (timm, pytorch_optimizer, torch-optimizer);
- ``la_k5`` vs ``adamw_x5``: five ``Lookahead(AdamW, k=5)`` steps against five bare AdamW steps, the
  amortised overhead a training run sees.

Timings are interleaved round by round (the machine is noisy) and the median of the rounds is
reported; ratios are computed from those medians. Run::

    python -m benchmarks.step_overhead            # default sizes
    python -m benchmarks.step_overhead --write    # and update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lookahead_dist import Lookahead


def make_params(kind: str, large_numel: int, small_count: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    if kind == "large":
        sizes = [large_numel // 4] * 4
    else:  # biases, norms, small projections: the many-small-tensors case
        cycle = [256, 1024, 4096, 16384]
        sizes = [cycle[i % len(cycle)] for i in range(small_count)]
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def load_timm_lookahead():
    """timm's optim/lookahead.py imports only torch, so it is loaded alone, from the timm wheel
    that launch/setup.sh downloads into .venv/peers (timm as a package needs torchvision)."""
    import sys
    import tempfile
    import zipfile

    wheels = sorted((Path(sys.prefix) / "peers").glob("timm-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as zf:
        source = zf.read("timm/optim/lookahead.py")
    path = Path(tempfile.mkdtemp()) / "timm_lookahead.py"
    path.write_bytes(source)
    mod_spec = importlib.util.spec_from_file_location("_timm_lookahead", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.Lookahead


def peer_syncs(params: list[torch.nn.Parameter], alpha: float) -> tuple[dict[str, Callable[[], None]], list[str]]:
    """Each installed peer's slow-update function over ``params``, and the peers that do not install."""
    fns: dict[str, Callable[[], None]] = {}
    missing: list[str] = []

    timm_cls = load_timm_lookahead()
    if timm_cls is None:
        missing.append("timm (launch/setup.sh downloads its wheel into .venv/peers)")
    else:
        opt = timm_cls(torch.optim.SGD(params, lr=0.0), alpha=alpha, k=5)
        opt.update_slow(opt.param_groups[0])  # creates its slow buffers
        fns["timm"] = lambda: opt.update_slow(opt.param_groups[0])

    try:
        from pytorch_optimizer import Lookahead as POLookahead
    except ImportError:
        missing.append("pytorch_optimizer")
    else:
        po = POLookahead(torch.optim.SGD(params, lr=0.0), k=5, alpha=alpha)
        fns["pytorch_optimizer"] = lambda: po.update(po.param_groups[0])

    try:
        from torch_optimizer import Lookahead as TOLookahead
    except ImportError:
        missing.append("torch-optimizer (needs pytorch_ranger)")
    else:
        to = TOLookahead(torch.optim.SGD(params, lr=0.0), k=5, alpha=alpha)
        to._update(to.param_groups[0])  # creates its slow buffers
        fns["torch-optimizer"] = lambda: to._update(to.param_groups[0])
    return fns, missing


def interleaved_medians(fns: dict[str, Callable[[], None]], rounds: int, inner: int) -> dict[str, float]:
    """Median over ``rounds`` of the mean time of ``inner`` calls, each round visiting every fn."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: allocations, caches
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def measure(kind: str, large_numel: int, small_count: int, rounds: int, alpha: float = 0.5) -> dict:
    params = make_params(kind, large_numel, small_count)
    numel = sum(p.numel() for p in params)
    inner = 1 if kind == "large" else 5

    # Lookahead around AdamW: one step creates the slow weights and the AdamW state.
    la = Lookahead(torch.optim.AdamW(params, lr=1e-6), k=5, alpha=alpha)
    la.step()
    group = la.param_groups[0]
    la._sync(group["params"], alpha)  # builds the cached buckets once
    bare = torch.optim.AdamW(params, lr=1e-6)
    bare.step()

    slows = [la.slow_weight(p) for p in params]
    fasts = [p.detach() for p in params]

    def floor() -> None:
        torch._foreach_lerp_(slows, fasts, alpha)
        torch._foreach_copy_(fasts, slows)

    def la_k5() -> None:
        for _ in range(5):
            la.step()

    def adamw_x5() -> None:
        for _ in range(5):
            bare.step()

    peers, missing = peer_syncs(params, alpha)
    fns = {
        "adamw": bare.step,
        "sync": lambda: la._sync(group["params"], alpha),
        "floor": floor,
        **{f"peer:{name}": fn for name, fn in peers.items()},
    }
    t = interleaved_medians(fns, rounds, inner)
    t.update(interleaved_medians({"la_k5": la_k5, "adamw_x5": adamw_x5}, rounds, 1))
    return dict(kind=kind, tensors=len(params), numel=numel, times=t, peers=list(peers), missing=missing)


def format_result(r: dict) -> str:
    t = r["times"]
    ms = lambda s: f"{s * 1e3:.3f} ms"  # noqa: E731
    lines = [
        f"**{r['kind']}**: {r['tensors']} tensors, {r['numel'] / 1e6:.1f}M parameters (fp32)",
        "",
        "| measurement | time | vs floor | vs AdamW step |",
        "|---|---|---|---|",
    ]
    for name in ["floor", "sync", *[f"peer:{p}" for p in r["peers"]], "adamw"]:
        lines.append(f"| {name} | {ms(t[name])} | {t[name] / t['floor']:.2f}x | {t[name] / t['adamw']:.1%} |")
    fastest_peer = min((t[f"peer:{p}"] for p in r["peers"]), default=float("nan"))
    overhead = t["la_k5"] / t["adamw_x5"] - 1
    lines += [
        "",
        f"- sync / floor: **{t['sync'] / t['floor']:.2f}x** (target <= 1.3x)",
        f"- fastest peer / sync: **{fastest_peer / t['sync']:.2f}x** (target >= 2x on the small-tensor set)",
        f"- amortised overhead of Lookahead(AdamW, k=5) over AdamW, measured on 5-step blocks: "
        f"**{overhead:+.1%}** (target < 3%); from the sync alone: {t['sync'] / 5 / t['adamw']:.1%}",
    ]
    if r["missing"]:
        lines.append(f"- not installed here, not measured: {', '.join(r['missing'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Lookahead sync and step overhead vs AdamW, the foreach floor and peers.")
    parser.add_argument("--large-numel", type=int, default=50_000_000, help="parameters in the large-tensor set")
    parser.add_argument("--small-count", type=int, default=600, help="tensors in the small-tensor set")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="update the section in docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = []
    for kind in ("large", "small"):
        r = measure(kind, args.large_numel, args.small_count, args.rounds)
        blocks.append(format_result(r))
        print(blocks[-1], "\n", flush=True)
    if args.write:
        from benchmarks._docs import write_section

        cmd = "python -m benchmarks.step_overhead --write"
        write_section("Step overhead", cmd, f"torch threads: {torch.get_num_threads()}\n\n" + "\n\n".join(blocks))


if __name__ == "__main__":
    main()
