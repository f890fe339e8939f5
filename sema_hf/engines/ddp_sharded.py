"""DDP with ``shard_under_ddp=True``: the ranks share one average, each holding and updating 1/W of it.

Under DDP every rank holds the same parameters (the replicas), so one average would do for all of them. Flatten the
unique trainable parameters end to end in the model's order (``named_parameters()``: a tied weight once) into N
elements; rank r of W owns the block ``[r * B, min((r + 1) * B, N))`` with ``B = ceil(N / W)`` (`ddp_partition`),
cut into one `Piece` per parameter it overlaps. Each piece's source is a view of that range of the parameter
itself, so:

* **update**: a fused ``lerp_`` over this rank's N / W elements of its own replica; no communication.
* **switch**: the store writes each rank's average into its own range of its replica, then `after_write` makes the
  replicas identical again with ONE ``all_gather_into_tensor`` over a temporary flat buffer of ``W * B`` elements
  (in the parameters' widest float dtype, so mixed fp32/bf16 parameters travel losslessly), copied back into every
  parameter. The buffer lives only during the switch.
* **evaluation** (`EMAStore.swapped_in` with ``backup_forward``): `backup_forward` keeps this rank's raw range
  (N / W elements), the store writes the average there, and `after_write` gathers the full average (the one
  collective of an evaluation) into the temporary buffer and exchanges it with the parameters chunk by chunk, so
  the forward reads the average and the buffer keeps the raw weights. On leaving, the raw parameters are copied back
  from it, bit for bit, with no collective. Extra memory while evaluating: N elements (the full-copy average's
  swap keeps a backup of N as well, on top of its N-element average).
* **checkpoints**: one file per rank with its piece ranges in ``Layout.extra["pieces"]``, so `sema_hf.checkpoint`
  re-shards them onto another world size, onto ZeRO / FSDP, or onto one process, and back.
* **full averages** (``ema_state_dict``): gathered one parameter at a time (`ShardedAdapter.full_state_dict`).

Memory per rank for the average: 4 bytes x N / W, against 4 x N for the full copy every DDP rank keeps otherwise.
The price: one all-gather of the whole model per switch and per evaluation (each of those gathers the replicas'
bytes once), against none for the full copy. Switches happen once per epoch (or every few hundred steps), so that
is usually small next to training; see ``docs/benchmarks.md`` for measured figures.

Buffers are not sharded (``include_buffers=True`` is refused): each rank's BatchNorm statistics follow its own
batches, so the ranks' buffers differ between DDP's broadcasts and a shared average of them would mix ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .local import averaged_named_tensors, moved_tensors, placements, unwrap_model
from .shards import FlatEntry, Piece, ShardedAdapter, block_range, partition_ranges

SWAP_CHUNK = 1 << 20  # elements exchanged at a time between the parameters and the gathered buffer


def ddp_partition(
    params: Sequence[tuple[str, Sequence[int]]], rank: int, world_size: int
) -> list[tuple[str, int, int, int]]:
    """This rank's share of the parameters flattened end to end (in the given order).

    With N elements in all, rank ``rank`` owns the flat block ``[rank * B, min((rank + 1) * B, N))``,
    ``B = ceil(N / world_size)`` (the last ranks short or empty). Returns ``(name, start, stop, flat_offset)`` for
    each parameter the block overlaps, in order: elements ``[start, stop)`` of the flattened parameter are elements
    ``[flat_offset, flat_offset + stop - start)`` of the flat order. The blocks of all ranks are disjoint and cover
    every element exactly once.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"ddp_partition: rank {rank} is not in a world of size {world_size}")
    entries, offset = [], 0
    for name, shape in params:
        entries.append(FlatEntry(name, tuple(int(d) for d in shape), offset))
        offset += entries[-1].numel
    lo, hi = block_range(offset, rank, world_size)
    return [(e.name, start, stop, lo + at) for e, start, stop, at in partition_ranges(entries, lo, hi)]


def flat_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """One dtype that every given float dtype converts to and back without loss: the dtype itself when all are the
    same, else torch's promotion (bf16 + fp32 -> fp32, bf16 + fp16 -> fp32, anything + fp64 -> fp64)."""
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


class DDPShardedAdapter(ShardedAdapter):
    """DDP replicas sharing one average: this rank averages a contiguous 1/W of the flattened trainable elements.

    Swapping the average in for an evaluation gathers it (``swap_is_collective``): every rank must swap, even
    though the forward of a DDP model is rank-local.

    Args:
        model: the user's model (or its ``DistributedDataParallel`` wrapper); the same on every rank.
        group: the data-parallel process group (default: the whole world).
    """

    swap_is_collective = True

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self.model = unwrap_model(model)
        named = averaged_named_tensors(self.model, include_buffers=False)
        if not named:
            raise ValueError("SEMA found no trainable parameter (requires_grad=True) to average in this model.")
        for name, p in named:
            if not p.is_floating_point():
                raise ValueError(f"SEMA: parameter {name!r} has dtype {p.dtype}; only floating tensors average")
            if not p.is_contiguous():
                raise NotImplementedError(
                    f"SEMA: shard_under_ddp needs contiguous parameters; {name!r} (shape {tuple(p.shape)}, stride "
                    f"{p.stride()}) is not. Use shard_under_ddp=False."
                )
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise NotImplementedError(
                f"SEMA: shard_under_ddp needs every trainable parameter on one device; found {sorted(map(str, devices))}"
            )
        self._params = [p for _, p in named]
        self._placements = placements(self.model, named)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        shapes = [(name, tuple(int(d) for d in p.shape)) for name, p in named]
        by_name, shape_of = dict(named), dict(shapes)
        share = ddp_partition(shapes, rank, world)
        pieces = [Piece(n, shape_of[n], a, by_name[n].data.view(-1)[a:b]) for n, a, b, _ in share]
        super().__init__("ddp-sharded", shapes, pieces, group)
        self.total_numel = sum(p.numel() for p in self._params)
        self._block = -(-self.total_numel // self.world_size)
        self._flat_dtype = flat_dtype([p.dtype for p in self._params])
        # (this rank's piece, its offset in this rank's block of the flat buffer) for the switch's gather
        lo = self.rank * self._block
        self._own = [(piece.source, at - lo) for piece, (_, _, _, at) in zip(pieces, share, strict=True)]
        self._pending: list[torch.Tensor] | None = None  # this rank's raw range, between backup and gather
        self._backup: list[torch.Tensor] | None = None  # the raw parameters (views of the gathered buffer)

    def moved_tensors(self) -> list[str]:
        """The parameters the model no longer holds where this rank's pieces point (`local.moved_tensors`)."""
        return moved_tensors(self._placements)

    def _flat_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (the N elements in the flat order), one per parameter, shaped like it."""
        views, offset = [], 0
        for p in self._params:
            views.append(flat.narrow(0, offset, p.numel()).view(p.shape))
            offset += p.numel()
        return views

    def _gather(self) -> torch.Tensor:
        """ONE all-gather of every rank's own range of its replica into a new flat buffer (``W * ceil(N / W)``
        elements); its first N elements are then the parameters in the flat order as the ranks' ranges hold them."""
        flat = torch.empty(self.world_size * self._block, dtype=self._flat_dtype, device=self._device)
        mine = flat.narrow(0, self.rank * self._block, self._block)
        if self._own:
            torch._foreach_copy_([mine.narrow(0, at, src.numel()) for src, at in self._own], [s for s, _ in self._own])
        dist.all_gather_into_tensor(flat, mine, group=self.group)
        return flat

    @torch.no_grad()
    def after_write(self) -> None:
        """Make the replicas identical again after the store wrote into this rank's range: one all-gather into a
        temporary flat buffer, copied into every parameter (a switch). Right after `backup_forward` (an evaluation
        swap), the gathered buffer is instead exchanged with the parameters, so that it keeps the raw weights."""
        flat = self._gather()
        views = self._flat_views(flat)
        if self._pending is None:
            torch._foreach_copy_([p.data for p in self._params], views)
            return
        raw_own, self._pending = self._pending, None
        self._exchange(views)
        # this rank's range of the parameters held the average already (the store wrote it before this call)
        lo = self.rank * self._block
        torch._foreach_copy_([flat.narrow(0, lo + at, src.numel()) for src, at in self._own], raw_own)
        self._backup = views

    def _exchange(self, views: list[torch.Tensor]) -> None:
        """Swap the contents of every parameter and its view of the flat buffer, through a small scratch buffer
        (peak memory: the flat buffer plus ``SWAP_CHUNK`` elements, not a second full copy)."""
        scratch = torch.empty(min(SWAP_CHUNK, self.total_numel), dtype=self._flat_dtype, device=self._device)
        for p, view in zip(self._params, views, strict=True):
            a, b = p.data.view(-1), view.view(-1)
            for start in range(0, a.numel(), scratch.numel()):
                n = min(scratch.numel(), a.numel() - start)
                tmp, x, y = scratch[:n], a[start : start + n], b[start : start + n]
                tmp.copy_(x)
                x.copy_(y)
                y.copy_(tmp)

    @torch.no_grad()
    def backup_forward(self) -> Callable[[], None]:
        """Before an evaluation swaps the average in: keep this rank's own range of the raw parameters (N / W
        elements; the store is about to overwrite it). The next `after_write` gathers the average and leaves the
        full raw parameters in the gathered buffer; the returned function copies them back, bit for bit, with no
        collective (the replicas all restore the same bytes) and frees the buffer."""
        self._pending = [src.clone() for src, _ in self._own]
        self._backup = None

        @torch.no_grad()
        def restore() -> None:
            backup, pending = self._backup, self._pending
            self._backup = self._pending = None
            if backup is not None:
                torch._foreach_copy_([p.data for p in self._params], backup)
            elif pending is not None:  # the swap failed before its gather: only this rank's range was written
                torch._foreach_copy_([src for src, _ in self._own], pending)

        return restore

    @property
    def flat_numel(self) -> int:
        """Elements of the temporary buffer a switch gathers into (``W * ceil(N / W)``)."""
        return self.world_size * self._block
