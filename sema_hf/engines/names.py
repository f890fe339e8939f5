"""Parameter names as the user's model has them, whatever wraps it: the keys of EMA state and checkpoints.

Wrappers change what ``named_parameters()`` reports, and a name that follows the wrappers would tie a checkpoint to
them: a run saved under ``torch.compile`` or activation checkpointing could not resume without it, nor re-shard
between FSDP2 and ZeRO-3. Every adapter names its averages with `canonical_named_parameters` / `canonical_name`,
which give the names of the user's unwrapped model (its ``state_dict()`` keys):

======================================================  ===============================  ==========================
wrapper                                                 what it inserts in the names     removed by
======================================================  ===============================  ==========================
``torch.compile`` (``OptimizedModule``), also regional  ``_orig_mod.``                   `canonical_name`
``checkpoint_wrapper`` / ``offload_wrapper`` (accelerate  ``_checkpoint_wrapped_module.``  `canonical_name`
FSDP activation checkpointing)
FSDP1 (``FullyShardedDataParallel``)                    ``_fsdp_wrapped_module.``        `canonical_name`
DDP, ``DataParallel``, ``DeepSpeedEngine``              ``module.``                      `unwrap_model`
FSDP2 (``fully_shard``), ``module.compile()``,          nothing
transformers' gradient checkpointing
======================================================  ===============================  ==========================

The first three insert private attribute names no user module has, so `canonical_name` drops those segments
wherever they sit (a whole segment only: ``x_orig_mod`` stays). ``module`` is an ordinary attribute name that a
user's model may well use, so it is never removed from a string: `unwrap_model` takes the wrapped model out of the
wrapper objects instead, before anything is named.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import nn

#: Attribute names under which wrappers hold the module they wrap (torch.compile, checkpoint_wrapper, FSDP1).
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def canonical_name(name: str) -> str:
    """``name`` without the segments that ``torch.compile``, activation-checkpoint wrappers and FSDP1 insert.

    >>> canonical_name("_orig_mod.transformer.h.0._checkpoint_wrapped_module.attn.c_attn.weight")
    'transformer.h.0.attn.c_attn.weight'
    >>> canonical_name("module.weight")  # a user's submodule called ``module``: kept (see `unwrap_model`)
    'module.weight'
    """
    return ".".join(segment for segment in name.split(".") if segment not in WRAPPER_SEGMENTS)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside the wrappers that hold it whole: DDP, ``DataParallel``, ``DeepSpeedEngine`` and
    ``torch.compile``'s ``OptimizedModule``, in any nesting. Wrappers inside the model (activation checkpointing,
    FSDP units, regional compilation) stay; `canonical_name` removes their segments from the names."""
    # No OptimizedModule exists before torch.compile imported its module: do not pay for importing dynamo here.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) or (
            type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module")
        ):
            model = model.module
        elif optimized is not None and isinstance(model, optimized):
            model = model._orig_mod
        else:
            return model


def canonical_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` of the unwrapped model under canonical names (each tensor once, as torch walks it)."""
    return _unique([(canonical_name(n), p) for n, p in unwrap_model(model).named_parameters()])


def canonical_named_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``named_buffers()`` of the unwrapped model under canonical names."""
    return _unique([(canonical_name(n), b) for n, b in unwrap_model(model).named_buffers()])


def _unique(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    repeated = sorted(n for n, count in Counter(n for n, _ in named).items() if count > 1)
    if repeated:
        raise ValueError(
            f"SEMA: two tensors of the model have the same name once wrapper segments "
            f"({sorted(WRAPPER_SEGMENTS)}) are removed: {repeated[:5]}; rename the submodules."
        )
    return named
