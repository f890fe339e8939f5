"""Post-hoc selection (issue 22, part 3): choosing the average after training among post-hoc reconstructions, the
classic EMA and the raw weights; putting it into the model; the table, its JSON, plot, log and model card."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sema_hf import SEMAConfig
from sema_hf.engines.base import Slot
from sema_hf.selection import (
    PosthocSweep,
    SweepRow,
    Target,
    choose,
    default_grid,
    greater_is_better_for,
    parse_grid,
    parse_target,
    plot,
    write_json,
)
from sema_hf.store import EMAStore


# ---- the store: arbitrary local values, swapped in or written for good ---------------------------------------------
def test_write_puts_given_values_into_source_and_compute_copy_and_leaves_the_average():
    master = torch.zeros(4)
    compute = torch.zeros(4, dtype=torch.bfloat16)
    store = EMAStore([Slot("w", master, compute)])
    master.fill_(2.0)
    store.update(0.5)  # average 1.0
    written = []
    store._after_write = lambda: written.append(True)
    store.write({"w": torch.full((4,), 0.25, dtype=torch.float64)})
    assert torch.equal(master, torch.full((4,), 0.25))
    assert torch.equal(compute, torch.full((4,), 0.25, dtype=torch.bfloat16))
    assert torch.equal(store.state_dict()["w"], torch.full((4,), 1.0))
    assert written == [True]


def test_swapped_in_given_values_shows_them_and_restores_the_raw_weights_bit_for_bit():
    master = torch.randn(6)
    compute = master.to(torch.bfloat16)
    store = EMAStore([Slot("w", master, compute)])
    raw_master, raw_compute = master.clone(), compute.clone()
    other = torch.linspace(-1, 1, 6)
    with store.swapped_in({"w": other}):
        assert torch.equal(compute, other.to(torch.bfloat16))
        assert torch.equal(master, raw_master)  # the optimizer's copy is never touched by a swap
    assert torch.equal(master, raw_master) and torch.equal(compute, raw_compute)


def test_write_and_swap_refuse_values_of_another_layout():
    store = EMAStore([Slot("w", torch.zeros(4))])
    with pytest.raises(ValueError, match="missing"):
        store.write({"v": torch.zeros(4)})
    with pytest.raises(ValueError, match="shape"), store.swapped_in({"w": torch.zeros(5)}):
        pass


# ---- the grid ------------------------------------------------------------------------------------------------------
def test_targets_parse_from_strings_and_dicts_and_bad_ones_name_the_allowed_spelling():
    assert parse_target("sigma_rel=0.07") == Target("sigma_rel", 0.07)
    assert parse_target({"horizon_epochs": 1}) == Target("horizon_epochs", 1.0)
    assert parse_target(" horizon_steps = 500 ").label == "horizon_steps=500"
    assert [t.label for t in parse_grid(["sigma_rel=0.07", "sigma_rel=0.070", "horizon_epochs=1"])] == [
        "sigma_rel=0.07",
        "horizon_epochs=1",
    ]
    for bad in ("ema", "raw", "sigma_rel=0.6", "sigma_rel=-1", "horizon=3", "horizon_steps=abc", {"a": 1, "b": 2}):
        with pytest.raises(ValueError, match="sigma_rel=S"):
            parse_target(bad)
    with pytest.raises(ValueError, match="empty"):
        parse_grid([])


def test_default_grid_spans_the_tracked_widths_and_keeps_horizons_inside_them():
    grid = default_grid((0.05, 0.10), steps_per_epoch=100, total_steps=2000)
    widths = [t.value for t in grid if t.kind == "sigma_rel"]
    assert widths == sorted(widths) and 0.05 in widths and 0.1 in widths
    assert widths[0] == pytest.approx(0.05 / 2 ** (1 / 3), rel=1e-2) and widths[-1] == pytest.approx(0.126, rel=1e-2)
    # 1 epoch of 20 is 0.05 of the run: inside [0.0397, 0.126]; 0.3 epoch (0.015) and 3 epochs (0.15) are not.
    assert [t.label for t in grid if t.kind == "horizon_epochs"] == ["horizon_epochs=1"]
    assert all(t.kind == "sigma_rel" for t in default_grid((0.05, 0.10)))  # no epoch length: widths only


def test_choose_takes_the_best_score_ties_go_to_the_earlier_row_and_nan_never_wins():
    assert choose([2.0, 1.0, 1.5], greater_is_better=False) == 1
    assert choose([2.0, 1.0, 1.5], greater_is_better=True) == 0
    assert choose([1.0, 1.0, 0.99999], greater_is_better=False) == 2
    assert choose([1.0, 1.0], greater_is_better=False) == 0  # raw before any average: an average must be better
    assert choose([math.nan, 3.0, math.inf], greater_is_better=False) == 1
    assert choose([math.nan, 0.5], greater_is_better=True) == 1


def test_direction_follows_greater_is_better_only_for_the_metric_it_was_set_for():
    assert greater_is_better_for("eval_loss", None, None) is False
    assert greater_is_better_for("accuracy", None, None) is True
    assert greater_is_better_for("eval_accuracy", "accuracy", True) is True
    assert greater_is_better_for("eval_loss", "eval_loss", True) is True  # the user's explicit choice wins
    # greater_is_better was derived for another metric: the Trainer's own rule decides for ours
    assert greater_is_better_for("eval_loss", "eval_accuracy", True) is False


# ---- the table -----------------------------------------------------------------------------------------------------
def _sweep() -> PosthocSweep:
    rows = [
        SweepRow("raw", "raw", 0.9, "the raw weights"),
        SweepRow("ema", "ema", 0.7, "the classic EMA", horizon_steps=30.0),
        SweepRow("sigma_rel=0.05", "sigma_rel", 0.6, "post-hoc", value=0.05, horizon_steps=10.0, fit={"e": 0.0}),
        SweepRow("sigma_rel=0.1", "sigma_rel", 0.65, "post-hoc", value=0.1, horizon_steps=20.0),
        SweepRow("horizon_epochs=1", "horizon_epochs", 0.62, "post-hoc", value=1.0, horizon_steps=50.0),
    ]
    scores = [r.score for r in rows]
    return PosthocSweep(
        "eval_loss", False, rows, rows[choose(scores, False)].label, step=200, data="d", steps_per_epoch=50
    )


def test_sweep_table_round_trips_through_json_and_logs_numbers_only(tmp_path):
    sweep = _sweep()
    assert sweep.chosen == "sigma_rel=0.05" and sweep.chosen_row.target == Target("sigma_rel", 0.05)
    path = write_json(sweep, str(tmp_path))
    loaded = PosthocSweep.from_dict(json.loads(open(path).read()))
    assert loaded == sweep
    logs = sweep.log_values()
    assert logs["posthoc_eval_loss/sigma_rel_0.05"] == 0.6 and logs["posthoc_eval_loss/chosen"] == 0.6
    assert logs["posthoc_eval_loss/raw"] == 0.9 and all(isinstance(v, float) for v in logs.values())
    table = sweep.markdown()
    assert "| **sigma_rel=0.05** (chosen) |" in table and "| raw | the raw weights | - | 0.9 |" in table
    assert "| ema | the classic EMA | 30 (0.6) | 0.7 |" in table


def test_sweep_plot_is_a_png_written_with_the_agg_backend(tmp_path):
    path = plot(_sweep(), str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


# ---- the settings --------------------------------------------------------------------------------------------------
def test_posthoc_select_without_tracking_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="posthoc_every_steps is None"):
        SEMAConfig(posthoc_select="eval_loss")


def test_posthoc_grid_is_validated_and_kept_in_its_canonical_spelling():
    assert SEMAConfig(posthoc_grid=["sigma_rel=0.070", {"horizon_epochs": 1}]).posthoc_grid == [
        "sigma_rel=0.07",
        "horizon_epochs=1",
    ]
    with pytest.raises(ValueError, match="posthoc_grid"):
        SEMAConfig(posthoc_grid=["ema"])
