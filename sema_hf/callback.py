"""`SEMACallback`: Switch EMA as a `transformers.TrainerCallback`. Glue only: the run's state (engine adapter, store,
counters, switch decisions, checkpoint files) is a `sema_hf.SEMA` core, the same object a hand-written accelerate
loop uses; this module translates Trainer events into its calls. The rules live in `schedule` and `horizon`, the
choice of what to restore in `resume`, the Trainer binding in `binding`, the evaluation bookkeeping in `evaluation`.

Where each piece plugs into the Trainer's loop (transformers 5.x)::

    on_train_begin     bind to the Trainer running train(), resolve the horizon, pick the engine adapter, allocate
                       the fp32 average (or restore the one saved with the resumed checkpoint), warn, log settings
    on_optimizer_step  remember whether the optimizer really stepped (fp16 overflow skips a step)
    on_step_end        after global_step += 1: update / copy, step-counted switch point, then, when
                       DefaultFlowCallback (which runs before us) asked for an evaluation, begin the evaluation
                       round (`evaluation.EvaluationRound`): swap the average in (evaluate_with="ema"), or measure
                       the average with SEMA's own pass ("both", "if_better")
    on_epoch_end       epoch switch point, then the same. A guarded switch point ("if_better", or "both" before an
                       evaluation) measures the raw weights and the average with SEMA's own passes through the
                       evaluation loop and decides there, before the Trainer's evaluation and checkpoint: so the
                       Trainer's eval_* describe the weights the checkpoint holds (`evaluation` has the contract)
    on_log             the Trainer's dict of this round gets the key of SEMA's metric_for_best_model names
    on_evaluate        after the last eval set: swap the raw weights back (before any checkpoint); under
                       save_strategy="best", when the metric is a new best, write the average as above
    on_step_end /      last, when DefaultFlowCallback asked for a save: write the average into checkpoint-N
    on_epoch_end       before the Trainer's own files, so that rotation (save_total_limit, before any on_save) and
                       Hub uploads see it complete (`SEMATrainer` does it in _save_checkpoint)
    on_save            write the average next to the checkpoint the Trainer just wrote, unless written above
                       (a save that a callback after this one requested)
    on_train_end       leave the average in the model (final_weights="ema") so save_model/push_to_hub write it;
                       with posthoc_select, after the Trainer's load_best_model_at_end: score the post-hoc grid,
                       the classic EMA and the raw weights (and the best checkpoint's average) with SEMA's own
                       passes, put the best in, log the table, write posthoc_sweep.json / .png (`selection`)
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
from transformers.utils import logging

from . import evaluation, posthoc, schedule, selection
from .binding import TrainerBinding, bind
from .config import SEMAConfig
from .engines import EngineAdapter
from .horizon import ResolvedHorizon, horizon_warnings, optimizer_steps_per_epoch, resolve_horizon
from .landscape_probe import LandscapeProbe
from .preemption import set_aside_incomplete_checkpoints
from .resume import CALLBACK_KEY, checkpoint_id, folder_to_restore
from .sema import SEMA
from .settings import check_run_settings, describe_settings
from .store import EMAStore

logger = logging.get_logger(__name__)

#: The row of a post-hoc selection for the best checkpoint's average (``load_best_model_at_end``).
BEST_CHECKPOINT_EMA = "best_checkpoint_ema"


class SEMACallback(TrainerCallback, ExportableState):
    """Switch EMA for the `transformers.Trainer`: ``Trainer(..., callbacks=[SEMACallback(horizon_epochs=0.3)])``.

    Keeps an fp32 exponential moving average of the trainable weights, updated once per optimizer step, and copies
    it into the model at the end of every epoch (or every ``switch_every_steps`` steps); evaluation during training
    uses the average; checkpoints hold the raw weights plus the average, and resuming restores both. Under DeepSpeed
    ZeRO and FSDP each rank averages only its own shard of the fp32 master weights. One callback object may serve
    several Trainers in turn: it binds to the Trainer running ``train()`` at every train start.

    Args:
        config: a `SEMAConfig`; omitted, the defaults.
        landscape: a `LandscapeProbe`: at each switch, just before it, measure loss and sharpness (and flatness) of
            the raw and the EMA weights and log them (``landscape_raw_*``, ``landscape_ema_*``). Single-process
            models only (one process or DDP).
        **overrides: any `SEMAConfig` field, e.g. ``SEMACallback(horizon_epochs=0.5, switch_every_epochs=2)``.

    Metrics logged through the Trainer (so TensorBoard, W&B... see them), each in SEMA's own log entry, never in
    the dict ``evaluate()`` returns (`sema_hf.evaluation` has the contract): ``ema_decay`` (the decay of the last
    update, at each logging step), ``ema_switches`` (switches so far, at each switch), ``ema_switched`` (1 when a
    switch point copied the average in, 0 when ``switch_policy="if_better"`` kept the raw weights),
    ``eval_uses_ema`` (before each evaluation of the Trainer's: 1 when its ``eval_*`` numbers are the average's,
    0 when they are the raw weights'), and with ``evaluate_with="both"`` or ``switch_policy="if_better"``:
    ``eval_ema_*`` (the average) before every evaluation and ``eval_raw_*`` (the raw weights before the decision) at
    every switch point. Then ``eval_*`` are the numbers of the weights the model holds after the switch point's
    decision, which the checkpoint saved next holds: what ``load_best_model_at_end``, ``EarlyStoppingCallback``
    and a search objective rank.

    Post-hoc selection (``posthoc_select="eval_loss"`` with ``posthoc_every_steps``): when ``train()`` ends, SEMA
    scores every candidate on the eval set with its own passes through the Trainer's evaluation loop (no
    ``evaluate()``, no ``on_evaluate``, no ``eval_*`` log entry): the post-hoc averages of ``posthoc_grid``, the
    classic EMA and the raw weights. The best goes into the model, so ``save_model()`` and ``push_to_hub()`` write
    it; the table is logged (``posthoc_<metric>/<candidate>``, ``posthoc_<metric>/chosen``), written to
    ``output_dir/posthoc_sweep.json`` and ``.png``, kept as `posthoc_sweep` and described in `SEMATrainer`'s model
    card. Order: the Trainer's ``load_best_model_at_end`` runs first (transformers loads the best checkpoint before
    any callback hears that training ended), so the best checkpoint competes: its raw weights are the ``raw``
    candidate, and its average is ``best_checkpoint_ema`` when its metric measured the average. The selection then
    decides alone: ``final_weights`` must stay ``"ema"`` and ``switch_policy="if_better"`` makes no end decision
    (the raw weights and the classic EMA are candidates). Ties go to the raw weights, then the classic EMA.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SEMACallback:
        # restore_callback_states_from_checkpoint=True: the Trainer rebuilds each stateful callback with
        # type(callback)(**state["args"]) and drops the original. The user's object (with its landscape probe and
        # binding) stays the one that trains: "rebuilding" it returns the object itself, untouched.
        original = _callback_being_restored(cls)
        if original is not None:
            original._restored_by_trainer = True
            return original
        return super().__new__(cls)

    def __init__(
        self, config: SEMAConfig | None = None, *, landscape: LandscapeProbe | None = None, **overrides: Any
    ) -> None:
        if getattr(self, "_restored_by_trainer", False):
            self._restored_by_trainer = False  # the Trainer's rebuild of this very object: keep it as it is
            return
        base = config if config is not None else SEMAConfig()
        self.config: SEMAConfig = base.replace(**overrides) if overrides else base
        self.landscape = landscape
        self._explicit_trainer: Trainer | None = None
        self._handed_over: TrainerBinding | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Everything that belongs to one ``train()`` call: the core (made at train begin; its run id goes into
        checkpoint identities: the process that writes a checkpoint's ``trainer_state.json`` also writes its
        ``sema_state.json``, so both carry it) and the Trainer-side bookkeeping."""
        self.core: SEMA | None = None
        # Which weights the model holds after train() ("ema", "model", or "posthoc" for a post-hoc average chosen by
        # posthoc_select), so what save_model() writes; None before.
        self.final_weights_held: str | None = None
        self._binding = TrainerBinding(None)
        self._args: TrainingArguments | None = None
        self._trainer_state: TrainerState | None = None
        self._stepped = False
        self._training = False
        self._round = evaluation.EvaluationRound()
        # SEMA's measurements at a switch point (global step, eval_raw_* and eval_ema_*), for the evaluation the
        # Trainer may run right after it.
        self._measured: tuple[int | None, dict[str, float]] = (None, {})
        self._sema_metric: str | None = None  # a key of SEMA's (eval_ema_*) that metric_for_best_model names
        # (folder, counters) of the EMA written last: on_save skips a folder written earlier in the same step.
        self._saved: tuple[str, dict[str, Any]] | None = None

    # ---- the core's state, read through the callback -------------------------------------------------------------
    @property
    def engine(self) -> EngineAdapter | None:
        """The engine adapter of the current (or last) run; None before training."""
        return None if self.core is None else self.core.engine

    @property
    def store(self) -> EMAStore | None:
        """The fp32 averages of the current (or last) run; None before training."""
        return None if self.core is None else self.core.store

    @property
    def resolved(self) -> ResolvedHorizon | None:
        """The decay and horizon resolved at train start; None before."""
        return None if self.core is None else self.core.resolved

    @property
    def num_updates(self) -> int:
        return 0 if self.core is None else self.core.num_updates

    @property
    def num_switches(self) -> int:
        return 0 if self.core is None else self.core.num_switches

    @property
    def last_decay(self) -> float | None:
        return None if self.core is None else self.core.last_decay

    @property
    def last_switch_decision(self) -> bool | None:
        return None if self.core is None else self.core.last_switch_decision

    @property
    def posthoc_sweep(self) -> selection.PosthocSweep | None:
        """The table of the post-hoc selection at the end of the last ``train()`` (``posthoc_select``); None
        before or without one. ``.chosen`` is the label of the weights the model holds."""
        return None if self.core is None else self.core.last_posthoc_sweep

    @property
    def _warmup_steps(self) -> int:
        return 0 if self.core is None else self.core.warmup_steps

    @property
    def _steps_since_decision(self) -> int:
        return 0 if self.core is None else self.core.steps_since_decision

    # ---- public API -------------------------------------------------------------------------------------------
    def set_trainer(self, trainer: Trainer) -> None:
        """Bind the Trainer explicitly. It is otherwise found when ``train()`` starts; when both are known they must
        be the same Trainer."""
        self._explicit_trainer = trainer

    def hand_over(self, binding: TrainerBinding | None) -> None:
        """Called by `sema_hf.SEMATrainer`'s training loop before it starts (and with None after it): the Trainer,
        resume folder, trial and ``ignore_keys_for_eval`` of this ``train()`` call, so nothing is guessed."""
        self._handed_over = binding

    def evaluation_failed(self) -> None:
        """Called by `sema_hf.SEMATrainer` when ``evaluate()`` raised: put the raw weights back now."""
        self._round.reset()

    @property
    def trainer(self) -> Trainer | None:
        """The Trainer of the current (or last) ``train()`` call."""
        return self._binding.trainer

    @property
    def decay(self) -> float | None:
        """The per-step decay: resolved from ``horizon_epochs`` at train start; None before when it depends on the
        run."""
        if self.resolved is not None:
            return self.resolved.decay
        if self.config.decay is None and self.config.horizon_steps is None:
            return None  # horizon_epochs, given or the default
        return resolve_horizon(self.config, None).decay

    @property
    def local_numel(self) -> int:
        """Elements of fp32 average held by this process: all trainable elements in one process or DDP, this
        rank's shard (about total / world size) under FSDP and DeepSpeed ZeRO."""
        return self._require_core().local_numel

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The full EMA weights keyed like ``model.state_dict()`` (each averaged tensor once, under its first name
        for tied weights), as fp32 copies. Sharded engines gather tensor by tensor; every rank must call this, and
        every rank receives the full dict."""
        return self._require_core().ema_state_dict()

    def swapped_in(self):
        """Context manager: inside, the model's forward reads the EMA weights; the raw weights always come back.
        Every rank must enter it (`SEMA.swapped_in`: under ``shard_under_ddp`` and ZeRO-1/2 it gathers)."""
        return self._require_core().swapped_in()

    def state(self) -> dict[str, Any]:
        """`ExportableState`: the Trainer records this in ``trainer_state.json`` with every checkpoint; resuming
        checks that the EMA beside the checkpoint carries the same ``checkpoint_id``."""
        step = self._trainer_state.global_step if self._trainer_state is not None else None
        return {
            "args": self.config.to_dict(),
            "attributes": {
                "checkpoint_id": checkpoint_id(self.core.run_id, step) if self._training and self.core else None
            },
        }

    # ---- Trainer hooks ----------------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Inside Trainer.__init__, before train() resolves resume_from_checkpoint=True to the newest checkpoint-N:
        # half-written checkpoints of a killed run are set aside here (`sema_hf.preemption`). Every rank gets here.
        set_aside_incomplete_checkpoints(args, require_ema=not self.config.allow_fresh_ema_on_resume)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._round.reset()
        self._reset_run_state()
        self._binding = bind(self, self._explicit_trainer, self._handed_over)
        self._args, self._trainer_state = args, state
        trainer = self._binding.trainer
        if trainer is None:
            logger.warning(
                "SEMA could not identify the Trainer running it (no Trainer listing it on the call stack and no "
                "set_trainer()): its metrics go to state.log_history only."
            )
        else:
            _refuse_a_second_sema_callback(trainer)
        steps_per_epoch = _trainers_steps_per_epoch(trainer, kwargs.get("train_dataloader"), args)
        warmup_steps = check_run_settings(self.config, args, trainer, steps_per_epoch, state)
        self._sema_metric = evaluation.sema_metric_named(args.metric_for_best_model)
        resolved = resolve_horizon(self.config, steps_per_epoch)
        posthoc_dir = os.path.join(self._binding.output_dir(args.output_dir), posthoc.FOLDER_NAME)
        core = SEMA.for_model(
            kwargs["model"], kwargs.get("optimizer"), self.config, resolved, warmup_steps, posthoc_dir=posthoc_dir
        )
        if self.landscape is not None and core.engine.layout().sharded:
            raise ValueError(
                f"SEMACallback(landscape=...) measures single-process models only, but the engine is "
                f"{core.engine.name!r} (sharded); gather the model and call sema_hf.landscape's functions instead, "
                "or pass landscape=None."
            )
        self.core = core
        self.core.global_step = state.global_step
        if state.global_step > 0:
            self._resume(args, state)
            if isinstance(state.stateful_callbacks, dict):
                # A checkpoint written without SEMA records no state of ours; the Trainer's next save updates the
                # entry of every stateful callback and would fail on the missing one (KeyError).
                state.stateful_callbacks.setdefault(CALLBACK_KEY, self.state())
            if schedule.epoch_end_skipped_by_resume(state.epoch, self._steps_since_decision):
                self.on_epoch_end(args, state, control, **kwargs)  # saved before it: run that switch point now
        self._training = True
        for message in horizon_warnings(self.config, self.resolved, state.max_steps, self._warmup_steps):
            logger.warning(f"SEMA: {message}")
            warnings.warn(f"SEMA: {message}", UserWarning, stacklevel=2)
        logger.info(
            describe_settings(self.config, self.resolved, self._warmup_steps, self.engine.name, self.local_numel)
        )
        if args.eval_on_start:
            self._log(self._before_evaluation(control, force=True), state, control)

    def on_step_begin(self, args, state, control, **kwargs):
        self._round.reset()  # training never continues from swapped-in weights

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._stepped = not bool(getattr(kwargs.get("optimizer"), "step_was_skipped", False))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        step = state.global_step
        stepped, self._stepped = self._stepped, False
        self._require_core().advance(step, stepped)
        logs: dict[str, float] = {}
        if control.should_log and self.last_decay is not None:
            logs["ema_decay"] = self.last_decay
        if self.config.switch and schedule.should_switch_at_step(
            step, self.config.switch_every_steps, self.config.update_after_step
        ):
            logs.update(self._switch_point(control, kwargs.get("model")))
        logs.update(self._before_evaluation(control))
        self._log(logs, state, control)
        self._save_before_trainer(state, forced=control.should_save)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        completed = schedule.completed_epochs_at_epoch_end(state.epoch)
        if (
            self.config.switch
            and self.config.switch_every_steps is None
            and completed is not None
            and schedule.should_switch_at_epoch_end(
                completed, self.config.switch_every_epochs, self.config.switch_start_epoch
            )
        ):
            logs = self._switch_point(control, kwargs.get("model"))
        else:
            logs = {}
        logs.update(self._before_evaluation(control))
        self._log(logs, state, control)
        self._save_before_trainer(state, forced=control.should_save)

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs):
        # Trainer.evaluate() logs its metrics dict (this very object) before any callback's on_evaluate: the key of
        # SEMA's that metric_for_best_model names goes in here, so every on_evaluate sees it, in any callback order.
        self._round.add_to_trainer_metrics(logs, self._sema_metric)

    def on_evaluate(self, args, state, control, metrics: dict[str, float] | None = None, **kwargs):
        self._round.add_to_trainer_metrics(metrics, self._sema_metric)  # a Trainer.log() that copied the dict
        self._round.on_evaluate()  # after the last eval set: the raw weights are back before any checkpoint
        if self._training and _trainer_saves_a_new_best(args, state, metrics):
            self._save_before_trainer(state, forced=True)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._round.swapped_in:
            logger.warning("SEMA: a checkpoint was saved while EMA weights were swapped in for evaluation.")
            self._round.reset()
        folder = self.checkpoint_folder(state.global_step)
        if self._written_already(folder):
            return  # written before the Trainer's own save (`_save_before_trainer`, or SEMATrainer)
        self.save_checkpoint(folder, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._round.reset()
        if self.core is None:
            self._training = False
            return
        self._require_core().posthoc_snapshot()  # the last step's post-hoc snapshot (no-op when off)
        if self.config.posthoc_select is not None:
            self._training = False
            self.final_weights_held = self._select_posthoc(args, state, control)
            return
        final = self.config.final_weights
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # The Trainer just loaded the best checkpoint's raw weights; end on the weights its metric measured.
            measured = "both" if self._compares_weights() else self.config.evaluate_with
            final = evaluation.weights_behind_best_metric(measured, args.metric_for_best_model)
            if final == "ema" and not self.core.has_checkpoint(state.best_model_checkpoint):
                message = (
                    f"SEMA: the best checkpoint {state.best_model_checkpoint} holds no EMA files (it was written "
                    "without SEMA, e.g. before a resume with allow_fresh_ema_on_resume=True): the model keeps the "
                    "weights the Trainer loaded from it."
                )
                logger.warning(message)
                warnings.warn(message, UserWarning, stacklevel=2)
                final = "model"
            elif final == "ema":
                self.load_checkpoint(state.best_model_checkpoint)
        elif final == "ema" and self.config.switch_policy == "if_better":
            final = "ema" if self._final_average_wins() else "model"
        self._training = False
        self.final_weights_held = final
        if final == "ema":
            self.core.write_average()
            logger.info("SEMA: the model now holds the EMA weights.")
        else:
            logger.info("SEMA: the model keeps its raw weights (final_weights, if_better or the best checkpoint).")

    def _select_posthoc(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> str:
        """``posthoc_select``: score every candidate with SEMA's own passes over the eval set, put the best into the
        model, log the table, write ``posthoc_sweep.json`` / ``.png``; returns what the model holds.

        It runs after the Trainer's ``load_best_model_at_end`` (which transformers runs before any callback hears
        that training ended), so the best checkpoint is one of the candidates: its raw weights are the ``raw`` row,
        and when its metric measured its average (``evaluate_with="ema"``, or ``eval_ema_*``) that average is the
        ``best_checkpoint_ema`` row. ``final_weights`` is not used (it must be ``"ema"``, the default) and
        ``switch_policy="if_better"`` has no end-of-training decision: the raw weights and the classic EMA are
        candidates of the selection."""
        core = self._require_core()
        trainer = self._require_trainer()
        ignore_keys = self._binding.ignore_keys_for_eval
        key = evaluation.plain_metric(self.config.posthoc_select)
        greater = selection.greater_is_better_for(key, args.metric_for_best_model, args.greater_is_better)
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        texts = {
            selection.RAW: "the raw training weights at the last step",
            selection.EMA: f"the classic EMA at the last step (decay {core.decay:.6g})",
        }
        extra: dict[str, dict[str, torch.Tensor]] = {}
        if best:
            texts[selection.RAW] = f"the best checkpoint's raw weights ({best}), loaded by load_best_model_at_end"
            measured = "both" if self._compares_weights() else self.config.evaluate_with
            if evaluation.weights_behind_best_metric(measured, args.metric_for_best_model) == "ema":
                if core.has_checkpoint(best):
                    extra[BEST_CHECKPOINT_EMA] = core.read_averages(best)
                    texts[BEST_CHECKPOINT_EMA] = (
                        f"the best checkpoint's average ({best}), which its {args.metric_for_best_model or 'loss'} "
                        "measured"
                    )
        only = evaluation.eval_set_named(key, trainer.eval_dataset)  # a dict of sets: only the one chosen on
        sweep = core.posthoc_sweep(
            lambda: evaluation.evaluate_weights(trainer, "eval", ignore_keys, only=only),
            metric=key,
            greater_is_better=greater,
            extra=extra,
            descriptions=texts,
            data=evaluation.describe_eval_data(trainer.eval_dataset, only),
        )
        if sweep.chosen == BEST_CHECKPOINT_EMA:
            core.write_weights(extra[BEST_CHECKPOINT_EMA])
            core.posthoc_chosen, core.final_weights_held = sweep.chosen, "ema"
        else:
            core.finalize(posthoc=sweep)
        extra.clear()
        self._log(sweep.log_values(), state, control)
        logger.info(
            f"SEMA: post-hoc selection on {sweep.data} by {sweep.metric} "
            f"({'higher' if greater else 'lower'} is better) chose {sweep.chosen}:\n{sweep.markdown()}"
        )
        if state.is_world_process_zero:
            sweep.save(args.output_dir)
        return core.final_weights_held or "model"

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_folder(self, global_step: int) -> str:
        """``<output_dir>[/run-K]/checkpoint-<step>``: where the Trainer of this run saves at ``global_step``."""
        base = self._binding.output_dir(self._args.output_dir if self._args is not None else ".")
        return os.path.join(base, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")

    def save_checkpoint_before_trainer(self, run_dir: str, global_step: int) -> None:
        """Called by `EMAFirstCheckpointMixin` just before the Trainer writes ``run_dir/checkpoint-<global_step>``:
        the raw weights come back first (the Trainer must save them, never the swapped-in average), then the EMA."""
        self._round.reset()
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")
        if not self._written_already(folder):
            self.save_checkpoint(folder, global_step)

    def save_checkpoint(self, folder: str, global_step: int) -> None:
        """Write this rank's average and the JSON into ``folder``; every rank must call it."""
        core = self._require_core()
        core.global_step = global_step
        core.save(folder, writer=self._args.should_save if self._args is not None else None)
        self._saved = (folder, core.state_dict())

    def _written_already(self, folder: str) -> bool:
        """Whether ``folder`` holds the EMA as it is now (written earlier in this step, nothing changed since).
        Decided from what this process did, never from the disk: every rank must take the same decision (the
        write is a collective), and without shared storage or ``save_on_each_node`` a rank of another node never
        sees ``sema_state.json``. A save that returned was written on every rank (a failure raises on all)."""
        return self._saved == (folder, self._require_core().state_dict())

    def _save_before_trainer(self, state: TrainerState, forced: bool) -> None:
        """Write the EMA into ``checkpoint-N`` when the Trainer is about to save it: ``forced`` is
        ``control.should_save`` (set by ``DefaultFlowCallback`` before this callback runs) at the end of
        ``on_step_end`` / ``on_epoch_end``, after their switch point, or, under ``save_strategy="best"``, a new best
        metric in ``on_evaluate`` (`_trainer_saves_a_new_best`). Nothing SEMA keeps changes between there and the
        Trainer's save (the evaluation in between only swaps the average in and out). So the EMA is on disk before
        the Trainer writes its files and rotates older checkpoints away (``save_total_limit``), which happens
        before any ``on_save``: a kill between the two saves leaves the older checkpoint in place (the newest has
        no ``trainer_state.json``) or a complete newest one, never a newest checkpoint without its EMA and no
        older one. `SEMATrainer` writes it in ``_save_checkpoint`` instead (which also covers the checkpoint
        transformers writes on SIGTERM); a save requested by a callback after this one is written in ``on_save``."""
        if not (forced and self._training) or self.core is None:
            return
        if getattr(self._binding.trainer, "sema_saves_ema_first", False):
            return  # SEMATrainer writes it in _save_checkpoint
        folder = self.checkpoint_folder(state.global_step)
        if not self._written_already(folder):
            self.save_checkpoint(folder, state.global_step)

    def load_checkpoint(self, folder: str) -> dict[str, Any]:
        """Restore the average and counters saved in ``folder``; raises if absent or not matching this model (on
        every rank, when any rank cannot: the others would otherwise wait in the next collective)."""
        return self._require_core().load(folder, allow_fresh=False)

    # ---- internals --------------------------------------------------------------------------------------------
    def _require_core(self) -> SEMA:
        if self.core is None:
            raise RuntimeError("SEMACallback has no EMA yet: it is created when training starts (on_train_begin).")
        return self.core

    def _compares_weights(self) -> bool:
        """Whether evaluations read the raw weights and then the average (``eval_*`` and ``eval_ema_*``)."""
        return self.config.evaluate_with == "both" or self.config.switch_policy == "if_better"

    def _switch_point(self, control: TrainerControl, model: torch.nn.Module | None) -> dict:
        """At a switch point: switch now; a guarded one (``if_better``, or ``evaluate_with="both"`` before an
        evaluation) first measures the raw weights and the average with SEMA's own passes and decides on them,
        before the Trainer's evaluation and checkpoint, which then see the weights kept."""
        if not (self.config.switch_policy == "if_better" or (self._compares_weights() and control.should_evaluate)):
            return self._switch(model, better=True)
        trainer = self._require_trainer()
        ignore_keys = self._binding.ignore_keys_for_eval
        measured = evaluation.evaluate_weights(trainer, evaluation.RAW_PREFIX, ignore_keys)
        swap = self._require_core().swapped_in
        measured.update(evaluation.evaluate_weights(trainer, evaluation.EMA_PREFIX, ignore_keys, swap))
        better = self._average_wins(measured)
        self._measured = (self._trainer_state.global_step if self._trainer_state is not None else None, measured)
        return {**measured, **self._switch(model, better=better)}

    def _switch(self, model: torch.nn.Module | None, better: bool) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self.landscape is not None:  # measured before the switch: afterwards raw and EMA weights are the same
            if model is None:
                raise RuntimeError("SEMACallback(landscape=...) needs the model in the hook's keyword arguments")
            logs = self.landscape.measure(model, self._require_core().swapped_in)
        logs.update(self._require_core().decide_switch(better))
        return logs

    def _require_trainer(self) -> Trainer:
        trainer = self._binding.trainer
        if trainer is None:
            raise RuntimeError("SEMA needs the Trainer to evaluate the average: call callback.set_trainer(trainer).")
        return trainer

    def _average_wins(self, measured: dict[str, float]) -> bool:
        """The switch decision on SEMA's measurements of both weight sets (``eval_raw_*``, ``eval_ema_*``):
        always True under switch_policy="always"."""
        if self.config.switch_policy != "if_better":
            return True
        args = self._args
        assert args is not None
        raw_key, ema_key = evaluation.metric_keys(args.metric_for_best_model, self._require_trainer().eval_dataset)
        missing = [k for k in (raw_key, ema_key) if k not in measured]
        if missing:
            raise KeyError(
                f"SEMA(switch_policy='if_better') compares {raw_key} with {ema_key}, but the evaluation returned no "
                f"{missing}; available: {sorted(measured)}. Set metric_for_best_model to one of them."
            )
        greater = bool(args.greater_is_better) if args.metric_for_best_model else False
        return evaluation.average_is_better(measured[raw_key], measured[ema_key], greater)

    def _final_average_wins(self) -> bool:
        """if_better at train end: reuse the last switch point's decision when no step followed it, else measure
        both weight sets (SEMA's own passes: no evaluation is logged, no callback hears of it)."""
        if self._steps_since_decision == 0 and self.last_switch_decision is not None:
            return self.last_switch_decision
        trainer = self._require_trainer()
        ignore_keys = self._binding.ignore_keys_for_eval
        measured = evaluation.evaluate_weights(trainer, evaluation.RAW_PREFIX, ignore_keys)
        measured.update(
            evaluation.evaluate_weights(trainer, evaluation.EMA_PREFIX, ignore_keys, self._require_core().swapped_in)
        )
        return self._average_wins(measured)

    def _before_evaluation(self, control: TrainerControl, force: bool = False) -> dict[str, float]:
        """When the Trainer is about to evaluate (no hook fires before evaluation itself): begin the round, with
        the average swapped in if the evaluation is to read it, or SEMA's numbers measured first (``"both"``,
        ``"if_better"``). Returns what to log: those numbers and ``eval_uses_ema``."""
        if not (control.should_evaluate or force) or not self._training:
            return {}
        trainer = self._binding.trainer
        core = self._require_core()
        step = self._trainer_state.global_step if self._trainer_state is not None else None
        logs: dict[str, float] = {}
        measured: dict[str, float] = {}
        if self._compares_weights() and trainer is not None:
            at, measured = self._measured
            if at != step or not measured:  # no switch point measured both weight sets at this step
                measured = evaluation.evaluate_weights(
                    trainer, evaluation.EMA_PREFIX, self._binding.ignore_keys_for_eval, core.swapped_in
                )
                logs.update(measured)
            uses_ema = at == step and bool(self.last_switch_decision) and self._steps_since_decision == 0
        else:
            uses_ema = self.config.evaluate_with == "ema"
        self._measured = (None, {})
        self._round.begin(
            trainer.eval_dataset if trainer is not None else None,
            core.swapped_in if uses_ema and not self._compares_weights() else None,
            measured,
        )
        logs["eval_uses_ema"] = float(uses_ema)
        return logs

    def _log(self, logs: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        if not logs:
            return
        trainer = self._binding.trainer
        if trainer is not None:
            # Trainer.log clears control.should_log; keep the Trainer's own pending log (loss, lr) alive.
            pending = control.should_log
            trainer.log(logs)
            control.should_log = pending
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        resumed_from = self._binding.resume_from_checkpoint
        if resumed_from is None and not self._binding.found_on_stack and isinstance(args.resume_from_checkpoint, str):
            resumed_from = args.resume_from_checkpoint
        folder = folder_to_restore(
            resumed_from,
            self.checkpoint_folder(state.global_step),
            state.global_step,
            state.stateful_callbacks,
            self.config.allow_fresh_ema_on_resume,
        )
        if folder is None:
            logger.warning("SEMA: no EMA state to restore; starting a fresh average from the restored weights.")
            return
        self.load_checkpoint(folder)
        logger.info(f"SEMA: restored the EMA from {folder} (step {state.global_step}, {self.num_switches} switches).")


def _callback_being_restored(cls: type) -> SEMACallback | None:
    """The callback the Trainer's ``_load_callback_state`` is rebuilding with ``cls(**args)`` right now (its frame
    holds the original as ``callback``), or None for any other construction."""
    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        if caller is None:
            return None
        local = caller.f_locals
        original = local.get("callback")
        if isinstance(original, cls) and isinstance(local.get("self"), Trainer) and "callback_data" in local:
            return original
        return None
    finally:
        del frame


def _refuse_a_second_sema_callback(trainer: Trainer) -> None:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SEMACallback)]
    if len(found) > 1:
        raise RuntimeError(
            f"This Trainer has {len(found)} SEMACallbacks; one Trainer takes one: they would write the same EMA "
            "files into every checkpoint and switch the same weights. Keep one (trainer.remove_callback(...))."
        )


def _trainer_saves_a_new_best(args: TrainingArguments, state: TrainerState, metrics: dict[str, float] | None) -> bool:
    """Whether the Trainer saves right after this evaluation under ``save_strategy="best"``: its metric beats
    ``state.best_metric``, which ``Trainer._determine_best_metric`` (transformers 5.x) updates only after every
    ``on_evaluate``, by the same rule (``eval_`` prefix added, strict comparison against -inf / inf when there is
    no best yet, so a NaN is never a new best)."""
    if args.save_strategy != "best" or not metrics or args.metric_for_best_model is None:
        return False
    key = selection.eval_key(args.metric_for_best_model)
    if key not in metrics:
        return False  # another eval set of a dict eval_dataset; the Trainer raises if no set has it
    best = state.best_metric
    if best is None:
        best = float("-inf") if args.greater_is_better else float("inf")
    return bool(metrics[key] > best if args.greater_is_better else metrics[key] < best)  # NaN: never


def _trainers_steps_per_epoch(trainer: Trainer | None, loader: Any, args: TrainingArguments) -> int | None:
    """Optimizer steps per epoch as the Trainer counts them: under sequence parallelism (``sp_size > 1``) each
    rank's loader yields 1/sp_size of the batches of a step, and the Trainer multiplies them back."""
    batches = len(loader) if loader is not None and has_length(loader) else None
    if batches is not None and trainer is not None:
        get_sp_size = getattr(trainer, "get_sp_size", None)
        sp_size = get_sp_size() if callable(get_sp_size) else 1
        batches *= sp_size if isinstance(sp_size, int) and sp_size > 1 else 1
    return optimizer_steps_per_epoch(batches, args.gradient_accumulation_steps)
