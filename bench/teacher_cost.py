"""What a mean teacher costs per training step: the student's own average swapped in for the teacher's forward
(`SEMA.swapped_in`, `examples/mean_teacher.py`) against a full teacher copy kept beside the student (what most
mean-teacher / EMA-teacher code does: a ``deepcopy`` of the model, frozen, updated by an EMA after each step).

One training step of a GPT-2-style model (the LM loss plus the mean-teacher consistency cost), in three ways that
run in the same processes, round by round in rotating order, each round after a barrier:

* ``student``: the step alone (no teacher, no average): the baseline.
* ``swap``: ``with torch.no_grad(), sema.swapped_in(): teacher = model(x)``, then the step, then ``sema.step()``.
  The average is `SEMA`'s: fp32, over what the optimizer updates (the adapter under LoRA), this rank's shard under
  ZeRO-3. The swap writes the average into the tensors the forward reads and restores them afterwards (a transient
  backup of those tensors); under ZeRO-3 the teacher's forward gathers the parameters as the student's does.
* ``copy``: ``teacher = copy(x)`` on a full fp32 copy of the model made before ``accelerator.prepare`` (every rank
  holds all of it), then the step, then the copy's EMA update ``lerp_`` of its trainable tensors towards the
  student's; under ZeRO-3 the student's trainable parameters are gathered for it every step
  (``deepspeed.zero.GatheredParameters``, all at once).

Reported per rank: the median step time (ms, over the rounds) and its ratio to ``student``; the time of entering
and leaving ``swapped_in()`` alone (no forward), which shows how much of the swap's cost is the teacher's forward;
the teacher's memory held between steps (the average, or the copy: bytes of the tensors, not a profiler) and the
transient memory of the swap (the backup of the forward tensors) or of the copy's update (the gathered trainable
parameters under ZeRO-3).

Run: ``python bench/teacher_cost.py [--model mini] [--rounds 12] [--adapters lora,full] [--json out.json]``: one
process, then 2 ranks with DDP and with DeepSpeed ZeRO-3 (torchrun, gloo on CPU, one thread per rank).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from sema_hf import SEMA  # noqa: E402

MODELS = {
    "mini": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 4096, "n_positions": 64},
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
}
BATCH, SEQ = 4, 64
WARMUP = 2


def build(model_name: str, adapter: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**MODELS[model_name], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0)
        )
    return model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run(engine: str, model_name: str, adapter: str, rounds: int) -> dict:
    from accelerate.state import AcceleratorState, GradientState
    from mean_teacher import make_accelerator

    AcceleratorState._reset_state(True)  # a fresh accelerator per row, as a new process would have
    GradientState._reset_state()
    accelerator = make_accelerator(zero3=engine == "zero3")
    model = build(model_name, adapter)
    teacher_copy = copy.deepcopy(model).eval().requires_grad_(False)  # before prepare: a full copy on every rank
    copy_trainable = [q for p, q in zip(model.parameters(), teacher_copy.parameters(), strict=True) if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    sema = SEMA(model, optimizer, accelerator, decay=0.999, warmup="none", switch=False)
    trainable = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(accelerator.process_index)

    def step(teacher: str) -> float:
        x = torch.randint(0, MODELS[model_name]["vocab_size"], (BATCH, SEQ), generator=g).to(accelerator.device)
        _barrier()
        start = time.perf_counter()
        target = None
        if teacher == "swap":
            with torch.no_grad(), sema.swapped_in():
                target = model(input_ids=x).logits
        elif teacher == "copy":
            with torch.no_grad():
                target = teacher_copy(input_ids=x).logits
        out = model(input_ids=x, labels=x)
        loss = out.loss
        if target is not None:
            loss = loss + F.mse_loss(out.logits.softmax(-1), target.softmax(-1))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if teacher == "swap":
            sema.step()
        elif teacher == "copy":
            with torch.no_grad():
                if engine == "zero3":
                    import deepspeed

                    with deepspeed.zero.GatheredParameters(trainable):
                        torch._foreach_lerp_(copy_trainable, [p.data for p in trainable], 1 - 0.999)
                else:
                    torch._foreach_lerp_(copy_trainable, [p.data for p in trainable], 1 - 0.999)
        _barrier()
        return time.perf_counter() - start

    def swap_alone() -> float:
        _barrier()
        start = time.perf_counter()
        with sema.swapped_in():
            pass
        _barrier()
        return time.perf_counter() - start

    methods = ["student", "swap", "copy"]
    times: dict[str, list[float]] = {m: [] for m in [*methods, "swap_alone"]}
    for r in range(WARMUP + rounds):
        for m in methods[r % 3 :] + methods[: r % 3]:
            elapsed = step(m)
            if r >= WARMUP:
                times[m].append(elapsed)
        elapsed = swap_alone()
        if r >= WARMUP:
            times["swap_alone"].append(elapsed)
    forward = [s.forward_tensor for s in sema.store.slots]
    full_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    row = {
        "engine": engine,
        "world": accelerator.num_processes,
        "model": model_name,
        "adapter": adapter,
        "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in teacher_copy.parameters()),
        "trainable": full_trainable,
        "ms": {m: 1000 * statistics.median(v) for m, v in times.items()},
        "held_bytes": {
            "swap": 4 * sema.local_numel,
            "copy": nbytes([*teacher_copy.parameters(), *teacher_copy.buffers()]),
        },
        "transient_bytes": {
            "swap": nbytes(forward),
            "copy": 4 * full_trainable if engine == "zero3" else 0,
        },
    }
    sema.remove_hooks()
    accelerator.free_memory()
    return row


def worker(args: argparse.Namespace) -> None:
    rows = [run(args.engine, args.model, adapter, args.rounds) for adapter in args.adapters.split(",")]
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, args: argparse.Namespace, out: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    own = [__file__, "--worker", "--engine", engine, "--model", args.model, "--rounds", str(args.rounds)]
    own += ["--adapters", args.adapters, "--out", out]
    if engine == "one":
        cmd = [sys.executable, *own]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *own]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | ranks | adapter | step: student | swap | copy | swap / student | copy / student | swap / copy "
        "| swap in + out alone | teacher held, swap (MiB) | held, copy (MiB) | transient, swap | transient, copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['engine']} | {r['world']} | {r['adapter']} | {ms['student']:.1f} ms | {ms['swap']:.1f} ms | "
            f"{ms['copy']:.1f} ms | {ms['swap'] / ms['student']:.2f} | {ms['copy'] / ms['student']:.2f} | "
            f"{ms['swap'] / ms['copy']:.2f} | {ms['swap_alone']:.1f} ms | {mib(r['held_bytes']['swap'])} | "
            f"{mib(r['held_bytes']['copy'])} | {mib(r['transient_bytes']['swap'])} | {mib(r['transient_bytes']['copy'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mini", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--adapters", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--engines", default="one,ddp,zero3", help="comma-separated: one (1 process), ddp, zero3")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.engine != "one":
            dist.init_process_group("gloo")
        worker(args)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            out = os.path.join(tmp, f"{engine}.json")
            launch(engine, args, out)
            with open(out) as f:
                rows += json.load(f)
            print("\n".join(table(rows).splitlines()[-len(args.adapters.split(",")) :]), flush=True)
    model = MODELS[args.model]
    print(f"\n{args.model} ({rows[0]['params'] / 1e6:.1f}M parameters; LoRA r 8 on c_attn, c_proj: "
          f"{rows[0]['trainable'] / 1e6:.3f}M trainable), batch {BATCH} x {SEQ} per rank, fp32, median of "
          f"{args.rounds} steps per way, n_layer {model['n_layer']}, n_embd {model['n_embd']}\n")  # fmt: skip
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
