"""2-rank worker: a Trainer run with post-hoc selection (``posthoc_select``) under a sharded engine.

Usage: ``posthoc_select_worker.py OUT_DIR ENGINE [ENGINE...]`` (ENGINE a key of ``sharded_setup.ENGINES``). For each
engine: the tiny GPT-2 trained 12 optimizer steps (learning rate 0.05: noisy enough that an average wins) with plain EMA and post-hoc snapshots every 2 steps, selection on
``eval_loss`` over a small grid at train end, then ``save_model``. Writes into ``OUT_DIR/ENGINE/``: the Trainer's
files (``sema_posthoc/``, ``posthoc_sweep.json``, ``posthoc_sweep.png``), ``saved/`` (what ``save_model`` wrote)
and per rank ``result_rank{r}.json``: the sweep as that rank saw it, the weights held, and the largest difference
between what the optimizer updates and what the forward reads on that rank after the selection wrote the winner.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from fsdp_shim import FSDPTrainer  # noqa: E402
from sharded_setup import ENGINES, eval_dataset, pattern_dataset, tiny_gpt2, training_args  # noqa: E402

from sema_hf import SEMACallback  # noqa: E402

GRID = ["sigma_rel=0.05", "sigma_rel=0.08", "sigma_rel=0.13", "horizon_steps=2"]


def run(out_dir: str, engine: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    folder = os.path.join(out_dir, engine)
    callback = SEMACallback(
        decay=0.8,
        warmup="none",
        switch=False,
        posthoc_every_steps=2,
        posthoc_select="eval_loss",
        posthoc_grid=GRID,
    )
    trainer_cls = FSDPTrainer if ENGINES[engine][0] == "fsdp" else Trainer
    trainer = trainer_cls(
        model=tiny_gpt2(),
        args=training_args(folder, world, engine, eval_strategy="no", learning_rate=0.05),
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[callback],
    )
    trainer.train()
    # What the optimizer updates and what the forward reads on this rank must both hold the winner.
    slots = callback.store.slots
    source_vs_compute = max(
        ((s.source.float() - s.compute.float()).abs().max().item() for s in slots if s.compute is not None),
        default=0.0,
    )
    if ENGINES[engine][0] == "fsdp":
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")  # one consolidated file
    trainer.save_model(os.path.join(folder, "saved"))
    result = {
        "engine": callback.engine.name,
        "sweep": callback.posthoc_sweep.to_dict(),
        "held": callback.final_weights_held,
        "compute_slots": sum(s.compute is not None for s in slots),
        "source_vs_compute": source_vs_compute,
    }
    with open(os.path.join(folder, f"result_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()


def main() -> None:
    out_dir, engines = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    for engine in engines:
        run(out_dir, engine)


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
