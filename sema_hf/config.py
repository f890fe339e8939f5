"""What a user sets: `SEMAConfig`.

The fields carry `metadata={"help": ...}` so that `transformers.HfArgumentParser` turns the dataclass into
command-line flags unchanged (the examples do exactly that). Every field is validated in `__post_init__`; a bad value
raises `ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .selection import parse_grid

WARMUP_KINDS = ("linear", "exp", "none")
EVALUATE_WITH = ("ema", "model", "both")
FINAL_WEIGHTS = ("ema", "model")
SWITCH_POLICIES = ("always", "if_better")
POSTHOC_DTYPES = ("float32", "bfloat16")
# sigma_rel of a power-function profile with exponent 0 (sema_hf.posthoc.SIGMA_REL_MAX): tracked profiles stay below.
POSTHOC_SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
HORIZON_FIELDS = ("decay", "horizon_epochs", "horizon_steps")
# The horizon used when none of decay / horizon_steps / horizon_epochs is given. Chosen on docs/evidence study v1
# (a ViT from scratch on MNIST, 40 epochs of 8 steps, 3 seeds), whose horizon trend for SEMA (-1.5 +- 4.0 points at
# 0.3 epochs, -2.5 at 1, -7.6 at 3) did not survive three other seeds. Study v2 (200 steps per epoch, 20 epochs,
# 5 seeds, cosine lr, 20% label noise) measured SEMA best at 1 epoch (+2.1 +- 1.1 points over no averaging, +1.2 +-
# 0.9 over 0.3 epoch, every seed) and losing at 6 (-8.7), and plain EMA gaining with the horizon up to 6 epochs
# (+0.0 at 0.3, +1.0 at 3, +1.7 at 6). Study v3 swept the LM (GPT-2 from scratch, 300 steps per epoch): SEMA lost
# +0.038, +0.135, +0.326 (+- 0.003 to 0.011) eval loss at 0.3, 1, 3 epochs, so 1 epoch did not win in both regimes
# and 0.3 stays; the final average's horizon is better chosen after training (posthoc_select; study v3 matched the
# best fixed horizon).
DEFAULT_HORIZON_EPOCHS = 0.3


@dataclass
class SEMAConfig:
    """Settings of Switch EMA (Li et al., arXiv 2402.09240).

    After every optimizer step ``t`` the fp32 average follows the weights ``theta``::

        ema <- m_t * ema + (1 - m_t) * theta

    and at the end of every ``switch_every_epochs``-th epoch (from ``switch_start_epoch`` on) the average is copied
    into the model, which trains on from there.

    How far back the average reaches is its horizon ``H = 1 / (1 - m)`` optimizer steps (1000 at m = 0.999). What
    decides whether averaging helps is H against the epoch and the run, so the decay can be given in any of three
    units, at most one of them explicitly: ``decay`` (m itself), ``horizon_steps`` (H) or ``horizon_epochs``
    (H / optimizer steps per epoch, resolved at train start from the Trainer's real steps per epoch, after
    gradient accumulation and world size). With none of them, ``horizon_epochs = DEFAULT_HORIZON_EPOCHS`` (0.3):
    in our measurements (docs/evidence: a 40-epoch ViT run from scratch, 3 seeds, horizons 0.15 to 3 epochs) plain
    EMA tied no averaging at every horizon and Switch EMA lost the less the shorter the horizon, and an average that
    is a third of an epoch deep cannot reach back into the barely trained weights of a short run.
    """

    decay: float | None = field(
        default=None,
        metadata={
            "help": "EMA decay m in (0, 1). Horizon ~ 1/(1-m) optimizer steps: 0.999 -> 1000, 0.9999 -> 10000. "
            f"At most one of decay, horizon_steps, horizon_epochs; none given: horizon_epochs={DEFAULT_HORIZON_EPOCHS}."
        },
    )
    horizon_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Averaging horizon H = 1/(1-m) in epochs (e.g. 0.3): the decay is resolved at train start from "
            "the Trainer's optimizer steps per epoch. Instead of decay."
        },
    )
    horizon_steps: float | None = field(
        default=None,
        metadata={"help": "Averaging horizon H = 1/(1-m) in optimizer steps (> 1). Instead of decay."},
    )
    warmup: str = field(
        default="linear",
        metadata={
            "help": "Decay warmup over `warmup_steps` optimizer steps: 'linear' m_t = m(1-(1-r)(1-t/T)), "
            "'exp' m_t = m r^(1-t/T), or 'none' (m_t = m).",
            "choices": list(WARMUP_KINDS),
        },
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Length T of the decay warmup in optimizer steps. Default (None): one epoch of optimizer steps, "
            "as the Trainer counts them. 0 disables the warmup."
        },
    )
    warmup_ratio: float = field(
        default=0.9,
        metadata={"help": "Warmup ratio r in (0, 1]: the decay starts at about r*m and reaches m after T steps."},
    )
    update_every: int = field(
        default=1,
        metadata={
            "help": "Update the average every k optimizer steps (k >= 1); the decay is raised to m**k so the "
            "averaging horizon in steps stays the same."
        },
    )
    update_after_step: int = field(
        default=0,
        metadata={
            "help": "Until this optimizer step the average is a copy of the weights; averaging starts after it."
        },
    )
    switch: bool = field(
        default=True,
        metadata={"help": "Copy the average into the model at switch points (Switch EMA). False gives plain EMA."},
    )
    switch_every_epochs: int = field(
        default=1,
        metadata={"help": "Switch at the end of every N-th epoch (N >= 1), counted from the first epoch."},
    )
    switch_start_epoch: int = field(
        default=0,
        metadata={
            "help": "Switch only at ends of epochs e (0-based) with e + 1 > this value. 0 switches from the first "
            "epoch (the right default for short fine-tuning; the paper uses 5 for 300-epoch runs)."
        },
    )
    switch_every_steps: int | None = field(
        default=None,
        metadata={
            "help": "For runs counted in steps (max_steps, streaming data): switch every N optimizer steps instead "
            "of at epoch ends."
        },
    )
    switch_policy: str = field(
        default="always",
        metadata={
            "help": "'always' copies the average in at every switch point (the paper's rule); 'if_better' evaluates "
            "both weight sets there (metric_for_best_model, default loss) and copies the average only when it "
            "scores better. 'if_better' needs an evaluation at every switch point.",
            "choices": list(SWITCH_POLICIES),
        },
    )
    evaluate_with: str = field(
        default="ema",
        metadata={
            "help": "Weights that evaluation during training uses: 'ema', 'model', or 'both' (logs eval_* for the "
            "model and eval_ema_* for the average).",
            "choices": list(EVALUATE_WITH),
        },
    )
    include_buffers: bool = field(
        default=False,
        metadata={
            "help": "Also average floating-point buffers (e.g. BatchNorm statistics). Default: parameters only."
        },
    )
    final_weights: str = field(
        default="ema",
        metadata={
            "help": "Weights the model holds when training ends, and so what save_model()/push_to_hub() write: "
            "'ema' or 'model'.",
            "choices": list(FINAL_WEIGHTS),
        },
    )
    shard_under_ddp: bool = field(
        default=False,
        metadata={
            "help": "Under DDP with W ranks, each rank averages only a contiguous 1/W of the trainable elements "
            "(no communication per update; one all-gather per switch or evaluation)."
        },
    )
    posthoc_every_steps: int | None = field(
        default=None,
        metadata={
            "help": "Post-hoc EMA: also track power-function EMA profiles (posthoc_sigma_rels) of every rank's shard "
            "and snapshot them every N optimizer steps and at the end, so that any averaging horizon can be "
            "reconstructed after training (sema_hf.posthoc). None (default): off. About run length / 64 or less."
        },
    )
    posthoc_sigma_rels: tuple[float, ...] = field(
        default=(0.05, 0.10),
        metadata={
            "help": "Relative widths of the tracked power-function profiles (EDM2's 0.05 and 0.10), each in "
            "(0, 0.288); an exponential EMA of horizon H at step T resembles sigma_rel ~ H / T.",
            "nargs": "+",
        },
    )
    posthoc_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the post-hoc snapshot files: 'float32' or 'bfloat16' (half the bytes; rounding is "
            "amplified by the fit's weights). The tracked profiles are always fp32.",
            "choices": list(POSTHOC_DTYPES),
        },
    )
    allow_fresh_ema_on_resume: bool = field(
        default=False,
        metadata={
            "help": "On resume, start a fresh average from the restored weights when the checkpoint holds no EMA "
            "state, instead of raising an error."
        },
    )

    posthoc_select: str | None = field(
        default=None,
        metadata={
            "help": "Choose the average after training: a metric key (e.g. 'eval_loss', 'eval_accuracy'). At the end "
            "of train() SEMA evaluates the post-hoc averages of posthoc_grid, the classic EMA and the raw weights on "
            "the eval set and puts the best into the model (save_model/push_to_hub write it). Direction: "
            "TrainingArguments.greater_is_better for metric_for_best_model's key, else lower is better for *loss. "
            "Needs posthoc_every_steps and an eval set."
        },
    )
    posthoc_grid: list[str] | None = field(
        default=None,
        metadata={
            "help": "The post-hoc targets posthoc_select compares, e.g. sigma_rel=0.07 horizon_epochs=1 "
            "horizon_steps=500. Default (None): relative widths around the tracked posthoc_sigma_rels and the "
            "horizons 0.3, 1 and 3 epochs where they are reachable (sema_hf.selection.default_grid)."
        },
    )

    def __post_init__(self) -> None:
        given = [name for name in HORIZON_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                f"SEMAConfig got both {given[0]}={getattr(self, given[0])!r} and {given[1]}={getattr(self, given[1])!r}: "
                "they set the same averaging horizon; give at most one of decay, horizon_steps, horizon_epochs."
            )
        _check(
            self.decay is None or (_is_number(self.decay) and 0.0 < self.decay < 1.0),
            "decay",
            self.decay,
            "None or a float in (0, 1)",
        )
        _check(
            self.horizon_steps is None or (_is_number(self.horizon_steps) and self.horizon_steps > 1.0),
            "horizon_steps",
            self.horizon_steps,
            "None or a number of optimizer steps > 1",
        )
        _check(
            self.horizon_epochs is None
            or (_is_number(self.horizon_epochs) and self.horizon_epochs > 0.0 and math.isfinite(self.horizon_epochs)),
            "horizon_epochs",
            self.horizon_epochs,
            "None or a number of epochs > 0",
        )
        _check(self.warmup in WARMUP_KINDS, "warmup", self.warmup, f"one of {WARMUP_KINDS}")
        _check(
            self.warmup_steps is None or (_is_int(self.warmup_steps) and self.warmup_steps >= 0),
            "warmup_steps",
            self.warmup_steps,
            "None or an int >= 0",
        )
        _check(
            isinstance(self.warmup_ratio, float | int) and 0.0 < self.warmup_ratio <= 1.0,
            "warmup_ratio",
            self.warmup_ratio,
            "a float in (0, 1]",
        )
        _check(_is_int(self.update_every) and self.update_every >= 1, "update_every", self.update_every, "an int >= 1")
        _check(
            _is_int(self.update_after_step) and self.update_after_step >= 0,
            "update_after_step",
            self.update_after_step,
            "an int >= 0",
        )
        _check(isinstance(self.switch, bool), "switch", self.switch, "True or False")
        _check(
            _is_int(self.switch_every_epochs) and self.switch_every_epochs >= 1,
            "switch_every_epochs",
            self.switch_every_epochs,
            "an int >= 1",
        )
        _check(
            _is_int(self.switch_start_epoch) and self.switch_start_epoch >= 0,
            "switch_start_epoch",
            self.switch_start_epoch,
            "an int >= 0",
        )
        _check(
            self.switch_every_steps is None or (_is_int(self.switch_every_steps) and self.switch_every_steps >= 1),
            "switch_every_steps",
            self.switch_every_steps,
            "None or an int >= 1",
        )
        _check(self.switch_policy in SWITCH_POLICIES, "switch_policy", self.switch_policy, f"one of {SWITCH_POLICIES}")
        _check(self.evaluate_with in EVALUATE_WITH, "evaluate_with", self.evaluate_with, f"one of {EVALUATE_WITH}")
        _check(isinstance(self.include_buffers, bool), "include_buffers", self.include_buffers, "True or False")
        _check(self.final_weights in FINAL_WEIGHTS, "final_weights", self.final_weights, f"one of {FINAL_WEIGHTS}")
        _check(isinstance(self.shard_under_ddp, bool), "shard_under_ddp", self.shard_under_ddp, "True or False")
        _check(
            isinstance(self.allow_fresh_ema_on_resume, bool),
            "allow_fresh_ema_on_resume",
            self.allow_fresh_ema_on_resume,
            "True or False",
        )
        _check(
            self.posthoc_every_steps is None or (_is_int(self.posthoc_every_steps) and self.posthoc_every_steps >= 1),
            "posthoc_every_steps",
            self.posthoc_every_steps,
            "None (off) or an int >= 1 (optimizer steps between snapshots)",
        )
        sigmas = _numbers_from_flags(self.posthoc_sigma_rels)
        _check(
            isinstance(sigmas, tuple | list)
            and len(sigmas) >= 1
            and all(_is_number(s) and 0.0 < s < POSTHOC_SIGMA_REL_MAX for s in sigmas)
            and len(set(sigmas)) == len(sigmas),
            "posthoc_sigma_rels",
            sigmas,
            f"a non-empty tuple of distinct numbers in (0, {POSTHOC_SIGMA_REL_MAX:.4f}), e.g. (0.05, 0.10)",
        )
        self.posthoc_sigma_rels = tuple(float(s) for s in sigmas)
        _check(self.posthoc_dtype in POSTHOC_DTYPES, "posthoc_dtype", self.posthoc_dtype, f"one of {POSTHOC_DTYPES}")
        _check(
            self.posthoc_select is None or (isinstance(self.posthoc_select, str) and self.posthoc_select.strip()),
            "posthoc_select",
            self.posthoc_select,
            "None or a metric key such as 'eval_loss'",
        )
        if self.posthoc_select is not None:
            if self.posthoc_every_steps is None:
                raise ValueError(
                    f"SEMAConfig.posthoc_select = {self.posthoc_select!r} chooses among post-hoc averages, but "
                    "posthoc_every_steps is None (post-hoc tracking is off): set posthoc_every_steps (e.g. 100, "
                    "snapshots every 100 optimizer steps) or leave posthoc_select at None."
                )
            if self.final_weights != "ema":
                raise ValueError(
                    f"SEMAConfig.final_weights = {self.final_weights!r} with posthoc_select = {self.posthoc_select!r}: "
                    "the selection decides what the model holds at the end (the raw weights are one of its "
                    "candidates), so final_weights must stay at its default 'ema'; drop one of them."
                )
        if self.posthoc_grid is not None:
            if isinstance(self.posthoc_grid, str):
                self.posthoc_grid = [self.posthoc_grid]
            self.posthoc_grid = [target.label for target in parse_grid(self.posthoc_grid)]
        for name in HORIZON_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))
        self.warmup_ratio = float(self.warmup_ratio)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (stored in checkpoints and model cards)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SEMAConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"SEMAConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def replace(self, **overrides: Any) -> SEMAConfig:
        """A validated copy with some fields changed; unknown names are an error. Setting one of ``decay``,
        ``horizon_steps``, ``horizon_epochs`` clears the other two (they set the same thing)."""
        values = self.to_dict()
        if any(overrides.get(name) is not None for name in HORIZON_FIELDS):
            values.update(dict.fromkeys(HORIZON_FIELDS))
        return SEMAConfig.from_dict({**values, **overrides})

    @property
    def horizon_unit(self) -> str:
        """Which of ``decay``, ``horizon_steps``, ``horizon_epochs`` sets the horizon (the default when none is given)."""
        return next((name for name in HORIZON_FIELDS if getattr(self, name) is not None), "the default horizon_epochs")


def _is_number(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers_from_flags(values: Any) -> Any:
    """``posthoc_sigma_rels`` as numbers. HfArgumentParser calls the annotation on every command-line value
    (``tuple[float, ...]("0.05")`` gives the characters ``('0', '.', '0', '5')``): join such values back and parse
    them; anything else is returned for validation as is."""
    if not isinstance(values, tuple | list):
        return values
    out = []
    for v in values:
        if isinstance(v, tuple | list) and v and all(isinstance(c, str) for c in v):
            v = "".join(v)
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                return values
        out.append(v)
    return type(values)(out)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SEMAConfig.{name} = {value!r} is invalid: expected {allowed}.")
