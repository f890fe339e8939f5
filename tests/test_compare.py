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
        assert flags["sema"][flags["sema"].index("--switch_policy") + 1] == "always"


def test_format_mean_std_counts_negative_values_when_asked():
    summary = compare.summarize([2.0, -1.0, 5.0])
    assert compare.format_mean_std(summary, 1) == "2.0 ± 3.0"
    assert compare.format_mean_std(summary, 1, count_negative=True) == "2.0 ± 3.0 (1/3 < 0)"
    assert compare.format_mean_std(compare.summarize([1.0]), 1, count_negative=True) == "1.0 ± 0.0"


# ---- examples/sema_study.py: the resumable study (no training: run_one is replaced by fake records) -----------------
STUDY_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "sema_study.py")
study_spec = importlib.util.spec_from_file_location("sema_study", STUDY_SCRIPT)
study = importlib.util.module_from_spec(study_spec)
sys.modules["sema_study"] = study
study_spec.loader.exec_module(study)


def test_decay_for_a_horizon_in_epochs_is_one_minus_one_over_the_horizon_in_steps():
    assert study.decay_for(0.5, 8) == pytest.approx(0.75)  # H = 4 steps
    assert study.decay_for(3.0, 8) == pytest.approx(1 - 1 / 24)
    with pytest.raises(ValueError, match="exceed 1 step"):
        study.decay_for(0.1, 8)
    # every horizon of every piece is a real average on its task
    for piece in study.PIECES.values():
        for variant in piece.variants:
            if variant.mode != "none":
                assert 0.0 < study.decay_for(variant.horizon_epochs, piece.task.steps_per_epoch) < 1.0


def test_variants_of_a_seed_differ_only_in_their_sema_and_scheduler_flags():
    task = study.VIT
    sema_flags = {
        "--sema_mode", "--decay", "--switch_start_epoch", "--switch_policy", "--lr_scheduler_type", "--posthoc_auto"
    }  # fmt: skip

    def rest(flags):
        out, skip = [], False
        for flag in flags:
            if skip:
                skip = False
            elif flag in sema_flags:
                skip = True
            else:
                out.append(flag)
        return out

    piece = study.PIECES["horizon"]
    runs = [study.run_flags(task, v, 1, "out") for v in piece.variants]
    assert all(rest(flags) == rest(runs[0]) for flags in runs)
    sema = study.run_flags(task, study.Variant("sema", horizon_epochs=1.0, switch_policy="if_better"), 1, "out")
    assert sema[sema.index("--decay") + 1] == repr(1 - 1 / task.steps_per_epoch)
    assert sema[sema.index("--switch_policy") + 1] == "if_better" and sema[sema.index("--seed") + 1] == "1"
    assert "--decay" not in study.run_flags(task, study.Variant("none"), 1, "out")
    # the paper's switch is asked for by name: the examples' own default is the guarded one
    plain = study.run_flags(task, study.Variant("sema", horizon_epochs=1.0), 1, "out")
    assert plain[plain.index("--switch_policy") + 1] == "always"
    # the examples' post-hoc default is pinned off, except in the post-hoc variants, which choose on held-out data
    assert plain[plain.index("--posthoc_auto") + 1] == "false"
    posthoc = study.run_flags(study.MNIST_V2_POSTHOC, study.Variant("ema", 0.3, posthoc_every=10), 1, "out")
    assert "--posthoc_auto" not in posthoc and posthoc[posthoc.index("--posthoc_every_steps") + 1] == "10"
    assert posthoc[posthoc.index("--posthoc_select") + 1] == "eval_loss"


def test_pieces_share_runs_that_are_the_same_run():
    long_ids = {study.run_id(p.task, v, s) for p in [study.PIECES["vit-long"]] for v, s in p.runs()}
    sweep_ids = {study.run_id(p.task, v, s) for p in [study.PIECES["horizon"]] for v, s in p.runs()}
    assert long_ids <= sweep_ids  # vit-long is the sweep's point at the base horizon
    keys = [v.key() for p in study.PIECES.values() for v in p.variants]
    assert "sema_h0.3_start6" in keys and "sema_h0.3_if-better" in keys and "none_lr-constant-with-warmup" in keys


def _fake_record(task, variant, seed, final):
    steps = [task.steps_per_epoch * (e + 1) for e in range(task.epochs)]
    values = [final - 0.01 * (task.epochs - 1 - e) for e in range(task.epochs)]
    return {
        "run_id": study.run_id(task, variant, seed),
        "task": task.name,
        "variant": {},
        "seed": seed,
        "train_seconds": 10.0,
        "diagnostic_seconds": 2.0,
        "curve": {"steps": steps, "values": values},
        "diagnostics": {"sharpness": 5.0 + seed, "flatness": 0.01, "train_accuracy": 1.0},
    }


def test_the_study_resumes_skipping_cached_runs_and_reports_from_the_json(tmp_path, monkeypatch):
    task = study.Task(**{**study.asdict(study.VIT), "epochs": 3})
    piece = study.Piece("vit-long", task, tuple(study._trio()), "q?")
    monkeypatch.setattr(study, "PIECES", {"vit-long": piece})
    finals = {"none": 0.80, "ema": 0.82, "sema": 0.78}
    calls = []

    def fake_run_one(task, variant, seed, work_dir):
        calls.append((variant.key(), seed))
        return _fake_record(task, variant, seed, finals[variant.mode] + 0.01 * seed)

    monkeypatch.setattr(study, "run_one", fake_run_one)
    out = str(tmp_path / "evidence")
    study.main(["--pieces", "vit-long", "--seeds", "0", "1", "--output_dir", out])
    assert len(calls) == 6 and len(os.listdir(os.path.join(out, "runs"))) == 6
    study.main(["--pieces", "vit-long", "--output_dir", out])  # only seed 2 is missing
    assert len(calls) == 9 and all(seed == 2 for _, seed in calls[6:])
    study.main(["--pieces", "vit-long", "--output_dir", out])
    assert len(calls) == 9  # everything cached: nothing runs

    results = study.report(out)
    summary = results["pieces"]["vit-long"]["summary"]
    assert summary["none"]["final"]["values"] == pytest.approx([0.80, 0.81, 0.82])
    assert summary["ema H=0.3 ep"]["delta_vs_none"]["mean"] == pytest.approx(0.02)
    assert summary["sema H=0.3 ep"]["delta_vs_none"]["values"] == pytest.approx([-0.02] * 3)
    assert summary["sema H=0.3 ep"]["best"]["mean"] == pytest.approx(0.79)
    text = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert "| `vit-long` | 9/9 | 1.8 min | - |" in text
    assert "`ema H=0.3 ep`: 0.0200 ± 0.0000" in text and "`sema H=0.3 ep`: -0.0200 ± 0.0000" in text
    assert os.path.isfile(os.path.join(out, "curves_vit-long.png"))


def test_a_piece_not_run_yet_says_so_with_its_command(tmp_path):
    text_dir = str(tmp_path / "empty")
    os.makedirs(text_dir)
    study.report(text_dir)
    text = open(os.path.join(text_dir, "results.md"), encoding="utf-8").read()
    assert "| `smollm2-full` | 0/9 | 0.0 min | `python examples/sema_study.py --pieces smollm2-full` |" in text
    assert "Not run yet" in text
