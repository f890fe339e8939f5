"""Resume rules that hold on one process: a checkpoint saved at an epoch's last step (``save_steps``) is written
before that epoch's end, which the resumed Trainer never fires; its switch point must still run."""

import torch

from sema_hf import SEMACallback
from sema_hf.schedule import epoch_end_skipped_by_resume

from tiny import tiny_trainer

AT_EPOCH_END = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=4)  # 4 steps per epoch


def test_epoch_end_is_pending_only_at_a_full_epoch_with_steps_since_the_last_decision():
    assert epoch_end_skipped_by_resume(1.0, 4)
    assert not epoch_end_skipped_by_resume(1.0, 0)  # the epoch end ran (and decided) before the save
    assert not epoch_end_skipped_by_resume(1.5, 2)  # mid-epoch: the resumed run reaches that epoch end itself
    assert not epoch_end_skipped_by_resume(None, 3)


def test_resume_from_a_checkpoint_saved_at_an_epochs_last_step_runs_that_epochs_switch(tmp_path):
    full = SEMACallback(decay=0.8, warmup_steps=3)
    full_trainer = tiny_trainer(str(tmp_path / "full"), [full], **AT_EPOCH_END)
    full_trainer.train()
    resumed = SEMACallback(decay=0.8, warmup_steps=3)
    resumed_trainer = tiny_trainer(str(tmp_path / "resumed"), [resumed], **AT_EPOCH_END)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.num_switches == full.num_switches == 2
    full_ema, resumed_ema = full.ema_state_dict(), resumed.ema_state_dict()
    for name, value in full_trainer.model.named_parameters():
        assert torch.equal(dict(resumed_trainer.model.named_parameters())[name], value)
        assert torch.equal(resumed_ema[name], full_ema[name])
