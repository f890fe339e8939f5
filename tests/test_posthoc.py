"""Post-hoc EMA (`sema_hf.posthoc`, `sema_hf.profiles`, tracking in `sema_hf.SEMA`), one process: the profile update
against a hand-computed sequence, reconstructions against independent float64 EMAs of the weights recorded after
every optimizer step, the file format's checks, resume, and the command line. The 2-rank engines are in
``test_posthoc_dist.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from sema_hf import SEMA, SEMACallback
from sema_hf.posthoc import (
    INDEX_NAME,
    Target,
    gamma_to_sigma_rel,
    power_inner,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_file_name,
    solve,
)
from sema_hf.profiles import power_beta

from tiny import StopAt, reset_accelerate_state, tiny_model, tiny_trainer

DIM = 8


def batches(n: int, size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, DIM, generator=g)
        out.append((x, torch.sin(x.sum(-1)) + 0.3 * torch.randn(size, generator=g)))
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(folder, steps: int, every: int, *, record: bool = False, stop_at: int | None = None, **kwargs):
    """SGD (lr 0.1, noisy targets) on the tiny regressor with post-hoc tracking; returns (sema, model, opt,
    weights after every step)."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(
        model,
        opt,
        decay=0.9,
        warmup="none",
        switch=False,
        posthoc_every_steps=every,
        posthoc_dir=str(folder),
        **kwargs,
    )
    trajectory = []
    for x, y in batches(steps)[: stop_at or steps]:
        model(x, labels=y)["loss"].backward()
        opt.step()
        opt.zero_grad()
        sema.step()
        if record:
            trajectory.append(params(model))
    return sema, model, opt, trajectory


def power_ema_float64(trajectory: list[dict[str, torch.Tensor]], sigma_rel: float) -> dict[str, torch.Tensor]:
    """The discrete power-function EMA of the recorded weights (theta_1 first), in float64, written from the
    recurrence alone."""
    g = sigma_rel_to_gamma(sigma_rel)
    avg = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in trajectory[0].items()}
    for t, theta in enumerate(trajectory, start=1):
        beta = (1.0 - 1.0 / t) ** (g + 1.0)
        for n in avg:
            avg[n] = beta * avg[n] + (1.0 - beta) * theta[n].double()
    return avg


def exponential_ema_float64(trajectory: list[dict[str, torch.Tensor]], horizon: float) -> dict[str, torch.Tensor]:
    """The exponential EMA of horizon H (decay 1 - 1/H) of the recorded weights, started at theta_1, float64."""
    m = 1.0 - 1.0 / horizon
    avg = {n: t.double().clone() for n, t in trajectory[0].items()}
    for theta in trajectory[1:]:
        for n in avg:
            avg[n] = m * avg[n] + (1.0 - m) * theta[n].double()
    return avg


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


# ---- the maths --------------------------------------------------------------------------------------------------------


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2_values():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.07, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    with pytest.raises(ValueError, match="sigma_rel = 0.3 is invalid"):
        sigma_rel_to_gamma(0.3)


def test_closed_form_inner_product_equals_numerical_integral():
    tau = np.linspace(0, 1000, 2_000_001)
    for (ta, ga), (tb, gb) in [((400, 6.9), (1000, 16.97)), ((1000, 3.0), (700, 6.9)), ((500, 2.0), (500, 9.0))]:
        pa = np.where(tau <= ta, (ga + 1) * tau**ga / ta ** (ga + 1), 0.0)
        pb = np.where(tau <= tb, (gb + 1) * tau**gb / tb ** (gb + 1), 0.0)
        numeric = np.trapezoid(pa * pb, tau)
        assert power_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-5)


def test_power_beta_starts_at_zero_so_the_first_value_is_the_weights_after_step_one():
    assert power_beta(1, 16.97) == 0.0
    assert power_beta(2, 1.0) == 0.25
    with pytest.raises(ValueError, match="count from 1"):
        power_beta(0, 1.0)


def test_posthoc_config_fields_are_validated_and_parse_from_the_command_line():
    from transformers import HfArgumentParser

    from sema_hf import SEMAConfig

    (config,) = HfArgumentParser(SEMAConfig).parse_args_into_dataclasses(
        ["--posthoc_every_steps", "50", "--posthoc_sigma_rels", "0.04", "0.2", "--posthoc_dtype", "bfloat16"]
    )
    assert (config.posthoc_every_steps, config.posthoc_sigma_rels, config.posthoc_dtype) == (
        50,
        (0.04, 0.2),
        "bfloat16",
    )
    assert SEMAConfig.from_dict(config.to_dict()) == config  # through JSON (a list) and back
    for field, value, allowed in [
        ("posthoc_every_steps", 0, "None \\(off\\) or an int >= 1"),
        ("posthoc_sigma_rels", (0.3,), "distinct numbers in \\(0, 0.2887\\)"),
        ("posthoc_sigma_rels", (0.05, 0.05), "distinct numbers"),
        ("posthoc_dtype", "float16", "one of \\('float32', 'bfloat16'\\)"),
    ]:
        with pytest.raises(ValueError, match=f"SEMAConfig.{field} = .* is invalid: expected .*{allowed}"):
            SEMAConfig(**{field: value})


# ---- tracking ---------------------------------------------------------------------------------------------------------


def test_profile_update_sequence_equals_hand_computed_one(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.5, warmup="none", posthoc_every_steps=100, posthoc_dir=str(tmp_path), switch=False)
    g = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    expected = [None, None]
    ema = params(model)
    for t, (x, y) in enumerate(batches(5), start=1):
        model(x, labels=y)["loss"].backward()
        opt.step()
        opt.zero_grad()
        sema.step()
        theta = params(model)
        for k in range(2):
            # written out: beta_1 = 0, beta_t = (1 - 1/t)^(gamma + 1)
            beta = 0.0 if t == 1 else ((t - 1) / t) ** (g[k] + 1)
            expected[k] = (
                {n: v.double() for n, v in theta.items()}
                if t == 1
                else {n: beta * expected[k][n] + (1 - beta) * theta[n].double() for n in theta}
            )
            got = sema.profiles.state_dict()[k]
            assert sema.profiles.t == t
            for n in theta:
                torch.testing.assert_close(got[n].double(), expected[k][n], rtol=1e-6, atol=1e-7)
            if t == 1:  # exactly the weights after step 1
                assert all(torch.equal(got[n], theta[n]) for n in theta)
        ema = {n: 0.5 * ema[n] + 0.5 * theta[n] for n in theta}  # the classic EMA is unchanged by the fused pass
    for n, v in sema.ema_state_dict().items():
        torch.testing.assert_close(v, ema[n], rtol=1e-6, atol=1e-7)


def test_fused_update_of_bf16_sources_casts_through_the_scratch_and_matches_fp32_arithmetic():
    from sema_hf.engines.base import Slot
    from sema_hf.profiles import PowerProfiles

    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(300, 7, generator=g).bfloat16(), torch.randn(5, generator=g).bfloat16()]
    slots = [Slot(f"s{i}", s) for i, s in enumerate(sources)]
    companion = {f"s{i}": torch.zeros(s.shape) for i, s in enumerate(sources)}
    profiles = PowerProfiles(slots, [3.0, 9.0], companion=companion, block_numel=256)  # several blocks
    assert len(profiles._blocks) > 2
    profiles.update(1, 0.25)
    for i, s in enumerate(sources):
        for k in range(2):
            assert torch.equal(profiles.averages[k][f"s{i}"], s.float())
        torch.testing.assert_close(companion[f"s{i}"], 0.25 * s.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_classic_ema_updated_in_the_fused_pass_is_bit_identical_to_the_stores_own_update(dtype):
    from sema_hf.engines.base import Slot
    from sema_hf.profiles import PowerProfiles
    from sema_hf.store import EMAStore

    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(3000, 7, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)]
    slots = [Slot(f"s{i}", s) for i, s in enumerate(sources)]
    alone, fused_store = EMAStore(slots), EMAStore(slots)
    fused = PowerProfiles(slots, [3.0, 9.0], companion=fused_store.state_dict(), block_numel=4096)
    for t in range(1, 12):
        for s in sources:
            s.add_(0.1 * torch.randn(s.shape, generator=g).to(dtype))
        alone.update(0.97)
        fused.update(t, 1 - 0.97)
    assert all(torch.equal(alone.state_dict()[n], fused_store.state_dict()[n]) for n in alone.names)


def test_snapshots_every_n_steps_and_at_finalize(tmp_path):
    sema, *_ = run(tmp_path, 11, every=4)
    assert sema.posthoc_steps == [4, 8]
    sema.finalize()
    assert sema.posthoc_steps == [4, 8, 11]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["steps"] == [4, 8, 11] and index["world_size"] == 1 and index["num_shards"] == 1
    assert [p["sigma_rel"] for p in index["profiles"]] == [0.05, 0.10]
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert files == [snapshot_file_name(s, 0, 1) for s in (4, 8, 11)]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # atomic writes leave no temporary file
    final = load_file(str(tmp_path / snapshot_file_name(11, 0, 1)))
    for k in range(2):
        for n, t in sema.profiles.state_dict()[k].items():
            assert torch.equal(final[f"posthoc{k}/{n}"], t)


# ---- reconstruction ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """200 optimizer steps, snapshots every 5 (40 per profile), the weights recorded after every step."""
    folder = tmp_path_factory.mktemp("posthoc")
    sema, model, _, trajectory = run(folder, 200, every=5, record=True)
    sema.finalize()
    return {"dir": folder, "sema": sema, "trajectory": trajectory}


def test_reconstruction_between_tracked_profiles_matches_float64_power_ema(long_run):
    trajectory = long_run["trajectory"]
    reference = power_ema_float64(trajectory, 0.07)
    got = reconstruct(str(long_run["dir"]), sigma_rel=0.07)
    assert got.report.relative_error < 1e-3 and not got.report.exact
    error = max_diff(got, reference)
    tracked = [max_diff(power_ema_float64(trajectory, s), reference) for s in (0.05, 0.10)]
    # the tracked profiles are 5e-3..1e-2 away from the target; the reconstruction far closer than either
    assert error < 0.05 * min(tracked), (error, tracked)
    assert error < 1e-4


def test_tracked_profile_reconstructs_itself_to_float_rounding(long_run):
    sema = long_run["sema"]
    for k, s in enumerate((0.05, 0.10)):
        got = reconstruct(str(long_run["dir"]), sigma_rel=s)
        assert got.report.exact and got.report.relative_error == 0.0
        for n, t in sema.profiles.state_dict()[k].items():
            assert torch.equal(got[n], t)
        # and the least squares alone (no shortcut) finds the same snapshot: float rounding of the weights
        snaps = [(t, sigma_rel_to_gamma(r)) for t in sema.posthoc_steps for r in (0.05, 0.10)]
        report = solve(snaps, Target(200, sigma_rel=s * (1 + 1e-12)))
        x = np.array(report.weights)
        assert abs(x[-2 + k] - 1.0) < 1e-6 and np.abs(np.delete(x, len(x) - 2 + k)).max() < 1e-6


def test_exponential_target_is_fitted_and_matches_float64_exponential_ema(long_run):
    trajectory = long_run["trajectory"]
    horizon = 15.0  # H / T = 0.075: between the tracked widths
    got = reconstruct(str(long_run["dir"]), horizon_steps=horizon)
    assert got.report.relative_error < 0.01
    reference = exponential_ema_float64(trajectory, horizon)
    error = max_diff(got, reference)
    tracked = [max_diff(power_ema_float64(trajectory, s), reference) for s in (0.05, 0.10)]
    # the exponential density is matched to the discrete EMA step by step (Target.continuous_horizon)
    assert error < 0.01 * min(tracked), (error, tracked)


def test_reconstruction_at_an_earlier_step_uses_only_snapshots_up_to_it(long_run):
    trajectory = long_run["trajectory"]
    got = reconstruct(str(long_run["dir"]), sigma_rel=0.07, step=100)
    assert max(s for s, _ in got.report.snapshots) == 100
    assert max_diff(got, power_ema_float64(trajectory[:100], 0.07)) < 1e-4


def test_in_run_average_equals_the_one_process_reconstruction(long_run):
    sema = long_run["sema"]
    tensors, report = sema.posthoc_average(sigma_rel=0.07)
    assert sorted(tensors) == sorted(sema.store.names)
    full = reconstruct(str(long_run["dir"]), sigma_rel=0.07)
    assert report.weights == full.report.weights
    assert max_diff(tensors, dict(full)) == 0.0


# ---- bad input --------------------------------------------------------------------------------------------------------


def test_target_outside_the_reachable_range_is_refused_naming_the_range(long_run):
    with pytest.raises(ValueError, match=r"outside the range the snapshots reach.*Reachable at step 200.*sigma_rel"):
        reconstruct(str(long_run["dir"]), sigma_rel=0.005)
    with pytest.raises(ValueError, match="exactly one of sigma_rel, horizon_steps, horizon_epochs"):
        reconstruct(str(long_run["dir"]), sigma_rel=0.07, horizon_steps=10)
    with pytest.raises(ValueError, match="horizon_epochs needs the run's optimizer steps per epoch"):
        reconstruct(str(long_run["dir"]), horizon_epochs=0.5)


def test_fewer_snapshots_than_the_fit_needs_is_an_error(tmp_path):
    sema, *_ = run(tmp_path, 6, every=100)
    sema.finalize()  # only the final snapshot
    with pytest.raises(ValueError, match="needs snapshots at 2 or more steps"):
        reconstruct(str(tmp_path), sigma_rel=0.07)
    assert reconstruct(str(tmp_path), sigma_rel=0.05).report.exact  # a tracked profile needs no fit


def test_snapshots_of_two_runs_in_one_folder_are_refused(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    run(first, 8, every=4)
    sema, *_ = run(second, 12, every=4)
    shutil.copy(first / snapshot_file_name(4, 0, 1), second / snapshot_file_name(4, 0, 1))
    with pytest.raises(ValueError, match="mixes the snapshots of two runs"):
        reconstruct(str(second), sigma_rel=0.07)
    # and a new run refuses to write into a folder holding another run's snapshots
    with pytest.raises(ValueError, match="already holds the post-hoc snapshots of another run"):
        run(first, 8, every=4)


def test_missing_or_truncated_snapshot_files_are_refused(tmp_path):
    sema, *_ = run(tmp_path, 12, every=4)
    path = tmp_path / snapshot_file_name(8, 0, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read"):
        reconstruct(str(tmp_path), sigma_rel=0.07)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="snapshot at step 8 .* is incomplete"):
        reconstruct(str(tmp_path), sigma_rel=0.07)
    with pytest.raises(FileNotFoundError, match="No post-hoc EMA snapshots"):
        reconstruct(str(tmp_path / "nowhere"), sigma_rel=0.07)


def test_posthoc_every_steps_without_a_folder_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs a folder for the snapshots"):
        SEMA(model, decay=0.9, warmup="none", posthoc_every_steps=5)


# ---- resume -----------------------------------------------------------------------------------------------------------


def test_resumed_loop_continues_the_series_and_replaces_the_killed_runs_later_snapshots(tmp_path):
    whole, _, _, _ = run(tmp_path / "whole", 20, every=3)
    whole.finalize()

    folder = tmp_path / "resumed"
    killed, model, opt, _ = run(folder, 20, every=3, stop_at=10)
    killed.save(str(tmp_path / "ckpt10"))
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for x, y in batches(20)[10:14]:  # the killed run goes on to step 14 (a snapshot at 12), then dies
        model(x, labels=y)["loss"].backward()
        opt.step()
        opt.zero_grad()
        killed.step()
    assert killed.posthoc_steps == [3, 6, 9, 12]

    model = tiny_model()
    model.load_state_dict(weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sema = SEMA(model, opt, decay=0.9, warmup="none", switch=False, posthoc_every_steps=3, posthoc_dir=str(folder))
    sema.load(str(tmp_path / "ckpt10"))
    assert sema.posthoc_steps == [3, 6, 9] and sema.profiles.t == 10
    assert not (folder / snapshot_file_name(12, 0, 1)).exists()  # removed: step 12 is written again
    assert json.loads((folder / INDEX_NAME).read_text())["steps"] == [3, 6, 9]
    for x, y in batches(20)[10:]:
        model(x, labels=y)["loss"].backward()
        opt.step()
        opt.zero_grad()
        sema.step()
    sema.finalize()
    assert sema.posthoc_steps == whole.posthoc_steps == [3, 6, 9, 12, 15, 18, 20]
    for step in whole.posthoc_steps:
        a = load_file(str(tmp_path / "whole" / snapshot_file_name(step, 0, 1)))
        b = load_file(str(folder / snapshot_file_name(step, 0, 1)))
        assert all(torch.equal(a[n], b[n]) for n in a), step
    assert (
        max_diff(reconstruct(str(folder), sigma_rel=0.07), reconstruct(str(tmp_path / "whole"), sigma_rel=0.07)) == 0
    )


def _accelerated(folder):
    """A fresh accelerator (as a new process would make), model, SGD and SEMA with post-hoc tracking."""
    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    sema = SEMA(
        model, opt, accelerator, decay=0.9, warmup="none", switch=False, posthoc_every_steps=3, posthoc_dir=str(folder)
    )
    return accelerator, model, opt, sema


def _steps(accelerator, model, opt, sema, data) -> None:
    for x, y in data:
        accelerator.backward(model(x, labels=y)["loss"])
        opt.step()
        opt.zero_grad()
        sema.step()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_loop_killed_after_save_state_and_resumed_with_load_state_ends_with_the_uninterrupted_series(tmp_path):
    data = batches(20)
    accelerator, model, opt, whole = _accelerated(tmp_path / "whole")
    _steps(accelerator, model, opt, whole, data)
    whole.finalize()
    whole.remove_hooks()

    folder = tmp_path / "resumed"
    accelerator, model, opt, killed = _accelerated(folder)
    _steps(accelerator, model, opt, killed, data[:10])
    accelerator.save_state(str(tmp_path / "ckpt10"))
    _steps(accelerator, model, opt, killed, data[10:13])
    killed.posthoc_snapshot()  # a snapshot at step 13, which the resumed run never writes again
    assert killed.posthoc_steps == [3, 6, 9, 12, 13]
    killed.remove_hooks()

    accelerator, model, opt, sema = _accelerated(folder)
    accelerator.load_state(str(tmp_path / "ckpt10"))
    assert sema.posthoc_steps == [3, 6, 9] and sema.profiles.t == 10 and sema.global_step == 10
    assert sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == [
        snapshot_file_name(s, 0, 1) for s in (3, 6, 9)
    ]
    _steps(accelerator, model, opt, sema, data[10:])
    sema.finalize()
    sema.remove_hooks()
    assert sema.posthoc_steps == whole.posthoc_steps == [3, 6, 9, 12, 15, 18, 20]
    assert json.loads((folder / INDEX_NAME).read_text())["steps"] == [3, 6, 9, 12, 15, 18, 20]
    for step in whole.posthoc_steps:
        a = load_file(str(tmp_path / "whole" / snapshot_file_name(step, 0, 1)))
        b = load_file(str(folder / snapshot_file_name(step, 0, 1)))
        assert all(torch.equal(a[n], b[n]) for n in a), step
    got, expected = (reconstruct(str(d), horizon_steps=2.0) for d in (folder, tmp_path / "whole"))
    assert max_diff(got, expected) == 0.0


# ---- bf16 snapshots and the command line ------------------------------------------------------------------------------


def test_bfloat16_snapshots_store_bf16_and_reconstruct_within_bf16_rounding(tmp_path):
    fp32, *_ = run(tmp_path / "fp32", 40, every=4)
    bf16, *_ = run(tmp_path / "bf16", 40, every=4, posthoc_dtype="bfloat16")
    name = snapshot_file_name(40, 0, 1)
    fp32.finalize()
    bf16.finalize()
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / name)).values()} == {torch.bfloat16}
    assert {t.dtype for t in bf16.profiles.state_dict()[0].values()} == {torch.float32}  # tracked in fp32
    a = reconstruct(str(tmp_path / "fp32"), sigma_rel=0.07)
    b = reconstruct(str(tmp_path / "bf16"), sigma_rel=0.07)
    scale = max(v.abs().max().item() for v in a.values())
    assert 0 < max_diff(a, b) < 2**-8 * scale * b.report.amplification


# ---- the Trainer: snapshots under output_dir, resume, the command line -----------------------------------------------


def _trainer_settings():
    # 32 samples, batch 8: 4 steps per epoch, 3 epochs; checkpoints every 4 steps; switches at epoch ends
    return dict(num_train_epochs=3, save_strategy="steps", save_steps=4, eval_strategy="no")


def test_trainer_run_resumed_after_a_crash_continues_the_series_and_ends_equal(tmp_path):
    kwargs = dict(decay=0.8, warmup="none", posthoc_every_steps=3)
    full = SEMACallback(**kwargs)
    tiny_trainer(str(tmp_path / "full"), [full], **_trainer_settings()).train()
    assert full.core.posthoc_steps == [3, 6, 9, 12]

    crashed = SEMACallback(**kwargs)
    tiny_trainer(str(tmp_path / "split"), [crashed, StopAt(7)], **_trainer_settings()).train()
    # the cut-short run wrote snapshots at 6 and (train end) 7, after its last checkpoint (step 4)
    assert crashed.core.posthoc_steps == [3, 6, 7]
    resumed = SEMACallback(**kwargs)
    tiny_trainer(str(tmp_path / "split"), [resumed], **_trainer_settings()).train(
        resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-4")
    )
    assert resumed.core.posthoc_steps == [3, 6, 9, 12]
    folder, whole = tmp_path / "split" / "sema_posthoc", tmp_path / "full" / "sema_posthoc"
    assert sorted(os.listdir(folder)) == sorted(os.listdir(whole))  # step 7's snapshot is gone
    for step in (3, 6, 9, 12):
        a = load_file(str(whole / snapshot_file_name(step, 0, 1)))
        b = load_file(str(folder / snapshot_file_name(step, 0, 1)))
        assert all(torch.equal(a[n], b[n]) for n in a), step
    got, expected = (
        reconstruct(str(tmp_path / "split"), horizon_epochs=0.5),
        reconstruct(str(tmp_path / "full"), horizon_epochs=0.5),
    )
    assert got.report.target.horizon_steps == 2.0  # the Trainer's 4 optimizer steps per epoch were recorded
    assert max_diff(got, expected) == 0.0


def test_command_line_writes_the_saved_model_with_the_reconstructed_weights(tmp_path):
    out = tmp_path / "run"
    trainer = tiny_trainer(
        str(out), [SEMACallback(decay=0.8, warmup="none", posthoc_every_steps=2)], num_train_epochs=4
    )
    trainer.train()
    trainer.save_model()
    (out / "notes.txt").write_text("kept")  # stands for config / tokenizer files: copied as they are
    save = tmp_path / "chosen"
    proc = subprocess.run(
        [sys.executable, "-m", "sema_hf.posthoc", str(out), "--sigma_rel", "0.07", "--save", str(save)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relative L2 error" in proc.stdout
    expected = reconstruct(str(out), sigma_rel=0.07)
    model = tiny_model(seed=5)
    model.load_state_dict(load_file(str(save / "model.safetensors")))
    assert max_diff(params(model), dict(expected)) == 0.0
    assert (save / "notes.txt").read_text() == "kept"
    fit = json.loads((save / "posthoc_fit.json").read_text())
    assert fit["target"]["sigma_rel"] == 0.07 and fit["relative_error"] == expected.report.relative_error
