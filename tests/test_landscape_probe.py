"""LandscapeProbe: raw vs EMA measurements equal the landscape functions on each weight set; the callback logs them.

The reference values are computed independently: two copies of the model, one holding the raw weights and one the
EMA weights, each measured with `sema_hf.landscape`'s functions and the probe's seed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

import sema_hf.sema as sema_module
from sema_hf import LandscapeProbe, SEMACallback, fixed_batches, flatness, mean_loss, top_hessian_eigenvalue
from sema_hf.engines import detect_engine
from sema_hf.store import EMAStore

from tiny import TinyRegressor, tiny_dataset, tiny_model, tiny_trainer


def probe_batches(n: int = 2, size: int = 8) -> list[dict[str, torch.Tensor]]:
    data = tiny_dataset(n=n * size, seed=5).with_format("torch")
    return [
        {"x": data[i * size : (i + 1) * size]["x"], "labels": data[i * size : (i + 1) * size]["labels"]}
        for i in range(n)
    ]


def ema_store_for(model: nn.Module, ema_weights: dict[str, torch.Tensor]) -> EMAStore:
    """The library's own store over ``model``, holding ``ema_weights`` as its average."""
    engine = detect_engine(model)
    store = EMAStore(engine.slots(), after_write=engine.after_write)
    store.load_state_dict(ema_weights)
    return store


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    other = copy.deepcopy(model)
    other.load_state_dict(weights, strict=False)
    return other


def perturbed_weights(model: nn.Module, scale: float = 0.3, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_measure_gives_the_landscape_of_raw_weights_and_of_ema_weights_separately():
    model = tiny_model(seed=0)
    ema = perturbed_weights(model)
    batches = probe_batches()
    probe = LandscapeProbe(batches, sharpness_iterations=6, flatness_radius=0.05, flatness_samples=3, seed=3)
    raw_before = snapshot(model)

    logs = probe.measure(model, ema_store_for(model, ema).swapped_in)

    assert set(logs) == {f"landscape_{w}_{k}" for w in ("raw", "ema") for k in ("loss", "sharpness", "flatness")}
    assert all(type(v) is float for v in logs.values())
    for which, reference in (("raw", copy.deepcopy(model)), ("ema", with_weights(model, ema))):
        expected_sharpness = top_hessian_eigenvalue(reference, batches, max_iterations=6, tol=1e-3, seed=3)
        expected_flatness = flatness(reference, batches, radius=0.05, num_samples=3, seed=3)
        assert logs[f"landscape_{which}_loss"] == pytest.approx(mean_loss(reference, batches), rel=1e-6)
        assert logs[f"landscape_{which}_sharpness"] == pytest.approx(expected_sharpness, rel=1e-5)
        assert logs[f"landscape_{which}_flatness"] == pytest.approx(expected_flatness.mean, rel=1e-5, abs=1e-9)
    # the two weight sets really differ, so the test above could tell them apart
    assert logs["landscape_raw_loss"] != pytest.approx(logs["landscape_ema_loss"], rel=1e-3)
    assert logs["landscape_raw_sharpness"] != pytest.approx(logs["landscape_ema_sharpness"], rel=1e-3)
    # the raw weights are back, bit for bit
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw_before[name]), name


def test_measure_on_a_quadratic_matches_closed_forms():
    # loss = 1/2 (theta - c)^T A (theta - c): raw weights at the minimum (loss 0), EMA off by delta
    a = torch.diag(torch.tensor([4.0, 1.0, 0.25]))
    center = torch.tensor([1.0, -2.0, 0.5])
    delta = torch.tensor([0.5, 1.0, -2.0])

    class Quadratic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Parameter(center.clone())

        def forward(self, scale: torch.Tensor) -> dict[str, torch.Tensor]:
            x = self.theta - center
            return {"loss": scale * 0.5 * (x @ a @ x)}

    model = Quadratic()
    probe = LandscapeProbe([{"scale": torch.tensor(1.0)}], sharpness_iterations=60, sharpness_tol=1e-9)
    logs = probe.measure(model, ema_store_for(model, {"theta": center + delta}).swapped_in)

    assert logs["landscape_raw_loss"] == pytest.approx(0.0, abs=1e-7)
    assert logs["landscape_ema_loss"] == pytest.approx(float(0.5 * delta @ a @ delta), rel=1e-6)
    assert logs["landscape_raw_sharpness"] == pytest.approx(4.0, rel=1e-4)  # the Hessian A, wherever theta is
    assert logs["landscape_ema_sharpness"] == pytest.approx(4.0, rel=1e-4)
    assert "landscape_raw_flatness" not in logs  # flatness is off by default


def test_sharpness_can_be_turned_off_and_a_dataloader_is_taken_up_to_num_batches():
    data = tiny_dataset(n=64).with_format("torch")
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    probe = LandscapeProbe(loader, num_batches=3, sharpness_iterations=0)
    assert len(probe.batches) == 3
    model = tiny_model()
    logs = probe.measure(model, ema_store_for(model, perturbed_weights(model)).swapped_in)
    assert set(logs) == {"landscape_raw_loss", "landscape_ema_loss"}
    assert logs["landscape_raw_loss"] == pytest.approx(mean_loss(model, fixed_batches(loader, 3)), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sharpness_iterations": -1}, "sharpness_iterations"),
        ({"sharpness_tol": -0.1}, "sharpness_tol"),
        ({"flatness_radius": -0.01}, "flatness_radius"),
        ({"flatness_radius": 0.05, "flatness_samples": 0}, "flatness_samples"),
        ({"batches": []}, "batches"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_field(kwargs, field):
    values = {"batches": probe_batches(1), **kwargs}
    with pytest.raises(ValueError, match=field):
        LandscapeProbe(**values)


# --- through the Trainer ---------------------------------------------------------------------------------------------


class BeforeSwitch(TrainerCallback):
    """Placed before SEMACallback: records the raw and EMA weights the switch is about to act on."""

    def __init__(self, sema: SEMACallback) -> None:
        self.sema = sema
        self.raw: list[dict[str, torch.Tensor]] = []
        self.ema: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.raw.append(snapshot(model))
        self.ema.append(self.sema.ema_state_dict())


def test_trainer_logs_raw_and_ema_landscape_at_each_switch(tmp_path):
    batches = probe_batches()
    probe = LandscapeProbe(batches, sharpness_iterations=4, seed=1)
    sema = SEMACallback(decay=0.7, warmup="none", landscape=probe)
    before = BeforeSwitch(sema)
    trainer = tiny_trainer(str(tmp_path), [before, sema], num_train_epochs=3)
    trainer.train()

    switches = [h for h in trainer.state.log_history if "ema_switches" in h]
    assert [h["ema_switches"] for h in switches] == [1.0, 2.0, 3.0]
    keys = {f"landscape_{w}_{k}" for w in ("raw", "ema") for k in ("loss", "sharpness")}
    assert all(keys <= set(h) for h in switches)
    assert not any(k.startswith("landscape_") for h in trainer.state.log_history if "ema_switches" not in h for k in h)
    reference = TinyRegressor()
    for logged, raw, ema in zip(switches, before.raw, before.ema, strict=True):
        for which, weights in (("raw", raw), ("ema", ema)):
            reference.load_state_dict(weights, strict=False)
            assert logged[f"landscape_{which}_loss"] == pytest.approx(mean_loss(reference, batches), rel=1e-5)
            expected = top_hessian_eigenvalue(reference, batches, max_iterations=4, seed=1)
            assert logged[f"landscape_{which}_sharpness"] == pytest.approx(expected, rel=1e-4)
        assert logged["landscape_raw_loss"] != logged["landscape_ema_loss"]


def test_landscape_probe_is_refused_under_a_sharded_engine(tmp_path, monkeypatch):
    real_detect = sema_module.detect_engine  # the core finds the engine for the callback

    def sharded_engine(*args, **kwargs):
        engine = real_detect(*args, **kwargs)
        layout = engine.layout()
        engine.layout = lambda: SimpleNamespace(**{**vars(layout), "sharded": True})
        return engine

    monkeypatch.setattr(sema_module, "detect_engine", sharded_engine)
    sema = SEMACallback(landscape=LandscapeProbe(probe_batches(1)))
    with pytest.raises(ValueError, match="single-process models only"):
        tiny_trainer(str(tmp_path), [sema], max_steps=1).train()
