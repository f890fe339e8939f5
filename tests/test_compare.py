"""The comparison script's aggregation on hand-made curves: mean/std, steps-to-reach, bands, the table. No training."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "compare_sema.py")
spec = importlib.util.spec_from_file_location("compare_sema", SCRIPT)
compare = importlib.util.module_from_spec(spec)
sys.modules["compare_sema"] = compare  # dataclasses look their module up there
spec.loader.exec_module(compare)
Curve = compare.Curve


def test_mean_std_uses_the_sample_standard_deviation():
    mean, std = compare.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert compare.mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        compare.mean_std([])


def test_steps_to_reach_is_the_first_step_at_least_as_good_as_the_target_in_either_direction():
    accuracy = Curve([10, 20, 30, 40], [0.5, 0.8, 0.75, 0.9])
    assert compare.steps_to_reach(accuracy, 0.8, higher_is_better=True) == 20  # ties count as reached
    assert compare.steps_to_reach(accuracy, 0.85, higher_is_better=True) == 40
    assert compare.steps_to_reach(accuracy, 0.95, higher_is_better=True) is None
    loss = Curve([10, 20, 30], [3.0, 2.0, 2.5])
    assert compare.steps_to_reach(loss, 2.5, higher_is_better=False) == 20
    assert compare.steps_to_reach(loss, 1.0, higher_is_better=False) is None


def test_curve_rejects_unsorted_steps_and_length_mismatch():
    with pytest.raises(ValueError, match="increase"):
        Curve([10, 10], [1.0, 2.0])
    with pytest.raises(ValueError, match="length"):
        Curve([10, 20], [1.0])


def test_curve_band_averages_the_steps_all_runs_share():
    steps, mean, std = compare.curve_band([Curve([1, 2, 3], [1.0, 2.0, 3.0]), Curve([2, 3, 4], [4.0, 6.0, 9.0])])
    assert steps == [2, 3]
    assert mean == pytest.approx([3.0, 4.5])
    assert std == pytest.approx([math.sqrt(2.0), math.sqrt(4.5)])


def fake_loss_curves() -> dict[str, dict[int, Curve]]:
    """Eval losses for two seeds: `sema` beats `none` early, `ema` never reaches it on seed 1."""
    return {
        "none": {0: Curve([10, 20, 30], [3.0, 2.5, 2.0]), 1: Curve([10, 20, 30], [3.2, 2.4, 2.2])},
        "ema": {0: Curve([10, 20, 30], [3.1, 2.2, 1.9]), 1: Curve([10, 20, 30], [3.3, 2.6, 2.3])},
        "sema": {0: Curve([10, 20, 30], [2.5, 1.9, 1.8]), 1: Curve([10, 20, 30], [2.1, 2.0, 1.9])},
    }


def test_summarize_task_pairs_each_seed_with_the_none_run_of_the_same_seed():
    extras = {m: {0: {"sharpness": 1.0}, 1: {"sharpness": 3.0}} for m in ("none", "ema", "sema")}
    summary = compare.summarize_task(fake_loss_curves(), higher_is_better=False, extras=extras)

    assert summary["none"]["final"]["values"] == [2.0, 2.2]
    assert summary["sema"]["final"]["mean"] == pytest.approx(1.85)
    assert summary["sema"]["final"]["std"] == pytest.approx(math.sqrt(0.005))
    # targets: seed 0 -> 2.0, seed 1 -> 2.2
    assert summary["none"]["steps_to_reach"]["values"] == [30, 30]
    assert summary["sema"]["steps_to_reach"]["values"] == [20, 10]
    assert summary["sema"]["steps_to_reach"]["mean"] == pytest.approx(15.0)
    assert summary["ema"]["steps_to_reach"] == {"values": [30, None], "reached": 1, "n": 2, "mean": 30.0, "std": 0.0}
    assert summary["ema"]["sharpness"]["mean"] == pytest.approx(2.0)


def test_summarize_task_refuses_unpaired_seeds_and_a_missing_reference():
    curves = fake_loss_curves()
    del curves["sema"][1]
    with pytest.raises(ValueError, match="paired"):
        compare.summarize_task(curves, higher_is_better=False)
    with pytest.raises(ValueError, match="reference"):
        compare.summarize_task({"sema": fake_loss_curves()["sema"]}, higher_is_better=False)


def test_summarize_task_reports_a_target_nobody_reached():
    curves = {
        "none": {0: Curve([1, 2], [0.5, 0.9])},
        "sema": {0: Curve([1, 2], [0.6, 0.8])},
    }
    summary = compare.summarize_task(curves, higher_is_better=True)
    assert summary["sema"]["steps_to_reach"]["reached"] == 0
    assert summary["sema"]["steps_to_reach"]["mean"] is None
    assert compare.format_steps(summary["sema"]["steps_to_reach"]) == "not reached (0/1)"


def test_markdown_table_has_one_row_per_mode_in_order_with_mean_std_and_steps():
    summary = compare.summarize_task(fake_loss_curves(), higher_is_better=False)
    table = compare.markdown_table(summary, [compare.Column("final eval loss", "final", 3), compare.Column("x", "x")])
    lines = table.splitlines()
    assert lines[0] == "| mode | final eval loss | steps to reach `none`'s final | x |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`none`", "`ema`", "`sema`"]
    assert "| `sema` | 1.850 ± 0.071 | 15 ± 7 (2/2) | n/a |" in lines
    assert "| `ema` | 2.100 ± 0.283 | 30 ± 0 (1/2) | n/a |" in lines


def test_runs_of_a_seed_differ_only_in_the_mode_flag():
    specs = compare.task_specs(quick=True)
    for task in specs.values():
        flags = {m: compare.run_flags(task, m, 3, "out", save_last=False) for m in compare.MODES}
        rest = {m: [f for f in fl if f not in compare.MODES] for m, fl in flags.items()}
        assert rest["none"] == rest["ema"] == rest["sema"]
        assert flags["sema"][flags["sema"].index("--seed") + 1] == "3"


def test_format_mean_std_counts_negative_values_when_asked():
    summary = compare.summarize([2.0, -1.0, 5.0])
    assert compare.format_mean_std(summary, 1) == "2.0 ± 3.0"
    assert compare.format_mean_std(summary, 1, count_negative=True) == "2.0 ± 3.0 (1/3 < 0)"
    assert compare.format_mean_std(compare.summarize([1.0]), 1, count_negative=True) == "1.0 ± 0.0"
