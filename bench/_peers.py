"""The EMA implementations the benchmarks compare, behind one small interface.

Each builder takes the model being trained and returns a `Candidate`: an ``update()`` closure (one EMA step with a
fixed decay) and, where the library has one, a ``switch()`` closure (copy the average into the model's weights).
For bf16 models every candidate is set up to keep an **fp32** average, with the means the library offers; a library
that cannot do that, or is not installed, raises `Unavailable` with the reason, and the benchmark prints that row
as skipped.

Peers are configured like-for-like with ours: parameters only (no buffers), foreach paths on, no warmup cost that
ours would not pay. timm is loaded as the single file ``timm/utils/model_ema.py`` without importing the ``timm``
package (whose ``torchvision`` dependency would replace the installed torch); install it with
``pip install --no-deps timm``.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from sema_hf.engines.local import LocalAdapter
from sema_hf.store import EMAStore


class Unavailable(Exception):
    """This candidate cannot run here (package missing, or no way to keep an fp32 average of these weights)."""


@dataclass
class Candidate:
    impl: str
    update: Callable[[], None]
    switch: Callable[[], None] | None = None
    note: str = ""


def _fp32_average(model: nn.Module) -> bool:
    return any(p.dtype != torch.float32 for p in model.parameters())


def build_sema_hf(model: nn.Module, decay: float) -> Candidate:
    store = EMAStore(LocalAdapter(model).slots())
    return Candidate("sema_hf", lambda: store.update(decay), store.switch)


def load_timm_model_ema() -> ModuleType:
    """``timm/utils/model_ema.py`` as a standalone module (it imports only torch), without importing ``timm``."""
    try:
        spec = importlib.util.find_spec("timm")  # locates the package without executing it
    except (ImportError, ValueError) as e:
        raise Unavailable(f"timm not importable: {e}") from e
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("timm not installed (pip install --no-deps timm)")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    if not path.is_file():
        raise Unavailable(f"timm installed but {path} is missing")
    module_spec = importlib.util.spec_from_file_location("_bench_timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "ModelEmaV3"):
        raise Unavailable("this timm has no ModelEmaV3")
    return module


def build_timm(model: nn.Module, decay: float) -> Candidate:
    model_ema = load_timm_model_ema()
    # exclude_buffers=True walks model.parameters(): each tied tensor once. The default walks state_dict(), which
    # updates GPT-2's tied embedding twice per step.
    dtype = torch.float32 if _fp32_average(model) else None
    try:
        ema = model_ema.ModelEmaV3(model, decay=decay, dtype=dtype, foreach=True, exclude_buffers=True)
    except TypeError as e:  # timm before 1.0 lacks dtype= / exclude_buffers=
        raise Unavailable(f"this timm's ModelEmaV3 cannot keep an fp32 average of parameters only: {e}") from e
    return Candidate("timm", lambda: ema.update(model), None, "ModelEmaV3(foreach, exclude_buffers); no switch API")


def build_diffusers(model: nn.Module, decay: float) -> Candidate:
    try:
        from diffusers.training_utils import EMAModel
    except ImportError as e:
        raise Unavailable(f"diffusers not importable: {e}") from e
    params = list(model.parameters())
    ema = EMAModel(params, decay=decay, foreach=True)
    if _fp32_average(model):
        ema.to(dtype=torch.float32)
    return Candidate("diffusers", lambda: ema.step(params), lambda: ema.copy_to(params), "EMAModel(foreach=True)")


def build_ema_pytorch(model: nn.Module, decay: float) -> Candidate:
    try:
        from ema_pytorch import EMA
    except ImportError as e:
        raise Unavailable(f"ema-pytorch not installed: {e}") from e
    fp32 = _fp32_average(model)
    ema_model = copy.deepcopy(model).float() if fp32 else None
    ema = EMA(
        model,
        ema_model=ema_model,
        beta=decay,
        update_after_step=0,
        update_every=1,
        use_foreach=True,
        coerce_dtype=fp32,
        include_online_model=False,
    )
    ema.update()  # the first call copies the weights in; later calls average
    return Candidate("ema-pytorch", ema.update, ema.copy_params_from_ema_to_model, "EMA(use_foreach=True)")


def build_torch_ema(model: nn.Module, decay: float) -> Candidate:
    try:
        from torch_ema import ExponentialMovingAverage
    except ImportError as e:
        raise Unavailable(f"torch-ema not installed: {e}") from e
    ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False)
    if _fp32_average(model):
        ema.to(dtype=torch.float32)
    return Candidate("torch-ema", ema.update, ema.copy_to, "ExponentialMovingAverage")


def build_swa_utils(model: nn.Module, decay: float) -> Candidate:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    if _fp32_average(model):
        averaged.module.float()
    averaged.update_parameters(model)  # the first call copies
    try:
        averaged.update_parameters(model)
    except Exception as e:  # noqa: BLE001 - report whatever torch raises for this configuration
        raise Unavailable(
            f"fails with an fp32 average of {_dtype_name(model)} weights: {str(e).splitlines()[0]}"
        ) from e
    return Candidate(
        "swa_utils",
        lambda: averaged.update_parameters(model),
        None,
        "AveragedModel(get_ema_multi_avg_fn); no switch API",
    )


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


PEERS: dict[str, Callable[[nn.Module, float], Candidate]] = {
    "timm": build_timm,
    "diffusers": build_diffusers,
    "ema-pytorch": build_ema_pytorch,
    "torch-ema": build_torch_ema,
    "swa_utils": build_swa_utils,
}
