"""EMA update and switch against the memory-bandwidth bound, and against timm, diffusers, ema-pytorch, torch-ema and
torch ``swa_utils``, all interleaved round by round in one process.

An EMA update is pure memory traffic, so its floor is the time the memory system needs for the bytes an ideal kernel
moves, measured here as one ``lerp_`` over a single contiguous fp32 buffer of the same number of elements:

=========================  ===================  ============================================================
op / weights               ideal bytes/element  bound
=========================  ===================  ============================================================
update, fp32 weights       12 (r 4, r 4, w 4)   ``flat_avg.lerp_(flat_src, 1 - m)``, measured
update, bf16 weights       10 (r 2, r 4, w 4)   the flat fp32 lerp above x 10/12: its bandwidth, these bytes
                                                (no torch op lerps bf16 into fp32 without a temporary)
switch, fp32 weights       8 (r 4, w 4)         ``flat_weights.copy_(flat_avg)``, measured
switch, fp32 -> bf16       6 (r 4, w 2)         ``flat_bf16.copy_(flat_avg)``, measured
=========================  ===================  ============================================================

Candidates (``bench/_peers.py``): ``sema_hf`` (our `EMAStore` over the model's parameters), the peers (each skipped
with the reason when not installed or not able to keep an fp32 average of bf16 weights), ``bound``, and
``sema_hf[flat-params]``: our store over a copy of the model whose parameters the benchmark re-pointed into one
contiguous buffer, to show how much of the gap to the bound is per-tensor overhead. Each round runs every candidate
in a rotated order; the table reports median, min and max over all calls, the ratio to the bound (the median over
rounds of the ratio of the round medians, so that load from other processes that comes and goes cancels), the
effective bandwidth (ideal bytes / median), and, from one profiled call, the bytes allocated and the ``.item()``
host syncs.

Run: ``python bench/ema_update.py [--quick] [--json out.json] [--models gpt2-small,vit-base,many-small]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import PEERS, Candidate, Unavailable, build_sema_hf  # noqa: E402

from sema_hf.engines.local import LocalAdapter  # noqa: E402
from sema_hf.store import EMAStore  # noqa: E402

DECAY = 0.999
BYTES_PER_ELEMENT = {("update", "fp32"): 12, ("update", "bf16"): 10, ("switch", "fp32"): 8, ("switch", "bf16"): 6}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- models ------------------------------------------------------------------------------------------------------
def _gpt2(n_layer: int, **overrides) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, **overrides))


def _vit(n_layer: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(num_hidden_layers=n_layer, num_labels=1000))


def _many_small() -> nn.Module:
    # 64 narrow GPT-2 blocks: 772 tensors of 64 to 64K elements (3.3M parameters), where per-tensor cost dominates.
    return _gpt2(64, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2-small": lambda: _gpt2(12),  # 124M parameters, 148 tensors (the output layer is tied to the embedding)
    "vit-base": lambda: _vit(12),  # 86.6M parameters, 200 tensors
    "many-small": _many_small,
}
QUICK_MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2-2layer": lambda: _gpt2(2),  # GPT-2 small's width and vocabulary, 2 blocks: 53M parameters
    "vit-2layer": lambda: _vit(2),
    "many-small": _many_small,
}


def flatten_parameters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are views of one contiguous buffer (what an opt-in flattening would do).

    Benchmark-only: the library never changes where a user's parameters live.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        view = flat[offset : offset + p.numel()].view_as(p)
        view.copy_(p.data)
        p.data = view
        offset += p.numel()
    return model


def build_flat_params(model: nn.Module, decay: float) -> Candidate:
    flat_model = flatten_parameters(model)
    store = EMAStore(LocalAdapter(flat_model).slots())
    return Candidate("sema_hf[flat-params]", lambda: store.update(decay), store.switch, "parameters in one buffer")


# ---- measuring ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    dtype: str
    op: str
    impl: str
    rounds_ms: list[list[float]] = field(default_factory=list)  # per round, the times of its calls
    numel: int = 0
    note: str = ""
    skipped: str = ""
    alloc_bytes: int | None = None
    host_syncs: int | None = None
    bound: Row | None = None
    scale: float = 1.0  # a derived row's times are its basis' times x scale

    @property
    def times_ms(self) -> list[float]:
        return [t * self.scale for calls in self.rounds_ms for t in calls]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def round_median_ms(self, r: int) -> float:
        return statistics.median(self.rounds_ms[r]) * self.scale

    def ratio_to(self, other: Row) -> float:
        """Median over rounds of (this row's median / the other row's median in the same round): load that comes and
        goes between rounds cancels out."""
        rounds = range(len(self.rounds_ms))
        return statistics.median(self.round_median_ms(r) / other.round_median_ms(r) for r in rounds)

    @property
    def ratio(self) -> float:
        assert self.bound is not None
        return self.ratio_to(self.bound)

    @property
    def gb_per_s(self) -> float:
        return self.numel * BYTES_PER_ELEMENT[(self.op, self.dtype)] / (self.median_ms * 1e-3) / 1e9


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _profile_one_call(fn: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """Bytes allocated and ``.item()`` calls (host syncs) during one call, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        fn()
        _synchronizer(device)()
    allocated, syncs = 0, 0
    for event in prof.events():
        allocated += max(event.cpu_memory_usage, 0) + max(getattr(event, "device_memory_usage", 0) or 0, 0)
        syncs += event.name == "aten::_local_scalar_dense"
    return allocated, syncs


def run_rounds(
    candidates: dict[str, Callable[[], None]], rounds: int, target_s: float, device: torch.device
) -> dict[str, list[list[float]]]:
    """Time every candidate call by call, in a rotated order each round; milliseconds per call, per round."""
    sync = _synchronizer(device)
    names = list(candidates)
    reps: dict[str, int] = {}
    for name in names:  # warm up (first touch of fresh buffers) and size the number of calls per round
        candidates[name]()
        sync()
        start = time.perf_counter()
        candidates[name]()
        sync()
        reps[name] = max(2, min(50, round(target_s / max(time.perf_counter() - start, 1e-6))))
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = candidates[name]
            calls = []
            for _ in range(reps[name]):
                start = time.perf_counter_ns()
                fn()
                sync()
                calls.append((time.perf_counter_ns() - start) / 1e6)
            times[name].append(calls)
    return times


def _flat_bounds(numel: int, dtype_name: str, device: torch.device) -> dict[str, Callable[[], None]]:
    """The bounds on buffers of their own: a flat fp32 lerp, and a flat copy fp32 -> the weights' dtype."""
    avg = torch.randn(numel, device=device)
    src = torch.randn(numel, device=device)
    weights = src if dtype_name == "fp32" else torch.empty_like(src, dtype=DTYPES[dtype_name])
    w = 1.0 - DECAY
    return {"update": lambda: avg.lerp_(src, w), "switch": lambda: weights.copy_(avg)}


def bench_model(
    model_name: str, make_model: Callable[[], nn.Module], dtypes: list[str], args: argparse.Namespace
) -> list[Row]:
    device = torch.device(args.device)
    rows: list[Row] = []
    model = make_model().to(device)
    numel = sum(p.numel() for p in model.parameters())
    print(f"\n## {model_name}: {numel / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors", flush=True)
    for dtype_name in dtypes:
        model.to(DTYPES[dtype_name])
        candidates: list[Candidate] = []
        for impl, build in [("sema_hf", build_sema_hf), *PEERS.items(), ("sema_hf[flat-params]", build_flat_params)]:
            try:
                candidates.append(build(model, DECAY))
            except Unavailable as e:
                rows += [
                    Row(model_name, dtype_name, op, impl, numel=numel, skipped=str(e)) for op in ("update", "switch")
                ]
        bounds = _flat_bounds(numel, dtype_name, device)
        for op in ("update", "switch"):
            fns: dict[str, Callable[[], None]] = {}
            for c in candidates:
                fn = c.update if op == "update" else c.switch
                if fn is None:
                    rows.append(Row(model_name, dtype_name, op, c.impl, numel=numel, skipped=c.note.split("; ")[-1]))
                else:
                    fns[c.impl] = fn
            fns["flat-lerp-fp32" if (op, dtype_name) == ("update", "bf16") else "bound"] = bounds[op]
            times = run_rounds(fns, args.rounds, args.target_s, device)
            op_rows = {
                impl: Row(model_name, dtype_name, op, impl, rounds_ms=t, numel=numel) for impl, t in times.items()
            }
            if "bound" not in op_rows:  # bf16 update: the fp32 flat lerp's bandwidth applied to 10 B/element
                basis = op_rows["flat-lerp-fp32"]
                basis.note = "measured basis of the bound (12 B/element)"
                op_rows["bound"] = Row(model_name, dtype_name, op, "bound", basis.rounds_ms, numel, scale=10 / 12)
                op_rows["bound"].note = "derived: flat fp32 lerp x 10/12"
            for impl, row in op_rows.items():
                row.bound = op_rows["bound"]
                row.note = row.note or next((c.note for c in candidates if c.impl == impl), "")
                if impl in fns and not args.no_profile:
                    row.alloc_bytes, row.host_syncs = _profile_one_call(fns[impl], device)
            rows.extend(op_rows.values())
            _print_table([r for r in rows if (r.model, r.dtype, r.op) == (model_name, dtype_name, op)])
        del candidates, fns, bounds
        gc.collect()
    del model
    gc.collect()
    return rows


# ---- reporting ---------------------------------------------------------------------------------------------------
_ORDER = ["bound", "sema_hf", "sema_hf[flat-params]", *PEERS, "flat-lerp-fp32"]


def _sort_key(row: Row) -> tuple[int, str]:
    return (_ORDER.index(row.impl) if row.impl in _ORDER else len(_ORDER), row.impl)


def _print_table(rows: list[Row]) -> None:
    if not rows:
        return
    r0 = rows[0]
    bytes_per = BYTES_PER_ELEMENT[(r0.op, r0.dtype)]
    weights = "fp32" if r0.dtype == "fp32" else f"{r0.dtype} weights, fp32 average"
    print(f"\n### {r0.model} · {r0.op} · {weights} ({bytes_per} B/element)\n")
    print("| impl | median ms | min ms | max ms | x bound | GB/s | alloc MB/call | item() | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in sorted(rows, key=_sort_key):
        if row.skipped:
            print(f"| {row.impl} | – | – | – | – | – | – | – | skipped: {row.skipped} |")
            continue
        alloc = "–" if row.alloc_bytes is None else f"{row.alloc_bytes / 2**20:.1f}"
        syncs = "–" if row.host_syncs is None else str(row.host_syncs)
        lo, hi = min(row.times_ms), max(row.times_ms)
        print(
            f"| {row.impl} | {row.median_ms:.2f} | {lo:.2f} | {hi:.2f} | {row.ratio:.2f} | {row.gb_per_s:.1f} "
            f"| {alloc} | {syncs} | {row.note} |",
            flush=True,
        )


def _print_goals(rows: list[Row]) -> None:
    print("\n## Goals\n")
    measured = [r for r in rows if not r.skipped]
    for model in dict.fromkeys(r.model for r in measured):
        for dtype in ("fp32", "bf16"):
            for op in ("update", "switch"):
                group = {r.impl: r for r in measured if (r.model, r.dtype, r.op) == (model, dtype, op)}
                ours = group.get("sema_hf")
                if ours is None:
                    continue
                peers = [r for name, r in group.items() if name in PEERS]
                limit = 2.0 if (op, dtype) == ("update", "bf16") else 1.10
                line = f"- {model} {op} {dtype}: sema_hf {ours.ratio:.2f}x bound (goal <= {limit:.2f}x: "
                line += "met" if ours.ratio <= limit else "NOT met"
                if peers and op == "update":
                    fastest = min(peers, key=lambda r: r.median_ms)
                    line += f"); {ours.ratio_to(fastest):.2f}x the fastest peer ({fastest.impl})"
                else:
                    line += ")"
                if ours.alloc_bytes is not None:
                    line += f"; allocates {ours.alloc_bytes} B, {ours.host_syncs} item()"
                print(line)


def _versions() -> str:
    found = []
    for package in ("torch", "transformers", "timm", "diffusers", "ema-pytorch", "torch-ema"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer models and 3 rounds: under a minute")
    parser.add_argument("--json", type=Path, help="write the measured rows to this file")
    parser.add_argument("--models", help=f"comma-separated subset of {list(MODELS)} (or the --quick ones)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 7, --quick 3)")
    parser.add_argument("--target-s", type=float, help="seconds per candidate per round (default 0.15, quick 0.03)")
    parser.add_argument("--device", default="cpu", help="cpu (measured) or cuda (same code, synchronised timers)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-profile", action="store_true", help="skip the allocation / host-sync profile")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.target_s = args.target_s or (0.03 if args.quick else 0.15)
    models = QUICK_MODELS if args.quick else MODELS
    if args.models:
        models = {name: models[name] for name in args.models.split(",")}
    dtypes = args.dtypes.split(",")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# EMA update and switch: {_cpu_name()}, {torch.get_num_threads()} torch threads, device {args.device}")
    print(f"# {_versions()}")
    print(f"# {args.rounds} rounds, about {args.target_s:.2f} s per candidate per round, decay {DECAY}")
    print(f"# load average at start: {_load()} (2 cores are shared; a load above 1 makes every row noisier)")
    start = time.perf_counter()
    rows: list[Row] = []
    for name, make in models.items():
        rows += bench_model(name, make, dtypes, args)
    _print_goals(rows)
    print(f"\n(total {time.perf_counter() - start:.0f} s; load average at the end: {_load()})")
    if args.json:
        measured = [
            {
                "model": r.model,
                "dtype": r.dtype,
                "op": r.op,
                "impl": r.impl,
                "median_ms": round(r.median_ms, 4),
                "ratio_to_bound": round(r.ratio, 4),
                "min_ms": round(min(r.times_ms), 4),
                "max_ms": round(max(r.times_ms), 4),
                "gb_per_s": round(r.gb_per_s, 2),
                "numel": r.numel,
                "alloc_bytes": r.alloc_bytes,
                "host_syncs": r.host_syncs,
            }
            for r in rows
            if not r.skipped
        ]
        args.json.write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {len(measured)} rows to {args.json}")


if __name__ == "__main__":
    main()
