"""Noisy quadratic model: steady-state variance of Lookahead(SGD) against SGD, measured and in closed form.

Per coordinate, the loss is ``a/2 (x - c)^2`` with ``c ~ N(0, sigma^2)`` drawn afresh each step, so
SGD with learning rate gamma iterates ``x <- rho x + gamma a c`` with ``rho = 1 - gamma a``. Its
stationary variance is ``V_SGD = gamma^2 a^2 sigma^2 / (1 - rho^2)``, and Lookahead's slow weights
have (Zhang et al. 2019, Proposition 1)::

    V_LA / V_SGD = alpha^2 (1 - rho^{2k}) / (alpha^2 (1 - rho^{2k}) + 2 alpha (1 - alpha) (1 - rho^k))

Both are measured here with the real :class:`lookahead_dist.Lookahead` around ``torch.optim.SGD``
over many independent coordinates.

Run: ``python -m benchmarks.nqm`` (prints a table; ``--write`` updates docs/benchmarks.md).
"""

from __future__ import annotations

import argparse

import torch

from lookahead_dist import Lookahead

SETTINGS = [  # (gamma, a, k, alpha)
    (0.5, 1.0, 5, 0.5),
    (0.1, 1.0, 10, 0.8),
    (0.3, 2.0, 5, 0.3),
]


def closed_form_ratio(gamma: float, a: float, k: int, alpha: float) -> float:
    rho = 1.0 - gamma * a
    num = alpha**2 * (1 - rho ** (2 * k))
    return num / (num + 2 * alpha * (1 - alpha) * (1 - rho**k))


def sgd_variance_closed_form(gamma: float, a: float, sigma: float = 1.0) -> float:
    rho = 1.0 - gamma * a
    return gamma**2 * a**2 * sigma**2 / (1 - rho**2)


def measure_variance(gamma: float, a: float, k: int, alpha: float | None, *, coords: int = 50_000,
                     samples: int = 400, burn_in_syncs: int = 60, seed: int = 0) -> float:
    """Stationary variance of SGD's iterate (alpha=None) or of Lookahead's slow weights.

    Sampled every k steps (at syncs for Lookahead) after a burn-in, averaged over coordinates.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.zeros(coords, dtype=torch.float64))
    opt: torch.optim.Optimizer = torch.optim.SGD([x], lr=gamma)
    if alpha is not None:
        opt = Lookahead(opt, k=k, alpha=alpha)
    total, count = 0.0, 0
    for sync in range(burn_in_syncs + samples):
        for _ in range(k):
            c = torch.randn(coords, generator=gen, dtype=torch.float64)
            x.grad = a * (x.detach() - c)
            opt.step()
        if sync >= burn_in_syncs:
            total += x.detach().square().mean().item()
            count += 1
    return total / count


def table(settings=SETTINGS, **kw) -> list[dict]:
    rows = []
    for gamma, a, k, alpha in settings:
        v_sgd = measure_variance(gamma, a, k, None, **kw)
        v_la = measure_variance(gamma, a, k, alpha, **kw)
        rows.append(dict(gamma=gamma, a=a, k=k, alpha=alpha, v_sgd=v_sgd,
                         v_sgd_closed=sgd_variance_closed_form(gamma, a),
                         ratio=v_la / v_sgd, ratio_closed=closed_form_ratio(gamma, a, k, alpha)))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| gamma | a | k | alpha | V_SGD measured | V_SGD closed form | V_LA/V_SGD measured | closed form | rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = abs(r["ratio"] - r["ratio_closed"]) / r["ratio_closed"]
        lines.append(f"| {r['gamma']} | {r['a']} | {r['k']} | {r['alpha']} | {r['v_sgd']:.4f} | "
                     f"{r['v_sgd_closed']:.4f} | {r['ratio']:.4f} | {r['ratio_closed']:.4f} | {err:.2%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update the section in docs/benchmarks.md")
    args = parser.parse_args()
    text = format_rows(table())
    print(text)
    if args.write:
        from benchmarks._docs import write_section

        write_section("Noisy quadratic model", "python -m benchmarks.nqm --write", text)


if __name__ == "__main__":
    main()
