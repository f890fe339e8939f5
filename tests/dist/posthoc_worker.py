"""2-rank worker: post-hoc EMA tracking under a sharded engine, the Trainer driving the core.

Usage: ``posthoc_worker.py OUT_DIR ENGINE [ENGINE...]`` with ENGINE ``zero3``, ``fsdp2`` (keys of
``sharded_setup.ENGINES``) or ``ddp-sharded`` (DDP with ``shard_under_ddp``). Each run trains the tiny GPT-2 for 12
steps with ``SEMACallback(posthoc_every_steps=2)`` and checkpoints at steps 6 and 12; its snapshots go to
``OUT_DIR/ENGINE/run/sema_posthoc/``. Then,
inside the run, each rank combines its own shards for ``sigma_rel = 0.07`` (`SEMA.posthoc_average`, no gather) and
writes them with their piece ranges to ``OUT_DIR/ENGINE/average_rank{r}.safetensors``, and the snapshot files it
wrote itself to ``OUT_DIR/ENGINE/written_rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from fsdp_shim import FSDPTrainer  # noqa: E402
from sharded_setup import ENGINES, SEMA_KWARGS, eval_dataset, pattern_dataset, run_each_engine, tiny_gpt2, training_args  # noqa: E402

from sema_hf import SEMACallback  # noqa: E402

POSTHOC = {"posthoc_every_steps": 2}
CHECKPOINT = {"save_strategy": "steps", "save_steps": 6}  # checkpoint-6 and checkpoint-12 carry the profiles


def run(out_dir: str, engine: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = os.path.join(out_dir, engine)
    os.makedirs(folder, exist_ok=True)
    if engine == "ddp-sharded":
        args = training_args(os.path.join(folder, "run"), world, **CHECKPOINT)
        trainer_class, extra = Trainer, {"shard_under_ddp": True}
    else:
        args = training_args(os.path.join(folder, "run"), world, engine, **CHECKPOINT)
        trainer_class, extra = (FSDPTrainer if ENGINES[engine][0] == "fsdp" else Trainer), {}
    sema = SEMACallback(**SEMA_KWARGS, **POSTHOC, **extra)
    trainer = trainer_class(
        model=tiny_gpt2(),
        args=args,
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[sema],
    )
    trainer.train()
    posthoc_dir = os.path.join(folder, "run", "sema_posthoc")
    core = sema.core
    tensors, report = core.posthoc_average(sigma_rel=0.07)
    layout = core.engine.layout()
    save_file(
        {n: t.contiguous() for n, t in tensors.items()},
        os.path.join(folder, f"average_rank{rank}.safetensors"),
        metadata={"pieces": json.dumps(layout.extra.get("pieces")), "weights": json.dumps(report.weights)},
    )
    mine = f"-{rank + 1:05d}-of-{world:05d}.safetensors"
    with open(os.path.join(folder, f"written_rank{rank}.json"), "w") as f:
        json.dump(
            {
                "engine": core.engine.name,
                "local_numel": core.local_numel,
                "steps": core.posthoc_steps,
                "files": sorted(n for n in os.listdir(posthoc_dir) if n.endswith(mine)),
            },
            f,
        )
    if ENGINES.get(engine, ("",))[0] == "deepspeed":
        trainer.accelerator.free_memory()


if __name__ == "__main__":
    run_each_engine(run)
