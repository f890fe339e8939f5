"""DeepSpeed ZeRO: each rank averages the partition of the fp32 master weights its ZeRO optimizer updates.

ZeRO-1/2 (``DeepSpeedZeroOptimizer``; ``BF16_Optimizer`` for ZeRO-1 in bf16): every parameter group is one flat
compute-dtype buffer (``bit16_groups_flat[g]``, the model's parameters are views of it) cut into ``world_size``
equal partitions; rank r's optimizer updates an fp32 copy of partition r (``single_partition_of_fp32_groups[g]``),
writes it into partition r of the flat buffer and all-gathers the flat buffer. SEMA averages the fp32 partition,
and a switch writes the fp32 partition and this rank's compute partition, then makes that same all-gather: the
one collective of a ZeRO-1/2 switch.

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): each parameter is cut into ``world_size`` blocks of
``ceil(numel / world_size)`` (``param.ds_tensor`` is this rank's block, padded on the last ranks); the blocks of a
sub-group lie end to end in ``fp16_partitioned_groups_flat[i]`` (compute dtype) and the optimizer updates their
fp32 copy ``fp32_partitioned_groups_flat[i]`` (the same tensor in fp32 training). SEMA averages the fp32 blocks,
and a switch writes them and the compute blocks, then releases any gathered parameter, so that the next forward
gathers from the compute blocks. Parameters kept gathered between steps (``stage3_param_persistence_threshold``)
are re-gathered as the optimizer does after its step, so a model with persistent parameters makes that
collective on a switch; with the threshold at 0 there is none.

Parameters are named as in the user's model (``model.named_parameters()`` with the DeepSpeed engine, ``torch.compile``
and activation-checkpoint wrappers taken out; see `sema_hf.engines.names`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .names import canonical_named_parameters
from .shards import FlatEntry, Piece, ShardedAdapter, _distinct, block_range, partition_ranges, storage_offset_in


def _names_by_id(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in canonical_named_parameters(model)}


def _ordered_params(model: nn.Module, averaged: Sequence[nn.Parameter], shape_of) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, full shape)`` of the averaged parameters, in the model's own order (not the optimizer's groups)."""
    ids = {id(p) for p in averaged}
    return [(n, tuple(shape_of(p))) for n, p in canonical_named_parameters(model) if id(p) in ids]


def _single_group(groups: Sequence[object], what: str) -> object:
    first = groups[0]
    if any(g is not first for g in groups[1:]):
        raise NotImplementedError(
            f"SEMA: the {what} parameter groups are partitioned over different process groups (MoE expert data "
            "parallelism); only one data-parallel group is supported."
        )
    return first


def _name(names: dict[int, str], param: nn.Parameter) -> str:
    try:
        return names[id(param)]
    except KeyError:
        raise ValueError(
            "SEMA: the DeepSpeed optimizer updates a parameter that is not in the model passed to the callback"
        ) from None


class ZeroPartitionAdapter(ShardedAdapter):
    """DeepSpeed ZeRO-1/2 (and ``BF16_Optimizer``): the fp32 partition of each flat parameter group."""

    def __init__(self, model: nn.Module, optimizer) -> None:
        if type(optimizer).__name__ == "BF16_Optimizer":
            stage = 1
            params, flats = optimizer.bf16_groups, optimizer.bf16_groups_flat
            lp_parts, hp_parts = optimizer.bf16_partitioned_groups, optimizer.fp32_groups_flat_partition
        else:
            stage = 2 if getattr(optimizer, "partition_gradients", False) else 1
            params, flats = optimizer.bit16_groups, optimizer.bit16_groups_flat
            lp_parts, hp_parts = optimizer.parallel_partitioned_bit16_groups, optimizer.single_partition_of_fp32_groups
        group = _single_group(optimizer.real_dp_process_group, f"ZeRO-{stage}")
        rank = dist.get_rank(group)
        names = _names_by_id(model)
        pieces: list[Piece] = []
        self._flats: list[torch.Tensor] = []
        self._lp_parts: list[torch.Tensor] = []
        for g, group_params in enumerate(params):
            flat, lp_part, hp_part = flats[g], lp_parts[g][rank], hp_parts[g]
            if hp_part.numel() != lp_part.numel():
                raise NotImplementedError(f"SEMA: ZeRO-{stage} group {g}: fp32 and compute partitions differ in size")
            lo = storage_offset_in(lp_part, flat, f"ZeRO-{stage} partition {rank} of group {g}")
            entries = [
                FlatEntry(_name(names, p), tuple(p.shape), storage_offset_in(p.data, flat, f"parameter of group {g}"))
                for p in group_params
                if p.numel() > 0
            ]
            for entry, start, stop, offset in partition_ranges(entries, lo, lo + lp_part.numel()):
                source = hp_part.narrow(0, offset, stop - start)
                compute = _distinct(lp_part.narrow(0, offset, stop - start), source)
                pieces.append(Piece(entry.name, entry.shape, start, source, compute))
            self._flats.append(flat)
            self._lp_parts.append(lp_part)
        averaged = [p for group_params in params for p in group_params]
        super().__init__(f"deepspeed-zero{stage}", _ordered_params(model, averaged, lambda p: p.shape), pieces, group)
        # A swap for evaluation refreshes every rank's full compute copy with one all-gather, though the forward is
        # rank-local: every rank must swap.
        self.swap_is_collective = self.world_size > 1

    def after_write(self) -> None:
        """Refresh every rank's full compute copy from the partitions, as the ZeRO optimizer does after a step."""
        if self.world_size == 1:
            return
        for flat, part in zip(self._flats, self._lp_parts, strict=True):
            dist.all_gather_into_tensor(flat, part, group=self.group)


class Zero3Adapter(ShardedAdapter):
    """DeepSpeed ZeRO-3: this rank's block of every parameter, in the optimizer's fp32 partitioned groups."""

    def __init__(self, model: nn.Module, optimizer) -> None:
        self._optimizer = optimizer
        names = _names_by_id(model)
        group = optimizer.dp_process_group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        pieces: list[Piece] = []
        for i, sub_group in enumerate(optimizer.fp16_groups):
            lp_flat, hp_flat = optimizer.fp16_partitioned_groups_flat[i], optimizer.fp32_partitioned_groups_flat[i]
            if lp_flat is None or hp_flat is None or hp_flat.numel() != lp_flat.numel():
                raise NotImplementedError(
                    f"SEMA: ZeRO-3 sub-group {i} has no flat partition in memory (parameters or optimizer states "
                    "swapped to NVMe are not supported)."
                )
            for p in sub_group:
                if dist.get_world_size(p.ds_process_group) != world:
                    raise NotImplementedError("SEMA: ZeRO-3 parameters partitioned over a subgroup are not supported")
                offset = storage_offset_in(p.ds_tensor, lp_flat, f"ZeRO-3 partition of {_name(names, p)}")
                start, stop = block_range(p.ds_numel, rank, world)
                if -(-p.ds_numel // world) != p.ds_tensor.ds_numel:
                    raise NotImplementedError(f"SEMA: unexpected ZeRO-3 partitioning of {_name(names, p)}")
                source = hp_flat.narrow(0, offset, stop - start)
                compute = _distinct(lp_flat.narrow(0, offset, stop - start), source)
                pieces.append(Piece(_name(names, p), tuple(p.ds_shape), start, source, compute))
        averaged = [p for sub_group in optimizer.fp16_groups for p in sub_group]
        super().__init__("deepspeed-zero3", _ordered_params(model, averaged, lambda p: p.ds_shape), pieces, group)

    def after_write(self) -> None:
        """What the ZeRO-3 optimizer does around its step: release every gathered parameter (an evaluation forward
        may leave some gathered, holding the old values), re-gather the persistent ones, drop ZeRO++ copies."""
        offload = getattr(self._optimizer, "parameter_offload", None)
        if offload is not None:
            offload.partition_all_parameters()
        persistent = list(getattr(self._optimizer, "persistent_parameters", None) or [])
        if persistent:
            persistent[0].all_gather(persistent)
        invalidate = getattr(self._optimizer, "invalidate_secondary_tensor", None)
        if invalidate is not None:
            invalidate()


def deepspeed_adapter(model: nn.Module, optimizer) -> ShardedAdapter | None:
    """The adapter for a DeepSpeed ZeRO optimizer, None for a DeepSpeed optimizer over full parameters (ZeRO-0)."""
    kind = type(optimizer).__name__
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return Zero3Adapter(model, optimizer)
    if kind in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        return ZeroPartitionAdapter(model, optimizer)
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "fp32_groups_flat"):
        return None  # ZeRO-0 in fp32 with a plain (possibly DeepSpeed-implemented) optimizer: full replicated weights
    raise NotImplementedError(
        f"SEMA: DeepSpeed optimizer {kind} is not supported (supported: ZeRO-1/2 DeepSpeedZeroOptimizer, "
        "BF16_Optimizer, ZeRO-3 DeepSpeedZeroOptimizer_Stage3, and ZeRO-0 in fp32)."
    )
