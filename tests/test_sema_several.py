"""Several `SEMA` objects in one run (one process): each average has its own files in an ``accelerator.save_state``
folder and gets its own back from ``load_state``; ambiguous setups are refused; checkpoints written before names
existed still load; ``ema_state_dict(whole_model=True)`` loads strictly into a plain copy of the model (tied
weights, buffers, a frozen base under LoRA). The 2-rank runs (DDP, ZeRO-3) are in ``test_sema_several_dist.py``."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from accelerate import Accelerator

from sema_hf import SEMA
from sema_hf.checkpoint import STATE_NAME, shard_file_name

from tiny import tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from sharded_setup import tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _prepared_pair(accelerator, seeds=(0, 1)):
    """Two models of the same shape (a generator and a discriminator), each with its own optimizer."""
    out = []
    for seed in seeds:
        model = tiny_model(seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out.extend(accelerator.prepare(model, opt))
    return out


def _train(pairs, steps, seed=1):
    """``steps`` SGD steps of every (model, optimizer, sema), each on its own data."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for k, (model, opt, sema) in enumerate(pairs):
            x = torch.randn(4, 8, generator=g)
            y = torch.sin(x.sum(-1)) * (k + 1)
            model(x, labels=y)["loss"].backward()
            opt.step()
            opt.zero_grad()
            sema.step()


def _gan_run(folder, names, save_at=None, load=False, steps=6):
    accelerator = Accelerator(cpu=True)
    gen, gen_opt, disc, disc_opt = _prepared_pair(accelerator)
    semas = [
        SEMA(gen, gen_opt, accelerator, decay=0.5, warmup="none", name=names[0]),
        SEMA(disc, disc_opt, accelerator, decay=0.8, warmup="none", name=names[1]),
    ]
    pairs = [(gen, gen_opt, semas[0]), (disc, disc_opt, semas[1])]
    if load:
        accelerator.load_state(folder)
        return semas
    _train(pairs, save_at)
    accelerator.save_state(folder)
    saved = [s.ema_state_dict() for s in semas]
    _train(pairs, steps - save_at, seed=2)
    for s in semas:
        s.remove_hooks()
    return saved


def test_same_shape_gan_pair_each_load_state_restores_its_own_average(tmp_path):
    folder = str(tmp_path / "ckpt")
    saved = _gan_run(folder, ("generator", "discriminator"), save_at=3)
    assert max((saved[0][n] - saved[1][n]).abs().max().item() for n in saved[0]) > 0.1  # swapped would show
    for semas in [_gan_run(folder, ("generator", "discriminator"), load=True)]:
        for sema, expected in zip(semas, saved, strict=True):
            got = sema.ema_state_dict()
            assert all(torch.equal(got[n], expected[n]) for n in expected) and sema.global_step == 3
    assert sorted(os.listdir(os.path.join(folder, "sema_generator"))) == [shard_file_name(0, 1), STATE_NAME]
    with open(os.path.join(folder, "sema_discriminator", STATE_NAME)) as f:
        assert json.load(f)["name"] == "discriminator"


def test_a_second_unnamed_sema_on_one_accelerator_is_refused_naming_the_fix():
    accelerator = Accelerator(cpu=True)
    gen, gen_opt, disc, disc_opt = _prepared_pair(accelerator)
    first = SEMA(gen, gen_opt, accelerator, decay=0.5, warmup="none")
    with pytest.raises(ValueError, match=r"already has an unnamed SEMA.*name='student'"):
        SEMA(disc, disc_opt, accelerator, decay=0.5, warmup="none")
    SEMA(disc, disc_opt, accelerator, decay=0.5, warmup="none", name="d")  # another name: fine
    with pytest.raises(ValueError, match="already has a SEMA named 'd'"):
        SEMA(gen, gen_opt, accelerator, decay=0.9, warmup="none", name="d")  # two horizons of one model, one name
    first.remove_hooks()  # frees the unnamed files
    SEMA(disc, disc_opt, accelerator, decay=0.5, warmup="none")


@pytest.mark.parametrize("name", ["", "a/b", "..", "-x", 3, "x" * 65])
def test_a_name_that_is_no_folder_name_is_refused(name):
    with pytest.raises(ValueError, match="name = .* is invalid"):
        SEMA(tiny_model(), decay=0.5, warmup="none", name=name)


def test_unnamed_sema_keeps_the_old_file_names_and_loads_old_checkpoints(tmp_path):
    model = tiny_model()
    sema = SEMA(model, decay=0.5, warmup="none")
    sema.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [shard_file_name(0, 1), STATE_NAME]
    state = json.loads((tmp_path / STATE_NAME).read_text())
    state.pop("name")  # as written before names existed
    (tmp_path / STATE_NAME).write_text(json.dumps(state))
    SEMA(tiny_model(seed=4), decay=0.5, warmup="none").load(str(tmp_path))


def test_a_load_reads_only_its_own_names_files(tmp_path):
    folder = str(tmp_path)
    SEMA(tiny_model(), decay=0.5, warmup="none", name="teacher").save(folder)
    with pytest.raises(FileNotFoundError, match=r"holds the averages named \['teacher'\].*named None"):
        SEMA(tiny_model(), decay=0.5, warmup="none").load(folder)  # unnamed: the top-level files only
    with pytest.raises(FileNotFoundError, match=r"holds the averages named \['teacher'\].*named 'student'"):
        SEMA(tiny_model(), decay=0.5, warmup="none", name="student").load(folder)
    SEMA(tiny_model(), decay=0.5, warmup="none").save(folder)
    with pytest.raises(FileNotFoundError, match=r"named \[None, 'teacher'\]"):
        SEMA(tiny_model(), decay=0.5, warmup="none", name="student").load(folder)


def test_files_moved_to_another_names_folder_are_refused(tmp_path):
    SEMA(tiny_model(), decay=0.5, warmup="none", name="generator").save(str(tmp_path))
    shutil.copytree(tmp_path / "sema_generator", tmp_path / "sema_discriminator")
    with pytest.raises(ValueError, match="holds the average named 'generator'.*named 'discriminator'"):
        SEMA(tiny_model(), decay=0.5, warmup="none", name="discriminator").load(str(tmp_path))


def _trained(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sema = SEMA(model, opt, decay=0.5, warmup="none", switch=False)
    ids = torch.arange(16).remainder(31).unsqueeze(0)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sema.step()
    return sema


def test_whole_model_ema_state_dict_loads_strictly_into_a_tied_gpt2():
    model = tiny_gpt2()
    sema = _trained(model)
    ema = sema.ema_state_dict()
    with pytest.raises(RuntimeError, match="Missing key.*lm_head.weight"):
        tiny_gpt2().load_state_dict(ema)  # the averages only: a tied weight once
    whole = sema.ema_state_dict(whole_model=True)
    teacher = tiny_gpt2(seed=7)
    teacher.load_state_dict(whole)  # strict
    assert teacher.lm_head.weight is teacher.transformer.wte.weight  # still tied after the load
    assert torch.equal(whole["lm_head.weight"], ema["transformer.wte.weight"])
    assert all(torch.equal(p, ema[n]) for n, p in teacher.named_parameters())
    assert not torch.equal(ema["transformer.wte.weight"], model.transformer.wte.weight)  # an average, not weights


def test_whole_model_ema_state_dict_carries_buffers_as_the_model_holds_them():
    model = tiny_model(batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none")
    for _ in range(2):
        x = torch.randn(4, 8)
        model(x, labels=x.sum(-1))["loss"].backward()
        opt.step()
        opt.zero_grad()
        sema.step()
    whole = sema.ema_state_dict(whole_model=True)
    copy = tiny_model(seed=3, batch_norm=True)
    copy.load_state_dict(whole)
    assert torch.equal(copy.norm.running_mean, model.norm.running_mean) and int(copy.norm.num_batches_tracked) == 2
    assert torch.equal(copy.fc1.weight, sema.ema_state_dict()["fc1.weight"])


def test_whole_model_ema_state_dict_of_a_lora_adapter_holds_the_frozen_base():
    from peft import LoraConfig, get_peft_model

    def lora(seed):
        torch.manual_seed(seed)
        base = tiny_gpt2(seed=0)
        return get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))

    model = lora(1)
    sema = _trained(model)
    averaged = sema.ema_state_dict()
    assert averaged and all("lora_" in n for n in averaged)  # the adapter only is averaged
    teacher = lora(2)
    teacher.load_state_dict(sema.ema_state_dict(whole_model=True))  # strict: base weights included
    assert all(torch.equal(p, averaged[n]) for n, p in teacher.named_parameters() if n in averaged)
    assert all(
        torch.equal(p, dict(model.named_parameters())[n]) for n, p in teacher.named_parameters() if "lora_" not in n
    )
