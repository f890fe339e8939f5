"""The evaluation contract (issue 16): what the Trainer does with an evaluation's numbers (best checkpoint, early
stopping, search objective, model card, resume) stays true with SEMA, above all with the guarded switch. Each test
is named after the promise; where a run without SEMA defines the right answer, the test compares with it.
Tiny models, real Trainer runs, a few seconds each."""

import logging
import types
import warnings

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn
from transformers import EarlyStoppingCallback, PretrainedConfig, Trainer, TrainerCallback
from transformers.trainer_utils import default_compute_objective

from sema_hf import SEMACallback, SEMATrainer
from sema_hf.checkpoint import has_ema_checkpoint

from tiny import Pull, StopAt, tiny_args, tiny_dataset, tiny_model, tiny_trainer

EMA_FILE = "sema_ema-00001-of-00001.safetensors"


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _pull_data(train_x):
    data = Dataset.from_dict({"x": train_x.tolist(), "labels": [0.0] * len(train_x)})
    evalset = Dataset.from_dict({"x": [[0.0] * 4] * 4, "labels": [0.0] * 4})
    return data, evalset


def _trainer_evals(history, key="eval_loss"):
    """The Trainer's own evaluation entries (SEMA's entries carry eval_ema_*/eval_raw_*, never the plain keys)."""
    return [h for h in history if key in h]


# ---- 1. hyperparameter search objective -------------------------------------------------------------------------
class KeepMetrics(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append(metrics)  # the very dict evaluate() returns to the search


def _search(tmp_path, callbacks):
    keep = KeepMetrics()
    data = tiny_dataset()
    trainer = Trainer(
        model_init=lambda trial=None: tiny_model(),
        args=tiny_args(str(tmp_path), eval_strategy="epoch", num_train_epochs=2),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[*callbacks, keep],
    )
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        backend="optuna",
        n_trials=2,
        direction="minimize",
    )
    return best, keep.seen


@pytest.mark.parametrize("policy", ["always", "if_better"])
def test_search_objective_is_each_trials_eval_loss_as_without_sema(tmp_path, policy):
    pytest.importorskip("optuna")
    _, plain = _search(tmp_path / "plain", [])
    best, seen = _search(tmp_path / "sema", [SEMACallback(decay=0.8, switch_policy=policy)])
    assert [sorted(m) for m in seen] == [sorted(m) for m in plain]  # no key of SEMA's in the returned dict
    for metrics in seen:
        assert default_compute_objective(metrics) == metrics["eval_loss"]
    assert best.objective in [m["eval_loss"] for m in seen]


# ---- 2. best checkpoint = best kept weights ----------------------------------------------------------------------
def _eval_loss_of(trainer, weights):
    kept = _params(trainer.model)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            param.copy_(weights[name])
    loss = trainer.evaluate()["eval_loss"]
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            param.copy_(kept[name])
    return loss


@pytest.mark.parametrize(
    "sema_kwargs", [{"switch_policy": "if_better"}, {"evaluate_with": "both"}], ids=["if_better", "both"]
)
def test_best_metric_is_the_score_of_the_weights_each_checkpoint_holds(tmp_path, sema_kwargs):
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    data, evalset = _pull_data(torch.cat([noise, torch.full((8, 4), 2.0), noise]))
    sema = SEMACallback(decay=0.8, warmup="none", **sema_kwargs)
    trainer = Trainer(
        model=Pull(0.0),
        args=tiny_args(
            str(tmp_path),
            per_device_train_batch_size=2,
            learning_rate=0.3,
            optim="sgd",
            num_train_epochs=3,
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
        ),
        train_dataset=data,
        eval_dataset=evalset,
        callbacks=[sema],
    )
    trainer.train()
    history = trainer.state.log_history
    for entry in _trainer_evals(history):
        folder = tmp_path / f"checkpoint-{entry['step']}"
        held = load_file(str(folder / "model.safetensors"))
        assert _eval_loss_of(trainer, held) == pytest.approx(entry["eval_loss"], rel=1e-6)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)


# ---- 3. early stopping -------------------------------------------------------------------------------------------
def _stopping_run(tmp_path, sema, metric, sema_first):
    stopper = EarlyStoppingCallback(early_stopping_patience=2)
    callbacks = [sema, stopper] if sema_first else [stopper, sema]
    trainer = tiny_trainer(
        str(tmp_path),
        [cb for cb in callbacks if cb is not None],
        learning_rate=0.0,  # nothing improves: the run stops after 1 + patience evaluations
        num_train_epochs=10,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=metric,
    )
    caught = []
    handler = logging.Handler()
    handler.emit = lambda record: caught.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        hf_logger.removeHandler(handler)
    return trainer.state.global_step, caught + [str(w.message) for w in raised]


@pytest.mark.parametrize("metric", ["eval_loss", "eval_ema_loss"])
@pytest.mark.parametrize("sema_first", [True, False], ids=["sema_first", "sema_last"])
def test_early_stopping_counts_each_evaluation_once_in_either_callback_order(tmp_path, metric, sema_first):
    expected, _ = _stopping_run(tmp_path / "plain", None, "eval_loss", True)
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    stopped_at, caught = _stopping_run(tmp_path / "sema", sema, metric, sema_first)
    assert stopped_at == expected == 12  # 3 evaluations of 4 steps
    assert not any("early stopping" in message.lower() for message in caught)


# ---- 4. ignore_keys_for_eval -------------------------------------------------------------------------------------
class WithExtraOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x, labels=None):
        out = self.inner(x, labels)
        return {"loss": out["loss"], "logits": out["logits"], "hidden": out["logits"] * 2}


@pytest.mark.parametrize("trainer_class", [Trainer, SEMATrainer])
def test_ignore_keys_for_eval_apply_to_the_evaluation_of_the_average(tmp_path, trainer_class):
    kinds = []

    def compute_metrics(prediction):
        kinds.append(type(prediction.predictions).__name__)
        return {"zero": 0.0}

    data = tiny_dataset()
    trainer = trainer_class(
        model=WithExtraOutput(),
        args=tiny_args(str(tmp_path), eval_strategy="epoch"),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=compute_metrics,
        callbacks=[SEMACallback(decay=0.8, switch_policy="if_better")],
    )
    trainer.train(ignore_keys_for_eval=["hidden"])
    assert len(kinds) == 2 * 3  # per epoch: the raw weights, the average (SEMA's passes), the Trainer's
    assert set(kinds) == {"ndarray"}


# ---- 5. resume of a plain Trainer's checkpoint --------------------------------------------------------------------
def test_fresh_ema_on_a_plain_trainers_checkpoint_trains_to_the_end_and_saves(tmp_path):
    tiny_trainer(str(tmp_path), [StopAt(4)], save_strategy="steps", save_steps=4).train()
    sema = SEMACallback(decay=0.8, allow_fresh_ema_on_resume=True)
    trainer = tiny_trainer(str(tmp_path), [sema], save_strategy="steps", save_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert trainer.state.global_step == 8 and sema.num_updates == 4
    assert has_ema_checkpoint(str(tmp_path / "checkpoint-8"))


def test_best_checkpoint_without_ema_files_warns_and_keeps_the_trainers_weights(tmp_path):
    scores = iter(range(100, 0, -1))  # every evaluation scores worse than the one before

    def compute_metrics(prediction):
        return {"score": float(next(scores))}

    def trainer(callbacks, **overrides):
        data = tiny_dataset()
        args = tiny_args(
            str(tmp_path),
            eval_strategy="steps",
            eval_steps=4,
            save_strategy="steps",
            save_steps=4,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
            **overrides,
        )
        return Trainer(
            model=tiny_model(),
            args=args,
            train_dataset=data,
            eval_dataset=data,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
        )

    trainer([StopAt(4)]).train()  # checkpoint-4: the best, written without SEMA
    resumed = trainer([SEMACallback(decay=0.8, switch=False, allow_fresh_ema_on_resume=True)])
    with pytest.warns(UserWarning, match="holds no EMA files"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.state.best_model_checkpoint.endswith("checkpoint-4")
    best = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param.data, best[name])


# ---- 6. if_better resumed at an epoch end ------------------------------------------------------------------------
def test_if_better_resumed_at_an_epoch_end_takes_the_skipped_decision(tmp_path):
    def run(folder, callbacks, **resume):
        sema = SEMACallback(decay=0.8, switch_policy="if_better")
        trainer = tiny_trainer(
            str(folder), [sema, *callbacks], eval_strategy="epoch", save_strategy="steps", save_steps=4
        )
        trainer.train(**resume)
        return trainer, sema

    uninterrupted, whole = run(tmp_path / "whole", [])
    run(tmp_path / "cut", [StopAt(4)])
    # checkpoint-4 is written at the first epoch's last step, before that epoch end's switch point
    resumed, sema = run(tmp_path / "cut", [], resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    decisions = [h["ema_switched"] for h in resumed.state.log_history if "ema_switched" in h]
    expected = [h["ema_switched"] for h in uninterrupted.state.log_history if "ema_switched" in h]
    assert decisions[-len(expected) :] == expected and sema.num_switches == whole.num_switches
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param.data, dict(uninterrupted.model.named_parameters())[name].data)


# ---- 7. refused at train start, not after an epoch --------------------------------------------------------------
class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_if_better_with_eval_delay_past_a_switch_point_is_refused_at_train_start(tmp_path):
    counter = CountSteps()
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    with pytest.raises(ValueError, match="eval_delay"):
        tiny_trainer(str(tmp_path), [sema, counter], eval_strategy="epoch", eval_delay=2).train()
    assert counter.steps == 0


def test_if_better_accepts_an_eval_steps_ratio_that_divides_the_switch_interval(tmp_path):
    sema = SEMACallback(decay=0.8, switch_policy="if_better", switch_every_steps=4)
    trainer = tiny_trainer(str(tmp_path), [sema], eval_strategy="steps", eval_steps=0.25, max_steps=16)
    trainer.train()  # 0.25 of 16 steps: an evaluation every 4 steps
    assert len([h for h in trainer.state.log_history if "ema_switched" in h]) == 4


# ---- 8. model card -----------------------------------------------------------------------------------------------
def test_model_card_says_which_weights_were_saved_and_lists_their_metrics(tmp_path):
    data, evalset = _pull_data(torch.zeros(8, 4))  # noise-free: the average lags behind, if_better keeps raw
    sema = SEMACallback(decay=0.8, warmup="none", switch_policy="if_better")
    model = Pull(3.0)
    model.config = PretrainedConfig()  # what the Trainer's card reads
    trainer = SEMATrainer(
        model=model,
        args=tiny_args(
            str(tmp_path), per_device_train_batch_size=1, learning_rate=0.3, optim="sgd", eval_strategy="epoch"
        ),
        train_dataset=data,
        eval_dataset=evalset,
        callbacks=[sema],
    )
    trainer.train()
    assert sema.num_switches == 0 and sema.final_weights_held == "model"
    trainer.create_model_card()
    card = open(tmp_path / "README.md").read()
    assert "These are the raw training weights" in card
    assert "These weights are the exponential moving average" not in card
    assert "eval_uses_ema" not in card and "pypi.org/project/sema-hf" not in card
    last = _trainer_evals(trainer.state.log_history)[-1]["eval_loss"]
    assert f"| eval_loss | {last:.4f} |" in card


def test_model_card_of_the_average_lists_the_averages_metrics(tmp_path):
    sema = SEMACallback(decay=0.8, switch=False, evaluate_with="both")
    data = tiny_dataset()
    model = tiny_model()
    model.config = PretrainedConfig()  # what the Trainer's card reads
    trainer = SEMATrainer(
        model=model,
        args=tiny_args(str(tmp_path), eval_strategy="epoch"),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[sema],
    )
    trainer.train()
    assert sema.final_weights_held == "ema"
    trainer.create_model_card()
    card = open(tmp_path / "README.md").read()
    assert "plain exponential moving average" in card
    ema = [h["eval_ema_loss"] for h in trainer.state.log_history if "eval_ema_loss" in h][-1]
    assert f"| eval_loss | {ema:.4f} |" in card


# ---- 9. binding --------------------------------------------------------------------------------------------------
def _renamed_loop():
    """Trainer._inner_training_loop under another name, as Unsloth installs its ``_fast_inner_training_loop``."""
    loop = Trainer._inner_training_loop
    code = loop.__code__.replace(co_name="_fast_inner_training_loop", co_qualname="_fast_inner_training_loop")
    return types.FunctionType(code, loop.__globals__, "_fast_inner_training_loop", loop.__defaults__, loop.__closure__)


class PatchedTrainer(Trainer):
    _inner_training_loop = _renamed_loop()


def test_a_trainer_with_a_renamed_training_loop_is_still_found(tmp_path):
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    data = tiny_dataset()
    trainer = PatchedTrainer(
        model=tiny_model(),
        args=tiny_args(str(tmp_path), eval_strategy="epoch"),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[sema],
    )
    trainer.train()
    assert sema.trainer is trainer
    assert len([h for h in trainer.state.log_history if "ema_switched" in h]) == 2


def test_set_trainer_with_a_renamed_loop_honours_an_explicit_resume_path(tmp_path):
    for folder, seed in (("a", 0), ("b", 7)):
        tiny_trainer(
            str(tmp_path / folder),
            [SEMACallback(decay=0.8), StopAt(3)],
            model=tiny_model(seed=seed),
            save_strategy="steps",
            save_steps=3,
        ).train()
    wanted = tmp_path / "a" / "checkpoint-3"
    sema = SEMACallback(decay=0.8)
    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update({k: v.clone() for k, v in sema.store.state_dict().items()})

    data = tiny_dataset()
    trainer = PatchedTrainer(
        model=tiny_model(), args=tiny_args(str(tmp_path / "b")), train_dataset=data, callbacks=[sema, Capture()]
    )
    sema.set_trainer(trainer)
    trainer.train(resume_from_checkpoint=str(wanted))
    expected = load_file(str(wanted / EMA_FILE))
    assert all(torch.equal(seen[n], expected[n]) for n in expected)


def test_sema_trainer_hands_its_binding_over(tmp_path):
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    data = tiny_dataset()
    trainer = SEMATrainer(
        model=tiny_model(),
        args=tiny_args(str(tmp_path), eval_strategy="epoch"),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[sema],
    )
    trainer.train(ignore_keys_for_eval=["nothing"])
    assert sema._binding.handed_over and sema._binding.ignore_keys_for_eval == ["nothing"]
    assert sema.trainer is trainer


# ---- 10. restore_callback_states_from_checkpoint ------------------------------------------------------------------
def test_restore_callback_states_keeps_the_users_callback_training(tmp_path):
    tiny_trainer(str(tmp_path), [SEMACallback(decay=0.8), StopAt(3)], save_strategy="steps", save_steps=3).train()
    sema = SEMACallback(decay=0.8)
    trainer = tiny_trainer(str(tmp_path), [sema], restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert any(cb is sema for cb in trainer.callback_handler.callbacks)
    assert sema.num_updates == 8 and sema.trainer is trainer


# ---- 11. two SEMACallbacks ---------------------------------------------------------------------------------------
def test_two_sema_callbacks_in_one_trainer_are_refused(tmp_path):
    trainer = tiny_trainer(str(tmp_path), [SEMACallback(decay=0.8), SEMACallback(decay=0.9)])
    with pytest.raises(RuntimeError, match="one Trainer takes one"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---- 12. an exception while the average is evaluated -------------------------------------------------------------
class WeightsAtEpochEnd(TrainerCallback):
    """Placed before SEMACallback: the raw weights at each epoch end, before SEMA's switch point."""

    def __init__(self):
        self.last = None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.last = _params(model)


def _failing_run(tmp_path, trainer_class, sema, fail_at_call, error):
    calls = []

    def compute_metrics(prediction):
        calls.append(1)
        if len(calls) == fail_at_call:
            raise error("compute_metrics failed")
        return {"zero": 0.0}

    recorder = WeightsAtEpochEnd()
    data = tiny_dataset()
    trainer = trainer_class(
        model=tiny_model(),
        args=tiny_args(str(tmp_path), eval_strategy="epoch"),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=compute_metrics,
        callbacks=[recorder, sema],
    )
    with pytest.raises(error):
        trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("trainer_class", [Trainer, SEMATrainer])
def test_exception_while_the_guarded_switch_evaluates_the_average_leaves_the_raw_weights(tmp_path, trainer_class):
    sema = SEMACallback(decay=0.8, switch_policy="if_better")
    trainer, recorder = _failing_run(tmp_path, trainer_class, sema, 2, ValueError)  # call 2: the average's pass
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.data, recorder.last[name])


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_exception_in_the_trainers_evaluation_of_the_average_leaves_the_raw_weights_with_sema_trainer(tmp_path, error):
    sema = SEMACallback(decay=0.8, switch=False)  # evaluate_with="ema": the Trainer's evaluation reads it
    trainer, recorder = _failing_run(tmp_path, SEMATrainer, sema, 1, error)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.data, recorder.last[name])
    assert not sema._round.swapped_in


# ---- 13. docs match code -----------------------------------------------------------------------------------------
def test_default_decay_warmup_is_one_epoch_also_with_max_steps(tmp_path):
    sema = SEMACallback(decay=0.8)
    tiny_trainer(str(tmp_path), [sema], max_steps=5).train()  # 4 optimizer steps per epoch
    assert sema._warmup_steps == 4


def test_steps_per_epoch_under_sequence_parallelism_are_the_trainers(tmp_path):
    from sema_hf.callback import _trainers_steps_per_epoch

    args = tiny_args(str(tmp_path), gradient_accumulation_steps=2)
    under_sp = types.SimpleNamespace(get_sp_size=lambda: 2)
    loader = list(range(6))  # this rank's batches: 1/sp_size of the Trainer's count
    assert _trainers_steps_per_epoch(under_sp, loader, args) == 6  # 6 * 2 batches / accumulation 2
    assert _trainers_steps_per_epoch(None, loader, args) == 3


# ---- a Trainer subclass nobody here wrote: TRL's SFTTrainer (the `test` extra) ----------------------------------
def _tiny_causal_lm_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", *"abcdefgh"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=32)
    config.pad_token_id, config.eos_token_id = 0, 1
    return GPT2LMHeadModel(config), tokenizer


def test_trl_sft_trainer_with_the_guarded_switch_ends_on_the_weights_its_best_metric_scored(tmp_path):
    trl = pytest.importorskip("trl")
    model, tokenizer = _tiny_causal_lm_and_tokenizer()
    g = torch.Generator().manual_seed(0)
    letters = "abcdefgh"

    def texts(n):
        return [" ".join(letters[(i + int(k)) % 8] for k in torch.randint(0, 3, (6,), generator=g)) for i in range(n)]

    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        num_train_epochs=2,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        max_length=16,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    sema = SEMACallback(decay=0.8, warmup="none", switch_policy="if_better")
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts(16)}),
        eval_dataset=Dataset.from_dict({"text": texts(8)}),
        processing_class=tokenizer,
        callbacks=[sema],
    )
    trainer.train()
    assert len([h for h in trainer.state.log_history if "ema_switched" in h]) == 2
    for entry in _trainer_evals(trainer.state.log_history):
        held = type(model).from_pretrained(str(tmp_path / f"checkpoint-{entry['step']}"))
        kept = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.model.load_state_dict(held.state_dict())
        assert trainer.evaluate()["eval_loss"] == pytest.approx(entry["eval_loss"], rel=1e-5)
        trainer.model.load_state_dict(kept)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-5)
