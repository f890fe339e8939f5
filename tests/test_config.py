import pytest
from transformers import HfArgumentParser

from sema_hf import SEMACallback, SEMAConfig

INVALID = [
    ("decay", 0.0, "(0, 1)"),
    ("decay", 1.0, "(0, 1)"),
    ("decay", "0.9", "(0, 1)"),
    ("warmup", "cosine", "'linear', 'exp', 'none'"),
    ("warmup_steps", -1, ">= 0"),
    ("warmup_ratio", 0.0, "(0, 1]"),
    ("warmup_ratio", 1.5, "(0, 1]"),
    ("update_every", 0, ">= 1"),
    ("update_every", 1.5, ">= 1"),
    ("update_after_step", -3, ">= 0"),
    ("switch_every_epochs", 0, ">= 1"),
    ("switch_start_epoch", -1, ">= 0"),
    ("switch_every_steps", 0, ">= 1"),
    ("evaluate_with", "raw", "'ema', 'model', 'both'"),
    ("include_buffers", "yes", "True or False"),
    ("final_weights", "best", "'ema', 'model'"),
    ("switch", 1, "True or False"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), INVALID)
def test_invalid_value_raises_value_error_naming_field_and_allowed_values(name, value, allowed):
    with pytest.raises(ValueError) as err:
        SEMAConfig(**{name: value})
    message = str(err.value)
    assert f"SEMAConfig.{name}" in message
    assert repr(value) in message
    assert allowed in message


def test_callback_accepts_field_overrides_and_validates_them():
    assert SEMACallback(decay=0.99).config.decay == 0.99
    assert SEMACallback(SEMAConfig(decay=0.9), update_every=2).config.update_every == 2
    with pytest.raises(ValueError, match="SEMAConfig.update_every"):
        SEMACallback(update_every=0)
    with pytest.raises(ValueError, match="unknown fields"):
        SEMACallback(decya=0.9)


def test_hf_argument_parser_exposes_every_field_as_a_flag():
    (config,) = HfArgumentParser(SEMAConfig).parse_args_into_dataclasses(
        [
            "--decay",
            "0.9999",
            "--warmup",
            "exp",
            "--switch_every_steps",
            "50",
            "--evaluate_with",
            "both",
            "--no_switch",
        ]
    )
    assert config == SEMAConfig(decay=0.9999, warmup="exp", switch_every_steps=50, evaluate_with="both", switch=False)
    with pytest.raises(SystemExit):
        HfArgumentParser(SEMAConfig).parse_args_into_dataclasses(["--warmup", "cosine"])


def test_config_round_trips_through_a_dict():
    config = SEMAConfig(decay=0.99, warmup_steps=10)
    assert SEMAConfig.from_dict(config.to_dict()) == config
