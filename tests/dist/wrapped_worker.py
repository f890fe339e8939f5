"""2-rank worker: SEMA's names through wrappers, and EMA checkpoints moved between FSDP2 and ZeRO-3 through them.

Usage: ``wrapped_worker.py OUT_DIR``. One launch, in order:

1. ``names``: the tiny GPT-2 with checkpoint-wrapped blocks, compiled, under DDP, FSDP1 and FSDP2 (wrapped the way
   accelerate wraps it: activation checkpointing first, then ``torch.compile``, then the sharding wrapper), and a
   model whose own submodule is called ``module`` under DDP; records the raw ``named_parameters()`` names and the
   names each adapter gives its averages.
2. ``fsdp2-ac``: a Trainer run under FSDP2 with accelerate's activation checkpointing (``fsdp_config
   activation_checkpointing``), checkpoint at step 6; the gathered EMA at that checkpoint and at the end.
3. ``fsdp2-resumed``: plain FSDP2 (no activation checkpointing) resumes run 2 from its step-6 checkpoint.
4. ``zero3``: a ZeRO-3 run loads run 2's step-6 EMA checkpoint (FSDP2 shards, another placement) at train begin,
   trains 2 steps and saves its own checkpoint.
5. ``fsdp2-ac-load``: FSDP2 with activation checkpointing loads the ZeRO-3 checkpoint at train begin.

Writes ``OUT_DIR/result_rank{r}.json`` and, from rank 0, the gathered EMAs as safetensors files.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from fsdp_shim import FSDPTrainer  # noqa: E402
from sharded_setup import SEMA_KWARGS, engine_args, eval_dataset, pattern_dataset, tiny_gpt2, training_args  # noqa: E402
from sharded_worker import full_masters, max_diff, reset_accelerate  # noqa: E402

from sema_hf import SEMACallback  # noqa: E402
from sema_hf.engines import detect_engine  # noqa: E402


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Wrap every GPT2Block in ``checkpoint_wrapper``, as accelerate's FSDP activation checkpointing does."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model


def adapter_names(model: nn.Module, **kwargs) -> dict:
    adapter = detect_engine(model, **kwargs)
    layout = adapter.layout()
    return {
        "engine": adapter.name,
        "raw": [n for n, _ in model.named_parameters()],
        "params": [n for n, _ in layout.params],
        "slots": [n for n, _ in layout.slots],
    }


class Holder(nn.Module):
    """A user's model whose own submodule is called ``module`` (a name DDP also uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1)


def names_under_wrappers() -> dict:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    ddp = DistributedDataParallel(torch.compile(checkpoint_blocks(tiny_gpt2()), backend="eager"))
    out["ddp"] = adapter_names(ddp)
    out["ddp-sharded"] = adapter_names(ddp, shard_under_ddp=True)
    torch.manual_seed(0)
    out["ddp-module-attribute"] = adapter_names(DistributedDataParallel(Holder()))

    # accelerate's FSDP1 order: wrap the blocks, then checkpoint them inside the FSDP units; compile last
    fsdp1 = FullyShardedDataParallel(
        tiny_gpt2(),
        auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )
    apply_activation_checkpointing(fsdp1, check_fn=lambda m: isinstance(m, GPT2Block))
    out["fsdp1"] = adapter_names(torch.compile(fsdp1, backend="eager"))

    # accelerate's FSDP2 order: checkpoint the blocks, compile, then fully_shard the blocks and the compiled root
    compiled = torch.compile(checkpoint_blocks(tiny_gpt2()), backend="eager")
    for block in compiled._orig_mod.transformer.h:
        fully_shard(block)
    fully_shard(compiled)
    out["fsdp2"] = adapter_names(compiled)
    return out


class EMARecorder(TrainerCallback):
    """Placed after SEMACallback: optionally loads an EMA checkpoint at train begin (as a user moving an average
    between engines would), and records the gathered EMA there and at every save."""

    def __init__(self, sema: SEMACallback, out: dict, folder: str, load: str | None = None) -> None:
        self.sema, self.out, self.folder, self.load = sema, out, folder, load

    def _save(self, name: str) -> None:
        ema = self.sema.ema_state_dict()
        if dist.get_rank() == 0:
            save_file(ema, os.path.join(self.folder, name))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.out["raw_names"] = [n for n, _ in model.named_parameters()]
        self.out["engine"] = self.sema.engine.name
        if self.load is not None:
            self.sema.load_checkpoint(self.load)
            self._save("ema_loaded.safetensors")

    def on_save(self, args, state, control, **kwargs):
        self._save(f"ema_step{state.global_step}.safetensors")


def train(name: str, out_dir: str, engine: str, load: str | None = None, resume: str | None = None, **overrides):
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    out: dict = {}
    sema = SEMACallback(**SEMA_KWARGS)
    trainer_cls = FSDPTrainer if engine.startswith("fsdp") else Trainer
    trainer = trainer_cls(
        model=tiny_gpt2(),
        args=training_args(os.path.join(folder, "run"), dist.get_world_size(), engine, **overrides),
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[sema, EMARecorder(sema, out, folder, load)],
    )
    trainer.train(resume_from_checkpoint=resume)
    ema = sema.ema_state_dict()
    out["ema_names"] = list(ema)
    out["masters"] = full_masters("zero3" if engine.startswith("zero") else "fsdp2", trainer.model)
    out["ema"] = ema
    if dist.get_rank() == 0:
        save_file(ema, os.path.join(folder, "ema_final.safetensors"))
    reset_accelerate()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # set for good by a DeepSpeed Accelerator; FSDP runs follow
    return out


def with_activation_checkpointing() -> dict:
    return {"fsdp_config": {**engine_args("fsdp2")["fsdp_config"], "activation_checkpointing": True}}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")  # the Trainers below reuse it
    result: dict = {"names": names_under_wrappers()}
    save6 = {"save_strategy": "steps", "save_steps": 6}
    wrapped = train("fsdp2-ac", out_dir, "fsdp2", **save6, **with_activation_checkpointing())
    checkpoint6 = os.path.join(out_dir, "fsdp2-ac", "run", "checkpoint-6")
    resumed = train("fsdp2-resumed", out_dir, "fsdp2", resume=checkpoint6, **save6)
    zero3 = train("zero3", out_dir, "zero3", load=checkpoint6, max_steps=2, save_strategy="steps", save_steps=2)
    checkpoint2 = os.path.join(out_dir, "zero3", "run", "checkpoint-2")
    loaded = train("fsdp2-ac-load", out_dir, "fsdp2", load=checkpoint2, max_steps=1, **with_activation_checkpointing())
    for name, run in (("fsdp2-ac", wrapped), ("fsdp2-resumed", resumed), ("zero3", zero3), ("fsdp2-ac-load", loaded)):
        result[name] = {k: v for k, v in run.items() if k not in ("ema", "masters")}
    result["resume_ema_diff"] = max_diff(resumed["ema"], wrapped["ema"])
    result["resume_weights_diff"] = max_diff(resumed["masters"], wrapped["masters"])
    with open(os.path.join(out_dir, f"result_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
