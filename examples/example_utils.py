"""What both example scripts share: the SEMA/LoRA flags, script-level defaults, and the EMA-size report.

Kept next to the scripts (not in the library) because it is about command lines, not about averaging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

from sema_hf import SEMACallback, SEMAConfig
from sema_hf.evaluation import metric_keys
from sema_hf.preemption import last_complete_checkpoint
from sema_hf.settings import evaluates_at_every_switch_point

logger = logging.getLogger(__name__)

SEMA_MODES = ("sema", "ema", "none")
# Default of --output_dir in the scripts: replaced by runs/<script>-<sema_mode> (see `finish_output_dir`).
AUTO_OUTPUT_DIR = "<auto>"


@dataclass
class SEMAExampleArguments:
    """How the example averages (``--sema_mode``) and whether it trains a LoRA adapter only (``--use_lora``)."""

    sema_mode: str = field(
        default="sema",
        metadata={
            "help": "'sema': Switch EMA (the average is evaluated, saved, and copied into the model at switch "
            "points); 'ema': plain EMA (evaluated and saved, never switched: SEMAConfig(switch=False)); 'none': "
            "no averaging (no callback).",
            "choices": list(SEMA_MODES),
        },
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train a LoRA adapter (PEFT) instead of the whole model; only the adapter is averaged."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    posthoc_auto: bool = field(
        default=True,
        metadata={
            "help": "With held-out validation data (--validation_samples) and no --posthoc_every_steps or "
            "--posthoc_select given, track post-hoc EMA (about 128 snapshots per run) and put into the saved model "
            "the average that scores best on the validation set (the raw weights and the classic EMA compete). "
            "docs/evidence, study v3: the choice matched the best fixed horizon in hindsight in every regime. "
            "false: the run averages only as its other flags say."
        },
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names LoRA wraps (e.g. c_attn for GPT-2, q_proj v_proj for Llama, query value for "
            "ViT). Default: PEFT's choice for the model type."
        },
    )

    def __post_init__(self) -> None:
        if self.sema_mode not in SEMA_MODES:
            raise ValueError(f"--sema_mode {self.sema_mode!r} is invalid: expected one of {SEMA_MODES}.")


def sema_arguments(*others: type) -> type:
    """`SEMAConfig` as a dataclass for `HfArgumentParser` next to ``others`` (e.g. `TrainingArguments`).

    Every field keeps its name, help and default, except one whose name another dataclass already uses:
    `TrainingArguments.warmup_steps` (the learning-rate warmup) clashes with `SEMAConfig.warmup_steps` (the decay
    warmup), so the latter becomes ``--sema_warmup_steps``. `to_sema_config` turns the parsed values back.
    """
    taken = {f.name for other in others for f in fields(other)}
    spec = []
    for f in fields(SEMAConfig):
        name = f"sema_{f.name}" if f.name in taken else f.name
        help_text = f.metadata.get("help", "")
        if name != f.name:
            help_text = f"SEMAConfig.{f.name}. {help_text}"
        spec.append((name, f.type, field(default=f.default, metadata={**f.metadata, "help": help_text})))
    return make_dataclass("SEMAArguments", spec)


def to_sema_config(values: Any) -> SEMAConfig:
    """The validated `SEMAConfig` from an instance of the `sema_arguments` dataclass."""
    names = {f.name for f in fields(SEMAConfig)}
    parsed = asdict(values)
    return SEMAConfig(**{(k[len("sema_") :] if k not in names else k): v for k, v in parsed.items()})


# Flags that set the same thing (the EMA decay, directly or by its horizon): when the user gives one of them, the
# script's default for the others is dropped, so that SEMAConfig sees only the user's choice.
EXCLUSIVE_FLAGS = (("decay", "horizon_epochs", "horizon_steps"),)


def expand_args(args: list[str] | None) -> list[str]:
    """``args`` (``sys.argv[1:]`` when None) as a list of flags; a single ``.json`` argument is read as a file of
    flags, as in the transformers examples."""
    args = sys.argv[1:] if args is None else list(args)
    if len(args) == 1 and args[0].endswith(".json"):
        with open(args[0], encoding="utf-8") as f:
            values = json.load(f)
        args = [item for key, value in values.items() for item in _as_flag(key, value)]
    return args


def parse_args(
    parser: HfArgumentParser,
    args: list[str] | None,
    defaults: dict[str, Any],
    from_scratch_defaults: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """Parse ``args`` (see `expand_args`) into the parser's dataclasses, with ``defaults`` overriding the
    dataclass defaults (every flag the user passes still wins), plus ``from_scratch_defaults`` when no
    ``--model_name_or_path`` is given (e.g. a higher learning rate than fine-tuning wants)."""
    args = expand_args(args)
    if from_scratch_defaults and not flag_given(args, "model_name_or_path"):
        defaults = {**defaults, **from_scratch_defaults}
    for group in EXCLUSIVE_FLAGS:
        if any(flag_given(args, name) for name in group):
            defaults = {k: v for k, v in defaults.items() if k not in group}
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"script defaults name unknown flags {unknown}")
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=args)


def _as_flag(key: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    return [f"--{key}", str(value)]


def flag_given(args: list[str] | None, name: str) -> bool:
    """Whether ``--name`` appears on the command line (``--name value`` or ``--name=value``)."""
    args = sys.argv[1:] if args is None else args
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def flag_value(args: list[str], name: str) -> str | None:
    """The value given to ``--name`` (the last one, as argparse keeps it), or None when the flag is absent."""
    value = None
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path: a Hub repo id is ``name`` or ``namespace/name`` (letters,
    digits, ``-_.``, not starting with a dot), so an absolute path, ``./``, ``../``, ``~``, a backslash on Windows or
    more than one ``/`` is a path on this machine."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or (os.sep != "/" and os.sep in name)
        or name.count("/") > 1
        or name.endswith("/")
    )


def check_local_path(name: str | None, flag: str) -> None:
    """Refuse, before anything is loaded, a ``--flag`` that names a local path that does not exist.

    Without this, transformers takes the mistyped folder for a Hub repo id and fails several times over with
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'", which does not say what is wrong.
    """
    if name is None or not looks_like_local_path(name):
        return
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise ValueError(
            f"--{flag} {name!r}: the path {os.path.abspath(path)!r} does not exist. Pass an existing folder "
            "or a Hub repo id such as 'openai-community/gpt2'."
        )


def default_device_flags() -> dict[str, Any]:
    """``use_cpu`` when no accelerator is present, so a bare ``accelerate launch`` works on a laptop or CI box."""
    has_accelerator = torch.cuda.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )  # MPS is left to the Trainer's own choice
    return {"use_cpu": not has_accelerator}


def init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """Initialize ``deepspeed.comm`` before a model is built under ``--deepspeed``.

    Under ZeRO-3, transformers builds models inside ``deepspeed.zero.Init``, which sizes the batch from
    ``deepspeed.comm``'s world size; on CPU (``use_cpu``) nothing has initialized it yet at that point, so it sees one
    rank and fails its batch-size check. It wraps the process group the Trainer's arguments already set up (gloo on
    CPU).
    """
    if not training_args.deepspeed:
        return
    import deepspeed

    training_args.world_size  # noqa: B018 - sets up torch.distributed (as the Trainer would)
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else None)


def example_switch_policy(
    given: bool, config: SEMAConfig, training_args: TrainingArguments, eval_dataset: Any
) -> tuple[str, str]:
    """The switch policy of an example run and why: ``--switch_policy`` when ``given``; otherwise the guarded
    ``"if_better"`` wherever the run can decide it, else the library's ``"always"``.

    The guard is the examples' default because in docs/evidence the plain switch never beat no averaging or plain
    EMA (ViT from scratch: -0.015 ± 0.040 test accuracy at H = 0.3 epoch; SmolLM2 LoRA: +0.0285 ± 0.0002 eval loss),
    and the guarded one tied no averaging. It needs an eval set with one metric to compare (a dict of eval sets
    needs ``metric_for_best_model`` naming one) and an evaluation at every switch point.
    """
    if given:
        return config.switch_policy, "--switch_policy given"
    if eval_dataset is None:
        return "always", "no eval set to decide a guarded switch on"
    if not evaluates_at_every_switch_point(config, training_args):
        return "always", f"eval_strategy={training_args.eval_strategy} does not evaluate at every switch point"
    try:
        metric_keys(training_args.metric_for_best_model, eval_dataset)
    except ValueError:
        return "always", "several eval sets and no --metric_for_best_model naming the one to decide on"
    return "if_better", "the examples' default: copy the average in only when it evaluates better"


def with_example_switch_policy(
    args: list[str], config: SEMAConfig, training_args: TrainingArguments, eval_dataset: Any
) -> SEMAConfig:
    """``config`` with `example_switch_policy` for the command line ``args`` (as `expand_args` returns it), logged."""
    policy, reason = example_switch_policy(flag_given(args, "switch_policy"), config, training_args, eval_dataset)
    logger.info(f"SEMA switch_policy={policy!r} ({reason}).")
    return config.replace(switch_policy=policy)


#: Snapshots per run when an example turns post-hoc EMA on by itself: 128 evenly spaced snapshots reach exponential
#: horizons of 0.012 to 0.30 of the run within 1% (`sema_hf.posthoc`), 0.3 to 6 epochs of a 20-epoch run.
EXAMPLE_POSTHOC_SNAPSHOTS = 128


def example_posthoc(
    args: list[str],
    config: SEMAConfig,
    example_args: SEMAExampleArguments,
    training_args: TrainingArguments,
    eval_dataset: Any,
    train_dataset: Any,
) -> tuple[SEMAConfig, str]:
    """``config`` with the examples' post-hoc default, and why: where the run holds out validation data (a dict of
    eval sets with ``"validation"``) and the user set no ``--posthoc_*`` flag, track post-hoc EMA with about
    `EXAMPLE_POSTHOC_SNAPSHOTS` snapshots and choose the final average on the validation loss.

    Study v3 (docs/evidence, 5 seeds, paired): chosen this way, the average matched the best of five fixed horizons
    in hindsight (+0.0005 ± 0.0012 test accuracy with cosine LR, -0.0004 ± 0.0015 constant) and kept the raw weights
    on the LM, where no horizon helped; the examples' fixed 0.3 epoch was 0.016 ± 0.005 (cosine) and 0.008 ± 0.007
    (constant) behind.
    Without held-out data the choice would be made on the data the run reports, so it stays off there."""
    if example_args.sema_mode == "none":
        return config, "no averaging"
    if flag_given(args, "posthoc_every_steps") or flag_given(args, "posthoc_select"):
        return config, "--posthoc_every_steps / --posthoc_select given"
    if not example_args.posthoc_auto:
        return config, "--posthoc_auto false"
    if not (isinstance(eval_dataset, dict) and "validation" in eval_dataset) or train_dataset is None:
        return config, "no held-out validation set to choose on (--validation_samples N turns it on)"
    if config.final_weights != "ema":
        return config, f"final_weights={config.final_weights!r} keeps the raw weights"
    total = training_args.max_steps
    if total <= 0:
        batch = training_args.per_device_train_batch_size * max(1, training_args.world_size)
        per_epoch = math.ceil(
            math.ceil(len(train_dataset) / batch) / max(1, training_args.gradient_accumulation_steps)
        )
        total = math.ceil(per_epoch * training_args.num_train_epochs)
    every = max(1, total // EXAMPLE_POSTHOC_SNAPSHOTS)
    config = config.replace(posthoc_every_steps=every, posthoc_select="eval_loss")
    return config, f"held-out validation data: snapshots every {every} of about {total} steps, chosen on its loss"


def with_example_posthoc(
    args: list[str],
    config: SEMAConfig,
    example_args: SEMAExampleArguments,
    training_args: TrainingArguments,
    eval_dataset: Any,
    train_dataset: Any,
) -> SEMAConfig:
    """`example_posthoc`, logged, then `posthoc_select_on_validation`."""
    config, reason = example_posthoc(args, config, example_args, training_args, eval_dataset, train_dataset)
    logger.info(f"SEMA posthoc_every_steps={config.posthoc_every_steps} ({reason}).")
    return posthoc_select_on_validation(config, eval_dataset)


def posthoc_select_on_validation(config: SEMAConfig, eval_dataset: Any) -> SEMAConfig:
    """``--posthoc_select eval_accuracy`` with the eval sets ``{"validation", "test"}`` chooses on the validation
    set (``eval_validation_accuracy``): the test set must stay unseen by the choice it reports on."""
    select = config.posthoc_select
    if select is None or not isinstance(eval_dataset, dict) or "validation" not in eval_dataset:
        return config
    key = select if select.startswith("eval_") else f"eval_{select}"
    if any(key.startswith(f"eval_{name}_") for name in eval_dataset):
        return config
    chosen = f"eval_validation_{key[len('eval_') :]}"
    logger.info(f"SEMA posthoc_select={chosen!r}: the post-hoc average is chosen on the validation set, not on test.")
    return config.replace(posthoc_select=chosen)


def weights_held_label(held: str | None, posthoc_chosen: str | None = None) -> str:
    """What the saved model holds, in the words of the examples' final line."""
    if posthoc_chosen is not None:
        return {"raw": "raw weights", "ema": "EMA weights"}.get(
            posthoc_chosen, posthoc_chosen
        ) + ", chosen after training"
    return {
        "ema": "EMA weights",
        "model": "raw weights (final_weights='model', if_better or the best checkpoint)",
    }.get(held or "", "weights as loaded (no training)")


def sema_callback_for(mode: str, config: SEMAConfig) -> SEMACallback | None:
    """The callback for ``--sema_mode``: Switch EMA, plain EMA (never switched), or None."""
    if mode == "none":
        return None
    if mode == "ema":
        if config.switch_every_steps is not None:
            logger.info("--sema_mode ema: switch_every_steps is ignored (plain EMA never switches).")
        return SEMACallback(config.replace(switch=False))
    return SEMACallback(config)


def apply_lora(
    model: torch.nn.Module,
    args: SEMAExampleArguments,
    task_type: str | None,
    modules_to_save: list[str] | None = None,
    training_args: TrainingArguments | None = None,
    from_scratch: bool = False,
):
    """Wrap ``model`` in a PEFT LoRA model; only the adapter (and ``modules_to_save``) keeps requires_grad.

    A base model built here from a config has random weights that no Hub id names; with ``from_scratch`` it is
    saved to ``output_dir/base_model`` first, and the adapter's config points there, so that
    ``PeftModel.from_pretrained(AutoModel...from_pretrained(output_dir/base_model), output_dir)`` works.
    """
    from peft import LoraConfig, get_peft_model

    if from_scratch and training_args is not None:
        base_dir = os.path.join(training_args.output_dir, "base_model")
        if training_args.should_save:
            model.save_pretrained(base_dir)
        model.config.name_or_path = base_dir
        model.name_or_path = base_dir
        logger.warning(f"LoRA on a model built from a config: its random base weights are saved to {base_dir}")
    targets = args.lora_target_modules or default_lora_targets(model)
    lora = LoraConfig(
        task_type=task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, lora)


LORA_TARGET_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",))


def default_lora_targets(model: torch.nn.Module) -> list[str] | None:
    """The attention query/value projections by their usual names (PEFT has no default for every model type,
    e.g. ViT in transformers 5); None leaves the choice to PEFT."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidate in LORA_TARGET_CANDIDATES:
        if set(candidate) <= names:
            return list(candidate)
    return None


def numel(model: torch.nn.Module, trainable_only: bool) -> int:
    # ZeRO-3 partitions parameters: the full size is `ds_numel`.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def report_ema_size(callback: SEMACallback | None, model: torch.nn.Module, world_size: int) -> dict[str, float]:
    """Log (and return) how much the average costs: elements on this process and as a fraction of the model."""
    if callback is None or callback.store is None:
        return {}
    total = numel(model, trainable_only=False)
    local = callback.local_numel
    fraction = local / total if total else 0.0
    logger.warning(
        f"SEMA: this process averages {local:,} elements ({local * 4 / 2**20:.2f} MiB fp32) = "
        f"{100 * fraction:.3f}% of the model's {total:,} parameters (world size {world_size})"
    )
    return {"ema_numel": float(local), "ema_fraction_of_model": fraction}


def finish_output_dir(training_args: TrainingArguments, script: str, mode: str) -> None:
    """``--output_dir`` not given: ``runs/<script>-<sema_mode>``, so runs of different modes do not collide."""
    if training_args.output_dir == AUTO_OUTPUT_DIR:
        training_args.output_dir = os.path.join("runs", f"{script}-{mode}")


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger) -> None:
    """Log like the transformers examples: INFO on the main process, WARNING on the others."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler()],
    )
    level = training_args.get_process_log_level()
    script_logger.setLevel(level)
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def last_checkpoint(training_args: TrainingArguments) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` when training (resumed from, as the transformers examples
    do; a half-written one left by a killed run is skipped, and set aside when the Trainer is made)."""
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    last = last_complete_checkpoint(training_args.output_dir, training_args.process_index, training_args.world_size)
    if last is not None and training_args.resume_from_checkpoint is None:
        logger.info(
            f"Resuming from {last} (model, optimizer and SEMA average). Use another --output_dir to start over."
        )
    return last


# ---- GGUF checkpoints as regular ones ------------------------------------------------------------------------------
# Written last into a converted folder: its presence means the conversion finished (and from which file).
GGUF_SOURCE_FILE = "sema_hf_gguf_source.json"


def gguf_checkpoint(folder: str, gguf_file: str, cache_dir: str | None = None) -> str:
    """A regular transformers checkpoint folder (safetensors weights, config, generation config, tokenizer) holding
    ``folder/gguf_file`` de-quantized to fp32: converted once, then read from the cache.

    A GGUF file is de-quantized whole by ``from_pretrained(..., gguf_file=...)``, which cannot run inside DeepSpeed
    ZeRO-3's partitioned init (``deepspeed.zero.Init``); a safetensors folder loads under every engine, and in a second
    instead of 15-45 s. The folder is ``<cache>/gguf/<file stem>-<first 16 hex digits of the file's sha256>``, where
    ``<cache>`` is ``cache_dir``, else ``$SEMA_HF_CACHE``, else ``~/.cache/sema-hf`` (``$XDG_CACHE_HOME`` respected).
    It is written under a temporary name and renamed when complete, so a crash or a second process converting at the
    same time never leaves a half-written folder behind. The conversion runs in a child Python process, so it also
    works when the caller has already set up ZeRO-3 (which would partition the de-quantizing model).
    """
    source = os.path.join(folder, gguf_file)
    if not os.path.isfile(source):  # a Hub repo id: the file in the Hub cache (downloaded once)
        from huggingface_hub import hf_hub_download

        source = hf_hub_download(folder, gguf_file, cache_dir=cache_dir)
        folder, gguf_file = os.path.dirname(source), os.path.basename(source)
    digest = _sha256(source)[:16]
    root = os.path.join(_cache_root(cache_dir), "gguf")
    target = os.path.join(root, f"{os.path.splitext(os.path.basename(gguf_file))[0]}-{digest}")
    if os.path.isfile(os.path.join(target, GGUF_SOURCE_FILE)):
        return target
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=root)
    try:
        logger.warning(f"Converting {source} to a safetensors checkpoint in {target} (once; about a minute)")
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--convert-gguf", folder, gguf_file, staging],
            capture_output=True,
            text=True,
            env=_single_process_env(),
        )
        if done.returncode != 0:
            raise RuntimeError(f"Converting {source} failed:\n{(done.stdout + done.stderr)[-4000:]}")
        with open(os.path.join(staging, GGUF_SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump({"gguf_file": os.path.abspath(source), "sha256_prefix": digest}, f)
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, GGUF_SOURCE_FILE)):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(folder: str, gguf_file: str, output_dir: str) -> None:
    """De-quantize ``folder/gguf_file`` to fp32 and save it as a plain checkpoint (model, tokenizer) in ``output_dir``.

    transformers marks a model loaded from GGUF as quantized (``config.quantization_config``): the Trainer would refuse
    to fine-tune it without an adapter and ``save_pretrained`` would write the GGUF quantization config. The weights
    are already plain fp32 tensors, so they are moved into a fresh model built from the same config without that entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(output_dir)


# What torchrun and accelerate launch tell their workers: the converting child is one plain process whatever the
# parent was (no process group, no DeepSpeed).
_LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _single_process_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARIABLES and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))
    }


def _cache_root(cache_dir: str | None) -> str:
    if cache_dir:
        return os.path.join(os.path.expanduser(cache_dir), "sema-hf")
    if os.environ.get("SEMA_HF_CACHE"):
        return os.path.expanduser(os.environ["SEMA_HF_CACHE"])
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sema-hf")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    # The child process of `gguf_checkpoint`: python example_utils.py --convert-gguf FOLDER GGUF_FILE OUTPUT_DIR
    if len(sys.argv) != 5 or sys.argv[1] != "--convert-gguf":
        raise SystemExit("usage: example_utils.py --convert-gguf FOLDER GGUF_FILE OUTPUT_DIR")
    convert_gguf(*sys.argv[2:])
