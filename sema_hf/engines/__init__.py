"""Engine adapters: which tensors a rank's optimizer updates and what a switch must write, one small file each.

`detect_engine` picks the adapter from the objects the Trainer hands to callbacks.
"""

from __future__ import annotations

from torch import nn

from .base import EngineAdapter, Layout, Slot
from .local import LocalAdapter, unwrap_model

__all__ = ["EngineAdapter", "Layout", "LocalAdapter", "Slot", "detect_engine", "unwrap_model"]


def detect_engine(model: nn.Module, optimizer: object | None = None, include_buffers: bool = False) -> EngineAdapter:
    """The adapter for this ``model`` / ``optimizer`` pair (accelerate's optimizer wrapper or the inner one).

    Raises ``NotImplementedError`` naming the setup when it is one SEMA cannot average correctly.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if _is_deepspeed_zero(inner):
        raise NotImplementedError(
            f"SEMA: DeepSpeed ZeRO optimizer {type(inner).__name__} is not supported by this build of sema_hf."
        )
    if _has_fsdp(model):
        raise NotImplementedError("SEMA: FSDP-sharded models are not supported by this build of sema_hf.")
    return LocalAdapter(model, include_buffers=include_buffers)


def _is_deepspeed_zero(optimizer: object | None) -> bool:
    return optimizer is not None and type(optimizer).__module__.startswith("deepspeed.")


def _has_fsdp(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel" or type(module).__name__.startswith("FSDP"):
            return True
    return any(isinstance(p, DTensor) for p in model.parameters())
