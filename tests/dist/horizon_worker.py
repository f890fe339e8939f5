"""2-rank DDP worker: resolves horizon_epochs with gradient accumulation 2 and update_every 2, writes what it saw."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sema_hf import SEMACallback  # noqa: E402

from tiny import tiny_trainer  # noqa: E402


def main(out_dir: str) -> None:
    sema = SEMACallback(horizon_epochs=1.0, warmup="none", update_every=2, switch=False)
    # 32 examples / 2 ranks / 4 per batch = 4 batches per rank per epoch; accumulation 2 -> 2 optimizer steps.
    trainer = tiny_trainer(
        os.path.join(out_dir, "run"), [sema], per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    trainer.train()
    logged = [h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h]
    rank = torch.distributed.get_rank()
    with open(os.path.join(out_dir, f"horizon_rank{rank}.json"), "w") as f:
        json.dump({"decay": sema.decay, "logged": logged, "steps": trainer.state.global_step}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
