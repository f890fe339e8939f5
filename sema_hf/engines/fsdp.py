"""FSDP1 and FSDP2: each rank averages its shard of the parameters, which its optimizer updates in place.

FSDP2 (``fully_shard``): every parameter is a ``DTensor`` placed ``Shard(0)`` over a 1-D mesh; ``p.to_local()``
is this rank's block of rows (``torch.chunk`` sizes: ``ceil(rows / world_size)``, the last ranks short or empty),
which the optimizer updates in place. With a ``MixedPrecisionPolicy`` the shard stays in the parameter dtype
(fp32) and the low-precision copy is made by each forward's all-gather, so a switch only writes the shard; it then
reshards any module left unsharded so that the next forward gathers again.

FSDP1 (``FullyShardedDataParallel``): each wrapped unit owns one ``FlatParameter``; its local shard
(``_local_shard``, padded at the end) holds a contiguous piece of some of the unit's parameters, described by
``_shard_param_infos``. With ``use_orig_params=True`` the original parameters are 1-D views of that shard (some
empty on a rank); with ``use_orig_params=False`` the optimizer updates the ``FlatParameter`` itself. Either way
SEMA averages the pieces of the local shard, named like the parameters of the unwrapped model (no
``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` or ``_orig_mod.``; see `sema_hf.engines.names`).
Parameter mixed precision keeps a separate low-precision shard that each forward refills from the local shard. After a write,
units left unsharded (the root after an evaluation forward) are resharded, so the next forward gathers again.

Supported: full sharding over the whole world (``FULL_SHARD``, ``SHARD_GRAD_OP``, FSDP2 on a 1-D mesh); hybrid
sharding and ``NO_SHARD`` are refused with a clear error.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .names import canonical_name, canonical_named_parameters
from .shards import Piece, ShardedAdapter, block_range


def is_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


class FSDP2Adapter(ShardedAdapter):
    """FSDP2 (``fully_shard``): the local ``Shard(0)`` block of every trainable DTensor parameter."""

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard

        self._fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        named = [(n, p) for n, p in canonical_named_parameters(model) if p.requires_grad]
        plain = [n for n, p in named if not isinstance(p, DTensor)]
        if plain:
            raise NotImplementedError(
                f"SEMA: FSDP2 model has trainable parameters that fully_shard does not manage: {plain[:5]}"
            )
        meshes = {p.device_mesh for _, p in named}
        if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
            raise NotImplementedError("SEMA: FSDP2 is supported on one 1-D device mesh (not HSDP or 2-D meshes)")
        mesh = next(iter(meshes))
        rank, world = mesh.get_local_rank(), mesh.size()
        pieces = []
        with torch.no_grad():
            for name, p in named:
                if tuple(p.placements) != (Shard(0),) or p.dim() == 0:
                    raise NotImplementedError(
                        f"SEMA: FSDP2 parameter {name!r} is placed {p.placements}; only Shard(0) is supported"
                    )
                local = p.to_local()
                rows_start, rows_stop = block_range(p.shape[0], rank, world)
                if tuple(local.shape) != (rows_stop - rows_start, *p.shape[1:]):
                    raise NotImplementedError(
                        f"SEMA: FSDP2 local shard of {name!r} has shape {tuple(local.shape)}, expected rows "
                        f"[{rows_start}, {rows_stop}) of {tuple(p.shape)}"
                    )
                row = math.prod(p.shape[1:])
                pieces.append(Piece(name, tuple(p.shape), rows_start * row, local))
        super().__init__("fsdp2", [(n, tuple(p.shape)) for n, p in named], pieces, mesh.get_group())

    def after_write(self) -> None:
        """Make sure no module keeps unsharded parameters: the next forward must all-gather the written shards."""
        for module in self._fsdp_modules:
            module.reshard()


class FSDP1Adapter(ShardedAdapter):
    """FSDP1 (``FullyShardedDataParallel``, either ``use_orig_params``): pieces of each unit's local flat shard."""

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp._flat_param import HandleShardingStrategy

        order = {id(m): k for k, m in enumerate(model.modules())}
        params: list[tuple[tuple[int, int], str, tuple[int, ...]]] = []
        pieces: list[Piece] = []
        group = None
        self._units: list[tuple[nn.Module, object]] = []
        for prefix, module in model.named_modules():
            if not isinstance(module, FullyShardedDataParallel) or module._handle is None:
                continue
            handle = module._handle
            self._units.append((module, handle))
            if handle._sharding_strategy not in (
                HandleShardingStrategy.FULL_SHARD,
                HandleShardingStrategy.SHARD_GRAD_OP,
            ):
                raise NotImplementedError(
                    f"SEMA: FSDP1 sharding strategy {handle._sharding_strategy.name} is not supported "
                    "(supported: FULL_SHARD, SHARD_GRAD_OP)"
                )
            group = handle.process_group if group is None else group
            flat = handle.flat_param
            shard = self._local_shard(handle)
            for i, info in enumerate(flat._shard_param_infos):
                param_info = flat._param_infos[i]
                name = canonical_name(f"{prefix}.{flat._fqns[i]}" if prefix else flat._fqns[i])
                if not self._requires_grad(handle, param_info):
                    continue
                shape = tuple(flat._shapes[i])
                params.append(((order.get(id(param_info.module), len(order)), i), name, shape))
                if info.in_shard and info.numel_in_shard:
                    source = shard.narrow(0, info.offset_in_shard, info.numel_in_shard)
                    pieces.append(Piece(name, shape, info.intra_param_start_idx, source))
        params.sort(key=lambda entry: entry[0])
        super().__init__("fsdp1", [(n, s) for _, n, s in params], pieces, group)

    def after_write(self) -> None:
        """Drop unsharded copies so that the next forward all-gathers the written shards: FSDP1 keeps the root
        unit unsharded after a forward without backward (an evaluation), and would otherwise reuse it."""
        from torch.distributed.fsdp._runtime_utils import _reshard

        for module, handle in self._units:
            if not handle.needs_unshard():
                _reshard(module, handle, free_unsharded_flat_param=True)

    @staticmethod
    def _requires_grad(handle, param_info) -> bool:
        if handle._use_orig_params:
            return getattr(param_info.module, param_info.param_name).requires_grad
        return handle.flat_param.requires_grad

    @staticmethod
    def _local_shard(handle) -> torch.Tensor:
        """The memory the optimizer updates: ``_local_shard``, which FSDP1 sets at its lazy init (the first forward)
        to the flat parameter's sharded data. With parameter CPU offload that init moves the shard into pinned
        memory, so an average bound before it would follow a dead copy."""
        flat = handle.flat_param
        if hasattr(flat, "_local_shard"):
            return flat._local_shard
        if handle._offload_params:
            raise NotImplementedError(
                "SEMA: FSDP1 with parameter CPU offload moves its shards at the first forward, after the callback "
                "binds the average; use FSDP2 (fully_shard, whose offloaded shards stay put) or FSDP1 without "
                "offload_params."
            )
        return flat.data
