"""One process and DDP: every rank's optimizer updates the full parameters, so the average covers them all.

Under DDP every rank holds the same weights after each step (gradients are all-reduced), so every rank keeps the
same full average and updates it with no communication.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .base import Layout, Slot
from .names import canonical_named_buffers, canonical_named_parameters, unwrap_model


def averaged_named_tensors(model: nn.Module, include_buffers: bool) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters (``requires_grad``; PEFT adapters only, under PEFT) and, if asked, floating buffers.

    Each tensor appears once under its first name, as in ``named_parameters()``: tied weights (GPT-2's embedding
    and output layer) are one tensor, averaged once per step. Names are the unwrapped model's (`sema_hf.engines.names`:
    no ``module.``, ``_orig_mod.`` or ``_checkpoint_wrapped_module.``), so that checkpoints do not depend on wrappers.
    """
    named = [(n, p) for n, p in canonical_named_parameters(model) if p.requires_grad]
    if include_buffers:
        named += [(n, b) for n, b in canonical_named_buffers(model) if b.is_floating_point()]
    return named


class LocalAdapter:
    """Adapter for one process and DDP: the slots are the parameters themselves, keyed by their names."""

    name = "local"

    def __init__(self, model: nn.Module, include_buffers: bool = False) -> None:
        self.model = unwrap_model(model)
        self.include_buffers = include_buffers
        self._named = averaged_named_tensors(self.model, include_buffers)
        if not self._named:
            raise ValueError("SEMA found no trainable parameter (requires_grad=True) to average in this model.")

    def slots(self) -> list[Slot]:
        return [Slot(name, tensor.data) for name, tensor in self._named]

    def after_write(self) -> None:
        """Nothing to refresh: the forward reads the parameters the store wrote."""

    def layout(self) -> Layout:
        world_size, rank = _world()
        shapes = [(name, list(t.shape)) for name, t in self._named]
        return Layout(self.name, world_size, rank, sharded=False, slots=shapes, params=shapes)

    def full_state_dict(self, averages: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: averages[name].detach().clone() for name, _ in self._named}


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
