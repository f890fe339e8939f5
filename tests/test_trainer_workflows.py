"""SEMACallback across the Trainer's wider surface: reused callbacks, explicit resume, dict eval sets, hyperparameter
search, saves before rotation/upload, evaluation before/after training, refusals. Tiny models, real Trainer runs."""

import os
import shutil
from concurrent.futures import Future

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.utils import logging as hf_logging

from sema_hf import SEMACallback, SEMATrainer
from sema_hf.checkpoint import STATE_NAME, has_ema_checkpoint

from tiny import StopAt, tiny_args, tiny_dataset, tiny_model, tiny_trainer

EMA_FILE = "sema_ema-00001-of-00001.safetensors"


class CaptureAtTrainBegin(TrainerCallback):
    """Placed after SEMACallback: the average right after it was created or restored."""

    def __init__(self, sema):
        self.sema, self.ema = sema, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.ema = {k: v.clone() for k, v in self.sema.store.state_dict().items()}


class PredictionWeights(TrainerCallback):
    """At every evaluation batch: whether the model's weights are the average's (placed after SEMACallback)."""

    def __init__(self, sema):
        self.sema, self.seen = sema, []

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if self.sema.store is None:
            self.seen.append(None)
            return
        ema = self.sema.store.state_dict()
        self.seen.append(all(torch.equal(p.data, ema[n]) for n, p in model.named_parameters()))


def _ema_file(folder):
    return load_file(os.path.join(folder, EMA_FILE))


# ---- 1. one callback, several runs ------------------------------------------------------------------------------
def test_one_callback_reused_by_two_trainers_writes_logs_and_evaluates_per_run(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False)
    first = tiny_trainer(str(tmp_path / "a"), [sema], save_strategy="epoch", eval_strategy="epoch")
    first.train()
    saved_first = _ema_file(tmp_path / "a" / "checkpoint-8")
    second = tiny_trainer(
        str(tmp_path / "b"), [sema], model=tiny_model(seed=5), save_strategy="epoch", eval_strategy="epoch"
    )
    second.train()
    assert sema.trainer is second
    # Run 1's checkpoint still holds run 1's EMA; run 2's went into its own folder.
    for name, value in _ema_file(tmp_path / "a" / "checkpoint-8").items():
        assert torch.equal(value, saved_first[name])
    saved_second = _ema_file(tmp_path / "b" / "checkpoint-8")
    assert any(not torch.equal(saved_second[n], saved_first[n]) for n in saved_first)
    for trainer in (first, second):
        assert any("ema_decay" in h for h in trainer.state.log_history)
        assert [h["eval_uses_ema"] for h in trainer.state.log_history if "eval_uses_ema" in h] == [1.0, 1.0]
    # Run 2 evaluated its own model: its final EMA is in its model (final_weights="ema").
    for name, param in second.model.named_parameters():
        assert torch.equal(param.data, saved_second[name])


def test_set_trainer_with_another_trainer_than_the_running_one_is_an_error(tmp_path):
    sema = SEMACallback(decay=0.8)
    other = tiny_trainer(str(tmp_path / "other"), [])
    running = tiny_trainer(str(tmp_path / "run"), [sema])
    sema.set_trainer(other)
    with pytest.raises(RuntimeError, match="another Trainer"):
        running.train()


# ---- 2. explicit resume -----------------------------------------------------------------------------------------
def _run_to_checkpoint(folder, seed, step=3):
    sema = SEMACallback(decay=0.8)
    tiny_trainer(
        str(folder), [sema, StopAt(step)], model=tiny_model(seed=seed), save_strategy="steps", save_steps=step
    ).train()
    return folder / f"checkpoint-{step}"


def test_explicit_resume_restores_the_given_checkpoints_ema_not_the_one_in_output_dir(tmp_path):
    wanted = _run_to_checkpoint(tmp_path / "a", seed=0)
    other = _run_to_checkpoint(tmp_path / "b", seed=7)  # the same step, in the output_dir of the resumed run
    sema = SEMACallback(decay=0.8)
    probe = CaptureAtTrainBegin(sema)
    trainer = tiny_trainer(str(tmp_path / "b"), [sema, probe])
    sema.set_trainer(trainer)
    trainer.train(resume_from_checkpoint=str(wanted))
    expected, not_expected = _ema_file(wanted), _ema_file(other)
    assert all(torch.equal(probe.ema[n], expected[n]) for n in expected)
    assert not all(torch.equal(probe.ema[n], not_expected[n]) for n in expected)


def test_resume_true_restores_the_last_checkpoint_of_output_dir(tmp_path):
    last = _run_to_checkpoint(tmp_path / "a", seed=0)
    sema = SEMACallback(decay=0.8)
    probe = CaptureAtTrainBegin(sema)
    trainer = tiny_trainer(str(tmp_path / "a"), [sema, probe])
    sema.set_trainer(trainer)
    trainer.train(resume_from_checkpoint=True)
    expected = _ema_file(last)
    assert all(torch.equal(probe.ema[n], expected[n]) for n in expected)


def test_ema_files_of_another_run_beside_a_checkpoint_are_refused_naming_both_folders(tmp_path):
    target = _run_to_checkpoint(tmp_path / "a", seed=0)
    intruder = _run_to_checkpoint(tmp_path / "b", seed=7)
    for name in (EMA_FILE, STATE_NAME):
        shutil.copy(intruder / name, target / name)
    with pytest.raises(ValueError, match="belongs to another checkpoint") as err:
        tiny_trainer(str(tmp_path / "a"), [SEMACallback(decay=0.8)]).train(resume_from_checkpoint=str(target))
    assert str(target) in str(err.value) and str(intruder.resolve()) in str(err.value)


# ---- 3. several eval sets ---------------------------------------------------------------------------------------
def _dict_trainer(tmp_path, sema, **overrides):
    sets = {"a": tiny_dataset(n=16, seed=3), "b": tiny_dataset(n=32, seed=4)}
    probe = PredictionWeights(sema)
    trainer = Trainer(
        model=tiny_model(),
        args=tiny_args(str(tmp_path), eval_strategy="epoch", **overrides),
        train_dataset=tiny_dataset(),
        eval_dataset=sets,
        callbacks=[sema, probe],
    )
    return trainer, probe


def test_every_eval_set_of_a_dict_is_evaluated_with_the_ema_weights(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False)
    trainer, probe = _dict_trainer(
        tmp_path, sema, save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="eval_b_loss"
    )
    trainer.train()
    assert len(probe.seen) == 2 * (1 + 2)  # 2 epochs x (one batch of a + two of b)
    assert all(probe.seen)
    logged_b = [h["eval_b_loss"] for h in trainer.state.log_history if "eval_b_loss" in h]
    assert trainer.state.best_metric == min(logged_b)


def test_both_evaluates_each_eval_set_once_raw_and_once_ema(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False, evaluate_with="both")
    trainer, probe = _dict_trainer(tmp_path, sema)
    trainer.train()
    # SEMA's own pass over the average runs first (before the Trainer's evaluation, which it must not re-enter).
    assert probe.seen == [True, True, True, False, False, False] * 2
    history = trainer.state.log_history
    for key in ("eval_a_loss", "eval_b_loss", "eval_ema_a_loss", "eval_ema_b_loss"):
        assert len([h for h in history if key in h]) == 2


def test_both_in_sema_mode_reports_raw_and_ema_before_the_switch(tmp_path):
    sema = SEMACallback(decay=0.8, evaluate_with="both")
    trainer = tiny_trainer(str(tmp_path), [sema], eval_strategy="epoch")
    trainer.train()
    raw = [h["eval_raw_loss"] for h in trainer.state.log_history if "eval_raw_loss" in h]
    ema = [h["eval_ema_loss"] for h in trainer.state.log_history if "eval_ema_loss" in h]
    held = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(raw) == len(ema) == 2
    assert all(r != e for r, e in zip(raw, ema, strict=True))
    assert held == pytest.approx(ema)  # eval_*: the weights held after the switch point, here the average
    assert sema.num_switches == 2


# ---- 4. hyperparameter search ------------------------------------------------------------------------------------
def test_hyperparameter_search_writes_each_trials_ema_into_its_own_run_folder(tmp_path):
    pytest.importorskip("optuna")  # a test dependency (setup.cfg [test]); the import only guards a broken install
    sema = SEMACallback(decay=0.8)
    data = tiny_dataset()
    trainer = Trainer(
        model_init=lambda trial=None: tiny_model(),
        args=tiny_args(
            str(tmp_path),
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
            num_train_epochs=1,
        ),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[sema],
    )
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        backend="optuna",
        n_trials=2,
        direction="minimize",
    )
    assert best is not None
    runs = sorted(d for d in os.listdir(tmp_path) if d.startswith("run-"))
    assert runs == ["run-0", "run-1"]
    for run in runs:
        assert has_ema_checkpoint(str(tmp_path / run / "checkpoint-4"))
    assert not os.path.exists(tmp_path / "checkpoint-4")


# ---- 5. saves ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The Hub calls of the Trainer's checkpoint pushes, intercepted: what each upload would send, at the call."""
    sent = []

    def fake_create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
        sent.append((path_in_repo, sorted(os.listdir(folder_path))))
        info = huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="", commit_description="", oid="0"
        )
        done = Future()
        done.set_result(info)
        return done if run_as_future else info

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    return sent


@pytest.mark.parametrize("trainer_class", [Trainer, SEMATrainer])
@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_uploaded_checkpoints_hold_their_ema_files(tmp_path, fake_hub, strategy, trainer_class):
    """The upload starts inside the Trainer's save, before any on_save: both write the EMA before that save."""
    sema = SEMACallback(decay=0.8)
    data = tiny_dataset()
    args = tiny_args(
        str(tmp_path),
        save_strategy="epoch",
        save_total_limit=1,
        push_to_hub=True,
        hub_model_id="someone/tiny",
        hub_token="fake",
        hub_strategy=strategy,
        hub_always_push=True,
    )
    trainer_class(model=tiny_model(), args=args, train_dataset=data, callbacks=[sema]).train()
    checkpoint_uploads = [files for path, files in fake_hub if path is not None]
    assert len(checkpoint_uploads) == 2
    for files in checkpoint_uploads:
        assert STATE_NAME in files and EMA_FILE in files
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")) == ["checkpoint-8"]
    assert has_ema_checkpoint(str(tmp_path / "checkpoint-8"))


class CrashOnSave(TrainerCallback):
    """Placed before SEMACallback: the process dies after the Trainer's save of ``step``, before SEMA's on_save."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


def test_plain_callback_has_the_ema_in_place_when_a_crash_follows_the_trainers_save(tmp_path):
    """The plain callback writes the EMA before the Trainer's save when DefaultFlowCallback asked for one, so a
    crash before its on_save leaves checkpoint-4 complete (with save_total_limit=1 the one before is gone)."""
    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(
            str(tmp_path), [CrashOnSave(4), SEMACallback(decay=0.8)], save_strategy="steps", save_steps=2
        ).train()
    assert has_ema_checkpoint(str(tmp_path / "checkpoint-4"))
    resumed = SEMACallback(decay=0.8)
    trainer = tiny_trainer(str(tmp_path), [resumed])
    trainer.train(resume_from_checkpoint=True)
    assert resumed.num_updates == 8  # restored at step 4 with 4 updates, then 4 more
    assert not [n for n in os.listdir(tmp_path) if n.startswith("_incomplete-")]


class CrashOnSecondSave(TrainerCallback):
    """Placed before SEMACallback: dies in the second on_save, after the Trainer's save and its rotation."""

    def __init__(self):
        self.saves = []

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)
        if len(self.saves) == 2:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("with_sema", [False, True])
def test_save_strategy_best_with_save_total_limit_1_resumes_after_a_crash_before_on_save(tmp_path, with_sema):
    """save_strategy="best" is decided after the evaluation, and rotation (save_total_limit=1) deletes the older
    checkpoint before any on_save: the plain callback writes the EMA in on_evaluate when the metric is a new best,
    so a crash there resumes from the newest checkpoint, as the run without SEMA does."""
    settings = dict(
        save_strategy="best", eval_strategy="steps", eval_steps=1, metric_for_best_model="loss",
        save_total_limit=1,
    )  # fmt: skip
    crash = CrashOnSecondSave()
    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(str(tmp_path), [crash] + ([SEMACallback(decay=0.8)] if with_sema else []), **settings).train()
    second = crash.saves[1]
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint-{second}"]  # the first best was rotated away
    resumed, start = SEMACallback(decay=0.8), StartStep()
    callbacks = [start] + ([resumed] if with_sema else [])
    tiny_trainer(str(tmp_path), callbacks, **settings).train(resume_from_checkpoint=True)
    assert start.step == second
    if with_sema:
        assert resumed.num_updates == 8  # restored with the EMA of that step, then to the end


class StartStep(TrainerCallback):
    def __init__(self):
        self.step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def test_sema_trainer_has_the_ema_in_place_when_a_crash_follows_the_trainers_save(tmp_path):
    data = tiny_dataset()

    def trainer(callbacks):
        args = tiny_args(str(tmp_path), save_strategy="steps", save_steps=2)
        return SEMATrainer(model=tiny_model(), args=args, train_dataset=data, callbacks=callbacks)

    with pytest.raises(KeyboardInterrupt):
        trainer([CrashOnSave(4), SEMACallback(decay=0.8)]).train()
    assert has_ema_checkpoint(str(tmp_path / "checkpoint-4"))
    resumed = SEMACallback(decay=0.8)
    trainer([resumed]).train(resume_from_checkpoint=True)
    assert resumed.num_updates == 8


def test_save_only_model_checkpoints_still_hold_the_ema_for_load_best_model_at_end(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False)
    trainer = tiny_trainer(
        str(tmp_path),
        [sema],
        save_only_model=True,
        save_strategy="epoch",
        eval_strategy="epoch",
        load_best_model_at_end=True,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert has_ema_checkpoint(best)
    saved = _ema_file(best)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.data, saved[name])  # ends on the best checkpoint's average


# ---- 8. the rest of the surface ---------------------------------------------------------------------------------
def test_evaluate_with_model_and_load_best_model_ends_on_the_raw_weights_that_scored_best(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False, evaluate_with="model")
    trainer = tiny_trainer(
        str(tmp_path), [sema], save_strategy="epoch", eval_strategy="epoch", load_best_model_at_end=True
    )
    trainer.train()
    best_raw = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.data, best_raw[name])


def test_eval_on_start_after_resume_evaluates_the_restored_average(tmp_path):
    checkpoint = _run_to_checkpoint(tmp_path, seed=0)
    sema = SEMACallback(decay=0.8, switch=False)
    trainer = tiny_trainer(str(tmp_path), [sema], eval_on_start=True, max_steps=4)
    probe = PredictionWeights(sema)
    trainer.add_callback(probe)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert probe.seen and all(probe.seen)


def test_evaluate_and_predict_called_by_the_user_before_and_after_training(tmp_path):
    sema = SEMACallback(decay=0.8)
    trainer = tiny_trainer(str(tmp_path), [sema], eval_strategy="epoch")
    before = trainer.evaluate()
    assert "eval_loss" in before and "eval_uses_ema" not in before
    trainer.predict(tiny_dataset())
    trainer.train()
    after = trainer.evaluate()  # the model now holds the average (final_weights="ema")
    with sema.swapped_in():
        same = trainer.evaluate()
    assert after["eval_loss"] == pytest.approx(same["eval_loss"], abs=0)
    trainer.predict(tiny_dataset())


def test_eval_strategy_no_trains_and_ends_on_the_average(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False)
    trainer = tiny_trainer(str(tmp_path), [sema])
    trainer.train()
    ema = sema.ema_state_dict()
    assert all(torch.equal(p.data, ema[n]) for n, p in trainer.model.named_parameters())


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from tiny_dataset()


def test_iterable_dataset_without_length_needs_step_switching_and_an_explicit_warmup(tmp_path):
    def train(sema):
        Trainer(
            model=tiny_model(), args=tiny_args(str(tmp_path), max_steps=4), train_dataset=Stream(), callbacks=[sema]
        ).train()

    with pytest.raises(ValueError, match="warmup_steps"):
        train(SEMACallback(decay=0.8))
    with pytest.raises(ValueError, match="switch_every_steps"):
        train(SEMACallback(decay=0.8, warmup="none"))
    with pytest.raises(ValueError, match="horizon_steps"):
        train(SEMACallback(horizon_epochs=0.5, warmup="none", switch_every_steps=2))
    ok = SEMACallback(decay=0.8, warmup_steps=2, switch_every_steps=2)
    train(ok)
    assert ok.num_switches == 2


# ---- 9. what a user sees ----------------------------------------------------------------------------------------
def test_resolved_settings_are_logged_at_info_at_train_start(tmp_path, caplog):
    hf_logging.set_verbosity_info()
    try:
        with caplog.at_level("INFO", logger="sema_hf"):
            tiny_trainer(str(tmp_path), [SEMACallback(horizon_epochs=0.5, warmup="none")]).train()
    finally:
        hf_logging.set_verbosity_warning()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SEMA: Switch EMA every")]
    assert "decay 0.5 (horizon 2 optimizer steps = 0.5 epochs, set by horizon_epochs)" in line
    assert "engine local" in line and "MiB fp32" in line


def test_dict_eval_sets_with_if_better_need_a_metric_naming_one_set(tmp_path):
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    trainer, probe = _dict_trainer(tmp_path, sema)
    with pytest.raises(ValueError, match="must name one of them"):
        trainer.train()


def test_first_dataset_of_a_dict_does_not_get_the_raw_weights_after_a_user_evaluate(tmp_path):
    """A user evaluation between training runs leaves no pending state behind."""
    sema = SEMACallback(decay=0.8, switch=False)
    trainer, probe = _dict_trainer(tmp_path, sema)
    trainer.evaluate()
    probe.seen.clear()
    trainer.train()
    assert all(probe.seen) and len(probe.seen) == 6
