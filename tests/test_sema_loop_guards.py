"""`SEMA` in a hand-written loop refuses what would silently go wrong: loading a checkpoint while the average is
swapped in, a model moved or cast after SEMA was made, EMA files that are not what the checkpoint says; and a load
with ``allow_fresh`` restarts the counters as its docstring says. One process; the 2-rank cases are in
``test_sema_loop_dist.py``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sema_hf import SEMA
from sema_hf.checkpoint import STATE_NAME, shard_file_name

from tiny import tiny_model

DIM = 8

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, DIM, generator=g)
        out.append((x, torch.sin(x.sum(-1))))
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def prepared(**sema_fields):
    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sema = SEMA(model, opt, accelerator, **sema_fields) if sema_fields else None
    return accelerator, model, opt, sema


def train(model, opt, accelerator, sema, steps: int, seed: int = 1) -> None:
    for x, y in batches(steps, seed):
        accelerator.backward(model(x, labels=y)["loss"])
        opt.step()
        opt.zero_grad()
        sema.step()


# ---- finding 2: accelerator.load_state inside swapped_in() ----------------------------------------------------
def test_load_state_inside_swapped_in_is_refused_and_changes_neither_weights_nor_average(tmp_path):
    folder = str(tmp_path / "ckpt")
    accelerator, model, opt, sema = prepared(decay=0.6, warmup="none", switch=False)
    train(model, opt, accelerator, sema, 2)
    accelerator.save_state(folder)
    train(model, opt, accelerator, sema, 3, seed=2)
    weights, ema, counters = params(model), sema.ema_state_dict(), sema.state_dict()
    with sema.swapped_in():
        with pytest.raises(RuntimeError, match=r"accelerator.load_state\(\) was called inside sema.swapped_in"):
            accelerator.load_state(folder)
        with pytest.raises(RuntimeError, match=r"SEMA.load\(\) was called inside sema.swapped_in"):
            sema.load(folder)
    assert all(torch.equal(p, weights[n]) for n, p in params(model).items())
    assert all(torch.equal(a, ema[n]) for n, a in sema.ema_state_dict().items())
    assert sema.state_dict() == counters
    accelerator.load_state(folder)  # outside the block: restores step 2
    assert sema.global_step == 2 and sema.num_updates == 2


# ---- finding 3: the model moved or cast after SEMA was made ---------------------------------------------------
def _cast_whole(model):
    model.double()


def _cast_one_layer(model):
    model.module.fc2.double() if hasattr(model, "module") else model.fc2.double()


def _to_dtype(model):
    model.to(torch.float64)


def _to_another_device(model):
    model.to("meta")  # the CPU stand-in for .to("cuda"): every parameter gets new storage


def _to_dtype_replacing_the_parameters(model):
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


@pytest.mark.parametrize(
    "move", [_cast_whole, _cast_one_layer, _to_dtype, _to_another_device, _to_dtype_replacing_the_parameters]
)
def test_a_model_moved_or_cast_after_sema_was_made_is_refused_at_the_next_step(move):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none", switch_every_steps=2)
    train(model, opt, Accelerator(cpu=True), sema, 1)
    counters = sema.state_dict()
    move(model)
    with pytest.raises(RuntimeError, match=r"fc2\.weight.*float32.*(float64|meta).*after the model is moved or cast"):
        sema.step()
    with pytest.raises(RuntimeError, match=r"fc2\.weight"):
        sema.epoch_end()
    with pytest.raises(RuntimeError, match=r"fc2\.weight"):
        with sema.swapped_in():
            pass
    assert sema.state_dict() == counters  # nothing counted, nothing written


def test_a_sema_made_after_the_model_was_cast_follows_the_cast_weights():
    model = tiny_model()
    model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none", switch=False)
    ema = params(model)
    for x, y in batches(3):
        model(x.double(), labels=y.double())["loss"].backward()
        opt.step()
        opt.zero_grad()
        sema.step()
        ema = {n: 0.5 * ema[n] + 0.5 * p.detach() for n, p in model.named_parameters()}
    got = sema.ema_state_dict()
    for n in ema:
        torch.testing.assert_close(got[n].double(), ema[n], rtol=1e-6, atol=1e-7)


# ---- finding 5: load(..., allow_fresh=True) restarts the counters ---------------------------------------------
def test_load_with_allow_fresh_restarts_counters_decay_warmup_and_step_counted_switches(tmp_path):
    folder = str(tmp_path / "plain")
    accelerator, model, opt, _ = prepared()
    accelerator.save_state(folder)  # saved without SEMA: no EMA files
    sema = SEMA(
        model, opt, accelerator, decay=0.9, warmup="linear", warmup_steps=10, warmup_ratio=0.9,
        switch_every_steps=4, allow_fresh_ema_on_resume=True,
    )  # fmt: skip
    train(model, opt, accelerator, sema, 6)
    assert (sema.global_step, sema.num_switches) == (6, 1)
    accelerator.load_state(folder)
    assert sema.state_dict() == {
        "format": "sema-hf-loop/1",
        "global_step": 0,
        "epochs_completed": 0,
        "num_updates": 0,
        "num_switches": 0,
        "last_decay": None,
        "last_switch_decision": None,
        "steps_since_decision": 0,
    }
    train(model, opt, accelerator, sema, 1, seed=3)
    assert sema.last_decay == pytest.approx(0.9 * (1 - 0.1 * (1 - 1 / 10)))  # 0.819: step 1 of the warmup
    ema = sema.ema_state_dict()
    assert all(torch.equal(ema[n], p) for n, p in params(model).items())  # restarted from the weights
    train(model, opt, accelerator, sema, 2, seed=4)
    assert sema.num_switches == 0  # 3 steps since the load: the next switch is 4 steps after it
    train(model, opt, accelerator, sema, 1, seed=5)
    assert (sema.global_step, sema.num_updates, sema.num_switches) == (4, 4, 1)


# ---- suspicion: the files' fingerprint and dtype ----------------------------------------------------------------
def _saved(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none")
    train(model, opt, Accelerator(cpu=True), sema, 2)
    sema.save(str(tmp_path))
    return str(tmp_path), os.path.join(str(tmp_path), shard_file_name(0, 1))


def _rewrite(path, tensors=None, **header):
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = tensors if tensors is not None else load_file(path)
    save_file(tensors, path, metadata={**metadata, **header})


def test_ema_files_of_another_model_or_whose_fingerprint_differs_from_sema_state_json_are_refused(tmp_path):
    folder, shard = _saved(tmp_path)
    other = SEMA(tiny_model(hidden=12), decay=0.5, warmup="none")  # same names, other shapes
    with pytest.raises(ValueError, match=r"shape mismatches.*fc1.weight: saved \[16, 8\] vs model \[12, 8\]"):
        other.load(folder)
    _rewrite(shard, fingerprint="0" * 64)  # a shard file left by another save
    with pytest.raises(ValueError, match=r"fingerprint.*differs from.*sema_state.json"):
        SEMA(tiny_model(), decay=0.5, warmup="none").load(folder)
    _saved(tmp_path)
    state = json.loads(open(os.path.join(folder, STATE_NAME)).read())
    state["fingerprint"] = "f" * 64  # an edited or damaged JSON: its fingerprint no longer matches what it records
    with open(os.path.join(folder, STATE_NAME), "w") as f:
        json.dump(state, f)
    with pytest.raises(ValueError, match=r"fingerprint.*does not match the layout it records"):
        SEMA(tiny_model(), decay=0.5, warmup="none").load(folder)


def test_an_ema_file_holding_another_dtype_is_refused_instead_of_cast(tmp_path):
    folder, shard = _saved(tmp_path)
    _rewrite(shard, {n: t.half() for n, t in load_file(shard).items()})
    with pytest.raises(ValueError, match=r"fc1\.(weight|bias).*float16.*float32"):
        SEMA(tiny_model(), decay=0.5, warmup="none").load(folder)
