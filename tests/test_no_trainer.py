"""examples/run_clm_no_trainer.py end to end on a tiny GPT-2: the hand-written accelerate loop with `sema_hf.SEMA`
saves the model it evaluated last and a card that says what it is, logs the ema_* values through accelerate's
trackers, resumes from a mid-epoch checkpoint to the same final weights bit for bit, and runs on 2 processes under
DDP and DeepSpeed ZeRO-3 launched with the configs in examples/accelerate_configs/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext

import huggingface_hub
import pytest
import torch
from accelerate.tracking import GeneralTracker
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launch import OFFLINE_ENV, REPO_ROOT, free_port
from tiny import reset_accelerate_state

EXAMPLES = os.path.join(REPO_ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import run_clm_no_trainer  # noqa: E402

from sema_hf.hub import SECTION_BEGIN, SEMA_TAGS  # noqa: E402

# A GPT-2 of ~9k parameters with a 300-token BPE, 48 blocks of 32 tokens in batches of 8 with 2 micro-batches per
# optimizer step: 3 optimizer steps per epoch, seconds per run. Dropout stays on (GPT-2's 0.1), so a resumed run
# matches only if the RNG state is restored too.
TINY = [
    "--config_overrides", "n_embd=16,n_layer=1,n_head=2,n_positions=64",
    "--embedded_vocab_size", "300",
    "--block_size", "32",
    "--max_train_samples", "48",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--gradient_accumulation_steps", "2",
    "--num_train_epochs", "2",
    "--decay", "0.5",
    "--sema_warmup_steps", "0",
    "--use_cpu", "true",
]  # fmt: skip
STEPS_PER_EPOCH = 3


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what `accelerator.log` sends it."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self) -> None:
        super().__init__()
        self.config: dict = {}
        self.logs: list[tuple[int | None, dict]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logs.append((step, dict(values)))


def _with_tracker(monkeypatch, tracker: RecordingTracker) -> None:
    """Test-only: the script's Accelerator logs to ``tracker`` instead of the trackers ``--report_to`` names."""
    make = run_clm_no_trainer.make_accelerator

    def make_with_tracker(cpu, **kwargs):
        return make(cpu, **{**kwargs, "log_with": [tracker]})

    monkeypatch.setattr(run_clm_no_trainer, "make_accelerator", make_with_tracker)


def _eval_loss_of_saved_model(out: str) -> float:
    """The eval loss of what the script saved, computed here from the saved folder."""
    import run_clm

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = run_clm.AutoTokenizer.from_pretrained(out)
    data = run_clm.DataTrainingArguments(block_size=32, max_eval_samples=8)
    raw = run_clm.load_raw_datasets(data, run_clm.ModelArguments())
    order = _OneProcess()
    blocks = run_clm.tokenize_and_group(raw, tokenizer, model, data, order)["validation"].select(range(8))
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


class _OneProcess:
    """What run_clm's data helpers need of TrainingArguments, for one process."""

    def main_process_first(self, desc: str = ""):
        return nullcontext()


def test_the_loop_saves_and_pushes_the_average_it_evaluated_and_logs_ema_values(tmp_path, monkeypatch):
    tracker = RecordingTracker()
    _with_tracker(monkeypatch, tracker)
    sent = []

    def fake_create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        snapshot = tmp_path / "sent"
        shutil.copytree(folder_path, snapshot, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
        sent.append((repo_id, str(snapshot)))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    out = str(tmp_path / "sema")
    hub = ["--push_to_hub", "true", "--hub_model_id", "someone/tiny-loop", "--hub_token", "fake"]
    flags = [*TINY, "--switch_policy", "always", "--with_tracking", "true", "--checkpointing_steps", "epoch", *hub]
    metrics = run_clm_no_trainer.main(["--output_dir", out, *flags])
    # Every epoch end logged the switch and the counters; the paper's rule switched at both.
    epochs = [values for _, values in tracker.logs]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert [e["ema_updates"] for e in epochs] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # one per optimizer step
    assert [e["ema_switched"] for e in epochs] == [1.0, 1.0] and epochs[-1]["ema_switches"] == 2.0
    assert all(0 < e["ema_decay"] < 1 and e["perplexity"] > 1 for e in epochs)
    assert tracker.config["sema_mode"] == "sema" and tracker.config["sema_decay"] == 0.5
    # What is saved is what the final evaluation read: the average (final_weights="ema").
    assert metrics["eval_loss"] == pytest.approx(_eval_loss_of_saved_model(out), abs=1e-5)
    with open(os.path.join(out, "all_results.json"), encoding="utf-8") as f:
        assert json.load(f)["ema_switches"] == 2.0
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert set(SEMA_TAGS) <= set(card.data.tags) and SECTION_BEGIN in card.text
    assert "6 EMA updates, 2 switches" in card.text and "hand-written `accelerate` loop" in card.text
    # The pushed folder: the model, its card and tokenizer; not the checkpoints nor the tokenizer cache.
    ((repo_id, folder),) = sent
    assert repo_id == "someone/tiny-loop"
    assert {"model.safetensors", "README.md", "tokenizer.json"} <= set(os.listdir(folder))
    assert not any(name.startswith(("epoch_", "step_", "_")) for name in os.listdir(folder))
    assert os.path.isdir(os.path.join(out, "epoch_1"))


def test_posthoc_select_sweeps_after_the_loop_and_saves_the_chosen_weights(tmp_path):
    out = str(tmp_path / "posthoc")
    flags = [*TINY, "--switch_policy", "always", "--posthoc_every_steps", "1", "--posthoc_select", "eval_loss"]
    metrics = run_clm_no_trainer.main(["--output_dir", out, *flags])
    with open(os.path.join(out, "posthoc_sweep.json"), encoding="utf-8") as f:
        sweep = json.load(f)
    rows = {row["label"]: row["score"] for row in sweep["rows"]}
    assert list(rows)[:2] == ["raw", "ema"] and len(rows) > 2  # the default grid, less what 6 snapshots miss
    assert sweep["chosen"] == min(rows, key=rows.get) and sweep["data"] == "the validation split (8 blocks)"
    # The final evaluation and the saved model are the chosen weights.
    assert metrics["eval_loss"] == pytest.approx(rows[sweep["chosen"]], abs=1e-6)
    assert _eval_loss_of_saved_model(out) == pytest.approx(rows[sweep["chosen"]], abs=1e-5)
    assert os.path.isfile(os.path.join(out, "posthoc_sweep.png"))
    assert "How these weights were chosen" in ModelCard.load(os.path.join(out, "README.md")).text


def test_the_guarded_switch_is_the_default_and_keeps_the_raw_weights_when_the_average_loses(tmp_path, monkeypatch):
    tracker = RecordingTracker()
    _with_tracker(monkeypatch, tracker)
    out = str(tmp_path / "guarded")
    # A decay near 1 keeps the average near the initial weights, which evaluate worse than the trained ones.
    flags = [f if f != "0.5" else "0.999" for f in TINY]
    metrics = run_clm_no_trainer.main(
        ["--output_dir", out, *flags, "--learning_rate", "1e-2", "--with_tracking", "true"]
    )
    assert [values["ema_switched"] for _, values in tracker.logs] == [0.0, 0.0]
    assert metrics["ema_switches"] == 0.0
    assert metrics["eval_loss"] == pytest.approx(_eval_loss_of_saved_model(out), abs=1e-5)
    assert metrics["eval_loss"] < tracker.logs[-1][1]["eval_loss"]  # the epoch's log evaluated the (worse) average
    assert "These are the raw training weights" in ModelCard.load(os.path.join(out, "README.md")).text


def test_a_run_resumed_from_a_mid_epoch_checkpoint_ends_with_the_same_weights(tmp_path):
    flags = [*TINY, "--switch_policy", "always", "--checkpointing_steps", "2"]
    whole = str(tmp_path / "whole")
    run_clm_no_trainer.main(["--output_dir", whole, *flags])
    final = load_file(os.path.join(whole, "model.safetensors"))
    # 3 optimizer steps per epoch: step_2 is inside the first epoch, step_4 inside the second (after a switch).
    assert sorted(d for d in os.listdir(whole) if d.startswith("step_")) == ["step_2", "step_4", "step_6"]
    for checkpoint in ("step_2", "step_4"):
        reset_accelerate_state()
        resumed = str(tmp_path / f"from_{checkpoint}")
        shutil.copytree(os.path.join(whole, "_tokenizer-bpe300"), os.path.join(resumed, "_tokenizer-bpe300"))
        resume = ["--resume_from_checkpoint", os.path.join(whole, checkpoint)]
        metrics = run_clm_no_trainer.main(["--output_dir", resumed, *flags, *resume])
        again = load_file(os.path.join(resumed, "model.safetensors"))
        assert again.keys() == final.keys()
        assert all(torch.equal(again[k], final[k]) for k in final), checkpoint
        assert metrics["ema_updates"] == 6.0 and metrics["ema_switches"] == 2.0


def test_resuming_from_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="step_N or epoch_N"):
        run_clm_no_trainer.main(
            ["--output_dir", str(tmp_path / "x"), *TINY, "--resume_from_checkpoint", str(tmp_path)]
        )


# ---- 2 processes, launched as a user would ---------------------------------------------------------------------
def _accelerate_launch(config: str, out: str, *flags: str, timeout: float = 300) -> str:
    env = {**os.environ, **OFFLINE_ENV}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(EXAMPLES, "accelerate_configs", config),
        "--main_process_port", str(free_port()),
        os.path.join(EXAMPLES, "run_clm_no_trainer.py"), "--output_dir", out, *flags,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _averaged_per_rank(output: str) -> list[int]:
    return [int(line.split(" averaged elements")[0].rsplit(" ", 1)[1]) for line in output.splitlines() if
            "averaged elements on this rank" in line]  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["ddp_cpu_2proc.yaml", "deepspeed_zero3.yaml"])
def test_a_two_process_run_resumed_from_a_mid_epoch_checkpoint_ends_with_the_same_weights(config, tmp_path):
    flags = [f for f in TINY if f not in ("--use_cpu", "true")]
    flags += ["--switch_policy", "always", "--checkpointing_steps", "2"]
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    _accelerate_launch(config, whole, *flags)
    shutil.copytree(os.path.join(whole, "_tokenizer-bpe300"), os.path.join(resumed, "_tokenizer-bpe300"))
    _accelerate_launch(config, resumed, *flags, "--resume_from_checkpoint", os.path.join(whole, "step_4"))
    a, b = load_file(os.path.join(whole, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("config", "engine"), [("ddp_cpu_2proc.yaml", "local"), ("deepspeed_zero3.yaml", "deepspeed-zero3")]
)
def test_the_loop_runs_on_two_processes_with_the_example_configs(config, engine, tmp_path):
    out = str(tmp_path / engine)
    flags = [f for f in TINY if f not in ("--use_cpu", "true")]  # the script picks the CPU when there is no GPU
    output = _accelerate_launch(config, out, *flags, "--switch_policy", "always", "--checkpointing_steps", "epoch")
    assert f"SEMA: engine {engine}," in output
    model = AutoModelForCausalLM.from_pretrained(out)
    total = sum(p.numel() for p in model.parameters())
    per_rank = _averaged_per_rank(output)
    if engine == "deepspeed-zero3":  # each rank averages its own half of the fp32 master weights
        assert len(per_rank) == 2 and sum(per_rank) == total
    else:  # DDP: every rank holds the full average
        assert per_rank == [total, total]
    assert len([f for f in os.listdir(os.path.join(out, "epoch_1")) if f.startswith("sema_ema")]) == (
        2 if engine == "deepspeed-zero3" else 1
    )
    with open(os.path.join(out, "all_results.json"), encoding="utf-8") as f:
        assert json.load(f)["ema_switches"] == 2.0
