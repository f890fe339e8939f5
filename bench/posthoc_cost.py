"""Post-hoc EMA cost: the per-step update of the two power-function profiles fused with the classic EMA against the
classic EMA alone and the memory-bandwidth bound, snapshot writes, memory per rank, and the reconstruction error of
bf16 (and fp16) snapshots against fp32 ones on a real training trajectory.

Update. With ``posthoc_every_steps`` set, `sema_hf.SEMA` updates the classic EMA and the profiles
(``posthoc_sigma_rels``, default 0.05 and 0.10) in ONE pass over the weights (`sema_hf.profiles.PowerProfiles` with
the store's averages as companion: per cache-sized block of the weights, one ``_foreach_lerp_`` into the three
averages). An ideal kernel reads each weight once and reads and writes each fp32 average once:

=============================  ========================================  =================================
weights                        ideal bytes per element                   bound (measured basis)
=============================  ========================================  =================================
classic EMA alone, fp32        12 (r 4; r/w 8)                           one flat fp32 ``lerp_``
classic EMA alone, bf16        10 (r 2; r/w 8)                           the flat lerp's bandwidth x 10/12
EMA + 2 profiles, fp32         28 (r 4; 3 x r/w 8)                       the flat lerp's bandwidth x 28/12
EMA + 2 profiles, bf16         26 (r 2; 3 x r/w 8)                       the flat lerp's bandwidth x 26/12
=============================  ========================================  =================================

The flat lerp (one contiguous fp32 buffer of the model's size) is the measured bandwidth basis; "3 flat lerps"
(three lerps from one flat fp32 source, 36 bytes per element: the best three unfused passes can do) is measured
too. Candidates, interleaved round by round in one process as in ``bench/ema_update.py`` (the ratios are medians
over rounds of the ratio of the round medians, so that load from other processes that comes and goes cancels):
``EMAStore.update`` (classic alone), ``SEMA.advance`` (the real per-step call with post-hoc tracking on: the fused
pass), and ``EMAStore.update + PowerProfiles.update`` (the same averages in two passes, to show what fusing saves).

Snapshots: ``SEMA``'s own snapshot write (every profile of this rank in ``posthoc_dtype`` into one safetensors
file, atomic, fsync'ed, plus the index), timed per call, with the bytes on disk.

Memory per rank: the fp32 buffers SEMA holds for the classic EMA and the profiles, counted from their storages;
the formula is ``4 x (1 + P) x N_local`` bytes (P profiles, N_local elements of this rank's shard; plus one 4 MiB
cast buffer per pass for bf16 weights). Under ZeRO-3 / FSDP2 / ``shard_under_ddp`` on W ranks ``N_local`` is about
N / W: the table states W = 2 from FSDP2's layout (each parameter cut along its first dimension into W chunks).

Reconstruction error: a small GPT-2 (2 blocks, width 64, 120K parameters) trained with AdamW on a synthetic
Markov-chain language for a few hundred steps through ``sema_hf.SEMA`` in a plain loop, snapshots every few steps
(fp32 files by ``posthoc_dtype="float32"``, bf16 files by a second, identical run with ``posthoc_dtype="bfloat16"``,
fp16 files written from the fp32 ones, since ``posthoc_dtype`` does not offer float16). Every target is
reconstructed by `sema_hf.posthoc.reconstruct` from each folder with the same least-squares weights ``x``, and
compared with the same combination of float64 profiles computed independently from the weights recorded after
every step (what exact snapshots would give). The rounding of a snapshot is amplified by ``sum_i |x_i|``, which is
large for short horizons.

Run: ``python bench/posthoc_cost.py [--quick] [--json out.json] [--parts update,snapshot,memory,error]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ema_update import _cpu_name, _load, _profile_one_call, _versions, run_rounds  # noqa: E402

from sema_hf import SEMA  # noqa: E402
from sema_hf.posthoc import INDEX_NAME, reconstruct, sigma_rel_to_gamma  # noqa: E402
from sema_hf.profiles import PowerProfiles  # noqa: E402

DECAY = 0.999
SIGMA_RELS = (0.05, 0.10)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SOURCE_BYTES = {"fp32": 4, "bf16": 2}
NEVER = 10**9  # posthoc_every_steps for the update timing: no snapshot is written while timing


# ---- models ------------------------------------------------------------------------------------------------------
def _gpt2(n_layer: int, **overrides) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, **overrides))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2-small": lambda: _gpt2(12),  # 124M parameters, 148 tensors
    "gpt2-2layer": lambda: _gpt2(2),  # GPT-2 small's width and vocabulary, 2 blocks: 53M parameters
}
QUICK_MODELS = {"gpt2-2layer": MODELS["gpt2-2layer"]}


def _ideal_bytes(averages: int, dtype: str) -> int:
    """Bytes per element an ideal pass moves: the weight read once, each fp32 average read and written."""
    return SOURCE_BYTES[dtype] + 8 * averages


def _sema(model: nn.Module, folder: str, every: int = NEVER, dtype: str = "float32") -> SEMA:
    return SEMA(
        model,
        decay=DECAY,
        warmup="none",
        switch=False,
        posthoc_every_steps=every,
        posthoc_sigma_rels=SIGMA_RELS,
        posthoc_dtype=dtype,
        posthoc_dir=folder,
    )


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ---- update ------------------------------------------------------------------------------------------------------
def bench_update(name: str, model: nn.Module, dtype: str, args: argparse.Namespace, folder: str) -> list[dict]:
    model.to(DTYPES[dtype])
    numel = sum(p.numel() for p in model.parameters())
    sema = _sema(model, folder)
    assert sema.profiles is not None
    # The same averages updated in two passes: the classic EMA (sema.store), then the profiles with no companion.
    separate = PowerProfiles(sema.store.slots, sema.posthoc_gammas)
    flat_src = torch.randn(numel)
    flat_avgs = [torch.randn(numel) for _ in range(3)]
    w = 1.0 - DECAY
    steps = {"sema": 0, "separate": 0}

    def advance() -> None:
        steps["sema"] += 1
        sema.advance(steps["sema"], True)

    def two_passes() -> None:
        steps["separate"] += 1
        sema.store.update(DECAY)
        separate.update(steps["separate"])

    def three_lerps() -> None:
        for avg in flat_avgs:
            avg.lerp_(flat_src, w)

    fns = {
        "flat lerp": lambda: flat_avgs[0].lerp_(flat_src, w),
        "3 flat lerps": three_lerps,
        "EMAStore.update": lambda: sema.store.update(DECAY),
        "SEMA.advance": advance,
        "EMAStore.update + PowerProfiles.update": two_passes,
    }
    times = run_rounds(fns, args.rounds, args.target_s, torch.device("cpu"))
    averages = {"flat lerp": 1, "3 flat lerps": 3, "EMAStore.update": 1, "SEMA.advance": 3}
    averages["EMAStore.update + PowerProfiles.update"] = 3
    notes = {
        "flat lerp": "measured bandwidth basis (one contiguous fp32 buffer, 12 B/element)",
        "3 flat lerps": "three unfused flat passes from one fp32 source (36 B/element moved)",
        "EMAStore.update": "classic EMA alone",
        "SEMA.advance": "classic EMA + 2 profiles, fused (posthoc_every_steps set)",
        "EMAStore.update + PowerProfiles.update": "the same 3 averages in two passes",
    }

    def round_medians(impl: str) -> list[float]:
        return [statistics.median(calls) for calls in times[impl]]

    basis = round_medians("flat lerp")  # ms for 12 B/element in each round
    rows = []
    for impl, per_round in times.items():
        n_avg = averages[impl]
        ideal = 12 if impl in ("flat lerp", "3 flat lerps") else _ideal_bytes(n_avg, dtype)
        if impl == "3 flat lerps":
            ideal = 28  # compared with the fused 3-average bound for fp32 sources
        meds = round_medians(impl)
        bound = [b * ideal / 12 for b in basis]
        classic = round_medians("EMAStore.update")
        all_calls = [t for calls in per_round for t in calls]
        median = statistics.median(all_calls)
        row = {
            "part": "update",
            "model": name,
            "dtype": dtype,
            "impl": impl,
            "averages": n_avg,
            "ideal_bytes_per_element": ideal,
            "median_ms": round(median, 3),
            "min_ms": round(min(all_calls), 3),
            "max_ms": round(max(all_calls), 3),
            "ratio_to_bound": round(statistics.median(m / b for m, b in zip(meds, bound, strict=True)), 3),
            "ratio_to_classic": round(statistics.median(m / c for m, c in zip(meds, classic, strict=True)), 3),
            "gb_per_s": round(numel * ideal / (median * 1e-3) / 1e9, 2),
            "numel": numel,
            "note": notes[impl],
        }
        if not args.no_profile and impl in ("EMAStore.update", "SEMA.advance"):
            row["alloc_bytes"], row["host_syncs"] = _profile_one_call(fns[impl], torch.device("cpu"))
        rows.append(row)
    _print_update(rows)
    return rows


def _print_update(rows: list[dict]) -> None:
    r0 = rows[0]
    dtype = "fp32 weights" if r0["dtype"] == "fp32" else "bf16 weights, fp32 averages"
    print(f"\n### update · {r0['model']} ({r0['numel'] / 1e6:.1f}M) · {dtype}\n")
    print("| impl | averages | ideal B/element | median ms | min–max ms | x bound | x classic EMA | GB/s | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['averages']} | {r['ideal_bytes_per_element']} | {r['median_ms']:.1f} | "
            f"{r['min_ms']:.1f}–{r['max_ms']:.1f} | {r['ratio_to_bound']:.2f} | {r['ratio_to_classic']:.2f} | "
            f"{r['gb_per_s']:.1f} | {r['note']} |",
            flush=True,
        )
    by = {r["impl"]: r for r in rows}
    fused, two = by["SEMA.advance"], by["EMAStore.update + PowerProfiles.update"]
    ideal = fused["ideal_bytes_per_element"] / by["EMAStore.update"]["ideal_bytes_per_element"]
    print(
        f"\nfused pass: {fused['ratio_to_bound']:.2f}x the 3-average bound, {fused['ratio_to_classic']:.2f}x the classic "
        f"EMA alone (bytes alone would give {ideal:.2f}x), {fused['median_ms'] / two['median_ms']:.2f}x the two passes",
        flush=True,
    )


# ---- snapshots and memory ----------------------------------------------------------------------------------------
def bench_snapshot(name: str, model: nn.Module, args: argparse.Namespace, root: str) -> list[dict]:
    model.to(torch.float32)
    numel = sum(p.numel() for p in model.parameters())
    rows = []
    for dtype in ("float32", "bfloat16"):
        folder = tempfile.mkdtemp(dir=root)
        sema = _sema(model, folder, dtype=dtype)
        sema.advance(1, True)
        times, sizes = [], []
        for i in range(args.snapshots):
            step = i + 1
            start = time.perf_counter()
            sema._posthoc_snapshot(step)  # what SEMA runs every posthoc_every_steps (all profiles of this rank)
            times.append((time.perf_counter() - start) * 1e3)
            files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
            sizes.append(sum(os.path.getsize(os.path.join(folder, f)) for f in files))
            for f in files:
                os.remove(os.path.join(folder, f))
        shutil.rmtree(folder)
        size = statistics.median(sizes)
        median = statistics.median(times)
        rows.append(
            {
                "part": "snapshot",
                "model": name,
                "posthoc_dtype": dtype,
                "median_ms": round(median, 1),
                "min_ms": round(min(times), 1),
                "max_ms": round(max(times), 1),
                "bytes": int(size),
                "bytes_per_element": round(size / numel, 3),
                "mb_per_s": round(size / (median * 1e-3) / 1e6, 1),
                "numel": numel,
                "writes": len(times),
            }
        )
        del sema
        gc.collect()
    print(f"\n### snapshot write · {name} ({numel / 1e6:.1f}M), {len(SIGMA_RELS)} profiles, 1 rank\n")
    print("| posthoc_dtype | median ms | min–max ms | bytes per snapshot per rank | B/element | MB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['posthoc_dtype']} | {r['median_ms']:.0f} | {r['min_ms']:.0f}–{r['max_ms']:.0f} | "
            f"{r['bytes'] / 2**20:.1f} MiB | {r['bytes_per_element']:.2f} | {r['mb_per_s']:.0f} |",
            flush=True,
        )
    return rows


def fsdp2_local_numel(model: nn.Module, world_size: int) -> list[int]:
    """Elements each rank holds when every parameter is cut along its first dimension into ``world_size`` chunks
    of ``ceil(d0 / W)`` rows (FSDP2's ``Shard(0)``; ZeRO-3 cuts one flat buffer evenly, within W elements)."""
    out = [0] * world_size
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        per_row = p.numel() // max(rows, 1)
        chunk = math.ceil(rows / world_size)
        for r in range(world_size):
            out[r] += max(0, min(rows, (r + 1) * chunk) - r * chunk) * per_row
    return out


def bench_memory(name: str, model: nn.Module, dtype: str, root: str) -> dict:
    model.to(DTYPES[dtype])
    numel = sum(p.numel() for p in model.parameters())
    sema = _sema(model, tempfile.mkdtemp(dir=root))
    assert sema.profiles is not None
    store_tensors = list(sema.store.state_dict().values())
    profile_tensors = [t for avg in sema.profiles.state_dict() for t in avg.values()]
    scratch = [t for b in sema.profiles._blocks if b.scratch is not None for t in b.scratch]
    store_scratch = [t for b in getattr(sema.store, "_cast_blocks", []) for t in b.scratch]
    classic = _storage_bytes(store_tensors)
    profiles = _storage_bytes(profile_tensors)
    casts = _storage_bytes(scratch) + _storage_bytes(store_scratch)
    local2 = fsdp2_local_numel(model, 2)
    row = {
        "part": "memory",
        "model": name,
        "dtype": dtype,
        "numel": numel,
        "classic_ema_bytes": classic,
        "profiles_bytes": profiles,
        "cast_buffer_bytes": casts,
        "total_bytes": classic + profiles + casts,
        "formula_bytes": 4 * (1 + len(SIGMA_RELS)) * numel,
        "per_rank_2_ranks_bytes": [4 * (1 + len(SIGMA_RELS)) * n for n in local2],
    }
    del sema
    gc.collect()
    return row


def _print_memory(rows: list[dict]) -> None:
    print(f"\n### memory per rank (fp32 averages; {len(SIGMA_RELS)} profiles + the classic EMA)\n")
    print(
        "| model | weights | N | classic EMA | profiles | cast buffers | total | 4 x (1 + P) x N | per rank, 2 ranks |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mib = 2**20
        two = "/".join(f"{b / mib:.0f}" for b in r["per_rank_2_ranks_bytes"])
        print(
            f"| {r['model']} | {r['dtype']} | {r['numel'] / 1e6:.1f}M | {r['classic_ema_bytes'] / mib:.0f} MiB | "
            f"{r['profiles_bytes'] / mib:.0f} MiB | {r['cast_buffer_bytes'] / mib:.0f} MiB | "
            f"{r['total_bytes'] / mib:.0f} MiB | {r['formula_bytes'] / mib:.0f} MiB | {two} MiB |",
            flush=True,
        )


# ---- reconstruction error ----------------------------------------------------------------------------------------
VOCAB, SEQ, BATCH = 128, 32, 16


def _markov_batches(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Token batches from a fixed random Markov chain with 4 likely successors per token: a language to learn."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
    out = []
    for _ in range(steps):
        tokens = torch.empty(BATCH, SEQ, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)
        for i in range(1, SEQ):
            choice = torch.randint(0, 4, (BATCH,), generator=g)
            tokens[:, i] = successors[tokens[:, i - 1], choice]
        out.append(tokens)
    return out


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return _gpt2(2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0)


def train_tiny(folder: str, steps: int, every: int, dtype: str, record: bool) -> tuple[list[dict], list[float]]:
    """Train the tiny GPT-2 with post-hoc tracking into ``folder``; the weights after every step (fp32 copies) when
    ``record``, and the losses."""
    model = _tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sema = _sema(model, folder, every=every, dtype=dtype)
    trajectory, losses = [], []
    for tokens in _markov_batches(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sema.step()
        losses.append(loss.item())
        if record:
            trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
    sema.finalize()
    return trajectory, losses


def _cast_folder(src: str, dst: str, dtype: torch.dtype) -> None:
    """A copy of a snapshot folder with every tensor rounded to ``dtype`` (headers and index kept)."""
    from safetensors import safe_open

    os.makedirs(dst)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(src, name), framework="pt") as f:
                meta = f.metadata()
            tensors = {k: v.to(dtype) for k, v in load_file(os.path.join(src, name)).items()}
            save_file(tensors, os.path.join(dst, name), metadata=meta)
    index = json.loads(Path(src, INDEX_NAME).read_text())
    index["dtype"] = str(dtype).removeprefix("torch.")
    Path(dst, INDEX_NAME).write_text(json.dumps(index))


def _float64_targets(trajectory: list[dict], reports: dict[str, Any], targets: dict[str, dict]) -> tuple[dict, dict]:
    """From the recorded weights, in float64: each target's ideal reconstruction ``sum_i x_i P_i`` (the fit's
    weights on exact profiles) and the target average itself (the discrete power or exponential EMA)."""
    names = list(trajectory[0])
    gammas = {s: sigma_rel_to_gamma(s) for s in SIGMA_RELS}
    profile = {s: {n: torch.zeros_like(trajectory[0][n], dtype=torch.float64) for n in names} for s in SIGMA_RELS}
    ideal = {k: {n: torch.zeros_like(profile[SIGMA_RELS[0]][n]) for n in names} for k in targets}
    truth: dict[str, dict[str, torch.Tensor]] = {}
    terms: dict[int, list[tuple[str, float, float]]] = {}
    for key, report in reports.items():
        for wgt, (t, s) in zip(report.weights, report.snapshots, strict=True):
            terms.setdefault(int(t), []).append((key, float(s), wgt))
    for key, spec in targets.items():
        if "sigma_rel" in spec:
            g = sigma_rel_to_gamma(spec["sigma_rel"])
            avg = {n: torch.zeros_like(profile[SIGMA_RELS[0]][n]) for n in names}
            for t, theta in enumerate(trajectory, start=1):
                beta = (1.0 - 1.0 / t) ** (g + 1.0)
                for n in names:
                    avg[n].mul_(beta).add_(theta[n].double(), alpha=1.0 - beta)
        else:
            m = 1.0 - 1.0 / spec["horizon_steps"]
            avg = {n: trajectory[0][n].double().clone() for n in names}
            for theta in trajectory[1:]:
                for n in names:
                    avg[n].mul_(m).add_(theta[n].double(), alpha=1.0 - m)
        truth[key] = avg
    for t, theta in enumerate(trajectory, start=1):
        for s, g in gammas.items():
            beta = (1.0 - 1.0 / t) ** (g + 1.0)
            for n in names:
                profile[s][n].mul_(beta).add_(theta[n].double(), alpha=1.0 - beta)
        for key, s, wgt in terms.get(t, []):
            for n in names:
                ideal[key][n].add_(profile[s][n], alpha=wgt)
    return ideal, truth


def _flat(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].double().reshape(-1) for n in names])


def bench_error(args: argparse.Namespace, root: str) -> list[dict]:
    steps, every = args.error_steps, args.error_every
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 110K-parameter model: one thread is far faster than two on a loaded, shared CPU
    folders = {"fp32": os.path.join(root, "fp32"), "bf16": os.path.join(root, "bf16"), "fp16": ""}
    trajectory, losses = train_tiny(folders["fp32"], steps, every, "float32", record=True)
    _, losses_bf16 = train_tiny(folders["bf16"], steps, every, "bfloat16", record=False)
    assert losses == losses_bf16, "the two training runs differ: the bf16 and fp32 snapshots would not compare"
    folders["fp16"] = os.path.join(root, "fp16")
    _cast_folder(folders["fp32"], folders["fp16"], torch.float16)
    torch.set_num_threads(threads)
    numel = sum(t.numel() for t in trajectory[0].values())
    print(
        f"\n### reconstruction error · tiny GPT-2 ({numel / 1e3:.0f}K parameters), AdamW lr 3e-3, {steps} steps, "
        f"snapshots every {every} steps ({steps // every} x 2 profiles), loss {losses[0]:.2f} -> "
        f"{statistics.mean(losses[-20:]):.2f} ({time.perf_counter() - start:.0f} s to train both runs)\n"
    )
    targets: dict[str, dict] = {f"sigma_rel {s:g}": {"sigma_rel": s} for s in args.error_sigma_rels}
    for frac in args.error_horizons:
        targets[f"H {frac:g} T"] = {"horizon_steps": frac * steps}
    recon = {
        key: {d: reconstruct(f, max_fit_error=None, **spec) for d, f in folders.items()}
        for key, spec in targets.items()
    }
    reports = {key: r["fp32"].report for key, r in recon.items()}
    for key, r in recon.items():
        for d in ("bf16", "fp16"):
            assert r[d].report.weights == reports[key].weights
    ideal, truth = _float64_targets(trajectory, reports, targets)
    names = list(trajectory[0])
    final = _flat(trajectory[-1], names)
    fp16_tiny = 0
    for name in os.listdir(folders["fp32"]):
        if name.endswith(".safetensors"):
            fp16_tiny += sum(
                int((v.abs() < 2**-14).sum()) for v in load_file(os.path.join(folders["fp32"], name)).values()
            )
    n_snapshot_values = (steps // every + (steps % every > 0)) * len(SIGMA_RELS) * numel
    rows = []
    print(
        "| target | fit error of the profile | sum abs x | L2 norm of x | fit gap / effect | rel. L2 error fp32 | bf16 | fp16 "
        "| max abs error bf16 | fp16 | error / effect fp32 | bf16 | fp16 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in targets:
        ref = _flat(ideal[key], names)
        effect = (_flat(truth[key], names) - final).norm().item()
        report = reports[key]
        row: dict[str, Any] = {
            "part": "error",
            "target": key,
            "fit_relative_error": report.relative_error,
            "amplification": report.amplification,
            "x_l2": math.sqrt(sum(w * w for w in report.weights)),
            "snapshots_used": sum(1 for w in report.weights if w),
            "averaging_effect_l2": effect,
            "reference_vs_target_relative_l2": ((ref - _flat(truth[key], names)).norm() / ref.norm()).item(),
            "fit_gap_over_effect": (ref - _flat(truth[key], names)).norm().item() / effect,
        }
        for d in folders:
            diff = _flat(recon[key][d], names) - ref
            row[f"{d}_relative_l2"] = (diff.norm() / ref.norm()).item()
            row[f"{d}_max_abs"] = diff.abs().max().item()
            row[f"{d}_over_effect"] = diff.norm().item() / effect
        rows.append(row)
        print(
            f"| {key} | {report.relative_error:.3f} | {report.amplification:.1f} | {row['x_l2']:.1f} | "
            f"{row['fit_gap_over_effect']:.2%} | "
            f"{row['fp32_relative_l2']:.1e} | {row['bf16_relative_l2']:.1e} | {row['fp16_relative_l2']:.1e} | "
            f"{row['bf16_max_abs']:.1e} | {row['fp16_max_abs']:.1e} | {row['fp32_over_effect']:.1e} | "
            f"{row['bf16_over_effect']:.1%} | {row['fp16_over_effect']:.1%} |",
            flush=True,
        )
    print(
        f"\nfp16 subnormals (|v| < 2^-14 = 6.1e-5) among the snapshot values: {fp16_tiny} of {n_snapshot_values} "
        f"({fp16_tiny / n_snapshot_values:.2%}); effect: ||target average - final weights|| (L2); fit gap: ||exact-snapshot reconstruction - target average||; errors against the exact-snapshot reconstruction (float64)."
    )
    rows.append(
        {
            "part": "error-run",
            "numel": numel,
            "steps": steps,
            "every": every,
            "fp16_subnormal": fp16_tiny,
            "snapshot_values": n_snapshot_values,
            "loss_first": losses[0],
            "loss_last20": statistics.mean(losses[-20:]),
        }
    )
    return rows


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 2-layer model, 3 rounds, a shorter run: ~2 min")
    parser.add_argument("--json", type=Path, help="write the measured rows to this file")
    parser.add_argument("--models", help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help="weights' dtypes for the update timing")
    parser.add_argument("--parts", default="update,snapshot,memory,error", help="which parts to run")
    parser.add_argument("--rounds", type=int, help="rounds per update measurement (default 5, --quick 3)")
    parser.add_argument("--target-s", type=float, help="seconds per candidate per round (default 0.5, quick 0.1)")
    parser.add_argument("--snapshots", type=int, help="snapshot writes per posthoc_dtype (default 5, quick 3)")
    parser.add_argument("--error-steps", type=int, help="training steps of the error run (default 400, quick 200)")
    parser.add_argument("--error-every", type=int, default=4, help="posthoc_every_steps of the error run")
    parser.add_argument("--error-sigma-rels", default="0.03,0.05,0.07,0.15", help="sigma_rel targets")
    parser.add_argument("--error-horizons", default="0.02,0.05,0.1,0.2", help="exponential horizons, fractions of T")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0: torch's choice). On the shared 2-core machine, two threads under "
        "a load of 8 made every kernel 5-10x slower and the ratios meaningless",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the allocation / host-sync profile")
    parser.add_argument("--tmp", help="folder for the snapshot files (default: the system's temporary folder)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.target_s = args.target_s or (0.1 if args.quick else 0.5)
    args.snapshots = args.snapshots or (3 if args.quick else 5)
    args.error_steps = args.error_steps or (200 if args.quick else 400)
    args.error_sigma_rels = [float(s) for s in args.error_sigma_rels.split(",")]
    args.error_horizons = [float(s) for s in args.error_horizons.split(",")]
    models = QUICK_MODELS if args.quick else MODELS
    if args.models:
        models = {name: MODELS[name] for name in args.models.split(",")}
    parts = args.parts.split(",")
    dtypes = args.dtypes.split(",")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# Post-hoc EMA cost: {_cpu_name()}, {torch.get_num_threads()} torch threads, CPU")
    print(f"# {_versions()}")
    print(f"# profiles sigma_rel {SIGMA_RELS} + classic EMA (decay {DECAY}); {args.rounds} rounds, ~{args.target_s} s")
    print(f"# load average at start: {_load()} (a SHARED 2-core CPU: other processes run; ratios are per round)")
    start = time.perf_counter()
    rows: list[dict] = []
    root = tempfile.mkdtemp(prefix="posthoc_cost_", dir=args.tmp)
    try:
        memory_rows = []
        for name, make in models.items():
            if not {"update", "snapshot", "memory"} & set(parts):
                break
            model = make()
            print(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
            for dtype in dtypes:
                if "update" in parts:
                    rows += bench_update(name, model, dtype, args, tempfile.mkdtemp(dir=root))
                if "memory" in parts:
                    memory_rows.append(bench_memory(name, model, dtype, root))
                gc.collect()
            if "snapshot" in parts:
                rows += bench_snapshot(name, model, args, root)
            del model
            gc.collect()
        if memory_rows:
            _print_memory(memory_rows)
            rows += memory_rows
        if "error" in parts:
            rows += bench_error(args, tempfile.mkdtemp(dir=root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n(total {time.perf_counter() - start:.0f} s; load average at the end: {_load()}; shared 2-core CPU)")
    if args.json:
        meta = {
            "cpu": _cpu_name(),
            "threads": torch.get_num_threads(),
            "versions": _versions(),
            "shared_cpu": True,
            "argv": sys.argv[1:],
            "load_end": _load(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
