"""2-rank worker: one rank's EMA write fails (a full disk, simulated in this script only) inside
``accelerator.save_state``; every rank records what it raised.

Usage: ``save_failure_worker.py OUT_DIR CASE [CASE...]`` with CASE ``writer`` (DDP: rank 0 writes the one full
average and fails; rank 1 writes nothing) or ``shard`` (``shard_under_ddp``: rank 1's own shard fails) or ``json``
(DDP: rank 0's ``sema_state.json`` fails after both shards were written). The process group times out after 20 s,
so a rank left waiting in a barrier records that instead of hanging the test. Writes
``OUT_DIR/CASE-rank{r}.json``: ``{"type", "message"}`` of the error this rank raised (null: none).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import sema_hf.checkpoint  # noqa: E402
from sema_hf import SEMA  # noqa: E402

from tiny import tiny_model  # noqa: E402

REAL_SAVE_FILE = sema_hf.checkpoint.save_file
REAL_ATOMIC_WRITE = sema_hf.checkpoint.atomic_write


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def json_disk_full(path, write):
    if os.path.basename(path) == sema_hf.checkpoint.STATE_NAME:
        disk_full()
    REAL_ATOMIC_WRITE(path, write)


def run(out: str, case: str) -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=20))])
    rank = accelerator.process_index
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    sema = SEMA(model, optimizer, accelerator, decay=0.5, warmup="none", shard_under_ddp=case == "shard")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    accelerator.backward(model(x, labels=x.sum(-1))["loss"])
    optimizer.step()
    sema.step()
    failing = {"writer": 0, "shard": 1, "json": 0}[case]
    if rank == failing:
        if case == "json":
            sema_hf.checkpoint.atomic_write = json_disk_full
        else:
            sema_hf.checkpoint.save_file = disk_full
    error = None
    try:
        accelerator.save_state(os.path.join(out, case))
    except Exception as err:  # noqa: BLE001 - recorded for the test
        error = {"type": type(err).__name__, "message": str(err)}
    finally:
        sema_hf.checkpoint.save_file = REAL_SAVE_FILE
        sema_hf.checkpoint.atomic_write = REAL_ATOMIC_WRITE
    with open(os.path.join(out, f"{case}-rank{rank}.json"), "w") as f:
        json.dump({"error": error}, f)
    sema.remove_hooks()
    try:
        dist.barrier()  # the next collective of the loop: on today's code it pairs with a barrier left waiting
    except Exception:  # noqa: BLE001, S110 - a rank already out of step; what it raised is recorded above
        pass


if __name__ == "__main__":
    for name in sys.argv[2:]:
        run(sys.argv[1], name)
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads end here, not in the interpreter's exit (an abort there)
