"""Power-function EMA profiles of this rank's shard, for post-hoc EMA (`sema_hf.posthoc` has the maths).

Each profile ``k`` with exponent ``gamma_k`` follows the weights after every optimizer step ``t = 1, 2, ...``::

    avg_k <- beta_t * avg_k + (1 - beta_t) * theta_t        beta_t = (1 - 1/t) ** (gamma_k + 1)

so ``avg_k`` at step 1 is ``theta_1`` exactly (``beta_1 = 0``) and at step ``t`` weighs ``theta_tau`` by
``(tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)``: no decay warmup, no ``update_every``, no ``update_after_step``.

The update is memory traffic like the classic EMA's (`sema_hf.store`), so it is planned once and run block by
block: the sources are cut into cache-sized blocks (about 1M elements) and, for each block, ONE
``torch._foreach_lerp_`` updates every profile (and, when given, the classic EMA) from it while the block is in
cache: one pass over the weights for all averages, no allocation per step. Low-precision sources (bf16 / fp16)
are cast block by block into a reused fp32 scratch buffer first, as the store does.

Every profile lives in one flat fp32 buffer per device laid out like the store's, so neighbouring tensors merge
into one contiguous run. The module knows no Trainer, engine or file: it gets `Slot`s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .engines.base import Slot
from .store import SCRATCH_NUMEL, _follows, flat_fp32_views


def _zeroed(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for t in views.values():
        t.zero_()
    return views


def power_beta(t: int, gamma: float) -> float:
    """The decay of a power-function profile at optimizer step ``t`` (from 1): ``(1 - 1/t) ** (gamma + 1)``."""
    if t < 1:
        raise ValueError(f"power-function EMA steps count from 1; got t = {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


@dataclass
class _Block:
    """Pieces updated together: ``sources[i]`` (or its fp32 cast ``scratch[i]``) feeds ``targets[j][i]`` for
    every average ``j`` (the profiles, then the classic EMA when given)."""

    sources: list[torch.Tensor]
    scratch: list[torch.Tensor] | None
    targets: list[list[torch.Tensor]]


def _merge(rows: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Merge consecutive rows ``[source, avg_0, avg_1, ...]`` whose every column lies end to end in memory."""
    merged: list[list[torch.Tensor]] = []
    for row in rows:
        if merged and all(_follows(a, b) for a, b in zip(merged[-1], row, strict=True)):
            extra = row[0].numel()
            merged[-1] = [t.as_strided((t.numel() + extra,), (1,), t.storage_offset()) for t in merged[-1]]
        else:
            merged.append(row)
    return merged


def _cut(row: list[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    """Cut a row into pieces of at most ``max_numel`` elements (at least one leading-dimension row each)."""
    source = row[0]
    if source.is_contiguous():
        row = [t.reshape(-1) for t in row]
        source = row[0]
    if source.numel() <= max_numel or source.dim() == 0:
        return [row]
    rows = max(1, max_numel // (source.numel() // source.shape[0]))
    return [[t[i : i + rows] for t in row] for i in range(0, source.shape[0], rows)]


class PowerProfiles:
    """fp32 power-function EMA profiles of a fixed set of `Slot` sources (this rank's shard).

    Args:
        slots: what to average (`Slot.source`), as the store gets them; names are the store's.
        gammas: one exponent per profile (`sema_hf.posthoc.sigma_rel_to_gamma`).
        companion: optional averages (the classic EMA's, ``EMAStore.state_dict()``) updated in the same pass by
            `update` when it is given an ``ema_weight``: keyed like the slots.
        before_read: called once before the sources are read (an engine refreshing copies, as for the store).
        block_numel: elements per cache-sized block.
    """

    def __init__(
        self,
        slots: Sequence[Slot],
        gammas: Sequence[float],
        companion: Mapping[str, torch.Tensor] | None = None,
        before_read: Callable[[], None] | None = None,
        block_numel: int = SCRATCH_NUMEL,
    ) -> None:
        if not gammas:
            raise ValueError("PowerProfiles needs at least one exponent")
        self.slots = list(slots)
        self.gammas = [float(g) for g in gammas]
        self.t = 0  # the optimizer step of the current values (0: not started; the first update sets theta_1)
        self._before_read = before_read or (lambda: None)
        self.averages: list[dict[str, torch.Tensor]] = [_zeroed(flat_fp32_views(self.slots)) for _ in self.gammas]
        self._has_companion = companion is not None
        self._plan(companion, block_numel)

    def _plan(self, companion: Mapping[str, torch.Tensor] | None, block_numel: int) -> None:
        columns = [*self.averages, *([companion] if companion is not None else [])]
        fp32: list[list[torch.Tensor]] = []
        low: list[list[torch.Tensor]] = []
        for s in self.slots:
            if s.source.numel():
                row = [s.source, *(c[s.name] for c in columns)]
                (fp32 if s.source.dtype == torch.float32 else low).append(row)
        self._blocks: list[_Block] = []
        for rows, cast in ((fp32, False), (low, True)):
            pieces_by_device: dict[torch.device, list[list[torch.Tensor]]] = {}
            for row in _merge(rows):
                pieces_by_device.setdefault(row[0].device, []).extend(_cut(row, block_numel))
            for device, pieces in pieces_by_device.items():
                size = max(min(block_numel, sum(p[0].numel() for p in pieces)), max(p[0].numel() for p in pieces))
                scratch = torch.empty(size, dtype=torch.float32, device=device) if cast else None
                block: list[list[torch.Tensor]] = []
                used = 0
                for piece in pieces:
                    if used + piece[0].numel() > size and block:
                        self._blocks.append(self._block(block, scratch))
                        block, used = [], 0
                    block.append(piece)
                    used += piece[0].numel()
                if block:
                    self._blocks.append(self._block(block, scratch))

    @staticmethod
    def _block(pieces: list[list[torch.Tensor]], scratch: torch.Tensor | None) -> _Block:
        sources = [p[0] for p in pieces]
        casts: list[torch.Tensor] | None = None
        if scratch is not None:
            casts, used = [], 0
            for s in sources:
                casts.append(scratch[used : used + s.numel()].view(s.shape))
                used += s.numel()
        columns = len(pieces[0]) - 1
        return _Block(sources, casts, [[p[1 + j] for p in pieces] for j in range(columns)])

    # ---- the averages ---------------------------------------------------------------------------------------------
    @property
    def local_numel(self) -> int:
        """fp32 elements held by this rank for all profiles together."""
        return sum(a.numel() for avg in self.averages for a in avg.values())

    @torch.no_grad()
    def update(self, t: int, ema_weight: float | None = None, *, read: bool = True) -> None:
        """Fold the sources in as the weights after optimizer step ``t`` (1 for the first); with ``ema_weight``, the
        companion (classic EMA) gets ``ema <- ema + ema_weight * (theta - ema)`` in the same pass. ``read=False``
        skips ``before_read`` (the caller just ran it)."""
        if ema_weight is not None and not self._has_companion:
            raise ValueError("PowerProfiles.update got an ema_weight but no companion averages were given")
        weights = [1.0 - power_beta(t, g) for g in self.gammas]
        if ema_weight is not None:
            weights.append(float(ema_weight))
        if read:
            self._before_read()
        for block in self._blocks:
            inputs = block.sources
            if block.scratch is not None:
                torch._foreach_copy_(block.scratch, block.sources)
                inputs = block.scratch
            targets: list[torch.Tensor] = []
            sources: list[torch.Tensor] = []
            scalars: list[float] = []
            for j, w in enumerate(weights):
                targets += block.targets[j]
                sources += inputs
                scalars += [w] * len(inputs)
            torch._foreach_lerp_(targets, sources, scalars)
        self.t = t

    @torch.no_grad()
    def reset(self, t: int) -> None:
        """Every profile becomes a copy of the sources, as if the weights had been these at every step up to ``t``."""
        self._before_read()
        for avg in self.averages:
            for s in self.slots:
                avg[s.name].copy_(s.source)
        self.t = t

    def state_dict(self) -> list[dict[str, torch.Tensor]]:
        """Per profile, the averages by slot name (views of the buffers)."""
        return [dict(a) for a in self.averages]

    @torch.no_grad()
    def load_state_dict(self, state: Sequence[Mapping[str, torch.Tensor]], t: int) -> None:
        """Restore what `state_dict` gave (names and shapes must match) at optimizer step ``t``."""
        if len(state) != len(self.averages):
            raise ValueError(f"post-hoc state holds {len(state)} profiles; this run tracks {len(self.averages)}")
        for k, (saved, avg) in enumerate(zip(state, self.averages, strict=True)):
            missing = sorted(set(avg) - set(saved))
            unexpected = sorted(set(saved) - set(avg))
            shapes = [n for n in avg if n in saved and tuple(saved[n].shape) != tuple(avg[n].shape)]
            if missing or unexpected or shapes:
                raise ValueError(
                    f"post-hoc profile {k} does not match this model: missing {missing[:10]}, unexpected "
                    f"{unexpected[:10]}, shape mismatches {shapes[:10]}"
                )
            for n, a in avg.items():
                a.copy_(saved[n])
        self.t = t
