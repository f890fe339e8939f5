"""The tiny GPT-2, data and Trainer settings shared by the sharded workers and the single-process reference.

One run: 32 sequences (a learnable arithmetic pattern), 4 optimizer steps per epoch at a global batch of 8,
3 epochs, SEMA switching at each epoch end, evaluation (of the EMA) every 3 steps, so that evaluations fall
between switches where the average differs from the weights.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 31  # odd sizes everywhere (vocab 31, width 33): uneven shards, padded partitions
EPOCHS = 3
STEPS = 12  # 32 / 8 * 3
SEMA_KWARGS = {"decay": 0.8, "warmup": "none"}

ZERO_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
    },
}

# name -> (engine kind, options); the bf16 runs train in bf16 mixed precision with fp32 master weights.
ENGINES = {
    "fsdp2": ("fsdp", {"version": 2}),
    "fsdp2-bf16": ("fsdp", {"version": 2, "bf16": True}),
    "fsdp1-orig": ("fsdp", {"version": 1, "use_orig_params": True}),
    "fsdp1-flat": ("fsdp", {"version": 1, "use_orig_params": False}),
    # ZeRO-1 with bf16 weights and fp32 gradient accumulation is DeepSpeed's BF16_Optimizer
    "zero1-bf16": ("deepspeed", {"stage": 1, "bf16": True, "fp32_grad_accum": True}),
    "zero2": ("deepspeed", {"stage": 2}),
    "zero3": ("deepspeed", {"stage": 3}),
    "zero3-bf16": ("deepspeed", {"stage": 3, "bf16": True}),
}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2 blocks, width 33, no dropout (runs must be deterministic); tied input/output embeddings."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=33,
        n_layer=2,
        n_head=3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def pattern_dataset(n: int = 32, seed: int = 1) -> Dataset:
    """Sequences ``(s + i * k) % VOCAB``: quick to learn, so the loss visibly falls in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(SEQ)) % VOCAB
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def engine_args(engine: str) -> dict:
    """TrainingArguments overrides selecting ``engine`` (FSDP ones need `fsdp_shim.FSDPTrainer` on CPU)."""
    kind, options = ENGINES[engine]
    extra: dict = {"bf16": bool(options.get("bf16"))}
    if kind == "fsdp":
        config = {
            "version": options["version"],
            "sync_module_states": False,
            "transformer_layer_cls_to_wrap": ["GPT2Block"],
            "state_dict_type": "SHARDED_STATE_DICT",
        }
        if options["version"] == 1:
            config["use_orig_params"] = options["use_orig_params"]
        extra.update(fsdp=True, fsdp_config=config)
    else:
        zero = {**ZERO_CONFIG, "zero_optimization": {**ZERO_CONFIG["zero_optimization"], "stage": options["stage"]}}
        if options.get("fp32_grad_accum"):
            zero["data_types"] = {"grad_accum_dtype": "fp32"}
        extra["deepspeed"] = zero
    return extra


def training_args(output_dir: str, world_size: int, engine: str | None = None, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        per_device_eval_batch_size=8 // world_size,
        num_train_epochs=EPOCHS,
        learning_rate=1e-2,
        # Attention key biases get (mathematically) zero gradients; with Adam's default eps 1e-8 the rounding noise
        # of a 2-rank all-reduce in them becomes full-size updates. eps 1e-4 keeps the runs comparable to 1e-6.
        adam_epsilon=1e-4,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    if engine is not None:
        values.update(engine_args(engine))
    values.update(overrides)
    return TrainingArguments(**values)


def eval_dataset() -> Dataset:
    return pattern_dataset(8, seed=2)


def reference_ema(weights: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The EMA of a recorded weight trajectory (the first entry is the start), fixed decay, no warmup: the
    independent reference the sharded workers compare the callback's average with."""
    ema = {n: t.clone() for n, t in weights[0].items()}
    for theta in weights[1:]:
        for n, t in theta.items():
            ema[n].lerp_(t, 1 - decay)
    return ema


def run_each_engine(run: Callable[[str, str], None]) -> None:
    """A worker's main: ``sys.argv`` is the output folder, then engine names; ``run(out_dir, engine)`` for each, on
    one gloo group, with a barrier after each engine and the group ended before the interpreter exits."""
    out_dir, engines = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    for engine in engines:
        run(out_dir, engine)
        dist.barrier()
    dist.destroy_process_group()
