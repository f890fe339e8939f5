"""What every engine adapter tells the store: which tensors to average and which to write back.

An adapter turns the objects the Trainer hands to callbacks (``model``, ``optimizer``) into `Slot`s: for each tensor
this rank's optimizer updates (the *source*, e.g. a parameter, a DTensor's local shard, a ZeRO fp32 master partition)
and, where the forward reads a separate copy (a bf16 shard, a 16-bit flat group), that *compute* copy. The store
averages sources and writes its averages into both on a switch. Adapters never import the callback; the store
never imports an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Slot:
    """One averaged tensor of this rank.

    Attributes:
        name: stable key of the average in checkpoints (a parameter name, or a flat-group name for flat engines).
        source: the tensor the optimizer updates; the fp32 average follows it.
        compute: a different tensor the next forward reads (e.g. the bf16 copy of an fp32 master shard), written on
            a switch and during evaluation swaps; None when the forward reads ``source`` itself.
    """

    name: str
    source: torch.Tensor
    compute: torch.Tensor | None = None

    @property
    def forward_tensor(self) -> torch.Tensor:
        """The tensor the forward pass reads."""
        return self.source if self.compute is None else self.compute


@dataclass
class Layout:
    """How this rank's averages map onto the model; hashed into the checkpoint fingerprint.

    ``slots`` lists ``(name, shape)`` of this rank's averages in order; ``params`` lists the full model tensors
    ``(state_dict name, shape)`` the averages cover (identical on every rank); ``extra`` holds engine specifics
    (shard offsets...) that decide whether a checkpoint can be loaded as is.
    """

    engine: str
    world_size: int
    rank: int
    sharded: bool
    slots: list[tuple[str, list[int]]]
    params: list[tuple[str, list[int]]]
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EngineAdapter(Protocol):
    """The interface of `sema_hf.engines.local.LocalAdapter` and the sharded adapters."""

    name: str

    def slots(self) -> list[Slot]:
        """This rank's averaged tensors, in a fixed order."""

    def after_write(self) -> None:
        """Make what the next forward reads consistent after the store wrote into slots (may run one collective)."""

    def layout(self) -> Layout:
        """Names, shapes and shard placement of this rank's averages."""

    def full_state_dict(self, averages: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full averaged tensors keyed like ``model.state_dict()``, gathered tensor by tensor when sharded."""
