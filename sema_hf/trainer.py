"""`EMAFirstCheckpointMixin`: the Trainer writes a checkpoint's EMA files before its own save, so that nothing that
follows the save inside `Trainer._save_checkpoint` (the upload of ``hub_strategy="checkpoint"`` /
``"all_checkpoints"``, the rotation of ``save_total_limit``) ever sees a checkpoint without its average. It also
covers the checkpoints that fire no ``on_save`` (transformers' just-in-time checkpoint on SIGTERM calls
``_save_checkpoint`` directly).

With a plain `transformers.Trainer` the callback can only write them in ``on_save``, after that upload started;
a crash between the two saves leaves a newest checkpoint without EMA, and resuming from it is refused with an
error that says so (`sema_hf.resume`). `sema_hf.SEMATrainer` (in `sema_hf.hub`) includes this mixin.
"""

from __future__ import annotations

from typing import Any

from .callback import SEMACallback
from .preemption import prepare_resume


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
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SEMACallback) and callback.store is not None and callback.trainer is self:
                callback.save_checkpoint_before_trainer(self._get_output_dir(trial=trial), self.state.global_step)
        super()._save_checkpoint(model, trial)
