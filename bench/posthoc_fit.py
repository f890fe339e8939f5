"""Which post-hoc EMA targets the tracked profiles reach, and how accurately (the table in `sema_hf.posthoc`).

For tracked profiles (default sigma_rel 0.05 and 0.10) snapshotted at ``k`` evenly spaced steps of a run of ``T``
steps (``posthoc_every_steps = T / k``, the last at ``T``), fit each target at step ``T`` by `sema_hf.posthoc.solve`
and print the relative L2 error of the fitted profile against the target, and ``sum |x_i|`` (how much the
snapshots' own rounding is amplified). Targets: power-function profiles of width ``sigma_rel``, and exponential
EMAs of horizon ``H`` (given as ``H / T``; an exponential EMA of horizon H at step T resembles sigma_rel ~ H/T). The
numbers depend on ``k`` and the ratios only, not on ``T`` (checked: ``--steps``).

    python bench/posthoc_fit.py [--steps 10000] [--sigma_rels 0.05 0.10] [--max_error 0.01 0.05]

Pure float64 maths; no model, no tensors: runs in seconds.
"""

from __future__ import annotations

import argparse

import numpy as np

from sema_hf.posthoc import SnapshotBasis, Target, sigma_rel_to_gamma

SNAPSHOTS = (8, 16, 32, 64, 128, 256)
SIGMA_RELS = (0.02, 0.03, 0.04, 0.07, 0.15, 0.2, 0.25)
HORIZON_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def snapshots(steps: int, k: int, sigma_rels: tuple[float, ...]) -> SnapshotBasis:
    every = steps // k
    at = sorted({*range(every, steps + 1, every), steps})
    return SnapshotBasis([t for t in at for _ in sigma_rels], [sigma_rel_to_gamma(s) for _ in at for s in sigma_rels])


def fit(snaps: SnapshotBasis, target: Target) -> tuple[float, float]:
    x, error = snaps.fit(target)
    return error, float(abs(x).sum())


def cell(error: float, amplification: float) -> str:
    return f"{error:.1e} ({amplification:.0f})" if error >= 5e-5 else f"<5e-5 ({amplification:.0f})"


def reach(snaps: SnapshotBasis, steps: int, limit: float) -> str:
    grid = np.geomspace(0.002, 1.0, 120)
    ok = [h for h in grid if h * steps > 1 and fit(snaps, Target(steps, horizon_steps=float(h * steps)))[0] <= limit]
    return f"{ok[0]:.3f} to {ok[-1]:.2f}" if ok else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--sigma_rels", type=float, nargs="+", default=[0.05, 0.10])
    parser.add_argument("--max_error", type=float, nargs="+", default=[0.01, 0.05])
    args = parser.parse_args()
    steps, tracked = args.steps, tuple(args.sigma_rels)
    print(f"tracked sigma_rel {tracked}, run of T = {steps} steps; cells: relative L2 error (sum |x|)\n")
    print("| snapshots k | " + " | ".join(f"sigma_rel {s:g}" for s in SIGMA_RELS) + " |")
    print("|---" * (len(SIGMA_RELS) + 1) + "|")
    for k in SNAPSHOTS:
        snaps = snapshots(steps, k, tracked)
        row = [cell(*fit(snaps, Target(steps, sigma_rel=s))) for s in SIGMA_RELS]
        print(f"| {k} | " + " | ".join(row) + " |")
    print()
    print("| snapshots k | " + " | ".join(f"H = {h:g} T" for h in HORIZON_FRACTIONS) + " |")
    print("|---" * (len(HORIZON_FRACTIONS) + 1) + "|")
    for k in SNAPSHOTS:
        snaps = snapshots(steps, k, tracked)
        row = [cell(*fit(snaps, Target(steps, horizon_steps=h * steps))) for h in HORIZON_FRACTIONS]
        print(f"| {k} | " + " | ".join(row) + " |")
    print()
    print("| snapshots k | " + " | ".join(f"H / T within {e:g}" for e in args.max_error) + " |")
    print("|---" * (len(args.max_error) + 1) + "|")
    for k in SNAPSHOTS:
        snaps = snapshots(steps, k, tracked)
        print(f"| {k} | " + " | ".join(reach(snaps, steps, e) for e in args.max_error) + " |")


if __name__ == "__main__":
    main()
