"""Monte Carlo estimate of MXNorm's correction constants c'(p, B) = E[m**p] ** (-1/p).

m is the absolute maximum of B i.i.d. standard normal values (one MX block of a
unit-variance Gaussian row). With r = c'(p, B) * mean_k(m_k**p) ** (1/p), r is a
consistent estimate of the RMS (MXNORM.md). The table in
``mxrewrite/ops/mxnorm_constants.py`` was produced by

    python scripts/mxnorm_constants.py --samples 20000000

and each value is cross-checked here against numerical integration of
E[m**p] = integral p t**(p-1) (1 - (2 Phi(t) - 1)**B) dt.

Run it with fewer samples for a quick look (the standard error is printed).
"""

from __future__ import annotations

import argparse
import math

import torch

BLOCK_SIZES = (16, 32, 64, 128)
POWERS = (1, 2)


def monte_carlo(p: int, block: int, samples: int, seed: int = 0, chunk: int = 1 << 20) -> tuple[float, float]:
    """Returns (c', standard error of c') from ``samples`` simulated blocks."""
    gen = torch.Generator().manual_seed(seed + 1000 * p + block)
    total, total_sq, n = 0.0, 0.0, 0
    while n < samples:
        rows = min(chunk, samples - n)
        m = torch.randn(rows, block, generator=gen, dtype=torch.float64).abs().amax(-1) ** p
        total += m.sum().item()
        total_sq += (m * m).sum().item()
        n += rows
    mean = total / n
    se_mean = math.sqrt(max(total_sq / n - mean * mean, 0.0) / n)
    c = mean ** (-1.0 / p)
    return c, c / p * se_mean / mean  # delta method


def integrate(p: int, block: int, steps: int = 200_000, upper: float = 12.0) -> float:
    """c'(p, B) by the trapezoid rule on the survival function of the block maximum."""
    t = torch.linspace(0.0, upper, steps, dtype=torch.float64)
    cdf = torch.special.erf(t / math.sqrt(2.0)) ** block  # P(max |z| <= t)
    integrand = p * t ** (p - 1) * (1.0 - cdf)
    return torch.trapezoid(integrand, t).item() ** (-1.0 / p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000_000)
    args = parser.parse_args()
    print(f"{'B':>4} {'p':>2} {'Monte Carlo':>12} {'std err':>9} {'integral':>10}")
    for block in BLOCK_SIZES:
        for p in POWERS:
            c, se = monte_carlo(p, block, args.samples)
            print(f"{block:>4} {p:>2} {c:>12.6f} {se:>9.2e} {integrate(p, block):>10.6f}")


if __name__ == "__main__":
    main()
