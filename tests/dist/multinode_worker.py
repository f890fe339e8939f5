"""One "node" of a 2-node run (one gloo rank per node): trains the tiny model with SEMA, saving on each node into
that node's own folder (``<base>/node<NODE_RANK>``, no shared storage), and records what this rank ends with.

Phases (argv[2]):
    train     an uninterrupted 8-step run that saves checkpoint-4 and checkpoint-8 on every node
    resume    resume from this node's checkpoint-4 and finish the run
    missing   resume from checkpoint-4 (whose EMA files the test deleted on one node): record the error, then resume
              again with allow_fresh_ema_on_resume=True and finish the run

Each rank writes ``<base>/<phase>-rank<R>.json`` (counters, the error it saw) and ``.safetensors`` (its full EMA).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sema_hf import SEMACallback  # noqa: E402

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


def main(base: str, phase: str) -> None:
    node = int(os.environ["NODE_RANK"])
    checkpoint = os.path.join(base, f"node{node}", "checkpoint-4")
    if phase == "train":
        callback, result = train(base, node)
        result["files"] = sorted(os.listdir(checkpoint))
        record(base, phase, result, callback)
    elif phase == "resume":
        callback, result = train(base, node, resume=checkpoint)
        record(base, phase, result, callback)
    elif phase == "missing":
        try:
            train(base, node, resume=checkpoint)
            error = None
        except (FileNotFoundError, ValueError) as err:
            error = {"type": type(err).__name__, "message": str(err)}
        callback, result = train(base, node, resume=checkpoint, allow_fresh_ema_on_resume=True)
        record(base, phase, {**result, "error": error}, callback)
    else:
        raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
