"""A real 2-process DDP Trainer run (gloo, CPU) against the single-process run on the same global batches."""

import pytest
import torch
from safetensors.torch import load_file

from sema_hf import SEMACallback

from launch import run_torchrun
from tiny import tiny_trainer


@pytest.mark.multiprocess
def test_ddp_ranks_hold_identical_ema_equal_to_single_process_run(tmp_path):
    run_torchrun("tests/dist/ddp_worker.py", str(tmp_path))
    single = SEMACallback(decay=0.8, warmup_steps=3)
    trainer = tiny_trainer(str(tmp_path / "single"), [single], per_device_train_batch_size=8)
    trainer.train()
    reference = single.ema_state_dict()
    ema = [load_file(str(tmp_path / f"ema_rank{r}.safetensors")) for r in range(2)]
    weights = [load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in range(2)]
    counts = [(tmp_path / f"numel_rank{r}.txt").read_text().split() for r in range(2)]
    full = str(sum(p.numel() for p in trainer.model.parameters()))
    assert counts[0] == counts[1] == [full, "8", "2"]  # every rank holds the full average under DDP
    for name, value in reference.items():
        assert torch.equal(ema[0][name], ema[1][name])
        assert torch.equal(weights[0][name], weights[1][name])
        torch.testing.assert_close(ema[0][name], value, rtol=1e-5, atol=1e-6)
