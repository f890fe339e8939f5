"""The evaluation contract: what SEMA evaluates, when, and what the Trainer's numbers then mean.

The dict that ``Trainer.evaluate()`` returns is read by more than the logs: the best checkpoint
(``_determine_best_metric``, ``load_best_model_at_end``), ``EarlyStoppingCallback`` (every ``on_evaluate`` counts),
``hyperparameter_search``'s default objective (``eval_loss``, or the sum of the other metrics), ReduceLROnPlateau,
the model card. So SEMA keeps three rules:

1. SEMA's own passes (the raw weights and the average at a guarded switch point, the average with
   ``evaluate_with="both"``) run through ``trainer.evaluation_loop`` directly, never through ``evaluate()``: no other
   callback's ``on_evaluate`` fires and the Trainer logs no extra evaluation. They run *before* the Trainer's own
   evaluation, with the train() call's ``ignore_keys_for_eval``, and put the random number generators back.
2. The dict ``evaluate()`` returns has the keys it has without SEMA. SEMA's numbers (``eval_ema_*``,
   ``eval_raw_*``) and bookkeeping (``ema_switched``, ``ema_switches``) are logged in their own entry; a key of
   SEMA's goes into the Trainer's dict only when ``metric_for_best_model`` names it (the Trainer must find it there).
3. ``eval_*`` describes the weights the checkpoint saved right after that evaluation holds. With
   ``evaluate_with="ema"`` those are the average (swapped in for the evaluation; the checkpoint keeps it beside the
   raw weights, and ``load_best_model_at_end`` ends on it). With ``evaluate_with="both"`` or
   ``switch_policy="if_better"``, ``eval_*`` are the weights the model holds after the switch point's decision
   (the average when it was copied in, the raw weights when they were kept), ``eval_raw_*`` the raw weights
   before that decision (logged at switch points only) and ``eval_ema_*`` the average.

The Trainer runs one evaluation per eval set (``eval_dataset`` may be a dict) and fires ``on_evaluate`` after each;
no hook fires before an evaluation, so `EvaluationRound` begins when ``DefaultFlowCallback`` has set
``control.should_evaluate`` (SEMA's ``on_step_end`` / ``on_epoch_end`` run after it) and ends after the last set's
``on_evaluate``, before the checkpoint that may follow.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from enum import Enum
from typing import Any

import torch
from transformers.trainer_callback import ProgressCallback

from .selection import eval_key

# The prefixes of SEMA's own passes: the average, and the raw weights before a switch point's decision.
EMA_PREFIX = "eval_ema"
RAW_PREFIX = "eval_raw"

# Timing keys of an evaluation loop, not measurements of the weights.
_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def eval_set_count(eval_dataset: Any) -> int:
    """How many ``on_evaluate`` calls one evaluation by the Trainer makes: one per set of a dict."""
    return len(eval_dataset) if isinstance(eval_dataset, dict) else 1


def plain_metric(metric: str | None) -> str:
    """``metric_for_best_model`` as the Trainer's key of the same measurement: ``"loss"``, ``"eval_ema_loss"`` and
    ``"eval_raw_loss"`` -> ``"eval_loss"``."""
    metric = metric or "loss"
    for prefix in (EMA_PREFIX + "_", RAW_PREFIX + "_"):
        if metric.startswith(prefix):
            metric = "eval_" + metric[len(prefix) :]
    return eval_key(metric)


def metric_keys(metric_for_best_model: str | None, eval_dataset: Any) -> tuple[str, str]:
    """The raw and the average's key of the metric that compares them (``metric_for_best_model``, default loss).

    ``"loss"`` -> ``("eval_raw_loss", "eval_ema_loss")``; with a dict eval set the metric must name one set:
    ``"eval_val_loss"`` -> ``("eval_raw_val_loss", "eval_ema_val_loss")``.
    """
    metric = plain_metric(metric_for_best_model)
    if isinstance(eval_dataset, dict) and not any(metric.startswith(f"eval_{name}_") for name in eval_dataset):
        raise ValueError(
            f"SEMA compares raw and EMA weights on metric_for_best_model = {metric_for_best_model!r}, but with several "
            f"eval sets {sorted(eval_dataset)} it must name one of them, e.g. 'eval_{next(iter(eval_dataset))}_loss'."
        )
    rest = metric[len("eval_") :]
    return f"{RAW_PREFIX}_{rest}", f"{EMA_PREFIX}_{rest}"


def sema_metric_named(metric_for_best_model: str | None) -> str | None:
    """The key of SEMA's that ``metric_for_best_model`` names (``"eval_ema_loss"``, ``"ema_loss"``...), or None
    when it names one of the Trainer's own keys."""
    if metric_for_best_model is None:
        return None
    metric = eval_key(metric_for_best_model)
    return metric if metric.startswith((EMA_PREFIX + "_", RAW_PREFIX + "_")) else None


def average_is_better(raw: float, ema: float, greater_is_better: bool) -> bool:
    """Whether the average scores strictly better than the raw weights (ties keep the raw weights)."""
    return ema > raw if greater_is_better else ema < raw


def weights_behind_best_metric(evaluate_with: str, metric_for_best_model: str | None) -> str:
    """Which weights of the best checkpoint its metric measured: ``"ema"`` (its EMA files) or ``"model"`` (its
    model files).

    With ``evaluate_with="ema"`` every ``eval_*`` is the average's; with ``"both"`` (and ``if_better``) ``eval_*`` is
    the weights the model held after the switch point's decision, which the checkpoint's model files hold, and
    ``eval_ema_*`` the average's; with ``"model"`` every number is the model's. The run must end on those weights,
    or the model it saves is not the one that scored best.
    """
    if evaluate_with == "ema":
        return "ema"
    if evaluate_with == "both" and (sema_metric_named(metric_for_best_model) or "").startswith(EMA_PREFIX + "_"):
        return "ema"
    return "model"


def describe_eval_data(eval_dataset: Any, name: str | None = None) -> str:
    """What SEMA's passes over ``eval_dataset`` read, in words for tables and model cards: ``"eval_dataset (200
    examples)"``, ``"eval_dataset['validation'] (16 examples)"`` for the set ``name`` of a dict, or every set."""
    if isinstance(eval_dataset, dict):
        if name is not None:
            return f"eval_dataset[{name!r}] ({_size(eval_dataset[name])})"
        return "eval_dataset sets " + ", ".join(f"{n} ({_size(data)})" for n, data in eval_dataset.items())
    return f"eval_dataset ({_size(eval_dataset)})"


def eval_set_named(metric: str, eval_dataset: Any) -> str | None:
    """The set of a dict ``eval_dataset`` that the key ``metric`` (``"eval_<name>_loss"``) names; None for one set
    or when it names none (the longest matching name wins, so ``"eval_val_x_loss"`` picks ``"val_x"`` over
    ``"val"``)."""
    if not isinstance(eval_dataset, dict):
        return None
    key = plain_metric(metric)
    named = [name for name in eval_dataset if key.startswith(f"eval_{name}_")]
    return max(named, key=len) if named else None


def _size(data: Any) -> str:
    try:
        return f"{len(data):,} examples"
    except TypeError:
        return "an iterable dataset"


def rng_kept() -> AbstractContextManager:
    """Restore torch's CPU RNG, and each initialized CUDA device's, on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def evaluate_weights(
    trainer: Any,
    metric_key_prefix: str,
    ignore_keys: list[str] | None = None,
    swap_in: Callable[[], AbstractContextManager] | None = None,
    only: str | None = None,
) -> dict[str, float]:
    """Evaluate every eval set of ``trainer`` (or the set ``only`` of a dict) through its evaluation loop
    (``metric_key_prefix``, or ``<prefix>_<name>`` for a set of a dict), with ``swap_in`` (the average) in place
    when given.

    No ``on_evaluate`` fires and nothing is logged (``evaluate()`` does both; this is SEMA's own pass), only the
    per-batch ``on_prediction_step`` (the console progress bar shows the pass, then is closed). The weights come back on the way out, exception or not (the swap is a context
    manager). The random number generators come back as they were: every evaluation makes a DataLoader iterator,
    which draws its seed from the global RNG, so without this the extra pass would shift the dropout masks training
    draws next, and a guarded switch that keeps the raw weights would not train as no averaging does.
    """
    sets = trainer.eval_dataset
    named: list[tuple[str | None, str]] = (
        [(name, f"{metric_key_prefix}_{name}") for name in sets]
        if isinstance(sets, dict)
        else [(None, metric_key_prefix)]
    )
    if only is not None:
        named = [(name, prefix) for name, prefix in named if name == only]
    found: dict[str, float] = {}
    with ExitStack() as stack:
        stack.enter_context(rng_kept())
        stack.enter_context(_accumulated_metrics_kept(trainer))
        if swap_in is not None:
            stack.enter_context(swap_in())
        for name, prefix in named:
            output = trainer.evaluation_loop(
                trainer.get_eval_dataloader(name),
                description="SEMA evaluation",
                prediction_loss_only=True if trainer.compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=prefix,
            )
            found.update({k: v for k, v in output.metrics.items() if not k.endswith(_TIMING_SUFFIXES)})
            _close_progress_bars(trainer)
    return found


def _close_progress_bars(trainer: Any) -> None:
    """The console progress bar counts every ``on_prediction_step`` until the next ``on_evaluate`` /
    ``on_predict`` closes it: close the one SEMA's pass opened, so the Trainer's evaluation gets its own."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            callback.on_predict(trainer.args, trainer.state, trainer.control)


@contextmanager
def _accumulated_metrics_kept(trainer: Any) -> Iterator[None]:
    """Trainer subclasses that accumulate per-batch numbers in ``trainer._metrics`` (TRL's ``SFTTrainer``,
    ``DPOTrainer``: token accuracy, rewards) and average them into the next ``log()`` get back what they had, so
    SEMA's passes do not leak into the Trainer's own evaluation entry."""
    accumulated = getattr(trainer, "_metrics", None)
    saved = copy.deepcopy(accumulated) if isinstance(accumulated, dict) else None
    try:
        yield
    finally:
        if saved is not None:
            accumulated.clear()
            accumulated.update(saved)


class RoundPhase(str, Enum):
    """Where the Trainer's flow is in one evaluation, as SEMA sees it."""

    IDLE = "idle"  # no evaluation of the Trainer's flow under way (a user's evaluate() is left alone)
    EVALUATING = "evaluating"  # the Trainer evaluates now: `pending` eval sets are still to report


class EvaluationRound:
    """One evaluation by the Trainer's flow: which weights it reads, how many eval sets are left, and SEMA's own
    numbers measured before it (``sema_metrics``: ``eval_ema_*``, ``eval_raw_*``).

    Transitions: ``begin`` (IDLE -> EVALUATING) when ``control.should_evaluate`` was just set, or for
    ``eval_on_start``; ``on_evaluate`` after each eval set, back to IDLE after the last one with the raw weights in
    place; ``reset`` (any -> IDLE) at every step start, save, train end, or when an exception left the round open.
    ``add_to_trainer_metrics`` puts the key ``metric_for_best_model`` names into the Trainer's dict of this round
    (from ``on_log``, which the Trainer fires with that very dict before any ``on_evaluate``, so every callback's
    ``on_evaluate`` sees it, in any callback order). Nothing here depends on where SEMA sits among the callbacks.
    """

    def __init__(self) -> None:
        self.phase = RoundPhase.IDLE
        self.pending = 0
        self.uses_ema = False
        self.sema_metrics: dict[str, float] = {}
        self._swap: ExitStack | None = None

    @property
    def swapped_in(self) -> bool:
        return self._swap is not None

    def begin(
        self,
        eval_dataset: Any,
        swap_in: Callable[[], AbstractContextManager] | None,
        sema_metrics: Mapping[str, float] | None = None,
    ) -> None:
        """The Trainer is about to evaluate ``eval_dataset``; with ``swap_in`` it reads the average."""
        if self.phase is RoundPhase.EVALUATING:
            return
        self.phase = RoundPhase.EVALUATING
        self.pending = eval_set_count(eval_dataset)
        self.uses_ema = swap_in is not None
        self.sema_metrics = dict(sema_metrics or {})
        if swap_in is not None and self._swap is None:
            swap = ExitStack()
            swap.enter_context(swap_in())
            self._swap = swap

    def add_to_trainer_metrics(self, metrics: dict[str, float] | None, sema_key: str | None) -> None:
        """Put ``sema_key`` (the key of SEMA's that ``metric_for_best_model`` names) into the Trainer's dict of one
        eval set of this round, when that dict measured the same thing (its plain key is there). ``eval_raw_*`` of
        a round without a switch decision is the Trainer's own ``eval_*``: the raw weights were not touched."""
        if self.phase is not RoundPhase.EVALUATING or metrics is None or sema_key is None or sema_key in metrics:
            return
        plain = plain_metric(sema_key)
        if plain not in metrics:
            return
        if sema_key in self.sema_metrics:
            metrics[sema_key] = self.sema_metrics[sema_key]
        elif sema_key.startswith(RAW_PREFIX + "_"):
            metrics[sema_key] = metrics[plain]

    def on_evaluate(self) -> bool:
        """One eval set reported; True once the last set of this round did (the raw weights are back in place).
        Evaluations outside a round (the user's) are ignored."""
        if self.phase is not RoundPhase.EVALUATING:
            return False
        self.pending -= 1
        if self.pending > 0:
            return False
        self.reset()
        return True

    def reset(self) -> None:
        """Back to IDLE with the raw weights in place (safe at any time, also after an exception)."""
        self.swap_out()
        self.phase = RoundPhase.IDLE
        self.pending = 0

    def swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()
