"""The average as a whole-model state dict: what ``model.load_state_dict(..., strict=True)`` needs.

The store averages what the optimizer updates: the trainable parameters (a LoRA adapter only, under PEFT), each
tensor once (GPT-2's tied embedding and output layer are one tensor, under its first name ``transformer.wte.weight``),
and floating buffers only with ``include_buffers``. A strict ``load_state_dict`` wants every key of
``model.state_dict()``: both names of a tied weight, the frozen parameters (the base model under a LoRA adapter) and
the persistent buffers (BatchNorm statistics, position ids). `whole_model_state_dict` completes the gathered averages
with them:

* a key whose tensor is averaged (under any of its names) -> a copy of the average;
* any other key -> a copy of what the model holds now, made full where the engine shards it: gathered with
  ``deepspeed.zero.GatheredParameters`` under ZeRO-3 and ``DTensor.full_tensor()`` under FSDP2, one tensor at a
  time (collectives: every rank must call it, in the same order, and every rank receives the whole dict).

Keys are the user's unwrapped model's (`sema_hf.engines.names`), so the dict loads into a plain copy of the model
(a teacher, an exported model) built the same way. Each key gets its own tensor (tied names are two copies), so the
dict can also be written with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .names import canonical_name, unwrap_model


def state_dict_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for every key of ``model.state_dict()``, the tensors themselves (not detached copies), under
    canonical names: parameters and persistent buffers of every module, a shared module or tensor under each of its
    names, walked as ``Module.state_dict`` walks them (without its hooks, which sharded engines use to gather)."""
    entries: list[tuple[str, torch.Tensor]] = []
    for prefix, module in unwrap_model(model).named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                entries.append((canonical_name(dot + name), param))
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                entries.append((canonical_name(dot + name), buffer))
    return entries


@torch.no_grad()
def whole_model_state_dict(
    model: nn.Module, averages: Mapping[str, torch.Tensor], engine: str, *, on_cpu: bool
) -> dict[str, torch.Tensor]:
    """Every key of ``model.state_dict()``: the gathered ``averages`` (keyed by each averaged tensor's first name)
    under every name of their tensor, the model's current full tensors for the rest. ``on_cpu``: put the copies of
    the non-averaged tensors on the CPU (where sharded engines gather the averages), else on their own device."""
    if engine == "fsdp1":
        raise NotImplementedError(
            "SEMA.ema_state_dict(whole_model=True) is not supported under FSDP1: its frozen parameters live in flat "
            "shards. Use ema_state_dict() (the averaged tensors) and complete it with FSDP's full state dict, or "
            "train with FSDP2 (fully_shard)."
        )
    entries = state_dict_entries(model)
    tensor_of = {}
    for key, tensor in entries:
        tensor_of.setdefault(key, tensor)
    missing = [name for name in averages if name not in tensor_of]
    if missing:
        raise ValueError(f"SEMA: averaged tensors {missing[:5]} are not keys of the model's state_dict()")
    averaged_by_id = {id(tensor_of[name]): name for name in averages}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in entries:
        name = averaged_by_id.get(id(tensor))
        if name is not None:
            out[key] = averages[name].clone()
        else:
            full = _full_tensor(tensor)
            out[key] = full.to("cpu", copy=True) if on_cpu else full.clone()
    return out


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded tensor (a collective for ZeRO-3 parameters and DTensors)."""
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3: partitioned, gathered for the copy
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    full_tensor = getattr(tensor, "full_tensor", None)  # FSDP2 DTensor
    if full_tensor is not None:
        return full_tensor().detach()
    return tensor.detach()
