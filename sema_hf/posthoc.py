"""Post-hoc EMA: choose the averaging profile after training, from snapshots of power-function profiles.

The maths (Karras et al., EDM2, arXiv 2312.02696, section 3 and appendix; written out in DESIGN.md "Post-hoc EMA,
exactly"). A power-function EMA profile with exponent ``gamma`` averages the weights after optimizer steps
``1..t`` with weights proportional to ``tau^gamma``; it is updated after every optimizer step ``t`` counted from 1::

    avg_t = beta_t * avg_{t-1} + (1 - beta_t) * theta_t        beta_t = (1 - 1/t) ** (gamma + 1)

(`sema_hf.profiles` runs it, on each rank's own shard). Its relative width is
``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``; from ``sigma_rel``, ``gamma`` is the largest real
root of ``g^3 + 7 g^2 + (16 - sigma_rel^-2) g + (12 - sigma_rel^-2) = 0``: 0.05 -> 16.97, 0.10 -> 6.94. The width
grows with ``t``: the profile always covers the same fraction of the run so far.

Reconstruction. A snapshot ``i`` (profile ``gamma_i`` saved at step ``t_i``) is treated as the continuous profile
``p_i(tau) = (gamma_i + 1) tau^gamma_i / t_i^(gamma_i + 1)`` on ``[0, t_i]``. Any target profile ``q`` is fitted by
least squares in L2: ``A x = b`` with ``A_ij = <p_i, p_j>`` (closed form,
``(g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (t_a / t_b)^g_b / t_b`` for ``t_a <= t_b``) and ``b_i = <p_i, q>``, solved in
float64, ``x`` normalised to sum 1. The average is ``sum_i x_i * snapshot_i``, element by element: each rank
combines its own shard with the same ``x`` and nothing is gathered. The fit is reported as the relative L2 error
``||sum_i x_i p_i - q|| / ||q||`` and the amplification ``sum_i |x_i|`` (how much the snapshots' rounding grows).
A target that is a snapshot (a tracked ``sigma_rel`` at a snapshot step) is that snapshot, exactly.

Targets:

* ``sigma_rel``: the power-function profile of that width at step ``T`` (the last snapshot, or ``step``).
* ``horizon_steps=H`` (or ``horizon_epochs``, times the run's optimizer steps per epoch): the exponential EMA of
  horizon ``H`` (decay ``1 - 1/H``) at step ``T``, as the classic EMA of `sema_hf.SEMA` with no warmup, i.e. the
  density ``exp(-(T - tau)/H) / (H (1 - exp(-T/H)))`` on ``[0, T]``. It is NOT a power-function profile: its width
  is fixed while a power profile's grows with ``t``. Near ``T`` a power profile is ``exp(gamma ln(tau/T)) ~
  exp(-gamma (T - tau)/T)``, so an exponential EMA of horizon ``H`` at step ``T`` resembles ``gamma ~ T/H - 1``,
  i.e. ``sigma_rel ~ H/T``. Its inner products with the snapshots are computed numerically (256-point
  Gauss-Legendre, float64) and it is fitted by the same least squares.

Which targets are reachable, and how accurately, from the default tracked profiles (0.05, 0.10) with snapshots at
``k`` evenly spaced steps of a run of ``T`` steps (relative L2 error of the fitted profile, then ``sum |x_i|``;
``bench/posthoc_fit.py`` prints this table; it does not depend on ``T``, only on the ratios):

    k     | sigma_rel 0.03  0.07        0.2         | H = 0.01 T   0.02 T      0.05 T     0.1 T      0.3 T
    ------+-----------------------------------------+-----------------------------------------------------------
    8     | 0.10 (5)        0.013 (1)   0.078 (2)   | 0.53 (14)    0.27 (9)    0.019 (2)  0.005 (1)  0.086 (2)
    16    | 0.039 (8)       0.004 (1)   0.023 (2)   | 0.37 (35)    0.13 (17)   0.007 (2)  0.002 (1)  0.040 (2)
    32    | 0.011 (15)      0.001 (2)   0.006 (2)   | 0.16 (278)   0.043 (56)  0.002 (3)  4e-4 (1)   0.023 (2)
    64    | 0.003 (15)      2e-4 (2)    0.002 (2)   | 0.053 (276)  0.012 (56)  5e-4 (3)   1e-4 (1)   0.015 (2)
    128   | 7e-4 (15)       6e-5 (2)    4e-4 (2)    | 0.015 (276)  0.003 (56)  1e-4 (3)   <5e-5 (1)  0.010 (2)
    256   | 2e-4 (15)       <5e-5 (2)   1e-4 (2)    | 0.004 (276)  8e-4 (56)   <5e-5 (3)  <5e-5 (1)  0.007 (2)

Exponential horizons fitted within 1% (5%), as ``H / T``: k = 8: 0.057-0.14 (0.041-0.22); 16: 0.048-0.18
(0.032-0.32); 32: 0.035-0.22 (0.019-0.41); 64: 0.022-0.26 (0.011-0.56); 128: 0.012-0.30 (0.005-0.77); 256:
0.006-0.33 (0.002-1.0). The fit improves about 4x for every doubling of k. In epochs, for a run of E epochs,
``H = (H / T) E``: with k = 64 snapshots of a 20-epoch run, 0.44 to 5.2 epochs within 1%.

A target whose fit error exceeds ``max_fit_error`` (default 0.05) is refused with an error naming the reachable
range. Snapshots every ``T/64`` or closer (``posthoc_every_steps``) reach exponential horizons from about ``0.02 T``
to ``0.26 T`` and power profiles from ``sigma_rel`` 0.02 to 0.25 within 1.5%. A short horizon late in a long run
(the study's 0.3 epoch of a 20-epoch run is ``0.015 T``) needs k >= 128 and combines the snapshots with large
positive and negative weights (``sum |x|`` about 56 at ``0.02 T``, 276 at ``0.01 T``): the snapshots' rounding is
amplified that much, which float32 snapshots (relative rounding 6e-8) absorb and bfloat16 ones (4e-3) do not; keep
``posthoc_dtype="float32"`` there. Targets near the tracked widths (``sum |x|`` 1-3) are safe in bfloat16.

Files (written by `sema_hf.SEMA`, read here): in the post-hoc folder (``<output_dir>/sema_posthoc/`` under the
Trainer), every snapshot step writes one safetensors file per shard,
``posthoc-<step:09d>-<shard:05d>-of-<shards:05d>.safetensors``, holding every profile's averages of that rank as
``posthoc<k>/<slot name>`` in ``posthoc_dtype``, with a header carrying the format, the series id, the step, the
profiles, and the rank's `Layout` (ranges of each flattened parameter, as in EMA checkpoints: re-shardable). The
index ``sema_posthoc.json`` (rank 0, atomic, rewritten at each snapshot) records the series id, engine, world
size, parameters, steps per epoch, profiles (``sigma_rel``, ``gamma``), dtype and the list of snapshot steps.

Command line::

    python -m sema_hf.posthoc OUTPUT_DIR --sigma_rel 0.07 --save DIR     # or --horizon_steps / --horizon_epochs

writes into ``DIR`` the model ``save_model`` wrote into ``OUTPUT_DIR`` (config, tokenizer, ...) with the
reconstructed weights (safetensors, in the saved weights' dtype).

This module imports neither the Trainer nor the core: only files, tensors and numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_write, layout_fingerprint, layout_pieces, raise_if_any_rank_failed
from .engines.base import Layout
from .engines.shards import cover_problems

logger = logging.getLogger(__name__)

FORMAT = "sema-hf-posthoc/1"
INDEX_NAME = "sema_posthoc.json"
FOLDER_NAME = "sema_posthoc"  # under the Trainer's output_dir
DEFAULT_MAX_FIT_ERROR = 0.05
MIN_SNAPSHOT_STEPS = 2  # a target other than a snapshot needs at least two snapshot steps to be fitted
# gamma > 0 (the profile weighs later weights more): sigma_rel < 1/sqrt(12), its value at gamma = 0.
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
_FILE_RE = re.compile(r"^posthoc-(\d{9})-(\d{5})-of-(\d{5})\.safetensors$")
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(256)


# ---- the maths -----------------------------------------------------------------------------------------------------
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function profile of relative width ``sigma_rel`` in ``(0, 1/sqrt(12))``."""
    if not (isinstance(sigma_rel, float | int) and 0.0 < sigma_rel < SIGMA_REL_MAX):
        raise ValueError(
            f"sigma_rel = {sigma_rel!r} is invalid: expected a number in (0, {SIGMA_REL_MAX:.4f}) (the width of a "
            "power-function profile with exponent > 0; EDM2 tracks 0.05 and 0.10)"
        )
    s2 = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9 * max(1.0, s2)].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma``."""
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def power_inner(t_a: Any, g_a: Any, t_b: Any, g_b: Any) -> np.ndarray:
    """``<p_a, p_b>`` of continuous power profiles (exponent ``g``, ending at step ``t``), element-wise in float64."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    t_a, g_a, t_b, g_b = np.broadcast_arrays(t_a, g_a, t_b, g_b)
    swap = t_a > t_b
    lo_t, hi_t = np.where(swap, t_b, t_a), np.where(swap, t_a, t_b)
    lo_g, hi_g = np.where(swap, g_b, g_a), np.where(swap, g_a, g_b)
    return (lo_g + 1) * (hi_g + 1) / (lo_g + hi_g + 1) * (lo_t / hi_t) ** hi_g / hi_t


def exponential_inner(t: Any, g: Any, end: float, horizon: float) -> np.ndarray:
    """``<p, q>`` of power profiles ``(g, t)`` with the exponential-EMA density of horizon ``H`` ending at step
    ``T``, ``q(tau) = exp(-(T - tau)/H) / (H (1 - exp(-T/H)))`` on ``[0, T]`` (``t <= T``), in float64.

    With ``tau = t - H w``: ``(g + 1)/t * exp(-(T - t)/H) / (1 - exp(-T/H)) * int_0^{t/H} (1 - w H/t)^g e^-w dw``;
    the integrand is smooth (``g > 0``) and negligible past ``w = 80``, so 256 Gauss-Legendre nodes on
    ``[0, min(t/H, 80)]`` give it to float64 rounding."""
    t, g = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(g, dtype=np.float64))
    a = t / horizon
    upper = np.minimum(a, 80.0)
    w = (_GL_NODES[None, :] + 1.0) / 2.0 * upper[:, None]
    weights = _GL_WEIGHTS[None, :] / 2.0 * upper[:, None]
    integral = (weights * np.clip(1.0 - w / a[:, None], 0.0, None) ** g[:, None] * np.exp(-w)).sum(axis=1)
    return (g + 1.0) / t * np.exp(-(end - t) / horizon) / -np.expm1(-end / horizon) * integral


def exponential_norm2(end: float, horizon: float) -> float:
    """``<q, q>`` of the exponential-EMA density of horizon ``H`` ending at step ``T``."""
    e = math.exp(-end / horizon)
    return (1.0 + e) / (2.0 * horizon * -math.expm1(-end / horizon))


@dataclass(frozen=True)
class Target:
    """What to reconstruct: a power-function profile (``sigma_rel``) or an exponential EMA (``horizon_steps``,
    possibly given as ``horizon_epochs``) at optimizer step ``step``."""

    step: int
    sigma_rel: float | None = None
    horizon_steps: float | None = None
    horizon_epochs: float | None = None

    @property
    def gamma(self) -> float | None:
        return None if self.sigma_rel is None else sigma_rel_to_gamma(self.sigma_rel)

    def describe(self) -> str:
        if self.sigma_rel is not None:
            return f"power-function EMA sigma_rel={self.sigma_rel:g} (gamma {self.gamma:.4g}) at step {self.step}"
        epochs = "" if self.horizon_epochs is None else f" = {self.horizon_epochs:g} epochs"
        return f"exponential EMA horizon {self.horizon_steps:g} steps{epochs} at step {self.step}"

    @property
    def continuous_horizon(self) -> float:
        """The exponential density's scale ``-1 / ln(1 - 1/H)`` (about ``H - 1/2``): its integral over each unit
        step ``(tau - 1, tau]`` is exactly the discrete EMA's weight ``(1/H) (1 - 1/H)^(T - tau)``, as a power
        profile's integral over ``(tau - 1, tau]`` is its discrete weight."""
        assert self.horizon_steps is not None
        return -1.0 / math.log1p(-1.0 / self.horizon_steps)

    def inner(self, steps: np.ndarray, gammas: np.ndarray) -> np.ndarray:
        if self.sigma_rel is not None:
            return power_inner(steps, gammas, float(self.step), self.gamma)
        return exponential_inner(steps, gammas, float(self.step), self.continuous_horizon)

    def norm2(self) -> float:
        if self.sigma_rel is not None:
            g = self.gamma
            return (g + 1.0) ** 2 / (2.0 * g + 1.0) / self.step
        return exponential_norm2(float(self.step), self.continuous_horizon)


@dataclass
class FitReport:
    """How a target was fitted: the snapshots used (``(step, sigma_rel)``), their weights ``x`` (sum 1), the
    relative L2 error of ``sum x_i p_i`` against the target profile and ``sum |x_i|``."""

    target: Target
    snapshots: list[tuple[int, float]]
    weights: list[float]
    relative_error: float
    amplification: float
    exact: bool = False  # the target is one of the snapshots

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": asdict(self.target),
            "description": self.target.describe(),
            "snapshots": [list(s) for s in self.snapshots],
            "weights": self.weights,
            "relative_error": self.relative_error,
            "amplification": self.amplification,
            "exact": self.exact,
        }

    def __str__(self) -> str:
        largest = sorted(zip(self.weights, self.snapshots, strict=True), key=lambda p: -abs(p[0]))[:6]
        shown = ", ".join(f"{w:+.4f} x (step {s}, sigma_rel {r:g})" for w, (s, r) in largest)
        return (
            f"{self.target.describe()}: relative L2 error of the fitted profile {self.relative_error:.2e}, "
            f"sum |x| {self.amplification:.3g}, {len(self.snapshots)} snapshots; largest weights: {shown}"
        )


class ReconstructedState(dict):
    """The reconstructed fp32 weights by name (a ``dict``) that also carries the `FitReport` as ``.report``."""

    report: FitReport

    def __init__(self, tensors: Mapping[str, torch.Tensor], report: FitReport) -> None:
        super().__init__(tensors)
        self.report = report


def solve(
    snapshots: Sequence[tuple[int, float]],
    target: Target,
    *,
    max_fit_error: float | None = DEFAULT_MAX_FIT_ERROR,
    sigma_rels: Sequence[float] | None = None,
) -> FitReport:
    """Least-squares weights of ``snapshots`` (``(step, gamma)``) for ``target``, in float64.

    Only snapshots at or before ``target.step`` are used. Raises ``ValueError`` when fewer snapshots than the fit
    needs are there, or (``max_fit_error``) when the fitted profile misses the target by more than that relative
    L2 error, naming the range that is reachable. ``sigma_rels`` only labels the report (default: from gamma)."""
    labels = list(sigma_rels) if sigma_rels is not None else [gamma_to_sigma_rel(g) for _, g in snapshots]
    used = [(int(t), float(g), float(s)) for (t, g), s in zip(snapshots, labels, strict=True) if t <= target.step]
    if not used:
        raise ValueError(
            f"post-hoc EMA: no snapshot at or before step {target.step} to reconstruct {target.describe()} from "
            f"(snapshot steps: {sorted({int(t) for t, _ in snapshots})})"
        )
    if target.sigma_rel is not None:
        g = target.gamma
        for i, (t, gi, s) in enumerate(used):
            if t == target.step and abs(gi - g) <= 1e-9 * max(1.0, g):
                weights = [0.0] * len(used)
                weights[i] = 1.0
                return FitReport(target, [(t, s) for t, _, s in used], weights, 0.0, 1.0, exact=True)
    if len({t for t, _, _ in used}) < MIN_SNAPSHOT_STEPS:
        raise ValueError(
            f"post-hoc EMA: {target.describe()} needs snapshots at {MIN_SNAPSHOT_STEPS} or more steps to be fitted, "
            f"but there are {len({t for t, _, _ in used})} at or before step {target.step} (steps "
            f"{sorted({t for t, _, _ in used})}): set posthoc_every_steps to a fraction of the run (e.g. run length "
            "/ 64) so that snapshots are written during training, or ask for a tracked sigma_rel at a snapshot step."
        )
    basis = SnapshotBasis([t for t, _, _ in used], [g for _, g, _ in used])
    x, error = basis.fit(target)
    report = FitReport(
        target, [(t, s) for t, _, s in used], [float(v) for v in x], error, float(np.abs(x).sum()), exact=False
    )
    if max_fit_error is not None and not error <= max_fit_error:
        raise ValueError(
            f"post-hoc EMA: {target.describe()} is outside the range the snapshots reach: the best fit misses it by "
            f"{error:.1%} (relative L2 error of the profile; max_fit_error = {max_fit_error:g}). "
            f"{basis.reachable(target.step, max_fit_error)} Ask for a target in that range, or snapshot more often "
            "(posthoc_every_steps) or track other posthoc_sigma_rels."
        )
    return report


class SnapshotBasis:
    """The snapshots' Gram matrix ``A``, decomposed once (``A = V diag(w) V^T``), so that many targets are fitted
    cheaply: ``x = A^+ b`` (the minimum-norm least-squares solution, eigenvalues below ``N eps max(w)`` dropped, as
    ``numpy.linalg.lstsq`` does), normalised to sum 1."""

    def __init__(self, steps: Sequence[int], gammas: Sequence[float]) -> None:
        self.steps = np.asarray(steps, dtype=np.float64)
        self.gammas = np.asarray(gammas, dtype=np.float64)
        self.a = power_inner(self.steps[:, None], self.gammas[:, None], self.steps[None, :], self.gammas[None, :])
        w, self.v = np.linalg.eigh(self.a)
        keep = w > len(w) * np.finfo(np.float64).eps * w.max()
        self.inverse = np.where(keep, 1.0 / np.where(keep, w, 1.0), 0.0)

    def fit(self, target: Target) -> tuple[np.ndarray, float]:
        b = target.inner(self.steps, self.gammas)
        x = self.v @ (self.inverse * (self.v.T @ b))
        x = x / x.sum()
        norm2 = target.norm2()
        residual = float(x @ self.a @ x - 2.0 * x @ b + norm2)
        return x, math.sqrt(max(residual, 0.0) / norm2)

    def reachable(self, step: int, max_fit_error: float) -> str:
        """A sentence naming the ``sigma_rel`` and exponential horizons (steps) fitted within ``max_fit_error`` at
        ``step`` (scanned on log grids)."""
        sigmas = [
            s for s in np.geomspace(0.005, 0.28, 60) if self.fit(Target(step, sigma_rel=float(s)))[1] <= max_fit_error
        ]
        horizons = [
            h
            for h in np.geomspace(0.002, 1.0, 60) * step
            if h > 1 and self.fit(Target(step, horizon_steps=float(h)))[1] <= max_fit_error
        ]
        parts = [
            f"sigma_rel {sigmas[0]:.3g} to {sigmas[-1]:.3g}" if sigmas else "no sigma_rel",
            f"exponential horizons {horizons[0]:.4g} to {horizons[-1]:.4g} steps"
            if horizons
            else "no exponential horizon",
        ]
        return f"Reachable at step {step} within {max_fit_error:g}: {' and '.join(parts)}."


# ---- files ---------------------------------------------------------------------------------------------------------
def snapshot_file_name(step: int, shard: int, num_shards: int) -> str:
    """File of shard ``shard`` (0-based) of ``num_shards`` of the snapshot at optimizer step ``step``."""
    return f"posthoc-{step:09d}-{shard + 1:05d}-of-{num_shards:05d}.safetensors"


def profile_key(k: int, name: str) -> str:
    """Name of profile ``k``'s average of slot ``name`` in snapshot files (and in EMA checkpoints)."""
    return f"posthoc{k}/{name}"


def write_snapshot(
    directory: str,
    step: int,
    profiles: Sequence[Mapping[str, torch.Tensor]],
    layout: Layout,
    index: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    writer: bool = True,
) -> None:
    """Write this rank's snapshot of every profile at ``step`` (every rank calls it; sharded engines write one
    file per rank, unsharded ones one file by the ``writer``), then (``writer``) the index. ``index`` is the index
    to write (the caller keeps its list of steps).

    Every rank waits for the snapshot files before the index is written, and for the index before returning; each
    wait is `raise_if_any_rank_failed`, so a write that fails on one rank (a full disk) raises on every rank,
    naming it, instead of leaving the others in a barrier. The index then does not list the step."""
    num_shards = layout.world_size if layout.sharded else 1
    error: BaseException | None = None
    try:
        os.makedirs(directory, exist_ok=True)
        if layout.sharded or writer:
            shard = layout.rank if layout.sharded else 0
            tensors = {
                profile_key(k, name): t.detach().to("cpu", dtype=dtype, copy=True).contiguous()
                for k, averages in enumerate(profiles)
                for name, t in averages.items()
            }
            header = {
                "format": FORMAT,
                "series_id": str(index["series_id"]),
                "step": str(step),
                "profiles": json.dumps(index["profiles"]),
                "layout": json.dumps(asdict(layout)),
                "fingerprint": layout_fingerprint(layout),
            }
            atomic_write(
                os.path.join(directory, snapshot_file_name(step, shard, num_shards)),
                lambda tmp: save_file(tensors, tmp, metadata=header),
            )
    except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
        error = err
    raise_if_any_rank_failed(error, f"write its post-hoc snapshot of step {step} into {directory!r}")
    if writer:
        try:
            write_index(directory, index)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = err
    raise_if_any_rank_failed(error, f"write {INDEX_NAME} into {directory!r}")


def write_index(directory: str, index: Mapping[str, Any]) -> None:
    """Write the index atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, **index}, f, indent=1)

    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, INDEX_NAME), write)


def read_index(directory: str) -> dict[str, Any]:
    """The index of a post-hoc folder (``OUTPUT_DIR`` is accepted for ``OUTPUT_DIR/sema_posthoc``)."""
    directory = resolve_folder(directory)
    path = os.path.join(directory, INDEX_NAME)
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown post-hoc format {index.get('format')!r}; this sema_hf reads {FORMAT!r}")
    return index


def resolve_folder(directory: str) -> str:
    """``directory`` if it holds the index, else ``directory/sema_posthoc`` if that does; a clear error otherwise."""
    for candidate in (directory, os.path.join(directory, FOLDER_NAME)):
        if os.path.isfile(os.path.join(candidate, INDEX_NAME)):
            return candidate
    raise FileNotFoundError(
        f"No post-hoc EMA snapshots in {directory!r} (no {INDEX_NAME} there or in {FOLDER_NAME}/): train with "
        "SEMAConfig(posthoc_every_steps=...) (the Trainer writes them to <output_dir>/sema_posthoc/, a loop to "
        "SEMA(..., posthoc_dir=...))."
    )


def snapshot_files(directory: str) -> dict[int, list[tuple[int, int, str]]]:
    """Snapshot files in ``directory`` by step: ``[(shard, num_shards, file name)]``."""
    out: dict[int, list[tuple[int, int, str]]] = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        m = _FILE_RE.match(name)
        if m:
            out.setdefault(int(m.group(1)), []).append((int(m.group(2)) - 1, int(m.group(3)), name))
    return out


def remove_snapshots_after(directory: str, step: int, layout: Layout, *, writer: bool) -> list[int]:
    """Delete this rank's snapshot files written after ``step`` (a killed run's, past the checkpoint it resumes
    from), so that the resumed run's snapshots replace them. Returns the steps removed."""
    removed = set()
    shard = layout.rank if layout.sharded else 0
    for t, files in snapshot_files(directory).items():
        if t <= step:
            continue
        for k, _, name in files:
            if k == shard and (layout.sharded or writer):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(directory, name))
                removed.add(t)
    return sorted(removed)


def _open(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"post-hoc EMA: {what} {path!r} is missing")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"post-hoc EMA: {what} {path!r} cannot be read (truncated or damaged?): {err}") from None


def _check_header(path: str, meta: Mapping[str, str], index: Mapping[str, Any], step: int) -> dict[str, Any]:
    if meta.get("format") != FORMAT:
        raise ValueError(f"post-hoc EMA: {path!r} is not a snapshot of format {FORMAT!r} ({meta.get('format')!r})")
    if meta.get("series_id") != index["series_id"]:
        raise ValueError(
            f"post-hoc EMA: {path!r} belongs to another run (series {meta.get('series_id')!r}) than the index "
            f"{INDEX_NAME} (series {index['series_id']!r}): the folder mixes the snapshots of two runs. Keep one "
            "run's snapshots per folder (a fresh run needs its own output_dir or posthoc_dir)."
        )
    if int(meta.get("step", -1)) != step:
        raise ValueError(f"post-hoc EMA: {path!r} says step {meta.get('step')}, its name says {step}")
    return json.loads(meta["layout"])


def check_folder(directory: str) -> tuple[str, dict[str, Any]]:
    """The folder and its index, after checking that every file belongs to the index's run and every snapshot
    step the index lists has all its shard files."""
    directory = resolve_folder(directory)
    index = read_index(directory)
    files = snapshot_files(directory)
    num_shards = int(index["num_shards"])
    for step, entries in files.items():
        for _, _, name in entries:
            path = os.path.join(directory, name)
            with _open(path, "snapshot file") as f:
                _check_header(path, f.metadata() or {}, index, step)
    for step in index["steps"]:
        have = {k for k, n, _ in files.get(int(step), []) if n == num_shards}
        missing = [snapshot_file_name(int(step), k, num_shards) for k in range(num_shards) if k not in have]
        if missing:
            raise FileNotFoundError(
                f"post-hoc EMA: the snapshot at step {step} in {directory!r} is incomplete: {missing} missing "
                f"(the index {INDEX_NAME} lists it with {num_shards} shard files)"
            )
    return directory, index


def target_of(
    index: Mapping[str, Any],
    sigma_rel: float | None,
    horizon_steps: float | None,
    horizon_epochs: float | None,
    step: int | None,
) -> Target:
    """The `Target` the arguments name, checked (exactly one of the three; ``step`` defaults to the last
    snapshot)."""
    given = [
        n
        for n, v in (("sigma_rel", sigma_rel), ("horizon_steps", horizon_steps), ("horizon_epochs", horizon_epochs))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"post-hoc EMA: give exactly one of sigma_rel, horizon_steps, horizon_epochs (got {given or 'none'})"
        )
    steps = sorted(int(s) for s in index["steps"])
    if not steps:
        raise ValueError("post-hoc EMA: the folder's index lists no snapshot yet")
    end = steps[-1] if step is None else int(step)
    if end < 1 or end > steps[-1]:
        raise ValueError(f"post-hoc EMA: step = {step!r} is invalid: expected a step in [1, {steps[-1]}]")
    if sigma_rel is not None:
        sigma_rel_to_gamma(sigma_rel)  # validates
        return Target(end, sigma_rel=float(sigma_rel))
    if horizon_epochs is not None:
        per_epoch = index.get("steps_per_epoch")
        if not per_epoch:
            raise ValueError(
                "post-hoc EMA: horizon_epochs needs the run's optimizer steps per epoch, which this run did not "
                "record (a loop without steps_per_epoch=): give horizon_steps instead"
            )
        if not (isinstance(horizon_epochs, float | int) and horizon_epochs > 0):
            raise ValueError(f"post-hoc EMA: horizon_epochs = {horizon_epochs!r} is invalid: expected a number > 0")
        return Target(end, horizon_steps=float(horizon_epochs) * per_epoch, horizon_epochs=float(horizon_epochs))
    if not (isinstance(horizon_steps, float | int) and horizon_steps > 1):
        raise ValueError(f"post-hoc EMA: horizon_steps = {horizon_steps!r} is invalid: expected a number > 1")
    return Target(end, horizon_steps=float(horizon_steps))


def fit_index(index: Mapping[str, Any], target: Target, max_fit_error: float | None) -> FitReport:
    """Solve for ``target`` over every (snapshot step, profile) of ``index``."""
    profiles = index["profiles"]
    snaps = [(int(t), float(p["gamma"])) for t in sorted(int(s) for s in index["steps"]) for p in profiles]
    labels = [float(p["sigma_rel"]) for _ in index["steps"] for p in profiles]
    return solve(snaps, target, max_fit_error=max_fit_error, sigma_rels=labels)


def _terms(index: Mapping[str, Any], report: FitReport) -> list[tuple[float, int, int]]:
    """``(weight, step, profile index)`` of every snapshot the fit uses (weight not 0)."""
    profile_of = {round(float(p["sigma_rel"]), 12): k for k, p in enumerate(index["profiles"])}
    return [(w, t, profile_of[round(s, 12)]) for w, (t, s) in zip(report.weights, report.snapshots, strict=True) if w]


def combine(
    directory: str, index: Mapping[str, Any], report: FitReport, shard: int, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``sum_i x_i * snapshot_i`` of one shard's own files (the rank's slots ``names``), accumulated in float64,
    returned in fp32. Nothing is gathered: every rank does this with the same weights."""
    num_shards = int(index["num_shards"])
    terms = _terms(index, report)
    out: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[int, Any] = {}
        for _, t, _ in terms:
            if t not in handles:
                path = os.path.join(directory, snapshot_file_name(t, shard, num_shards))
                handles[t] = stack.enter_context(_open(path, "snapshot file"))
                _check_header(path, handles[t].metadata() or {}, index, t)
        for name in names:
            acc: torch.Tensor | None = None
            for w, t, k in terms:
                value = _get(handles[t], profile_key(k, name), t).to(torch.float64)
                acc = value.mul_(w) if acc is None else acc.add_(value, alpha=w)
            assert acc is not None
            out[name] = acc.to(torch.float32)
    return out


def _get(handle: Any, key: str, step: int) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, KeyError) as err:
        raise ValueError(f"post-hoc EMA: the snapshot at step {step} has no tensor {key!r} ({err})") from None


def reconstruct(
    posthoc_dir: str,
    sigma_rel: float | None = None,
    horizon_steps: float | None = None,
    horizon_epochs: float | None = None,
    step: int | None = None,
    *,
    max_fit_error: float | None = DEFAULT_MAX_FIT_ERROR,
) -> ReconstructedState:
    """The full fp32 average for one target, keyed like ``SEMA.ema_state_dict()``, in this one process, from the
    snapshot files of any world size and engine (each parameter is assembled from the ranges the files hold).

    Give exactly one of ``sigma_rel`` (a power-function profile), ``horizon_steps`` or ``horizon_epochs`` (an
    exponential EMA of that horizon); ``step`` (default: the last snapshot) is the step the average ends at. The
    result is a dict that carries the fit as ``.report`` (`FitReport`), also logged. Raises ``ValueError`` for a
    target the snapshots do not reach within ``max_fit_error`` (naming the range they reach), for files of
    another run in the folder or too few snapshots, ``FileNotFoundError`` for missing snapshot files."""
    directory, index = check_folder(posthoc_dir)
    target = target_of(index, sigma_rel, horizon_steps, horizon_epochs, step)
    report = fit_index(index, target, max_fit_error)
    logger.info(f"post-hoc EMA: {report}")
    num_shards = int(index["num_shards"])
    terms = _terms(index, report)
    shapes = {name: [int(d) for d in shape] for name, shape in index["params"]}
    out: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        opened: dict[tuple[int, int], tuple[Any, dict[str, tuple[int, int]]]] = {}
        files: list[tuple[float, int, int, Any, dict[str, tuple[int, int]]]] = []
        for w, t, k in terms:
            for shard in range(num_shards):
                if (t, shard) not in opened:  # one handle per file, shared by the profiles it holds
                    path = os.path.join(directory, snapshot_file_name(t, shard, num_shards))
                    handle = stack.enter_context(_open(path, "snapshot file"))
                    layout = _check_header(path, handle.metadata() or {}, index, t)
                    opened[(t, shard)] = (handle, {n: (a, b) for n, a, b in layout_pieces(layout)})
                files.append((w, t, k, *opened[(t, shard)]))
        for name, shape in shapes.items():
            numel = math.prod(shape)
            acc = torch.zeros(numel, dtype=torch.float64)
            covered: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for w, t, k, handle, pieces in files:
                if name not in pieces:
                    continue
                a, b = pieces[name]
                value = _get(handle, profile_key(k, name), t).reshape(-1).to(torch.float64)
                if value.numel() != b - a:
                    raise ValueError(f"post-hoc EMA: {name!r} at step {t} holds {value.numel()} elements, not {b - a}")
                acc[a:b].add_(value, alpha=w)
                covered.setdefault((t, k), []).append((a, b))
            for (t, _), ranges in covered.items():
                problems = cover_problems(0, numel, ranges)
                if problems:
                    raise ValueError(
                        f"post-hoc EMA: the snapshot files of step {t} do not cover {name!r} exactly once: "
                        f"{'; '.join(problems[:5])}"
                    )
            if len(covered) != len({(t, k) for _, t, k in terms}):
                raise ValueError(f"post-hoc EMA: {name!r} is missing from some snapshots")
            out[name] = acc.view(shape).to(torch.float32)
    return ReconstructedState(out, report)


# ---- command line --------------------------------------------------------------------------------------------------
_WEIGHT_FILE_RE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")


def save_reconstructed_model(output_dir: str, state: Mapping[str, torch.Tensor], save_dir: str) -> list[str]:
    """Copy the model ``save_model`` wrote into ``output_dir`` (its top-level files: config, tokenizer, weights
    index...) into ``save_dir``, with the weights of ``state`` in place of the saved ones (in their dtype). Returns
    the weight files written. Every tensor of ``state`` must be in the saved weights (same name and shape)."""
    weight_files = [
        n for n in sorted(os.listdir(output_dir)) if _WEIGHT_FILE_RE.match(n) and n.endswith(".safetensors")
    ]
    if not weight_files:
        raise FileNotFoundError(
            f"post-hoc EMA: no safetensors weights (model.safetensors or model-*-of-*.safetensors) in {output_dir!r}: "
            "save the model there first (trainer.save_model(), or save_pretrained with safe_serialization)"
        )
    if os.path.abspath(save_dir) == os.path.abspath(output_dir):
        raise ValueError("post-hoc EMA: --save must be another folder than OUTPUT_DIR (its weights would be replaced)")
    os.makedirs(save_dir, exist_ok=True)
    remaining = dict(state)
    for name in sorted(os.listdir(output_dir)):
        src = os.path.join(output_dir, name)
        if os.path.isfile(src) and name not in weight_files and not _WEIGHT_FILE_RE.match(name):
            shutil.copy2(src, os.path.join(save_dir, name))
    for file_name in weight_files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(os.path.join(output_dir, file_name), framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                saved = f.get_tensor(key)
                if key in remaining:
                    new = remaining.pop(key)
                    if tuple(new.shape) != tuple(saved.shape):
                        raise ValueError(
                            f"post-hoc EMA: {key!r} is {tuple(new.shape)} here, {tuple(saved.shape)} saved"
                        )
                    saved = new.to(saved.dtype)
                tensors[key] = saved.contiguous()
        atomic_write(
            os.path.join(save_dir, file_name), lambda tmp, t=tensors, m=metadata: save_file(t, tmp, metadata=m)
        )
    if remaining:
        raise ValueError(
            f"post-hoc EMA: the saved model in {output_dir!r} has no weights named {sorted(remaining)[:10]} (the "
            "averaged tensors): was it saved from this run's model?"
        )
    return weight_files


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sema_hf.posthoc",
        description="Reconstruct a post-hoc EMA from a run's snapshots and save it as a loadable model.",
    )
    parser.add_argument("output_dir", help="the run's output_dir (holding sema_posthoc/ and the saved model)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--sigma_rel", type=float, help="a power-function profile of this relative width")
    group.add_argument("--horizon_steps", type=float, help="an exponential EMA of this horizon (optimizer steps)")
    group.add_argument("--horizon_epochs", type=float, help="an exponential EMA of this horizon (epochs)")
    parser.add_argument("--step", type=int, default=None, help="the step the average ends at (default: the last)")
    parser.add_argument("--save", required=True, help="folder to write the model with the reconstructed weights into")
    parser.add_argument("--max_fit_error", type=float, default=DEFAULT_MAX_FIT_ERROR)
    parser.add_argument("--posthoc_dir", default=None, help="the snapshots' folder (default: OUTPUT_DIR/sema_posthoc)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state = reconstruct(
        args.posthoc_dir or args.output_dir,
        sigma_rel=args.sigma_rel,
        horizon_steps=args.horizon_steps,
        horizon_epochs=args.horizon_epochs,
        step=args.step,
        max_fit_error=args.max_fit_error,
    )
    written = save_reconstructed_model(args.output_dir, state, args.save)
    with open(os.path.join(args.save, "posthoc_fit.json"), "w") as f:
        json.dump(state.report.to_dict(), f, indent=1)
    print(f"{state.report}\nwrote {', '.join(written)} and posthoc_fit.json to {args.save}")


if __name__ == "__main__":
    main()
