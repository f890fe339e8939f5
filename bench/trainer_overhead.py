"""Step-time overhead of `SEMACallback` in a real `transformers.Trainer` run (CPU), with and without the callback
interleaved step by step in one process.

One Trainer trains a GPT-2 built from a config on random tokens. `SEMACallback(decay=0.999, update_every=1)` sits
behind a gate that forwards the per-step hooks (``on_step_begin``, ``on_pre_optimizer_step``, ``on_optimizer_step``,
``on_substep_end``, ``on_step_end``) on even steps only, so steps with and without SEMA alternate: load from other
processes on a shared machine hits both alike, which separate runs one after the other cannot promise. Every other
hook (train begin and end, epoch end, save, evaluate) always reaches the callback. A timer records the wall time
between consecutive ``on_step_begin`` calls: a step's period includes data loading, forward, backward, optimizer
step and every callback's ``on_step_end`` (where SEMA averages).

Reported, each as a fraction of the median step without SEMA:

* the wall time spent inside SEMACallback's per-step hooks (timed by the gate): what the callback adds, measured
  directly, free of the step-to-step noise;
* the EMA update alone on the same model (``EMAStore.update``), the least the callback can add;
* the step-time overhead: median over pairs (step with SEMA - the next step without), with a bootstrap 95 %
  interval. Steps vary by several % on a shared machine, so that interval is about +-1 %: it confirms the direct
  measurement, it cannot resolve a fraction of a percent.

Run: ``python bench/trainer_overhead.py [--quick] [--json out.json] [--preset tiny|gpt2-small]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from sema_hf import SEMACallback  # noqa: E402
from sema_hf.engines.local import LocalAdapter  # noqa: E402
from sema_hf.store import EMAStore  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, seq=128, batch=8),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, seq=128, batch=4),
}
PER_STEP_HOOKS = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end")


class EveryOtherStep(TrainerCallback):
    """Forwards every hook to ``inner``, except the per-step hooks of odd steps."""

    def __init__(self, inner: TrainerCallback) -> None:
        self.inner = inner
        self.active = False
        self.hook_ms: dict[int, float] = {}  # step -> wall time spent inside the inner callback's per-step hooks

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("on_"):
            return object.__getattribute__(self, name)
        inner = object.__getattribute__(self, "inner")

        def forward(args, state, control, **kwargs):
            if name == "on_step_begin":
                self.active = state.global_step % 2 == 0
            if name not in PER_STEP_HOOKS:
                return getattr(inner, name)(args, state, control, **kwargs)
            if not self.active:
                return None
            step = state.global_step - (name == "on_step_end")  # on_step_end comes after global_step += 1
            start = time.perf_counter()
            result = getattr(inner, name)(args, state, control, **kwargs)
            self.hook_ms[step] = self.hook_ms.get(step, 0.0) + (time.perf_counter() - start) * 1e3
            return result

        return forward


class StepTimer(TrainerCallback):
    """Wall time between consecutive ``on_step_begin`` calls, keyed by the step it measures."""

    def __init__(self) -> None:
        self.periods_ms: dict[int, float] = {}
        self._last: tuple[int, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            step, then = self._last
            self.periods_ms[step] = (now - then) * 1e3
        self._last = (state.global_step, now)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model(preset: dict[str, int]) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=preset["n_layer"],
        n_embd=preset["n_embd"],
        n_head=preset["n_head"],
        vocab_size=preset["vocab_size"],
        n_positions=preset["seq"],
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def time_update(model: torch.nn.Module, calls: int = 30) -> float:
    """Median milliseconds of one `EMAStore.update` over the model's parameters (what SEMA adds to every step)."""
    store = EMAStore(LocalAdapter(model).slots())
    store.update(0.999)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        store.update(0.999)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _bootstrap_median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 160, --quick 40)")
    parser.add_argument("--skip", type=int, default=4, help="steps dropped at the start (allocation, warm caches)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="40 steps: under a minute with the tiny preset")
    parser.add_argument("--json", type=Path, help="write {'overhead_pct': ...} and the details to this file")
    args = parser.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 160)
    preset = PRESETS[args.preset]
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = make_model(preset)
    numel = sum(p.numel() for p in model.parameters())
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=preset["batch"],
            learning_rate=1e-4,
            optim="adamw_torch",
            logging_steps=10_000,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        data = RandomTokens(args.steps * preset["batch"], preset["seq"], preset["vocab_size"])
        sema = SEMACallback(decay=0.999, update_every=1)
        gate = EveryOtherStep(sema)
        trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[gate, timer])
        trainer.remove_callback(PrinterCallback)
        print(
            f"# Trainer overhead of SEMACallback(update_every=1): GPT-2 {args.preset} ({numel / 1e6:.1f}M parameters, "
            f"{len(list(model.parameters()))} tensors), batch {preset['batch']} x {preset['seq']} tokens, "
            f"{torch.get_num_threads()} threads, {args.steps} steps alternating with / without SEMA",
            flush=True,
        )
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    assert sema.num_updates > 0, "SEMACallback never updated: the gate or the callback is broken"
    update_ms = time_update(model)

    periods = {s: t for s, t in timer.periods_ms.items() if s >= args.skip}
    with_sema = [t for s, t in periods.items() if s % 2 == 0]
    without = [t for s, t in periods.items() if s % 2 == 1]
    diffs = [periods[s] - periods[s + 1] for s in periods if s % 2 == 0 and s + 1 in periods]
    median_without = statistics.median(without)
    overhead = statistics.median(diffs) / median_without * 100
    low, high = (x / median_without * 100 for x in _bootstrap_median_ci(diffs))
    hooks_ms = statistics.median(t for s, t in gate.hook_ms.items() if s >= args.skip)
    hooks_pct = hooks_ms / median_without * 100
    ratio_overhead = (statistics.median(with_sema) / median_without - 1) * 100
    update_pct = update_ms / median_without * 100
    print("\n| steps | timed | median ms | min ms | max ms |\n|---|---:|---:|---:|---:|")
    for name, p in (("with SEMA", with_sema), ("without SEMA", without)):
        print(f"| {name} | {len(p)} | {statistics.median(p):.1f} | {min(p):.1f} | {max(p):.1f} |")
    print(f"\ntime inside SEMACallback's hooks: {hooks_ms:.2f} ms per step = {hooks_pct:.2f} % of the step")
    print(f"EMA update alone: {update_ms:.2f} ms = {update_pct:.2f} % of the step")
    print(
        f"step-time overhead: {overhead:+.2f} % (median of {len(diffs)} paired differences; 95 % CI "
        f"{low:+.2f} .. {high:+.2f} %); ratio of the medians {ratio_overhead:+.2f} %"
    )
    print(f"({sema.num_updates} EMA updates; training took {elapsed:.0f} s; load average {os.getloadavg()[0]:.2f})")
    if args.json:
        result = {
            "overhead_pct": round(overhead, 3),
            "overhead_pct_ci95": [round(low, 3), round(high, 3)],
            "hooks_pct": round(hooks_pct, 3),
            "hooks_ms": round(hooks_ms, 3),
            "overhead_pct_ratio_of_medians": round(ratio_overhead, 3),
            "update_pct": round(update_pct, 3),
            "update_ms": round(update_ms, 3),
            "step_ms_without": round(median_without, 2),
            "step_ms_with": round(statistics.median(with_sema), 2),
            "pairs": len(diffs),
            "preset": args.preset,
            "numel": numel,
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
