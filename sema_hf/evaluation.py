"""Evaluation bookkeeping: which weights an evaluation reads, which metric compares raw and average weights.

The Trainer runs one evaluation per eval set (``eval_dataset`` may be a dict) and fires ``on_evaluate`` after
each; no hook fires before an evaluation. So the callback swaps the average in when ``DefaultFlowCallback`` has
set ``control.should_evaluate`` and swaps it out after the last of the `eval_set_count` evaluations, before the
checkpoint that may follow. With ``evaluate_with="both"`` (and for ``switch_policy="if_better"``) the Trainer's
own evaluations read the raw weights (``eval_*``), and one more evaluation of every set reads the average
(``eval_ema_*``, or ``eval_ema_<name>_*`` for a dict), after the last raw one.
"""

from __future__ import annotations

from typing import Any


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
