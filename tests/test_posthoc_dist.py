"""Post-hoc EMA on 2 gloo ranks (``tests/dist/posthoc_worker.py``, one launch): under DeepSpeed ZeRO-3, FSDP2 and
``shard_under_ddp`` each rank writes only its shard, the 2-rank snapshots reconstruct in this one process equal to
the one-process run's, each rank's in-run average (its own files only) is its slice of that reconstruction, and the
profiles saved in a 2-rank checkpoint re-shard onto one process."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer

from sema_hf import SEMA, SEMACallback
from sema_hf.posthoc import reconstruct, snapshot_file_name

from launch import run_torchrun

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from posthoc_worker import POSTHOC  # noqa: E402
from sharded_setup import SEMA_KWARGS, eval_dataset, pattern_dataset, tiny_gpt2, training_args  # noqa: E402

pytestmark = pytest.mark.multiprocess

ENGINES = {"fsdp2": "fsdp2", "ddp-sharded": "ddp-sharded", "zero3": "deepspeed-zero3"}  # DeepSpeed last: it leaves
# accelerate's DeepSpeed switch in the environment
TOTAL = sum(p.numel() for p in tiny_gpt2().parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("posthoc2")
    run_torchrun("tests/dist/posthoc_worker.py", str(out), *ENGINES, timeout=400, fresh=str(out))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same training in one process; its snapshots' reconstruction."""
    folder = tmp_path_factory.mktemp("posthoc1")
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(str(folder), 1),
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[SEMACallback(**SEMA_KWARGS, **POSTHOC)],
    )
    trainer.train()
    return reconstruct(str(folder), sigma_rel=0.07)


@pytest.mark.parametrize("engine", ENGINES)
def test_each_rank_writes_only_its_shard_of_every_snapshot(engine, runs):
    folder = runs / engine / "run" / "sema_posthoc"
    for rank in range(2):
        written = json.loads((runs / engine / f"written_rank{rank}.json").read_text())
        assert written["engine"] == ENGINES[engine]
        assert written["steps"] == [2, 4, 6, 8, 10, 12]
        assert written["files"] == [snapshot_file_name(s, rank, 2) for s in written["steps"]]
        with safe_open(str(folder / written["files"][-1]), framework="pt") as f:
            numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("posthoc0/"))
        assert numel == written["local_numel"] and abs(numel - TOTAL / 2) < 0.05 * TOTAL


@pytest.mark.parametrize("engine", ENGINES)
def test_two_rank_snapshots_reconstruct_in_one_process_equal_to_the_one_process_run(engine, runs, single):
    got = reconstruct(str(runs / engine / "run"), sigma_rel=0.07)
    assert got.report.weights == pytest.approx(single.report.weights, rel=1e-12)
    assert sorted(got) == sorted(single)
    for name, value in single.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{engine}: {name}")


@pytest.mark.parametrize("engine", ENGINES)
def test_in_run_average_of_each_rank_is_its_slice_of_the_reconstruction(engine, runs):
    full = reconstruct(str(runs / engine / "run"), sigma_rel=0.07)
    for rank in range(2):
        with safe_open(str(runs / engine / f"average_rank{rank}.safetensors"), framework="pt") as f:
            pieces = json.loads(f.metadata()["pieces"])
            assert json.loads(f.metadata()["weights"]) == full.report.weights
            assert sorted(f.keys()) == sorted(n for n, _, _ in pieces)
            for name, a, b in pieces:
                torch.testing.assert_close(
                    f.get_tensor(name).reshape(-1), full[name].reshape(-1)[a:b], rtol=0, atol=1e-7
                )


@pytest.mark.parametrize("engine", ENGINES)
def test_two_rank_checkpoint_of_the_profiles_reshards_onto_one_process(engine, runs, tmp_path):
    core = SEMA(tiny_gpt2(), decay=0.8, warmup="none", posthoc_every_steps=2, posthoc_dir=str(tmp_path))
    core.load(str(runs / engine / "run" / "checkpoint-6"))
    assert core.profiles.t == 6 and core.posthoc_steps == [2, 4, 6]
    for k, sigma_rel in enumerate((0.05, 0.10)):
        expected = reconstruct(str(runs / engine / "run"), sigma_rel=sigma_rel, step=6)  # that snapshot, exactly
        assert expected.report.exact
        for name, value in core.profiles.state_dict()[k].items():
            assert torch.equal(value, expected[name]), (engine, k, name)
