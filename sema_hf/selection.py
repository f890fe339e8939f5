"""Choosing the average after training: the grid of targets, the sweep table, and its JSON and plot.

`SEMA.posthoc_sweep` evaluates candidates one by one and this module keeps the books. A candidate is

* a post-hoc target (`sema_hf.posthoc`: a power-function profile reconstructed from the snapshots of the whole run),
  written ``"sigma_rel=0.07"``, ``"horizon_steps=500"`` or ``"horizon_epochs=1"``;
* ``"ema"``: the classic EMA the run kept (`SEMAConfig.decay` / ``horizon_*``), as it stands at the end;
* ``"raw"``: the weights the model holds (the training weights at the end, or what ``load_best_model_at_end``
  loaded);
* any further labelled average (the Trainer adds ``"best_checkpoint_ema"``: the best checkpoint's average, when
  its metric measured that average).

Every candidate is scored by one function of the weights the model holds (lower is better unless
``greater_is_better``); the best wins, and ties go to the earlier row of `ROW_ORDER` (the raw weights before any
average, the classic EMA before the post-hoc ones, then the grid in its order), so an average must be strictly
better to be chosen. A score that is not a finite number never wins.

A sweep is selection on the data it scores, so its numbers are optimistic for the chosen row: with a handful of
candidates on a validation set of a few thousand examples the bias is small next to the differences between
horizons that decide the choice (docs/evidence), but report the chosen model's score on data the sweep did not see.

This module knows neither the Trainer nor the core: tensors and files only (matplotlib is imported lazily, Agg).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: The kinds of post-hoc target a grid may name, in the units users set elsewhere (`sema_hf.posthoc`).
TARGET_KINDS = ("sigma_rel", "horizon_steps", "horizon_epochs")
#: A power-function profile's relative width stays below 1/sqrt(12) (its value at exponent 0).
SIGMA_REL_LIMIT = 12**-0.5
#: The candidates every sweep compares besides the grid.
RAW = "raw"
EMA = "ema"
ROW_ORDER = (RAW, EMA)
SWEEP_JSON = "posthoc_sweep.json"
SWEEP_PNG = "posthoc_sweep.png"


@dataclass(frozen=True)
class Target:
    """One post-hoc target: ``kind`` in `TARGET_KINDS` and its value (``sigma_rel`` in (0, 0.5), horizons > 0)."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        """``"sigma_rel=0.07"``: the spelling of `parse_target`, and the row's name in tables."""
        return f"{self.kind}={self.value:g}"

    def as_kwargs(self) -> dict[str, float]:
        """The keyword argument of `SEMA.posthoc_average` / `sema_hf.posthoc.reconstruct` for this target."""
        return {self.kind: self.value}


def parse_target(spec: str | Mapping[str, Any] | Target) -> Target:
    """A `Target` from ``"sigma_rel=0.07"`` / ``"horizon_epochs=1"`` / ``"horizon_steps=500"`` (or a one-item
    dict such as ``{"sigma_rel": 0.07}``); ``ValueError`` naming the spelling that is allowed otherwise."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, Mapping):
        items = list(spec.items())
        kind, value = items[0] if len(items) == 1 else (None, None)
    elif isinstance(spec, str) and spec.count("=") == 1:
        kind, text = (part.strip() for part in spec.split("="))
        try:
            value = float(text)
        except ValueError:
            value = None
    else:
        kind, value = None, None
    ok = (
        kind in TARGET_KINDS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
        and (kind != "sigma_rel" or value < 0.5)
    )
    if not ok:
        raise ValueError(
            f"SEMAConfig.posthoc_grid: {spec!r} is not a post-hoc target: expected 'sigma_rel=S' (0 < S < 0.5), "
            "'horizon_steps=H' (optimizer steps > 0) or 'horizon_epochs=E' (epochs > 0), e.g. 'sigma_rel=0.07'. "
            f"The classic EMA ({EMA!r}) and the raw weights ({RAW!r}) are always compared; do not list them."
        )
    return Target(str(kind), float(value))


def parse_grid(grid: Iterable[str | Mapping[str, Any] | Target]) -> list[Target]:
    """The targets of ``grid`` in order, duplicates dropped; ``ValueError`` for an empty grid or a bad entry."""
    if isinstance(grid, str | Mapping):
        grid = [grid]
    targets: list[Target] = []
    for spec in grid:
        target = parse_target(spec)
        if target not in targets:
            targets.append(target)
    if not targets:
        raise ValueError("SEMAConfig.posthoc_grid = [] is empty: give None (the default grid) or at least one target.")
    return targets


def default_grid(
    tracked_sigma_rels: Sequence[float],
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
) -> list[Target]:
    """The grid a sweep uses when ``posthoc_grid`` is None: relative widths around the tracked profiles, and the
    horizons users set elsewhere. `SEMA.posthoc_sweep` then leaves out every target the snapshots do not reach
    (`sema_hf.posthoc`: fit error over 5%), so the grid may be generous.

    * ``sigma_rel``: the tracked widths and steps of sqrt(2) from half the smallest to twice the largest, e.g.
      tracked (0.05, 0.10) -> 0.025, 0.0354, 0.05, 0.0707, 0.1, 0.141, 0.2. `sema_hf.posthoc` measured that
      snapshots every T/64 (or closer) reach 0.02 to 0.25 within 1.5% from (0.05, 0.10).
    * ``horizon_epochs`` 0.3, 1 and 3 (the horizons of the study, docs/evidence) when the epoch's length is known
      and the horizon is shorter than the run: an exponential EMA of horizon H steps at step T resembles
      ``sigma_rel ~ H / T``, reached from about 0.02 T to 0.3 T (`sema_hf.posthoc`).
    """
    tracked = sorted(float(s) for s in tracked_sigma_rels)
    if not tracked:
        raise ValueError("default_grid needs the tracked sigma_rels (SEMAConfig.posthoc_sigma_rels).")
    low, high = tracked[0], tracked[-1]
    widths = set(tracked)
    k = -2
    while low * 2 ** (k / 2) <= min(2 * high, SIGMA_REL_LIMIT) * (1 + 1e-9):
        widths.add(float(f"{low * 2 ** (k / 2):.3g}"))
        k += 1
    grid = [Target("sigma_rel", w) for w in sorted(widths)]
    if steps_per_epoch:
        for epochs in (0.3, 1.0, 3.0):
            if total_steps is None or epochs * steps_per_epoch < total_steps:
                grid.append(Target("horizon_epochs", epochs))
    return grid


@dataclass
class SweepRow:
    """One candidate of a sweep: its label, what it is, its score and every metric measured with it.

    ``horizon_steps``: the candidate's horizon in optimizer steps where it has one (the classic EMA's ``1/(1-m)``;
    a post-hoc target's equivalent, from its kind or its fit report), for the plot; None for the raw weights.
    ``fit``: the reconstruction's fit report (`sema_hf.posthoc`), for post-hoc targets.
    """

    label: str
    kind: str
    score: float
    description: str = ""
    value: float | None = None
    horizon_steps: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def is_posthoc(self) -> bool:
        return self.kind in TARGET_KINDS

    @property
    def target(self) -> Target | None:
        """The post-hoc target of this row (None for the raw weights, the classic EMA and other averages)."""
        return Target(self.kind, float(self.value)) if self.is_posthoc and self.value is not None else None


@dataclass
class PosthocSweep:
    """The table `SEMA.posthoc_sweep` returns: every candidate's score on ``metric`` and the one chosen.

    ``chosen`` is the label of the best row (`best_index`); ``step`` the optimizer step of the weights compared;
    ``data`` says what the scores were measured on (the Trainer writes its eval set's name and size).
    """

    metric: str
    greater_is_better: bool
    rows: list[SweepRow]
    chosen: str
    step: int = 0
    data: str = ""
    steps_per_epoch: int | None = None

    @property
    def chosen_row(self) -> SweepRow:
        return self.row(self.chosen)

    def row(self, label: str) -> SweepRow:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no row {label!r} in the sweep; rows: {[r.label for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "chosen": self.chosen,
            "step": self.step,
            "data": self.data,
            "steps_per_epoch": self.steps_per_epoch,
            # a score that is not a number (a target out of reach) is null: strict JSON has no NaN
            "rows": [{**asdict(row), "score": row.score if _finite(row.score) else None} for row in self.rows],
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PosthocSweep:
        values = dict(values)
        values["rows"] = [
            SweepRow(**{**row, "score": math.nan if row["score"] is None else row["score"]}) for row in values["rows"]
        ]
        return cls(**values)

    def save(self, folder: str) -> list[str]:
        """Write ``posthoc_sweep.json`` and (with matplotlib installed) ``posthoc_sweep.png`` into ``folder`` (call
        it on the main process only); returns the paths written."""
        paths = [write_json(self, folder)]
        try:
            paths.append(plot(self, folder))
        except ImportError:
            logger.warning(f"SEMA: matplotlib is not installed, so no {SWEEP_PNG} was written.")
        return paths

    def log_values(self) -> dict[str, float]:
        """What the Trainer logs (numbers only, so every reporting integration takes them): each row's score as
        ``posthoc_<metric>/<label>`` and the chosen one's as ``posthoc_<metric>/chosen``."""
        key = f"posthoc_{self.metric}"
        logs = {f"{key}/{_tag(row.label)}": float(row.score) for row in self.rows}
        logs[f"{key}/chosen"] = float(self.chosen_row.score)
        return logs

    def markdown(self) -> str:
        """The table as Markdown (the model card, the console): one row per candidate, the chosen one in bold."""
        epochs = self.steps_per_epoch
        head = f"| candidate | what it is | horizon (steps{', epochs' if epochs else ''}) | {self.metric} |"
        lines = [head, "|---|---|---|---|"]
        for row in self.rows:
            if row.horizon_steps is None:
                horizon = "-"
            else:
                horizon = f"{row.horizon_steps:.4g}" + (f" ({row.horizon_steps / epochs:.3g})" if epochs else "")
            name = f"**{row.label}** (chosen)" if row.label == self.chosen else row.label
            score = _number(row.score) if _finite(row.score) else "not reached"
            lines.append(f"| {name} | {row.description} | {horizon} | {score} |")
        return "\n".join(lines)


def horizon_steps_of(target: Target, step: int, steps_per_epoch: int | None) -> float | None:
    """A target's horizon in optimizer steps at ``step``, for the plot: horizons as given (epochs times the epoch's
    length); a relative width as ``sigma_rel * step``, the standard deviation of the profile's weights over the
    steps, which an exponential EMA of horizon H steps has as well (about H) - the same equivalence
    `default_grid` uses."""
    if target.kind == "horizon_steps":
        return target.value
    if target.kind == "horizon_epochs":
        return target.value * steps_per_epoch if steps_per_epoch else None
    return target.value * step if step > 0 else None


def choose(scores: Sequence[float], greater_is_better: bool) -> int:
    """The index of the best score (ties: the first); a score that is not finite never wins unless all are not."""
    best = 0
    for i, score in enumerate(scores):
        if not _finite(score):
            continue
        if not _finite(scores[best]) or (score > scores[best] if greater_is_better else score < scores[best]):
            best = i
    return best


def greater_is_better_for(metric: str, metric_for_best_model: str | None, greater_is_better: bool | None) -> bool:
    """The direction of ``metric`` in a Trainer run: ``TrainingArguments.greater_is_better`` when it was set for
    this very metric (``metric_for_best_model`` unset or naming the same key), else the Trainer's own rule: lower
    is better for a key ending in ``loss``, higher for the rest."""
    same = metric_for_best_model is None or eval_key(metric_for_best_model) == eval_key(metric)
    if greater_is_better is not None and same:
        return bool(greater_is_better)
    return not eval_key(metric).endswith("loss")


def write_json(sweep: PosthocSweep, folder: str) -> str:
    """Write ``posthoc_sweep.json`` into ``folder`` atomically; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SWEEP_JSON)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sweep.to_dict(), f, indent=2, default=_jsonable, allow_nan=False)
    os.replace(tmp, path)
    return path


def plot(sweep: PosthocSweep, folder: str) -> str:
    """Write ``posthoc_sweep.png`` into ``folder``: the metric against the horizon (epochs when the epoch's length
    is known, else optimizer steps; log scale) for the post-hoc targets, the classic EMA as a star at its horizon,
    the raw weights (and any other average without a horizon) as horizontal lines, the chosen row circled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    scale = sweep.steps_per_epoch or 1
    unit = "epochs" if sweep.steps_per_epoch else "optimizer steps"
    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = figure.add_subplot()
    posthoc = sorted((r for r in sweep.rows if r.is_posthoc and r.horizon_steps), key=lambda r: r.horizon_steps)
    if posthoc:
        ax.plot(
            [r.horizon_steps / scale for r in posthoc],
            [r.score for r in posthoc],
            "o-",
            color="tab:blue",
            label="post-hoc average",
        )
        for r in posthoc:
            ax.annotate(
                r.label, (r.horizon_steps / scale, r.score), fontsize=6, xytext=(3, 4), textcoords="offset points"
            )
    styles = iter(["tab:gray", "tab:green", "tab:purple", "tab:brown"])
    for row in sweep.rows:
        if row.is_posthoc:
            continue
        if row.horizon_steps:
            ax.plot([row.horizon_steps / scale], [row.score], "*", color="tab:orange", markersize=14, label=row.label)
        else:
            ax.axhline(row.score, linestyle="--", color=next(styles, "black"), label=row.label)
    chosen = sweep.chosen_row
    if chosen.horizon_steps:
        ax.plot([chosen.horizon_steps / scale], [chosen.score], "o", mfc="none", mec="red", markersize=16, mew=2)
    if posthoc or any(r.horizon_steps for r in sweep.rows):
        ax.set_xscale("log")
    ax.set_xlabel(f"averaging horizon ({unit})")
    ax.set_ylabel(sweep.metric + (" (higher is better)" if sweep.greater_is_better else " (lower is better)"))
    ax.set_title(f"post-hoc EMA at step {sweep.step}: chosen {chosen.label}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SWEEP_PNG)
    tmp = f"{path}.tmp{os.getpid()}.png"
    figure.savefig(tmp)
    os.replace(tmp, path)
    return path


def eval_key(metric: str) -> str:
    """A metric as the key ``Trainer.evaluate`` reports it under (the Trainer's own rule for
    ``metric_for_best_model``): ``"loss"`` -> ``"eval_loss"``; a key with the prefix stays as it is."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _tag(label: str) -> str:
    """A label as a logging key part that TensorBoard keeps as is: ``sigma_rel=0.07`` -> ``sigma_rel_0.07``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _number(value: float) -> str:
    return f"{value:.5g}" if _finite(value) else str(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
