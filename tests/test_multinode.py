"""Multi-node restore: 2 one-process "nodes" (gloo, CPU) with ``save_on_each_node`` and no shared storage (each
node saves into and resumes from its own folder). Every rank must take the same restore decision: all restore
their own copy, all raise the same error, or all start fresh; replicas never silently diverge."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sema_hf.checkpoint import STATE_NAME

from launch import run_nodes

WORKER = "tests/dist/multinode_worker.py"
EMA_FILES = {STATE_NAME, "sema_ema-00001-of-00001.safetensors"}


def _results(base, phase):
    results = [json.loads((base / f"{phase}-rank{r}.json").read_text()) for r in range(2)]
    emas = [load_file(str(base / f"{phase}-rank{r}.safetensors")) for r in range(2)]
    return results, emas


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of 2 nodes: an uninterrupted 8-step run saving checkpoint-4 and checkpoint-8 into each node's own
    folder, then a resume from checkpoint-4, then a resume where node 1 lost its EMA files, then a run without
    save_on_each_node (see the worker)."""
    base = tmp_path_factory.mktemp("multinode")
    run_nodes(WORKER, str(base), "train", "resume", "missing", "unshared")
    return base


@pytest.mark.multiprocess
def test_each_node_saves_its_own_complete_ema_checkpoint(runs):
    results, emas = _results(runs, "train")
    for run in results:
        assert EMA_FILES <= set(run["files"])  # the JSON too, on node 1's local main, not only on global rank 0
        assert (run["num_updates"], run["num_switches"]) == (8, 2)
    for node in range(2):
        state = json.loads((runs / f"node{node}" / "checkpoint-4" / STATE_NAME).read_text())
        assert state["global_step"] == 4 and state["checkpoint_dir"].endswith(f"node{node}/checkpoint-4")
    for name, value in emas[0].items():
        assert torch.equal(emas[1][name], value)


@pytest.mark.multiprocess
def test_resume_on_every_node_restores_its_own_copy_and_ends_like_the_uninterrupted_run(runs):
    _, uninterrupted = _results(runs, "train")
    results, emas = _results(runs, "resume")
    for run in results:
        assert (run["num_updates"], run["num_switches"]) == (8, 2)  # restored counters, not a fresh average
    for name, value in uninterrupted[0].items():
        assert torch.equal(emas[0][name], value)
        assert torch.equal(emas[1][name], value)


@pytest.mark.multiprocess
def test_ema_missing_on_one_node_is_the_same_error_on_every_node_or_a_fresh_start_on_every_node(runs):
    results, emas = _results(runs, "missing")
    errors = [run["error"] for run in results]
    assert errors[0] is not None and errors[0] == errors[1]  # no rank restored while the other raised
    assert errors[0]["type"] == "FileNotFoundError"
    assert "node1/checkpoint-4" in errors[0]["message"] and "allow_fresh_ema_on_resume" in errors[0]["message"]
    # With allow_fresh_ema_on_resume=True both start a fresh average at step 4 (node 0 does not restore its copy).
    for run in results:
        assert (run["num_updates"], run["num_switches"]) == (4, 1)
    _, uninterrupted = _results(runs, "train")
    for name, value in emas[0].items():
        assert torch.equal(emas[1][name], value)
    assert any(not torch.equal(emas[0][n], v) for n, v in uninterrupted[0].items())


@pytest.mark.multiprocess
def test_without_save_on_each_node_a_node_that_sees_no_checkpoint_sets_nothing_aside_on_the_saving_node(runs):
    """Only global rank 0 saves, and node 1 has no shared storage: node 1's folders hold its RNG files only (no
    trainer_state.json anywhere), which is no sign that the checkpoints are incomplete, so making the next Trainer
    renames none of node 0's complete checkpoints."""
    results = [json.loads((runs / f"unshared-rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["before"] == ["checkpoint-4", "checkpoint-8"]
    assert [r["after"] for r in results] == [r["before"] for r in results]
