"""When to average and when to switch: small pure functions of the step and epoch counters.

Steps ``t`` are optimizer steps (``TrainerState.global_step`` right after the step: 1 for the first one), never
micro-batches. Epochs are 0-based indices ``e``; an epoch end is reported as the number of completed epochs ``e + 1``.

Decay warmup (the authors' hooks; their configs use linear, T = 5 epochs, r = 0.9)::

    linear: m_t = m * (1 - (1 - r) * (1 - t / T))      for t < T
    exp:    m_t = m * r ** (1 - t / T)                  for t < T
    none:   m_t = m
    m_t = m                                             for t >= T

With r = 0.9 and m = 0.999 the decay starts near 0.899 (a horizon of about 10 steps, so the average follows the
fast early changes) and reaches 0.999 (about 1000 steps) after T steps. Updating only every k steps keeps the same
horizon in steps with the decay ``m_t ** k``.

Switch rule at the end of epoch ``e`` (0-based): switch when ``e + 1 > start`` and ``(e + 1) % every == 0``.
The authors' openmixup hook inverts this test (it switches only when ``(e + 1) % every != 0``, so never at every=1);
`should_switch_at_epoch_end` is the intended rule of their detection hook.
"""

from __future__ import annotations

import math
from enum import Enum


class EMAAction(str, Enum):
    """What the average does after an optimizer step."""

    COPY = "copy"  # before averaging starts: the average is a copy of the weights
    UPDATE = "update"  # ema <- m * ema + (1 - m) * theta
    SKIP = "skip"  # between updates when update_every > 1


def warmup_decay(step: int, decay: float, warmup: str, warmup_steps: int, ratio: float) -> float:
    """The decay m_t at optimizer step ``step`` after warmup of ``warmup_steps`` steps (see the module docstring)."""
    if warmup == "none" or warmup_steps <= 0 or step >= warmup_steps:
        return decay
    remaining = 1.0 - step / warmup_steps
    if warmup == "linear":
        return decay * (1.0 - (1.0 - ratio) * remaining)
    if warmup == "exp":
        return decay * ratio**remaining
    raise ValueError(f"warmup = {warmup!r} is invalid: expected one of ('linear', 'exp', 'none').")


def effective_decay(step: int, decay: float, warmup: str, warmup_steps: int, ratio: float, update_every: int) -> float:
    """Decay applied by one update every ``update_every`` steps: ``m_t ** update_every`` (same horizon in steps)."""
    return warmup_decay(step, decay, warmup, warmup_steps, ratio) ** update_every


def ema_action(step: int, update_every: int, update_after_step: int) -> EMAAction:
    """What to do after optimizer step ``step``: copy the weights until ``update_after_step``, then average every
    ``update_every`` steps."""
    if step <= update_after_step:
        return EMAAction.COPY
    return EMAAction.UPDATE if step % update_every == 0 else EMAAction.SKIP


def should_switch_at_epoch_end(completed_epochs: int, every: int, start: int) -> bool:
    """True when the epoch ``e = completed_epochs - 1`` ends a switching interval: ``e + 1 > start`` and
    ``(e + 1) % every == 0``."""
    return completed_epochs > start and completed_epochs % every == 0


def should_switch_at_step(step: int, every: int | None, update_after_step: int) -> bool:
    """Step-counted switching: every ``every`` optimizer steps once averaging has started."""
    return every is not None and step > update_after_step and step % every == 0


def completed_epochs_at_epoch_end(state_epoch: float | None, tolerance: float = 1e-6) -> int | None:
    """Number of completed epochs when the Trainer reports an epoch end, or None when the epoch was cut short.

    The Trainer sets ``state.epoch = e + (step + 1) / steps_in_epoch``, which is the integer ``e + 1`` after a full
    epoch and fractional when ``max_steps`` stops training mid-epoch; an unfinished epoch is no switch point.
    """
    if state_epoch is None:
        return None
    nearest = round(state_epoch)
    return nearest if nearest >= 1 and math.isclose(state_epoch, nearest, abs_tol=tolerance) else None


def epoch_end_skipped_by_resume(state_epoch: float | None, steps_since_decision: int) -> bool:
    """Whether a run resuming at ``state_epoch`` must run the switch point of the epoch end it resumes at.

    A checkpoint saved at an epoch's last step by ``save_steps`` is written before that epoch's ``on_epoch_end``
    (``save_strategy="epoch"`` saves after it), and the resumed Trainer starts with the next epoch, never firing
    that epoch end. ``steps_since_decision`` (saved with the EMA, reset at every switch decision) tells the two
    apart: optimizer steps since the last decision mean the epoch end's switch point has not run yet.
    """
    return completed_epochs_at_epoch_end(state_epoch) is not None and steps_since_decision > 0


def resolve_warmup_steps(warmup_steps: int | None, steps_per_epoch: int | None) -> int:
    """``warmup_steps`` when given, else one epoch: the Trainer's optimizer steps per epoch (also with
    ``max_steps``, which sets the run's length, not the epoch's); 0 when neither is known."""
    if warmup_steps is not None:
        return warmup_steps
    return max(1, steps_per_epoch) if steps_per_epoch else 0
