"""Loss-landscape diagnostics: sharpness, flatness and the loss along the raw -> EMA line.

Pure functions over any ``nn.Module`` whose forward returns an object or dict with a ``loss`` (every transformers
model given ``labels``), or over any module with a user ``loss_fn(model, batch) -> scalar tensor``. They measure
the loss

    L(theta) = (1 / B) * sum_b L_b(theta)

averaged with equal weight over a FIXED list of B batches, so two calls (raw weights, EMA weights; two runs) see
the same objective. Pass a list of batches, or a DataLoader plus ``num_batches`` (the first ``num_batches`` batches
are taken; use `fixed_batches` once and reuse the list if the loader shuffles).

* `top_hessian_eigenvalue` (sharpness): the dominant eigenvalue of the Hessian H = d^2 L / d theta^2 over the
  trainable parameters, by power iteration on Hessian-vector products (Pearlmutter's trick, double backward);
  the Hessian itself is never formed. Memory: about two extra copies of the parameters plus a double-backward graph
  of one batch.
* `flatness`: E_d[L(theta + r * d) - L(theta)] over random filter-normalized directions d (Li et al. 2018,
  "Visualizing the Loss Landscape of Neural Nets"), with its standard deviation over the samples.
* `loss_profile`: L(raw + alpha * (ema - raw)) for a few alphas: alpha = 0 is the raw model, 1 the EMA, > 1 beyond.
* `mean_loss`: L(theta) itself; `plot_loss_profile`: a PNG of a profile (matplotlib imported only there).

Every function puts the model in eval mode (dropout off, so the loss is a deterministic function of the weights),
restores each submodule's own ``training`` flag afterwards, and leaves the parameters bit-for-bit as it found them,
also when it raises. Randomness comes only from a ``torch.Generator`` seeded by ``seed`` and drawn on the CPU, so a
result depends on the seed, not on the device or on the global RNG. These are single-process diagnostics: a sharded
model (FSDP, ZeRO-3) must be gathered first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .engines.names import canonical_name, unwrap_model

LossFn = Callable[[nn.Module, Any], torch.Tensor]

DEFAULT_ALPHAS: tuple[float, ...] = (-0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


# --------------------------------------------------------------------------------------------------------------------
# Batches and the loss
# --------------------------------------------------------------------------------------------------------------------


def fixed_batches(batches: Iterable[Any], num_batches: int | None = None) -> list[Any]:
    """Materialize the fixed list of batches every diagnostic averages over.

    Args:
        batches: a list/tuple of batches (used as is, or its first ``num_batches``), or any iterable of batches such
            as a DataLoader (its first ``num_batches`` are taken; ``num_batches`` is then required, since a loader
            may be endless or huge).
        num_batches: how many batches to keep; ``None`` keeps the whole list.

    Returns:
        A new list of batches. Raises ValueError if it would be empty.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    if isinstance(batches, (list, tuple)):
        out = list(batches if num_batches is None else batches[:num_batches])
    else:
        if num_batches is None:
            raise ValueError(
                f"num_batches is required when batches is a {type(batches).__name__} rather than a list of batches: "
                "pass num_batches=N to take its first N batches"
            )
        out = []
        for batch in batches:
            out.append(batch)
            if len(out) == num_batches:
                break
    if not out:
        raise ValueError("batches is empty: the diagnostics need at least one batch")
    return out


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for dict batches (``model(*batch)`` for tuples, ``model(batch)`` otherwise)."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (list, tuple)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, torch.Tensor):
        loss = out
    elif isinstance(out, Mapping):
        loss = out.get("loss")
    else:
        loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"the model's output ({type(out).__name__}) has no loss: put labels in the batches, "
            "or pass loss_fn=lambda model, batch: ... returning a scalar tensor"
        )
    return loss


def _batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None, device: torch.device | None) -> torch.Tensor:
    if device is not None:
        batch = _to_device(batch, device)
    loss = (loss_fn or _default_loss)(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar tensor, got {type(loss).__name__} of shape {getattr(loss, 'shape', None)}"
        )
    return loss.reshape(())


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Unique trainable parameters (a tied weight appears once, under its first name)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
    return params


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards each submodule gets back its OWN flag (a frozen part may have been in eval)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def _parameters_restored(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Whatever is written into ``params`` inside, they hold their exact original bits afterwards.

    Yields the saved copies (read-only by convention), so callers need not clone the weights a second time.

    Restoring by copy, not by subtracting the perturbation again: ``(w + d) - d != w`` in floating point.
    """
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None) -> float:
    device = _model_device(model)
    with torch.no_grad():
        total = sum(float(_batch_loss(model, b, loss_fn, device)) for b in batches)
    return total / len(batches)


def mean_loss(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
) -> float:
    """L(theta) = (1 / B) * sum_b L_b(theta): the loss averaged with equal weight over the batches, in eval mode.

    Args:
        model: the module; its forward must return ``.loss`` / ``["loss"]`` unless ``loss_fn`` is given.
        batches: a list of batches, or a DataLoader with ``num_batches`` (see `fixed_batches`).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``.
        num_batches: how many batches to take (required for a DataLoader).
    """
    batches = fixed_batches(batches, num_batches)
    with _eval_mode(model):
        return _mean_loss(model, batches, loss_fn)


# --------------------------------------------------------------------------------------------------------------------
# Sharpness: top Hessian eigenvalue
# --------------------------------------------------------------------------------------------------------------------


@contextmanager
def _twice_differentiable_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to its math kernel, the only one with a double backward.

    The fused kernels (flash attention on CPU and GPU, memory-efficient, cuDNN) raise "derivative for
    ..._backward is not implemented" in a Hessian-vector product.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def _hessian_vector_product(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    vector: Sequence[torch.Tensor],
    batches: Sequence[Any],
    loss_fn: LossFn | None,
) -> list[torch.Tensor]:
    """H v = (1 / B) * sum_b d/dtheta ( grad L_b(theta) . v ), one batch's graph alive at a time."""
    device = _model_device(model)
    out = [torch.zeros_like(p) for p in params]
    for batch in batches:
        with torch.enable_grad():
            loss = _batch_loss(model, batch, loss_fn, device)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, v) for g, v in zip(grads, vector, strict=True) if g is not None]
            if not pairs or not any(g.requires_grad for g, _ in pairs):
                continue  # loss linear (or constant) in the parameters: H = 0 for this batch
            gv = sum((g * v).sum() for g, v in pairs)
            hv = torch.autograd.grad(gv, params, allow_unused=True)
        for acc, h in zip(out, hv, strict=True):
            if h is not None:
                acc.add_(h, alpha=1.0 / len(batches))
    return out


def top_hessian_eigenvalue(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    max_iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    return_history: bool = False,
) -> float | tuple[float, list[float]]:
    """Sharpness: the dominant eigenvalue of the Hessian of the loss w.r.t. the trainable parameters.

    Power iteration on Hessian-vector products. With v_0 ~ N(0, I) normalized (seeded), each step computes

        w = H v_k                          (double backward: H v = d/dtheta (grad L . v), never forming H)
        lambda_k = v_k^T H v_k = v_k . w   (Rayleigh quotient, |v_k| = 1)
        v_{k+1} = w / |w|

    and stops after ``max_iterations`` or once |lambda_k - lambda_{k-1}| <= tol * |lambda_k|. v_k converges to the
    eigenvector of the eigenvalue of largest MAGNITUDE at rate |lambda_2 / lambda_1| per step (the Rayleigh quotient
    at twice that rate). At or near a minimum H is positive semi-definite and this is lambda_max, the usual
    sharpness measure; far from a minimum a large negative eigenvalue can dominate and the result is negative.

    Everything is evaluated in eval mode (dropout off) with the math attention kernel (the fused ones have no double
    backward). Gradient checkpointing must be off. Parameters' ``.grad`` are not touched.

    Args:
        model: the module; forward returns ``.loss`` unless ``loss_fn`` is given.
        batches: list of batches, or a DataLoader with ``num_batches``; L is their equal-weight mean.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        num_batches: how many batches to take (required for a DataLoader).
        max_iterations: at most this many Hessian-vector products (each costs about two backward passes per batch).
        tol: relative change of the estimate below which iteration stops; 0 runs all ``max_iterations``.
        seed: seeds the start vector.
        return_history: also return the estimate after each iteration.

    Returns:
        lambda, or ``(lambda, history)`` with ``return_history=True``.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    batches = fixed_batches(batches, num_batches)
    params = [p for _, p in _trainable(model)]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in params]
    norm = float(_dot(vector, vector).sqrt())
    vector = [v / norm for v in vector]

    history: list[float] = []
    with _eval_mode(model), _twice_differentiable_attention():
        for _ in range(max_iterations):
            hv = _hessian_vector_product(model, params, vector, batches, loss_fn)
            eigenvalue = float(_dot(vector, hv))
            history.append(eigenvalue)
            hv_norm = float(_dot(hv, hv).sqrt())
            if hv_norm == 0.0 or not math.isfinite(hv_norm):
                break  # H v = 0: v lies in the null space (lambda = 0); non-finite: nothing to iterate on
            vector = [h / hv_norm for h in hv]
            if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
                break
    return (history[-1], history) if return_history else history[-1]


# --------------------------------------------------------------------------------------------------------------------
# Flatness: loss increase under random filter-normalized perturbations
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flatness:
    """Result of `flatness`: the loss increases L(theta + r d) - L(theta) over the sampled directions."""

    mean: float
    """Mean loss increase (lower = flatter)."""
    std: float
    """Sample standard deviation of the increase across directions (0 for one sample)."""
    base_loss: float
    """L(theta) at the unperturbed weights."""
    increases: tuple[float, ...]
    """Each direction's increase, in sampling order."""
    radius: float


def _filter_dims(model: nn.Module) -> dict[int, int]:
    """Parameters whose output filters lie along dim 1 instead of dim 0, keyed by ``id``.

    transformers' GPT-2 style ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return {}
    return {id(m.weight): 1 for m in model.modules() if isinstance(m, Conv1D)}


def _filter_normalized_direction(
    param: torch.Tensor,
    generator: torch.Generator,
    filter_dim: int,
    one_dim: Literal["zero", "scale"],
) -> torch.Tensor:
    """d ~ N(0, I) of ``param``'s shape, each filter rescaled to the norm of the weight's same filter.

    Drawn on the CPU (same directions on any device), always, so one_dim="zero" does not shift later draws.
    """
    d = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.device)
    w = param.detach().float()
    if param.dim() <= 1:
        if one_dim == "zero":
            return torch.zeros_like(param)
        d = d * (w.norm() / d.norm().clamp_min(torch.finfo(torch.float32).tiny))
        return d.to(param)
    # filters = slices along filter_dim; the norm of each is over all the other dims
    other = [i for i in range(param.dim()) if i != filter_dim]
    w_norm = w.pow(2).sum(dim=other, keepdim=True).sqrt()
    d_norm = d.pow(2).sum(dim=other, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return (d * (w_norm / d_norm)).to(param)


def flatness(
    model: nn.Module,
    batches: Iterable[Any],
    radius: float = 0.05,
    num_samples: int = 8,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    one_dim: Literal["zero", "scale"] = "zero",
) -> Flatness:
    """Flatness: expected loss increase E_d[L(theta + r d) - L(theta)] under random filter-normalized directions.

    Direction (Li et al. 2018): for each trainable weight W with >= 2 dims, draw D ~ N(0, I) of its shape and rescale
    every filter (output slice: row of ``nn.Linear``/``nn.Embedding``, output channel of a convolution, column of
    transformers' transposed ``Conv1D``) to the norm of W's same filter, D_i <- D_i * |W_i| / |D_i|. The radius r is
    therefore RELATIVE: every filter moves by r * |W_i|, which makes the measure invariant to the per-filter rescaling
    that normalization layers allow. 1-D parameters (biases, norm gains):

    * ``one_dim="zero"`` (default, as in Li et al.): not perturbed;
    * ``one_dim="scale"``: perturbed with the tensor treated as one filter, D <- D * |W| / |D|.

    Expectation on a quadratic L = 1/2 (theta - c)^T A (theta - c), at theta = c (gradient 0), where each filter i
    (n_i entries, all of theta) gets a uniformly random direction of norm r |W_i|:
        E[increase] = r^2 / 2 * sum_i (|W_i|^2 / n_i) * sum_{j in filter i} A_jj.
    Off the minimum a linear term r g^T D adds noise of mean 0. For a general smooth loss this is the same to second
    order in r: the increase grows as r^2 near a minimum.

    Evaluated in eval mode under ``torch.no_grad``; the weights are restored bit-for-bit afterwards.

    Args:
        model, batches, loss_fn, num_batches: as in `mean_loss`.
        radius: r >= 0, relative to each filter's norm (0.01-0.1 are typical; r = 0 gives exactly 0).
        num_samples: number of random directions (each costs one loss evaluation over all batches).
        seed: seeds the directions; same seed, same directions, whatever the device.
        one_dim: how 1-D parameters are treated, "zero" or "scale" (see above).
    """
    if radius < 0 or not math.isfinite(radius):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    if one_dim not in ("zero", "scale"):
        raise ValueError(f"one_dim must be 'zero' or 'scale', got {one_dim!r}")
    batches = fixed_batches(batches, num_batches)
    params = [p for _, p in _trainable(model)]
    filter_dims = _filter_dims(model)
    generator = torch.Generator().manual_seed(seed)

    increases: list[float] = []
    with _eval_mode(model), _parameters_restored(params) as originals:
        base = _mean_loss(model, batches, loss_fn)
        for _ in range(num_samples):
            with torch.no_grad():
                for p, w in zip(params, originals, strict=True):
                    d = _filter_normalized_direction(w, generator, filter_dims.get(id(p), 0), one_dim)
                    p.copy_(w + radius * d)
            increases.append(_mean_loss(model, batches, loss_fn) - base)
    mean = sum(increases) / len(increases)
    std = math.sqrt(sum((x - mean) ** 2 for x in increases) / (len(increases) - 1)) if len(increases) > 1 else 0.0
    return Flatness(mean=mean, std=std, base_loss=base, increases=tuple(increases), radius=float(radius))


# --------------------------------------------------------------------------------------------------------------------
# Loss along the raw -> EMA line
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossProfile:
    """Result of `loss_profile`: ``losses[i] = L(raw + alphas[i] * (ema - raw))``."""

    alphas: tuple[float, ...]
    losses: tuple[float, ...]

    def as_dict(self) -> dict[float, float]:
        return dict(zip(self.alphas, self.losses, strict=True))


def _ema_pairs(model: nn.Module, ema_state: Mapping[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pair each parameter with its EMA tensor BY NAME (tied weights: any of their names). Names of a wrapped model
    (compiled, checkpoint-wrapped, DDP) match both as it reports them and as the unwrapped model has them, the keys
    of ``SEMACallback.ema_state_dict()``."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    by_name.update((canonical_name(n), p) for n, p in unwrap_model(model).named_parameters(remove_duplicate=False))
    unknown = sorted(k for k in ema_state if k not in by_name)
    if unknown:
        raise ValueError(f"ema_state has keys that are not parameters of the model: {unknown[:5]}")
    pairs: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    first_name: dict[int, str] = {}
    for name, p in by_name.items():
        if name not in ema_state:
            continue
        ema = ema_state[name]
        if tuple(ema.shape) != tuple(p.shape):
            raise ValueError(f"ema_state[{name!r}] has shape {tuple(ema.shape)}, the parameter {tuple(p.shape)}")
        if id(p) in pairs:
            # a tied weight given under two names: both must hold the same average, or which one to use is a guess
            if not torch.equal(pairs[id(p)][1].detach().cpu(), ema.detach().cpu()):
                raise ValueError(f"ema_state[{name!r}] and ema_state[{first_name[id(p)]!r}] (tied weights) differ")
            continue
        pairs[id(p)] = (p, ema)
        first_name[id(p)] = name
    missing = [n for n, p in _trainable(model) if id(p) not in pairs]
    if missing:
        raise ValueError(f"ema_state lacks trainable parameters of the model: {missing[:5]}")
    return list(pairs.values())


def loss_profile(
    model: nn.Module,
    batches: Iterable[Any],
    ema_state: Mapping[str, torch.Tensor],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
) -> LossProfile:
    """1-D loss profile along theta(alpha) = raw + alpha * (ema - raw).

    alpha = 0 is the model's current (raw) weights, alpha = 1 the EMA weights, alpha in (0, 1) between them, alpha > 1
    extrapolates past the EMA and alpha < 0 goes the other way. A minimum near alpha = 1 with a flat basin means the
    EMA sits in a wider valley than the raw weights; a loss still falling at alpha > 1 means averaging had not caught up.
    The interpolation is computed in fp32 and cast to each parameter's dtype.

    Args:
        model, batches, loss_fn, num_batches: as in `mean_loss`.
        ema_state: ``{name: tensor}`` keyed like ``model.state_dict()``; must cover every trainable parameter
            (a tied weight under any of its names) and may also hold frozen ones; every key must be a parameter.
        alphas: where to evaluate.

    Returns:
        `LossProfile` with the alphas and losses in the given order. The weights are restored bit-for-bit.
    """
    alphas = tuple(float(a) for a in alphas)
    if not alphas:
        raise ValueError("alphas is empty: give at least one alpha, e.g. (0.0, 1.0)")
    batches = fixed_batches(batches, num_batches)
    pairs = _ema_pairs(model, ema_state)
    params = [p for p, _ in pairs]
    losses: list[float] = []
    with _eval_mode(model), _parameters_restored(params):
        raws = [p.detach().float().clone() for p in params]
        deltas = [
            ema.detach().to(device=p.device, dtype=torch.float32) - r for (p, ema), r in zip(pairs, raws, strict=True)
        ]
        for alpha in alphas:
            with torch.no_grad():
                for p, r, d in zip(params, raws, deltas, strict=True):
                    p.copy_(r + alpha * d)
            losses.append(_mean_loss(model, batches, loss_fn))
    return LossProfile(alphas=alphas, losses=tuple(losses))


def plot_loss_profile(
    profile: LossProfile | Mapping[float, float] | Mapping[str, LossProfile],
    path: str | Path,
    title: str = "Loss along raw -> EMA",
) -> Path:
    """Write a PNG of one or several loss profiles (loss against alpha; alpha = 0 raw, 1 EMA).

    ``profile`` is a `LossProfile`, an ``{alpha: loss}`` dict, or ``{label: LossProfile}`` to overlay several (for
    example one per seed or per mode). Uses matplotlib's Agg backend, imported here so matplotlib stays optional.
    Returns the path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_loss_profile needs matplotlib: pip install matplotlib") from err

    if isinstance(profile, LossProfile):
        curves = {"": profile}
    elif profile and all(isinstance(v, LossProfile) for v in profile.values()):
        curves = dict(profile)
    else:
        items = sorted((float(a), float(v)) for a, v in profile.items())
        curves = {"": LossProfile(alphas=tuple(a for a, _ in items), losses=tuple(v for _, v in items))}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    try:
        for label, curve in curves.items():
            ax.plot(curve.alphas, curve.losses, marker="o", label=label or None)
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.text(0.0, 1.0, " raw", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.text(1.0, 1.0, " EMA", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_xlabel("alpha  (theta = raw + alpha * (ema - raw))")
        ax.set_ylabel("loss")
        ax.set_title(title)
        if any(curves):
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
