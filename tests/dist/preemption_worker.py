"""2 gloo ranks, a checkpoint every step: an uninterrupted run, then one rank's files of the newest checkpoint made
incomplete as a kill would leave them, then ``resume_from_checkpoint=True``. Both ranks must resume the same step.

Scenarios (argv[2]):
    shared   torchrun, one node, shared storage, `SEMATrainer` (EMA first): rank 1's ``rng_state_1.pth`` of the
             newest checkpoint is missing (rank 0 finished ``trainer_state.json`` before rank 1 wrote it). Rank 0
             sees the checkpoint complete, rank 1 does not.
    nodes    2 one-process nodes, ``save_on_each_node``, no shared storage (``<base>/node<N>``), plain Trainer +
             `SEMACallback`: node 1's copy of the newest checkpoint lacks ``sema_state.json`` (killed between the
             Trainer's save and SEMA's); node 0's copy is complete and must be set aside too.

Each rank writes ``<base>/<scenario>-rank<R>.json`` (the step it resumed at, what was set aside, whether
torch.distributed was up in ``on_init_end``) and ``<scenario>-<run>-rank<R>.safetensors`` (its final weights and EMA,
for the uninterrupted and the resumed run).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import PrinterCallback, Trainer, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sema_hf import SEMACallback, SEMATrainer  # noqa: E402
from sema_hf.checkpoint import STATE_NAME  # noqa: E402
from sema_hf.preemption import SET_ASIDE_PREFIX  # noqa: E402

from tiny import tiny_args, tiny_dataset, tiny_model  # noqa: E402

SETTINGS = dict(
    per_device_train_batch_size=4,  # 2 ranks x 4 = 8 of 16 samples: 2 steps per epoch, 4 in all
    save_strategy="steps",
    save_steps=1,
    save_total_limit=3,
    ddp_timeout=60,  # a rank left waiting in a collective fails within a minute instead of the default 30
)


class Probe(TrainerCallback):
    """Whether torch.distributed is up when callbacks see on_init_end; the step train() starts from."""

    def __init__(self) -> None:
        self.distributed_at_init_end: bool | None = None
        self.start: int | None = None

    def on_init_end(self, args, state, control, **kwargs):
        self.distributed_at_init_end = torch.distributed.is_initialized()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step


def run(scenario: str, output_dir: str, resume: bool) -> tuple[Trainer, SEMACallback, Probe]:
    sema, probe = SEMACallback(decay=0.6, warmup_steps=3), Probe()
    cls = SEMATrainer if scenario == "shared" else Trainer
    overrides = {"save_on_each_node": True} if scenario == "nodes" else {}
    data = tiny_dataset(n=16)
    trainer = cls(
        model=tiny_model(),
        args=tiny_args(output_dir, **SETTINGS, **overrides),
        train_dataset=data,
        callbacks=[sema, probe],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, sema, probe


def keep(trainer: Trainer, sema: SEMACallback, path: str) -> None:
    tensors = {f"weights.{n}": p.detach().clone().contiguous() for n, p in trainer.model.named_parameters()}
    tensors.update({f"ema.{n}": t for n, t in sema.ema_state_dict().items()})
    save_file(tensors, path)


def main(base: str, scenario: str) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ["RANK"])
    output_dir = os.path.join(base, f"node{os.environ['NODE_RANK']}") if scenario == "nodes" else base
    trainer, sema, _ = run(scenario, output_dir, resume=False)
    keep(trainer, sema, os.path.join(base, f"{scenario}-uninterrupted-rank{rank}.safetensors"))
    newest = os.path.join(output_dir, "checkpoint-4")
    if scenario == "shared" and rank == 1:
        os.remove(os.path.join(newest, "rng_state_1.pth"))
    if scenario == "nodes" and rank == 1:
        os.remove(os.path.join(newest, STATE_NAME))
    torch.distributed.barrier()
    trainer, sema, probe = run(scenario, output_dir, resume=True)
    keep(trainer, sema, os.path.join(base, f"{scenario}-resumed-rank{rank}.safetensors"))
    result = {
        "rank": rank,
        "start": probe.start,
        "distributed_at_init_end": probe.distributed_at_init_end,
        "set_aside": sorted(n for n in os.listdir(output_dir) if n.startswith(SET_ASIDE_PREFIX)),
        "checkpoints": sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-")),
    }
    with open(os.path.join(base, f"{scenario}-rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
