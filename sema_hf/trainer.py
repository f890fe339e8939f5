"""What `sema_hf.SEMATrainer` adds to a `transformers.Trainer` for `SEMACallback`, as mixins (each usable alone):

* `EMAFirstCheckpointMixin`: the Trainer writes a checkpoint's EMA files before its own save, so that nothing that
  follows the save inside `Trainer._save_checkpoint` (the upload of ``hub_strategy="checkpoint"`` /
  ``"all_checkpoints"``, the rotation of ``save_total_limit``) ever sees a checkpoint without its average. It also
  covers the checkpoints that fire no ``on_save`` (transformers' just-in-time checkpoint on SIGTERM calls
  ``_save_checkpoint`` directly). With a plain `transformers.Trainer` the callback writes them at the end of its
  ``on_step_end`` / ``on_epoch_end`` when ``DefaultFlowCallback`` asked for a save (``save_strategy`` "steps" or
  "epoch") and in ``on_evaluate`` on a new best (``"best"``), so also before the Trainer's files; only a save that
  a callback after it requests gets its EMA in ``on_save``, after the upload and the rotation: a crash between the
  two saves then leaves a newest checkpoint without EMA, which `sema_hf.preemption` sets aside and
  `sema_hf.resume` refuses with an error that says so.
* `HandOverBindingMixin`: the training loop hands its Trainer, resume folder, trial and ``ignore_keys_for_eval`` to
  the callback explicitly (`sema_hf.binding`), instead of the callback finding them on the call stack.
* `RawWeightsOnErrorMixin`: an exception inside ``evaluate()`` (a failing ``compute_metrics``, a KeyboardInterrupt
  in a notebook) while the average is swapped in for the evaluation puts the raw weights back before it propagates.
  The plain callback cannot see that exception (no hook fires on it); its own passes over the average are always
  undone on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .binding import TrainerBinding
from .callback import SEMACallback
from .preemption import prepare_resume


def _sema_callbacks(trainer: Any) -> Iterator[SEMACallback]:
    return (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SEMACallback))


class EMAFirstCheckpointMixin:
    """Mix into a `transformers.Trainer` subclass before ``Trainer``: ``class MyTrainer(EMAFirstCheckpointMixin,
    Trainer)``. Every rank writes its EMA shard into ``checkpoint-N/`` first; the callback's ``on_save`` then finds
    it written and does nothing."""

    sema_saves_ema_first = True

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Before the Trainer reads ``resume_from_checkpoint`` (`sema_hf.preemption`): ``True`` sets the checkpoints
        a killed run left half-written aside, so the newest complete one is resumed; an incomplete PATH is refused
        with an error naming the newest complete one."""
        callbacks = self.callback_handler.callbacks  # type: ignore[attr-defined]
        require_ema = any(isinstance(cb, SEMACallback) and not cb.config.allow_fresh_ema_on_resume for cb in callbacks)
        prepare_resume(self.args, resume_from_checkpoint, require_ema=require_ema)  # type: ignore[attr-defined]
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        for callback in _sema_callbacks(self):
            if callback.core is not None and callback.trainer is self:
                callback.save_checkpoint_before_trainer(self._get_output_dir(trial=trial), self.state.global_step)
        super()._save_checkpoint(model, trial)  # type: ignore[misc]


class HandOverBindingMixin:
    """The training loop tells its `SEMACallback` which Trainer runs it and with what (resume folder, trial,
    ``ignore_keys_for_eval``), whatever sits between ``train()`` and the loop."""

    def _inner_training_loop(
        self,
        batch_size: int | None = None,
        args: Any = None,
        resume_from_checkpoint: str | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        binding = TrainerBinding(
            self,  # type: ignore[arg-type]
            resume_from_checkpoint=resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            handed_over=True,
        )
        for callback in _sema_callbacks(self):
            callback.hand_over(binding)
        try:
            return super()._inner_training_loop(  # type: ignore[misc]
                batch_size=batch_size,
                args=args,
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:
            for callback in _sema_callbacks(self):
                callback.hand_over(None)


class RawWeightsOnErrorMixin:
    """An exception inside ``evaluate()`` leaves the model holding its raw weights."""

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        try:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            for callback in _sema_callbacks(self):
                callback.evaluation_failed()
            raise
