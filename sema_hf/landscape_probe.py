"""Raw vs EMA landscape measurements at each switch: loss, sharpness (and flatness) of both weight sets.

`LandscapeProbe` holds what must stay fixed across measurements (the batches, the power-iteration budget, the
perturbation radius and seeds) and measures the model twice: once as it is (the raw weights the optimizer trained)
and once with the EMA weights swapped in. ``SEMACallback(landscape=LandscapeProbe(batches))`` calls it just before
every switch and logs the result through the Trainer, so the paper's claim (the EMA sits in a flatter region, and
switching moves training there) can be read off TensorBoard/W&B next to the eval curves.

Both weight sets see the same batches, the same power-iteration start vector and the same perturbation
directions, so their difference is the weights' doing, not sampling noise.

Cost per measurement, in forward+backward passes over the ``B`` fixed batches: 2 x (1 forward for the loss,
about 2 x ``sharpness_iterations`` for the Hessian-vector products, ``flatness_samples`` forwards). With B = 2 and
10 iterations that is about 80 batch passes: keep the batches few and small on large models. Single-process
models only (one process or DDP, where each rank measures its own full copy); sharded engines are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .landscape import LossFn, _model_device, _to_device, fixed_batches, flatness, mean_loss, top_hessian_eigenvalue

PREFIX = "landscape"


@dataclass
class LandscapeProbe:
    """Measure loss, sharpness and optionally flatness of the raw and the EMA weights on fixed batches.

    Example::

        probe = LandscapeProbe(fixed_batches(trainer.get_eval_dataloader(), 2), sharpness_iterations=10)
        Trainer(..., callbacks=[SEMACallback(landscape=probe)])

    Logged at every switch (floats): ``landscape_raw_loss``, ``landscape_ema_loss``, ``landscape_raw_sharpness``,
    ``landscape_ema_sharpness`` and, with ``flatness_radius > 0``, ``landscape_raw_flatness``,
    ``landscape_ema_flatness`` (mean loss increase under random filter-normalized perturbations; lower = flatter).
    Sharpness is the Hessian eigenvalue of largest magnitude (see `sema_hf.landscape.top_hessian_eigenvalue`).
    """

    batches: Iterable[Any]
    """A list of batches (dicts the model takes as ``model(**batch)``, with labels), or a DataLoader with
    ``num_batches``. Materialized once: every measurement averages over exactly these batches."""
    num_batches: int | None = None
    """How many batches to take from ``batches`` (required for a DataLoader)."""
    sharpness_iterations: int = 10
    """Power-iteration steps for the sharpness (each about 2 backward passes per batch); 0 = no sharpness."""
    sharpness_tol: float = 1e-3
    """Relative change at which power iteration stops early; 0 runs all ``sharpness_iterations``."""
    flatness_radius: float = 0.0
    """Perturbation radius relative to each filter's norm (0.01-0.1 typical); 0 = no flatness."""
    flatness_samples: int = 8
    """Random directions averaged for the flatness (one loss evaluation each); used when ``flatness_radius > 0``."""
    seed: int = 0
    """Seeds the power-iteration start vector and the perturbation directions (the same for raw and EMA)."""
    loss_fn: LossFn | None = None
    """``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``."""
    _on_device: tuple[torch.device | None, list[Any]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.batches = fixed_batches(self.batches, self.num_batches)
        if self.sharpness_iterations < 0:
            raise ValueError(f"sharpness_iterations must be >= 0 (0 = off), got {self.sharpness_iterations!r}")
        if self.sharpness_tol < 0:
            raise ValueError(f"sharpness_tol must be >= 0, got {self.sharpness_tol!r}")
        if self.flatness_radius < 0:
            raise ValueError(f"flatness_radius must be >= 0 (0 = off), got {self.flatness_radius!r}")
        if self.flatness_radius > 0 and self.flatness_samples < 1:
            raise ValueError(
                f"flatness_samples must be >= 1 when flatness_radius > 0, got {self.flatness_samples!r}; "
                "set flatness_radius=0 to turn flatness off"
            )

    def measure(self, model: nn.Module, swapped_in: Callable[[], AbstractContextManager[Any]]) -> dict[str, float]:
        """Measure the model's current (raw) weights, then the EMA weights inside ``swapped_in()``.

        Args:
            model: the single-process model (the one whose parameters ``swapped_in`` writes).
            swapped_in: zero-argument callable returning a context manager inside which the model holds the EMA
                weights (``EMAStore.swapped_in`` / ``SEMACallback.swapped_in``); it must restore the raw weights.

        Returns:
            ``{"landscape_raw_loss": ..., "landscape_ema_loss": ..., ...}``: plain floats the Trainer can log.
        """
        batches = self._batches_on(_model_device(model))
        out = {f"{PREFIX}_raw_{k}": v for k, v in self._measure_one(model, batches).items()}
        with swapped_in():
            out.update({f"{PREFIX}_ema_{k}": v for k, v in self._measure_one(model, batches).items()})
        return out

    def _measure_one(self, model: nn.Module, batches: list[Any]) -> dict[str, float]:
        values: dict[str, float] = {}
        if self.flatness_radius > 0:
            flat = flatness(
                model,
                batches,
                radius=self.flatness_radius,
                num_samples=self.flatness_samples,
                seed=self.seed,
                loss_fn=self.loss_fn,
            )
            values["loss"] = flat.base_loss  # the unperturbed loss: no second pass needed
            values["flatness"] = flat.mean
        else:
            values["loss"] = mean_loss(model, batches, loss_fn=self.loss_fn)
        if self.sharpness_iterations > 0:
            values["sharpness"] = float(
                top_hessian_eigenvalue(
                    model,
                    batches,
                    loss_fn=self.loss_fn,
                    max_iterations=self.sharpness_iterations,
                    tol=self.sharpness_tol,
                    seed=self.seed,
                )
            )
        return values

    def _batches_on(self, device: torch.device | None) -> list[Any]:
        """The fixed batches moved to ``device`` once, and kept there for the next measurement."""
        if self._on_device is None or self._on_device[0] != device:
            moved = self.batches if device is None else [_to_device(b, device) for b in self.batches]
            self._on_device = (device, moved)
        return self._on_device[1]
