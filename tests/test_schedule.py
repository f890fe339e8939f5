import pytest

from sema_hf.schedule import (
    EMAAction,
    completed_epochs_at_epoch_end,
    effective_decay,
    ema_action,
    resolve_warmup_steps,
    should_switch_at_epoch_end,
    should_switch_at_step,
    warmup_decay,
)

# Hand-computed with m = 0.999, r = 0.9, T = 10:
#   linear m_t = m (1 - 0.1 (1 - t/10)); exp m_t = m 0.9^(1 - t/10)
HAND_DECAYS = [
    ("linear", 0, 0.999 * 0.9),
    ("linear", 5, 0.999 * 0.95),
    ("linear", 9, 0.999 * 0.99),
    ("linear", 10, 0.999),
    ("linear", 500, 0.999),
    ("exp", 0, 0.999 * 0.9),
    ("exp", 5, 0.999 * 0.9**0.5),
    ("exp", 10, 0.999),
    ("none", 0, 0.999),
    ("none", 3, 0.999),
]


@pytest.mark.parametrize(("kind", "step", "expected"), HAND_DECAYS)
def test_warmup_decay_matches_hand_computed_values(kind, step, expected):
    assert warmup_decay(step, 0.999, kind, 10, 0.9) == pytest.approx(expected, rel=1e-12)


def test_linear_warmup_rises_monotonically_to_the_decay():
    values = [warmup_decay(t, 0.9999, "linear", 100, 0.9) for t in range(101)]
    assert values == sorted(values) and values[-1] == 0.9999


def test_update_every_k_raises_decay_to_power_k_to_keep_the_horizon():
    assert effective_decay(50, 0.99, "none", 0, 0.9, 4) == pytest.approx(0.99**4)
    # After 4 steps the weight left on the old average is the same whether updating every step or every 4th.
    assert effective_decay(7, 0.99, "linear", 10, 0.9, 2) == pytest.approx((0.99 * (1 - 0.1 * 0.3)) ** 2)


def test_zero_warmup_steps_means_no_warmup():
    assert warmup_decay(0, 0.999, "linear", 0, 0.9) == 0.999


def test_ema_action_copies_until_update_after_step_then_updates_every_k():
    actions = [ema_action(t, 2, 3) for t in range(1, 9)]
    C, U, S = EMAAction.COPY, EMAAction.UPDATE, EMAAction.SKIP
    assert actions == [C, C, C, U, S, U, S, U]
    assert [ema_action(t, 1, 0) for t in (1, 2, 3)] == [U, U, U]


# (epoch index e (0-based), every, start) -> switch at the end of epoch e?
SWITCH_TABLE = [
    (0, 1, 0, True),
    (1, 1, 0, True),
    (4, 1, 5, False),
    (5, 1, 5, True),
    (0, 2, 0, False),
    (1, 2, 0, True),
    (2, 2, 0, False),
    (3, 2, 0, True),
    (3, 2, 4, False),
    (5, 2, 4, True),
    (2, 3, 0, True),
    (3, 3, 0, False),
]


@pytest.mark.parametrize(("epoch", "every", "start", "expected"), SWITCH_TABLE)
def test_switch_rule_at_epoch_end(epoch, every, start, expected):
    assert should_switch_at_epoch_end(epoch + 1, every, start) is expected


def _openmixup_hook_rule(epoch: int, every: int, start: int) -> bool:
    """The authors' openmixup hook: ``if not every_n_epochs(runner, every)`` guards the switch, inverted."""
    return epoch + 1 > start and (epoch + 1) % every != 0


def test_switch_rule_is_not_the_inverted_openmixup_hook():
    # At interval 1 (switch every epoch) the inverted rule never switches; ours switches at every epoch end.
    assert [should_switch_at_epoch_end(e + 1, 1, 0) for e in range(5)] == [True] * 5
    assert [_openmixup_hook_rule(e, 1, 0) for e in range(5)] == [False] * 5
    # At interval 2 the two rules disagree on every epoch.
    for e in range(6):
        assert should_switch_at_epoch_end(e + 1, 2, 0) != _openmixup_hook_rule(e, 2, 0)


def test_step_switch_every_n_steps_after_averaging_starts():
    assert [t for t in range(1, 13) if should_switch_at_step(t, 4, 0)] == [4, 8, 12]
    assert [t for t in range(1, 13) if should_switch_at_step(t, 4, 4)] == [8, 12]
    assert not any(should_switch_at_step(t, None, 0) for t in range(1, 13))


def test_completed_epochs_only_for_whole_epochs():
    assert completed_epochs_at_epoch_end(1.0) == 1
    assert completed_epochs_at_epoch_end(3.0000000001) == 3
    assert completed_epochs_at_epoch_end(2.5) is None
    assert completed_epochs_at_epoch_end(None) is None


def test_default_warmup_is_one_epoch_of_optimizer_steps():
    assert resolve_warmup_steps(None, 10) == 10  # the Trainer's steps per epoch, whatever max_steps is
    assert resolve_warmup_steps(7, 10) == 7
    assert resolve_warmup_steps(None, None) == 0
