"""What SEMA checks about a run's `TrainingArguments` at train start, and the settings line it logs.

Refused at train start, with the reason (each would otherwise silently do the wrong thing):

* an epoch-length dependent setting on data without a length (``IterableDataset``): the default decay warmup
  (one epoch), epoch switching (the Trainer's ``state.epoch`` is fractional, so no epoch end would ever switch)
  and ``horizon_epochs``;
* ``evaluate_with="both"`` or ``switch_policy="if_better"`` without an identifiable Trainer (SEMA's passes over
  the weights run through its evaluation loop), and ``if_better`` without an eval set or without an evaluation by
  the Trainer at every switch point (``eval_strategy``, ``eval_steps``, also as a ratio of the run, and
  ``eval_delay``, which skips the evaluations before it);
* ``posthoc_select`` without an identifiable Trainer or without an eval set (or naming none of a dict's sets):
  the selection runs at the end of the run, after all its cost;
* a ``metric_for_best_model`` naming a key of SEMA's (``eval_ema_*``, ``eval_raw_*``) that this run never
  measures, and ``eval_raw_*`` with ``load_best_model_at_end`` (the raw weights before a switch point's decision,
  which a checkpoint saved after a switch no longer holds).

The default decay warmup is one epoch: the Trainer's optimizer steps per epoch, with or without ``max_steps``.
"""

from __future__ import annotations

from transformers import Trainer, TrainerState, TrainingArguments
from transformers.utils import logging

from . import evaluation, schedule
from .config import SEMAConfig
from .horizon import ResolvedHorizon, switch_interval_steps

logger = logging.get_logger(__name__)


def check_run_settings(
    config: SEMAConfig,
    args: TrainingArguments,
    trainer: Trainer | None,
    steps_per_epoch: int | None,
    state: TrainerState,
) -> int:
    """Refuse what this run cannot do with ``config`` (``ValueError``/``RuntimeError`` naming it); return the
    length of the decay warmup in optimizer steps."""
    if steps_per_epoch is None:
        if config.warmup != "none" and config.warmup_steps is None:
            raise ValueError(
                "SEMA's decay warmup defaults to one epoch, but the training data has no length (an IterableDataset), "
                "so an epoch has no length either: set warmup_steps (optimizer steps) or warmup='none'."
            )
        if config.switch and config.switch_every_steps is None:
            raise ValueError(
                "SEMA switches at epoch ends by default, but the training data has no length (an IterableDataset): "
                "the Trainer never sees a whole epoch end. Set switch_every_steps, or switch=False for plain EMA."
            )
        warmup_steps = config.warmup_steps or 0
    else:
        warmup_steps = schedule.resolve_warmup_steps(config.warmup_steps, steps_per_epoch)
    if (config.evaluate_with == "both" or config.switch_policy == "if_better") and trainer is None:
        raise RuntimeError(
            f"SEMACallback(evaluate_with={config.evaluate_with!r}, switch_policy={config.switch_policy!r}) needs the "
            "Trainer to run the evaluation of the average: call callback.set_trainer(trainer) before trainer.train()."
        )
    if config.switch_policy == "if_better":
        _check_if_better(config, args, trainer, steps_per_epoch, state)
    if config.posthoc_select is not None:
        _check_posthoc_select(config, trainer)
    _check_metric_for_best_model(config, args)
    if args.save_only_model:
        logger.info(
            "SEMA: save_only_model=True: checkpoints still get the EMA files (load_best_model_at_end restores the "
            "average of the best checkpoint from them), but without optimizer state they cannot resume training."
        )
    return warmup_steps


def _option(value: object) -> str:
    """A `TrainingArguments` choice as its string: the enum's value (``IntervalStrategy.EPOCH`` -> "epoch")."""
    return str(getattr(value, "value", value))


def evaluates_at_every_switch_point(
    config: SEMAConfig, args: TrainingArguments, state: TrainerState | None = None
) -> bool:
    """Whether the Trainer's evaluation schedule lands on every switch point, as ``switch_policy="if_better"``
    needs: ``eval_strategy="epoch"`` for epoch switches, ``"steps"`` with ``eval_steps`` dividing
    ``switch_every_steps`` for step switches (a ratio ``eval_steps < 1`` as the Trainer resolves it,
    ``state.eval_steps``, when ``state`` is given), and no ``eval_delay`` past the first switch point. (Whether
    there is an eval set is the caller's to check.)"""
    strategy = _option(args.eval_strategy)
    delay = args.eval_delay or 0
    if config.switch_every_steps is None:
        return strategy == "epoch" and delay <= first_epoch_switch(config)
    eval_steps = state.eval_steps if state is not None and state.eval_steps else args.eval_steps
    if isinstance(eval_steps, float) and eval_steps.is_integer():
        eval_steps = int(eval_steps)
    return (
        strategy == "steps"
        and isinstance(eval_steps, int)
        and eval_steps > 0
        and config.switch_every_steps % eval_steps == 0
        and delay <= first_step_switch(config)
    )


def first_epoch_switch(config: SEMAConfig) -> int:
    """The number of completed epochs at the first epoch switch point."""
    every = config.switch_every_epochs
    return (config.switch_start_epoch // every + 1) * every


def first_step_switch(config: SEMAConfig) -> int:
    """The optimizer step of the first step-counted switch point."""
    every = config.switch_every_steps or 1
    return (config.update_after_step // every + 1) * every


def _check_metric_for_best_model(config: SEMAConfig, args: TrainingArguments) -> None:
    named = evaluation.sema_metric_named(args.metric_for_best_model)
    if named is None:
        return
    if not (config.evaluate_with == "both" or config.switch_policy == "if_better"):
        raise ValueError(
            f"metric_for_best_model = {args.metric_for_best_model!r} names a number SEMA measures only with "
            f"evaluate_with='both' or switch_policy='if_better' (here evaluate_with={config.evaluate_with!r}, "
            f"switch_policy={config.switch_policy!r}). With evaluate_with='ema' the Trainer's eval_* numbers are "
            "already the average's: use the plain name (e.g. 'eval_loss')."
        )
    if named.startswith(evaluation.RAW_PREFIX + "_") and args.load_best_model_at_end:
        raise ValueError(
            f"metric_for_best_model = {args.metric_for_best_model!r} measures the raw weights before a switch "
            "point's decision, which a checkpoint saved after a switch no longer holds, so load_best_model_at_end "
            "could not end on the weights that scored best. Use the plain name (the weights each checkpoint holds) "
            "or the eval_ema_ one (the average each checkpoint holds)."
        )


def _check_if_better(
    config: SEMAConfig,
    args: TrainingArguments,
    trainer: Trainer | None,
    steps_per_epoch: int | None,
    state: TrainerState | None = None,
) -> None:
    assert trainer is not None
    if trainer.eval_dataset is None:
        raise ValueError("SEMA(switch_policy='if_better') compares raw and EMA weights on the eval set: give one.")
    evaluation.metric_keys(args.metric_for_best_model, trainer.eval_dataset)  # raises for an ambiguous dict
    if not config.switch:
        return
    if not evaluates_at_every_switch_point(config, args, state):
        strategy = _option(args.eval_strategy)
        interval = switch_interval_steps(config, steps_per_epoch)
        eval_steps = state.eval_steps if state is not None and state.eval_steps else args.eval_steps
        delay = f", eval_delay={args.eval_delay}" if args.eval_delay else ""
        raise ValueError(
            f"SEMA(switch_policy='if_better') decides each switch on an evaluation of both weight sets, and the "
            f"Trainer's evaluation right after it must see the weights kept, but eval_strategy={strategy!r} "
            f"(eval_steps={eval_steps}{delay}) does not evaluate at every switch point (every {interval} optimizer "
            "steps): use eval_strategy='epoch' for epoch switches, or eval_steps dividing switch_every_steps, and "
            "no eval_delay past the first switch point."
        )


def _check_posthoc_select(config: SEMAConfig, trainer: Trainer | None) -> None:
    """``posthoc_select`` scores its candidates with SEMA's own passes over the Trainer's eval set, at the end of
    ``train()``: refuse at the start what would make it fail after the whole run."""
    select = config.posthoc_select
    if trainer is None:
        raise RuntimeError(
            f"SEMACallback(posthoc_select={select!r}) evaluates the candidates through the Trainer's evaluation loop, "
            "but the Trainer running it is unknown: call callback.set_trainer(trainer) before trainer.train()."
        )
    sets = trainer.eval_dataset
    if sets is None:
        raise ValueError(
            f"SEMAConfig.posthoc_select = {select!r} chooses the average on the eval set at the end of train(), but "
            "the Trainer has no eval_dataset: pass eval_dataset= (held-out data, not the training set) to the Trainer."
        )
    key = evaluation.plain_metric(select)
    if isinstance(sets, dict) and not any(key.startswith(f"eval_{name}_") for name in sets):
        raise ValueError(
            f"SEMAConfig.posthoc_select = {select!r}: with several eval sets {sorted(sets)} it must name the one to "
            f"choose on, e.g. 'eval_{next(iter(sets))}_loss'."
        )


def describe_settings(
    config: SEMAConfig, resolved: ResolvedHorizon, warmup_steps: int, engine: str, local_numel: int
) -> str:
    """One line with every resolved setting a user should check before a long run."""
    epochs = resolved.horizon_epochs
    horizon = f"{resolved.horizon_steps:.4g} optimizer steps" + ("" if epochs is None else f" = {epochs:.3g} epochs")
    if not config.switch:
        mode = "plain EMA (no switch)"
    elif config.switch_every_steps is not None:
        mode = f"Switch EMA every {config.switch_every_steps} optimizer steps"
    else:
        mode = f"Switch EMA every {config.switch_every_epochs} epoch(s) from epoch {config.switch_start_epoch + 1}"
    warmup = (
        "no warmup"
        if config.warmup == "none" or warmup_steps == 0
        else (f"{config.warmup} warmup over {warmup_steps} steps (ratio {config.warmup_ratio})")
    )
    return (
        f"SEMA: {mode}, switch_policy={config.switch_policy}; decay {resolved.decay:.6g} (horizon {horizon}, set "
        f"by {config.horizon_unit}); {warmup}; update every {config.update_every} step(s) after step "
        f"{config.update_after_step}; evaluate with {config.evaluate_with}; final weights {config.final_weights}; "
        f"engine {engine}: {local_numel:,} averaged elements on this rank ({local_numel * 4 / 2**20:.1f} MiB fp32)."
    )
