"""The example scripts end to end with tiny settings: what they save is the SEMA model, their model cards say so,
LoRA adapters hold the average, pushing sends the right folder (intercepted at the huggingface_hub boundary), and
run_clm.py runs on 2 processes under DDP and DeepSpeed ZeRO-3."""

from __future__ import annotations

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

from launch import REPO_ROOT, run_torchrun

EXAMPLES = os.path.join(REPO_ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import example_utils  # noqa: E402
import run_clm  # noqa: E402
import run_image_classification  # noqa: E402

from sema_hf import SEMACallback  # noqa: E402
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


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    """One default-corpus run_clm.py (Switch EMA), reused as a 'pretrained' model by later tests."""
    out = str(tmp_path_factory.mktemp("clm") / "sema")
    found = []
    original = run_clm.sema_callback_for
    run_clm.sema_callback_for = lambda mode, config: found.append(original(mode, config)) or found[-1]
    try:
        metrics = run_clm.main(["--output_dir", out, *TINY_CLM])
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
    args = ["--output_dir", out, *TINY_CLM]
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
    assert "| `decay` | `0.95` |" in card.text and f"| eval_loss | {metrics['eval_loss']:.4f} |" in card.text


def test_run_image_classification_saves_the_sema_vit_and_its_accuracy(captured, tmp_path):
    out = str(tmp_path / "vit")
    metrics = run_image_classification.main(["--output_dir", out, *TINY_VIT])
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
    metrics = run_image_classification.main(["--output_dir", out, "--use_lora", "--lora_r", "2", *TINY_VIT])
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


def _ema_fractions(output: str) -> list[float]:
    """The per-rank EMA sizes the script prints, in percent of the model."""
    return sorted(float(x) for x in re.findall(r"SEMA: this process averages .*?= ([0-9.]+)% of the model", output))


@pytest.mark.multiprocess
def test_run_clm_ddp_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    output = run_torchrun(os.path.join(EXAMPLES, "run_clm.py"), "--output_dir", out, *TINY_CLM)
    assert "world size 2" in output and "*** SEMA model, EMA weights: eval_loss" in output
    assert _ema_fractions(output) == [100.0, 100.0]  # DDP: every rank holds the full average
    assert set(SEMA_TAGS) <= set(_card(out).data.tags)
    run_clm.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.multiprocess
def test_run_clm_deepspeed_zero3_two_processes(tmp_path):
    out = str(tmp_path / "zero3")
    ds_config = os.path.join(EXAMPLES, "accelerate_configs", "ds_zero3.json")
    output = run_torchrun(
        os.path.join(EXAMPLES, "run_clm.py"), "--output_dir", out, "--deepspeed", ds_config, *TINY_CLM, timeout=400
    )
    assert "*** SEMA model, EMA weights: eval_loss" in output
    fractions = _ema_fractions(output)  # ZeRO-3: each rank averages its own partition, about half
    assert len(fractions) == 2 and all(30.0 < f < 70.0 for f in fractions) and 99.0 < sum(fractions) < 101.0
    assert set(SEMA_TAGS) <= set(_card(out).data.tags)
    run_clm.AutoModelForCausalLM.from_pretrained(out)
