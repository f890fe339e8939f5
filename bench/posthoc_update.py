"""Cost of post-hoc EMA tracking per optimizer step: the classic EMA alone, the classic EMA plus two power-function
profiles updated in one fused pass (what `sema_hf.SEMA` runs with ``posthoc_every_steps``), the same three averages
in separate passes, and the memory-bandwidth bound.

The fused pass reads each cache-sized block of the weights once and lerps every average from it: per element it
moves the source once (4 bytes fp32, 2 bf16) and reads and writes each fp32 average (8 bytes each): 28 bytes for fp32
weights with three averages, 12 for the classic EMA alone. The bound is the bandwidth of one flat fp32 ``lerp_``
(12 bytes per element) applied to those bytes. Rounds are interleaved (each candidate once per round, rotated), and
the table gives the median over calls and its ratio to the bound.

    python bench/posthoc_update.py [--numel 16000000] [--tensors 24] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sema_hf.engines.base import Slot
from sema_hf.posthoc import sigma_rel_to_gamma
from sema_hf.profiles import PowerProfiles
from sema_hf.store import EMAStore


def timed(fn, calls: int = 3) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(
    dtype: torch.dtype, numel: int, tensors: int, rounds: int, flat: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Print one row per candidate for weights of ``dtype``."""
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    per = numel // tensors
    params = [torch.randn(per).to(dtype) for _ in range(tensors)]
    slots = [Slot(f"p{i}", p) for i, p in enumerate(params)]
    ema_only = EMAStore(slots)
    fused_store = EMAStore(slots)
    fused = PowerProfiles(slots, gammas, companion=fused_store.state_dict())
    separate_store = EMAStore(slots)
    separate = PowerProfiles(slots, gammas)
    src_bytes = 4 if dtype == torch.float32 else 2
    step = [10]
    flat_src, flat_avg = flat

    def run_fused() -> None:
        step[0] += 1
        fused.update(step[0], 0.001)

    def run_separate() -> None:
        step[0] += 1
        separate_store.update(0.999)
        separate.update(step[0])

    # name -> (call, bytes per element it moves, bytes per element of the ideal kernel for what it computes)
    candidates = {
        "classic EMA alone": (lambda: ema_only.update(0.999), src_bytes + 8, src_bytes + 8),
        "EMA + 2 profiles, fused (SEMA)": (run_fused, src_bytes + 24, src_bytes + 24),
        "EMA + 2 profiles, separate passes": (run_separate, 2 * src_bytes + 24, src_bytes + 24),
        "bound (flat fp32 lerp)": (lambda: flat_avg.lerp_(flat_src, 0.001), 12, 12),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].extend(timed(candidates[name][0]))
    bound_per_byte = statistics.median(times["bound (flat fp32 lerp)"]) / (12 * numel)
    label = "fp32" if dtype == torch.float32 else "bf16"
    for name, (_, moved, ideal) in candidates.items():
        median = statistics.median(times[name])
        print(f"| {label} | {name} | {median * 1e3:.1f} | {moved} | {median / (bound_per_byte * ideal * numel):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=16_000_000)
    parser.add_argument("--tensors", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    flat = (torch.randn(args.numel), torch.randn(args.numel))
    per = args.numel // args.tensors
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tensors} tensors of {per} elements")
    print("| weights | candidate | median ms | bytes/element moved | x bound |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        measure(dtype, args.numel, args.tensors, args.rounds, flat)


if __name__ == "__main__":
    main()
