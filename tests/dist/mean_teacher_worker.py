"""2-rank worker: the mean-teacher recipe of ``examples/mean_teacher.py`` under DeepSpeed ZeRO-3 with a LoRA adapter.

Usage: ``mean_teacher_worker.py OUT_DIR``. Runs the example's loop for 8 steps; at every step, right after the
teacher's forward (``with torch.no_grad(), sema.swapped_in(): model(batch)``), it gathers the average as a whole-model
state dict (``sema.ema_state_dict(whole_model=True)``), loads it strictly into a plain (unsharded) copy of the PEFT
model and runs the same batch through it. Writes ``OUT_DIR/teacher_rank{r}.json``: per step, the largest difference
between the two teachers' logits, and between the teacher's and the raw student's logits (the teacher must be
something else than the student for the first to mean anything).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

from mean_teacher import batches, build_model, setup, train  # noqa: E402

STEPS = 8


def main() -> None:
    out_dir = sys.argv[1]
    accelerator, model, optimizer, sema = setup(zero3=True, lora=True, decay=0.7)
    rank, world = accelerator.process_index, accelerator.num_processes
    plain = build_model(seed=5, lora=True).eval()  # other initial weights: everything must come from the load
    record: dict[str, list] = {"vs_gathered": [], "vs_student": [], "keys_loaded": None}

    def check(step: int, batch: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        whole = sema.ema_state_dict(whole_model=True)  # a collective: every rank
        result = plain.load_state_dict(whole)  # strict
        record["keys_loaded"] = [len(whole), len(result.missing_keys), len(result.unexpected_keys)]
        with torch.no_grad():
            reference = plain(input_ids=batch).logits
            student = model(input_ids=batch).logits  # the raw weights, outside the swap (a collective too)
        record["vs_gathered"].append((teacher_logits - reference).abs().max().item())
        record["vs_student"].append((teacher_logits - student).abs().max().item())

    costs = train(accelerator, model, optimizer, sema, batches(rank, world, STEPS), on_teacher=check)
    record.update(
        engine=sema.engine.name,
        local_numel=sema.local_numel,
        averaged=sorted(sema.ema_state_dict()),
        num_updates=sema.num_updates,
        costs=costs,
        state_dict_keys=len(plain.state_dict()),
    )
    with open(os.path.join(out_dir, f"teacher_rank{rank}.json"), "w") as f:
        json.dump(record, f, indent=1)
    accelerator.free_memory()
    dist.barrier()


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
