"""sema_hf.hub: the SEMA section and tags of model cards (the Trainer path is covered in test_examples.py)."""

from __future__ import annotations

from huggingface_hub import ModelCard

from sema_hf import SEMAConfig
from sema_hf.hub import SECTION_BEGIN, SECTION_END, add_sema_to_model_card, last_eval_metrics


def test_add_sema_to_model_card_keeps_the_card_and_merges_tags(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- generated_from_trainer\n---\n\n# my model\n")
    add_sema_to_model_card(str(tmp_path), SEMAConfig(decay=0.995), {"eval_loss": 1.5, "eval_runtime": 3.0})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit"
    assert card.data.tags == ["generated_from_trainer", "sema", "switch-ema"]
    assert card.text.index("# my model") < card.text.index(SECTION_BEGIN)
    assert "| `decay` | `0.995` |" in card.text and "| eval_loss | 1.5000 |" in card.text
    assert "eval_runtime" not in card.text and "arxiv.org/abs/2402.09240" in card.text


def test_add_sema_to_model_card_twice_replaces_the_section(tmp_path):
    add_sema_to_model_card(str(tmp_path), SEMAConfig(), {"eval_loss": 2.0}, num_switches=1)
    add_sema_to_model_card(str(tmp_path), SEMAConfig(switch=False), {"eval_loss": 1.0}, num_switches=0)
    text = (tmp_path / "README.md").read_text()
    assert text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1
    assert "| eval_loss | 1.0000 |" in text and "2.0000" not in text
    assert "plain exponential moving average" in text and "0 switches" in text
    assert ModelCard.load(tmp_path / "README.md").data.tags == ["sema", "switch-ema"]


def test_last_eval_metrics_prefers_the_ema_evaluation():
    history = [
        {"loss": 3.0, "step": 1},
        {"eval_loss": 2.0, "eval_ema_loss": 1.8, "step": 2},
        {"loss": 2.5, "step": 3},
    ]
    assert last_eval_metrics(history) == {"eval_loss": 1.8}
    assert last_eval_metrics([{"eval_loss": 2.0}, {"loss": 1.0}]) == {"eval_loss": 2.0}
    assert last_eval_metrics([{"loss": 1.0}]) == {}


def test_fix_empty_base_model_link_says_trained_from_scratch_and_leaves_real_links_alone(tmp_path):
    from sema_hf.hub import fix_empty_base_model_link

    empty = "---\nlicense: mit\n---\n\n# m\n\nThis model is a fine-tuned version of [](https://huggingface.co/) on the x dataset.\n"
    (tmp_path / "README.md").write_text(empty)
    assert fix_empty_base_model_link(str(tmp_path)) is True
    card = ModelCard.load(tmp_path / "README.md")
    assert "This model was trained from scratch on the x dataset." in card.text and "[](" not in card.text
    assert card.data.license == "mit"
    real = (
        "---\nbase_model: a/b\n---\n\nThis model is a fine-tuned version of [a/b](https://huggingface.co/a/b) on y.\n"
    )
    (tmp_path / "README.md").write_text(real)
    assert fix_empty_base_model_link(str(tmp_path)) is False
    assert "[a/b](https://huggingface.co/a/b)" in (tmp_path / "README.md").read_text()
    assert fix_empty_base_model_link(str(tmp_path / "missing")) is False


def test_the_card_states_the_per_step_decay_a_horizon_resolved_to(tmp_path):
    add_sema_to_model_card(str(tmp_path), SEMAConfig(horizon_epochs=0.5), {"eval_loss": 1.0}, resolved_decay=0.75)
    text = (tmp_path / "README.md").read_text()
    assert "| `horizon_epochs` | `0.5` |" in text and "Per-step decay used: 0.75 (horizon 4 optimizer steps)." in text
    add_sema_to_model_card(str(tmp_path), SEMAConfig(decay=0.9), {"eval_loss": 1.0})
    assert "Per-step decay used" not in (tmp_path / "README.md").read_text()
