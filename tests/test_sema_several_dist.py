"""Several `SEMA` objects on 2 gloo ranks (``tests/dist/several_worker.py``): a student/teacher pair of different
shapes and a same-shape generator/discriminator pair on one accelerator, under DDP and under DeepSpeed ZeRO-3 (one
plugin per model), and two horizons of one ZeRO-3 model; each average resumes from one ``save_state`` folder to its own value bit-exactly, and each
re-shards onto this single process. Then the mean-teacher recipe (``examples/mean_teacher.py``) under ZeRO-3 with a
LoRA adapter (``tests/dist/mean_teacher_worker.py``)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from sema_hf import SEMA

from launch import run_torchrun

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from several_worker import MODELS, ZERO3_AVERAGES, wide_gpt2  # noqa: E402
from sharded_setup import tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.multiprocess

NAMES = {"ddp": list(MODELS), "zero3-models": list(MODELS), "zero3": list(ZERO3_AVERAGES)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("several")
    run_torchrun("tests/dist/several_worker.py", str(out), *NAMES, timeout=400)
    return {
        engine: {
            "dir": out / engine,
            "ranks": [json.loads((out / engine / f"result_rank{r}.json").read_text()) for r in range(2)],
        }
        for engine in NAMES
    }


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("mean_teacher")
    run_torchrun("tests/dist/mean_teacher_worker.py", str(out), timeout=300)
    return [json.loads((out / f"teacher_rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("engine", NAMES)
def test_each_average_has_its_own_folder_in_one_save_state(engine, runs):
    for result in runs[engine]["ranks"]:
        assert [f"sema_{name}" for name in sorted(NAMES[engine])] == [f for f in result["files"] if "sema" in f]


@pytest.mark.parametrize("engine", NAMES)
def test_each_average_resumes_to_its_own_value_bit_exactly(engine, runs):
    for result in runs[engine]["ranks"]:
        assert min(result["apart"].values()) > 1e-3  # same-shape averages that differ: a mix-up would show
        assert min(result["weights_moved"].values()) > 1e-3  # every model trained
        for name in NAMES[engine]:
            assert result["loaded_step"][name] == 3 and result["loaded_diff"][name] == 0.0
            assert result["resumed_diff"][name] == 0.0 and result["resumed_weights_diff"][name] == 0.0
            assert result["num_updates"][name] == 6


@pytest.mark.parametrize("engine", NAMES)
def test_each_two_rank_average_reshards_onto_one_process_bit_exactly(engine, runs):
    folder = runs[engine]["dir"]
    for name in NAMES[engine]:
        model = wide_gpt2(seed=9) if name == "teacher" else tiny_gpt2(seed=9)
        sema = SEMA(model, decay=0.5, warmup="none", name=name)
        sema.load(str(folder / "ckpt3"))
        expected = load_file(str(folder / f"ema3_{name}.safetensors"))
        got = sema.ema_state_dict()
        assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in got), name
        assert sema.global_step == 3


def test_mean_teacher_outputs_equal_a_forward_with_the_gathered_average_under_zero3_lora(teacher):
    for result in teacher:
        assert result["engine"] == "deepspeed-zero3" and result["num_updates"] == 8
        assert result["averaged"] and all("lora_" in n for n in result["averaged"])  # the adapter only
        assert result["keys_loaded"] == [result["state_dict_keys"], 0, 0]  # a strict load, every key
        assert result["vs_gathered"] == [0.0] * 8
        assert result["vs_student"][0] == 0.0 and min(result["vs_student"][1:]) > 1e-3  # a teacher, not the student
