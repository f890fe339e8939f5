"""Which `Trainer` is running a callback, and what it was asked to do: one binding per ``trainer.train()`` call.

Callbacks are not handed the Trainer (transformers' own JIT-checkpoint callback gets it through ``set_trainer``).
One `SEMACallback` object may serve several Trainers in turn (a seed loop, a notebook cell run twice), so the
binding is made again at every ``on_train_begin``, from the call stack: the frame of ``Trainer._inner_training_loop``
holds the Trainer (``self``), the checkpoint it resumes from (``resume_from_checkpoint``, already resolved from
``True`` to a folder by ``Trainer.train``) and the hyperparameter-search trial (``trial``), which decides the
output folder (``run-K/``). A Trainer given with ``set_trainer`` must be the one running, and the callback must be
one of its callbacks: anything else is an error rather than a guess.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from transformers import Trainer


@dataclass(frozen=True)
class TrainerBinding:
    """The Trainer of one ``train()`` call; ``trainer`` is None when it could not be identified."""

    trainer: Trainer | None
    resume_from_checkpoint: str | None = None
    trial: Any = None
    found_on_stack: bool = False

    def output_dir(self, fallback: str) -> str:
        """The folder this run's checkpoints go to: ``output_dir``, or ``output_dir/run-K`` for a search trial."""
        if self.trainer is None:
            return fallback
        return self.trainer._get_output_dir(trial=self.trial)


def find_running_trainer(max_depth: int = 32) -> TrainerBinding:
    """The Trainer whose training loop is on the call stack, with its resume folder and trial."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and frame.f_code.co_name == "_inner_training_loop":
                resume = frame.f_locals.get("resume_from_checkpoint")
                return TrainerBinding(
                    candidate,
                    resume_from_checkpoint=resume if isinstance(resume, str) else None,
                    trial=frame.f_locals.get("trial"),
                    found_on_stack=True,
                )
        return TrainerBinding(None)
    finally:
        del frame


def bind(callback: object, explicit: Trainer | None) -> TrainerBinding:
    """Bind ``callback`` to the Trainer running it now.

    ``explicit`` (from ``set_trainer``) must agree with the Trainer on the stack when both are known; the callback
    must be registered with the Trainer it is bound to. Raises ``RuntimeError`` naming the problem otherwise.
    """
    found = find_running_trainer()
    if found.trainer is not None and explicit is not None and found.trainer is not explicit:
        raise RuntimeError(
            "SEMACallback.set_trainer() was given another Trainer than the one now running train(): one callback "
            "object serves one Trainer at a time. Call set_trainer(trainer) with the Trainer you train, or drop "
            "the call (the running Trainer is found by itself)."
        )
    binding = found if found.trainer is not None else TrainerBinding(explicit)
    if binding.trainer is not None and callback not in binding.trainer.callback_handler.callbacks:
        raise RuntimeError(
            "SEMACallback is bound to a Trainer that does not list it among its callbacks; pass it with "
            "Trainer(callbacks=[callback]) or trainer.add_callback(callback)."
        )
    return binding
