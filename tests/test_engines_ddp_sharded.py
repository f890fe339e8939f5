"""DDP with ``shard_under_ddp=True``: the pure slice partition, then a real 2-rank DDP Trainer run (gloo, CPU).

The multi-process tests share one launch (``tests/dist/ddp_sharded_worker.py``) and compare it with one
single-process run of the same model, data, seed and global batch (whose step-6 checkpoint the launch also
re-shards onto its own layout).
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from sema_hf import SEMACallback
from sema_hf.checkpoint import load_ema_checkpoint
from sema_hf.engines import LocalAdapter, detect_engine
from sema_hf.engines.ddp_sharded import ddp_partition, flat_dtype

from launch import run_torchrun

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from sharded_setup import SEMA_KWARGS, STEPS, eval_dataset, pattern_dataset, tiny_gpt2, training_args  # noqa: E402

ALL_GATHER = ["c10d::_allgather_base_"]  # how gloo dispatches all_gather_into_tensor

# ---- pure parts: which elements each rank owns ------------------------------------------------------------------


PARAMS = [("a", (2, 3)), ("b", (5,)), ("c", (1,)), ("d", (3, 3))]  # 21 elements, end to end


def test_ddp_partition_cuts_the_flat_order_into_contiguous_blocks_of_ceil_n_over_w():
    assert ddp_partition(PARAMS, 0, 2) == [("a", 0, 6, 0), ("b", 0, 5, 6)]  # block [0, 11)
    assert ddp_partition(PARAMS, 1, 2) == [("c", 0, 1, 11), ("d", 0, 9, 12)]  # block [11, 21)
    assert ddp_partition(PARAMS, 1, 4) == [("b", 0, 5, 6), ("c", 0, 1, 11)]  # blocks of 6: [6, 12)
    assert ddp_partition(PARAMS, 2, 4) == [("d", 0, 6, 12)]
    assert ddp_partition(PARAMS, 3, 4) == [("d", 6, 9, 18)]  # the last block is short
    assert ddp_partition(PARAMS, 0, 1) == [("a", 0, 6, 0), ("b", 0, 5, 6), ("c", 0, 1, 11), ("d", 0, 9, 12)]


def test_ddp_partition_covers_every_element_once_and_balances_the_ranks():
    for world in (1, 2, 3, 5, 8, 30):
        shares = [ddp_partition(PARAMS, r, world) for r in range(world)]
        owner: dict[tuple[str, int], int] = {}
        for r, share in enumerate(shares):
            for name, start, stop, _offset in share:
                assert 0 <= start < stop
                for i in range(start, stop):
                    assert (name, i) not in owner, (world, name, i)
                    owner[(name, i)] = r
        assert len(owner) == 21
        sizes = [sum(b - a for _, a, b, _ in share) for share in shares]
        assert max(sizes) == math.ceil(21 / world)
        flat = [offset + i for share in shares for _, a, b, offset in share for i in range(b - a)]
        assert flat == list(range(21))  # the ranks' pieces, in rank order, are the flat order itself


def test_ddp_partition_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        ddp_partition(PARAMS, 2, 2)


def test_flat_dtype_carries_every_parameter_dtype_without_loss():
    assert flat_dtype([torch.bfloat16]) == torch.bfloat16
    assert flat_dtype([torch.bfloat16, torch.float32]) == torch.float32
    assert flat_dtype([torch.bfloat16, torch.float16]) == torch.float32
    assert flat_dtype([torch.float32, torch.float64]) == torch.float64
    x = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(x.to(flat_dtype([torch.bfloat16, torch.float16])).to(torch.bfloat16), x)


def test_shard_under_ddp_in_one_process_keeps_the_full_local_average():
    model = tiny_gpt2()
    adapter = detect_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), shard_under_ddp=True)
    assert isinstance(adapter, LocalAdapter)


# ---- real DDP, 2 ranks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same training in one process (global batch 8 on one rank), with a checkpoint at step 6."""
    sema = SEMACallback(**SEMA_KWARGS)
    model = tiny_gpt2()
    folder = tmp_path_factory.mktemp("single")
    trainer = Trainer(
        model=model,
        args=training_args(str(folder), 1, save_strategy="steps", save_steps=6),
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[sema],
    )
    trainer.train()
    return {
        "ema": sema.ema_state_dict(),
        "history": trainer.state.log_history,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "checkpoint": folder / "checkpoint-6",
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, reference) -> dict:
    out = tmp_path_factory.mktemp("ddp_sharded")
    run_torchrun("tests/dist/ddp_sharded_worker.py", str(out), str(reference["checkpoint"]), timeout=300)
    ranks = [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]
    return {"dir": out, "ranks": ranks, "ema": load_file(str(out / "ema.safetensors"))}


def _losses(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


@pytest.mark.multiprocess
def test_each_rank_averages_a_contiguous_half_of_the_trainable_elements(run, reference):
    numels = [r["run"]["local_numel"] for r in run["ranks"]]
    assert [r["run"]["engine"] for r in run["ranks"]] == ["ddp-sharded"] * 2
    assert sum(numels) == reference["trainable"]
    assert numels[0] == math.ceil(reference["trainable"] / 2)
    # rank 0's pieces then rank 1's are the parameters end to end, one split at the boundary at most
    merged: list[list] = []
    for name, start, stop in run["ranks"][0]["run"]["pieces"] + run["ranks"][1]["run"]["pieces"]:
        if merged and merged[-1][0] == name:
            assert merged[-1][2] == start
            merged[-1][2] = stop
        else:
            assert start == 0
            merged.append([name, start, stop])
    # named_parameters: the tied lm_head weight once, as the single-process average has it
    assert merged == [[n, 0, p.numel()] for n, p in tiny_gpt2().named_parameters()]
    assert sorted(n for n, _, _ in merged) == sorted(reference["ema"])


@pytest.mark.multiprocess
def test_updates_make_no_collective_and_a_switch_exactly_one_all_gather(run):
    for result in run["ranks"]:
        calls = result["run"]
        assert len(calls["update_collectives"]) == STEPS and all(c == [] for c in calls["update_collectives"])
        assert len(calls["switch_collectives"]) == 4  # 3 epoch ends + the final switch (final_weights="ema")
        assert all(c == ALL_GATHER for c in calls["switch_collectives"]), calls["switch_collectives"]


@pytest.mark.multiprocess
def test_replicas_are_identical_and_hold_the_ema_after_every_switch(run):
    for result in run["ranks"]:
        checks = result["run"]["switch_checks"]
        assert [c["step"] for c in checks] == [4, 8, 12]
        assert all(c["rank_spread"] == 0.0 and c["params_vs_ema"] == 0.0 for c in checks), checks
        assert result["run"]["final_rank_spread"] == 0.0 and result["run"]["final_params_vs_ema"] == 0.0


@pytest.mark.multiprocess
def test_evaluation_gathers_the_average_with_one_collective_and_restores_raw_weights_bit_for_bit(run):
    for result in run["ranks"]:
        checks = result["run"]["eval_checks"]
        assert [c["step"] for c in checks] == [3, 6, 9, 12]
        for c in checks:
            assert c["swap_in"] == ALL_GATHER and c["swap_out"] == [], c
            assert c["inside_vs_ema"] == 0.0 and c["raw_restored"], c


@pytest.mark.multiprocess
def test_gathered_ema_equals_the_single_process_one(run, reference):
    for result in run["ranks"]:
        assert result["run"]["trajectory_vs_ema"] <= 1e-6  # the EMA of the weights the replicas went through
        assert result["run"]["num_updates"] == STEPS and result["run"]["num_switches"] == 3
    assert sorted(run["ema"]) == sorted(reference["ema"])
    for name, value in reference["ema"].items():
        torch.testing.assert_close(run["ema"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    history = run["ranks"][0]["run"]["log_history"]
    torch.testing.assert_close(_losses(history, "loss"), _losses(reference["history"], "loss"), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        _losses(history, "eval_loss"), _losses(reference["history"], "eval_loss"), rtol=1e-5, atol=0
    )


@pytest.mark.multiprocess
def test_run_resumed_from_a_checkpoint_ends_bit_equal_to_the_uninterrupted_run(run):
    for result in run["ranks"]:
        assert result["resume"]["ema_diff"] == 0.0 and result["resume"]["weights_diff"] == 0.0
        assert result["resume"]["local_numel"] == result["run"]["local_numel"]


@pytest.mark.multiprocess
def test_ddp_sharded_checkpoint_reshards_onto_one_process(run):
    folder = run["dir"] / "run" / "checkpoint-6"
    assert sorted(f for f in os.listdir(folder) if f.startswith("sema_ema-")) == [
        "sema_ema-00001-of-00002.safetensors",
        "sema_ema-00002-of-00002.safetensors",
    ]
    tensors, meta = load_ema_checkpoint(str(folder), LocalAdapter(tiny_gpt2()).layout())
    assert meta["engine"] == "ddp-sharded" and meta["world_size"] == 2 and meta["global_step"] == 6
    expected = load_file(str(run["dir"] / "run" / "ema_step6.safetensors"))
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[n], expected[n]) for n in expected)


@pytest.mark.multiprocess
def test_one_process_and_fsdp2_checkpoints_reshard_onto_ddp_sharded_ranks_and_back(run):
    for result in run["ranks"]:
        single = result["from_single"]
        assert single == {"engine": "ddp-sharded", "global_step": 6, "names": True, "equal": True}
        assert result["fsdp2"]["from"] and result["fsdp2"]["to"]
        # FSDP2 cuts every parameter in row blocks, the DDP-sharded layout cuts the flat order: not the same pieces
        assert len(result["fsdp2"]["fsdp_pieces"]) > len(result["run"]["pieces"])
        assert result["ddp_sharded_files"] == [
            "sema_ema-00001-of-00002.safetensors",
            "sema_ema-00002-of-00002.safetensors",
        ]


@pytest.mark.multiprocess
def test_mixed_bf16_and_fp32_parameters_share_one_average_exactly(run):
    total = run["ranks"][0]["mixed"]["total"]
    assert [r["mixed"]["local_numel"] for r in run["ranks"]] == [math.ceil(total / 2), total - math.ceil(total / 2)]
    for result in run["ranks"]:
        mixed = result["mixed"]
        assert mixed["dtypes"] == ["torch.bfloat16", "torch.float32"]
        assert all(c == [] for c in mixed["update_collectives"]) and mixed["switch_collectives"] == ALL_GATHER
        assert mixed["gathered_vs_full"] == 0.0  # the same fp32 arithmetic on the same elements
        assert mixed["params_cast_exact"] and mixed["rank_spread"] == 0.0
        assert mixed["swap_collectives"] == [ALL_GATHER, []]
        assert mixed["swap_inside_exact"] and mixed["swap_raw_restored"]
