"""Coverage of sharded averages is checked by intervals, never by adding up sizes: two pieces that both hold
elements [0, 10) of a 20-element tensor add up to 20 and leave [10, 20) to uninitialised memory."""

from __future__ import annotations

import pytest
import torch

from sema_hf.checkpoint import load_ema_checkpoint, save_ema_checkpoint
from sema_hf.engines.base import Layout
from sema_hf.engines.shards import cover_problems


def test_cover_problems_names_holes_and_overlaps():
    assert cover_problems(0, 20, [(10, 20), (0, 10)]) == []
    assert cover_problems(0, 20, [(0, 10), (0, 10)]) == ["[0, 10) twice", "[10, 20) missing"]
    assert cover_problems(0, 20, [(0, 8), (12, 20)]) == ["[8, 12) missing"]
    assert cover_problems(5, 15, [(0, 10), (10, 20)]) == []  # only the wanted range matters
    assert cover_problems(0, 4, []) == ["[0, 4) missing"]


def _layout(world: int, rank: int, pieces: list[tuple[str, int, int]]) -> Layout:
    return Layout(
        engine="fake",
        world_size=world,
        rank=rank,
        sharded=True,
        slots=[(n, [b - a]) for n, a, b in pieces],
        params=[("w", [20])],
        extra={"pieces": [[n, a, b] for n, a, b in pieces]},
    )


def test_resharding_refuses_saved_files_that_overlap_and_leave_a_hole(tmp_path):
    for rank in (1, 0):  # both files claim elements [0, 10): sizes add up to 20
        save_ema_checkpoint(str(tmp_path), {"w": torch.ones(10)}, _layout(2, rank, [("w", 0, 10)]), {})
    whole = Layout("local", 1, 0, sharded=False, slots=[("w", [20])], params=[("w", [20])])
    with pytest.raises(ValueError, match=r"w \[0, 10\) twice; w \[10, 20\) missing"):
        load_ema_checkpoint(str(tmp_path), whole)
    with pytest.raises(ValueError, match=r"\[10, 15\) missing"):
        load_ema_checkpoint(str(tmp_path), _layout(4, 2, [("w", 10, 15)]))


def test_resharding_of_files_that_tile_the_tensor_still_loads(tmp_path):
    full = torch.arange(20, dtype=torch.float32)
    for rank, (a, b) in ((1, (10, 20)), (0, (0, 10))):
        save_ema_checkpoint(str(tmp_path), {"w": full[a:b].clone()}, _layout(2, rank, [("w", a, b)]), {})
    whole = Layout("local", 1, 0, sharded=False, slots=[("w", [20])], params=[("w", [20])])
    tensors, _ = load_ema_checkpoint(str(tmp_path), whole)
    assert torch.equal(tensors["w"], full)
