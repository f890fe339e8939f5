"""Sharded SEMA: the pure offset maps and re-sharding, then real FSDP1/FSDP2/ZeRO runs on 2 gloo ranks on CPU.

The multi-process tests share two launches (FSDP runs in one, DeepSpeed runs in the other; see
``tests/dist/sharded_worker.py``) and compare them with one single-process run of the same model, data and seed.
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
from sema_hf.checkpoint import load_ema_checkpoint, save_ema_checkpoint
from sema_hf.engines import LocalAdapter, detect_engine
from sema_hf.engines.base import Layout
from sema_hf.engines.shards import FlatEntry, block_range, partition_ranges

from launch import run_torchrun

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from sharded_setup import (  # noqa: E402
    SEMA_KWARGS,
    STEPS,
    eval_dataset,
    pattern_dataset,
    tiny_gpt2,
    training_args,
)

# ---- pure parts: where each parameter's elements lie ----------------------------------------------------------------


def test_partition_ranges_maps_flat_offsets_to_parameter_pieces_and_skips_padding():
    # a: 6 elements at 0, b: 5 at 8 (2 alignment pad before it), c: 4 at 13; buffer of 20 (3 trailing pad)
    entries = [FlatEntry("a", (2, 3), 0), FlatEntry("b", (5,), 8), FlatEntry("c", (2, 2), 13)]
    assert partition_ranges(entries, 0, 10) == [(entries[0], 0, 6, 0), (entries[1], 0, 2, 8)]
    assert partition_ranges(entries, 10, 20) == [(entries[1], 2, 5, 0), (entries[2], 0, 4, 3)]
    assert partition_ranges(entries, 17, 20) == []  # a partition of padding only holds nothing
    # every element of every parameter lands in exactly one partition
    for world in (1, 2, 3, 4):
        size = -(-20 // world)
        held = [
            (e.name, a, b) for r in range(world) for e, a, b, _ in partition_ranges(entries, r * size, r * size + size)
        ]
        for e in entries:
            assert sum(b - a for n, a, b in held if n == e.name) == e.numel


def test_block_range_matches_zero3_partitions_and_torch_chunk_rows():
    for numel in (1, 2, 5, 33, 1089):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(numel).chunk(world)
            ranges = [block_range(numel, r, world) for r in range(world)]
            assert sum(b - a for a, b in ranges) == numel
            for r, (a, b) in enumerate(ranges):
                expected = chunks[r].tolist() if r < len(chunks) else []
                assert list(range(a, b)) == expected
                assert b - a <= math.ceil(numel / world)  # ZeRO-3 pads each block to ceil(numel / world)


def _fake_layout(world: int, rank: int, pieces: list[tuple[str, int, int]], params) -> Layout:
    return Layout(
        engine="fake",
        world_size=world,
        rank=rank,
        sharded=True,
        slots=[(n, [b - a]) for n, a, b in pieces],
        params=params,
        extra={"pieces": [[n, a, b] for n, a, b in pieces]},
    )


def _split(full: dict[str, torch.Tensor], world: int) -> list[list[tuple[str, int, int]]]:
    per_rank: list[list[tuple[str, int, int]]] = [[] for _ in range(world)]
    for name, t in full.items():
        for r in range(world):
            a, b = block_range(t.numel(), r, world)
            if a < b:
                per_rank[r].append((name, a, b))
    return per_rank


def test_checkpoint_saved_on_two_ranks_reshards_onto_three_ranks_and_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g), "s": torch.randn(1, generator=g)}
    params = [(n, list(t.shape)) for n, t in full.items()]
    folder = str(tmp_path)
    for rank in (1, 0):  # rank 0 writes the JSON last, as after the barrier
        pieces = _split(full, 2)[rank]
        averages = {n: full[n].reshape(-1)[a:b].clone() for n, a, b in pieces}
        save_ema_checkpoint(folder, averages, _fake_layout(2, rank, pieces, params), {"global_step": 3})

    for rank, pieces in enumerate(_split(full, 3)):  # 2 -> 3 ranks
        tensors, meta = load_ema_checkpoint(folder, _fake_layout(3, rank, pieces, params))
        assert meta["global_step"] == 3 and sorted(tensors) == sorted(n for n, _, _ in pieces)
        for n, a, b in pieces:
            assert torch.equal(tensors[n], full[n].reshape(-1)[a:b])
    # 2 ranks -> one process (the local engine's layout: whole tensors)
    local = Layout("local", 1, 0, sharded=False, slots=params, params=params)
    tensors, _ = load_ema_checkpoint(folder, local)
    assert all(torch.equal(tensors[n], full[n]) for n in full)
    # same world size and placement: this rank's own file
    pieces = _split(full, 2)[1]
    tensors, _ = load_ema_checkpoint(folder, _fake_layout(2, 1, pieces, params))
    assert all(torch.equal(tensors[n], full[n].reshape(-1)[a:b]) for n, a, b in pieces)


def test_sharded_checkpoint_without_piece_ranges_refuses_another_world_size(tmp_path):
    params = [("w", [4])]
    for rank in (1, 0):
        layout = Layout("old", 2, rank, sharded=True, slots=[("w", [2])], params=params)
        save_ema_checkpoint(str(tmp_path), {"w": torch.zeros(2)}, layout, {})
    with pytest.raises(ValueError, match="Resume with world size 2"):
        load_ema_checkpoint(str(tmp_path), Layout("old", 3, 0, sharded=True, slots=[("w", [2])], params=params))


def test_checkpoint_of_another_model_is_refused_before_resharding(tmp_path):
    params = [("w", [4])]
    for rank in (1, 0):
        pieces = [("w", 2 * rank, 2 * rank + 2)]
        save_ema_checkpoint(str(tmp_path), {"w": torch.zeros(2)}, _fake_layout(2, rank, pieces, params), {})
    other = [("w", [5])]
    with pytest.raises(ValueError, match="shape mismatches"):
        load_ema_checkpoint(str(tmp_path), Layout("local", 1, 0, sharded=False, slots=other, params=other))


def test_zero3_partitioned_parameters_without_their_zero_optimizer_are_refused():
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.ds_tensor = p.data.view(-1)[:1]  # what ZeRO-3 leaves on a parameter; the full data would then be empty
    with pytest.raises(NotImplementedError, match="no ZeRO-3 optimizer was given"):
        detect_engine(model, torch.optim.SGD(model.parameters(), lr=0.1))


# ---- real engines, 2 ranks -----------------------------------------------------------------------------------------

FSDP_SPECS = ["fsdp2:resume", "fsdp1-orig", "fsdp1-flat", "fsdp2-bf16"]
DEEPSPEED_SPECS = ["zero2", "zero3:resume", "zero3-bf16", "zero1-bf16"]
ENGINES = [s.partition(":")[0] for s in FSDP_SPECS + DEEPSPEED_SPECS]
FP32 = [e for e in ENGINES if not e.endswith("bf16")]
RESUMED = [s.partition(":")[0] for s in FSDP_SPECS + DEEPSPEED_SPECS if s.endswith(":resume")]
ALL_GATHER_ON_SWITCH = {"zero2", "zero1-bf16"}  # ZeRO-1/2 refresh the full compute copy, as after an optimizer step
EXPECTED_ENGINE = {
    "fsdp2": "fsdp2",
    "fsdp2-bf16": "fsdp2",
    "fsdp1-orig": "fsdp1",
    "fsdp1-flat": "fsdp1",
    "zero2": "deepspeed-zero2",
    "zero3": "deepspeed-zero3",
    "zero3-bf16": "deepspeed-zero3",
    "zero1-bf16": "deepspeed-zero1",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both launches, once per module: ``{engine: {"dir", "ranks": [result_rank0, result_rank1]}}``."""
    out = tmp_path_factory.mktemp("sharded")
    run_torchrun("tests/dist/sharded_worker.py", str(out), *FSDP_SPECS, timeout=300)
    run_torchrun("tests/dist/sharded_worker.py", str(out), *DEEPSPEED_SPECS, timeout=400)
    results = {}
    for engine in ENGINES:
        folder = out / engine
        ranks = [json.loads((folder / f"result_rank{r}.json").read_text()) for r in range(2)]
        results[engine] = {"dir": folder, "ranks": ranks, "ema": load_file(str(folder / "ema.safetensors"))}
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same training in one process (global batch 8 on one rank)."""
    sema = SEMACallback(**SEMA_KWARGS)
    model = tiny_gpt2()
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path_factory.mktemp("single")), 1),
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[sema],
    )
    trainer.train()
    return {
        "ema": sema.ema_state_dict(),
        "history": trainer.state.log_history,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _losses(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ENGINES)
def test_each_rank_averages_only_its_shard_of_the_master_weights(engine, runs, reference):
    ranks = runs[engine]["ranks"]
    assert [r["engine"] for r in ranks] == [EXPECTED_ENGINE[engine]] * 2
    numels = [r["local_numel"] for r in ranks]
    assert sum(numels) == reference["trainable"]
    assert all(abs(n - reference["trainable"] / 2) < 0.05 * reference["trainable"] for n in numels), numels
    if engine == "zero1-bf16":
        assert ranks[0]["optimizer"] == "BF16_Optimizer"


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ENGINES)
def test_update_and_switch_make_no_collective(engine, runs):
    for result in runs[engine]["ranks"]:
        assert len(result["update_collectives"]) == STEPS
        assert all(calls == [] for calls in result["update_collectives"])
        assert len(result["switch_collectives"]) == 4  # 3 epoch ends + the final switch (final_weights="ema")
        expected = ["c10d::_allgather_base_"] if engine in ALL_GATHER_ON_SWITCH else []
        assert all(calls == expected for calls in result["switch_collectives"]), result["switch_collectives"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ENGINES)
def test_gathered_ema_is_the_ema_of_the_fp32_master_weights(engine, runs, reference):
    for result in runs[engine]["ranks"]:
        # recomputed from the full fp32 master weights recorded after every optimizer step (engine's own gather)
        assert result["trajectory_vs_ema"] <= 1e-6
        assert result["num_updates"] == STEPS and result["num_switches"] == 3
    ema = runs[engine]["ema"]
    assert sorted(ema) == sorted(reference["ema"])
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if engine in FP32 else {"rtol": 0, "atol": 2e-2}
    for name, value in reference["ema"].items():
        torch.testing.assert_close(ema[name], value, **tolerance, msg=f"{engine}: {name}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ENGINES)
def test_switch_writes_the_ema_into_master_and_compute_weights_and_training_goes_on(engine, runs, reference):
    for result in runs[engine]["ranks"]:
        checks = result["switch_checks"]
        assert [c["step"] for c in checks] == [4, 8, 12]
        assert all(c["master_vs_ema"] == 0.0 and c["compute_vs_ema"] == 0.0 for c in checks), checks
        if engine.endswith("bf16"):  # the forward reads bf16 copies (FSDP2: its all-gathered unsharded params)
            assert {c["compute_dtype"] for c in checks} == {"torch.bfloat16"}
        assert result["final_master_vs_ema"] == 0.0  # final_weights="ema"
    history = runs[engine]["ranks"][0]["log_history"]
    losses, evals = _losses(history, "loss"), _losses(history, "eval_loss")
    assert len(losses) == STEPS and len(evals) == 4
    epochs = [sum(losses[i : i + 4]) / 4 for i in (0, 4, 8)]
    assert epochs[0] > epochs[1] > epochs[2], epochs  # the loss keeps falling after each switch
    if engine in FP32:  # the same losses, and the same EMA evaluations between switches, as in one process
        torch.testing.assert_close(losses, _losses(reference["history"], "loss"), rtol=1e-5, atol=0)
        torch.testing.assert_close(evals, _losses(reference["history"], "eval_loss"), rtol=1e-5, atol=0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", [e for e in ENGINES if e.startswith("zero") or e.startswith("fsdp2")])
def test_trainer_save_model_writes_the_ema_weights(engine, runs):
    for result in runs[engine]["ranks"]:
        assert result["save_model_vs_ema"] == 0.0  # in the saved dtype (16-bit gathered weights under bf16 ZeRO-3)
        assert result["save_model_numel"] > 0.9 * sum(r["local_numel"] for r in runs[engine]["ranks"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", RESUMED)
def test_run_resumed_from_a_checkpoint_ends_equal_to_the_uninterrupted_run(engine, runs):
    for result in runs[engine]["ranks"]:
        assert result["resume_ema_diff"] == 0.0
        assert result["resume_weights_diff"] == 0.0
        assert result["resume_local_numel"] == result["local_numel"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", RESUMED)
def test_two_rank_checkpoint_reshards_onto_one_process(engine, runs):
    folder = runs[engine]["dir"] / "run" / "checkpoint-6"
    assert sorted(f for f in os.listdir(folder) if f.startswith("sema_ema-")) == [
        "sema_ema-00001-of-00002.safetensors",
        "sema_ema-00002-of-00002.safetensors",
    ]
    tensors, meta = load_ema_checkpoint(str(folder), LocalAdapter(tiny_gpt2()).layout())
    assert meta["world_size"] == 2 and meta["global_step"] == 6
    expected = load_file(str(runs[engine]["dir"] / "run" / "ema_step6.safetensors"))
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[n], expected[n]) for n in expected)
