"""What a user sets: `SEMAConfig`.

The fields carry `metadata={"help": ...}` so that `transformers.HfArgumentParser` turns the dataclass into
command-line flags unchanged (the examples do exactly that). Every field is validated in `__post_init__`; a bad value
raises `ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

WARMUP_KINDS = ("linear", "exp", "none")
EVALUATE_WITH = ("ema", "model", "both")
FINAL_WEIGHTS = ("ema", "model")


@dataclass
class SEMAConfig:
    """Settings of Switch EMA (Li et al., arXiv 2402.09240).

    After every optimizer step ``t`` the fp32 average follows the weights ``theta``::

        ema <- m_t * ema + (1 - m_t) * theta

    and at the end of every ``switch_every_epochs``-th epoch (from ``switch_start_epoch`` on) the average is copied
    into the model, which trains on from there. Typical decays: 0.999 for fine-tuning and SGD-trained CNNs, 0.9999
    for long AdamW runs of ViTs. The averaging horizon is about ``1 / (1 - decay)`` optimizer steps (1000 at 0.999).
    """

    decay: float = field(
        default=0.999,
        metadata={"help": "EMA decay m in (0, 1). Horizon ~ 1/(1-m) optimizer steps: 0.999 -> 1000, 0.9999 -> 10000."},
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
    allow_fresh_ema_on_resume: bool = field(
        default=False,
        metadata={
            "help": "On resume, start a fresh average from the restored weights when the checkpoint holds no EMA "
            "state, instead of raising an error."
        },
    )

    def __post_init__(self) -> None:
        _check(
            isinstance(self.decay, float | int) and 0.0 < self.decay < 1.0, "decay", self.decay, "a float in (0, 1)"
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
        _check(self.evaluate_with in EVALUATE_WITH, "evaluate_with", self.evaluate_with, f"one of {EVALUATE_WITH}")
        _check(isinstance(self.include_buffers, bool), "include_buffers", self.include_buffers, "True or False")
        _check(self.final_weights in FINAL_WEIGHTS, "final_weights", self.final_weights, f"one of {FINAL_WEIGHTS}")
        _check(
            isinstance(self.allow_fresh_ema_on_resume, bool),
            "allow_fresh_ema_on_resume",
            self.allow_fresh_ema_on_resume,
            "True or False",
        )
        self.decay = float(self.decay)
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
        """A validated copy with some fields changed; unknown names are an error."""
        return SEMAConfig.from_dict({**self.to_dict(), **overrides})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SEMAConfig.{name} = {value!r} is invalid: expected {allowed}.")
