"""2-rank worker: several `SEMA` objects on one accelerator, saved by one ``accelerator.save_state`` and restored by
one ``load_state``.

Usage: ``several_worker.py OUT_DIR ENGINE [ENGINE...]`` with ENGINE ``ddp``, ``zero3-models`` or ``zero3``:

* ``ddp``: four models prepared by one accelerator, each with its own optimizer and its own SEMA: a student (the
  tiny GPT-2) and a teacher of another shape (width 48), and a same-shape pair, a generator and a discriminator (the
  tiny GPT-2 from two seeds, trained on other batches). Names ``student``, ``teacher``, ``generator``,
  ``discriminator``; decays 0.6, 0.7, 0.5, 0.8.
* ``zero3-models``: the same four models under DeepSpeed ZeRO-3, one DeepSpeed plugin per model
  (``Accelerator(deepspeed_plugins={...})``, ``accelerator.state.select_deepspeed_plugin(name)`` before each
  ``prepare``). ``accelerator.backward`` steps the first engine only, so the other three call their engine's own
  ``backward`` and ``step``.
* ``zero3``: two SEMA over one ZeRO-3 model at two horizons (``fast``: decay 0.5, ``slow``: 0.9): two averages of
  the same shapes in the same folder.

Each run trains 6 optimizer steps, ``save_state`` at step 3; then a second accelerator, models and SEMA load that
state and train steps 4-6 again. Writes into ``OUT_DIR/ENGINE/``: ``ckpt3/``, ``ema3_<name>.safetensors`` (each
gathered average at step 3, rank 0) and ``result_rank{r}.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from loop_worker import ZERO3, full_masters, make_accelerator, rank_batches  # noqa: E402
from sharded_setup import run_each_engine, tiny_gpt2  # noqa: E402

from sema_hf import SEMA  # noqa: E402

STEPS, SAVE_AT = 6, 3
MODELS = {"student": 0.6, "teacher": 0.7, "generator": 0.5, "discriminator": 0.8}  # name: decay
ZERO3_AVERAGES = {"fast": 0.5, "slow": 0.9}


def wide_gpt2(seed: int) -> GPT2LMHeadModel:
    """A teacher of another shape than the tiny GPT-2 (width 48, one block)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=31, n_positions=16, n_embd=48, n_layer=1, n_head=3)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def fresh_models() -> dict[str, GPT2LMHeadModel]:
    return {"student": tiny_gpt2(0), "teacher": wide_gpt2(1), "generator": tiny_gpt2(2), "discriminator": tiny_gpt2(3)}


def zero3_models_accelerator() -> Accelerator:
    """ZeRO-3 with one DeepSpeed plugin per model (accelerate's API for several DeepSpeed models), each selected in
    turn for ``prepare``."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DeepSpeedPlugin

    AcceleratorState._reset_state()
    GradientState._reset_state()
    PartialState(cpu=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    plugins = {name: DeepSpeedPlugin(hf_ds_config=copy.deepcopy(ZERO3)) for name in MODELS}
    return Accelerator(deepspeed_plugins=plugins)


def build(engine: str):
    """-> accelerator, {name: (model, optimizer, sema)} (a model shared by several averages appears under each)."""
    if engine == "zero3-models":
        accelerator = zero3_models_accelerator()
        out = {}
        for name, model in fresh_models().items():
            accelerator.state.select_deepspeed_plugin(name)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4)
            model, optimizer = accelerator.prepare(model, optimizer)
            sema = SEMA(model, optimizer, accelerator, decay=MODELS[name], warmup="none", switch=False, name=name)
            out[name] = (model, optimizer, sema)
        return accelerator, out
    if engine == "zero3":
        accelerator = make_accelerator("zero3")
        model = tiny_gpt2()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
        semas = {
            name: SEMA(model, optimizer, accelerator, decay=decay, warmup="none", switch=False, name=name)
            for name, decay in ZERO3_AVERAGES.items()
        }
        return accelerator, {name: (model, optimizer, sema) for name, sema in semas.items()}
    accelerator = make_accelerator("ddp-sharded")  # plain DDP without gradient accumulation (not sharded: no flag)
    out = {}
    for name, model in fresh_models().items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
        sema = SEMA(model, optimizer, accelerator, decay=MODELS[name], warmup="none", switch=False, name=name)
        out[name] = (model, optimizer, sema)
    return accelerator, out


def train(accelerator, runs: dict, batches: list[torch.Tensor], start: int, stop: int) -> None:
    models = {id(model): (k, model, optimizer) for k, (model, optimizer, _) in enumerate(runs.values())}
    for step in range(start, stop):
        for k, model, optimizer in models.values():  # each model once, on its own batches
            batch = batches[(step + 2 * k) % len(batches)]
            loss = model(input_ids=batch, labels=batch).loss
            if k > 0 and hasattr(model, "save_checkpoint"):
                # accelerator.backward steps the first DeepSpeed engine only: the others step themselves
                model.backward(loss)
                model.step()
            else:
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        for _, _, sema in runs.values():
            sema.step()


def averages(runs: dict) -> dict[str, dict[str, torch.Tensor]]:
    return {name: sema.ema_state_dict() for name, (_, _, sema) in runs.items()}  # collective: every rank


def weights(engine: str, accelerator, runs: dict) -> dict[str, dict[str, torch.Tensor]]:
    kind = "zero3" if engine.startswith("zero3") else engine
    return {name: full_masters(kind, accelerator, model) for name, (model, _, _) in runs.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


def same_shapes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[n].shape == b[n].shape for n in a)


def run(out_dir: str, engine: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = os.path.join(out_dir, engine)
    os.makedirs(folder, exist_ok=True)
    batches = rank_batches(rank, world)
    ckpt = os.path.join(folder, "ckpt3")

    accelerator, runs = build(engine)
    initial = weights(engine, accelerator, runs)
    train(accelerator, runs, batches, 0, SAVE_AT)
    accelerator.save_state(ckpt)
    saved = averages(runs)
    if rank == 0:
        for name, tensors in saved.items():
            save_file(tensors, os.path.join(folder, f"ema3_{name}.safetensors"))
    train(accelerator, runs, batches, SAVE_AT, STEPS)
    final, final_weights = averages(runs), weights(engine, accelerator, runs)
    names = list(runs)
    result = {
        "names": names,
        "files": sorted(os.listdir(ckpt)),
        "weights_moved": {name: max_diff(final_weights[name], initial[name]) for name in names},
        # how far apart the averages are: had one been handed the other's, the resumed difference would show it
        "apart": {
            f"{a}/{b}": max_diff(saved[a], saved[b])
            for a in names
            for b in names
            if a < b and same_shapes(saved[a], saved[b])
        },
    }
    for _, _, sema in runs.values():
        sema.remove_hooks()
    if engine.startswith("zero3"):
        accelerator.free_memory()

    accelerator, runs = build(engine)
    accelerator.load_state(ckpt)
    loaded = averages(runs)
    result["loaded_step"] = {name: sema.global_step for name, (_, _, sema) in runs.items()}
    result["loaded_diff"] = {name: max_diff(loaded[name], saved[name]) for name in names}
    train(accelerator, runs, batches, SAVE_AT, STEPS)
    resumed, resumed_weights = averages(runs), weights(engine, accelerator, runs)
    result["resumed_diff"] = {name: max_diff(resumed[name], final[name]) for name in names}
    result["resumed_weights_diff"] = {name: max_diff(resumed_weights[name], final_weights[name]) for name in names}
    result["num_updates"] = {name: sema.num_updates for name, (_, _, sema) in runs.items()}
    for _, _, sema in runs.values():
        sema.remove_hooks()
    if engine.startswith("zero3"):
        accelerator.free_memory()
    with open(os.path.join(folder, f"result_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    run_each_engine(run)
