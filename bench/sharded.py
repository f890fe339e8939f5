"""Sharded EMA on 2 ranks: SEMA's shard-local average against a gather-every-step EMA, under ZeRO-3 and FSDP2;
under DDP, the full-copy average against ``shard_under_ddp``.

What is compared, in the same processes, round by round:

* ``sema_hf``: the engine adapter (`detect_engine`) and `EMAStore` over this rank's shard of the fp32 master weights
  (ZeRO-3: the optimizer's ``fp32_partitioned_groups_flat``; FSDP2: each DTensor's local ``Shard(0)`` block). An
  update is one fused lerp over ``numel / world_size`` elements, with no communication.
* ``gather-every-step``: a full fp32 shadow copy of every parameter on every rank, updated by gathering each
  parameter on every step, the way diffusers' ``EMAModel.step`` runs under ZeRO-3 (one
  ``deepspeed.zero.GatheredParameters(param)`` per parameter, then an update of the full shadow). Under FSDP2 the
  same idea is ``DTensor.full_tensor()`` per parameter. The update itself is an in-place ``lerp_`` (kinder than
  diffusers' ``s.sub_((1 - m) * (s - p))``, which allocates two temporaries per parameter), so the gap shown is the
  cost of gathering and of holding the full copy, not of arithmetic.

Reported per rank: the bytes of EMA state held, the largest transient buffer an update needs (the gathered parameter
for gather-every-step, nothing for ours), and the update time (median, min, max over the rounds; every round starts
after a barrier so that both ranks measure the same thing).

DDP rows (``--engines ddp``): the parameters are replicas, so the question is a different one, the full-copy average
every DDP rank keeps by default (`LocalAdapter`) against ``shard_under_ddp`` (`DDPShardedAdapter`: each rank averages
a contiguous 1/W of the flattened trainable elements). Reported per rank: EMA state, update time, switch time (ours
includes the one all-gather that makes the replicas identical again), the time to swap the average in and out for an
evaluation (ours: one all-gather in, a local copy out), and the transient buffers a switch and an evaluation need
(from the buffer sizes the code allocates).

Loop rows (``--engines zero3-loop``): ZeRO-3 as ``accelerate`` prepares it for a hand-written loop, the public
`sema_hf.SEMA` object (``sema.step()``: the check that the optimizer really stepped, the decay, the shard-local
update) against diffusers' ``EMAModel`` as its training scripts use it under ZeRO-3: the shadow cloned from the full
model before ``accelerator.prepare``, then ``ema.step(model.parameters())`` after every optimizer step, which gathers
the parameters (``deepspeed.zero.GatheredParameters``) one at a time (``foreach=False``, its default) or all at once
(``foreach=True``). Reported per rank: EMA state, the transient memory an update needs (from the sizes the code
allocates: the gathered parameters and diffusers' ``s - p`` and ``(1 - m) * (s - p)`` temporaries; not a profiler
measurement), and the update time, in the same processes, round by round in rotating order.

Run: ``python bench/sharded.py [--model gpt2-small] [--rounds 7] [--engines zero3,fsdp2,ddp] [--json out.json]``
(relaunches itself on 2 CPU ranks with torchrun and gloo; or start it with ``torchrun --nproc_per_node 2`` yourself).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sema_hf.engines import detect_engine  # noqa: E402
from sema_hf.store import EMAStore  # noqa: E402

DECAY = 0.999
MODELS = {
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "n_positions": 1024},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 64},
}


def build_model(name: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**MODELS[name]))


# ---- engines -------------------------------------------------------------------------------------------------------
def zero3(model: nn.Module):
    """ZeRO-3 over the 2 ranks; returns the module (parameters partitioned) and the ZeRO optimizer."""
    import deepspeed

    config = {
        "train_batch_size": dist.get_world_size(),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine.module, optimizer


def fsdp2(model: nn.Module):
    """FSDP2 (``fully_shard`` on every block and on the root) over the 2 ranks, with a plain AdamW."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


# ---- the two EMAs --------------------------------------------------------------------------------------------------
class GatherEveryStep:
    """A full fp32 shadow of every parameter on every rank; each update gathers each parameter first."""

    def __init__(self, model: nn.Module, gather: Callable[[nn.Parameter], object]) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.gather = gather
        self.shadow: list[torch.Tensor] = []
        self.largest_gather = 0
        with torch.no_grad():
            for p in self.params:
                with self.gather(p) as full:
                    self.shadow.append(full.detach().float().clone())
                    self.largest_gather = max(self.largest_gather, full.numel() * full.element_size())

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for shadow, p in zip(self.shadow, self.params, strict=True):
            with self.gather(p) as full:
                shadow.lerp_(full, 1.0 - decay)

    @property
    def state_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shadow)


class _Gathered:
    """``with _Gathered(p) as full``: the full parameter, gathered for the block (FSDP2: ``full_tensor()``)."""

    def __init__(self, param: nn.Parameter, kind: str) -> None:
        self.param, self.kind, self._ctx = param, kind, None

    def __enter__(self) -> torch.Tensor:
        if self.kind == "zero3":
            import deepspeed

            self._ctx = deepspeed.zero.GatheredParameters(self.param, modifier_rank=None)
            self._ctx.__enter__()
            return self.param.data
        return self.param.full_tensor()

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def timed(fn: Callable[[], None]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_engine(kind: str, model_name: str, rounds: int) -> list[dict]:
    model = build_model(model_name)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    module, optimizer = zero3(model) if kind == "zero3" else fsdp2(model)
    adapter = detect_engine(module, optimizer)
    store = EMAStore(adapter.slots(), after_write=adapter.after_write)
    baseline = GatherEveryStep(module, lambda p: _Gathered(p, kind))
    times: dict[str, list[float]] = {"sema_hf": [], "gather-every-step": []}
    for r in range(rounds + 1):  # round 0 warms up
        order = [("sema_hf", store.update), ("gather-every-step", baseline.update)]
        for name, update in order if r % 2 else order[::-1]:
            elapsed = timed(lambda update=update: update(DECAY))
            if r:
                times[name].append(elapsed)
    state = {"sema_hf": store.local_numel * 4, "gather-every-step": baseline.state_bytes}
    transient = {"sema_hf": 0, "gather-every-step": baseline.largest_gather}
    rows = []
    for name in times:
        rows.append(
            {
                "engine": kind,
                "method": name,
                "rank": dist.get_rank(),
                "params": total,
                "ema_bytes": state[name],
                "transient_bytes": transient[name],
                "median_ms": 1e3 * statistics.median(times[name]),
                "min_ms": 1e3 * min(times[name]),
                "max_ms": 1e3 * max(times[name]),
            }
        )
    del store, baseline, module, optimizer, adapter
    return rows


def bench_ddp(model_name: str, rounds: int) -> list[dict]:
    """DDP replicas: the full-copy average on every rank against ``shard_under_ddp`` (update, switch, swap)."""
    from sema_hf.engines.ddp_sharded import SWAP_CHUNK, DDPShardedAdapter

    model = build_model(model_name)
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    full = detect_engine(wrapped, optimizer)
    shared = detect_engine(wrapped, optimizer, shard_under_ddp=True)
    assert isinstance(shared, DDPShardedAdapter), type(shared)
    stores = {
        "full copy": EMAStore(full.slots(), after_write=full.after_write),
        "shard_under_ddp": EMAStore(
            shared.slots(), after_write=shared.after_write, backup_forward=shared.backup_forward
        ),
    }
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    itemsize = next(model.parameters()).element_size()

    def swap(store: EMAStore) -> None:
        with store.swapped_in():
            pass

    ops = {"update": lambda store: store.update(DECAY), "switch": lambda store: store.switch(), "swap": swap}
    times = {(name, op): [] for name in stores for op in ops}
    for r in range(rounds + 1):  # round 0 warms up
        order = list(stores.items()) if r % 2 else list(stores.items())[::-1]
        for op, run in ops.items():
            for name, store in order:
                elapsed = timed(lambda run=run, store=store: run(store))
                if r:
                    times[(name, op)].append(elapsed)
    transient = {
        "full copy": {"switch": 0, "swap": total * itemsize},  # the store's clone of every parameter
        "shard_under_ddp": {
            "switch": shared.flat_numel * itemsize,  # the gathered flat buffer
            # + this rank's raw range + the exchange's scratch
            "swap": (shared.flat_numel + shared.local_numel + min(SWAP_CHUNK, total)) * itemsize,
        },
    }
    rows = []
    for name, store in stores.items():
        row = {
            "engine": "ddp",
            "method": name,
            "rank": dist.get_rank(),
            "params": total,
            "ema_bytes": store.local_numel * 4,
            "switch_transient_bytes": transient[name]["switch"],
            "swap_transient_bytes": transient[name]["swap"],
        }
        for op in ops:
            values = times[(name, op)]
            row.update(
                {
                    f"{op}_median_ms": 1e3 * statistics.median(values),
                    f"{op}_min_ms": 1e3 * min(values),
                    f"{op}_max_ms": 1e3 * max(values),
                }
            )
        # ratio of ours to the full copy, paired round by round (load that comes and goes cancels)
        rows.append(row)
    for op in ops:
        ratios = [a / b for a, b in zip(times[("shard_under_ddp", op)], times[("full copy", op)], strict=True)]
        rows[1][f"{op}_ratio_to_full"] = statistics.median(ratios)
    del stores, wrapped, optimizer, full, shared
    return rows


def bench_loop_zero3(model_name: str, rounds: int) -> list[dict]:
    """ZeRO-3 prepared by accelerate: `sema_hf.SEMA` against diffusers' `EMAModel` (per-parameter and foreach)."""
    import deepspeed
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin

    from sema_hf import SEMA

    model = build_model(model_name)  # full weights, built before ZeRO-3 partitions them (as diffusers' scripts do)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    largest = max(p.numel() for p in params)
    itemsize = params[0].element_size()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    # accelerate drops DeepSpeed under Accelerator(cpu=True): set the CPU process group up first, as the Trainer does.
    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=True))
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    # Imported only now: diffusers.training_utils imports deepspeed (which EMAModel.step needs under ZeRO-3) only when
    # ZeRO-3 is already enabled when it is first imported.
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=DECAY, use_ema_warmup=False)  # clones the full fp32 weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    module, optimizer = accelerator.prepare(model, optimizer)
    sema = SEMA(module, optimizer, accelerator, decay=DECAY, warmup="none")
    assert sema.engine.name == "deepspeed-zero3", sema.engine.name

    def diffusers_step(foreach: bool) -> None:
        ema.foreach = foreach
        ema.step(module.parameters())

    methods = {
        "sema_hf.SEMA": sema.step,
        "diffusers EMAModel": lambda: diffusers_step(False),
        "diffusers EMAModel(foreach=True)": lambda: diffusers_step(True),
    }
    # diffusers: per parameter, the gathered parameter plus its `s - p` and `(1 - m) * (s - p)` temporaries; with
    # foreach, every parameter gathered at once plus the `s - p` list.
    transient = {
        "sema_hf.SEMA": 0,
        "diffusers EMAModel": largest * (itemsize + 8),
        "diffusers EMAModel(foreach=True)": total * (itemsize + 4),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds + 1):  # round 0 warms up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            elapsed = timed(methods[name])
            if r:
                times[name].append(elapsed)
    assert sema.num_updates == rounds + 1, sema.num_updates  # every sema.step() was an update
    state = {"sema_hf.SEMA": sema.local_numel * 4}
    state["diffusers EMAModel"] = state["diffusers EMAModel(foreach=True)"] = sum(
        s.numel() * s.element_size() for s in ema.shadow_params
    )
    rows = []
    for name, values in times.items():
        ratios = [b / a for a, b in zip(times["sema_hf.SEMA"], values, strict=True)]
        rows.append(
            {
                "engine": "zero3-loop",
                "method": name,
                "rank": dist.get_rank(),
                "params": total,
                "ema_bytes": state[name],
                "transient_bytes": transient[name],
                "median_ms": 1e3 * statistics.median(values),
                "min_ms": 1e3 * min(values),
                "max_ms": 1e3 * max(values),
                "ratio_to_sema": statistics.median(ratios),
            }
        )
    sema.remove_hooks()
    return rows


def print_loop_table(rows: list[dict], model: str, rounds: int) -> None:
    mib = 2**20
    print(
        f"\nHand-written accelerate loop under ZeRO-3, {model} ({rows[0]['params'] / 1e6:.1f}M trainable), 2 ranks "
        f"(gloo, CPU, 1 thread each), decay {DECAY}, {rounds} rounds, torch {torch.__version__}\n"
    )
    print("| EMA | rank | EMA state per rank | transient per update | update median (min-max) | / SEMA (paired) |")
    print("|---|---|---|---|---|---:|")
    order = ("sema_hf.SEMA", "diffusers EMAModel", "diffusers EMAModel(foreach=True)")
    for row in sorted(rows, key=lambda r: (order.index(r["method"]), r["rank"])):
        print(
            f"| {row['method']} | {row['rank']} | {row['ema_bytes'] / mib:.1f} MiB | "
            f"{row['transient_bytes'] / mib:.1f} MiB | {row['median_ms']:.1f} ms "
            f"({row['min_ms']:.1f}-{row['max_ms']:.1f}) | {row['ratio_to_sema']:.1f}x |"
        )


def print_ddp_table(rows: list[dict], model: str, rounds: int) -> None:
    mib = 2**20
    print(
        f"\nDDP, {model} ({rows[0]['params'] / 1e6:.1f}M trainable), 2 ranks (gloo, CPU, 1 thread each), "
        f"decay {DECAY}, {rounds} rounds, torch {torch.__version__}\n"
    )
    print(
        "| EMA | rank | EMA state per rank | update median (min-max) | switch median (min-max) | "
        "swap in+out median (min-max) | transient: switch / evaluation |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["method"] != "full copy", r["rank"])):
        cells = [
            f"{row[f'{op}_median_ms']:.1f} ms ({row[f'{op}_min_ms']:.1f}-{row[f'{op}_max_ms']:.1f})"
            for op in ("update", "switch", "swap")
        ]
        print(
            f"| {row['method']} | {row['rank']} | {row['ema_bytes'] / mib:.1f} MiB | {' | '.join(cells)} | "
            f"{row['switch_transient_bytes'] / mib:.1f} / {row['swap_transient_bytes'] / mib:.1f} MiB |"
        )
    print("\nshard_under_ddp / full copy (median over rounds of the paired ratio):")
    for row in sorted((r for r in rows if "update_ratio_to_full" in r), key=lambda r: r["rank"]):
        print(
            f"  rank {row['rank']}: update {row['update_ratio_to_full']:.2f}x, switch {row['switch_ratio_to_full']:.2f}x, "
            f"swap {row['swap_ratio_to_full']:.2f}x; EMA state "
            f"{row['ema_bytes'] / next(r['ema_bytes'] for r in rows if r['method'] == 'full copy'):.2f}x"
        )


def print_table(rows: list[dict], model: str, rounds: int) -> None:
    mib = 2**20
    print(
        f"\nSharded EMA, {model} ({rows[0]['params'] / 1e6:.1f}M trainable), 2 ranks (gloo, CPU, 1 thread each), "
        f"decay {DECAY}, {rounds} rounds, torch {torch.__version__}\n"
    )
    print("| engine | EMA | rank | EMA state per rank | transient per update | update median (min-max) |")
    print("|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["engine"], r["method"] != "sema_hf", r["rank"])):
        print(
            f"| {row['engine']} | {row['method']} | {row['rank']} | {row['ema_bytes'] / mib:.1f} MiB | "
            f"{row['transient_bytes'] / mib:.1f} MiB | {row['median_ms']:.1f} ms "
            f"({row['min_ms']:.1f}-{row['max_ms']:.1f}) |"
        )


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rows: list[dict] = []
    for kind in args.engines.split(","):
        if kind == "ddp":
            rows += bench_ddp(args.model, args.rounds)
        elif kind == "zero3-loop":
            rows += bench_loop_zero3(args.model, args.rounds)
        else:
            rows += bench_engine(kind, args.model, args.rounds)
    gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        every = [row for rank_rows in gathered for row in rank_rows]
        sharded = [row for row in every if row["engine"] in ("zero3", "fsdp2")]
        if sharded:
            print_table(sharded, args.model, args.rounds)
        if any(row["engine"] == "ddp" for row in every):
            print_ddp_table([row for row in every if row["engine"] == "ddp"], args.model, args.rounds)
        if any(row["engine"] == "zero3-loop" for row in every):
            print_loop_table([row for row in every if row["engine"] == "zero3-loop"], args.model, args.rounds)
        if args.json:
            Path(args.json).write_text(json.dumps(every, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def launch(argv: list[str]) -> int:
    """Start this script on 2 ranks with torchrun (gloo on CPU, one thread per rank)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    return subprocess.call([*cmd, f"--master_port={port}", __file__, *argv], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--engines", default="zero3,fsdp2,ddp", help="comma-separated: zero3, fsdp2, ddp, zero3-loop")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:]))
    worker(args)


if __name__ == "__main__":
    main()
