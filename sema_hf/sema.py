"""`SEMA`: Switch EMA for hand-written training loops (``accelerate`` or plain PyTorch), and the run's core state.

The maths (Li et al., "Switch EMA", arXiv 2402.09240). After every optimizer step ``t`` (never a micro-batch of
gradient accumulation, never a step skipped for an fp16 overflow) the fp32 average follows the weights::

    ema <- m_t * ema + (1 - m_t) * theta          m_t: the decay m after warmup (`sema_hf.schedule`)

and at each switch point (the end of every ``switch_every_epochs``-th epoch from ``switch_start_epoch`` on, or
every ``switch_every_steps`` optimizer steps) the average is copied into the weights, ``theta <- ema``, which train
on from there (optimizer state and LR schedule untouched). The horizon ``H = 1 / (1 - m)`` optimizer steps is how
far back the average reaches: 0.9 -> 10 steps, 0.99 -> 100, 0.999 -> 1000. Give it in the unit that matters for
the run (``horizon_steps=200``, ``horizon_epochs=0.3`` with the epoch's length, or ``decay=0.999``); keep it well
under the switch interval, since every switch pulls training back by about H steps of progress (`sema_hf.horizon`).

In a loop::

    from accelerate import Accelerator
    from sema_hf import SEMA

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    sema = SEMA(model, optimizer, accelerator, horizon_steps=200)  # any SEMAConfig field, or config=SEMAConfig(...)
    for epoch in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step(); scheduler.step(); optimizer.zero_grad()
            sema.step()                  # averages only when the optimizer really stepped
        sema.epoch_end()                 # the epoch switch point
        with sema.swapped_in():          # evaluate the average; the raw weights always come back
            evaluate(model)
        accelerator.save_state("ckpt")   # carries every rank's EMA shard (load_state restores it bit for bit)
    sema.finalize()                      # the model holds the average (final_weights="ema")

Engines: one process, DDP (``shard_under_ddp`` too), FSDP1/FSDP2 and DeepSpeed ZeRO-1/2/3 as prepared by
``accelerate``; each rank averages exactly what its optimizer updates (`sema_hf.engines`), with no communication
per update. Every rank must call every method (``step``, ``epoch_end``, ``swapped_in``, ``ema_state_dict``,
``save``, ``load``, ``finalize``): under sharded engines and ``shard_under_ddp`` they run collectives.

This object is the core of a run: engine adapter, store, counters, switch point and the per-rank checkpoint files.
It knows no Trainer; `SEMACallback` is the Trainer's front-end to the same rules.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import schedule
from .checkpoint import STATE_NAME, has_ema_checkpoint, load_ema_checkpoint, raise_if_any_rank_failed
from .checkpoint import save_ema_checkpoint as _save_ema_checkpoint
from .config import DEFAULT_HORIZON_EPOCHS, SEMAConfig
from .engines import EngineAdapter, detect_engine
from .horizon import ResolvedHorizon, horizon_warnings, optimizer_steps_per_epoch, resolve_horizon
from .store import EMAStore

logger = logging.getLogger(__name__)

#: Seconds `SEMA.swapped_in` waits for the other ranks where entering the swap is a collective (``shard_under_ddp``,
#: ZeRO-1/2) before it raises, instead of hanging: ``if rank == 0: with sema.swapped_in(): ...`` is the usual cause.
SWAP_ENTRY_TIMEOUT_S = 300.0


class SEMA:
    """Switch EMA of ``model`` in a training loop; see the module docstring for the maths and the loop.

    Args:
        model: the model as ``accelerator.prepare`` returned it (DDP / FSDP / DeepSpeed wrapped), or a plain module,
            already on its device and in its dtype: the average follows the tensors the model holds now, so a later
            ``.to(device)`` / ``.half()`` (anything through ``Module._apply``) is refused at the next `step`,
            `epoch_end`, `swapped_in` or `finalize` (checked under one process, DDP and ``shard_under_ddp``; not
            under FSDP and ZeRO, whose prepared models are not moved or cast by hand).
        optimizer: the optimizer as prepared (accelerate's wrapper is fine). Needed under DeepSpeed ZeRO; for the
            other engines it is only used to find the engine.
        accelerator: the run's ``accelerate.Accelerator``. With it, `step` counts only real optimizer steps
            (``accelerator.sync_gradients`` and not ``accelerator.optimizer_step_was_skipped``), and
            ``accelerator.save_state`` / ``load_state`` carry the EMA (every rank's shard) with nothing else to call.
            Without it, every `step` call is an optimizer step, and `save` / `load` write and read the files.
        config: a `SEMAConfig`; omitted, the defaults.
        steps_per_epoch: optimizer steps per epoch (an int), or the training dataloader (its length is divided by
            ``accelerator.gradient_accumulation_steps``, rounding up, as accelerate steps on a last partial
            accumulation). Needed by ``horizon_epochs`` (the default horizon) and by the default decay warmup (one
            epoch); give ``horizon_steps`` or ``decay`` and ``warmup_steps`` otherwise.
        max_steps: optimizer steps of the whole run, if known: only for the warnings about a horizon or a warmup
            longer than the run.
        **config_fields: any `SEMAConfig` field, e.g. ``SEMA(model, optimizer, accelerator, horizon_steps=200)``.

    ``evaluate_with`` and ``landscape`` are the Trainer's business: in a loop, what is evaluated is what runs
    inside `swapped_in` (the average) or outside it (the raw weights).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: object | None = None,
        accelerator: Any | None = None,
        *,
        config: SEMAConfig | None = None,
        steps_per_epoch: int | Any | None = None,
        max_steps: int | None = None,
        **config_fields: Any,
    ) -> None:
        base = config if config is not None else SEMAConfig()
        self.config: SEMAConfig = base.replace(**config_fields) if config_fields else base
        self.accelerator = accelerator
        self.steps_per_epoch = self._steps_per_epoch(steps_per_epoch, accelerator)
        warmup_steps = loop_warmup_steps(self.config, self.steps_per_epoch)
        resolved = resolve_horizon(self.config, self.steps_per_epoch)
        if self.config.evaluate_with != "ema":
            warnings.warn(
                f"SEMA: evaluate_with={self.config.evaluate_with!r} has no effect in a custom loop: evaluate inside "
                "`with sema.swapped_in():` for the average and outside it for the raw weights.",
                UserWarning,
                stacklevel=2,
            )
        engine = detect_engine(
            model,
            optimizer,
            self.config.include_buffers,
            shard_under_ddp=self.config.shard_under_ddp,
            buffers_from_rank0=True,  # the store below calls its before_read
        )
        self._setup(engine, resolved, warmup_steps)
        for message in horizon_warnings(self.config, resolved, max_steps or 0, warmup_steps):
            logger.warning(f"SEMA: {message}")
            warnings.warn(f"SEMA: {message}", UserWarning, stacklevel=2)
        self._hooks: list[Any] = []
        if accelerator is not None:
            self._hooks = [
                accelerator.register_save_state_pre_hook(self._save_state_hook),
                accelerator.register_load_state_pre_hook(self._load_state_hook),
            ]
        logger.info(
            f"SEMA: engine {engine.name}, decay {resolved.decay:.6g} (horizon {resolved.horizon_steps:.4g} optimizer "
            f"steps), warmup {self.config.warmup} over {warmup_steps} steps, {self.store.local_numel} averaged "
            "elements on this rank"
        )

    @classmethod
    def from_engine(
        cls, engine: EngineAdapter, config: SEMAConfig, resolved: ResolvedHorizon, warmup_steps: int
    ) -> SEMA:
        """The core for a front-end that found the engine and resolved the horizon and warmup itself (the
        Trainer's callback, from `TrainingArguments`): no accelerator, no checks, no hooks."""
        core = cls.__new__(cls)
        core.config = config
        core.accelerator = None
        core.steps_per_epoch = resolved.steps_per_epoch
        core._hooks = []
        core._setup(engine, resolved, warmup_steps)
        return core

    def _setup(self, engine: EngineAdapter, resolved: ResolvedHorizon, warmup_steps: int) -> None:
        """The run's state: engine, store, counters. Shared by both front-ends."""
        self.engine = engine
        self.resolved = resolved
        self.warmup_steps = warmup_steps
        self.store = EMAStore(
            engine.slots(),
            after_write=engine.after_write,
            backup_forward=getattr(engine, "backup_forward", None),  # DDP-sharded: evaluation gathers once
            before_read=getattr(engine, "before_read", None),  # DDP + include_buffers: rank 0's buffers
        )
        self.run_id = uuid.uuid4().hex
        self._reset_counters()
        self.final_weights_held: str | None = None
        self._swapped = False
        self._fresh_pending = False
        self._entry_group = _entry_check_group(engine)
        self.swap_entry_timeout_s = SWAP_ENTRY_TIMEOUT_S

    @staticmethod
    def _steps_per_epoch(steps_per_epoch: int | Any | None, accelerator: Any | None) -> int | None:
        if steps_per_epoch is None or isinstance(steps_per_epoch, int):
            if isinstance(steps_per_epoch, bool) or (steps_per_epoch is not None and steps_per_epoch < 1):
                raise ValueError(f"SEMA: steps_per_epoch = {steps_per_epoch!r} is invalid: expected an int >= 1")
            return steps_per_epoch
        try:
            batches = len(steps_per_epoch)
        except TypeError:
            raise ValueError(
                f"SEMA: steps_per_epoch = {steps_per_epoch!r} is neither an int nor a dataloader with a length; pass "
                "the optimizer steps per epoch as an int."
            ) from None
        accumulation = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
        return optimizer_steps_per_epoch(batches, accumulation)

    # ---- what the user reads ----------------------------------------------------------------------------------
    @property
    def decay(self) -> float:
        """The per-step decay m (before warmup and ``update_every``)."""
        return self.resolved.decay

    @property
    def local_numel(self) -> int:
        """Elements of fp32 average held by this process (about total / world size under sharded engines)."""
        return self.store.local_numel

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The full EMA weights keyed like ``model.state_dict()`` (a tied weight once), fp32 copies on CPU or the
        weights' device. Sharded engines gather one tensor at a time: every rank must call this, every rank
        receives the full dict."""
        self._fresh_if_pending()
        return self.engine.full_state_dict(self.store.state_dict())

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model's forward reads the average; the raw weights come back afterwards, bit for
        bit, even when the block raises. The optimizer's fp32 master weights are never touched.

        Under ``shard_under_ddp`` and DeepSpeed ZeRO-1/2 entering the block is a collective (the average is
        gathered from every rank's shard), as is any forward under FSDP and ZeRO-3: every rank must enter it.
        ``if accelerator.is_main_process: with sema.swapped_in(): ...`` raises after ``swap_entry_timeout_s``
        (300 s) there, naming the ranks that did not come, instead of hanging; evaluate on every rank (or take
        ``ema_state_dict()`` on every rank and use it on one).
        """
        if self._swapped:
            raise RuntimeError("SEMA.swapped_in() is already active: the average is in the model; do not nest it.")
        self._refuse_moved_tensors("swapped_in()")
        self._fresh_if_pending()
        self._check_every_rank_enters("swapped_in()")
        self._swapped = True
        try:
            with self.store.swapped_in():
                yield
        finally:
            self._swapped = False

    def state_dict(self) -> dict[str, Any]:
        """The counters (no tensors). For ``accelerator.register_for_checkpointing(sema)``, which pickles it from
        the main process only: that is harmless but not needed, since ``SEMA(..., accelerator)`` already rides
        along with ``save_state`` / ``load_state`` (the averages of every rank, in safetensors files)."""
        return {"format": "sema-hf-loop/1", **self._counters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The counterpart of `state_dict` for ``register_for_checkpointing``: accelerate calls it after the
        load-state hook has restored the averages and counters, so it only checks that both agree."""
        if not self._hooks:
            raise RuntimeError(
                "SEMA.load_state_dict: the averages cannot be restored from accelerate's pickled custom state "
                "(it is written by the main process only). Pass the accelerator, SEMA(model, optimizer, accelerator), "
                "so that accelerator.load_state restores them from their safetensors files."
            )
        saved = {k: v for k, v in state.items() if k != "format"}
        if not self._fresh_pending and saved != self._counters():
            raise RuntimeError(
                f"SEMA: the registered checkpoint's counters {saved} differ from those restored with the averages "
                f"{self._counters()}; the folder mixes files of two saves."
            )

    # ---- the loop's events ------------------------------------------------------------------------------------
    def step(
        self,
        *,
        score_raw: float | None = None,
        score_average: float | None = None,
        evaluate: Callable[[], float] | None = None,
        greater_is_better: bool = False,
    ) -> bool:
        """Call after every iteration of the loop (after ``optimizer.step()``). Returns whether this iteration was
        an optimizer step. With an accelerator it is one when ``accelerator.sync_gradients`` (the last micro-batch
        of an accumulation); a step that ``accelerator.optimizer_step_was_skipped`` (fp16 overflow) counts as a
        step but does not update the average, as in the Trainer. The scores are used only at a step-counted switch
        point (``switch_every_steps``) under ``switch_policy="if_better"``; see `epoch_end`."""
        self._refuse_while_swapped("step()")
        self._refuse_moved_tensors("step()")
        accelerator = self.accelerator
        if accelerator is not None and not accelerator.sync_gradients:
            return False
        skipped = accelerator is not None and bool(accelerator.optimizer_step_was_skipped)
        self.advance(self.global_step + 1, stepped=not skipped)
        if self.config.switch and schedule.should_switch_at_step(
            self.global_step, self.config.switch_every_steps, self.config.update_after_step
        ):
            self._switch_point(score_raw, score_average, evaluate, greater_is_better)
        return True

    def epoch_end(
        self,
        score_raw: float | None = None,
        score_average: float | None = None,
        evaluate: Callable[[], float] | None = None,
        *,
        greater_is_better: bool = False,
    ) -> bool:
        """Call once at the end of every epoch: the epoch switch point. Returns whether the average was copied in.

        With ``switch_policy="if_better"`` the average is copied in only when it scores better: give both scores
        (``score_raw`` of the raw weights, ``score_average`` of the average, e.g. evaluation losses; lower is better
        unless ``greater_is_better``) or ``evaluate``, a function of no argument returning the score of whatever the
        model holds (called once as is and once inside `swapped_in`). Under several processes rank 0's decision is
        taken by every rank (one broadcast), so give every rank the same scores (``accelerator.gather_for_metrics``).
        """
        self._refuse_while_swapped("epoch_end()")
        self._refuse_moved_tensors("epoch_end()")
        self.epochs_completed += 1
        cfg = self.config
        if not (
            cfg.switch
            and cfg.switch_every_steps is None
            and schedule.should_switch_at_epoch_end(
                self.epochs_completed, cfg.switch_every_epochs, cfg.switch_start_epoch
            )
        ):
            return False
        return self._switch_point(score_raw, score_average, evaluate, greater_is_better)

    def finalize(
        self,
        score_raw: float | None = None,
        score_average: float | None = None,
        evaluate: Callable[[], float] | None = None,
        *,
        greater_is_better: bool = False,
    ) -> str:
        """At the end of training: leave in the model the weights ``final_weights`` names, and return which
        (``"ema"`` or ``"model"``). Under ``switch_policy="if_better"`` the average stays out unless it won: the last
        switch point's decision when no step followed it, else give scores or ``evaluate`` as for `epoch_end`."""
        self._refuse_while_swapped("finalize()")
        self._refuse_moved_tensors("finalize()")
        self._fresh_if_pending()
        final = self.config.final_weights
        if final == "ema" and self.config.switch_policy == "if_better":
            if self.steps_since_decision == 0 and self.last_switch_decision is not None:
                better = self.last_switch_decision
            else:
                better = self._average_wins(score_raw, score_average, evaluate, greater_is_better, "finalize()")
            final = "ema" if better else "model"
        if final == "ema":
            self.store.switch()
        self.final_weights_held = final
        return final

    # ---- the rules, shared with the Trainer's front-end -------------------------------------------------------
    def advance(self, step: int, stepped: bool) -> None:
        """Optimizer step ``step`` (1 for the first) happened; ``stepped``: it changed the weights (not skipped)."""
        self.global_step = step
        if not stepped:
            return
        self._fresh_if_pending()
        cfg = self.config
        action = schedule.ema_action(step, cfg.update_every, cfg.update_after_step)
        if action is schedule.EMAAction.COPY:
            self.store.reset()
            self.last_decay = 0.0
        elif action is schedule.EMAAction.UPDATE:
            decay = schedule.effective_decay(
                step, self.resolved.decay, cfg.warmup, self.warmup_steps, cfg.warmup_ratio, cfg.update_every
            )
            self.store.update(decay)
            self.num_updates += 1
            self.last_decay = decay
        self.steps_since_decision += 1

    def decide_switch(self, better: bool) -> dict[str, float]:
        """Record a switch point's decision; copy the average in when ``better``. Returns what to log."""
        self.last_switch_decision = better
        self.steps_since_decision = 0
        if better:
            self.store.switch()
            self.num_switches += 1
        return {"ema_switches": float(self.num_switches), "ema_switched": float(better)}

    def _switch_point(
        self,
        score_raw: float | None,
        score_average: float | None,
        evaluate: Callable[[], float] | None,
        greater_is_better: bool,
    ) -> bool:
        if self.config.switch_policy == "if_better":
            better = self._average_wins(score_raw, score_average, evaluate, greater_is_better, "a switch point")
        else:
            better = True
        self.decide_switch(better)
        return better

    def _average_wins(
        self,
        score_raw: float | None,
        score_average: float | None,
        evaluate: Callable[[], float] | None,
        greater_is_better: bool,
        where: str,
    ) -> bool:
        if evaluate is not None:
            score_raw = float(evaluate())
            with self.swapped_in():
                score_average = float(evaluate())
        if score_raw is None or score_average is None:
            raise ValueError(
                f"SEMA(switch_policy='if_better') reached {where} (step {self.global_step}, epoch "
                f"{self.epochs_completed}) without the scores it decides on: pass score_raw= and score_average= (the "
                "raw weights' and the average's evaluation, lower is better unless greater_is_better=True), or "
                "evaluate= (a function returning the score of what the model holds)."
            )
        better = score_average > score_raw if greater_is_better else score_average < score_raw
        return _rank0_decision(better)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    @property
    def checkpoint_id(self) -> str:
        """``"<run id>:<global step>"``: the identity of the EMA saved now (the callback records it in the Trainer's
        state too, to prove on resume that the EMA belongs to the checkpoint; `sema_hf.resume`)."""
        return f"{self.run_id}:{self.global_step}"

    def save(self, folder: str, *, writer: bool | None = None) -> None:
        """Write this rank's average and the counters into ``folder`` (the callback's file format: one safetensors
        file per shard and ``sema_state.json``). Every rank must call it; ``accelerator.save_state`` does.
        ``writer``: whether this process writes the files needed once (default: accelerate's main process, or each
        node's first with ``save_on_each_node``; rank 0 without an accelerator)."""
        self._fresh_if_pending()
        meta = {
            "global_step": self.global_step,
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_dir": os.path.abspath(folder),
            **self._counters(),
            "config": self.config.to_dict(),
        }
        writer = self._writer() if writer is None else writer
        _save_ema_checkpoint(folder, self.store.state_dict(), self.engine.layout(), meta, writer=writer)

    def load(self, folder: str, *, allow_fresh: bool | None = None) -> dict[str, Any]:
        """Restore the average and the counters saved in ``folder`` (by `save`, ``accelerator.save_state`` or the
        callback), re-sharding when the world size or the engine differs. Every rank must call it. An error on any
        rank (no EMA state, a damaged shard, another model) is raised on every rank.

        A folder without EMA state is an error, unless ``allow_fresh`` (default: ``allow_fresh_ema_on_resume``):
        then SEMA starts over as if it were made at this point: every counter restarts from zero (``global_step``,
        ``epochs_completed``, ``num_updates``, ``num_switches``), so the decay warmup runs again from its first
        step (``m_1``, not ``m_t`` of the step reached before) and the next step-counted switch comes
        ``switch_every_steps`` steps after the load, and the average restarts as a copy of the weights at the next
        `step` (or `swapped_in`, `ema_state_dict`, `save`, whichever comes first: under
        ``accelerator.load_state`` this runs before the weights are loaded). The loop's own step count lives in
        SEMA only, so nothing else could tell it where the loaded run stood.

        Refused inside `swapped_in` (the model holds the average there)."""
        self._refuse_while_swapped("load()")
        allow_fresh = self.config.allow_fresh_ema_on_resume if allow_fresh is None else allow_fresh
        missing = not has_ema_checkpoint(folder)
        if _any_rank(missing):
            if allow_fresh:
                logger.warning(
                    f"SEMA: no EMA state in {folder!r}; the average restarts from the weights at the next step, "
                    "with the counters (decay warmup, step-counted switches, epochs) from zero."
                )
                self._reset_counters()
                self._fresh_pending = True
                return {}
            error: BaseException | None = (
                FileNotFoundError(
                    f"No SEMA EMA state in {folder!r} (no {STATE_NAME}): it was saved without SEMA or before "
                    "SEMA(..., accelerator) existed. Load a folder saved with it, or pass "
                    "allow_fresh_ema_on_resume=True to restart the average from the restored weights."
                )
                if missing
                else None
            )
            raise_if_any_rank_failed(error, f"find the EMA state in {folder!r}")
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        error = None
        try:
            tensors, meta = load_ema_checkpoint(folder, self.engine.layout())
            self.store.check_state_dict(tensors)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = err
        raise_if_any_rank_failed(error, f"restore the EMA from {folder!r}")
        self.store.load_state_dict(tensors)
        self.global_step = meta["global_step"]
        self.num_updates = meta["num_updates"]
        self.num_switches = meta["num_switches"]
        self.last_decay = meta["last_decay"]
        self.last_switch_decision = meta.get("last_switch_decision")
        self.steps_since_decision = meta.get("steps_since_decision", 0)
        self.epochs_completed = meta.get("epochs_completed", 0)
        self._fresh_pending = False
        return meta

    def remove_hooks(self) -> None:
        """Stop riding along with ``accelerator.save_state`` / ``load_state`` (e.g. before making another SEMA)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _save_state_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self._swapped:
            raise RuntimeError(
                "accelerator.save_state() was called inside sema.swapped_in(): the model holds the average, and the "
                "checkpoint would resume from it as if it were the raw weights. Save outside the block."
            )
        self.save(output_dir)

    def _load_state_hook(self, models: list, input_dir: str) -> None:
        if self._swapped:
            raise RuntimeError(
                "accelerator.load_state() was called inside sema.swapped_in(): the model holds the average there, "
                "and leaving the block would copy the pre-swap raw weights over the loaded ones, while SEMA's "
                "average and counters would be the loaded checkpoint's. Load outside the block."
            )
        self.load(input_dir)

    def _writer(self) -> bool | None:
        """The process that writes what every node needs once: accelerate's main process, or each node's first
        process with ``ProjectConfiguration(save_on_each_node=True)``."""
        accelerator = self.accelerator
        if accelerator is None:
            return None
        project = getattr(accelerator, "project_configuration", None)
        if project is not None and getattr(project, "save_on_each_node", False):
            return bool(accelerator.is_local_main_process)
        return bool(accelerator.is_main_process)

    # ---- internals --------------------------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self.global_step = 0  # optimizer steps seen (skipped ones included, as the Trainer counts them)
        self.epochs_completed = 0
        self.num_updates = 0
        self.num_switches = 0
        self.last_decay: float | None = None
        self.last_switch_decision: bool | None = None
        self.steps_since_decision = 0

    def _counters(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epochs_completed": self.epochs_completed,
            "num_updates": self.num_updates,
            "num_switches": self.num_switches,
            "last_decay": self.last_decay,
            "last_switch_decision": self.last_switch_decision,
            "steps_since_decision": self.steps_since_decision,
        }

    def _refuse_while_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"SEMA.{what} was called inside sema.swapped_in(): the model holds the average there, and training "
                "must continue from the raw weights. Leave the block first."
            )

    def _refuse_moved_tensors(self, what: str) -> None:
        """Refuse to go on when the model was moved or cast after SEMA was made (see `sema_hf.engines.local`:
        a metadata check, no kernel, no host sync). Refused rather than followed: the average of the old tensors
        would be re-bound to new ones of another dtype or device, and a switch already written into the old ones
        would be lost; making SEMA after the move is the one order that is right on every engine."""
        check = getattr(self.engine, "moved_tensors", None)
        moved = check() if check is not None else []
        if moved:
            shown = "; ".join(moved[:5]) + (f"; and {len(moved) - 5} more" if len(moved) > 5 else "")
            raise RuntimeError(
                f"SEMA.{what}: {len(moved)} averaged tensor(s) of the model were moved or cast after SEMA was made "
                f"({shown}). SEMA would keep averaging, and switch into, tensors the model no longer uses. Make "
                "SEMA(...) after the model is moved or cast (after accelerator.prepare, .to(device), .half()...)."
            )

    def _fresh_if_pending(self) -> None:
        if self._fresh_pending:
            self._fresh_pending = False
            self.store.reset()

    def _check_every_rank_enters(self, what: str) -> None:
        """Where entering the swap is a collective, make sure every rank came (a gloo monitored barrier with a
        timeout), so that a swap on one rank only fails with this message instead of hanging."""
        if self._entry_group is None:
            return
        try:
            dist.monitored_barrier(
                group=self._entry_group, timeout=timedelta(seconds=self.swap_entry_timeout_s), wait_all_ranks=True
            )
        except RuntimeError as err:
            raise RuntimeError(
                f"SEMA.{what} under {self.engine.name} is a collective (it gathers the average from every rank's "
                f"shard), but not every rank entered it within {self.swap_entry_timeout_s:g} s: call it on every "
                f"rank, not under `if accelerator.is_main_process`. ({err})"
            ) from err


def loop_warmup_steps(config: SEMAConfig, steps_per_epoch: int | None) -> int:
    """The decay warmup's length in optimizer steps: ``warmup_steps``, else one epoch; refuse what needs an epoch's
    length the loop did not give (``ValueError`` naming the fix)."""
    needs_epoch = config.decay is None and config.horizon_steps is None
    if steps_per_epoch is None and needs_epoch:
        epochs = DEFAULT_HORIZON_EPOCHS if config.horizon_epochs is None else config.horizon_epochs
        given = "" if config.horizon_epochs is not None else " (the default, as no decay or horizon was given)"
        raise ValueError(
            f"SEMA: horizon_epochs = {epochs}{given} needs the length of an epoch: pass steps_per_epoch= (the "
            "training dataloader, or its optimizer steps per epoch as an int), or give horizon_steps= or decay=."
        )
    if config.warmup == "none":
        return 0
    if config.warmup_steps is not None:
        return config.warmup_steps
    if steps_per_epoch is None:
        raise ValueError(
            "SEMA's decay warmup defaults to one epoch, but the epoch's length is unknown: pass steps_per_epoch= "
            "(the training dataloader, or an int), set warmup_steps= (optimizer steps), or warmup='none'."
        )
    return steps_per_epoch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _flag_tensor(value: int) -> torch.Tensor:
    flag = torch.tensor([value], dtype=torch.int64)
    return flag.cuda() if dist.get_backend() == "nccl" else flag


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce of one integer; the local flag in one process)."""
    if not _distributed():
        return flag
    t = _flag_tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _rank0_decision(better: bool) -> bool:
    """Rank 0's switch decision on every rank: ranks that switched differently would hold different weights."""
    if not _distributed():
        return better
    t = _flag_tensor(int(better))
    dist.broadcast(t, src=0)
    return bool(t.item())


def _entry_check_group(engine: EngineAdapter) -> Any | None:
    """A gloo group for `SEMA._check_every_rank_enters`, where swapping the average in is a collective while the
    model's own forward is not (``shard_under_ddp``, ZeRO-1/2). Made at setup, when every rank is here."""
    if not _distributed() or not getattr(engine, "swap_is_collective", False):
        return None
    # Its own group: a monitored barrier that times out closes its connections, which must not be the training's.
    return dist.new_group(backend="gloo")
