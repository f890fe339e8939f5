"""The averaging horizon: from the unit a user gives (decay, steps, epochs) to the per-step decay, and the warnings
that say when an average cannot help. Pure functions of the run's step counts.

An EMA with per-step decay ``m`` weighs the weights of ``k`` steps ago by ``(1 - m) m**k``: their mean age is
``m / (1 - m)`` and the weight falls by ``e`` every ``1 / (1 - m)`` steps. That is the horizon::

    H = 1 / (1 - m)          m = 1 - 1 / H
    0.9 -> 10 steps, 0.99 -> 100, 0.999 -> 1000, 0.9999 -> 10000

What decides whether the average helps is H against the epoch and the run, not m: at ``horizon_epochs = 0.5``
on a run with 4 optimizer steps per epoch, H = 2 steps and m = 0.5; the same 0.5 epochs on 500 steps per epoch
is m = 0.996. Steps here are optimizer steps (after gradient accumulation; under DDP each step consumes the
batches of all ranks). With ``update_every = k`` the update applies ``m**k`` (`schedule.effective_decay`), so
the horizon in steps does not change with k.

Measured here (docs/comparison): with H about one epoch in 4-epoch runs SEMA ended far behind no averaging (ViT
0.722 vs 0.833 accuracy), because every switch pulls training back by about H steps of progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import DEFAULT_HORIZON_EPOCHS, SEMAConfig

# A horizon in epochs shorter than this many optimizer steps (0.3 epochs of a 5-step epoch) is raised to it: an
# average over 1.5 steps is hardly one, and under 1 step none (a decay <= 0).
MIN_EPOCH_HORIZON_STEPS = 2.0


def decay_for_horizon(horizon_steps: float) -> float:
    """Per-step decay ``m = 1 - 1 / H`` of a horizon of ``H > 1`` optimizer steps."""
    if not horizon_steps > 1.0:
        raise ValueError(f"an averaging horizon must be longer than 1 optimizer step, got {horizon_steps!r}")
    return 1.0 - 1.0 / horizon_steps


def horizon_of_decay(decay: float) -> float:
    """Horizon ``H = 1 / (1 - m)`` in optimizer steps of the per-step decay ``m``."""
    return 1.0 / (1.0 - decay)


def optimizer_steps_per_epoch(num_batches: int | None, gradient_accumulation_steps: int) -> int | None:
    """Optimizer steps in one epoch of ``num_batches`` batches per rank, counted as the Trainer counts them
    (a last partial accumulation still steps): ``ceil(num_batches / accumulation)``; None when the data has no
    length (an ``IterableDataset``)."""
    if num_batches is None:
        return None
    return max(math.ceil(num_batches / gradient_accumulation_steps), 1)


@dataclass(frozen=True)
class ResolvedHorizon:
    """The per-step decay and its horizon, in the units of this run."""

    decay: float
    horizon_steps: float
    steps_per_epoch: int | None
    note: str | None = None  # set when the horizon asked for could not be used as is

    @property
    def horizon_epochs(self) -> float | None:
        return None if not self.steps_per_epoch else self.horizon_steps / self.steps_per_epoch


def resolve_horizon(config: SEMAConfig, steps_per_epoch: int | None) -> ResolvedHorizon:
    """The per-step decay ``config`` asks for on a run with ``steps_per_epoch`` optimizer steps per epoch; with no
    unit given, ``horizon_epochs = DEFAULT_HORIZON_EPOCHS``. A horizon in epochs is at least
    ``MIN_EPOCH_HORIZON_STEPS`` optimizer steps (``note`` says so, and the train-start warnings repeat it)."""
    if config.decay is not None:
        return ResolvedHorizon(config.decay, horizon_of_decay(config.decay), steps_per_epoch)
    if config.horizon_steps is not None:
        return ResolvedHorizon(decay_for_horizon(config.horizon_steps), config.horizon_steps, steps_per_epoch)
    epochs = DEFAULT_HORIZON_EPOCHS if config.horizon_epochs is None else config.horizon_epochs
    given = "" if config.horizon_epochs is not None else " (the default, as no decay or horizon was given)"
    if not steps_per_epoch:
        raise ValueError(
            f"SEMAConfig.horizon_epochs = {epochs}{given} needs the number of optimizer steps per epoch, but the "
            "training data has no length (an IterableDataset?): give the horizon in optimizer steps "
            "(horizon_steps) or the decay instead."
        )
    horizon = epochs * steps_per_epoch
    if horizon >= MIN_EPOCH_HORIZON_STEPS:
        return ResolvedHorizon(decay_for_horizon(horizon), horizon, steps_per_epoch)
    note = (
        f"horizon_epochs = {epochs}{given} is only {horizon:g} optimizer steps on this run ({steps_per_epoch} "
        f"steps per epoch), which is no average at all; averaging over {MIN_EPOCH_HORIZON_STEPS:g} steps instead. "
        "Give horizon_steps or decay to set it exactly."
    )
    return ResolvedHorizon(decay_for_horizon(MIN_EPOCH_HORIZON_STEPS), MIN_EPOCH_HORIZON_STEPS, steps_per_epoch, note)


def switch_interval_steps(config: SEMAConfig, steps_per_epoch: int | None) -> int | None:
    """Optimizer steps between two switches (None without switching or when epochs have no length)."""
    if not config.switch:
        return None
    if config.switch_every_steps is not None:
        return config.switch_every_steps
    return None if not steps_per_epoch else config.switch_every_epochs * steps_per_epoch


def horizon_warnings(config: SEMAConfig, resolved: ResolvedHorizon, total_steps: int, warmup_steps: int) -> list[str]:
    """What in these settings keeps the average from helping, in a user's words (empty when nothing does).

    * H longer than the run: the saved average is dominated by the first weights (at H = run length, the weights of
      the first half still hold about 40 % of it).
    * switching with H longer than the switch interval: each switch sets training back by about H steps of progress.
    * ``update_after_step`` or the decay warmup at least as long as the run.
    """
    messages = [] if resolved.note is None else [resolved.note]
    h = resolved.horizon_steps
    if total_steps > 0 and h > total_steps:
        messages.append(
            f"the averaging horizon ({_describe(resolved)}) is longer than the whole run ({total_steps} optimizer "
            "steps): the average would be dominated by the early, barely trained weights. Shorten it (e.g. "
            "horizon_epochs=0.3) or turn averaging off."
        )
    interval = switch_interval_steps(config, resolved.steps_per_epoch)
    if interval is not None and h > interval:
        messages.append(
            f"Switch EMA copies the average into the model every {interval} optimizer steps, but the averaging "
            f"horizon is {_describe(resolved)}: each switch pulls training back by about {h:.0f} steps of "
            "progress. Use a horizon shorter than the switch interval, or plain EMA (switch=False)."
        )
    if total_steps > 0 and config.update_after_step >= total_steps:
        messages.append(
            f"update_after_step = {config.update_after_step} is not shorter than the run ({total_steps} optimizer "
            "steps): the average never starts, it stays a copy of the weights."
        )
    if total_steps > 0 and config.warmup != "none" and warmup_steps > total_steps:
        messages.append(
            f"the decay warmup ({warmup_steps} optimizer steps) is longer than the run ({total_steps}): the decay "
            "never reaches its set value. Shorten warmup_steps or use warmup='none'."
        )
    return messages


def _describe(resolved: ResolvedHorizon) -> str:
    epochs = resolved.horizon_epochs
    in_epochs = "" if epochs is None else f" = {epochs:.2g} epochs"
    return f"{resolved.horizon_steps:.0f} optimizer steps{in_epochs}, decay {resolved.decay:.6g}"
