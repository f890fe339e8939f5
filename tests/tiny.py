"""Tiny models, data and Trainer settings shared by the callback tests and the multi-process workers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (the Accelerator's and gradient accumulation's), as a fresh process
    would start: each in-process loop run builds its own Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class TinyRegressor(nn.Module):
    """Two linear layers (and optionally a BatchNorm, for buffer averaging); returns ``{"loss", "logits"}``."""

    def __init__(self, dim: int = 8, hidden: int = 16, batch_norm: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        out = self.fc2(torch.tanh(self.norm(self.fc1(x)))).squeeze(-1)
        return {"loss": None if labels is None else F.mse_loss(out, labels), "logits": out}


def tiny_model(seed: int = 0, **kwargs) -> TinyRegressor:
    torch.manual_seed(seed)
    return TinyRegressor(**kwargs)


def tiny_dataset(n: int = 32, dim: int = 8, seed: int = 1) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g)
    return Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()})


def tiny_args(output_dir: str, **overrides) -> TrainingArguments:
    """CPU, sequential data, no reporting: the same optimizer trajectory on every run with the same settings."""
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def tiny_trainer(output_dir: str, callbacks: list, model: nn.Module | None = None, **overrides) -> Trainer:
    data = tiny_dataset()
    return Trainer(
        model=model if model is not None else tiny_model(),
        args=tiny_args(output_dir, **overrides),
        train_dataset=data,
        eval_dataset=data,
        callbacks=callbacks,
    )


class StopAt(TrainerCallback):
    """Stops training once ``global_step`` reaches ``step`` (a run cut short, as a crash would)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class Pull(nn.Module):
    """loss = |w - x|^2: training pulls w towards the training points; the eval set sits at 0."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), start))

    def forward(self, x, labels=None):
        loss = ((self.w - x) ** 2).sum(-1).mean()
        return {"loss": loss, "logits": self.w.expand_as(x)}
