"""Which `Trainer` is running a callback, and what it was asked to do: one binding per ``trainer.train()`` call.

Callbacks are not handed the Trainer (transformers' own JIT-checkpoint callback gets it through ``set_trainer``).
One `SEMACallback` object may serve several Trainers in turn (a seed loop, a notebook cell run twice), so the
binding is made again at every ``on_train_begin``, in this order:

1. handed over by the Trainer itself: `sema_hf.SEMATrainer` (`sema_hf.trainer.SEMABindingMixin`) passes the
   resume folder, trial and ``ignore_keys_for_eval`` of its training loop to its callbacks before the loop starts;
2. found on the call stack: the innermost frame whose ``self`` is a `Trainer` that lists this callback in its
   ``callback_handler`` is the running Trainer, whatever its training-loop function is called (a renamed or patched
   loop, e.g. Unsloth's ``_fast_inner_training_loop``, is found as well). That frame and the Trainer's frames above
   it give the resume folder (``resume_from_checkpoint``, resolved from ``True`` to a folder by ``Trainer.train``),
   the hyperparameter-search trial (``trial``, which decides the ``run-K/`` output folder) and
   ``ignore_keys_for_eval``;
3. ``set_trainer(trainer)``: then the resume folder is the one ``train(resume_from_checkpoint=PATH)`` was given
   when the stack shows it, else ``args.resume_from_checkpoint``.

A Trainer given with ``set_trainer`` must be the one running, and the callback must be one of its callbacks:
anything else is an error rather than a guess.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from transformers import Trainer

_NOT_GIVEN = object()


@dataclass(frozen=True)
class TrainerBinding:
    """The Trainer of one ``train()`` call; ``trainer`` is None when it could not be identified."""

    trainer: Trainer | None
    resume_from_checkpoint: str | None = None
    trial: Any = None
    found_on_stack: bool = False
    ignore_keys_for_eval: list[str] | None = None
    handed_over: bool = False

    def output_dir(self, fallback: str) -> str:
        """The folder this run's checkpoints go to: ``output_dir``, or ``output_dir/run-K`` for a search trial."""
        if self.trainer is None:
            return fallback
        return self.trainer._get_output_dir(trial=self.trial)


def _lists(trainer: Any, callback: object) -> bool:
    handler = getattr(trainer, "callback_handler", None)
    return handler is not None and any(cb is callback for cb in handler.callbacks)


def find_running_trainer(callback: object | None = None, max_depth: int = 64) -> TrainerBinding:
    """The Trainer on the call stack that lists ``callback`` among its callbacks (any Trainer when ``callback`` is
    None), with the resume folder, trial and ``ignore_keys_for_eval`` of its ``train()`` call."""
    frame = inspect.currentframe()
    trainer: Trainer | None = None
    found: dict[str, Any] = {}
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if not isinstance(candidate, Trainer):
                continue
            if trainer is None:
                if callback is not None and not _lists(candidate, callback):
                    continue
                trainer = candidate
            elif candidate is not trainer:
                continue
            local = frame.f_locals
            for name in ("resume_from_checkpoint", "trial", "ignore_keys_for_eval"):
                if name in found or name not in local:
                    continue
                value = local[name]
                if name == "resume_from_checkpoint" and not isinstance(value, str):
                    continue  # True / None in an outer frame; the loop's frame holds the resolved folder
                found[name] = value
        if trainer is None:
            return TrainerBinding(None)
        return TrainerBinding(
            trainer,
            resume_from_checkpoint=found.get("resume_from_checkpoint"),
            trial=found.get("trial"),
            found_on_stack=True,
            ignore_keys_for_eval=found.get("ignore_keys_for_eval"),
        )
    finally:
        del frame


def bind(callback: object, explicit: Trainer | None, handed_over: TrainerBinding | None = None) -> TrainerBinding:
    """Bind ``callback`` to the Trainer running it now.

    ``handed_over`` (from `SEMATrainer`) wins; ``explicit`` (from ``set_trainer``) must agree with the running
    Trainer when both are known; the callback must be registered with the Trainer it is bound to. Raises
    ``RuntimeError`` naming the problem otherwise.
    """
    found = handed_over if handed_over is not None and handed_over.trainer is not None else None
    if found is None:
        found = find_running_trainer(callback)
    if found.trainer is None and explicit is not None:
        # set_trainer() with no Trainer found: the explicit one, with what its frames on the stack (if any) say.
        on_stack = find_running_trainer(None)
        found = on_stack if on_stack.trainer is explicit else TrainerBinding(explicit)
    if found.trainer is not None and explicit is not None and found.trainer is not explicit:
        raise RuntimeError(
            "SEMACallback.set_trainer() was given another Trainer than the one now running train(): one callback "
            "object serves one Trainer at a time. Call set_trainer(trainer) with the Trainer you train, or drop "
            "the call (the running Trainer is found by itself)."
        )
    if found.trainer is not None and not _lists(found.trainer, callback):
        raise RuntimeError(
            "SEMACallback is bound to a Trainer that does not list it among its callbacks; pass it with "
            "Trainer(callbacks=[callback]) or trainer.add_callback(callback)."
        )
    return found
