"""`SEMA` in a hand-written loop, one process: the average against a hand-computed EMA, the switch points, real
optimizer steps only (gradient accumulation, skipped fp16 steps), checkpoints through ``accelerator.save_state`` /
``load_state``, and a resumed loop against an uninterrupted one. The multi-process engines are in
``test_sema_loop_dist.py``."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import Accelerator

from sema_hf import SEMA, SEMACallback, SEMAConfig
from sema_hf.checkpoint import STATE_NAME, shard_file_name

from tiny import reset_accelerate_state, tiny_dataset, tiny_model, tiny_trainer

DIM = 8


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def batches(n: int = 12, size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, DIM, generator=g)
        out.append((x, torch.sin(x.sum(-1))))
    return out


def loss_of(model, x, y):
    return model(x, labels=y)["loss"]


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, opt, sema, steps: int) -> None:
    """``steps`` plain SGD steps on `batches`, each followed by ``sema.step()`` (no accelerator: every call steps)."""
    for x, y in batches(steps):
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        sema.step()


def test_step_without_accelerator_follows_hand_computed_ema_with_linear_warmup():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.8, warmup="linear", warmup_steps=3, warmup_ratio=0.9, switch=False)
    ema = params(model)  # hand-computed: starts as the weights
    for t, (x, y) in enumerate(batches(6), start=1):
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        sema.step()
        m = 0.8 * (1 - 0.1 * (1 - t / 3)) if t < 3 else 0.8
        for n, p in model.named_parameters():
            ema[n] = m * ema[n] + (1 - m) * p.detach()
        assert sema.last_decay == pytest.approx(m)
    got = sema.ema_state_dict()
    for n in ema:
        torch.testing.assert_close(got[n], ema[n], rtol=1e-6, atol=1e-7)
    assert sema.num_updates == 6 and sema.global_step == 6 and sema.num_switches == 0


def test_epoch_end_switches_on_the_configured_epochs_and_copies_the_average():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none", switch_every_epochs=2, switch_start_epoch=1)
    switched = []
    for _epoch in range(5):
        train(model, opt, sema, 3)
        before = sema.ema_state_dict()
        switched.append(sema.epoch_end())
        if switched[-1]:
            for n, p in model.named_parameters():
                assert torch.equal(p.detach(), before[n])
    # e + 1 > 1 and (e + 1) % 2 == 0: epochs 2 and 4 (1-based)
    assert switched == [False, True, False, True, False]
    assert sema.num_switches == 2 and sema.epochs_completed == 5


def test_switch_every_steps_switches_inside_step():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none", switch_every_steps=4)
    train(model, opt, sema, 9)
    assert sema.num_switches == 2  # steps 4 and 8
    assert sema.epoch_end() is False  # step-counted switching: epoch ends are no switch points


def test_gradient_accumulation_updates_once_per_optimizer_step():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sema = SEMA(model, opt, accelerator, decay=0.7, warmup="none", switch=False)
    ema = params(model)
    stepped = []
    data = batches(9)
    for i, (x, y) in enumerate(data):
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, x, y))
            opt.step()
            opt.zero_grad()
        stepped.append(sema.step())
        if (i + 1) % 3 == 0:
            for n, p in model.named_parameters():
                ema[n] = 0.7 * ema[n] + 0.3 * p.detach()
    assert stepped == [False, False, True] * 3
    assert sema.global_step == 3 and sema.num_updates == 3
    got = sema.ema_state_dict()
    for n in ema:
        torch.testing.assert_close(got[n], ema[n], rtol=1e-6, atol=1e-7)


def test_skipped_fp16_step_does_not_update_the_average():
    accelerator = Accelerator(cpu=True)
    # Test-only: accelerate makes no GradScaler on CPU; one placed before prepare() makes the wrapper skip steps.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sema = SEMA(model, opt, accelerator, decay=0.5, warmup="none", switch=False)
    data = batches(3)
    for x, y in data[:2]:
        accelerator.backward(loss_of(model, x, y))
        opt.step()
        opt.zero_grad()
        sema.step()
    before = sema.ema_state_dict()
    x, y = data[2]
    accelerator.backward(loss_of(model, x, y) * float("inf"))
    opt.step()
    opt.zero_grad()
    assert accelerator.optimizer_step_was_skipped
    assert sema.step() is True  # an optimizer step (counted, as the Trainer counts it) ...
    after = sema.ema_state_dict()
    assert sema.num_updates == 2 and sema.global_step == 3
    assert all(torch.equal(before[n], after[n]) for n in before)  # ... that does not move the average


def test_swapped_in_evaluates_the_average_and_always_restores_raw_weights():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none")
    train(model, opt, sema, 3)
    raw, ema = params(model), sema.ema_state_dict()
    with pytest.raises(KeyError):
        with sema.swapped_in():
            assert all(torch.equal(p.detach(), ema[n]) for n, p in model.named_parameters())
            with pytest.raises(RuntimeError, match="inside sema.swapped_in"):
                sema.step()
            with pytest.raises(RuntimeError, match="do not nest"):
                with sema.swapped_in():
                    pass
            raise KeyError("an evaluation that fails")
    assert all(torch.equal(p.detach(), raw[n]) for n, p in model.named_parameters())


def test_if_better_refuses_without_scores_and_decides_on_them():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none", switch_policy="if_better")
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.step()
    sema.step()
    with pytest.raises(ValueError, match="score_raw= and score_average="):
        sema.epoch_end()
    assert sema.epoch_end(score_raw=1.0, score_average=2.0) is False  # the average scores worse: kept out
    assert sema.epoch_end(score_raw=0.1, score_average=0.2, greater_is_better=True) is True
    raw = params(model)
    calls = []

    def evaluate() -> float:
        calls.append(params(model))
        return float(loss_of(model, x, y).detach())

    decision = sema.epoch_end(evaluate=evaluate)
    assert len(calls) == 2 and all(torch.equal(calls[0][n], raw[n]) for n in raw)  # raw first, then the average
    assert sema.num_switches == 1 + int(decision)
    # finalize right after a decision reuses it; a step later it needs scores again
    assert sema.finalize() == ("ema" if decision else "model")
    sema.step()
    with pytest.raises(ValueError, match="finalize"):
        sema.finalize()


def test_horizon_epochs_needs_the_epoch_length_and_takes_it_from_a_sized_loader():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch="):
        SEMA(model, opt)  # the default horizon is in epochs
    with pytest.raises(ValueError, match="warmup"):
        SEMA(model, opt, horizon_steps=10)  # the default warmup is one epoch
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    loader = torch.utils.data.DataLoader(list(range(20)), batch_size=2)  # 10 batches -> 5 optimizer steps
    sema = SEMA(model, opt, accelerator, steps_per_epoch=loader, horizon_epochs=2.0)
    assert sema.steps_per_epoch == 5 and sema.warmup_steps == 5
    assert sema.decay == pytest.approx(1 - 1 / 10)
    sema.remove_hooks()


def _train(model, opt, accelerator, sema, data, start=0, stop=None, save_at=None, folder=None):
    for i, (x, y) in enumerate(data[start:stop], start=start):
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, x, y))
            opt.step()
            opt.zero_grad()
        sema.step()
        if (i + 1) % 4 == 0:
            sema.epoch_end()
        if save_at is not None and i + 1 == save_at:
            accelerator.save_state(folder)


def _run(config: SEMAConfig):
    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model, opt = accelerator.prepare(model, opt)
    sema = SEMA(model, opt, accelerator, config=config)
    return accelerator, model, opt, sema


def test_save_state_then_load_state_resumes_bit_identically(tmp_path):
    config = SEMAConfig(decay=0.6, warmup="linear", warmup_steps=6)
    data = batches(12)
    folder = str(tmp_path / "ckpt")
    accelerator, model, opt, sema = _run(config)
    accelerator.register_for_checkpointing(sema)  # also registered: harmless
    _train(model, opt, accelerator, sema, data, save_at=6, folder=folder)
    assert os.path.isfile(os.path.join(folder, STATE_NAME))
    assert os.path.isfile(os.path.join(folder, shard_file_name(0, 1)))
    uninterrupted = (sema.ema_state_dict(), params(model), sema.state_dict())
    sema.remove_hooks()

    reset_accelerate_state()
    accelerator, model, opt, sema = _run(config)
    accelerator.register_for_checkpointing(sema)
    accelerator.load_state(folder)
    assert sema.global_step == 6 and sema.epochs_completed == 1
    _train(model, opt, accelerator, sema, data, start=6)
    ema, weights, counters = sema.ema_state_dict(), params(model), sema.state_dict()
    assert counters == uninterrupted[2]
    assert all(torch.equal(ema[n], uninterrupted[0][n]) for n in ema)
    assert all(torch.equal(weights[n], uninterrupted[1][n]) for n in weights)


def test_load_state_without_ema_files_is_an_error_unless_fresh_is_allowed(tmp_path):
    folder = str(tmp_path / "plain")
    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    accelerator.save_state(folder)  # before any SEMA: no EMA files
    sema = SEMA(model, opt, accelerator, decay=0.5, warmup="none")
    with pytest.raises(FileNotFoundError, match="allow_fresh_ema_on_resume"):
        accelerator.load_state(folder)
    sema.remove_hooks()
    sema = SEMA(model, opt, accelerator, decay=0.5, warmup="none", allow_fresh_ema_on_resume=True)
    accelerator.load_state(folder)
    ema = sema.ema_state_dict()
    assert all(torch.equal(ema[n], p.detach()) for n, p in model.named_parameters())


def test_save_state_inside_swapped_in_is_refused(tmp_path):
    accelerator, model, opt, sema = _run(SEMAConfig(decay=0.5, warmup="none"))
    with sema.swapped_in(), pytest.raises(RuntimeError, match="inside sema.swapped_in"):
        accelerator.save_state(str(tmp_path / "c"))


def test_register_for_checkpointing_without_the_accelerator_refuses_to_load_counters_only():
    model = tiny_model()
    sema = SEMA(model, decay=0.5, warmup="none")
    with pytest.raises(RuntimeError, match="Pass the accelerator"):
        sema.load_state_dict(sema.state_dict())


def test_save_and_load_without_accelerator_round_trip(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none")
    train(model, opt, sema, 3)
    sema.save(str(tmp_path))
    other = SEMA(tiny_model(seed=5), decay=0.5, warmup="none")
    other.load(str(tmp_path))
    a, b = sema.ema_state_dict(), other.ema_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a) and other.state_dict() == sema.state_dict()


def test_loop_and_trainer_callback_give_the_same_average_on_the_same_trajectory(tmp_path):
    """One core, two front-ends: the Trainer's steps (AdamW, gradient clipping at 1, sequential batches of 8, two
    epochs, a switch at each epoch end, the default one-epoch linear warmup) replayed by hand give the same
    average and the same weights."""
    callback = SEMACallback(decay=0.6)
    trainer = tiny_trainer(str(tmp_path), [callback])
    trainer.train()
    by_trainer = callback.ema_state_dict()

    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    sema = SEMA(model, opt, decay=0.6, steps_per_epoch=4)
    data = tiny_dataset()
    x, y = torch.tensor(data["x"]), torch.tensor(data["labels"])
    for _epoch in range(2):
        for k in range(4):
            loss_of(model, x[8 * k : 8 * k + 8], y[8 * k : 8 * k + 8]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sema.step()
        sema.epoch_end()
    by_loop = sema.ema_state_dict()
    assert sema.warmup_steps == callback.core.warmup_steps == 4
    assert (sema.num_updates, sema.num_switches) == (callback.num_updates, callback.num_switches) == (8, 2)
    for n in by_trainer:
        torch.testing.assert_close(by_loop[n], by_trainer[n], rtol=1e-5, atol=1e-6)
    assert sema.finalize() == callback.final_weights_held == "ema"
    for (n, p), q in zip(model.named_parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_step_counted_guarded_switch_evaluates_at_its_switch_points_only():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none", switch_every_steps=3, switch_policy="if_better")
    data = batches(7)
    x0, y0 = data[0]
    calls = []

    def evaluate() -> float:
        calls.append(sema.global_step)
        return float(loss_of(model, x0, y0).detach())

    for x, y in data[:2]:
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        sema.step()  # no switch point yet: no scores needed
    loss_of(model, *data[2]).backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(ValueError, match="step 3"):
        sema.step()  # step 3 is a switch point: the guarded switch needs scores
    for x, y in data[3:]:
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        sema.step(evaluate=evaluate)
    assert calls == [6, 6]  # the raw weights and the average, at step 6 only
    assert sema.last_switch_decision is not None and sema.steps_since_decision == 1
