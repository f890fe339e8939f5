"""Evaluation bookkeeping: which weights an evaluation reads, which metric compares raw and average weights.

The Trainer runs one evaluation per eval set (``eval_dataset`` may be a dict) and fires ``on_evaluate`` after
each; no hook fires before an evaluation. So the callback swaps the average in when ``DefaultFlowCallback`` has
set ``control.should_evaluate`` and swaps it out after the last of the `eval_set_count` evaluations, before the
checkpoint that may follow. With ``evaluate_with="both"`` (and for ``switch_policy="if_better"``) the Trainer's
own evaluations read the raw weights (``eval_*``), and one more evaluation of every set reads the average
(``eval_ema_*``, or ``eval_ema_<name>_*`` for a dict), after the last raw one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch


def eval_set_count(eval_dataset: Any) -> int:
    """How many ``on_evaluate`` calls one evaluation by the Trainer makes: one per set of a dict."""
    return len(eval_dataset) if isinstance(eval_dataset, dict) else 1


def metric_keys(metric_for_best_model: str | None, eval_dataset: Any) -> tuple[str, str]:
    """The raw and the average's key of the metric that compares them (``metric_for_best_model``, default loss).

    ``"loss"`` -> ``("eval_loss", "eval_ema_loss")``; with a dict eval set the metric must name one set:
    ``"eval_val_loss"`` -> ``("eval_val_loss", "eval_ema_val_loss")``.
    """
    metric = metric_for_best_model or "loss"
    if metric.startswith("eval_ema_"):
        metric = "eval_" + metric[len("eval_ema_") :]
    if not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    if isinstance(eval_dataset, dict) and not any(metric.startswith(f"eval_{name}_") for name in eval_dataset):
        raise ValueError(
            f"SEMA compares raw and EMA weights on metric_for_best_model = {metric_for_best_model!r}, but with several "
            f"eval sets {sorted(eval_dataset)} it must name one of them, e.g. 'eval_{next(iter(eval_dataset))}_loss'."
        )
    return metric, "eval_ema_" + metric[len("eval_") :]


def average_is_better(raw: float, ema: float, greater_is_better: bool) -> bool:
    """Whether the average scores strictly better than the raw weights (ties keep the raw weights)."""
    return ema > raw if greater_is_better else ema < raw


def weights_behind_best_metric(evaluate_with: str, metric_for_best_model: str | None) -> str:
    """Which weights the metric that picked the best checkpoint measured: ``"ema"`` or ``"model"``.

    With ``evaluate_with="ema"`` every ``eval_*`` is the average's; with ``"both"`` only ``eval_ema_*`` is; with
    ``"model"`` none is. The run must end on those weights, or the model it saves is not the one that scored best.
    """
    metric = metric_for_best_model or "loss"
    if evaluate_with == "ema":
        return "ema"
    if evaluate_with == "both" and metric.removeprefix("eval_").startswith("ema_"):
        return "ema"
    return "model"


def rng_kept() -> AbstractContextManager:
    """Restore torch's CPU RNG, and each initialized CUDA device's, on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


class EvaluationRound:
    """One evaluation by the Trainer's flow, as SEMA sees it: which weights it reads, how many eval sets are
    left, what they returned; plus the extra pass over the average when raw and EMA weights are compared.

    ``begin`` when ``control.should_evaluate`` was just set (or for ``eval_on_start``); ``on_evaluate`` after each
    eval set returns True after the last one, with the raw weights back in place. ``swap_out`` is safe at any time.
    """

    def __init__(self) -> None:
        self.pending = 0
        self.metrics: dict[str, float] = {}
        self.uses_ema = False
        self.evaluating_average = False
        self._swap: ExitStack | None = None

    @property
    def swapped_in(self) -> bool:
        return self._swap is not None

    def begin(self, eval_dataset: Any, swap_in: Callable[[], AbstractContextManager] | None) -> None:
        """An evaluation of ``eval_dataset`` is about to run; with ``swap_in`` it reads the average."""
        if self.pending > 0:
            return
        self.pending = eval_set_count(eval_dataset)
        self.metrics = {}
        self.uses_ema = swap_in is not None
        if swap_in is not None and self._swap is None:
            self._swap = ExitStack()
            self._swap.enter_context(swap_in())

    def on_evaluate(self, metrics: dict[str, float] | None) -> bool:
        """Record one eval set's metrics; True once the last set of this round was evaluated (weights restored).
        Evaluations outside a round (the user's, or our own pass over the average) are ignored."""
        if self.evaluating_average or self.pending == 0:
            return False
        self.metrics.update(metrics or {})
        self.pending -= 1
        if self.pending > 0:
            return False
        self.swap_out()
        return True

    def evaluate_average(self, trainer: Any, swap_in: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """Evaluate every eval set with the average swapped in (``eval_ema_*``), through the Trainer.

        The random number generators come back as they were: every evaluation makes a DataLoader iterator, which
        draws its seed from the global RNG, so without this the extra evaluation would shift the dropout masks
        training draws next, and a guarded switch that keeps the raw weights would not train as no averaging does.
        """
        self.evaluating_average = True
        try:
            with swap_in(), rng_kept():
                found = trainer.evaluate(metric_key_prefix="eval_ema")
        finally:
            self.evaluating_average = False
        self.metrics.update(found)
        return found

    def average_wins(self, args: Any, eval_dataset: Any) -> bool:
        """Whether the average scored better than the raw weights on ``metric_for_best_model`` in this round."""
        raw_key, ema_key = metric_keys(args.metric_for_best_model, eval_dataset)
        missing = [k for k in (raw_key, ema_key) if k not in self.metrics]
        if missing:
            raise KeyError(
                f"SEMA(switch_policy='if_better') compares {raw_key} with {ema_key}, but the evaluation returned no "
                f"{missing}; available: {sorted(self.metrics)}. Set metric_for_best_model to one of them."
            )
        greater = bool(args.greater_is_better) if args.metric_for_best_model else False
        return average_is_better(self.metrics[raw_key], self.metrics[ema_key], greater)

    def reset(self) -> None:
        self.swap_out()
        self.pending = 0

    def swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()
