"""The fp32 averages over plain tensors: update, switch, swap-in for evaluation, state dict.

An update is pure memory traffic: read the weights, read the average, write the average. Its floor is one
``lerp_`` over a contiguous fp32 buffer of the same size (12 bytes per element for fp32 weights, 10 for bf16
weights with an fp32 average). The store keeps every average of a device as a view into ONE flat fp32 buffer, plans
the update once, and runs it without allocating or synchronising with the host:

* fp32 sources: one fused ``torch._foreach_lerp_(averages, sources, 1 - m)``;
* lower-precision sources (bf16/fp16): cast block by block into a reused fp32 scratch buffer of about 1M elements
  (small tensors packed together, large ones cut into pieces, non-contiguous ones cut along their first dimension),
  then one ``lerp_`` per block from the scratch. Mixed-dtype arithmetic would otherwise silently materialise an
  fp32 copy of the whole operand (on CPU, TensorIterator casts the bf16 operand into a temporary).
* sources that lie end to end in one storage (FSDP1 ``use_orig_params`` views, parameters a user flattened into
  one buffer) are merged into a single run at planning time: one kernel instead of one per tensor. On CPU a
  ``_foreach`` op is a loop of one kernel per tensor (about 1 us each, and tensors under 32K elements run on one
  thread), so a model made of many small separate tensors stays several times above the flat bound.

A switch is planned the same way: one ``_foreach_copy_`` per (device, dtype) of the tensors written.

The average is always fp32: a bf16 average of bf16 weights stops moving once ``(1 - m) * theta`` falls below the
bf16 resolution of ``ema`` (at m = 0.999 that is almost always).

The store knows nothing of the Trainer or of engines: it gets `Slot`s (what to average, what to write on a switch)
and an ``after_write`` callback from an engine adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .engines.base import Slot

SCRATCH_NUMEL = 1 << 20  # fp32 elements per cast block: 4 MiB, cache-sized


@dataclass
class _CastBlock:
    """Pieces of low-precision sources cast together through the scratch buffer, then averaged in one go.

    ``scratch[i]`` has the shape of ``sources[i]`` (the cast); ``averages[j]`` / ``lerp_sources[j]`` are the same
    memory merged into as few contiguous runs as possible (usually one) for the lerp.
    """

    sources: list[torch.Tensor]
    scratch: list[torch.Tensor]
    averages: list[torch.Tensor]
    lerp_sources: list[torch.Tensor]


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` starts in memory exactly where ``a`` ends (both contiguous, same storage, dtype and device)."""
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.is_contiguous()
        and b.is_contiguous()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.storage_offset() == a.storage_offset() + a.numel()
    )


def _extended(t: torch.Tensor, extra: int) -> torch.Tensor:
    """A 1-D view of ``t`` and the ``extra`` elements that follow it in its storage."""
    return t.as_strided((t.numel() + extra,), (1,), t.storage_offset())


def _coalesce(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Merge consecutive ``(x, y)`` pairs whose x's and whose y's both lie end to end into one 1-D pair."""
    merged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y in pairs:
        if merged and _follows(merged[-1][0], x) and _follows(merged[-1][1], y):
            px, py = merged[-1]
            merged[-1] = (_extended(px, x.numel()), _extended(py, y.numel()))
        else:
            merged.append((x, y))
    return merged


def _pieces(
    source: torch.Tensor, average: torch.Tensor, max_numel: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a (source, average) pair into pieces of at most ``max_numel`` elements (at least one row each)."""
    if source.is_contiguous():
        source, average = source.view(-1), average.view(-1)
    if source.numel() <= max_numel or source.dim() == 0:
        yield source, average
        return
    rows = max(1, max_numel // (source.numel() // source.shape[0]))
    for start in range(0, source.shape[0], rows):
        yield source[start : start + rows], average[start : start + rows]


def _on(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` on ``like``'s device (a copy only when it is elsewhere; the dtype is cast by the copy itself)."""
    return value if value.device == like.device else value.to(like.device)


def _grouped_copies(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``(destination, source)`` pairs, merged where contiguous and grouped by destination device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for dst, src in _coalesce([(d, s) for d, s in pairs if d.numel()]):
        dsts, srcs = groups.setdefault((dst.device, dst.dtype), ([], []))
        dsts.append(dst)
        srcs.append(src)
    return list(groups.values())


def flat_fp32_views(slots: Sequence[Slot]) -> dict[str, torch.Tensor]:
    """An fp32 tensor per slot, shaped like its source, all views of ONE flat buffer per device (in slot order, so
    that neighbouring slots are neighbours in memory and their updates merge into one run). Uninitialised."""
    by_device: dict[torch.device, list[Slot]] = {}
    for s in slots:
        by_device.setdefault(s.source.device, []).append(s)
    views: dict[str, torch.Tensor] = {}
    for device, group in by_device.items():
        flat = torch.empty(sum(s.source.numel() for s in group), dtype=torch.float32, device=device)
        offset = 0
        for s in group:
            views[s.name] = flat[offset : offset + s.source.numel()].view(s.source.shape)
            offset += s.source.numel()
    return {s.name: views[s.name] for s in slots}


class EMAStore:
    """Exponential moving averages (fp32) of a fixed set of named tensors.

    Args:
        slots: the tensors to average (`Slot.source`) and the copies a switch must also write (`Slot.compute`).
            Names must be unique; tensors are paired by name, never by position.
        after_write: called after the store wrote into the model's tensors (switch, swap in, swap out), so an
            engine can refresh what the forward reads.
        scratch_numel: size of the fp32 cast buffer used for low-precision sources.
        before_read: called before the store reads the sources (update, reset), so an engine can refresh sources
            that are copies (DDP with ``include_buffers``: rank 0's buffers, broadcast into a scratch buffer).
        backup_forward: for engines whose ``after_write`` communicates (DDP with ``shard_under_ddp``): called when
            an evaluation swaps the averages in, before anything is written; it keeps a local copy of every tensor
            the forward reads and returns a function that restores them all, locally, on swap-out, so leaving the
            swap needs no ``after_write`` (no second collective). Without it, the store backs up the slots' forward
            tensors itself and calls ``after_write`` again on swap-out.
    """

    def __init__(
        self,
        slots: Sequence[Slot],
        after_write: Callable[[], None] | None = None,
        scratch_numel: int = SCRATCH_NUMEL,
        *,
        backup_forward: Callable[[], Callable[[], None]] | None = None,
        before_read: Callable[[], None] | None = None,
    ) -> None:
        names = [s.name for s in slots]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"EMAStore slot names must be unique; repeated: {duplicates}")
        for s in slots:
            if not s.source.is_floating_point():
                raise ValueError(f"EMAStore slot {s.name!r} has dtype {s.source.dtype}; only floating tensors average")
        self.slots: list[Slot] = list(slots)
        self._after_write = after_write or (lambda: None)
        self._backup_forward = backup_forward
        self._before_read = before_read or (lambda: None)
        self._averages: dict[str, torch.Tensor] = flat_fp32_views(self.slots)
        self._plan_update(scratch_numel)
        self.reset()

    # ---- construction -------------------------------------------------------------------------------------------
    def _plan_update(self, scratch_numel: int) -> None:
        fp32: list[tuple[torch.Tensor, torch.Tensor]] = []
        low: list[tuple[torch.Tensor, torch.Tensor]] = []
        for s in self.slots:
            if s.source.numel():
                (fp32 if s.source.dtype == torch.float32 else low).append((s.source, self._averages[s.name]))
        fp32 = _coalesce(fp32)
        self._fp32_sources: list[torch.Tensor] = [src for src, _ in fp32]
        self._fp32_averages: list[torch.Tensor] = [avg for _, avg in fp32]

        pieces_by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for src, avg in _coalesce(low):
            pieces_by_device.setdefault(src.device, []).extend(_pieces(src, avg, scratch_numel))
        self._cast_blocks: list[_CastBlock] = []
        for device, pieces in pieces_by_device.items():
            size = max(min(scratch_numel, sum(p.numel() for p, _ in pieces)), max(p.numel() for p, _ in pieces))
            scratch = torch.empty(size, dtype=torch.float32, device=device)
            block: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            used = 0
            for src, avg in pieces:
                if used + src.numel() > size:
                    self._cast_blocks.append(self._cast_block(block))
                    block, used = [], 0
                block.append((src, scratch[used : used + src.numel()].view(src.shape), avg))
                used += src.numel()
            self._cast_blocks.append(self._cast_block(block))

        # Sources first, then compute copies, so that neighbours in memory are neighbours in the list and merge.
        self._switch_copies = _grouped_copies(
            [(s.source, self._averages[s.name]) for s in self.slots]
            + [(s.compute, self._averages[s.name]) for s in self.slots if s.compute is not None]
        )
        self._reset_copies = _grouped_copies([(self._averages[s.name], s.source) for s in self.slots])

    @staticmethod
    def _cast_block(block: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> _CastBlock:
        runs = _coalesce([(avg, scratch) for _, scratch, avg in block])
        return _CastBlock(
            sources=[src for src, _, _ in block],
            scratch=[scratch for _, scratch, _ in block],
            averages=[avg for avg, _ in runs],
            lerp_sources=[scratch for _, scratch in runs],
        )

    # ---- the averages -------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Slot names in order."""
        return list(self._averages)

    @property
    def local_numel(self) -> int:
        """Elements of fp32 average held by this process (4 bytes each)."""
        return sum(a.numel() for a in self._averages.values())

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh as a copy of the sources."""
        self._before_read()
        for averages, sources in self._reset_copies:
            torch._foreach_copy_(averages, sources)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``ema <- decay * ema + (1 - decay) * source`` for every slot, in place, with no allocation."""
        weight = 1.0 - decay
        self._before_read()
        if self._fp32_averages:
            torch._foreach_lerp_(self._fp32_averages, self._fp32_sources, weight)
        for block in self._cast_blocks:
            torch._foreach_copy_(block.scratch, block.sources)
            torch._foreach_lerp_(block.averages, block.lerp_sources, weight)

    @torch.no_grad()
    def switch(self) -> None:
        """Copy the averages into what the optimizer updates and into what the forward reads (Switch EMA)."""
        for targets, averages in self._switch_copies:
            torch._foreach_copy_(targets, averages)
        self._after_write()

    @torch.no_grad()
    def write(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copy ``values`` (this rank's tensors by slot name, shaped like `state_dict`'s: e.g. a post-hoc
        reconstruction) into the model for good, exactly as `switch` writes the averages: into what the optimizer
        updates (``source``) and what the forward reads (``compute``), then the engine's ``after_write``. The
        averages themselves are untouched."""
        self.check_state_dict(values)
        pairs = [(s.source, values[s.name]) for s in self.slots]
        pairs += [(s.compute, values[s.name]) for s in self.slots if s.compute is not None]
        for targets, sources in _grouped_copies([(d, _on(v, d)) for d, v in pairs]):
            torch._foreach_copy_(targets, sources)
        self._after_write()

    @contextmanager
    def swapped_in(self, averages: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Within the block the forward reads the averages; the raw weights always come back afterwards, bit for bit.

        ``averages``: other tensors to read instead of the store's own (this rank's tensors by slot name, shaped like
        `state_dict`'s: a post-hoc reconstruction, a checkpoint's average); checked against the slots first.

        Only what the forward reads is written (not fp32 master copies), so the optimizer never sees the average.
        Costs one copy of the forward tensors while inside the block.
        """
        if averages is None:
            averages = self._averages
        else:
            self.check_state_dict(averages)
        if self._backup_forward is not None:
            with self._swapped_in_with_engine_backup(averages):
                yield
            return
        with torch.no_grad():
            targets = [s.forward_tensor for s in self.slots]
            backup = [t.clone() for t in targets]
            for s, t in zip(self.slots, targets, strict=True):
                t.copy_(averages[s.name])
            self._after_write()
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(targets, backup, strict=True):
                    t.copy_(b)
                del backup
                self._after_write()

    @contextmanager
    def _swapped_in_with_engine_backup(self, averages: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """`swapped_in` for an engine that backs up (and restores, locally) the full forward tensors itself."""
        assert self._backup_forward is not None
        with torch.no_grad():
            restore = self._backup_forward()
        try:
            with torch.no_grad():
                for s in self.slots:
                    s.forward_tensor.copy_(averages[s.name])
                self._after_write()
            yield
        finally:
            with torch.no_grad():
                restore()
                del restore

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by slot name (views of the store's buffers; clone them to keep a snapshot)."""
        return dict(self._averages)

    def check_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` unless ``state`` has exactly this store's names and shapes (changes nothing)."""
        missing = [n for n in self._averages if n not in state]
        unexpected = [n for n in state if n not in self._averages]
        mismatched = [
            f"{n}: saved {tuple(state[n].shape)} vs current {tuple(a.shape)}"
            for n, a in self._averages.items()
            if n in state and tuple(state[n].shape) != tuple(a.shape)
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                "EMA state does not match this model: "
                f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, "
                f"shape mismatches {mismatched[:10]}"
            )

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore averages saved by `state_dict`; names and shapes must match exactly."""
        self.check_state_dict(state)
        for n, a in self._averages.items():
            a.copy_(state[n])
