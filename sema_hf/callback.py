"""`SEMACallback`: Switch EMA as a `transformers.TrainerCallback`. Glue only: the rules live in `schedule`, the
averages in `store`, the engine specifics in `engines`, the files in `checkpoint`.

Where each piece plugs into the Trainer's loop (transformers 5.x)::

    on_train_begin     pick the engine adapter, allocate the fp32 average (or restore it when resuming)
    on_optimizer_step  remember whether the optimizer really stepped (fp16 overflow skips a step)
    on_step_end        after global_step += 1: update / copy, step-counted switch, swap the average in when
                       DefaultFlowCallback (which runs before us) asked for an evaluation
    on_epoch_end       epoch switch (before the epoch-end evaluation and checkpoint, so both see the switch)
    on_evaluate        swap the raw weights back (before any checkpoint), or evaluate the average too ("both")
    on_save            write the average next to the checkpoint the Trainer just wrote
    on_train_end       leave the average in the model (final_weights="ema") so save_model/push_to_hub write it
"""

from __future__ import annotations

import inspect
import os
from contextlib import ExitStack
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from . import schedule
from .checkpoint import has_ema_checkpoint, load_ema_checkpoint, save_ema_checkpoint
from .config import SEMAConfig
from .engines import EngineAdapter, detect_engine
from .landscape_probe import LandscapeProbe
from .store import EMAStore

logger = logging.get_logger(__name__)


class SEMACallback(TrainerCallback):
    """Switch EMA for the `transformers.Trainer`: ``Trainer(..., callbacks=[SEMACallback(decay=0.999)])``.

    Keeps an fp32 exponential moving average of the trainable weights, updated once per optimizer step, and copies
    it into the model at the end of every epoch (or every ``switch_every_steps`` steps); evaluation during training
    uses the average; checkpoints hold the raw weights plus the average, and resuming restores both. Under DeepSpeed
    ZeRO and FSDP each rank averages only its own shard of the fp32 master weights.

    Args:
        config: a `SEMAConfig`; omitted, the defaults.
        landscape: a `LandscapeProbe`: at each switch, just before it, measure loss and sharpness (and flatness) of
            the raw and the EMA weights and log them (``landscape_raw_*``, ``landscape_ema_*``). Single-process
            models only (one process or DDP).
        **overrides: any `SEMAConfig` field, e.g. ``SEMACallback(decay=0.9999, switch_every_epochs=2)``.

    Metrics logged through the Trainer (so TensorBoard, W&B... see them): ``ema_decay`` (the decay of the last
    update, at each logging step) and ``ema_switches`` (the number of switches so far, at each switch); with
    ``evaluate_with="both"``, ``eval_ema_*`` next to ``eval_*``.
    """

    def __init__(
        self, config: SEMAConfig | None = None, *, landscape: LandscapeProbe | None = None, **overrides: Any
    ) -> None:
        base = config if config is not None else SEMAConfig()
        self.config: SEMAConfig = base.replace(**overrides) if overrides else base
        self.landscape = landscape
        self.engine: EngineAdapter | None = None
        self.store: EMAStore | None = None
        self.num_updates = 0
        self.num_switches = 0
        self.last_decay: float | None = None
        self._warmup_steps = 0
        self._trainer: Trainer | None = None
        self._resume_hint: str | None = None
        self._swap: ExitStack | None = None
        self._stepped = False
        self._training = False
        self._evaluating_ema = False

    # ---- public API -------------------------------------------------------------------------------------------
    def set_trainer(self, trainer: Trainer) -> None:
        """Bind the Trainer explicitly (it is otherwise found when training starts). Needed for logging through the
        Trainer and for ``evaluate_with="both"``."""
        self._trainer = trainer

    @property
    def local_numel(self) -> int:
        """Elements of fp32 average held by this process: all trainable elements in one process or DDP, this
        rank's shard (about total / world size) under FSDP and DeepSpeed ZeRO."""
        return self._require_store().local_numel

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The full EMA weights keyed like ``model.state_dict()`` (each averaged tensor once, under its first name
        for tied weights), as fp32 copies. Sharded engines gather tensor by tensor; every rank must call this, and
        every rank receives the full dict."""
        store = self._require_store()
        assert self.engine is not None
        return self.engine.full_state_dict(store.state_dict())

    def swapped_in(self):
        """Context manager: inside, the model's forward reads the EMA weights; the raw weights always come back."""
        return self._require_store().swapped_in()

    # ---- Trainer hooks ----------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._trainer is None:
            self._trainer, self._resume_hint = _find_calling_trainer()
        if self.config.evaluate_with == "both" and self._trainer is None:
            raise RuntimeError(
                "SEMACallback(evaluate_with='both') needs the Trainer to run the second evaluation: call "
                "callback.set_trainer(trainer) before trainer.train()."
            )
        self.engine = detect_engine(kwargs["model"], kwargs.get("optimizer"), self.config.include_buffers)
        if self.landscape is not None and self.engine.layout().sharded:
            raise ValueError(
                f"SEMACallback(landscape=...) measures single-process models only, but the engine is "
                f"{self.engine.name!r} (sharded); gather the model and call sema_hf.landscape's functions instead, "
                "or pass landscape=None."
            )
        self.store = EMAStore(self.engine.slots(), after_write=self.engine.after_write)
        self._warmup_steps = schedule.resolve_warmup_steps(
            self.config.warmup_steps, state.max_steps, state.num_train_epochs
        )
        self.num_updates = self.num_switches = 0
        self.last_decay = None
        if state.global_step > 0:
            self._resume(args, state)
        self._training = True
        logger.info(
            f"SEMA: averaging {self.store.local_numel:,} elements on this process "
            f"({self.store.local_numel * 4 / 2**20:.1f} MiB fp32, engine {self.engine.name}), decay {self.config.decay}, "
            f"warmup {self.config.warmup} over {self._warmup_steps} steps"
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self._swap_out()  # training never continues from swapped-in weights

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._stepped = not bool(getattr(kwargs.get("optimizer"), "step_was_skipped", False))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        store = self._require_store()
        step = state.global_step
        if self._stepped:
            self._stepped = False
            self._average(store, step)
        logs: dict[str, float] = {}
        if control.should_log and self.last_decay is not None:
            logs["ema_decay"] = self.last_decay
        if self.config.switch and schedule.should_switch_at_step(
            step, self.config.switch_every_steps, self.config.update_after_step
        ):
            logs.update(self._switch(store, kwargs.get("model")))
        self._log(logs, state, control)
        self._prepare_evaluation(control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        store = self._require_store()
        completed = schedule.completed_epochs_at_epoch_end(state.epoch)
        if (
            self.config.switch
            and self.config.switch_every_steps is None
            and completed is not None
            and schedule.should_switch_at_epoch_end(
                completed, self.config.switch_every_epochs, self.config.switch_start_epoch
            )
        ):
            self._log(self._switch(store, kwargs.get("model")), state, control)
        self._prepare_evaluation(control)

    def on_evaluate(self, args, state, control, metrics: dict[str, float] | None = None, **kwargs):
        if self._evaluating_ema:
            return
        self._swap_out()
        if self.config.evaluate_with == "both" and self._training and self.store is not None:
            assert self._trainer is not None
            self._evaluating_ema = True
            try:
                with self.store.swapped_in():
                    ema_metrics = self._trainer.evaluate(metric_key_prefix="eval_ema")
            finally:
                self._evaluating_ema = False
            if metrics is not None:
                # The Trainer returns this very dict: merged, eval_ema_* can drive metric_for_best_model.
                metrics.update(ema_metrics)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._swap is not None:
            logger.warning("SEMA: a checkpoint was saved while EMA weights were swapped in for evaluation.")
            self._swap_out()
        folder = os.path.join(self._output_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.save_checkpoint(folder, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._swap_out()
        self._training = False
        if self.store is None or self.config.final_weights != "ema":
            return
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # The Trainer just loaded the best checkpoint's raw weights; its average is what scored best.
            self.load_checkpoint(state.best_model_checkpoint)
        self.store.switch()
        logger.info("SEMA: the model now holds the EMA weights (final_weights='ema').")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str, global_step: int) -> None:
        """Write this rank's average and (rank 0) the JSON into ``folder``; every rank must call it."""
        store = self._require_store()
        assert self.engine is not None
        meta = {
            "global_step": global_step,
            "num_updates": self.num_updates,
            "num_switches": self.num_switches,
            "last_decay": self.last_decay,
            "config": self.config.to_dict(),
        }
        save_ema_checkpoint(folder, store.state_dict(), self.engine.layout(), meta, barrier=_barrier)

    def load_checkpoint(self, folder: str) -> dict[str, Any]:
        """Restore the average and counters saved in ``folder``; raises if absent or not matching this model."""
        store = self._require_store()
        assert self.engine is not None
        tensors, meta = load_ema_checkpoint(folder, self.engine.layout())
        store.load_state_dict(tensors)
        self.num_updates = meta["num_updates"]
        self.num_switches = meta["num_switches"]
        self.last_decay = meta["last_decay"]
        return meta

    # ---- internals --------------------------------------------------------------------------------------------
    def _require_store(self) -> EMAStore:
        if self.store is None:
            raise RuntimeError("SEMACallback has no EMA yet: it is created when training starts (on_train_begin).")
        return self.store

    def _average(self, store: EMAStore, step: int) -> None:
        cfg = self.config
        action = schedule.ema_action(step, cfg.update_every, cfg.update_after_step)
        if action is schedule.EMAAction.COPY:
            store.reset()
            self.last_decay = 0.0
        elif action is schedule.EMAAction.UPDATE:
            decay = schedule.effective_decay(
                step, cfg.decay, cfg.warmup, self._warmup_steps, cfg.warmup_ratio, cfg.update_every
            )
            store.update(decay)
            self.num_updates += 1
            self.last_decay = decay

    def _switch(self, store: EMAStore, model: torch.nn.Module | None) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self.landscape is not None:  # measured before the switch: afterwards raw and EMA weights are the same
            if model is None:
                raise RuntimeError("SEMACallback(landscape=...) needs the model in the hook's keyword arguments")
            logs = self.landscape.measure(model, store.swapped_in)
        store.switch()
        self.num_switches += 1
        return {**logs, "ema_switches": float(self.num_switches)}

    def _prepare_evaluation(self, control: TrainerControl) -> None:
        """Swap the average in when the Trainer is about to evaluate (no hook fires before evaluation itself)."""
        if control.should_evaluate and self.config.evaluate_with == "ema" and self._swap is None:
            self._swap = ExitStack()
            self._swap.enter_context(self._require_store().swapped_in())

    def _swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    def _log(self, logs: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        if not logs:
            return
        if self._trainer is not None:
            # Trainer.log clears control.should_log; keep the Trainer's own pending log (loss, lr) alive.
            pending = control.should_log
            self._trainer.log(logs)
            control.should_log = pending
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def _output_dir(self, args: TrainingArguments) -> str:
        return args.output_dir if self._trainer is None else self._trainer._get_output_dir(trial=None)

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        candidates = [self._resume_hint, getattr(args, "resume_from_checkpoint", None)]
        candidates.append(os.path.join(self._output_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        folder = next((c for c in candidates if isinstance(c, str) and os.path.isdir(c)), candidates[-1])
        if not has_ema_checkpoint(folder) and self.config.allow_fresh_ema_on_resume:
            logger.warning(f"SEMA: no EMA state in {folder}; starting a fresh average from the restored weights.")
            return
        meta = self.load_checkpoint(folder)
        if meta["global_step"] != state.global_step:
            raise ValueError(
                f"EMA state in {folder!r} was saved at step {meta['global_step']} but the Trainer resumed at step "
                f"{state.global_step}; resume from the checkpoint the EMA was saved with."
            )
        logger.info(f"SEMA: restored the EMA from {folder} (step {state.global_step}, {self.num_switches} switches).")


def _find_calling_trainer(max_depth: int = 16) -> tuple[Trainer | None, str | None]:
    """The `Trainer` running this hook, found on the call stack, and the checkpoint it resumes from.

    Callbacks are not handed the Trainer; transformers' own JIT-checkpoint callback gets it through ``set_trainer``.
    Looking it up here lets ``Trainer(callbacks=[SEMACallback()])`` log through the Trainer with no extra call.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                hint = frame.f_locals.get("resume_from_checkpoint")
                return candidate, hint if isinstance(hint, str) else None
        return None, None
    finally:
        del frame


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
