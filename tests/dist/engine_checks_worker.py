"""2-rank worker: the engine faults a review found, each checked on real gloo ranks.

Usage: ``engine_checks_worker.py OUT_DIR``. Writes ``OUT_DIR/checks_rank{r}.json`` with, per check, what happened:

* ``buffers``: DDP with ``include_buffers=True``, the ranks fed different batches (so their BatchNorm statistics
  differ after every forward): the largest difference between the ranks' buffer averages, and between this rank's
  buffer average and the EMA of rank 0's buffers recorded here, after 6 steps and a switch.
* ``coverage``: a sharded adapter whose ranks both claim elements [0, 10) of a 20-element parameter (the element
  counts add up to 20): the error it raised, or None.
* ``one_rank_swap``: under ``shard_under_ddp`` only rank 0 enters ``swapped_in()``: the error rank 0 raised (after
  a 2 s entry timeout), or None; the weights after it.
* ``load_error``: rank 1's EMA shard file is damaged after a save; both ranks call ``load``: the error each raised.
* ``trainer_buffers``: the same as ``buffers`` through the Trainer's `SEMACallback` (2 epochs, a switch at each
  end, the average in the model at the end): the largest difference between the ranks' buffer averages and
  between their final buffers.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

from sema_hf import SEMA, SEMACallback  # noqa: E402
from sema_hf.checkpoint import shard_file_name  # noqa: E402
from sema_hf.engines.shards import Piece, ShardedAdapter  # noqa: E402

from tiny import tiny_model, tiny_trainer  # noqa: E402


def error_of(fn) -> str | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test reads what was raised
        return f"{type(err).__name__}: {err}"
    return None


def step(model, opt, accelerator, x, y) -> None:
    accelerator.backward(model(x, labels=y)["loss"])
    opt.step()
    opt.zero_grad()


def buffers_check(accelerator: Accelerator, rank: int) -> dict:
    model = tiny_model(batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sema = SEMA(model, opt, accelerator, decay=0.5, warmup="none", include_buffers=True, steps_per_epoch=6)
    inner = accelerator.unwrap_model(model)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data: its own BatchNorm statistics
    names = [n for n, b in inner.named_buffers() if b.is_floating_point()]
    # rank 0's buffers after each step, as seen on every rank (the independent reference of what both average)
    trajectory = []
    start = {n: b.detach().clone() for n, b in inner.named_buffers() if n in names}
    dist.broadcast_object_list(obj := [start], src=0)
    trajectory.append(obj[0])
    for _ in range(6):
        x = torch.randn(8, 8, generator=g) * (1 + 3 * rank)
        step(model, opt, accelerator, x, torch.sin(x.sum(-1)))
        sema.step()
        mine = {n: b.detach().clone() for n, b in inner.named_buffers() if n in names}
        dist.broadcast_object_list(obj := [mine], src=0)
        trajectory.append(obj[0])
    averages = {n: sema.store.state_dict()[n].clone() for n in names}
    reference = {n: t.clone() for n, t in trajectory[0].items()}
    for theta in trajectory[1:]:
        for n in names:
            reference[n].lerp_(theta[n], 0.5)
    gathered: list = [None, None]
    dist.all_gather_object(gathered, averages)
    sema.epoch_end()
    after_switch: list = [None, None]
    dist.all_gather_object(after_switch, {n: b.detach().clone() for n, b in inner.named_buffers() if n in names})
    sema.remove_hooks()
    return {
        "ranks_differ": max((gathered[0][n] - gathered[1][n]).abs().max().item() for n in names),
        "vs_rank0_reference": max((averages[n] - reference[n]).abs().max().item() for n in names),
        "buffers_differ_after_switch": max(
            (after_switch[0][n] - after_switch[1][n]).abs().max().item() for n in names
        ),
        "moved": max((trajectory[-1][n] - trajectory[0][n]).abs().max().item() for n in names),
    }


def coverage_check(rank: int) -> dict:
    piece = Piece("w", (20,), 0, torch.zeros(10))  # both ranks: elements [0, 10); [10, 20) held by nobody
    return {"error": error_of(lambda: ShardedAdapter("test", [("w", (20,))], [piece], None))}


def one_rank_swap_check(accelerator: Accelerator, rank: int) -> dict:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sema = SEMA(model, opt, accelerator, decay=0.5, warmup="none", shard_under_ddp=True, steps_per_epoch=4)
    sema.swap_entry_timeout_s = 2.0
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(rank))
    step(model, opt, accelerator, x, torch.sin(x.sum(-1)))
    sema.step()
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    error = None
    if rank == 0:

        def swap_on_rank0_only() -> None:
            with sema.swapped_in():
                model(x)

        error = error_of(swap_on_rank0_only)
    dist.barrier()
    sema.remove_hooks()
    restored = all(torch.equal(p.detach(), raw[n]) for n, p in model.named_parameters())
    return {"error": error, "weights_unchanged": restored}


def load_error_check(accelerator: Accelerator, rank: int, out_dir: str) -> dict:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sema = SEMA(model, opt, accelerator, decay=0.5, warmup="none", shard_under_ddp=True, steps_per_epoch=4)
    folder = os.path.join(out_dir, "damaged")
    sema.save(folder)
    if rank == 1:
        with open(os.path.join(folder, shard_file_name(1, 2)), "wb") as f:
            f.write(b"not a safetensors file")
    dist.barrier()
    error = error_of(lambda: sema.load(folder))
    sema.remove_hooks()
    return {"error": error}


def trainer_buffers_check(out_dir: str) -> dict:
    sema = SEMACallback(decay=0.5, warmup="none", include_buffers=True)
    model = tiny_model(batch_norm=True)
    tiny_trainer(os.path.join(out_dir, "trainer"), [sema], model=model, per_device_train_batch_size=4).train()
    names = [n for n, b in model.named_buffers() if b.is_floating_point()]
    averages = [None, None]
    dist.all_gather_object(averages, {n: sema.store.state_dict()[n].clone() for n in names})
    final = [None, None]
    dist.all_gather_object(final, {n: b.detach().clone() for n, b in model.named_buffers() if n in names})
    return {
        "ranks_differ": max((averages[0][n] - averages[1][n]).abs().max().item() for n in names),
        "final_buffers_differ": max((final[0][n] - final[1][n]).abs().max().item() for n in names),
        "num_switches": sema.num_switches,
    }


def main() -> None:
    out_dir = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    results = {
        "buffers": buffers_check(accelerator, rank),
        "coverage": coverage_check(rank),
        "one_rank_swap": one_rank_swap_check(accelerator, rank),
        "load_error": load_error_check(accelerator, rank, out_dir),
        "trainer_buffers": trainer_buffers_check(out_dir),
    }
    with open(os.path.join(out_dir, f"checks_rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
