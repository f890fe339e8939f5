"""One process and DDP: every rank's optimizer updates the full parameters, so the average covers them all.

Under DDP every rank holds the same weights after each step (gradients are all-reduced), so every rank keeps the
same full average and updates it with no communication.

Buffers are another matter (``include_buffers=True``): each rank's forward updates its BatchNorm statistics with its
own batch, so after a step the ranks' buffers differ (DDP broadcasts rank 0's at the start of the next forward).
Averaging its own would give every rank another average, and after a switch every rank would evaluate with other
statistics while only rank 0's were saved. So under several processes the buffers averaged are rank 0's: before
each update one broadcast (of the buffers only, a few KB for BatchNorm) fills a scratch copy that every rank averages,
and a switch writes the same average into every rank's buffers.
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
    """Adapter for one process and DDP: the slots are the parameters themselves, keyed by their names.

    Args:
        model: the model, or its DDP / compile wrapper.
        include_buffers: also average floating buffers (BatchNorm statistics).
        buffers_from_rank0: under several processes, average rank 0's buffers on every rank (see the module
            docstring); the store must then call `before_read` before it reads the sources.
    """

    name = "local"

    def __init__(self, model: nn.Module, include_buffers: bool = False, *, buffers_from_rank0: bool = False) -> None:
        self.model = unwrap_model(model)
        self.include_buffers = include_buffers
        self._named = averaged_named_tensors(self.model, include_buffers)
        if not self._named:
            raise ValueError("SEMA found no trainable parameter (requires_grad=True) to average in this model.")
        self._placements = placements(self.model, self._named)
        # Under several processes: rank 0's buffers, copied into one scratch buffer per (device, dtype) and
        # broadcast before every read (see the module docstring). name -> (buffer, its view of the scratch).
        self._shared_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = []
        # Only for a store that calls `before_read` (``EMAStore(before_read=adapter.before_read)``): otherwise the
        # scratch copies would never be filled.
        if include_buffers and buffers_from_rank0 and _world()[0] > 1:
            buffer_ids = {id(b) for _, b in canonical_named_buffers(self.model)}
            groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = {}
            for name, t in self._named:
                if id(t) in buffer_ids:
                    groups.setdefault((t.device, t.dtype), []).append((name, t))
            for (device, dtype), members in groups.items():
                flat = torch.empty(sum(t.numel() for _, t in members), dtype=dtype, device=device)
                views, offset = [], 0
                for name, t in members:
                    views.append(flat[offset : offset + t.numel()].view(t.shape))
                    self._shared_buffers[name] = (t, views[-1])
                    offset += t.numel()
                self._scratch.append((flat, [t for _, t in members], views))

    def slots(self) -> list[Slot]:
        slots = []
        for name, tensor in self._named:
            if name in self._shared_buffers:
                buffer, scratch = self._shared_buffers[name]
                slots.append(Slot(name, scratch, compute=buffer))  # average rank 0's, write every rank's
            else:
                slots.append(Slot(name, tensor.data))
        return slots

    @torch.no_grad()
    def before_read(self) -> None:
        """Fill the scratch copies with rank 0's buffers (one broadcast per device and dtype; nothing without
        buffers or in one process)."""
        for flat, buffers, views in self._scratch:
            torch._foreach_copy_(views, buffers)
            torch.distributed.broadcast(flat, src=0)

    def after_write(self) -> None:
        """Nothing to refresh: the forward reads the parameters the store wrote."""

    def moved_tensors(self) -> list[str]:
        """The averaged tensors the model no longer holds where the slots point (`moved_tensors`)."""
        return moved_tensors(self._placements)

    def layout(self) -> Layout:
        world_size, rank = _world()
        shapes = [(name, list(t.shape)) for name, t in self._named]
        return Layout(self.name, world_size, rank, sharded=False, slots=shapes, params=shapes)

    def full_state_dict(self, averages: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: averages[name].detach().clone() for name, _ in self._named}


Placement = tuple[dict, str, torch.Tensor, int, tuple[str, torch.dtype, torch.device]]


def placements(model: nn.Module, named: list[tuple[str, torch.Tensor]]) -> list[Placement]:
    """``(owner dict, key, tensor, data pointer, (name, dtype, device))`` for every place the model holds an
    averaged tensor (a tied weight in each module that holds it), as `moved_tensors` checks them."""
    names = {id(t): name for name, t in named}
    out = []
    for module in model.modules():
        for owner in (module._parameters, module._buffers):
            for key, t in owner.items():
                if t is not None and id(t) in names:
                    out.append((owner, key, t, t.data_ptr(), (names[id(t)], t.dtype, t.device)))
    return out


def moved_tensors(recorded: list[Placement]) -> list[str]:
    """The averaged tensors the model no longer holds as recorded by `placements`: ``Module._apply``
    (``.to(device)``, ``.half()``, ``.double()``...) gives a parameter new storage (``param.data = ...``, or a new
    Parameter, or ``swap_tensors``) and a buffer a new tensor, while the store keeps aliases of the old ones. Empty
    when all are in place.

    Only Python-side metadata is read (dict lookups and ``data_ptr()``: no kernel, no host sync); the cost per step
    is printed by ``bench/step_checks.py``. It stops at the first mismatch, then lists all."""
    for owner, key, tensor, ptr, _ in recorded:
        if owner.get(key) is not tensor or tensor.data_ptr() != ptr:
            break
    else:
        return []
    moved = []
    for owner, key, tensor, ptr, (name, dtype, device) in recorded:
        now = owner.get(key)
        if now is not tensor or tensor.data_ptr() != ptr:
            where = "removed" if now is None else f"now {now.dtype} on {now.device}"
            moved.append(f"{name}: {dtype} on {device} when SEMA was made, {where}")
    return list(dict.fromkeys(moved))


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
