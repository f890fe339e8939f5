"""2-rank worker: train the tiny GPT-2 with SEMA under one sharded engine and record what the tests assert.

Usage: ``sharded_worker.py OUT_DIR SPEC [SPEC...]``, each SPEC ``ENGINE`` or ``ENGINE:resume`` (ENGINE a key of
``sharded_setup.ENGINES``); the runs follow one another in the same two processes.

Writes into ``OUT_DIR/ENGINE/``: ``ema.safetensors`` (the final EMA gathered by ``ema_state_dict``), and per rank
``result_rank{r}.json`` with the shard sizes, the collectives counted inside ``update`` and ``switch``, the largest
differences between the full master / compute weights and the EMA after each switch, the difference between the
gathered EMA and the EMA recomputed from the recorded fp32 master trajectory, and the logged losses. With
``:resume``, the run also saves a checkpoint at step 6, a second Trainer resumes from it, and the differences between
the two runs' final EMA and weights are recorded; ``ema_step6.safetensors`` holds the EMA at that checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer, TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from fsdp_shim import FSDPTrainer  # noqa: E402
from sharded_setup import ENGINES, SEMA_KWARGS, eval_dataset, pattern_dataset, reference_ema, tiny_gpt2, training_args  # noqa: E402

from sema_hf import SEMACallback  # noqa: E402


class CollectiveCounter(TorchDispatchMode):
    """Counts every c10d operator dispatched inside the block, however Python reached it (DeepSpeed binds its
    collectives at import time, so wrapping ``torch.distributed`` functions would miss some)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.calls.append(func.name())
        return func(*args, **(kwargs or {}))


def full_masters(engine: str, model) -> dict[str, torch.Tensor]:
    """The full fp32 weights the optimizer updates, gathered with the engine's own API (collective)."""
    if ENGINES[engine][0] == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in model.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {n: t.detach().float().cpu().clone() for n, t in state.items()}


def full_compute(engine: str, model) -> dict[str, torch.Tensor]:
    """The full weights the next forward reads, in their compute dtype."""
    kind, options = ENGINES[engine]
    if kind == "deepspeed":
        import deepspeed

        params = list(model.named_parameters())
        if options["stage"] == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                return {n: p.data.detach().cpu().clone() for n, p in params}
        return {n: p.data.detach().cpu().clone() for n, p in params}
    if options["version"] == 2:
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.unshard()
        out = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        for m in modules:
            m.reshard()
        return out
    return full_masters(engine, model)  # FSDP1: the forward's low-precision copy is refilled from the local shard


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], cast=None) -> float:
    """Largest |a - b| over the names of ``b`` (``a`` cast to ``cast`` first, when given)."""
    worst = 0.0
    for name, value in b.items():
        x = a[name].to(cast) if cast is not None else a[name]
        worst = max(worst, (x.float() - value.float()).abs().max().item())
    return worst


class Trajectory(TrainerCallback):
    """Placed before SEMACallback: the full fp32 master weights at train begin and after every optimizer step (before
    SEMA swaps the average in for an evaluation)."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(full_masters(self.engine, model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(full_masters(self.engine, model))

    def ema(self) -> dict[str, torch.Tensor]:
        """The EMA recomputed from the recorded weights (decay fixed, no warmup)."""
        return reference_ema(self.weights, SEMA_KWARGS["decay"])


class Recorder(TrainerCallback):
    """Placed after SEMACallback: counts collectives in update/switch, checks weights after each switch."""

    def __init__(self, engine: str, sema: SEMACallback, out: dict) -> None:
        self.engine, self.sema, self.out = engine, sema, out
        out.update(update_collectives=[], switch_collectives=[], switch_checks=[])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        store = self.sema.store
        update, switch = store.update, store.switch

        def counted_update(decay: float) -> None:
            with CollectiveCounter() as counter:
                update(decay)
            self.out["update_collectives"].append(counter.calls)

        def counted_switch() -> None:
            with CollectiveCounter() as counter:
                switch()
            self.out["switch_collectives"].append(counter.calls)

        store.update, store.switch = counted_update, counted_switch  # test instrumentation of this store only
        self.out["local_numel"] = self.sema.local_numel
        self.out["engine"] = self.sema.engine.name
        self.out["optimizer"] = type(getattr(kwargs["optimizer"], "optimizer", kwargs["optimizer"])).__name__

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.sema.num_switches or state.global_step % 4:
            return
        ema = self.sema.ema_state_dict()
        masters, compute = full_masters(self.engine, model), full_compute(self.engine, model)
        dtype = next(iter(compute.values())).dtype
        self.out["switch_checks"].append(
            {
                "step": state.global_step,
                "master_vs_ema": max_diff(masters, ema),
                "compute_vs_ema": max_diff(ema, {n: compute[n] for n in ema}, cast=dtype),
                "compute_dtype": str(dtype),
            }
        )

    def on_save(self, args, state, control, **kwargs):
        ema = self.sema.ema_state_dict()
        if dist.get_rank() == 0:
            save_file(ema, os.path.join(args.output_dir, f"ema_step{state.global_step}.safetensors"))


def train(engine: str, output_dir: str, out: dict, resume_from: str | None = None, **overrides):
    sema = SEMACallback(**SEMA_KWARGS)
    trajectory = Trajectory(engine)
    trainer_cls = FSDPTrainer if ENGINES[engine][0] == "fsdp" else Trainer
    trainer = trainer_cls(
        model=tiny_gpt2(),
        args=training_args(output_dir, int(os.environ["WORLD_SIZE"]), engine, **overrides),
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[trajectory, sema, Recorder(engine, sema, out)],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, sema, trajectory


def run_engine(out_dir: str, engine: str, resume: bool) -> None:
    folder = os.path.join(out_dir, engine)
    os.makedirs(folder, exist_ok=True)
    out: dict = {}
    save = {"save_strategy": "steps", "save_steps": 6} if resume else {}
    trainer, sema, trajectory = train(engine, os.path.join(folder, "run"), out, **save)
    rank = dist.get_rank()
    ema = sema.ema_state_dict()
    masters = full_masters(engine, trainer.model)
    out["final_master_vs_ema"] = max_diff(masters, ema)  # final_weights="ema": the model ends on the average
    out["trajectory_vs_ema"] = max_diff(trajectory.ema(), ema)
    out["num_switches"], out["num_updates"] = sema.num_switches, sema.num_updates
    out["log_history"] = trainer.state.log_history
    out["params"] = {n: list(t.shape) for n, t in ema.items()}

    if ENGINES[engine][0] == "deepspeed" or ENGINES[engine][1]["version"] == 2:
        if ENGINES[engine][0] == "fsdp":
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        saved_dir = os.path.join(folder, "saved")
        trainer.save_model(saved_dir)
        dist.barrier()
        saved = load_file(os.path.join(saved_dir, "model.safetensors"))
        out["save_model_vs_ema"] = max_diff(saved, {n: ema[n].to(saved[n].dtype) for n in ema if n in saved})
        out["save_model_numel"] = sum(saved[n].numel() for n in ema if n in saved)

    if resume:
        resumed_out: dict = {}
        checkpoint = os.path.join(folder, "run", "checkpoint-6")
        trainer2, sema2, _ = train(engine, os.path.join(folder, "resumed"), resumed_out, resume_from=checkpoint)
        ema2 = sema2.ema_state_dict()
        out["resume_ema_diff"] = max_diff(ema2, ema)
        out["resume_weights_diff"] = max_diff(full_masters(engine, trainer2.model), masters)
        out["resume_local_numel"] = resumed_out["local_numel"]

    if rank == 0:
        save_file(ema, os.path.join(folder, "ema.safetensors"))
    with open(os.path.join(folder, f"result_rank{rank}.json"), "w") as f:
        json.dump(out, f)


def reset_accelerate() -> None:
    """Forget the previous run's engine so the next Trainer in this process sets up its own (test-only)."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()


def main(out_dir: str, specs: list[str]) -> None:
    """Each spec is ``ENGINE`` or ``ENGINE:resume``; the runs share one launch (each launch costs ~10 s)."""
    for spec in specs:
        engine, _, mode = spec.partition(":")
        run_engine(out_dir, engine, mode == "resume")
        reset_accelerate()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
