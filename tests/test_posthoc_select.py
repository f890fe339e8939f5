"""Post-hoc selection (issue 22, part 3): choosing the average after training among post-hoc reconstructions, the
classic EMA and the raw weights; putting it into the model; the table, its JSON, plot, log and model card."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import PretrainedConfig, Trainer, TrainerCallback

from sema_hf import SEMA, SEMACallback, SEMAConfig, SEMATrainer
from sema_hf.engines.base import Slot
from sema_hf.posthoc import reconstruct
from sema_hf.selection import (
    PosthocSweep,
    SweepRow,
    Target,
    _tag,
    choose,
    default_grid,
    greater_is_better_for,
    parse_grid,
    parse_target,
    plot,
    write_json,
)
from sema_hf.store import EMAStore

from launch import run_torchrun
from tiny import Pull, tiny_args

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from posthoc_select_worker import GRID as SHARDED_GRID  # noqa: E402
from sharded_setup import eval_dataset, tiny_gpt2, training_args  # noqa: E402

# engine under test -> the adapter name it must pick
SHARDED = {"zero3": "deepspeed-zero3"}


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


def test_default_grid_spans_half_the_smallest_to_twice_the_largest_width_and_the_study_horizons():
    grid = default_grid((0.05, 0.10), steps_per_epoch=100, total_steps=250)
    assert [t.label for t in grid] == [
        "sigma_rel=0.025",
        "sigma_rel=0.0354",
        "sigma_rel=0.05",
        "sigma_rel=0.0707",
        "sigma_rel=0.1",
        "sigma_rel=0.141",
        "sigma_rel=0.2",
        "horizon_epochs=0.3",
        "horizon_epochs=1",  # 3 epochs is longer than the 2.5-epoch run
    ]
    assert all(t.kind == "sigma_rel" for t in default_grid((0.05, 0.10)))  # no epoch length: widths only
    assert [t.value for t in default_grid((0.2,))] == [0.1, 0.141, 0.2, 0.283]  # below 1/sqrt(12) = 0.2887


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


# ---- the Trainer: selection at the end of train() ------------------------------------------------------------------
POSTHOC = {"posthoc_every_steps": 4, "posthoc_select": "eval_loss", "horizon_steps": 2.0, "warmup": "none"}
GRID = ["sigma_rel=0.05", "sigma_rel=0.13", "sigma_rel=0.2", "horizon_steps=8"]


class Watch(TrainerCallback):
    """Listed before SEMA's callback: counts ``on_evaluate`` and keeps the weights the model holds when training
    ends, before SEMA's selection replaces them."""

    def __init__(self):
        self.evaluations = 0
        self.at_train_end: torch.Tensor | None = None

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations += 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.at_train_end = model.w.detach().clone()


def _pull_trainer(tmp_path, callback, *, trainer_cls=Trainer, start=1.0, **overrides):
    """loss = |w - x|^2 pulled from w = start towards noisy points around 0; the eval set sits at 0, so a weight
    vector's eval_loss is |w|^2 (the independent reference). Batch 1, SGD: 64 optimizer steps over 2 epochs."""
    g = torch.Generator().manual_seed(3)
    data = Dataset.from_dict({"x": torch.randn(32, 4, generator=g).tolist(), "labels": [0.0] * 32})
    evalset = Dataset.from_dict({"x": [[0.0] * 4] * 4, "labels": [0.0] * 4})
    values = {"per_device_train_batch_size": 1, "learning_rate": 0.1, "optim": "sgd", **overrides}
    args = tiny_args(str(tmp_path), **values)
    return trainer_cls(
        model=Pull(start), args=args, train_dataset=data, eval_dataset=evalset, callbacks=[Watch(), callback]
    )


def _watch(trainer) -> Watch:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Watch))


def _reference_scores(posthoc_dir, sweep: PosthocSweep, raw: torch.Tensor, ema: torch.Tensor) -> dict[str, float]:
    """Each row's eval_loss recomputed here: |w|^2 of the row's weights, post-hoc ones by `reconstruct` in this
    one process from the files (not the in-run combination)."""
    scores = {"raw": float(raw.double().pow(2).sum()), "ema": float(ema.double().pow(2).sum())}
    for row in sweep.rows:
        if row.is_posthoc:
            w = reconstruct(str(posthoc_dir), **row.target.as_kwargs())["w"]
            scores[row.label] = float(w.double().pow(2).sum())
    return scores


def test_selection_puts_the_best_candidate_into_the_model_and_save_model_writes_it(tmp_path):
    callback = SEMACallback(switch=False, posthoc_grid=GRID, **POSTHOC)
    trainer = _pull_trainer(tmp_path, callback)
    trainer.train()
    sweep = callback.posthoc_sweep
    assert [r.label for r in sweep.rows] == ["raw", "ema", *GRID]
    raw, ema = _watch(trainer).at_train_end, callback.ema_state_dict()["w"]
    expected = _reference_scores(tmp_path / "sema_posthoc", sweep, raw, ema)
    for row in sweep.rows:
        assert row.score == pytest.approx(expected[row.label], rel=1e-5), row.label
    assert sweep.chosen == min(sweep.rows, key=lambda r: r.score).label
    # The pull's bias (from w = 1) and noise make a middle width best: sigma_rel 0.13, between the tracked 0.05 and
    # 0.10 and beyond, scores 0.089 against 0.145 raw, 0.125 for the classic EMA (H = 2) and 0.121 at 0.2.
    assert sweep.chosen == "sigma_rel=0.13"
    trainer.save_model()
    saved = load_file(str(tmp_path / "model.safetensors"))["w"]
    chosen = reconstruct(str(tmp_path / "sema_posthoc"), **sweep.chosen_row.target.as_kwargs())["w"]
    torch.testing.assert_close(saved, chosen, rtol=0, atol=1e-6)
    assert callback.final_weights_held == "posthoc"
    assert float(saved.double().pow(2).sum()) == pytest.approx(sweep.chosen_row.score, rel=1e-5)


def test_selection_logs_the_table_and_writes_json_and_png_without_an_evaluation_entry(tmp_path):
    callback = SEMACallback(switch=False, posthoc_grid=GRID, **POSTHOC)
    trainer = _pull_trainer(tmp_path, callback)
    trainer.train()
    sweep = callback.posthoc_sweep
    entries = [h for h in trainer.state.log_history if "posthoc_eval_loss/chosen" in h]
    assert len(entries) == 1
    assert entries[0]["posthoc_eval_loss/chosen"] == sweep.chosen_row.score
    assert {f"posthoc_eval_loss/{_tag(r.label)}" for r in sweep.rows} <= set(entries[0])
    # SEMA's own passes: no evaluate() call, no on_evaluate, no eval_* entry in the history.
    assert _watch(trainer).evaluations == 0
    assert not any(k.startswith("eval_") for h in trainer.state.log_history for k in h)
    saved = json.loads((tmp_path / "posthoc_sweep.json").read_text())
    assert saved["chosen"] == sweep.chosen and saved["metric"] == "eval_loss" and saved["greater_is_better"] is False
    assert saved["data"] == "eval_dataset (4 examples)"
    assert (tmp_path / "posthoc_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_model_card_names_the_chosen_target_the_data_and_the_table(tmp_path):
    callback = SEMACallback(switch=False, posthoc_grid=GRID, **POSTHOC)
    trainer = _pull_trainer(tmp_path, callback, trainer_cls=SEMATrainer)
    trainer.model.config = PretrainedConfig()  # what the Trainer's card reads
    trainer.train()
    trainer.create_model_card()
    text = (tmp_path / "README.md").read_text()
    sweep = callback.posthoc_sweep
    assert f"**`{sweep.chosen}`**" in text and "eval_dataset (4 examples)" in text
    assert "How these weights were chosen" in text
    assert all(f"| {row.label} |" in text or f"| **{row.label}** (chosen) |" in text for row in sweep.rows)
    assert f"| eval_loss | {sweep.chosen_row.score:.4f} |" in text
    assert "These weights are a post-hoc EMA" in text and "power-function average `sigma_rel=0.13`" in text


@pytest.mark.parametrize("evaluate_with, measured_row", [("ema", "best_checkpoint_ema"), ("model", "raw")])
def test_selection_runs_after_load_best_model_at_end_and_counts_the_best_checkpoint_as_a_candidate(
    tmp_path, evaluate_with, measured_row
):
    # The Trainer ranks checkpoints by the weights evaluate_with names: their average ("ema", the default) or their
    # raw weights ("model"). Those weights of the best checkpoint are a candidate, scored on the same eval set, so
    # their score is the Trainer's best_metric; the raw row is the best checkpoint's raw weights the Trainer loaded.
    callback = SEMACallback(switch=False, posthoc_grid=GRID, evaluate_with=evaluate_with, **POSTHOC)
    trainer = _pull_trainer(
        tmp_path,
        callback,
        eval_strategy="steps",
        eval_steps=16,
        save_strategy="steps",
        save_steps=16,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer.train()
    sweep = callback.posthoc_sweep
    assert sweep.row(measured_row).score == pytest.approx(trainer.state.best_metric, rel=1e-6)
    assert ("best_checkpoint_ema" in [r.label for r in sweep.rows]) == (evaluate_with == "ema")
    assert trainer.state.best_model_checkpoint in sweep.row("raw").description
    assert _watch(trainer).evaluations == 4  # the Trainer's own evaluations only
    assert sweep.chosen == min(sweep.rows, key=lambda r: r.score).label
    held = {"raw": "model", "best_checkpoint_ema": "ema", "ema": "ema"}.get(sweep.chosen, "posthoc")
    assert callback.final_weights_held == held


def test_selection_without_an_eval_set_is_refused_before_training(tmp_path):
    callback = SEMACallback(switch=False, **POSTHOC)
    trainer = _pull_trainer(tmp_path, callback)
    trainer.eval_dataset = None
    with pytest.raises(ValueError, match="posthoc_select = 'eval_loss'.*no eval_dataset"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_selection_with_several_eval_sets_must_name_the_one_it_chooses_on(tmp_path):
    callback = SEMACallback(switch=False, **POSTHOC)
    trainer = _pull_trainer(tmp_path, callback)
    trainer.eval_dataset = {"val": trainer.eval_dataset, "test": trainer.eval_dataset}
    with pytest.raises(ValueError, match="must name the one to choose on, e.g. 'eval_val_loss'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_posthoc_select_with_final_weights_model_is_refused_naming_both():
    with pytest.raises(ValueError, match="final_weights = 'model' with posthoc_select"):
        SEMAConfig(final_weights="model", **POSTHOC)


# ---- a loop: posthoc_sweep, then finalize(posthoc=...) -------------------------------------------------------------
def test_loop_posthoc_sweep_returns_the_table_and_finalize_puts_the_chosen_weights_in(tmp_path):
    torch.manual_seed(0)
    model = Pull(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, optimizer, posthoc_dir=str(tmp_path), posthoc_every_steps=4, horizon_steps=2.0, warmup="none")
    g = torch.Generator().manual_seed(3)
    for x in torch.randn(64, 4, generator=g):
        optimizer.zero_grad()
        model(x[None])["loss"].backward()
        optimizer.step()
        sema.step()
    raw = model.w.detach().clone()

    def evaluate() -> float:
        return float(model.w.detach().double().pow(2).sum())

    with pytest.warns(UserWarning, match="sigma_rel=0.005 cannot be reconstructed"):
        sweep = sema.posthoc_sweep(evaluate, grid=[*GRID, "sigma_rel=0.005"])
    assert torch.equal(model.w.detach(), raw)  # the sweep changes nothing
    assert sweep.metric == "score" and [r.label for r in sweep.rows] == ["raw", "ema", *GRID, "sigma_rel=0.005"]
    unreached = sweep.rows.pop()  # too narrow for snapshots every 4 steps: listed, not scored, never chosen
    assert math.isnan(unreached.score) and "outside the range" in unreached.fit["error"]
    assert sweep.row("raw").score == evaluate()
    expected = _reference_scores(tmp_path, sweep, raw, sema.ema_state_dict()["w"])
    for row in sweep.rows:
        assert row.score == pytest.approx(expected[row.label], rel=1e-5)
    default = sema.posthoc_sweep(evaluate)  # the default grid, less what the snapshots do not reach
    labels = [r.label for r in default.rows]
    assert labels[:2] == ["raw", "ema"] and {"sigma_rel=0.05", "sigma_rel=0.1"} <= set(labels)
    assert set(labels[2:]) <= {t.label for t in default_grid((0.05, 0.10))}
    assert all(math.isfinite(r.score) for r in default.rows)
    held = sema.finalize(posthoc=sweep)
    assert sema.posthoc_chosen == sweep.chosen
    if sweep.chosen_row.is_posthoc:
        assert held == "posthoc"
        w = reconstruct(str(tmp_path), **sweep.chosen_row.target.as_kwargs())["w"]
        torch.testing.assert_close(model.w.detach(), w, rtol=0, atol=1e-6)
    # A label works as well: the tracked width itself, written for good (optimizer included).
    sema.finalize(posthoc="sigma_rel=0.1")
    torch.testing.assert_close(model.w.detach(), reconstruct(str(tmp_path), sigma_rel=0.1)["w"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a label finalize can put in"):
        sema.finalize(posthoc="best_checkpoint_ema")


# ---- 2 ranks: each rank combines its own shards, the winner is written into every rank's shard ---------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("posthoc_select")
    run_torchrun("tests/dist/posthoc_select_worker.py", str(out), *SHARDED, timeout=300, fresh=str(out))
    return {
        engine: {
            "dir": out / engine,
            "ranks": [json.loads((out / engine / f"result_rank{r}.json").read_text()) for r in range(2)],
        }
        for engine in SHARDED
    }


def _one_process_eval_loss(state: dict[str, torch.Tensor], tmp_path) -> float:
    """The eval_loss of full weights measured by a plain one-process Trainer's ``evaluate()`` (not SEMA's passes)."""
    model = tiny_gpt2()
    missing, _ = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"}  # tied to the embedding, saved once
    trainer = Trainer(model=model, args=training_args(str(tmp_path), 1), eval_dataset=eval_dataset())
    return trainer.evaluate()["eval_loss"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", SHARDED)
def test_selection_under_a_sharded_engine_chooses_on_every_rank_alike_and_saves_the_winner(engine, sharded, tmp_path):
    ranks, folder = sharded[engine]["ranks"], sharded[engine]["dir"]
    assert ranks[0]["engine"] == SHARDED[engine]
    assert ranks[0]["sweep"] == ranks[1]["sweep"]  # the same scores and choice on both ranks
    sweep = PosthocSweep.from_dict(ranks[0]["sweep"])
    assert json.loads((folder / "posthoc_sweep.json").read_text()) == ranks[0]["sweep"]
    assert [r.label for r in sweep.rows] == ["raw", "ema", *SHARDED_GRID]
    assert sweep.chosen == min(sweep.rows, key=lambda r: r.score).label
    # Each post-hoc row: the 2-rank files reconstructed in this one process, evaluated here, score as in the run.
    for row in sweep.rows:
        if row.is_posthoc:
            state = reconstruct(str(folder / "sema_posthoc"), **row.target.as_kwargs())
            assert _one_process_eval_loss(state, tmp_path) == pytest.approx(row.score, rel=1e-5), row.label
    # The winner is what save_model wrote (gathered from both ranks' shards) and what every rank's shards hold.
    saved = load_file(str(folder / "saved" / "model.safetensors"))
    assert _one_process_eval_loss(saved, tmp_path) == pytest.approx(sweep.chosen_row.score, rel=1e-5)
    if sweep.chosen_row.is_posthoc:
        chosen = reconstruct(str(folder / "sema_posthoc"), **sweep.chosen_row.target.as_kwargs())
        for name, value in chosen.items():
            torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for result in ranks:
        assert result["source_vs_compute"] == 0.0
