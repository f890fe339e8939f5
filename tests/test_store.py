import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sema_hf.engines.base import Slot
from sema_hf.engines.local import LocalAdapter
from sema_hf.store import EMAStore


def _trajectory(shape, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(steps)]


def test_update_follows_hand_computed_ema_sequence():
    thetas = _trajectory((5, 3), 6)
    decays = [0.5, 0.9, 0.99, 0.7, 0.8, 0.95]
    weight = thetas[0].clone()
    store = EMAStore([Slot("w", weight)])
    expected = thetas[0].double()
    for theta, m in zip(thetas[1:], decays, strict=False):
        weight.copy_(theta)
        store.update(m)
        expected = m * expected + (1 - m) * theta.double()
    torch.testing.assert_close(store.state_dict()["w"].double(), expected, rtol=1e-6, atol=1e-6)


def test_update_matches_torch_swa_utils_ema_on_a_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    reference.update_parameters(model)  # first call copies, as our store starts from a copy
    store = EMAStore(LocalAdapter(model).slots())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        store.update(0.9)
        reference.update_parameters(model)
    averaged = dict(reference.module.named_parameters())
    for name, value in store.state_dict().items():
        torch.testing.assert_close(value, averaged[name], rtol=1e-6, atol=1e-7)


def test_bf16_source_keeps_fp32_average_that_keeps_moving():
    weight = torch.ones(3000, dtype=torch.bfloat16)
    store = EMAStore([Slot("w", weight)], scratch_numel=1024)  # several cast blocks
    weight.fill_(1.5)
    for _ in range(10):
        store.update(0.999)
    avg = store.state_dict()["w"]
    assert avg.dtype == torch.float32
    torch.testing.assert_close(avg, torch.full_like(avg, 1.5 - 0.5 * 0.999**10))
    # The same average kept in bf16 stalls: each step moves it by 5e-4, under bf16's resolution of 7.8e-3 at 1.0.
    bf16 = torch.ones(1, dtype=torch.bfloat16)
    for _ in range(10):
        bf16.lerp_(torch.full((1,), 1.5, dtype=torch.bfloat16), 0.001)
    assert bf16.item() == 1.0


def test_switch_writes_average_into_source_and_compute_copy():
    master = torch.zeros(4)
    compute = torch.zeros(4, dtype=torch.bfloat16)
    store = EMAStore([Slot("w", master, compute)])
    master.fill_(2.0)
    store.update(0.5)
    written = []
    store._after_write = lambda: written.append(True)
    store.switch()
    assert torch.equal(master, torch.full((4,), 1.0))
    assert torch.equal(compute, torch.full((4,), 1.0, dtype=torch.bfloat16))
    assert written == [True]


def test_swapped_in_shows_average_and_restores_raw_weights_bit_for_bit():
    weight = torch.randn(64)
    store = EMAStore([Slot("w", weight)])
    weight.add_(torch.randn(64))
    raw = weight.clone()
    store.update(0.9)
    with store.swapped_in():
        assert torch.equal(weight, store.state_dict()["w"])
    assert torch.equal(weight, raw)
    with pytest.raises(RuntimeError, match="boom"), store.swapped_in():
        raise RuntimeError("boom")
    assert torch.equal(weight, raw)


def test_swap_writes_only_the_forward_copy_not_the_master():
    master = torch.ones(4)
    compute = torch.ones(4, dtype=torch.bfloat16)
    store = EMAStore([Slot("w", master, compute)])
    master.fill_(3.0)
    store.update(0.5)
    with store.swapped_in():
        assert torch.equal(compute, torch.full((4,), 2.0, dtype=torch.bfloat16))
        assert torch.equal(master, torch.full((4,), 3.0))
    assert torch.equal(compute, torch.ones(4, dtype=torch.bfloat16))


def test_tied_weights_are_averaged_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    adapter = LocalAdapter(Tied())
    assert [s.name for s in adapter.slots()] == ["embed.weight"]
    assert EMAStore(adapter.slots()).local_numel == 40


def test_only_trainable_parameters_are_averaged():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert [s.name for s in LocalAdapter(model).slots()] == ["1.weight", "1.bias"]
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    names = [s.name for s in LocalAdapter(model, include_buffers=True).slots()]
    assert "1.running_mean" in names and "1.num_batches_tracked" not in names


def test_averages_are_views_of_one_flat_buffer_and_update_does_not_allocate():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    store = EMAStore(LocalAdapter(model).slots())
    storages = {t.untyped_storage().data_ptr() for t in store.state_dict().values()}
    assert len(storages) == 1
    before = [t.data_ptr() for t in store.state_dict().values()]
    store.update(0.9)
    assert [t.data_ptr() for t in store.state_dict().values()] == before


def test_load_state_dict_rejects_missing_unexpected_and_reshaped_tensors():
    store = EMAStore([Slot("a", torch.zeros(2)), Slot("b", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        store.load_state_dict({"a": torch.ones(2)})
    with pytest.raises(ValueError, match=r"unexpected \['c'\]"):
        store.load_state_dict({"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)})
    with pytest.raises(ValueError, match="b: saved"):
        store.load_state_dict({"a": torch.ones(2), "b": torch.ones(4)})
    store.load_state_dict({"a": torch.ones(2), "b": torch.full((3,), 2.0)})
    assert torch.equal(store.state_dict()["b"], torch.full((3,), 2.0))


def test_slot_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        EMAStore([Slot("a", torch.zeros(1)), Slot("a", torch.zeros(1))])
