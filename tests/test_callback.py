"""SEMACallback inside real Trainer runs on a tiny model, checked against independently computed references."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import TrainerCallback

from sema_hf import SEMACallback

from tiny import tiny_model, tiny_trainer


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Recorder(TrainerCallback):
    """Records the parameters after every optimizer step (placed before SEMACallback, it sees them before any
    switch), and, optionally, at other hooks."""

    def __init__(self):
        self.after_step = []
        self.step_begin = {}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after_step.append(_params(model))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.step_begin[state.global_step] = _params(model)


def _swa_reference(initial, trajectory, decay):
    """EMA of a parameter trajectory computed by torch.optim.swa_utils, as an independent reference."""
    model = tiny_model()
    model.load_state_dict(initial, strict=False)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.update_parameters(model)
    for params in trajectory:
        model.load_state_dict(params, strict=False)
        ema.update_parameters(model)
    return {n: p.detach() for n, p in ema.module.named_parameters()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ema_after_n_optimizer_steps_matches_swa_utils_on_recorded_trajectory(tmp_path, accumulation):
    model = tiny_model()
    initial = _params(model)
    recorder = Recorder()
    sema = SEMACallback(decay=0.8, warmup="none", switch=False)
    trainer = tiny_trainer(
        str(tmp_path),
        [recorder, sema],
        model=model,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    trainer.train()
    assert trainer.state.global_step == 8
    assert len(recorder.after_step) == 8  # one update per optimizer step, not per micro-batch
    assert sema.num_updates == 8
    reference = _swa_reference(initial, recorder.after_step, 0.8)
    ema = sema.ema_state_dict()
    assert set(ema) == set(reference)
    for name in reference:
        torch.testing.assert_close(ema[name], reference[name], rtol=1e-6, atol=1e-7)


def test_update_every_two_steps_uses_squared_decay(tmp_path):
    model = tiny_model()
    initial = _params(model)
    recorder = Recorder()
    sema = SEMACallback(decay=0.8, warmup="none", switch=False, update_every=2)
    tiny_trainer(str(tmp_path), [recorder, sema], model=model).train()
    assert sema.num_updates == 4
    reference = _swa_reference(initial, recorder.after_step[1::2], 0.8**2)
    for name, value in sema.ema_state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-7)


def test_warmup_decay_sequence_matches_hand_computation(tmp_path):
    model = tiny_model()
    initial = {n: p.double() for n, p in _params(model).items()}
    recorder = Recorder()
    sema = SEMACallback(decay=0.9, warmup="linear", warmup_steps=4, warmup_ratio=0.5, switch=False)
    tiny_trainer(str(tmp_path), [recorder, sema], model=model).train()
    expected = initial
    for t, params in enumerate(recorder.after_step, start=1):
        m = 0.9 * (1 - 0.5 * (1 - t / 4)) if t < 4 else 0.9
        expected = {n: m * expected[n] + (1 - m) * params[n].double() for n in expected}
    for name, value in sema.ema_state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7)
    logged = [h["ema_decay"] for h in tiny_trainer_history(sema)]
    assert logged[:4] == pytest.approx([0.9 * 0.625, 0.9 * 0.75, 0.9 * 0.875, 0.9])


def tiny_trainer_history(sema):
    return [h for h in sema.trainer.state.log_history if "ema_decay" in h]


class EpochEndProbe(TrainerCallback):
    def __init__(self, sema=None):
        self.sema = sema
        self.params, self.ema, self.optimizer_state = [], [], []

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params.append(_params(model))
        self.optimizer_state.append(copy.deepcopy(optimizer.optimizer.state_dict()))
        if self.sema is not None:
            self.ema.append(self.sema.ema_state_dict())


def test_switch_copies_ema_into_model_at_epoch_end_and_leaves_optimizer_state(tmp_path):
    sema = SEMACallback(decay=0.7, warmup="none")
    before, after = EpochEndProbe(), EpochEndProbe(sema)
    trainer = tiny_trainer(str(tmp_path), [before, sema, after], num_train_epochs=3)
    trainer.train()
    assert sema.num_switches == 3
    for epoch in range(3):
        for name, value in after.params[epoch].items():
            assert torch.equal(value, after.ema[epoch][name])  # bit for bit
            assert not torch.equal(value, before.params[epoch][name])  # the switch changed the weights
        torch.testing.assert_close(before.optimizer_state[epoch], after.optimizer_state[epoch], rtol=0, atol=0)
    assert [h["ema_switches"] for h in trainer.state.log_history if "ema_switches" in h] == [1.0, 2.0, 3.0]


def test_training_goes_on_from_the_switched_weights(tmp_path):
    recorder = Recorder()
    sema = SEMACallback(decay=0.7, warmup="none")
    probe = EpochEndProbe(sema)
    tiny_trainer(str(tmp_path), [recorder, sema, probe]).train()
    # Step 5 (the first of epoch 2) starts from the EMA copied in at the end of epoch 1.
    for name, value in recorder.step_begin[4].items():
        assert torch.equal(value, probe.ema[0][name])


def test_switch_every_epochs_and_start_epoch_choose_switching_epochs(tmp_path):
    sema = SEMACallback(decay=0.7, switch_every_epochs=2, switch_start_epoch=2)
    trainer = tiny_trainer(str(tmp_path), [sema], num_train_epochs=4)
    trainer.train()
    switches = [h["epoch"] for h in trainer.state.log_history if "ema_switches" in h]
    assert switches == [4.0]


def test_switch_every_steps_replaces_epoch_switching(tmp_path):
    sema = SEMACallback(decay=0.7, switch_every_steps=3)
    trainer = tiny_trainer(str(tmp_path), [sema])
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "ema_switches" in h] == [3, 6]


def test_plain_ema_never_switches_and_final_model_holds_the_ema(tmp_path):
    recorder = Recorder()
    sema = SEMACallback(decay=0.7, switch=False)
    trainer = tiny_trainer(str(tmp_path), [recorder, sema])
    trainer.train()
    assert sema.num_switches == 0
    ema = sema.ema_state_dict()
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, ema[name])
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    for name, value in ema.items():
        assert torch.equal(saved[name], value)


def test_final_weights_model_keeps_the_raw_weights(tmp_path):
    recorder = Recorder()
    sema = SEMACallback(decay=0.7, switch=False, final_weights="model")
    trainer = tiny_trainer(str(tmp_path), [recorder, sema])
    trainer.train()
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, recorder.after_step[-1][name])


class EvalProbe(TrainerCallback):
    def __init__(self, sema):
        self.sema = sema
        self.seen = {}

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.seen.setdefault(state.global_step, (_params(model), self.sema.ema_state_dict()))


def test_evaluation_sees_ema_checkpoint_holds_raw_weights_and_training_continues_from_raw(tmp_path):
    recorder = Recorder()
    sema = SEMACallback(decay=0.7, warmup="none", switch=False)
    probe = EvalProbe(sema)
    trainer = tiny_trainer(
        str(tmp_path),
        [recorder, sema, probe],
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train()
    assert sorted(probe.seen) == [2, 4, 6, 8]
    for step in (2, 4, 6):
        seen, ema = probe.seen[step]
        raw = recorder.after_step[step - 1]
        for name in raw:
            assert torch.equal(seen[name], ema[name])  # evaluation used the average
            assert not torch.equal(ema[name], raw[name])
        checkpoint = load_file(str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
        for name in raw:
            assert torch.equal(checkpoint[name], raw[name])  # the checkpoint holds the raw weights
            assert torch.equal(recorder.step_begin[step][name], raw[name])  # and training goes on from them


def test_evaluate_with_both_logs_model_and_ema_metrics_side_by_side(tmp_path):
    sema = SEMACallback(decay=0.7, switch=False, evaluate_with="both")
    trainer = tiny_trainer(str(tmp_path), [sema], eval_strategy="epoch", metric_for_best_model="eval_ema_loss")
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    ema_evals = [h for h in trainer.state.log_history if "eval_ema_loss" in h]
    assert len(evals) == len(ema_evals) == 2
    assert all(a["eval_loss"] != b["eval_ema_loss"] for a, b in zip(evals, ema_evals, strict=True))
    assert trainer.state.best_metric == min(h["eval_ema_loss"] for h in ema_evals)


def test_skipped_optimizer_step_does_not_update_the_average(tmp_path):
    sema = SEMACallback(decay=0.5, warmup="none")
    trainer = tiny_trainer(str(tmp_path), [sema], max_steps=1)
    trainer.train()
    before = sema.ema_state_dict()
    updates = sema.num_updates
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    args, state, control = trainer.args, trainer.state, trainer.control
    state.global_step += 1
    sema.on_optimizer_step(args, state, control, optimizer=SimpleNamespace(step_was_skipped=True))
    sema.on_step_end(args, state, control)
    assert sema.num_updates == updates
    for name, value in sema.ema_state_dict().items():
        assert torch.equal(value, before[name])
    sema.on_optimizer_step(args, state, control, optimizer=SimpleNamespace(step_was_skipped=False))
    sema.on_step_end(args, state, control)
    assert sema.num_updates == updates + 1


def test_update_after_step_keeps_the_average_equal_to_the_weights_until_then(tmp_path):
    recorder = Recorder()
    sema = SEMACallback(decay=0.7, warmup="none", switch=False, update_after_step=3)
    tiny_trainer(str(tmp_path), [recorder, sema], max_steps=5).train()
    expected = recorder.after_step[2]
    for params in recorder.after_step[3:]:
        expected = {n: 0.7 * expected[n] + 0.3 * params[n] for n in expected}
    for name, value in sema.ema_state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)


def test_include_buffers_averages_batchnorm_statistics(tmp_path):
    sema = SEMACallback(decay=0.5, include_buffers=True, switch=False)
    model = tiny_model(batch_norm=True)
    tiny_trainer(str(tmp_path), [sema], model=model, max_steps=2).train()
    ema = sema.ema_state_dict()
    assert "norm.running_mean" in ema and "norm.running_var" in ema
    assert sema.local_numel == sum(p.numel() for p in model.parameters()) + 2 * 16


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resume_settings():
    return dict(num_train_epochs=3, save_strategy="steps", save_steps=3, eval_strategy="epoch")


def test_resume_from_checkpoint_ends_bit_identical_to_uninterrupted_run(tmp_path):
    full = SEMACallback(decay=0.8, warmup_steps=4)
    full_trainer = tiny_trainer(str(tmp_path / "full"), [full], **_resume_settings())
    full_trainer.train()

    crashed = SEMACallback(decay=0.8, warmup_steps=4)
    tiny_trainer(str(tmp_path / "split"), [crashed, StopAt(6)], **_resume_settings()).train()
    checkpoint = tmp_path / "split" / "checkpoint-6"
    assert {"sema_state.json", "sema_ema-00001-of-00001.safetensors"} <= set(os.listdir(checkpoint))

    resumed = SEMACallback(decay=0.8, warmup_steps=4)
    resumed_trainer = tiny_trainer(str(tmp_path / "split"), [resumed], **_resume_settings())
    resumed_trainer.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.num_updates == full.num_updates == 12
    assert resumed.num_switches == full.num_switches == 3
    full_ema, resumed_ema = full.ema_state_dict(), resumed.ema_state_dict()
    for name, value in full_trainer.model.named_parameters():
        assert torch.equal(dict(resumed_trainer.model.named_parameters())[name], value)
        assert torch.equal(resumed_ema[name], full_ema[name])


def test_resume_without_ema_state_is_an_error_unless_opted_in(tmp_path):
    # checkpoint-3 and checkpoint-6: a newest checkpoint without its EMA would be set aside (sema_hf.preemption)
    tiny_trainer(str(tmp_path), [SEMACallback(decay=0.8)], save_strategy="steps", save_steps=3).train()
    checkpoint = tmp_path / "checkpoint-3"
    os.remove(checkpoint / "sema_state.json")
    with pytest.raises(FileNotFoundError, match="allow_fresh_ema_on_resume"):
        tiny_trainer(str(tmp_path), [SEMACallback(decay=0.8)]).train(resume_from_checkpoint=str(checkpoint))
    fresh = SEMACallback(decay=0.8, allow_fresh_ema_on_resume=True)
    tiny_trainer(str(tmp_path), [fresh]).train(resume_from_checkpoint=str(checkpoint))
    assert fresh.num_updates == 5


def test_resume_with_mismatched_ema_layout_is_an_error(tmp_path):
    tiny_trainer(str(tmp_path), [SEMACallback(decay=0.8), StopAt(3)], save_strategy="steps", save_steps=3).train()
    model = tiny_model()
    model.fc1.requires_grad_(False)  # same weights, but other averaged tensors than the checkpoint's
    other = SEMACallback(decay=0.8)
    tiny_trainer(str(tmp_path / "other"), [other], model=model, max_steps=1).train()
    # The same check runs in on_train_begin when resuming (the Trainer's optimizer restore would fail here first).
    with pytest.raises(ValueError, match=r"not in model \['fc1.weight', 'fc1.bias'\]"):
        other.load_checkpoint(str(tmp_path / "checkpoint-3"))


def test_ema_checkpoint_files_are_safetensors_written_without_temporaries(tmp_path):
    tiny_trainer(str(tmp_path), [SEMACallback(decay=0.8)], max_steps=2, save_strategy="steps", save_steps=2).train()
    files = os.listdir(tmp_path / "checkpoint-2")
    assert not any(".tmp" in f for f in files)
    state = load_file(str(tmp_path / "checkpoint-2" / "sema_ema-00001-of-00001.safetensors"))
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_load_best_model_at_end_ends_with_the_best_checkpoints_ema(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False)
    trainer = tiny_trainer(
        str(tmp_path),
        [sema],
        num_train_epochs=3,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved_ema = load_file(os.path.join(best, "sema_ema-00001-of-00001.safetensors"))
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, saved_ema[name])
