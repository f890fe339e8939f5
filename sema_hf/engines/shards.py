"""What every sharded engine has in common: a rank holds *pieces* of flattened parameters.

FSDP1, FSDP2 and DeepSpeed ZeRO 1/2/3 cut the weights differently (a flat buffer per wrapped unit, row blocks of
each tensor, a flat buffer per parameter group, a block of each flattened tensor), but on every rank each
trainable parameter is either absent or present as ONE contiguous range ``[start, stop)`` of its flattened full
tensor. A `Piece` records that range together with the tensor the optimizer updates there (the fp32 master
shard) and, where the forward reads another copy (a bf16 / fp16 shard), that copy.

`ShardedAdapter` turns pieces into the store's slots (one slot per piece, named like the parameter), describes
them in `Layout.extra["pieces"]` (so that checkpoints can be re-sharded onto another world size or engine), and
gathers the full averages one tensor at a time. The engine adapters (`fsdp`, `deepspeed`) only have to find the
pieces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import Layout, Slot


@dataclass(frozen=True)
class Piece:
    """This rank's part of one parameter: elements ``[start, start + source.numel())`` of the flattened tensor.

    Attributes:
        name: the parameter's name in the user's ``model.state_dict()`` (wrapper prefixes removed).
        shape: the full parameter's shape.
        start: offset of this part in the flattened full parameter.
        source: what the optimizer updates (e.g. a slice of the fp32 master partition).
        compute: the copy the forward reads when it is not ``source`` (e.g. a slice of the bf16 partition).
    """

    name: str
    shape: tuple[int, ...]
    start: int
    source: torch.Tensor
    compute: torch.Tensor | None = None

    @property
    def stop(self) -> int:
        return self.start + self.source.numel()


@dataclass(frozen=True)
class FlatEntry:
    """A parameter laid out in a flat buffer: it occupies ``[offset, offset + prod(shape))`` of the buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def partition_ranges(entries: Sequence[FlatEntry], lo: int, hi: int) -> list[tuple[FlatEntry, int, int, int]]:
    """Which parts of which parameters the partition ``[lo, hi)`` of a flat buffer holds.

    Returns ``(entry, start, stop, offset)`` for every parameter overlapping the partition: elements
    ``[start, stop)`` of the flattened parameter lie at ``[offset, offset + stop - start)`` of the partition.
    Padding between or after parameters belongs to no parameter and is skipped. This is the offset -> name map
    of DeepSpeed ZeRO-1/2 (a flat buffer per parameter group, cut into ``world_size`` equal partitions).
    """
    out = []
    for e in entries:
        a, b = max(lo, e.offset), min(hi, e.offset + e.numel)
        if a < b:
            out.append((e, a - e.offset, b - e.offset, a - lo))
    return out


def cover_problems(lo: int, hi: int, ranges: Sequence[tuple[int, int]]) -> list[str]:
    """What keeps ``ranges`` from covering ``[lo, hi)`` exactly once: the holes (held by none) and the overlaps
    (held twice), as ``"[a, b) missing"`` / ``"[a, b) twice"``; empty when they tile it. Checked by intervals, not
    by adding up sizes: two ranges that both hold ``[0, 10)`` of ``[0, 20)`` add up to 20 and cover half."""
    problems, at = [], lo
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)):
        if a > at:
            problems.append(f"[{at}, {a}) missing")
        elif a < at:
            problems.append(f"[{a}, {min(at, b)}) twice")
        at = max(at, b)
    if at < hi:
        problems.append(f"[{at}, {hi}) missing")
    return problems


def block_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """Elements ``[start, stop)`` of a flattened tensor of ``numel`` elements held by ``rank`` when the tensor is cut
    into ``world_size`` blocks of ``ceil(numel / world_size)`` (the last ones short or empty): ZeRO-3's partitioning
    of each parameter, and FSDP2's ``Shard(0)`` (``torch.chunk``) when applied to rows."""
    size = -(-numel // world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def storage_offset_in(tensor: torch.Tensor, buffer: torch.Tensor, what: str) -> int:
    """Offset (in elements) of ``tensor`` inside ``buffer``; a clear error when it is not a view of it."""
    if tensor.numel() == 0:
        raise ValueError(f"{what} is empty")
    same = (
        tensor.dtype == buffer.dtype
        and tensor.device == buffer.device
        and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    )
    offset = tensor.storage_offset() - buffer.storage_offset()
    if not same or not 0 <= offset <= buffer.numel() - tensor.numel():
        raise NotImplementedError(
            f"SEMA: {what} is not a view of the engine's flat buffer, so its place in the shard is unknown "
            "(an engine layout this version of sema_hf does not understand)."
        )
    return offset


def _distinct(compute: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
    """``compute`` unless it is the very memory of ``source`` (fp32 engines keep a single copy)."""
    if compute.numel() == 0 or (
        compute.dtype == source.dtype
        and compute.device == source.device
        and compute.data_ptr() == source.data_ptr()
        and compute.stride() == source.stride()
    ):
        return None
    return compute


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device collectives of ``group`` run on: CPU for gloo, the current accelerator otherwise."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo" or not torch.accelerator.is_available():
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    assert accelerator is not None
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


class ShardedAdapter:
    """Base of the sharded adapters: slots, layout and gathering from this rank's `Piece`s.

    Args:
        name: engine name recorded in checkpoints.
        params: ``(name, full shape)`` of every averaged parameter, in the model's order, identical on all ranks.
        pieces: this rank's pieces (at most one per parameter; a parameter this rank holds nothing of has none).
        group: the process group the parameters are sharded over (the data-parallel group).
    """

    def __init__(
        self,
        name: str,
        params: Sequence[tuple[str, tuple[int, ...]]],
        pieces: Sequence[Piece],
        group: dist.ProcessGroup | None,
    ) -> None:
        self.name = name
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.world_size != dist.get_world_size():
            raise NotImplementedError(
                f"SEMA: {name} shards over {self.world_size} of {dist.get_world_size()} ranks; only pure data "
                "parallel sharding (the shard group is the whole world) is supported, not HSDP, tensor or pipeline "
                "parallelism."
            )
        self.params = [(n, tuple(int(d) for d in s)) for n, s in params]
        shapes = dict(self.params)
        if len(shapes) != len(self.params):
            raise ValueError(f"SEMA: {name}: a parameter name appears twice among {[n for n, _ in self.params]}")
        if not self.params:
            raise ValueError("SEMA found no trainable parameter (requires_grad=True) to average in this model.")
        self.pieces = [p for p in pieces if p.source.numel() > 0]
        seen: set[str] = set()
        for p in self.pieces:
            if p.name not in shapes or tuple(p.shape) != shapes[p.name]:
                raise ValueError(f"SEMA: {name}: piece {p.name!r} {p.shape} is not one of the averaged parameters")
            if p.name in seen:
                raise ValueError(f"SEMA: {name}: parameter {p.name!r} has two pieces on rank {self.rank}")
            if not (0 <= p.start and p.stop <= math.prod(p.shape)):
                raise ValueError(f"SEMA: {name}: piece {p.name!r} [{p.start}, {p.stop}) lies outside {p.shape}")
            if p.compute is not None and p.compute.numel() != p.source.numel():
                raise ValueError(f"SEMA: {name}: piece {p.name!r} has a compute copy of another size")
            seen.add(p.name)
        self._device = comm_device(group)
        self._check_coverage()

    def _check_coverage(self) -> None:
        """One all-gather of the piece ranges at setup: the ranks' pieces must tile every parameter exactly (no
        element held twice, none missing), else the engine's layout was misread and the average would silently
        miss or double weights."""
        gathered: list[list[tuple[str, int, int]] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, [(p.name, p.start, p.stop) for p in self.pieces], group=self.group)
        ranges: dict[str, list[tuple[int, int]]] = {}
        for pieces in gathered:
            for name, start, stop in pieces or []:
                ranges.setdefault(name, []).append((start, stop))
        problems = [
            f"{name} {problem}"
            for name, shape in self.params
            for problem in cover_problems(0, math.prod(shape), ranges.get(name, []))
        ]
        if problems:
            raise RuntimeError(
                f"SEMA: {self.name}: the ranks' shards do not cover the trainable parameters exactly once "
                f"({'; '.join(problems[:10])}); the engine's sharding was not understood, refusing to average a "
                "wrong set of weights."
            )

    # ---- EngineAdapter ----------------------------------------------------------------------------------------
    def slots(self) -> list[Slot]:
        return [Slot(p.name, p.source, p.compute) for p in self.pieces]

    def after_write(self) -> None:
        """Nothing to refresh by default: the next forward gathers from the shards the store wrote."""

    def layout(self) -> Layout:
        return Layout(
            engine=self.name,
            world_size=self.world_size,
            rank=self.rank,
            sharded=True,
            slots=[(p.name, list(p.source.shape)) for p in self.pieces],
            params=[(n, list(s)) for n, s in self.params],
            extra={"pieces": [[p.name, p.start, p.stop] for p in self.pieces]},
        )

    @torch.no_grad()
    def full_state_dict(self, averages: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full fp32 averages on CPU, on every rank, gathered one parameter at a time.

        The pieces of a parameter are disjoint and cover it, so each rank writes its piece into a zero buffer and
        one all-reduce (sum) assembles it exactly. Peak extra memory: one full parameter on the collective device.
        """
        by_name = {p.name: p for p in self.pieces}
        out: dict[str, torch.Tensor] = {}
        for name, shape in self.params:
            full = torch.zeros(math.prod(shape), dtype=torch.float32, device=self._device)
            piece = by_name.get(name)
            if piece is not None:
                full[piece.start : piece.stop].copy_(averages[name].reshape(-1))
            dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group)
            out[name] = full.view(shape).cpu()
        return out

    @property
    def local_numel(self) -> int:
        return sum(p.source.numel() for p in self.pieces)
