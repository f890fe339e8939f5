"""2-rank DDP worker: trains the tiny model with SEMA and saves each rank's EMA and final weights."""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sema_hf import SEMACallback  # noqa: E402

from tiny import tiny_trainer  # noqa: E402


def main(out_dir: str) -> None:
    sema = SEMACallback(decay=0.8, warmup_steps=3)
    trainer = tiny_trainer(os.path.join(out_dir, "run"), [sema], per_device_train_batch_size=4)
    trainer.train()
    rank = torch.distributed.get_rank()
    assert trainer.args.world_size == 2
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    ema = sema.ema_state_dict()
    save_file(ema, os.path.join(out_dir, f"ema_rank{rank}.safetensors"))
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    save_file(weights, os.path.join(out_dir, f"weights_rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"numel_rank{rank}.txt"), "w") as f:
        f.write(f"{sema.local_numel} {sema.num_updates} {sema.num_switches}")


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
