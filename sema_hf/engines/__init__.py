"""Engine adapters: which tensors a rank's optimizer updates and what a switch must write, one small file each.

`detect_engine` picks the adapter from the objects the Trainer hands to callbacks:

==========================  ========================  =================================================
engine                      adapter                   what a rank averages
==========================  ========================  =================================================
one process, DDP            `LocalAdapter`            the full parameters
DDP, ``shard_under_ddp``    `DDPShardedAdapter`       a contiguous 1/W of the flattened trainable elements
FSDP2 (``fully_shard``)     `FSDP2Adapter`            its ``Shard(0)`` block of each DTensor parameter
FSDP1                       `FSDP1Adapter`            its pieces of each unit's local flat shard
DeepSpeed ZeRO-1/2          `ZeroPartitionAdapter`    its fp32 partition of each flat parameter group
DeepSpeed ZeRO-3            `Zero3Adapter`            its fp32 block of each parameter
==========================  ========================  =================================================
"""

from __future__ import annotations

from torch import nn

from .base import EngineAdapter, Layout, Slot
from .local import LocalAdapter, unwrap_model

__all__ = ["EngineAdapter", "Layout", "LocalAdapter", "Slot", "detect_engine", "unwrap_model"]


def detect_engine(
    model: nn.Module,
    optimizer: object | None = None,
    include_buffers: bool = False,
    *,
    shard_under_ddp: bool = False,
    buffers_from_rank0: bool = False,
) -> EngineAdapter:
    """The adapter for this ``model`` / ``optimizer`` pair (accelerate's optimizer wrapper or the inner one).

    ``model`` is what the Trainer passes to callbacks: the FSDP-wrapped model under FSDP, the user's model under
    DeepSpeed and DDP. With ``shard_under_ddp`` and replicated parameters over more than one rank (DDP, ZeRO-0),
    the ranks share one average (`DDPShardedAdapter`); in one process, or under an engine that shards already, the
    flag changes nothing. ``buffers_from_rank0``: see `LocalAdapter` (for a store that calls ``before_read``).
    Raises ``NotImplementedError`` naming the setup when it is one SEMA cannot average correctly.
    """
    sharded = None
    zero = next((o for o in _optimizer_chain(optimizer) if type(o).__module__.startswith("deepspeed.")), None)
    if zero is not None:
        from .deepspeed import deepspeed_adapter

        sharded = deepspeed_adapter(model, zero)
    elif _has_dtensor_params(model) or _has_fsdp1(model):
        from .fsdp import FSDP1Adapter, FSDP2Adapter, is_fsdp1, is_fsdp2

        if is_fsdp1(model):
            sharded = FSDP1Adapter(model)
        elif is_fsdp2(model):
            sharded = FSDP2Adapter(model)
        else:
            raise NotImplementedError(
                "SEMA: the model has DTensor parameters but is not sharded by FSDP (tensor parallelism?); "
                "only FSDP1, FSDP2 and DeepSpeed ZeRO sharding are supported."
            )
    if sharded is None and any(hasattr(p, "ds_tensor") for p in model.parameters()):
        raise NotImplementedError(
            "SEMA: the model's parameters are partitioned by DeepSpeed ZeRO-3, but no ZeRO-3 optimizer was given; "
            "pass the optimizer returned by deepspeed.initialize (the Trainer passes it to callbacks)."
        )
    if sharded is None and shard_under_ddp and _world_size() > 1:
        from .ddp_sharded import DDPShardedAdapter

        if include_buffers:
            raise NotImplementedError(
                "SEMA: include_buffers=True is not supported with shard_under_ddp=True: each DDP rank's buffers "
                "(BatchNorm statistics) follow its own batches, so a shared average would mix ranks; use "
                "shard_under_ddp=False or include_buffers=False."
            )
        sharded = DDPShardedAdapter(model)
    if sharded is not None:
        if include_buffers:
            raise NotImplementedError(
                f"SEMA: include_buffers=True is not supported under {sharded.name}: buffers are not sharded and each "
                "rank's copy may differ; average parameters only (include_buffers=False)."
            )
        return sharded
    return LocalAdapter(model, include_buffers=include_buffers, buffers_from_rank0=buffers_from_rank0)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _optimizer_chain(optimizer: object | None, depth: int = 4) -> list[object]:
    """``optimizer`` and the optimizers it wraps (accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's)."""
    chain = []
    while optimizer is not None and len(chain) < depth:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _has_dtensor_params(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _has_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
