"""A run killed at any moment resumes (`sema_hf.preemption`): a checkpoint is complete when the files written last
are whole; incomplete ones are set aside (renamed, never deleted) before the Trainer picks the newest; an explicit
resume to one is refused naming the newest complete one; every rank resumes the same step."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from sema_hf import SEMACallback, SEMATrainer
from sema_hf.checkpoint import STATE_NAME
from sema_hf.preemption import (
    SET_ASIDE_PREFIX,
    incomplete_reason,
    last_complete_checkpoint,
    set_aside_incomplete_checkpoints,
)

from launch import OFFLINE_ENV, REPO_ROOT, run_nodes, run_torchrun
from tiny import tiny_args, tiny_dataset, tiny_model

SEMA_RECORD = {"SEMACallback": {"args": {}, "attributes": {"checkpoint_id": "run:STEP"}}}


def _checkpoint(output_dir, step, *, trainer=True, sema_ran=True, ema=True, world_size=1, rng=()):
    """A ``checkpoint-<step>`` folder holding the files each save writes last, as a kill may have left them."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if trainer:
        record = json.loads(json.dumps(SEMA_RECORD).replace("STEP", str(step))) if sema_ran else {}
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "stateful_callbacks": record}))
    if ema:
        (folder / STATE_NAME).write_text(json.dumps({"global_step": step, "world_size": world_size}))
    for rank in rng:
        (folder / f"rng_state_{rank}.pth").write_bytes(b"rng")
    return folder


# ---- what makes a checkpoint complete ---------------------------------------------------------------------------
def test_a_checkpoint_is_complete_when_trainer_state_and_sema_state_are_whole(tmp_path):
    assert incomplete_reason(str(_checkpoint(tmp_path, 4))) is None


def test_a_missing_or_cut_short_trainer_state_makes_a_checkpoint_incomplete(tmp_path):
    ema_only = _checkpoint(tmp_path, 4, trainer=False)  # SEMATrainer writes the EMA before the Trainer's files
    assert "no trainer_state.json" in incomplete_reason(str(ema_only))
    torn = _checkpoint(tmp_path, 5)
    text = (torn / "trainer_state.json").read_text()
    (torn / "trainer_state.json").write_text(text[: len(text) // 2])
    assert "cut short" in incomplete_reason(str(torn))
    other_step = _checkpoint(tmp_path, 6)
    (other_step / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    assert "records step 5, not 6" in incomplete_reason(str(other_step))


def test_a_sema_checkpoint_without_its_ema_is_incomplete_and_a_checkpoint_saved_without_sema_is_not(tmp_path):
    killed_before_ema = _checkpoint(tmp_path, 4, ema=False)  # a save the callback wrote in on_save, last
    assert "no sema_state.json" in incomplete_reason(str(killed_before_ema))
    assert incomplete_reason(str(killed_before_ema), require_ema=False) is None
    assert incomplete_reason(str(_checkpoint(tmp_path, 5, sema_ran=False, ema=False))) is None


def test_a_rank_missing_its_rng_file_sees_the_checkpoint_incomplete_at_the_world_size_it_was_saved_with(tmp_path):
    folder = str(_checkpoint(tmp_path, 4, world_size=2, rng=(0,)))
    assert incomplete_reason(folder, process_index=0, world_size=2) is None
    assert "no rng_state_1.pth" in incomplete_reason(folder, process_index=1, world_size=2)
    assert incomplete_reason(folder, process_index=1, world_size=3) is None  # resumed on another world size
    save_only_model = str(_checkpoint(tmp_path, 5, world_size=2))  # no RNG file at all
    assert incomplete_reason(save_only_model, process_index=1, world_size=2) is None


# ---- setting incomplete checkpoints aside -----------------------------------------------------------------------
def test_only_checkpoints_newer_than_the_newest_complete_are_set_aside_with_their_files_and_a_warning(tmp_path):
    half_rotated = _checkpoint(tmp_path, 1, trainer=False)  # older than a complete one: never resumed, left alone
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 3, ema=False)
    _checkpoint(tmp_path, 4, trainer=False)
    with pytest.warns(UserWarning, match="checkpoint-4.*no trainer_state.json.*checkpoint-2"):
        renamed = set_aside_incomplete_checkpoints(tiny_args(str(tmp_path)))
    assert sorted(os.path.basename(p) for p in renamed) == [
        f"{SET_ASIDE_PREFIX}checkpoint-3",
        f"{SET_ASIDE_PREFIX}checkpoint-4",
    ]
    assert half_rotated.is_dir()
    assert (tmp_path / f"{SET_ASIDE_PREFIX}checkpoint-4" / STATE_NAME).is_file()  # nothing deleted
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    _checkpoint(tmp_path, 3, trainer=False)  # killed again at the same step
    with pytest.warns(UserWarning):
        set_aside_incomplete_checkpoints(tiny_args(str(tmp_path)))
    assert (tmp_path / f"{SET_ASIDE_PREFIX}checkpoint-3.2").is_dir()


def test_with_allow_fresh_ema_on_resume_a_newest_checkpoint_missing_only_its_ema_stays_resumable(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 3, ema=False)
    SEMACallback(decay=0.6, allow_fresh_ema_on_resume=True).on_init_end(tiny_args(str(tmp_path)), None, None)
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    with pytest.warns(UserWarning, match="checkpoint-3"):
        SEMACallback(decay=0.6).on_init_end(tiny_args(str(tmp_path)), None, None)
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_set_aside_checkpoints_are_neither_rotated_nor_counted_against_save_total_limit(tmp_path):
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 4, trainer=False)
    with pytest.warns(UserWarning):
        set_aside_incomplete_checkpoints(tiny_args(str(tmp_path)))
    _checkpoint(tmp_path, 4)  # the resumed run saves step 4 again
    rotate_checkpoints(str(tmp_path), save_total_limit=2)
    assert sorted(os.listdir(tmp_path)) == [f"{SET_ASIDE_PREFIX}checkpoint-4", "checkpoint-3", "checkpoint-4"]
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")


# ---- through the Trainer ----------------------------------------------------------------------------------------
def _sema_trainer(output_dir, **overrides):
    args = tiny_args(str(output_dir), save_strategy="steps", save_steps=2, **overrides)
    return SEMATrainer(
        model=tiny_model(), args=args, train_dataset=tiny_dataset(), callbacks=[SEMACallback(decay=0.6)]
    )


def test_an_explicit_resume_to_an_incomplete_checkpoint_is_refused_naming_the_newest_complete_one(tmp_path):
    _sema_trainer(tmp_path).train()
    os.remove(tmp_path / "checkpoint-8" / "trainer_state.json")  # killed inside the Trainer's save of step 8
    trainer = _sema_trainer(tmp_path)  # on_init_end sets checkpoint-8 aside
    with pytest.raises(
        ValueError, match=r"set aside as incomplete.*newest complete checkpoint there is .*checkpoint-6"
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    os.remove(tmp_path / "checkpoint-4" / STATE_NAME)  # older than a complete one: left in place, refused by path
    with pytest.raises(ValueError, match=r"no sema_state.json.*newest complete checkpoint there is .*checkpoint-6"):
        _sema_trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_callback_added_after_the_trainer_was_made_gets_the_folder_prepared_by_sema_trainer_train(tmp_path):
    _sema_trainer(tmp_path).train()
    os.remove(tmp_path / "checkpoint-8" / STATE_NAME)
    args = tiny_args(str(tmp_path), save_strategy="steps", save_steps=2)
    trainer = SEMATrainer(model=tiny_model(), args=args, train_dataset=tiny_dataset())
    sema = SEMACallback(decay=0.6)
    trainer.add_callback(sema)  # no on_init_end for it: SEMATrainer.train() sets checkpoint-8 aside
    assert (tmp_path / "checkpoint-8").is_dir()
    with pytest.warns(UserWarning, match="checkpoint-8"):
        trainer.train(resume_from_checkpoint=True)
    assert sema.num_updates == 8 and (tmp_path / f"{SET_ASIDE_PREFIX}checkpoint-8").is_dir()


# ---- fault injection: SIGKILL at many moments, then resume_from_checkpoint=True ----------------------------------
def test_runs_killed_at_any_moment_resume_the_newest_complete_checkpoint_and_end_bit_exact(tmp_path):
    """tests/preemption_harness.py: every kill point once (at a random step) and one kill at a random moment, for
    SEMACallback and SEMATrainer; the plain Trainer is the baseline (printed, not asserted)."""
    harness = os.path.join(REPO_ROOT, "tests", "preemption_harness.py")
    proc = subprocess.run(
        [sys.executable, harness, str(tmp_path), "--random", "1", "--seed", "0"],
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    trials = [r for r in lines if "summary" not in r]
    summary = {r["summary"]: r for r in lines if "summary" in r}
    for mode in ("callback", "sema_trainer"):
        mine = [r for r in trials if r["mode"] == mode]
        assert len(mine) == 13 and all(r["killed"] for r in mine if r["point"] != "random")  # a timer may come late
        assert [r for r in mine if r["outcome"] != "resumed"] == []
        assert any(r["set_aside"] for r in mine)  # some kills did leave a half-written newest checkpoint
    sema = [summary[m] for m in ("callback", "sema_trainer")]
    plain = summary["trainer"]
    print(
        f"\nresumed {sum(s['resumed'] for s in sema)} of {sum(s['killed'] for s in sema)} with SEMA vs "
        f"{plain['resumed']} of {plain['killed']} without SEMA"
    )


def test_plain_callback_killed_after_rotation_with_save_total_limit_1_resumes_like_the_plain_trainer(tmp_path):
    """transformers rotates checkpoints before any on_save: with save_total_limit=1 the older checkpoint is gone
    when the plain SEMACallback's on_save comes. A kill right there must leave a resumable checkpoint, as it does
    without SEMA: the callback writes the EMA before the Trainer's save (`SEMACallback.on_step_end`)."""
    harness = os.path.join(REPO_ROOT, "tests", "preemption_harness.py")
    cmd = [sys.executable, harness, str(tmp_path), "--modes", "trainer,callback", "--points", "rotated-1"]
    proc = subprocess.run(
        [*cmd, "--random", "0", "--rounds", "2"],
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    trials = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"mode"')]
    assert sorted(r["mode"] for r in trials) == ["callback", "callback", "trainer", "trainer"]
    assert all(r["killed"] for r in trials)
    assert [(r["mode"], r["outcome"], r.get("error")) for r in trials if r["outcome"] != "resumed"] == []


# ---- two ranks --------------------------------------------------------------------------------------------------
def _two_ranks(base, scenario):
    results = [json.loads((base / f"{scenario}-rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["distributed_at_init_end"]  # on_init_end can agree across ranks
        assert result["start"] == 3  # the newest step complete on every rank, on both ranks
        assert result["set_aside"] == [f"{SET_ASIDE_PREFIX}checkpoint-4"]
        uninterrupted = load_file(str(base / f"{scenario}-uninterrupted-rank{rank}.safetensors"))
        resumed = load_file(str(base / f"{scenario}-resumed-rank{rank}.safetensors"))
        assert all(torch.equal(resumed[n], v) for n, v in uninterrupted.items())


@pytest.mark.multiprocess
def test_one_ranks_missing_rng_file_makes_both_ranks_resume_the_step_before(tmp_path):
    run_torchrun("tests/dist/preemption_worker.py", str(tmp_path), "shared")
    _two_ranks(tmp_path, "shared")


@pytest.mark.multiprocess
def test_one_nodes_incomplete_copy_makes_every_node_set_its_copy_aside_and_resume_the_same_step(tmp_path):
    run_nodes("tests/dist/preemption_worker.py", str(tmp_path), "nodes")
    results = [json.loads((tmp_path / f"nodes-rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["set_aside"] == results[1]["set_aside"]
    _two_ranks(tmp_path, "nodes")
