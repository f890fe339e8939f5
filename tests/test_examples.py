"""The example scripts end to end with tiny settings: what they save is the SEMA model, their model cards say so,
LoRA adapters hold the average, pushing sends the right folder (intercepted at the huggingface_hub boundary), and
run_clm.py runs on 2 processes under DDP and DeepSpeed ZeRO-3."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from concurrent.futures import Future

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import HfArgumentParser, TrainingArguments

from launch import REPO_ROOT, run_torchrun

EXAMPLES = os.path.join(REPO_ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import example_utils  # noqa: E402
import run_clm  # noqa: E402
import run_image_classification  # noqa: E402

from sema_hf import SEMACallback, SEMAConfig  # noqa: E402
from sema_hf.hub import SECTION_BEGIN, SEMA_TAGS  # noqa: E402

# A GPT-2 of ~9k parameters and a 300-token BPE (for runs from scratch) ...
TINY_GPT2 = ["--config_overrides", "n_embd=16,n_layer=1,n_head=2,n_positions=64", "--embedded_vocab_size", "300"]
# ... and a run of a few steps: seconds.
TINY_RUN = [
    "--block_size", "32",
    "--max_train_samples", "32",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--num_train_epochs", "2",
    "--logging_steps", "1",
    "--warmup_steps", "0",
    "--disable_tqdm", "True",
]  # fmt: skip
TINY_CLM = TINY_GPT2 + TINY_RUN
# The examples guard the switch by default (switch_policy="if_better"); tests of the switch itself ask for the paper's.
PLAIN_SWITCH = ["--switch_policy", "always"]
TINY_VIT = [
    "--config_overrides", "hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
    "--max_train_samples", "64",
    "--max_eval_samples", "32",
    "--per_device_train_batch_size", "16",
    "--num_train_epochs", "2",
    "--logging_steps", "1",
    "--warmup_steps", "0",
    "--disable_tqdm", "True",
]  # fmt: skip


class CapturedCallbacks(list):
    """The SEMACallbacks the scripts create, in order (the scripts do not return them)."""


@pytest.fixture
def captured(monkeypatch) -> CapturedCallbacks:
    found = CapturedCallbacks()
    original = example_utils.sema_callback_for

    def capture(mode, config):
        callback = original(mode, config)
        found.append(callback)
        return callback

    for module in (run_clm, run_image_classification):
        monkeypatch.setattr(module, "sema_callback_for", capture)
    return found


def _assert_equal_to_ema(saved: dict[str, torch.Tensor], callback: SEMACallback, rename=lambda k: k) -> None:
    ema = {rename(k): v for k, v in callback.ema_state_dict().items()}
    assert ema, "the callback averaged nothing"
    for name, average in ema.items():
        assert name in saved, f"{name} missing from the saved weights {sorted(saved)[:5]}..."
        torch.testing.assert_close(saved[name].float(), average, rtol=0, atol=0, msg=f"{name} is not the EMA")


def _card(folder: str) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


def _history(folder: str) -> list[dict]:
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)["log_history"]


def _switch_points(folder: str) -> list[dict]:
    """Everything logged at each switch point (each step with an ``ema_switched``), merged into one dict per point."""
    history = _history(folder)
    steps = sorted({h["step"] for h in history if "ema_switched" in h})
    return [{k: v for h in history if h["step"] == step for k, v in h.items()} for step in steps]


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    """One default-corpus run_clm.py (Switch EMA), reused as a 'pretrained' model by later tests."""
    out = str(tmp_path_factory.mktemp("clm") / "sema")
    found = []
    original = run_clm.sema_callback_for
    run_clm.sema_callback_for = lambda mode, config: found.append(original(mode, config)) or found[-1]
    try:
        metrics = run_clm.main(["--output_dir", out, *TINY_CLM, *PLAIN_SWITCH])
    finally:
        run_clm.sema_callback_for = original
    return out, metrics, found[0]


def test_run_clm_saves_the_sema_model_and_reports_its_perplexity(clm_run):
    out, metrics, callback = clm_run
    assert callback.num_switches == 2  # one per epoch
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    _assert_equal_to_ema(load_file(os.path.join(out, "model.safetensors")), callback)
    # The tokenizer trained on the embedded corpus is cached under the output folder and saved with the model.
    assert os.path.isfile(os.path.join(out, "_tokenizer-bpe300", "tokenizer.json"))
    model = run_clm.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(run_clm.AutoTokenizer.from_pretrained(out))
    card = _card(out)
    assert set(SEMA_TAGS) <= set(card.data.tags)
    assert SECTION_BEGIN in card.text and "2402.09240" in card.text
    assert f"| perplexity | {metrics['perplexity']:.4f} |" in card.text
    # The default horizon (0.3 epoch; of 4 optimizer steps here, which the callback raises to 2 steps) is in the card
    # as the per-step decay the run used.
    assert 0.0 < callback.decay < 1.0 and callback.config.horizon_epochs == 0.3
    assert f"Per-step decay used: {callback.decay:.6g} (horizon {1 / (1 - callback.decay):.4g} optimizer steps)." in (
        card.text
    )
    # Built from a config: no empty "fine-tuned version of [](https://huggingface.co/)" link, no base_model.
    assert "[](" not in card.text and "This model was trained from scratch on" in card.text
    assert card.data.get("base_model") is None
    # The random init was evaluated before training, and the script wrote some text at the end.
    assert metrics["before_eval_loss"] > metrics["eval_loss"]


def test_run_clm_prints_the_eval_before_and_after_training_and_some_generated_text(clm_run, capsys, tmp_path):
    pretrained, _, _ = clm_run
    out = str(tmp_path / "printed")
    args = ["--model_name_or_path", pretrained, "--output_dir", out, *TINY_RUN, *PLAIN_SWITCH]
    args += ["--generation_max_new_tokens", "5"]
    metrics = run_clm.main(args + ["--generation_prompts", "PROSPERO.\n", "MIRANDA."])
    printed = capsys.readouterr().out
    before = f"*** Before training (pretrained {pretrained}): eval_loss {metrics['before_eval_loss']:.4f}, perplexity"
    assert before in printed
    assert f"*** SEMA model, EMA weights: eval_loss {metrics['eval_loss']:.4f}" in printed
    samples = printed.split("*** What the trained model writes (greedy) ***", 1)[1].split("\n---\n")
    assert samples[0].lstrip("\n").startswith("PROSPERO.") and samples[1].startswith("MIRANDA.")
    assert metrics["before_perplexity"] == pytest.approx(math.exp(metrics["before_eval_loss"]))


@pytest.mark.parametrize("mode, switches", [("ema", 0), ("none", None)])
def test_run_clm_sema_mode_ema_never_switches_and_none_has_no_callback(clm_run, captured, tmp_path, mode, switches):
    pretrained, _, _ = clm_run
    out = str(tmp_path / mode)
    args = ["--model_name_or_path", pretrained, "--output_dir", out, "--sema_mode", mode, *TINY_RUN]
    metrics = run_clm.main(args)
    assert "eval_loss" in metrics
    card = _card(out)
    if mode == "none":
        assert captured == [None]
        assert SECTION_BEGIN not in card.text and "sema" not in (card.data.tags or [])
    else:
        (callback,) = captured
        assert not callback.config.switch and callback.num_switches == switches and callback.num_updates > 0
        _assert_equal_to_ema(load_file(os.path.join(out, "model.safetensors")), callback)
        assert "plain exponential moving average" in card.text


def test_run_clm_lora_averages_only_the_adapter_and_saves_its_average(clm_run, captured, tmp_path):
    from peft import PeftModel

    pretrained, _, _ = clm_run
    out = str(tmp_path / "lora")
    args = ["--model_name_or_path", pretrained, "--output_dir", out, "--use_lora", "--lora_r", "2", *TINY_RUN]
    args += PLAIN_SWITCH
    metrics = run_clm.main(args + ["--lora_target_modules", "c_attn", "c_proj"])
    (callback,) = captured
    assert 0 < metrics["ema_fraction_of_model"] < 0.5
    base = run_clm.AutoModelForCausalLM.from_pretrained(pretrained)
    assert callback.local_numel == metrics["ema_numel"] < sum(p.numel() for p in base.parameters())
    # PEFT saves adapter weights without the adapter name ("lora_A.weight", not "lora_A.default.weight").
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    _assert_equal_to_ema(saved, callback, rename=lambda k: k.replace(".default.", "."))
    loaded = PeftModel.from_pretrained(base, out)
    for name, value in callback.ema_state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    assert set(SEMA_TAGS) <= set(_card(out).data.tags)


def test_the_lora_adapter_depends_on_the_seed_not_on_what_loading_the_model_drew(clm_run, monkeypatch, tmp_path):
    """A model loaded fresh draws random numbers (weight init before the checkpoint is read); one deep-copied from
    a cache draws none. The adapter, initialized after loading, must not care (paired runs of a study rely on it)."""
    pretrained, _, _ = clm_run
    original = run_clm.load_model
    saved = []
    for draws in (0, 1000):

        def load_and_draw(*args, draws=draws, **kwargs):
            model = original(*args, **kwargs)
            torch.rand(draws)
            return model

        monkeypatch.setattr(run_clm, "load_model", load_and_draw)
        out = str(tmp_path / f"draws{draws}")
        args = ["--model_name_or_path", pretrained, "--output_dir", out, "--use_lora", "--lora_r", "2", *TINY_RUN]
        run_clm.main(args + ["--lora_target_modules", "c_attn", "--eval_before_training", "false"])
        saved.append(load_file(os.path.join(out, "adapter_model.safetensors")))
    assert saved[0].keys() == saved[1].keys()
    for name, value in saved[0].items():
        assert torch.equal(value, saved[1][name]), name


def test_push_to_hub_uploads_the_sema_model_with_its_card(captured, tmp_path, monkeypatch):
    """No network: the Trainer's Hub calls are intercepted on `huggingface_hub.HfApi`, and the folder it would
    upload is copied aside at the moment of the call."""
    sent, repos = [], []

    def fake_create_repo(self, repo_id, **kwargs):
        repos.append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, run_as_future=False, **kwargs):
        snapshot = tmp_path / f"sent-{len(sent)}"
        shutil.copytree(folder_path, snapshot, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
        sent.append((repo_id, str(snapshot), kwargs.get("commit_message")))
        info = huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="", commit_description="", oid="0"
        )
        if run_as_future:
            done = Future()
            done.set_result(info)
            return done
        return info

    def no_network(self, *args, **kwargs):
        raise AssertionError("an unexpected Hub call was made")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", no_network)
    out = str(tmp_path / "push")
    args = ["--output_dir", out, *TINY_CLM, *PLAIN_SWITCH]
    metrics = run_clm.main(args + ["--push_to_hub", "--hub_model_id", "someone/tiny-sema", "--hub_token", "fake"])

    assert repos == ["someone/tiny-sema"]
    repo_id, folder, message = sent[-1]
    assert repo_id == "someone/tiny-sema" and message == "End of training"
    (callback,) = captured
    # The tokenizer cache (_tokenizer-bpe300/) stays local; the tokenizer itself is saved next to the model.
    assert os.path.isdir(os.path.join(out, "_tokenizer-bpe300"))
    assert not any(name.startswith(("checkpoint-", "_")) for name in os.listdir(folder))
    _assert_equal_to_ema(load_file(os.path.join(folder, "model.safetensors")), callback)
    run_clm.AutoModelForCausalLM.from_pretrained(folder)
    run_clm.AutoTokenizer.from_pretrained(folder)
    card = _card(folder)
    assert set(SEMA_TAGS) <= set(card.data.tags)
    assert SECTION_BEGIN in card.text and "https://arxiv.org/abs/2402.09240" in card.text
    assert "| `horizon_epochs` | `0.3` |" in card.text and f"| eval_loss | {metrics['eval_loss']:.4f} |" in card.text


def test_run_image_classification_saves_the_sema_vit_and_its_accuracy(captured, tmp_path):
    out = str(tmp_path / "vit")
    metrics = run_image_classification.main(["--output_dir", out, *TINY_VIT, *PLAIN_SWITCH])
    (callback,) = captured
    assert callback.num_switches == 2
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_samples"] == 32
    # transformers 5 may rename tensors on save (legacy checkpoint names): compare what loads back.
    model = run_image_classification.AutoModelForImageClassification.from_pretrained(out)
    _assert_equal_to_ema(model.state_dict(), callback)
    assert model.config.id2label[3] == "3" and model.config.num_channels == 1
    assert "| eval_accuracy |" in _card(out).text


def test_run_image_classification_lora_keeps_the_head_trainable_and_saves_the_average(captured, tmp_path):
    from peft import PeftModel

    out = str(tmp_path / "vit-lora")
    metrics = run_image_classification.main(
        ["--output_dir", out, "--use_lora", "--lora_r", "2", *TINY_VIT, *PLAIN_SWITCH]
    )
    (callback,) = captured
    assert 0 < metrics["ema_fraction_of_model"] < 1
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    _assert_equal_to_ema(
        saved, callback, rename=lambda k: k.replace(".default.", ".").replace(".modules_to_save.", ".")
    )
    base = run_image_classification.AutoModelForImageClassification.from_pretrained(os.path.join(out, "base_model"))
    loaded = PeftModel.from_pretrained(base, out)
    for name, value in callback.ema_state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_held_out_validation_digits_are_training_digits_never_trained_on():
    held_out = run_image_classification.load_mnist(64, 32, validation=16)
    plain = run_image_classification.load_mnist(80, 32)
    assert (len(held_out["train"]), len(held_out["validation"]), len(held_out["test"])) == (64, 16, 32)
    assert held_out["validation"]["image"] == plain["train"]["image"][64:80]
    assert held_out["test"]["image"] == plain["validation"]["image"]  # the test digits, as without held-out digits


def test_if_better_decides_on_the_held_out_digits_and_the_test_digits_are_reported(captured, tmp_path):
    out = str(tmp_path / "vit-held-out")
    # Both are the defaults: the examples guard the switch, and held-out digits decide by their loss.
    metrics = run_image_classification.main(["--output_dir", out, *TINY_VIT, "--validation_samples", "16"])
    (callback,) = captured
    assert callback.config.switch_policy == "if_better"
    assert metrics["eval_test_samples"] == 32 and 0.0 <= metrics["eval_test_accuracy"] <= 1.0
    points = _switch_points(out)
    assert all("eval_test_loss" in at and "eval_ema_test_loss" in at for at in points)
    decisions = [at["ema_switched"] for at in points]
    expected = [float(at["eval_ema_validation_loss"] < at["eval_raw_validation_loss"]) for at in points]
    assert decisions == expected and len(decisions) == 2
    assert callback.num_switches == sum(decisions)


def test_posthoc_select_chooses_on_the_validation_digits_and_saves_the_choice(captured, tmp_path):
    out = str(tmp_path / "vit-posthoc")
    # No --posthoc_* flag: held-out digits turn post-hoc selection on by default (8 steps: a snapshot every step).
    metrics = run_image_classification.main(["--output_dir", out, *TINY_VIT, "--validation_samples", "16"])
    (callback,) = captured
    assert callback.config.posthoc_every_steps == 1
    assert callback.config.posthoc_select == "eval_validation_loss"  # never chosen on the test digits it reports
    sweep = callback.posthoc_sweep
    assert sweep.data == "eval_dataset['validation'] (16 examples)"  # the test digits are not even evaluated
    assert all(set(row.metrics) == {"eval_validation_loss", "eval_validation_accuracy"} for row in sweep.rows)
    assert sweep.chosen == min(sweep.rows, key=lambda r: r.score).label
    # The script's evaluation after training reads the model as saved: the chosen candidate.
    assert metrics["eval_validation_loss"] == pytest.approx(sweep.chosen_row.score, abs=1e-5)
    assert os.path.isfile(os.path.join(out, "posthoc_sweep.json")) and os.path.isfile(
        os.path.join(out, "posthoc_sweep.png")
    )
    assert f"**`{sweep.chosen}`**" in _card(out).text


def test_examples_turn_posthoc_selection_on_only_with_held_out_data_and_no_posthoc_flag():
    parser = HfArgumentParser((TrainingArguments, example_utils.SEMAExampleArguments))

    def decide(argv: list[str], eval_dataset: object) -> SEMAConfig:
        training_args, example_args = parser.parse_args_into_dataclasses(
            ["--output_dir", "unused", "--per_device_train_batch_size", "4", "--num_train_epochs", "3", *argv]
        )
        train = list(range(1000))  # 250 steps per epoch, 750 in all: 128 snapshots are one every 5 steps
        config, _ = example_utils.example_posthoc(argv, SEMAConfig(), example_args, training_args, eval_dataset, train)
        return config

    held_out = {"validation": [0], "test": [0]}
    on = decide([], held_out)
    assert (on.posthoc_every_steps, on.posthoc_select) == (5, "eval_loss")
    for argv, eval_dataset in (
        (["--posthoc_auto", "false"], held_out),  # turned off
        ([], [0]),  # no held-out set: the choice would be made on the data the run reports
        (["--sema_mode", "none"], held_out),
    ):
        assert decide(argv, eval_dataset).posthoc_every_steps is None, argv
    # A --posthoc_* flag the user gave wins (the parser applied it to the config already): nothing is added.
    training_args, example_args = parser.parse_args_into_dataclasses(["--output_dir", "unused"])
    given, why = example_utils.example_posthoc(
        ["--posthoc_every_steps", "7"], SEMAConfig(), example_args, training_args, held_out, list(range(100))
    )
    assert given.posthoc_select is None and "given" in why


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--validation_samples", "8", "--dataset_name", "some/images"], "--validation_dir"),
        (["--validation_samples", "60000"], "there are 60000"),
    ],
)
def test_held_out_validation_that_cannot_be_made_is_refused(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_image_classification.main(["--output_dir", str(tmp_path / "vit"), *TINY_VIT, *flags])


# ---- the main job: SmolLM2 with no flag at all -------------------------------------------------------------------
# A run of one optimizer step on 2 blocks of 16 tokens: the real 135M model, but seconds of compute (loading the GGUF
# is most of it, so the de-quantized model is loaded once for the module and deep-copied per run).
TINY_SMOLLM2_RUN = [
    "--block_size", "16",
    "--max_train_samples", "2",
    "--max_eval_samples", "2",
    "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2",
    "--num_train_epochs", "1",
    "--decay", "0.5",  # one step per epoch: the default horizon (0.3 epoch) would be under one step
    "--generation_max_new_tokens", "3",
    "--disable_tqdm", "True",
    *PLAIN_SWITCH,  # these tests are about what is saved and where it points
]  # fmt: skip


_SMOLLM2_LOADED: list = []  # the de-quantized model, loaded by the first test that needs it


@pytest.fixture
def smollm2_loader(monkeypatch):
    import copy

    original = run_clm.load_gguf_model

    def load_once(model_args):
        if not _SMOLLM2_LOADED:
            _SMOLLM2_LOADED.append(original(model_args))
        return copy.deepcopy(_SMOLLM2_LOADED[0])

    monkeypatch.setattr(run_clm, "load_gguf_model", load_once)
    return _SMOLLM2_LOADED


def test_run_clm_with_no_flags_fine_tunes_smollm2_on_the_embedded_corpus():
    defaults = run_clm.script_defaults([])
    assert defaults["model_name_or_path"] == run_clm.SMOLLM2 and defaults["use_lora"] is True
    assert {k: defaults[k] for k in run_clm.SMOLLM2_DEFAULTS} == run_clm.SMOLLM2_DEFAULTS
    # A from-scratch flag gets the small GPT-2 and its learning rate; other data keeps SmolLM2 at full size.
    for flag in (["--model_type", "gpt2"], ["--config_overrides", "n_layer=2"], ["--config_name", "gpt2"]):
        scratch = run_clm.script_defaults(flag)
        assert "model_name_or_path" not in scratch and scratch["learning_rate"] == 1e-3 and "use_lora" not in scratch
    other_data = run_clm.script_defaults(["--dataset_name", "Salesforce/wikitext"])
    assert other_data["model_name_or_path"] == run_clm.SMOLLM2 and "max_train_samples" not in other_data
    hub_model = run_clm.script_defaults(["--model_name_or_path", "openai-community/gpt2"])
    assert "use_lora" not in hub_model and "learning_rate" not in hub_model


def test_run_clm_default_full_fine_tune_of_smollm2_records_the_hub_id(smollm2_loader, captured, tmp_path, capsys):
    out = str(tmp_path / "smollm2-full")
    metrics = run_clm.main(["--output_dir", out, "--use_lora", "false", *TINY_SMOLLM2_RUN])
    printed = capsys.readouterr().out
    (callback,) = captured
    assert callback.num_switches == 1
    # A pretrained model: far below the loss of a uniform guess over its 49k-token vocabulary (ln 49152 = 10.8).
    assert metrics["before_eval_loss"] < 7.0
    assert f"*** Before training (pretrained {run_clm.SMOLLM2_HUB_ID})" in printed
    assert "*** What the trained model writes (greedy) ***\nPROSPERO." in printed
    _assert_equal_to_ema(load_file(os.path.join(out, "model.safetensors")), callback)
    card = _card(out)
    assert card.data.base_model == run_clm.SMOLLM2_HUB_ID
    assert f"fine-tuned version of [{run_clm.SMOLLM2_HUB_ID}](https://huggingface.co/{run_clm.SMOLLM2_HUB_ID})" in (
        card.text
    )
    for name in os.listdir(out):
        if name.endswith((".json", ".md")):
            with open(os.path.join(out, name), encoding="utf-8") as f:
                assert "site-packages" not in f.read(), f"{name} names this machine's package folder"


def test_run_clm_default_lora_adapter_of_smollm2_points_at_the_hub_id(smollm2_loader, captured, tmp_path):
    import json

    out = str(tmp_path / "smollm2-lora")
    metrics = run_clm.main(["--output_dir", out, "--lora_r", "2", *TINY_SMOLLM2_RUN])
    (callback,) = captured
    assert 0 < metrics["ema_fraction_of_model"] < 0.01  # only the adapter is averaged
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == run_clm.SMOLLM2_HUB_ID
    assert _card(out).data.base_model == run_clm.SMOLLM2_HUB_ID
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    _assert_equal_to_ema(saved, callback, rename=lambda k: k.replace(".default.", "."))


def test_a_gguf_checkpoint_is_converted_once_into_a_regular_safetensors_folder(monkeypatch):
    # A regular folder is what loads under DeepSpeed ZeRO-3's partitioned init; the GGUF itself cannot.
    args = run_clm.ModelArguments(model_name_or_path=run_clm.SMOLLM2)
    folder = run_clm.converted_gguf(args)  # converts on the machine's first call (about 40 s), else reads the cache
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        assert "quantization_config" not in json.load(f)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(example_utils.subprocess, "run", no_second_conversion)
    assert run_clm.converted_gguf(args) == folder
    model = run_clm.load_gguf_model(args)
    assert model.name_or_path == run_clm.SMOLLM2_HUB_ID and getattr(model.config, "quantization_config", None) is None


def test_a_failed_gguf_conversion_leaves_no_folder_behind(monkeypatch, tmp_path):
    failed = type("Done", (), {"returncode": 1, "stdout": "", "stderr": "out of memory"})()
    monkeypatch.setattr(example_utils.subprocess, "run", lambda *a, **k: failed)
    folder, gguf_file = run_clm._gguf_location(run_clm.ModelArguments(model_name_or_path=run_clm.SMOLLM2))
    with pytest.raises(RuntimeError, match="out of memory"):
        example_utils.gguf_checkpoint(folder, gguf_file, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path / "sema-hf" / "gguf") == []


# ---- mistyped paths ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["./my-model", "../models/gpt2", "/no/such/model", "~/models/x", "runs/a/b", "out/"])
def test_a_mistyped_local_model_path_says_it_does_not_exist_before_loading_anything(name, tmp_path):
    missing = name if not name.startswith("/") else str(tmp_path / name.lstrip("/"))
    for main, extra in ((run_clm.main, TINY_CLM), (run_image_classification.main, TINY_VIT)):
        with pytest.raises(ValueError, match="does not exist") as error:
            main(["--model_name_or_path", missing, "--output_dir", str(tmp_path / "out"), *extra])
        assert "--model_name_or_path" in str(error.value) and "Repo id" not in str(error.value)
    with pytest.raises(ValueError, match="--tokenizer_name .* does not exist"):
        run_clm.main(["--tokenizer_name", missing, "--output_dir", str(tmp_path / "out"), *TINY_CLM])


@pytest.mark.parametrize(
    "name, local",
    [("gpt2", False), ("openai-community/gpt2", False), ("smollm2", False), ("./gpt2", True), ("a/b/c", True)],
)
def test_only_names_that_cannot_be_hub_repo_ids_count_as_local_paths(name, local):
    assert example_utils.looks_like_local_path(name) is local


def test_an_existing_local_folder_is_accepted(clm_run, tmp_path):
    pretrained, _, _ = clm_run
    example_utils.check_local_path(pretrained, "model_name_or_path")  # no error
    example_utils.check_local_path("openai-community/gpt2", "model_name_or_path")  # a Hub id is not checked here


def test_the_horizon_is_the_examples_default_and_decay_replaces_it():
    sema_args = example_utils.sema_arguments(TrainingArguments)
    parser = HfArgumentParser((TrainingArguments, sema_args))
    defaults = {"horizon_epochs": 0.3, "output_dir": "x"}
    _, values = example_utils.parse_args(parser, [], defaults)
    assert example_utils.to_sema_config(values).horizon_epochs == 0.3
    for flag, value in (("--decay", "0.9"), ("--horizon_steps", "7")):
        parser = HfArgumentParser((TrainingArguments, sema_args))
        _, values = example_utils.parse_args(parser, [flag, value], defaults)
        config = example_utils.to_sema_config(values)
        assert config.horizon_epochs is None and getattr(config, flag[2:]) == float(value)


# ---- the examples' guarded switch ------------------------------------------------------------------------------
def _args(**kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir="x", report_to=[], use_cpu=True, **kwargs)


@pytest.mark.parametrize(
    "given, eval_set, args, policy",
    [
        (False, [1], {"eval_strategy": "epoch"}, "if_better"),
        (True, [1], {"eval_strategy": "epoch"}, "always"),  # --switch_policy always, as given
        (False, None, {"eval_strategy": "epoch"}, "always"),  # nothing to decide on
        (False, [1], {"eval_strategy": "no"}, "always"),
        (False, [1], {"eval_strategy": "steps", "eval_steps": 7}, "always"),  # misses the epoch ends
        (False, {"a": [1], "b": [1]}, {"eval_strategy": "epoch"}, "always"),  # which set decides?
        (False, {"a": [1], "b": [1]}, {"eval_strategy": "epoch", "metric_for_best_model": "a_loss"}, "if_better"),
    ],
)
def test_the_examples_guard_the_switch_wherever_the_run_can_decide_it(given, eval_set, args, policy):
    config = SEMAConfig()  # the library's own default stays the paper's rule
    assert config.switch_policy == "always"
    chosen, reason = example_utils.example_switch_policy(given, config, _args(**args), eval_set)
    assert chosen == policy and reason


def test_run_clm_by_default_copies_the_average_in_only_when_it_evaluates_better(captured, tmp_path, capsys):
    out = str(tmp_path / "guarded")
    run_clm.main(["--output_dir", out, *TINY_CLM])
    (callback,) = captured
    assert callback.config.switch_policy == "if_better"
    points = _switch_points(out)
    decisions = [at["ema_switched"] for at in points]
    expected = [float(at["eval_ema_loss"] < at["eval_raw_loss"]) for at in points]
    assert decisions == expected and len(decisions) == 2 and callback.num_switches == sum(decisions)
    # The run ends at the last switch point: the saved model is what its decision chose.
    assert callback.final_weights_held == ("ema" if decisions[-1] else "model")
    saved = load_file(os.path.join(out, "model.safetensors"))
    if decisions[-1]:
        _assert_equal_to_ema(saved, callback)
    else:
        ema = callback.ema_state_dict()
        assert any(not torch.equal(saved[k].float(), v) for k, v in ema.items() if k in saved)
    label = "EMA weights" if decisions[-1] else "raw weights"
    assert f"*** SEMA model, {label}" in capsys.readouterr().out


def test_sema_flags_match_the_config_and_the_clashing_one_is_prefixed():
    from transformers import HfArgumentParser, TrainingArguments

    sema_args = example_utils.sema_arguments(TrainingArguments)
    parser = HfArgumentParser((TrainingArguments, sema_args))
    training, values = parser.parse_args_into_dataclasses(
        ["--warmup_steps", "5", "--sema_warmup_steps", "7", "--decay", "0.9", "--switch", "False"]
    )
    config = example_utils.to_sema_config(values)
    assert training.warmup_steps == 5 and config.warmup_steps == 7
    assert config.decay == 0.9 and config.switch is False


MULTI_RANK_HORIZON = ["--horizon_steps", "1.5"]


def _ema_fractions(output: str) -> list[float]:
    """The per-rank EMA sizes the script prints, in percent of the model."""
    return sorted(float(x) for x in re.findall(r"SEMA: this process averages .*?= ([0-9.]+)% of the model", output))


def _assert_guarded_switch_decided_every_epoch(out: str) -> None:
    """The examples' default (if_better) under several ranks: one decision per epoch, on both evaluations."""
    points = _switch_points(out)
    for at in points:
        assert at["ema_switched"] == float(at["eval_ema_loss"] < at["eval_raw_loss"])
    assert len(points) == 2


@pytest.mark.multiprocess
def test_run_clm_ddp_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    # 2 ranks halve the steps per epoch (2 here): the default horizon of 0.3 epoch would be under one step.
    output = run_torchrun(os.path.join(EXAMPLES, "run_clm.py"), "--output_dir", out, *TINY_CLM, *MULTI_RANK_HORIZON)
    assert "world size 2" in output and re.search(r"\*\*\* SEMA model, (EMA|raw) weights.*: eval_loss", output)
    _assert_guarded_switch_decided_every_epoch(out)
    assert _ema_fractions(output) == [100.0, 100.0]  # DDP: every rank holds the full average
    assert set(SEMA_TAGS) <= set(_card(out).data.tags)
    run_clm.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.multiprocess
def test_run_clm_deepspeed_zero3_two_processes(tmp_path):
    out = str(tmp_path / "zero3")
    ds_config = os.path.join(EXAMPLES, "accelerate_configs", "ds_zero3.json")
    output = run_torchrun(
        os.path.join(EXAMPLES, "run_clm.py"),
        "--output_dir",
        out,
        "--deepspeed",
        ds_config,
        *TINY_CLM,
        *MULTI_RANK_HORIZON,
        timeout=400,
    )
    assert re.search(r"\*\*\* SEMA model, (EMA|raw) weights.*: eval_loss", output)
    _assert_guarded_switch_decided_every_epoch(out)
    fractions = _ema_fractions(output)  # ZeRO-3: each rank averages its own partition, about half
    assert len(fractions) == 2 and all(30.0 < f < 70.0 for f in fractions) and 99.0 < sum(fractions) < 101.0
    assert set(SEMA_TAGS) <= set(_card(out).data.tags)
    run_clm.AutoModelForCausalLM.from_pretrained(out)


# ---- study v2 (issue 18): label noise, the seed-major queue, paired differences -------------------------------------
def test_label_noise_gives_a_fixed_fraction_of_training_digits_a_wrong_label_and_leaves_the_rest():
    import datasets

    labels = [i % 10 for i in range(200)]
    features = datasets.Features({"label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    raw = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"label": labels}, features=features),
        validation=datasets.Dataset.from_dict({"label": labels[:20]}, features=features),
    )
    noisy = run_image_classification.with_label_noise(raw, 0.2)
    changed = [i for i, (a, b) in enumerate(zip(labels, noisy["train"]["label"], strict=True)) if a != b]
    assert len(changed) == 40  # every drawn label is moved to one of the nine others
    assert noisy["validation"]["label"] == labels[:20] and noisy["train"].features == raw["train"].features
    assert run_image_classification.with_label_noise(raw, 0.2)["train"]["label"] == noisy["train"]["label"]
    with pytest.raises(ValueError, match="label_noise"):
        run_image_classification.DataTrainingArguments(label_noise=1.0)


def test_study_queue_is_seed_major_and_runs_a_shared_run_once():
    import sema_study

    queue = sema_study.study_queue(["mnist-noisy", "mnist-noisy-lr-constant", "mnist-noisy-horizon"], None)
    seeds = [seed for _, _, seed in queue]
    assert seeds == sorted(seeds)  # every variant has the same seeds wherever the study stops
    ids = [sema_study.run_id(sema_study.PIECES[name].task, variant, seed) for name, variant, seed in queue]
    assert len(ids) == len(set(ids)) == 5 * (4 + 4 + 2 * 4)  # the horizon sweep shares none and H = 0.3 epoch
    assert sema_study.MNIST_V2.steps_per_epoch == 200 and sema_study.GPT2_V2.steps_per_epoch == 300
    only = sema_study.study_queue(["mnist-noisy"], [3])
    assert [seed for _, _, seed in only] == [3] * 4


def test_study_paired_table_calls_a_difference_only_beyond_the_spread_of_the_paired_differences():
    import sema_study

    task = sema_study.Task(**{**sema_study.asdict(sema_study.MNIST_V2), "epochs": 4})
    piece = sema_study.Piece("p", task, tuple(sema_study._trio()), "q?", seeds=(0, 1, 2))
    gains = {"none": [0.0, 0.0, 0.0], "ema": [0.01, 0.012, 0.011], "sema": [0.02, -0.03, 0.0]}
    runs = {}
    for variant in piece.variants:
        for seed in piece.seeds:
            values = [0.5 + 0.1 * e + gains[variant.mode][seed] + 0.01 * seed for e in range(4)]
            steps = [task.steps_per_epoch * (e + 1) for e in range(4)]
            runs[sema_study.run_id(task, variant, seed)] = {"curve": {"steps": steps, "values": values}}
    lines, out = sema_study.paired_table(piece, runs)
    ema, sema = out["variants"]["ema H=0.3 ep"], out["variants"]["sema H=0.3 ep"]
    assert ema["called"] and ema["delta_final"]["mean"] == pytest.approx(0.011)
    assert not sema["called"] and sema["delta_final"]["values"] == pytest.approx([0.02, -0.03, 0.0])
    assert ema["delta_at"][0.5]["mean"] == pytest.approx(0.011)  # epoch 2 of 4
    assert "| `ema H=0.3 ep` | 0.0110 ± 0.0010 | +0.0100, +0.0120, +0.0110 | 3/3 | yes: better |" in lines[2]
