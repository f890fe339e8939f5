"""2-rank worker: the tiny GPT-2 trained by a hand-written accelerate loop with `sema_hf.SEMA`, per engine.

Usage: ``loop_worker.py OUT_DIR ENGINE [ENGINE...]`` with ENGINE one of ``ddp`` (gradient accumulation 2),
``ddp-sharded`` (``shard_under_ddp``), ``zero2`` / ``zero3`` (DeepSpeed through accelerate's DeepSpeed plugin) and
``fsdp1`` / ``fsdp2`` (accelerate's FSDP plugin, re-installed on CPU as `fsdp_shim` does for the Trainer). For each engine:
12 optimizer steps (4 per epoch, a switch at every epoch end), ``accelerator.save_state`` at step 6, then a second
accelerator, model and optimizer load that state and train steps 7-12 again.

Writes into ``OUT_DIR/ENGINE/``: ``ckpt6/`` (the state saved at step 6), ``ema_step6.safetensors`` and
``ema.safetensors`` (the gathered average at step 6 and at the end, rank 0) and ``result_rank{r}.json``: the largest
difference between the gathered average and the EMA recomputed here from the recorded full fp32 master weights,
between the weights and the average right after each switch, and between the resumed and the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from sharded_setup import pattern_dataset, reference_ema, run_each_engine, tiny_gpt2  # noqa: E402

from sema_hf import SEMA  # noqa: E402

STEPS, PER_EPOCH, SAVE_AT, DECAY = 12, 4, 6, 0.6
ZERO3 = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}


def make_accelerator(engine: str) -> Accelerator:
    AcceleratorState._reset_state()
    GradientState._reset_state()
    if engine in ("zero2", "zero3"):
        from accelerate.utils import DeepSpeedPlugin

        # As the Trainer does with use_cpu=True: a CPU process state first, then DeepSpeed by the environment
        # (Accelerator(cpu=True) would drop the DeepSpeed plugin).
        PartialState(cpu=True)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        zero = {**ZERO3, "zero_optimization": {**ZERO3["zero_optimization"], "stage": int(engine[-1])}}
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=zero))
    if engine in ("fsdp1", "fsdp2"):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator = Accelerator(cpu=True)
        # Test-only, as tests/dist/fsdp_shim.py: on CPU accelerate drops the FSDP plugin; put it back.
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=int(engine[-1]),
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["GPT2Block"],
            state_dict_type="SHARDED_STATE_DICT",
            sync_module_states=False,
            cpu_ram_efficient_loading=False,
            use_orig_params=True,  # FSDP1: the optimizer was made over the original parameters
        )
        for shared in (accelerator.state.__dict__, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")
        return accelerator
    return Accelerator(cpu=True, gradient_accumulation_steps=2 if engine == "ddp" else 1)


def full_masters(engine: str, accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """The full fp32 weights the optimizer updates, gathered with the engine's own API (collective)."""
    if engine == "zero2":  # fp32 training: every rank's parameters are the full fp32 weights
        return {n: p.detach().float().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    if engine == "zero3":  # fp32 training: the gathered parameters are the fp32 masters
        import deepspeed

        params = list(accelerator.unwrap_model(model).named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().float().cpu().clone() for n, p in params}
    if engine in ("fsdp1", "fsdp2"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        names = {n for n, _ in tiny_gpt2().named_parameters()}  # the user's names (a tied weight once)
        return {n: t.detach().float().cpu().clone() for n, t in state.items() if n in names}
    return {n: p.detach().float().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}


def rank_batches(rank: int, world: int) -> list[torch.Tensor]:
    """Step k's batch of this rank: rows of a global batch of 8, split between the ranks."""
    ids = torch.tensor(pattern_dataset(32)["input_ids"])
    per = 8 // world
    return [ids[8 * (k % 4) + per * rank : 8 * (k % 4) + per * (rank + 1)] for k in range(STEPS)]


def micro_batches(engine: str, batch: torch.Tensor) -> list[torch.Tensor]:
    return list(batch.chunk(2)) if engine == "ddp" else [batch]


def build(engine: str):
    accelerator = make_accelerator(engine)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    sema = SEMA(
        model,
        optimizer,
        accelerator,
        decay=DECAY,
        warmup="none",
        steps_per_epoch=PER_EPOCH,
        shard_under_ddp=engine == "ddp-sharded",
    )
    return accelerator, model, optimizer, sema


def train(engine, accelerator, model, optimizer, sema, batches, start, record=None, switch_gaps=None, save=None):
    for k in range(start, STEPS):
        for micro in micro_batches(engine, batches[k]):
            with accelerator.accumulate(model):
                loss = model(input_ids=micro, labels=micro).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            sema.step()
        if record is not None:
            record.append(full_masters(engine, accelerator, model))
        if (k + 1) % PER_EPOCH == 0:
            assert sema.epoch_end()
            if switch_gaps is not None:
                ema, weights = sema.ema_state_dict(), full_masters(engine, accelerator, model)
                switch_gaps.append(max((ema[n] - weights[n]).abs().max().item() for n in ema))
        if record is not None and k in (1, 5, 9):  # between switches, where the average differs from the weights
            before = full_masters(engine, accelerator, model)
            with sema.swapped_in(), torch.no_grad():
                model(input_ids=batches[k], labels=batches[k])
            after = full_masters(engine, accelerator, model)
            record[-1]["__swap_restored__"] = torch.tensor(
                float(all(torch.equal(before[n], after[n]) for n in before))
            )
        if save is not None and k + 1 == SAVE_AT:
            accelerator.save_state(save)
            saved = sema.ema_state_dict()  # a collective under sharded engines: every rank
            if dist.get_rank() == 0:
                save_file(saved, os.path.join(os.path.dirname(save), "ema_step6.safetensors"))
    return saved if save is not None else None


def whole_model_check(sema: SEMA, averages: dict[str, torch.Tensor]) -> dict:
    """``ema_state_dict(whole_model=True)`` loaded strictly into a plain GPT-2 (a collective: every rank)."""
    try:
        whole = sema.ema_state_dict(whole_model=True)
    except NotImplementedError as err:
        return {"error": str(err)}
    plain = tiny_gpt2(seed=7)
    plain.load_state_dict(whole)  # strict
    held = dict(plain.named_parameters())
    return {
        "keys": len(whole),
        "expected": len(plain.state_dict()),
        "diff": max((held[n] - averages[n]).abs().max().item() for n in averages),
        "tied": torch.equal(whole["lm_head.weight"], whole["transformer.wte.weight"]),
    }


def run(out_dir: str, engine: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = os.path.join(out_dir, engine)
    os.makedirs(folder, exist_ok=True)
    batches = rank_batches(rank, world)

    accelerator, model, optimizer, sema = build(engine)
    trajectory = [full_masters(engine, accelerator, model)]
    gaps: list[float] = []
    saved = train(
        engine, accelerator, model, optimizer, sema, batches, 0, trajectory, gaps, os.path.join(folder, "ckpt6")
    )
    ema = sema.ema_state_dict()
    weights = full_masters(engine, accelerator, model)
    swaps = [w.pop("__swap_restored__").item() for w in trajectory if "__swap_restored__" in w]
    reference = reference_ema(trajectory, DECAY)
    result = {
        "engine": sema.engine.name,
        "local_numel": sema.local_numel,
        "num_updates": sema.num_updates,
        "num_switches": sema.num_switches,
        "ema_vs_reference": max((ema[n] - reference[n]).abs().max().item() for n in reference),
        "switch_gaps": gaps,
        "swaps_restored": swaps,
        "weights_moved": max((trajectory[-1][n] - trajectory[0][n]).abs().max().item() for n in reference),
    }
    if rank == 0:
        save_file(ema, os.path.join(folder, "ema.safetensors"))
    sema.remove_hooks()

    accelerator, model, optimizer, sema = build(engine)
    accelerator.load_state(os.path.join(folder, "ckpt6"))
    result["resumed_global_step"] = sema.global_step
    loaded = sema.ema_state_dict()
    result["loaded_ema_diff"] = max((loaded[n] - saved[n]).abs().max().item() for n in saved)
    train(engine, accelerator, model, optimizer, sema, batches, SAVE_AT)
    resumed_ema, resumed_weights = sema.ema_state_dict(), full_masters(engine, accelerator, model)
    result["resumed_ema_diff"] = max((resumed_ema[n] - ema[n]).abs().max().item() for n in ema)
    result["resumed_weights_diff"] = max((resumed_weights[n] - weights[n]).abs().max().item() for n in weights)
    result["resumed_counters"] = sema.state_dict()
    result["whole_model"] = whole_model_check(sema, resumed_ema)
    sema.remove_hooks()
    with open(os.path.join(folder, f"result_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    if engine.startswith("zero"):
        accelerator.free_memory()


if __name__ == "__main__":
    run_each_engine(run)
