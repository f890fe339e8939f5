"""The store's planned fast paths (merged runs, cast blocks, grouped switch copies) against a plain per-tensor lerp."""

import pytest
import torch
from torch import nn

from sema_hf.engines.base import Slot
from sema_hf.engines.local import LocalAdapter
from sema_hf.store import EMAStore


def _mixed_sources(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(n, generator=g).to(dtype) for n in (1, 7, 300, 1025, 4000)]
    sources.append(torch.randn((), generator=g).to(dtype))  # 0-dim
    sources.append(torch.empty(0, dtype=dtype))  # empty
    sources.append(torch.empty(0, 5, dtype=dtype))
    sources.append(torch.randn(40, 30, generator=g).to(dtype).t())  # non-contiguous, larger than the scratch
    sources.append(torch.randn(6, 8, generator=g).to(dtype)[:, ::2])  # non-contiguous, strided rows
    return sources


def _run_against_reference(sources: list[torch.Tensor], store: EMAStore, steps: int = 4) -> None:
    reference = [s.float().clone() for s in sources]
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        decay = 0.9 - 0.1 * step
        for s in sources:
            s.add_(torch.randn(s.shape, generator=g).to(s.dtype))
        store.update(decay)
        for r, s in zip(reference, sources, strict=True):
            r.lerp_(s.float(), 1.0 - decay)
    averages = store.state_dict()
    for i, r in enumerate(reference):
        assert averages[f"t{i}"].dtype == torch.float32
        torch.testing.assert_close(averages[f"t{i}"], r, msg=f"slot t{i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_update_matches_per_tensor_lerp_for_small_empty_scalar_and_strided_tensors(dtype):
    sources = _mixed_sources(dtype)
    store = EMAStore([Slot(f"t{i}", s) for i, s in enumerate(sources)], scratch_numel=512)  # many cast blocks
    _run_against_reference(sources, store)


def test_update_handles_fp32_and_bf16_sources_interleaved():
    sources = [
        s for pair in zip(_mixed_sources(torch.float32), _mixed_sources(torch.bfloat16), strict=True) for s in pair
    ]
    store = EMAStore([Slot(f"t{i}", s) for i, s in enumerate(sources)], scratch_numel=700)
    _run_against_reference(sources, store)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sources_that_lie_end_to_end_are_averaged_as_one_run(dtype):
    flat = torch.randn(10 + 20 + 30 + 5, dtype=torch.float32).to(dtype)
    views = [flat[0:10], flat[10:30].view(4, 5), flat[30:30], flat[30:60].view(5, 6)]
    gap = flat[61:65]  # not adjacent to the previous view: its own run
    sources = [*views, gap]
    store = EMAStore([Slot(f"t{i}", s) for i, s in enumerate(sources)])
    if dtype == torch.float32:
        assert len(store._fp32_sources) == 2
    else:  # two casts (the gap splits the sources); the averages and the scratch are one run for the lerp
        assert [(len(b.sources), len(b.averages)) for b in store._cast_blocks] == [(2, 1)]
    _run_against_reference(sources, store)


def test_update_does_not_allocate_on_fp32_and_bf16_paths():
    from torch.profiler import ProfilerActivity, profile

    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)])
    fp32_store = EMAStore(LocalAdapter(model).slots())
    bf16_store = EMAStore(LocalAdapter(model.to(torch.bfloat16)).slots(), scratch_numel=1000)

    def allocated_bytes(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return sum(max(e.cpu_memory_usage, 0) for e in prof.events())

    assert allocated_bytes(lambda: torch.zeros(1000).add(1)) > 0  # the probe does see allocations
    assert allocated_bytes(lambda: fp32_store.update(0.99)) == 0
    assert allocated_bytes(lambda: bf16_store.update(0.99)) == 0


def test_switch_writes_fp32_sources_and_bf16_compute_copies_and_reset_restarts_from_sources():
    masters = [torch.randn(n) for n in (3, 0, 50, 7)]
    computes = [m.to(torch.bfloat16) for m in masters]
    store = EMAStore([Slot(f"t{i}", m, c) for i, (m, c) in enumerate(zip(masters, computes, strict=True))])
    for m in masters:
        m.mul_(3.0)
    store.update(0.5)
    averages = {k: v.clone() for k, v in store.state_dict().items()}
    store.switch()
    for i, (m, c) in enumerate(zip(masters, computes, strict=True)):
        assert torch.equal(m, averages[f"t{i}"])
        assert torch.equal(c, averages[f"t{i}"].to(torch.bfloat16))
    for m in masters:
        m.add_(1.0)
    store.reset()
    for i, m in enumerate(masters):
        assert torch.equal(store.state_dict()[f"t{i}"], m)


def test_switch_into_views_of_one_buffer_writes_every_view_and_nothing_else():
    flat = torch.zeros(40, dtype=torch.bfloat16)
    views = [flat[0:10], flat[10:30].view(4, 5), flat[32:40]]
    store = EMAStore([Slot(f"t{i}", v) for i, v in enumerate(views)])
    store.load_state_dict({"t0": torch.full((10,), 1.0), "t1": torch.full((4, 5), 2.0), "t2": torch.full((8,), 3.0)})
    store.switch()
    expected = torch.cat([torch.full((10,), 1.0), torch.full((20,), 2.0), torch.zeros(2), torch.full((8,), 3.0)])
    assert torch.equal(flat, expected.to(torch.bfloat16))


def test_swapped_in_restores_bf16_weights_bit_for_bit():
    sources = _mixed_sources(torch.bfloat16)
    store = EMAStore([Slot(f"t{i}", s) for i, s in enumerate(sources)], scratch_numel=512)
    for s in sources:
        s.add_(1.0)
    store.update(0.5)
    raw = [s.clone() for s in sources]
    with store.swapped_in():
        assert not all(torch.equal(s, r) for s, r in zip(sources, raw, strict=True))
    assert all(torch.equal(s, r) for s, r in zip(sources, raw, strict=True))
