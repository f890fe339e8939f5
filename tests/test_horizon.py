"""The averaging horizon: decay resolved from horizon_epochs / horizon_steps against hand computation, the
warnings that say when an average cannot help, and the guarded switch (switch_policy="if_better")."""

import json
import warnings

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer

from sema_hf import SEMACallback, SEMAConfig
from sema_hf.horizon import decay_for_horizon, horizon_of_decay, optimizer_steps_per_epoch, resolve_horizon

from launch import run_torchrun
from tiny import Pull, tiny_args, tiny_model, tiny_trainer


# ---- resolution -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given", [("decay", "horizon_epochs"), ("horizon_steps", "decay"), ("horizon_epochs", "horizon_steps")]
)
def test_two_horizon_units_at_once_are_an_error_naming_both(given):
    values = {"decay": 0.9, "horizon_epochs": 0.5, "horizon_steps": 10.0}
    with pytest.raises(ValueError) as err:
        SEMAConfig(**{name: values[name] for name in given})
    assert all(name in str(err.value) for name in given)


def test_setting_one_unit_through_overrides_replaces_the_others():
    config = SEMACallback(SEMAConfig(decay=0.95), horizon_epochs=0.3).config
    assert config.decay is None and config.horizon_epochs == 0.3


def test_horizon_and_decay_are_inverse_by_hand():
    assert decay_for_horizon(2.0) == 0.5
    assert decay_for_horizon(1000.0) == pytest.approx(0.999, abs=1e-15)
    assert horizon_of_decay(0.99) == pytest.approx(100.0)
    assert optimizer_steps_per_epoch(9, 2) == 5  # a last partial accumulation still steps, as the Trainer counts
    assert optimizer_steps_per_epoch(None, 2) is None
    resolved = resolve_horizon(SEMAConfig(horizon_epochs=0.5), steps_per_epoch=4)
    assert (resolved.decay, resolved.horizon_steps, resolved.horizon_epochs) == (0.5, 2.0, 0.5)
    default = resolve_horizon(SEMAConfig(), steps_per_epoch=100)  # none given: the documented default
    assert (default.horizon_epochs, default.decay) == (0.3, 1 - 1 / 30)
    tiny = resolve_horizon(SEMAConfig(horizon_epochs=0.3), steps_per_epoch=2)  # 0.6 steps: raised to 2, said so
    assert (tiny.horizon_steps, tiny.decay) == (2.0, 0.5) and "only 0.6 optimizer steps" in tiny.note
    with pytest.raises(ValueError, match="the default"):
        resolve_horizon(SEMAConfig(), None)  # no epoch length: the default cannot resolve


def test_horizon_epochs_on_four_steps_per_epoch_averages_with_decay_one_half(tmp_path):
    sema = SEMACallback(horizon_epochs=0.5, warmup="none")
    assert sema.decay is None  # depends on the run
    trainer = tiny_trainer(str(tmp_path), [sema])  # 32 examples / 8 per batch = 4 optimizer steps per epoch
    trainer.train()
    assert sema.decay == 0.5
    assert {h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h} == {0.5}


def test_horizon_epochs_counts_optimizer_steps_after_gradient_accumulation_and_update_every(tmp_path):
    sema = SEMACallback(horizon_epochs=2.0, warmup="none", update_every=2, switch=False)
    # 8 batches of 4 per epoch, accumulation 2 -> 4 optimizer steps; H = 8 steps -> m = 7/8, applied as m**2.
    trainer = tiny_trainer(str(tmp_path), [sema], per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer.train()
    assert sema.decay == 1 - 1 / 8
    logged = [h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h]
    assert logged and set(logged) == {(1 - 1 / 8) ** 2}


def test_warmup_runs_on_top_of_the_resolved_decay(tmp_path):
    sema = SEMACallback(horizon_steps=10, warmup="linear", warmup_steps=4, warmup_ratio=0.5, switch=False)
    trainer = tiny_trainer(str(tmp_path), [sema])
    trainer.train()
    logged = [h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h]
    assert logged[:5] == pytest.approx([0.9 * 0.625, 0.9 * 0.75, 0.9 * 0.875, 0.9, 0.9])


def test_decay_runs_are_bit_identical_to_the_same_horizon_in_steps(tmp_path):
    runs = []
    for i, kwargs in enumerate([{"decay": 0.9}, {"horizon_steps": 10}]):
        sema = SEMACallback(**kwargs, switch=False)
        tiny_trainer(str(tmp_path / str(i)), [sema]).train()
        runs.append(sema.ema_state_dict())
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.multiprocess
def test_horizon_epochs_on_two_ddp_ranks_with_accumulation_and_update_every(tmp_path):
    run_torchrun("tests/dist/horizon_worker.py", str(tmp_path))
    for rank in range(2):
        seen = json.loads((tmp_path / f"horizon_rank{rank}.json").read_text())
        # 32 examples / 2 ranks / 4 per batch = 4 batches; accumulation 2 -> 2 optimizer steps per epoch = H.
        assert seen["steps"] == 4
        assert seen["decay"] == 0.5
        assert set(seen["logged"]) == {0.25}  # m**2 for update_every=2


# ---- warnings ---------------------------------------------------------------------------------------------------
def _train_warnings(tmp_path, sema, **overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(str(tmp_path), [sema], **overrides).train()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "SEMA:" in str(w.message)]


def test_horizon_longer_than_the_run_warns_once(tmp_path):
    found = _train_warnings(tmp_path, SEMACallback(decay=0.999, switch=False, warmup="none"))
    assert len(found) == 1 and "longer than the whole run" in found[0]


def test_switching_with_a_horizon_longer_than_the_switch_interval_warns(tmp_path):
    found = _train_warnings(tmp_path, SEMACallback(horizon_epochs=1.5, warmup="none"), num_train_epochs=4)
    assert len(found) == 1 and "pulls training back by about 6 steps" in found[0]


def test_update_after_step_and_warmup_longer_than_the_run_warn(tmp_path):
    found = _train_warnings(tmp_path, SEMACallback(horizon_steps=2, update_after_step=8, switch=False))
    assert len(found) == 1 and "update_after_step" in found[0]
    found = _train_warnings(tmp_path, SEMACallback(horizon_steps=2, warmup_steps=20, switch=False))
    assert len(found) == 1 and "warmup" in found[0]


def test_no_warning_on_a_sensible_run_or_the_examples_defaults(tmp_path):
    assert _train_warnings(tmp_path, SEMACallback(horizon_epochs=0.5), num_train_epochs=4) == []
    # The examples' settings: ~125 optimizer steps per epoch, 3 epochs, horizon 0.3 epochs (SEMAConfig defaults else).
    config = SEMAConfig(horizon_epochs=0.3)
    from sema_hf.horizon import horizon_warnings

    resolved = resolve_horizon(config, steps_per_epoch=125)
    assert horizon_warnings(config, resolved, total_steps=375, warmup_steps=125) == []


# ---- guarded switch ---------------------------------------------------------------------------------------------
def _pull_run(tmp_path, start, train_x, **sema_kwargs):
    sema = SEMACallback(decay=0.8, warmup="none", switch_policy="if_better", **sema_kwargs)
    data = Dataset.from_dict({"x": train_x.tolist(), "labels": [0.0] * len(train_x)})
    evalset = Dataset.from_dict({"x": [[0.0] * 4] * 4, "labels": [0.0] * 4})
    trainer = Trainer(
        model=Pull(start),
        args=tiny_args(
            str(tmp_path), per_device_train_batch_size=1, learning_rate=0.3, optim="sgd", eval_strategy="epoch"
        ),
        train_dataset=data,
        eval_dataset=evalset,
        callbacks=[sema],
    )
    trainer.train()
    history = trainer.state.log_history
    raw = [h["eval_raw_loss"] for h in history if "eval_raw_loss" in h]
    ema = [h["eval_ema_loss"] for h in history if "eval_ema_loss" in h]
    switched = [h["ema_switched"] for h in history if "ema_switched" in h]
    return sema, trainer, raw, ema, switched


def test_if_better_keeps_the_raw_weights_when_the_average_lags_behind(tmp_path):
    # Noise-free pull from w = 3 to 0: the average lags behind, so it is worse at every switch point.
    sema, trainer, raw, ema, switched = _pull_run(tmp_path, 3.0, torch.zeros(8, 4))
    assert len(raw) == len(ema) == len(switched) == 2
    assert all(e > r for r, e in zip(raw, ema, strict=True))
    assert switched == [0.0, 0.0] and sema.num_switches == 0
    averaged = sema.ema_state_dict()["w"]
    assert not torch.equal(trainer.model.w.data, averaged)  # final weights follow the policy: raw kept


def test_if_better_switches_when_the_average_is_better(tmp_path):
    # Noisy pull around 0 from w = 0: the raw weights follow the last points, the average cancels their noise.
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    sema, trainer, raw, ema, switched = _pull_run(tmp_path, 0.0, noise)
    assert all(e < r for r, e in zip(raw, ema, strict=True))
    assert switched == [1.0, 1.0] and sema.num_switches == 2
    assert torch.equal(trainer.model.w.data, sema.ema_state_dict()["w"])


class DropoutRegressor(nn.Module):
    """`TinyRegressor` with dropout on the hidden layer: training draws from the global RNG at every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x, labels=None):
        hidden = nn.functional.dropout(torch.tanh(self.fc1(x)), 0.5, self.training)
        out = self.fc2(hidden).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def test_evaluating_the_average_does_not_change_what_training_draws_next(tmp_path):
    """Each evaluation makes a DataLoader iterator, which draws a seed from the global RNG; the extra evaluation of
    the average (if_better, evaluate_with="both") must not shift the dropout masks that training draws after it,
    so a guarded switch that keeps the raw weights trains exactly as no averaging."""
    finals = []
    for callbacks in ([], [SEMACallback(decay=0.8, switch=False, evaluate_with="both", final_weights="model")]):
        trainer = tiny_trainer(
            str(tmp_path / str(len(callbacks))), callbacks, model=DropoutRegressor(), eval_strategy="epoch"
        )
        trainer.args.num_train_epochs = 3
        trainer.train()
        assert any("eval_ema_loss" in h for h in trainer.state.log_history) == bool(callbacks)
        finals.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), name


def test_if_better_without_an_evaluation_at_every_switch_point_is_refused(tmp_path):
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    with pytest.raises(ValueError, match="does not evaluate at every switch point"):
        tiny_trainer(str(tmp_path), [sema], eval_strategy="no").train()


def test_guarded_switch_with_a_tiny_model_logs_both_numbers_and_the_decision(tmp_path):
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    trainer = tiny_trainer(str(tmp_path), [sema], model=tiny_model(), eval_strategy="epoch")
    trainer.train()
    history = trainer.state.log_history
    raw = [h["eval_raw_loss"] for h in history if "eval_raw_loss" in h]
    ema = [h["eval_ema_loss"] for h in history if "eval_ema_loss" in h]
    switched = [h["ema_switched"] for h in history if "ema_switched" in h]
    assert switched == [float(e < r) for r, e in zip(raw, ema, strict=True)]
