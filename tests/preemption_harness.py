"""Fault injection: train the tiny regressor with a checkpoint every step, SIGKILL the process at one moment, resume
with ``resume_from_checkpoint=True`` and compare the end with an uninterrupted run's, bit for bit.

Test-only shims (nothing here is part of the library): a `Trainer` subclass and two wrappers around module functions
(transformers' ``rotate_checkpoints`` and ``TrainerState.save_to_json``, sema_hf's ``atomic_write``) kill the
process at a chosen point of a chosen step's save:

    step         after the optimizer step, before that step's checkpoint (training)
    evaluate     inside the epoch-end evaluation
    model        after the Trainer wrote the weights
    optimizer    after the optimizer and scheduler
    rng          after the RNG state (trainer_state.json not written)
    state-torn   trainer_state.json half written
    rotation     rotation killed half way through deleting the oldest checkpoint
    rotated-1    with save_total_limit=1: right after rotation deleted the older checkpoint, before any callback's
                 on_save (the plain SEMACallback must not write its EMA only there)
    after-save   right after the whole save (SEMA's included)
    ema-tmp      SEMA's shard written to its temporary name, not renamed
    ema-shard    SEMA's shard in place, its sema_state.json not written
    ema-json     sema_state.json written (with SEMATrainer: before any of the Trainer's files)
    random       at a random moment after the first checkpoint (a timer thread)

SEMA runs track post-hoc EMA profiles (a snapshot every step); the end compared includes their reconstruction.

Each run is a forked child of one harness process (imports paid once); a trial is a killed child and a resuming
child. Modes: ``trainer`` (plain Trainer, no SEMA: the baseline), ``callback`` (Trainer + SEMACallback),
``sema_trainer`` (SEMATrainer + SEMACallback).

    python tests/preemption_harness.py OUT_DIR [--modes trainer,callback,sema_trainer] [--random 3] [--seed 0]
        [--rounds 1] [--points rotated-1,...]

prints one JSON line per trial and a summary line per mode (``resumed N of M``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers.trainer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import TrainerState  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import sema_hf.checkpoint  # noqa: E402
from sema_hf import SEMACallback, SEMATrainer  # noqa: E402
from sema_hf.checkpoint import STATE_NAME  # noqa: E402
from sema_hf.posthoc import reconstruct  # noqa: E402
from sema_hf.preemption import SET_ASIDE_PREFIX  # noqa: E402

from tiny import tiny_args, tiny_dataset, tiny_model  # noqa: E402

MODES = ("trainer", "callback", "sema_trainer")
TRAINER_POINTS = ("step", "evaluate", "model", "optimizer", "rng", "state-torn", "rotation", "rotated-1", "after-save")
SEMA_POINTS = ("ema-tmp", "ema-shard", "ema-json")
STEPS = 6  # 24 samples, batch 8, 2 epochs; a checkpoint after every step, the last 3 kept
SAMPLES = 24
EPOCH_ENDS = (3, 6)
LIMIT = 3
SETTINGS = dict(save_strategy="steps", save_steps=1, save_total_limit=LIMIT, eval_strategy="epoch", logging_steps=1)
POINT_SETTINGS = {"rotated-1": {"save_total_limit": 1}}  # the killed run and its resume

# ---- the kill switch (set in a child before it trains) ------------------------------------------------------------
_armed: tuple[str, int] | None = None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_if(point: str, step: int) -> None:
    if _armed == (point, step):
        _die()


def _current_step() -> int:
    return _step_now[0]


_step_now = [0]


class _KillingTrainerMixin:
    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            _kill_if("model", self.state.global_step)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        _kill_if("optimizer", self.state.global_step)

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        _kill_if("rng", self.state.global_step)


class KillingTrainer(_KillingTrainerMixin, Trainer):
    pass


class KillingSEMATrainer(_KillingTrainerMixin, SEMATrainer):
    pass


class Progress(TrainerCallback):
    """Last callback: kills at the training/evaluation points, records each finished save, starts the timer."""

    def __init__(self, path: str, delay: float | None) -> None:
        self.path, self.delay = path, delay

    def on_step_end(self, args, state, control, **kwargs):
        _step_now[0] = state.global_step
        _kill_if("step", state.global_step)

    def on_prediction_step(self, args, state, control, **kwargs):
        _kill_if("evaluate", state.global_step)

    def on_save(self, args, state, control, **kwargs):
        with open(self.path, "a") as f:
            f.write(f"{state.global_step}\n")
        _kill_if("after-save", state.global_step)
        if self.delay is not None and state.global_step == 1:
            threading.Timer(self.delay, _die).start()


def _install_shims() -> None:
    """Wrap the module functions the kill points sit in (this child only)."""
    real_rotate = transformers.trainer.rotate_checkpoints

    def rotate(output_dir, save_total_limit=None, *args, **kwargs):
        if _armed == ("rotation", _current_step()):
            folders = sorted((int(n.split("-")[1]), n) for n in os.listdir(output_dir) if n.startswith("checkpoint-"))
            if len(folders) > save_total_limit:
                oldest = os.path.join(output_dir, folders[0][1])
                for name in sorted(os.listdir(oldest))[::2]:  # half of its files, as rmtree would on its way
                    os.remove(os.path.join(oldest, name))
                _die()
        real_rotate(output_dir, save_total_limit, *args, **kwargs)
        _kill_if("rotated-1", _current_step())

    transformers.trainer.rotate_checkpoints = rotate

    real_save_to_json = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if _armed == ("state-torn", self.global_step) and os.path.basename(json_path) == "trainer_state.json":
            text = json.dumps(self.__dict__, default=str, indent=2)
            with open(json_path, "w") as f:
                f.write(text[: len(text) // 2])
            _die()
        return real_save_to_json(self, json_path)

    TrainerState.save_to_json = save_to_json

    real_atomic_write = sema_hf.checkpoint.atomic_write

    def atomic_write(path, write):
        step = _current_step()
        if path.endswith(".safetensors") and _armed == ("ema-tmp", step):
            write(f"{path}.tmp-{os.getpid()}")
            _die()
        real_atomic_write(path, write)
        if path.endswith(".safetensors"):
            _kill_if("ema-shard", step)
        elif os.path.basename(path) == STATE_NAME:
            _kill_if("ema-json", step)

    sema_hf.checkpoint.atomic_write = atomic_write


# ---- one run ------------------------------------------------------------------------------------------------------
def make_trainer(mode: str, output_dir: str, extra_callbacks: list, killing: bool, **settings):
    # post-hoc EMA on, a snapshot every step: the resumed series must end equal too
    sema = SEMACallback(decay=0.6, warmup_steps=3, posthoc_every_steps=1) if mode != "trainer" else None
    callbacks = ([sema] if sema is not None else []) + extra_callbacks
    cls = {
        "trainer": KillingTrainer if killing else Trainer,
        "callback": KillingTrainer if killing else Trainer,
        "sema_trainer": KillingSEMATrainer if killing else SEMATrainer,
    }[mode]
    data = tiny_dataset(n=SAMPLES)
    trainer = cls(
        model=tiny_model(),
        args=tiny_args(output_dir, **{**SETTINGS, **settings}),
        train_dataset=data,
        eval_dataset=data,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the logs would flood the output
    return trainer, sema


class StartStep(TrainerCallback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def finish(trainer, sema, folder: str, name: str) -> None:
    weights = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters()}
    save_file(weights, os.path.join(folder, f"{name}-weights.safetensors"))
    if sema is not None:
        save_file(sema.ema_state_dict(), os.path.join(folder, f"{name}-ema.safetensors"))
        # every snapshot the run kept, combined (a killed run's later snapshots must have been replaced, not added)
        posthoc = reconstruct(trainer.args.output_dir, sigma_rel=0.07, max_fit_error=None)
        save_file(dict(posthoc), os.path.join(folder, f"{name}-posthoc.safetensors"))


def in_child(run) -> int:
    """Run ``run()`` in a forked child; its exit code (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            hf_logging.set_verbosity_error()
            run()
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def reference(mode: str, base: str) -> float:
    """An uninterrupted run; returns the seconds from the end of the first save to the end of training."""
    folder = os.path.join(base, mode, "reference")
    os.makedirs(folder)

    def run() -> None:
        progress = Progress(os.path.join(folder, "progress"), None)
        trainer, sema = make_trainer(mode, os.path.join(folder, "out"), [progress], killing=False)
        marks = {}

        class Clock(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                marks.setdefault("first", time.monotonic())

        trainer.add_callback(Clock())
        trainer.train()
        finish(trainer, sema, folder, "final")
        with open(os.path.join(folder, "seconds"), "w") as f:
            f.write(str(time.monotonic() - marks["first"]))

    assert in_child(run) == 0, f"the uninterrupted {mode} run failed"
    with open(os.path.join(folder, "seconds")) as f:
        return float(f.read())


def trial(mode: str, base: str, k: int, point: str, step: int, delay: float | None) -> dict:
    folder = os.path.join(base, mode, f"trial{k}")
    out = os.path.join(folder, "out")
    os.makedirs(folder)

    def killed_run() -> None:
        global _armed
        _install_shims()
        _armed = (point, step) if point != "random" else None
        progress = Progress(os.path.join(folder, "progress"), delay)
        trainer, _ = make_trainer(mode, out, [progress], killing=True, **POINT_SETTINGS.get(point, {}))
        trainer.train()

    code = in_child(killed_run)
    saved = _progress(os.path.join(folder, "progress"))
    before = sorted(os.listdir(out)) if os.path.isdir(out) else []

    def resumed_run() -> None:
        start = StartStep()
        trainer, sema = make_trainer(mode, out, [start], killing=False, **POINT_SETTINGS.get(point, {}))
        trainer.train(resume_from_checkpoint=True)
        finish(trainer, sema, folder, "final")
        with open(os.path.join(folder, "start"), "w") as f:
            f.write(str(start.step))

    error_file = os.path.join(folder, "error")
    fd = os.open(error_file, os.O_WRONLY | os.O_CREAT)
    saved_err = os.dup(2)
    os.dup2(fd, 2)  # the resuming child's traceback, if any
    try:
        resume_code = in_child(resumed_run)
    finally:
        os.dup2(saved_err, 2)
        os.close(fd)
        os.close(saved_err)
    result = {
        "mode": mode,
        "trial": k,
        "point": point,
        "step": step,
        "delay": delay,
        "killed": code == -signal.SIGKILL,
        "last_finished_save": saved[-1] if saved else None,
        "folders_after_kill": before,
        "set_aside": sorted(n for n in _listdir(out) if n.startswith(SET_ASIDE_PREFIX)),
    }
    if resume_code != 0:
        with open(error_file) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        result.update(outcome="crashed", error=lines[-1] if lines else f"exit code {resume_code}")
        return result
    with open(os.path.join(folder, "start")) as f:
        start = int(f.read())
    result["resumed_at"] = start
    same = _same(os.path.join(base, mode, "reference"), folder, mode != "trainer")
    if start == 0:
        result["outcome"] = "restarted from step 0"
    elif saved and start < saved[-1]:
        result["outcome"] = f"resumed an older checkpoint than {saved[-1]}"
    elif not same:
        result["outcome"] = "differs from the uninterrupted run"
    else:
        result["outcome"] = "resumed"
    return result


def _same(reference_folder: str, folder: str, with_ema: bool) -> bool:
    for kind in ("weights", "ema", "posthoc") if with_ema else ("weights",):
        a = load_file(os.path.join(reference_folder, f"final-{kind}.safetensors"))
        b = load_file(os.path.join(folder, f"final-{kind}.safetensors"))
        if a.keys() != b.keys() or not all(torch.equal(a[n], b[n]) for n in a):
            return False
    return True


def _progress(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f if line.strip()]


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def plan(
    mode: str, rng: random.Random, n_random: int, seconds: float, rounds: int, only: list[str] | None = None
) -> list[tuple[str, int, float]]:
    """Every kill point of this mode once per round (those in ``only``, if given), at a random step (after the first
    checkpoint; where rotation deletes; at an epoch end for the evaluation), then ``n_random`` kills at random
    moments."""
    points = TRAINER_POINTS + (SEMA_POINTS if mode != "trainer" else ())
    points = tuple(p for p in points if only is None or p in only)
    out = []
    for _ in range(rounds):
        for point in points:
            if point == "evaluate":
                step = rng.choice(EPOCH_ENDS)
            elif point == "rotation":
                step = rng.randint(LIMIT + 1, STEPS)
            else:
                step = rng.randint(2, STEPS)
            out.append((point, step, None))
    out += [("random", 0, rng.uniform(0.0, 0.95 * seconds)) for _ in range(n_random)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--random", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", help="comma-separated kill points (default: all of the mode's)")
    opts = parser.parse_args()
    only = opts.points.split(",") if opts.points else None
    torch.set_num_threads(1)
    gc.freeze()  # the children's gc.collect (accelerate runs one at train end) skips the imported modules' objects
    for mode in opts.modes.split(","):
        rng = random.Random(f"{opts.seed}-{mode}")
        shutil.rmtree(os.path.join(opts.out, mode), ignore_errors=True)
        seconds = reference(mode, opts.out)
        results = []
        for k, (point, step, delay) in enumerate(plan(mode, rng, opts.random, seconds, opts.rounds, only)):
            result = trial(mode, opts.out, k, point, step, delay)
            results.append(result)
            print(json.dumps(result), flush=True)
            shutil.rmtree(os.path.join(opts.out, mode, f"trial{k}", "out"), ignore_errors=True)
        killed = [r for r in results if r["killed"]]
        resumed = [r for r in killed if r["outcome"] == "resumed"]
        print(
            json.dumps({"summary": mode, "killed": len(killed), "resumed": len(resumed), "trials": len(results)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
