"""One "node" of a 2-node run (one gloo rank per node): trains the tiny model with SEMA, saving on each node into
that node's own folder (``<base>/node<NODE_RANK>``, no shared storage), and records what this rank ends with.

Phases (argv[2:], run in order in one launch, so that the 2-node start-up is paid once):
    train     an uninterrupted 8-step run that saves checkpoint-4 and checkpoint-8 on every node
    resume    in a copy of each node's folder: resume from checkpoint-4 and finish the run
    missing   in another copy, where node 1 lost its EMA files of checkpoint-4 (node 0's are complete): resume from
              checkpoint-4 and record the error, then resume again with allow_fresh_ema_on_resume=True and finish
    unshared  without ``save_on_each_node`` (only global rank 0 saves, node 1's folder stays empty): train 8 steps,
              then make a new Trainer with SEMACallback in the same folders (no resume) and record each node's
              folder listing after its ``on_init_end``

Each rank writes ``<base>/<phase>-rank<R>.json`` (counters, the error it saw) and ``.safetensors`` (its full EMA).
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sema_hf import SEMACallback  # noqa: E402
from sema_hf.checkpoint import STATE_NAME, shard_file_name  # noqa: E402

from tiny import tiny_trainer  # noqa: E402

SETTINGS = dict(
    per_device_train_batch_size=4,  # 2 ranks x 4 = 8 of 32 samples: 4 steps per epoch, 8 in all
    save_strategy="steps",
    save_steps=4,
    save_on_each_node=True,
    ddp_timeout=60,  # a rank left waiting in a collective fails within a minute instead of the default 30
)


def train(base: str, node: int, resume: str | None = None, **sema) -> tuple[SEMACallback, dict]:
    callback = SEMACallback(decay=0.8, warmup_steps=3, **sema)
    trainer = tiny_trainer(os.path.join(base, f"node{node}"), [callback], **SETTINGS)
    assert trainer.args.world_size == 2 and trainer.args.should_save, "each node's only process must save"
    trainer.train(resume_from_checkpoint=resume)
    return callback, {"num_updates": callback.num_updates, "num_switches": callback.num_switches}


def record(base: str, phase: str, result: dict, callback: SEMACallback | None = None) -> None:
    rank = torch.distributed.get_rank()
    if callback is not None:
        save_file(callback.ema_state_dict(), os.path.join(base, f"{phase}-rank{rank}.safetensors"))
    with open(os.path.join(base, f"{phase}-rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, **result}, f)


def copy_of_node_folder(base: str, phase: str, node: int) -> str:
    """``<base>/<phase>/node<N>``: a copy of what this node saved, so that each phase starts from the same files."""
    copy = os.path.join(base, phase)
    shutil.copytree(os.path.join(base, f"node{node}"), os.path.join(copy, f"node{node}"))
    return copy


def main(base: str, phases: list[str]) -> None:
    node = int(os.environ["NODE_RANK"])
    for phase in phases:
        if phase == "train":
            callback, result = train(base, node)
            result["files"] = sorted(os.listdir(os.path.join(base, f"node{node}", "checkpoint-4")))
            record(base, phase, result, callback)
        elif phase == "resume":
            folder = copy_of_node_folder(base, phase, node)
            callback, result = train(folder, node, resume=os.path.join(folder, f"node{node}", "checkpoint-4"))
            record(base, phase, result, callback)
        elif phase == "missing":
            folder = copy_of_node_folder(base, phase, node)
            checkpoint = os.path.join(folder, f"node{node}", "checkpoint-4")
            if node == 1:  # no shared storage: only node 1's copy of the checkpoint lost its EMA files
                for name in (STATE_NAME, shard_file_name(0, 1)):
                    os.remove(os.path.join(checkpoint, name))
            try:
                train(folder, node, resume=checkpoint)
                error = None
            except (FileNotFoundError, ValueError) as err:
                error = {"type": type(err).__name__, "message": str(err)}
            callback, result = train(folder, node, resume=checkpoint, allow_fresh_ema_on_resume=True)
            record(base, phase, {**result, "error": error}, callback)
        elif phase == "unshared":
            folder = os.path.join(base, phase, f"node{node}")
            os.makedirs(folder)
            settings = {**SETTINGS, "save_on_each_node": False}
            tiny_trainer(folder, [SEMACallback(decay=0.8, warmup_steps=3)], **settings).train()
            before = sorted(os.listdir(folder))
            tiny_trainer(folder, [SEMACallback(decay=0.8, warmup_steps=3)], **settings)  # its on_init_end
            files = {name: sorted(os.listdir(os.path.join(folder, name))) for name in before}
            record(base, phase, {"before": before, "after": sorted(os.listdir(folder)), "files": files})
        else:
            raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
