"""EMA checkpoint writes on 2 gloo ranks: a write that fails on one rank (a full disk) raises on every rank, naming
the rank and its reason, as read failures do (`sema_hf.checkpoint.raise_if_any_rank_failed`); no rank is left
waiting in a barrier, and no rank walks on believing the checkpoint was saved."""

import json

import pytest

from launch import run_torchrun

CASES = ("writer", "shard", "json")
FAILING = {"writer": 0, "shard": 1, "json": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch for the three cases (where a rank is left out of step, the launch itself fails)."""
    base = tmp_path_factory.mktemp("save_failure")
    run_torchrun("tests/dist/save_failure_worker.py", str(base), *CASES, timeout=180)
    return base


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_a_write_failing_on_one_rank_raises_the_same_error_on_every_rank(case, runs):
    errors = [json.loads((runs / f"{case}-rank{r}.json").read_text())["error"] for r in range(2)]
    assert errors[0] is not None and errors[0] == errors[1], errors  # the same error, on both ranks
    assert errors[0]["type"] == "RuntimeError"
    message = errors[0]["message"]
    assert "on 1 of 2 ranks" in message and f"Rank {FAILING[case]}: OSError" in message
    assert "No space left on device" in message
