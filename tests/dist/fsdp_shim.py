"""Test-only: a `Trainer` that really runs FSDP on CPU (gloo).

On CPU, accelerate drops the FSDP plugin and falls back to plain DDP. This subclass re-installs the plugin after the
accelerator is created, so that `accelerator.prepare` wraps the model with FSDP1 or FSDP2 as it would on GPUs
(recipe measured in ENVIRONMENT.md). It lives under tests/ only: the library itself never patches accelerate.
"""

from __future__ import annotations

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer


class FSDPTrainer(Trainer):
    """`Trainer` whose accelerator uses the FSDP plugin built from ``args.fsdp_plugin_args`` even on CPU."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None:
            raise ValueError("FSDPTrainer needs TrainingArguments(fsdp=..., fsdp_config=...)")
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state = self.accelerator.state
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        # FSDP1 insists that its device_id ("cpu:0" from MULTI_CPU) equals the compute device ("cpu").
        for shared in (state.__dict__, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")
        self.is_fsdp_enabled = True
