"""Hub export: model cards that say what the saved weights are (the Switch EMA average, or the raw weights kept).

`Trainer.create_model_card` (which `Trainer.push_to_hub` calls right before uploading ``output_dir``) rewrites
``README.md`` from scratch, keeping only the YAML tags of an existing card. So the SEMA section is added *after* it:

- `add_sema_to_model_card(output_dir, config, ...)` adds the tags ``sema`` and ``switch-ema`` to the card's YAML and
  appends (or replaces, when run again) a "Switch EMA" section: the settings, the paper, what the weights are (the
  average, or the raw weights when ``if_better``, ``load_best_model_at_end`` or ``final_weights="model"`` kept them:
  ``callback.final_weights_held``), and the evaluation metrics of those weights (`metrics_of_saved_weights`).
- `SEMAModelCardMixin` overrides ``create_model_card`` to do that whenever the Trainer writes a card, so
  ``trainer.push_to_hub()`` uploads a folder whose card carries the section::

      class Trainer(SEMAModelCardMixin, transformers.Trainer): ...

  or use `SEMATrainer`, which is exactly that. The averaging itself is `SEMACallback`'s job; with
  ``final_weights="ema"`` (the default) the model holds the average when training ends, so ``save_model()`` and
  ``push_to_hub()`` write the SEMA model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from transformers import Trainer

from .callback import SEMACallback
from .config import SEMAConfig
from .horizon import horizon_of_decay
from .selection import PosthocSweep
from .trainer import EMAFirstCheckpointMixin, HandOverBindingMixin, RawWeightsOnErrorMixin

SEMA_TAGS = ("sema", "switch-ema")
PAPER_ARXIV_ID = "2402.09240"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV_ID}"
SECTION_BEGIN = "<!-- sema-hf:begin -->"
SECTION_END = "<!-- sema-hf:end -->"

CITATION = """@article{li2024switch,
  title   = {Switch EMA: A Free Lunch for Better Flatness and Sharpness},
  author  = {Li, Siyuan and others},
  journal = {arXiv preprint arXiv:2402.09240},
  year    = {2024}
}"""

# transformers writes this sentence when the model's `_name_or_path` is empty (a model built from a config): a link
# with no name to the Hub's front page.
_EMPTY_BASE_MODEL_LINK = re.compile(r"This model is a fine-tuned version of \[\]\([^)]*\) on ")

# Trainer bookkeeping that is not a quality metric of the model.
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_samples")


def sema_model_card_section(
    config: SEMAConfig,
    metrics: Mapping[str, float] | None = None,
    *,
    num_updates: int | None = None,
    num_switches: int | None = None,
    averaged_numel: int | None = None,
    model_numel: int | None = None,
    resolved_decay: float | None = None,
    final_weights_held: str | None = None,
    kept_because: str | None = None,
    posthoc: PosthocSweep | None = None,
) -> str:
    """The Markdown section (between ``SECTION_BEGIN`` and ``SECTION_END``) describing a SEMA model.

    Args:
        config: the settings the average was trained with.
        metrics: evaluation metrics of the saved weights (``eval_loss``, ``perplexity``...).
        num_updates, num_switches: counts from the callback, when known.
        averaged_numel, model_numel: elements averaged (trainable ones) and in the whole model, when known.
        resolved_decay: the per-step decay the run used (``callback.decay``), when the config gave a horizon.
        final_weights_held: which weights the saved model holds (``callback.final_weights_held``): ``"ema"`` the
            average, ``"model"`` the raw training weights; None: as ``config.final_weights`` says.
        kept_because: why the raw weights were kept (``"model"``), in a few words.
        posthoc: the table of the post-hoc selection that chose the saved weights (``posthoc_select``): the card
            names the chosen candidate, the data it was chosen on and the whole table.
    """
    held = final_weights_held or ("ema" if config.final_weights == "ema" else "model")
    if held == "posthoc" and posthoc is not None:
        row = posthoc.chosen_row
        what = (
            f"These weights are a post-hoc EMA of the training weights: the power-function average `{row.label}` "
            "reconstructed after training from the snapshots the run kept of two power-function profiles (Karras et "
            "al., EDM2, arXiv 2312.02696), per element from each rank's own shards. The run also kept an exponential "
            f"moving average with [Switch EMA]({PAPER_URL}) (SEMA; Li et al., 2024)."
        )
    elif held == "model":
        what = (
            "These are the raw training weights, not their exponential moving average (EMA): "
            + (kept_because or "`final_weights='model'`")
            + f". The run kept an EMA alongside ([Switch EMA]({PAPER_URL}), SEMA; Li et al., 2024)"
            + (", copying it into the model at the switch points where it was better." if config.switch else ".")
        )
    elif config.switch:
        what = (
            f"These weights are the exponential moving average (EMA) of the training weights, kept with "
            f"[Switch EMA]({PAPER_URL}) (SEMA; Li et al., 2024): after each optimizer step the fp32 average follows "
            "the weights, and at every switch point the average was copied into the model, which trained on from it."
        )
    else:
        what = (
            "These weights are a plain exponential moving average (EMA) of the training weights (evaluated, never "
            f"switched into the model; the no-switch baseline of [Switch EMA]({PAPER_URL}))."
        )
    lines = [SECTION_BEGIN, "## Switch EMA (SEMA)", "", what, "", "| setting | value |", "|---|---|"]
    lines += [f"| `{name}` | `{value}` |" for name, value in config.to_dict().items()]
    if resolved_decay is not None:
        lines += [
            "",
            f"Per-step decay used: {resolved_decay:.6g} (horizon {horizon_of_decay(resolved_decay):.4g} optimizer steps).",
        ]
    counts = []
    if num_updates is not None:
        counts.append(f"{num_updates:,} EMA updates")
    if num_switches is not None:
        counts.append(f"{num_switches:,} switches")
    if averaged_numel is not None:
        size = f"{averaged_numel:,} averaged elements ({averaged_numel * 4 / 2**20:.1f} MiB in fp32"
        if model_numel:
            size += f", {100.0 * averaged_numel / model_numel:.2f}% of the model's {model_numel:,} parameters"
        counts.append(size + ")")
    if counts:
        lines += ["", "Training: " + ", ".join(counts) + "."]
    if posthoc is not None:
        lines += ["", *_selection_lines(posthoc)]
    shown = _quality_metrics(metrics or {})
    if shown:
        lines += ["", "Evaluation of these weights (the saved ones):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_format(value)} |" for name, value in shown.items()]
    lines += [
        "",
        "Trained with sema-hf (`SEMACallback` for the transformers `Trainer`), an implementation of "
        f"[Switch EMA]({PAPER_URL}).",
        "",
        "```bibtex",
        CITATION,
        "```",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def _selection_lines(sweep: PosthocSweep) -> list[str]:
    """The card's account of a post-hoc selection: what was chosen, on which data, by what, and the table."""
    row = sweep.chosen_row
    direction = "higher" if sweep.greater_is_better else "lower"
    data = sweep.data or "the eval set"
    return [
        "### How these weights were chosen",
        "",
        f"After training (optimizer step {sweep.step}) every candidate below was evaluated on {data} and the one "
        f"with the best `{sweep.metric}` ({direction} is better) was saved: **`{row.label}`**, {row.description}. "
        f"The same data chose the weights, so its `{sweep.metric}` is an optimistic estimate for them; measure the "
        "model on data the selection did not see.",
        "",
        sweep.markdown(),
    ]


def add_sema_to_model_card(
    output_dir: str,
    config: SEMAConfig,
    metrics: Mapping[str, float] | None = None,
    **counts: int | None,
) -> str:
    """Add the SEMA tags and section to ``output_dir/README.md`` (created if missing); returns its path.

    Running it again replaces the section rather than appending a second one. ``counts`` are the keyword arguments
    of `sema_model_card_section` (``num_updates``, ``num_switches``, ``averaged_numel``, ``model_numel``,
    ``resolved_decay``).
    """
    path = os.path.join(output_dir, "README.md")
    if os.path.isfile(path):
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    tags = list(card.data.tags or [])
    card.data.tags = tags + [tag for tag in SEMA_TAGS if tag not in tags]
    section = sema_model_card_section(config, metrics, **counts)
    text = card.text
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.text = text
    card.save(path)
    return path


def fix_empty_base_model_link(output_dir: str) -> bool:
    """Say "trained from scratch" where the Trainer's card names an empty base model; returns whether it did.

    `Trainer.create_model_card` takes the base model from ``config._name_or_path`` when ``finetuned_from`` is not
    given; for a model built from a config that is ``""``, and the card then reads "a fine-tuned version of
    [](https://huggingface.co/)". Such a model was trained from scratch, which is what the card says after this.
    """
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        return False
    card = ModelCard.load(path)
    text, count = _EMPTY_BASE_MODEL_LINK.subn("This model was trained from scratch on ", card.text)
    if not count:
        return False
    card.text = text
    card.save(path)
    return True


def last_eval_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics of the last evaluation in ``trainer.state.log_history`` (``eval_ema_*`` preferred, renamed
    ``eval_*``, when ``evaluate_with='both'`` logged both)."""
    for entry in reversed(log_history):
        ema = {"eval_" + k[len("eval_ema_") :]: v for k, v in entry.items() if k.startswith("eval_ema_")}
        if ema:
            return ema
        plain = {k: v for k, v in entry.items() if k.startswith("eval_")}
        if plain:
            return plain
    return {}


def _trainer_eval_keys(entry: Mapping[str, Any]) -> dict[str, float]:
    """The Trainer's own ``eval_*`` numbers of a log entry (not SEMA's ``eval_ema_*``, ``eval_raw_*``,
    ``eval_uses_ema``)."""
    return {
        k: v
        for k, v in entry.items()
        if k.startswith("eval_") and not k.startswith(("eval_ema_", "eval_raw_")) and k != "eval_uses_ema"
    }


def metrics_of_saved_weights(
    log_history: list[dict[str, Any]],
    final_weights_held: str | None,
    config: SEMAConfig,
    step: int | None = None,
) -> dict[str, float]:
    """The last evaluation's numbers of the weights the model holds after training (``eval_*`` keys), at ``step``
    when given (the best checkpoint's, after ``load_best_model_at_end``); empty when no evaluation measured them.

    ``eval_*`` are the average's with ``evaluate_with="ema"``; the weights held after each switch point's decision
    with ``"both"`` / ``if_better``, where ``eval_ema_*`` are the average's; the raw weights' with ``"model"``.
    """
    compares = config.evaluate_with == "both" or config.switch_policy == "if_better"
    held = final_weights_held or config.final_weights
    entries = [e for e in log_history if step is None or e.get("step") == step]
    if held == "ema" and compares:
        for entry in reversed(entries):
            ema = {"eval_" + k[len("eval_ema_") :]: v for k, v in entry.items() if k.startswith("eval_ema_")}
            if ema:
                return ema
        return {}
    if (held == "ema") != (config.evaluate_with == "ema" and not compares):
        return {}  # the evaluations measured the other weights
    for entry in reversed(entries):
        plain = _trainer_eval_keys(entry)
        if plain:
            return plain
    return {}


def _kept_because(callback: SEMACallback, args: Any, state: Any) -> str:
    if args.load_best_model_at_end and state.best_model_checkpoint:
        return (
            f"`load_best_model_at_end` ended on the best checkpoint's weights ({state.best_model_checkpoint}, "
            f"`{args.metric_for_best_model}` = {state.best_metric})"
        )
    sweep = callback.posthoc_sweep
    if callback.config.posthoc_select is not None and sweep is not None:
        return f"the post-hoc selection chose them (`{sweep.metric}` on {sweep.data})"
    if callback.config.final_weights != "ema":
        return "`final_weights='model'`"
    return "`switch_policy='if_better'` kept them, as the average did not evaluate better at the end of training"


def find_sema_callback(trainer: Trainer) -> SEMACallback | None:
    """The `SEMACallback` among ``trainer``'s callbacks, if any."""
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SEMACallback)), None)


class SEMAModelCardMixin:
    """Mix into a `transformers.Trainer` so every model card it writes carries the SEMA tags and section.

    ``create_model_card`` (and so ``push_to_hub``, which forwards its extra keyword arguments to it) also accepts
    ``sema_metrics``: the evaluation metrics of the saved model to show; by default those of the last evaluation in
    ``state.log_history`` that measured the weights the model holds (`metrics_of_saved_weights`; the best
    checkpoint's evaluation after ``load_best_model_at_end``). Without a `SEMACallback` among the callbacks the card
    is the Trainer's own.
    """

    def create_model_card(self, *args: Any, sema_metrics: Mapping[str, float] | None = None, **kwargs: Any) -> None:
        callback = find_sema_callback(self)  # type: ignore[arg-type]
        if callback is not None:
            tags = kwargs.get("tags")
            tags = [tags] if isinstance(tags, str) else list(tags or [])
            kwargs["tags"] = tags + [tag for tag in SEMA_TAGS if tag not in tags]
        super().create_model_card(*args, **kwargs)  # type: ignore[misc]
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        fix_empty_base_model_link(self.args.output_dir)  # type: ignore[attr-defined]
        if callback is None:
            return
        args, state = self.args, self.state  # type: ignore[attr-defined]
        held = callback.final_weights_held
        best_step = state.best_global_step if args.load_best_model_at_end and state.best_model_checkpoint else None
        sweep = callback.posthoc_sweep if callback.config.posthoc_select is not None else None
        if sema_metrics is not None:
            metrics = dict(sema_metrics)
        elif sweep is not None:
            metrics = dict(sweep.chosen_row.metrics)
        else:
            metrics = metrics_of_saved_weights(state.log_history, held, callback.config, best_step)
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        add_sema_to_model_card(
            self.args.output_dir,  # type: ignore[attr-defined]
            callback.config,
            metrics,
            num_updates=callback.num_updates if callback.store is not None else None,
            num_switches=callback.num_switches if callback.store is not None else None,
            averaged_numel=_numel(model, trainable_only=True) or None,
            model_numel=_numel(model, trainable_only=False) or None,
            resolved_decay=callback.decay if callback.store is not None else None,
            final_weights_held=held,
            kept_because=_kept_because(callback, args, state) if held == "model" else None,
            posthoc=sweep,
        )


class SEMATrainer(SEMAModelCardMixin, EMAFirstCheckpointMixin, HandOverBindingMixin, RawWeightsOnErrorMixin, Trainer):
    """A `transformers.Trainer` whose model cards (``create_model_card``, ``push_to_hub``) describe the saved
    model (the average, or the raw weights when they were kept), whose checkpoints get their EMA files before the
    Trainer's own save, upload and rotation, whose training loop hands its binding to the callback, and whose
    ``evaluate()`` puts the raw weights back when it raises (`sema_hf.trainer`).

    It does no averaging itself: pass ``callbacks=[SEMACallback(...)]`` as usual.
    """


def _numel(model: Any, trainable_only: bool) -> int:
    # Under DeepSpeed ZeRO-3 a partitioned parameter is empty here; `ds_numel` holds its full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def _quality_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not k.endswith(_NOT_METRICS) and k not in ("epoch", "eval_epoch")
    }


def _format(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
