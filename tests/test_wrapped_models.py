"""Wrapped models: EMA keys, ``ema_state_dict()`` and checkpoint names are the plain model's ``state_dict()`` names.

Wrappers seen here: ``torch.compile`` (``_orig_mod.``), ``checkpoint_wrapper`` (``_checkpoint_wrapped_module.``,
as accelerate's FSDP activation checkpointing applies it), FSDP1 (``_fsdp_wrapped_module.``), DDP (``module.``),
FSDP2 and transformers' gradient checkpointing (no renaming). Runs resume with ``torch_compile`` /
``gradient_checkpointing`` / checkpoint wrappers switched on or off and end bit-identical to the uninterrupted run;
2-rank runs (``tests/dist/wrapped_worker.py``) move an EMA checkpoint between FSDP2 with checkpointed blocks and
ZeRO-3.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

from sema_hf import SEMACallback
from sema_hf.checkpoint import load_ema_checkpoint, read_ema_state
from sema_hf.engines import LocalAdapter
from sema_hf.engines.names import canonical_name, canonical_named_parameters, unwrap_model
from sema_hf.landscape import loss_profile

from launch import run_torchrun
from tiny import TinyRegressor, tiny_args, tiny_dataset, tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from sharded_setup import pattern_dataset, tiny_gpt2  # noqa: E402

PLAIN_NAMES = list(tiny_model().state_dict())  # fc1.weight, fc1.bias, fc2.weight, fc2.bias

# ---- names (pure) ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("_orig_mod.fc1.weight", "fc1.weight"),  # torch.compile of the whole model
        ("transformer.h.0._orig_mod.attn.c_attn.weight", "transformer.h.0.attn.c_attn.weight"),  # regional compile
        ("transformer.h.1._checkpoint_wrapped_module.ln_1.bias", "transformer.h.1.ln_1.bias"),
        (
            "_orig_mod._fsdp_wrapped_module.transformer.h.0._fsdp_wrapped_module._checkpoint_wrapped_module.ln_1.weight",
            "transformer.h.0.ln_1.weight",
        ),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_canonical_name_drops_compile_checkpoint_and_fsdp1_segments_wherever_they_sit(raw, expected):
    assert canonical_name(raw) == expected


@pytest.mark.parametrize("name", ["module.weight", "encoder.module.0.bias", "x_orig_mod.weight", "_orig_mod_2.w"])
def test_canonical_name_keeps_user_names_that_only_resemble_wrapper_segments(name):
    assert canonical_name(name) == name


class Holder(nn.Module):
    """A user's model whose own submodule is called ``module``, like DDP's attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_unwrap_model_removes_the_compile_wrapper_but_keeps_a_user_submodule_called_module():
    holder = Holder()
    compiled = torch.compile(holder, backend="eager")
    assert unwrap_model(compiled) is holder
    assert [n for n, _ in compiled.named_parameters()] == ["_orig_mod.module.weight", "_orig_mod.module.bias"]
    assert [n for n, _ in canonical_named_parameters(compiled)] == ["module.weight", "module.bias"]


def test_names_that_collide_once_wrapper_segments_are_removed_are_refused():
    model = nn.Module()
    model.fc = nn.Linear(2, 2)
    model.add_module("_orig_mod", nn.Module())
    model._orig_mod.fc = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"same name once wrapper segments.*fc\.weight"):
        LocalAdapter(model)


def _checkpointed_regressor(seed: int = 0, regional_compile: bool = False) -> nn.Module:
    """The tiny regressor with checkpoint-wrapped layers; ``regional_compile``: the second also compiled on its own.

    (The Trainer's own weight files keep ``_orig_mod.`` for a compiled submodule, so only the checkpoint wrappers,
    whose ``state_dict()`` hooks drop their segment, can be toggled across a Trainer resume.)
    """
    model = tiny_model(seed)
    model.fc1 = checkpoint_wrapper(model.fc1)
    model.fc2 = checkpoint_wrapper(model.fc2)
    if regional_compile:
        model.fc2 = torch.compile(model.fc2, backend="eager")
    return model


def test_local_adapter_names_a_compiled_checkpoint_wrapped_model_like_the_plain_state_dict():
    wrapped = torch.compile(_checkpointed_regressor(regional_compile=True), backend="eager")
    raw = [n for n, _ in wrapped.named_parameters()]
    assert raw[0] == "_orig_mod.fc1._checkpoint_wrapped_module.weight"
    assert raw[2] == "_orig_mod.fc2._orig_mod._checkpoint_wrapped_module.weight"
    adapter = LocalAdapter(wrapped)
    assert [n for n, _ in adapter.layout().params] == PLAIN_NAMES
    # each average follows the wrapped model's own parameter, paired by name
    inner = wrapped._orig_mod
    by_name = {
        "fc1.weight": inner.fc1._checkpoint_wrapped_module.weight,
        "fc1.bias": inner.fc1._checkpoint_wrapped_module.bias,
        "fc2.weight": inner.fc2._orig_mod._checkpoint_wrapped_module.weight,
        "fc2.bias": inner.fc2._orig_mod._checkpoint_wrapped_module.bias,
    }
    assert all(slot.source.data_ptr() == by_name[slot.name].data_ptr() for slot in adapter.slots())


def test_loss_profile_pairs_ema_state_dict_names_with_a_wrapped_models_parameters():
    wrapped, plain = torch.compile(_checkpointed_regressor(), backend="eager"), tiny_model()
    ema = {n: p.detach() + 0.1 for n, p in plain.named_parameters()}  # keyed like ema_state_dict()
    g = torch.Generator().manual_seed(3)
    batches = [{"x": torch.randn(8, 8, generator=g), "labels": torch.randn(8, generator=g)}]
    profile = loss_profile(wrapped, batches, ema, alphas=(0.0, 1.0))
    plain.load_state_dict(ema)
    with torch.no_grad():
        expected = plain(**batches[0])["loss"].item()
    assert profile.losses[1] == pytest.approx(expected, rel=1e-6)
    assert profile.losses[0] != pytest.approx(expected, rel=1e-3)  # alpha 0: the raw weights


# ---- Trainer runs, one process --------------------------------------------------------------------------------------


class ModelProbe(TrainerCallback):
    """Records what the Trainer passes to callbacks as ``model``."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model


def _train(output_dir, model, resume=None, data=None, save_steps=3, **overrides):
    sema, probe = SEMACallback(decay=0.8, warmup_steps=4), ModelProbe()
    data = tiny_dataset() if data is None else data
    trainer = Trainer(
        model=model,
        args=tiny_args(str(output_dir), save_strategy="steps", save_steps=save_steps, **overrides),
        train_dataset=data,
        callbacks=[sema, probe],
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer, sema, probe.model


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in canonical_named_parameters(model)}


def _assert_same_run(resumed, full, names):
    (trainer_a, sema_a, _), (trainer_b, sema_b, _) = resumed, full
    assert sema_a.num_updates == sema_b.num_updates and sema_a.num_switches == sema_b.num_switches > 0
    ema_a, ema_b = sema_a.ema_state_dict(), sema_b.ema_state_dict()
    assert list(ema_a) == list(ema_b) == names
    weights_a, weights_b = _weights(trainer_a.model), _weights(trainer_b.model)
    for name in names:
        assert torch.equal(ema_a[name], ema_b[name]), name
        assert torch.equal(weights_a[name], weights_b[name]), name


def _resume_across(tmp_path, make_model, names, on: dict, off: dict | None = None, **common):
    """The uninterrupted run with the wrapper (or flag) on: 8 steps, 2 epochs, checkpoints at 3 and 6. A run with it
    off resumes from step 3 and writes checkpoint-6; a run with it on again resumes from that one. Both resumed runs
    must end bit-identical to the uninterrupted one. Returns the three runs' ``(trainer, callback, model handed to
    callbacks)``."""
    off = off or {}
    full = _train(tmp_path / "full", make_model(True), **on, **common)
    resumed_off = _train(
        tmp_path / "off", make_model(False), resume=tmp_path / "full" / "checkpoint-3", **off, **common
    )
    resumed_on = _train(tmp_path / "on", make_model(True), resume=tmp_path / "off" / "checkpoint-6", **on, **common)
    state = read_ema_state(str(tmp_path / "full" / "checkpoint-6"))
    assert [n for n, _ in state["params"]] == names
    saved = load_file(str(tmp_path / "full" / "checkpoint-6" / "sema_ema-00001-of-00001.safetensors"))
    assert sorted(saved) == sorted(names)
    _assert_same_run(resumed_off, full, names)
    _assert_same_run(resumed_on, full, names)
    return full, resumed_off, resumed_on


def test_torch_compile_run_resumes_without_compile_and_back_bit_identical(tmp_path):
    compiled = {"torch_compile": True, "torch_compile_backend": "eager"}
    full, off, on = _resume_across(tmp_path, lambda _: tiny_model(), PLAIN_NAMES, on=compiled)
    kinds = [type(run[0].model_wrapped).__name__ for run in (full, off, on)]
    assert kinds == ["OptimizedModule", "TinyRegressor", "OptimizedModule"]  # the Trainer compiled, or not


def test_checkpoint_wrapped_layers_resume_into_the_plain_model_and_back_bit_identical(tmp_path):
    def make(wrapped: bool) -> nn.Module:
        return _checkpointed_regressor() if wrapped else tiny_model()

    full, off, on = _resume_across(tmp_path, make, PLAIN_NAMES, on={})
    for run, wrapped in ((full, True), (off, False), (on, True)):  # what the callbacks were handed
        assert ("fc1._checkpoint_wrapped_module.weight" in dict(run[2].named_parameters())) is wrapped


class KwargsRegressor(TinyRegressor):
    """Accepts the extra keywords (``num_items_in_batch``) the Trainer passes to a compiled model's forward."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


def test_a_model_compiled_by_the_user_gets_plain_names_and_its_ema_loads_onto_the_plain_model(tmp_path):
    torch.manual_seed(0)
    model = KwargsRegressor()
    compiled = torch.compile(model, backend="eager")
    trainer, sema, seen = _train(tmp_path, compiled, max_steps=4, remove_unused_columns=False)
    assert seen is compiled  # the Trainer hands the OptimizedModule itself to callbacks
    ema = sema.ema_state_dict()
    assert list(ema) == PLAIN_NAMES
    assert all(torch.equal(p, ema[n]) for n, p in model.named_parameters())  # the final switch wrote the model
    tensors, meta = load_ema_checkpoint(str(tmp_path / "checkpoint-3"), LocalAdapter(tiny_model()).layout())
    assert meta["global_step"] == 3 and sorted(tensors) == sorted(PLAIN_NAMES)


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=31, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config)


def test_gradient_checkpointing_run_resumes_without_it_and_back_bit_identical(tmp_path):
    names = [n for n, _ in _gpt2().named_parameters()]
    on, off = {"gradient_checkpointing": True}, {"gradient_checkpointing": False}
    runs = _resume_across(
        tmp_path, lambda _: _gpt2(), names, on=on, off=off, data=pattern_dataset(), learning_rate=1e-2
    )
    assert [run[2].is_activation_checkpointing for run in runs] == [True, False, True]  # the flag reached the model


# ---- 2 gloo ranks: DDP, FSDP1, FSDP2, ZeRO-3 through the wrappers -------------------------------------------------


@pytest.fixture(scope="module")
def wrapped_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("wrapped")
    run_torchrun("tests/dist/wrapped_worker.py", str(out), timeout=400)
    return out, [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]


GPT2_NAMES = [n for n, _ in tiny_gpt2().named_parameters()]  # the tied lm_head.weight is wte's, named once


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("wrapper", "engine"), [("ddp", "local"), ("ddp-sharded", "ddp-sharded"), ("fsdp1", "fsdp1"), ("fsdp2", "fsdp2")]
)
def test_sharding_wrappers_around_compiled_checkpointed_models_give_plain_names(wrapper, engine, wrapped_runs):
    for result in wrapped_runs[1]:
        names = result["names"][wrapper]
        assert names["engine"] == engine
        assert any("_orig_mod." in n for n in names["raw"]) and any(
            "_checkpoint_wrapped_module." in n for n in names["raw"]
        )
        assert names["params"] == GPT2_NAMES
        assert set(names["slots"]) <= set(GPT2_NAMES)


@pytest.mark.multiprocess
def test_ddp_strips_its_own_module_prefix_but_not_a_user_submodule_called_module(wrapped_runs):
    for result in wrapped_runs[1]:
        names = result["names"]["ddp-module-attribute"]
        assert names["raw"] == ["module.module.weight", "module.module.bias", "module.head.weight", "module.head.bias"]
        assert names["params"] == ["module.weight", "module.bias", "head.weight", "head.bias"]


@pytest.mark.multiprocess
def test_fsdp2_with_activation_checkpointing_saves_plain_names_and_resumes_without_it_bit_identical(wrapped_runs):
    out, results = wrapped_runs
    for result in results:
        assert any("_checkpoint_wrapped_module." in n for n in result["fsdp2-ac"]["raw_names"])  # accelerate wrapped
        assert not any("_checkpoint_wrapped_module." in n for n in result["fsdp2-resumed"]["raw_names"])
        assert result["fsdp2-ac"]["ema_names"] == result["fsdp2-resumed"]["ema_names"] == GPT2_NAMES
        assert result["resume_ema_diff"] == 0.0 and result["resume_weights_diff"] == 0.0
    checkpoint = out / "fsdp2-ac" / "run" / "checkpoint-6"
    assert [n for n, _ in read_ema_state(str(checkpoint))["params"]] == GPT2_NAMES
    tensors, _ = load_ema_checkpoint(str(checkpoint), LocalAdapter(tiny_gpt2()).layout())  # 2 FSDP2 ranks -> 1
    expected = load_file(str(out / "fsdp2-ac" / "ema_step6.safetensors"))
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[n], expected[n]) for n in expected)


@pytest.mark.multiprocess
def test_ema_moves_from_checkpointed_fsdp2_to_zero3_and_back_exactly(wrapped_runs):
    out, results = wrapped_runs
    assert {r["zero3"]["engine"] for r in results} == {"deepspeed-zero3"}
    for source, target in (
        ("fsdp2-ac/ema_step6", "zero3/ema_loaded"),
        ("zero3/ema_step2", "fsdp2-ac-load/ema_loaded"),
    ):
        saved, loaded = load_file(str(out / f"{source}.safetensors")), load_file(str(out / f"{target}.safetensors"))
        assert sorted(loaded) == sorted(saved) == sorted(GPT2_NAMES)
        assert all(torch.equal(loaded[n], saved[n]) for n in saved), (source, target)
