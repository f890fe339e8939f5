#!/usr/bin/env python
"""Compare no averaging, plain EMA and Switch EMA on the two example tasks, several seeds each, and write the
table, the plots and the raw numbers.

    python examples/compare_sema.py            # full: 3 seeds x 3 modes x 2 tasks, about 30 min on 2 CPU cores
    python examples/compare_sema.py --quick    # 2 seeds, smaller runs: a few minutes, to check the pipeline

Each run is one call of ``run_image_classification.main`` (a small ViT on MNIST) or ``run_clm.main`` (a small GPT-2
on Shakespeare) with ``--sema_mode none|ema|sema``; everything but the mode is the same for a given seed, so the
three modes see the same initial weights and the same data order (``--seed`` drives both). A check of that is built
in: plain EMA never changes training, so its training-loss log must equal the ``none`` run's exactly; the result is
recorded as ``ema_training_identical_to_none``.

Written under ``--output_dir`` (default ``docs/comparison``):

* ``results.md`` / ``results.json``: per task and mode, mean +- sample std across seeds of the final eval metric
  (accuracy for the ViT; eval loss and perplexity for the causal LM), the optimizer steps each run needed to reach
  the final metric of the ``none`` run with the same seed (read from the eval curve; "not reached" counts apart),
  and the sharpness (the Hessian eigenvalue of largest magnitude, `sema_hf.top_hessian_eigenvalue`: lambda_max near
  a minimum, negative where negative curvature dominates; negatives are counted in the table) and flatness (mean loss
  increase under filter-normalized perturbations of relative radius 0.05) of the final evaluated model on fixed
  eval batches;
* ``eval_curves_<task>.png`` (and ``_zoom``, from the second epoch on): eval metric against optimizer steps, mean
  line and +-1 std band across seeds;
* ``loss_profile_<task>.png``: the loss along raw -> EMA weights (`sema_hf.loss_profile`) at the end of training for
  the first seed's ``ema`` and ``sema`` runs (raw weights from the last checkpoint, taken before the final switch).

The aggregation (mean/std, steps-to-reach, curve bands, the Markdown table) is pure functions at the top of this
file, tested in ``tests/test_compare.py`` without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("none", "ema", "sema")
REFERENCE_MODE = "none"


# ---- aggregation: pure functions ------------------------------------------------------------------------------------
@dataclass
class Curve:
    """An eval curve: metric value after each of ``steps`` optimizer steps (increasing)."""

    steps: list[int]
    values: list[float]

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.values):
            raise ValueError(f"steps ({len(self.steps)}) and values ({len(self.values)}) differ in length")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must increase strictly, got {self.steps}")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def is_at_least_as_good(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def steps_to_reach(curve: Curve, target: float, higher_is_better: bool) -> int | None:
    """The first step at which the curve is at least as good as ``target``; None if it never gets there."""
    for step, value in zip(curve.steps, curve.values, strict=True):
        if is_at_least_as_good(value, target, higher_is_better):
            return step
    return None


def curve_band(curves: Sequence[Curve]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std across curves at each step they all share (the runs of one mode, one per seed)."""
    if not curves:
        raise ValueError("curve_band needs at least one curve")
    shared = sorted(set.intersection(*(set(c.steps) for c in curves)))
    means, stds = [], []
    for step in shared:
        mean, std = mean_std([c.values[c.steps.index(step)] for c in curves])
        means.append(mean)
        stds.append(std)
    return shared, means, stds


def summarize(values: Sequence[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": list(values)}


def summarize_task(
    curves: Mapping[str, Mapping[int, Curve]],
    higher_is_better: bool,
    extras: Mapping[str, Mapping[int, Mapping[str, float]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per mode: the final metric across seeds, and the steps to reach the reference run's final metric.

    Args:
        curves: ``{mode: {seed: Curve}}``; the last point of a curve is the run's final metric. Every mode must
            have the reference mode's (``none``) seeds, so the comparison is paired seed by seed.
        higher_is_better: True for accuracy, False for a loss.
        extras: optional ``{mode: {seed: {name: value}}}`` (sharpness, perplexity...), each summarized like the
            final metric.

    Returns:
        ``{mode: {"final": {mean, std, n, values}, "steps_to_reach": {"values": [step or None per seed],
        "reached": k, "n": n, "mean", "std" (over the seeds that reached it; None if none did)}, name: {...}}}``.
    """
    if REFERENCE_MODE not in curves:
        raise ValueError(f"the reference mode {REFERENCE_MODE!r} is missing: modes given {sorted(curves)}")
    seeds = sorted(curves[REFERENCE_MODE])
    targets = {seed: curves[REFERENCE_MODE][seed].values[-1] for seed in seeds}
    out: dict[str, dict[str, Any]] = {}
    for mode, runs in curves.items():
        if sorted(runs) != seeds:
            raise ValueError(f"mode {mode!r} has seeds {sorted(runs)}, the reference {seeds}: runs must be paired")
        reached = [steps_to_reach(runs[s], targets[s], higher_is_better) for s in seeds]
        hits = [float(r) for r in reached if r is not None]
        mean, std = mean_std(hits) if hits else (None, None)
        out[mode] = {
            "final": summarize([runs[s].values[-1] for s in seeds]),
            "steps_to_reach": {"values": reached, "reached": len(hits), "n": len(seeds), "mean": mean, "std": std},
        }
        for name in sorted({k for s in seeds for k in (extras or {}).get(mode, {}).get(s, {})}):
            out[mode][name] = summarize([extras[mode][s][name] for s in seeds])
    return out


def format_mean_std(summary: Mapping[str, Any], digits: int, count_negative: bool = False) -> str:
    """``"1.234 ± 0.056"``; with ``count_negative``, how many of the values were negative, if any."""
    if summary.get("mean") is None:
        return "n/a"
    text = f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
    negative = sum(v < 0 for v in summary.get("values", []))
    if count_negative and negative:
        text += f" ({negative}/{len(summary['values'])} < 0)"
    return text


def format_steps(steps: Mapping[str, Any]) -> str:
    """``"112 ± 16 (3/3)"``: mean ± std over the seeds that reached the target, and how many did."""
    if not steps["reached"]:
        return f"not reached (0/{steps['n']})"
    return f"{steps['mean']:.0f} ± {steps['std']:.0f} ({steps['reached']}/{steps['n']})"


@dataclass
class Column:
    """One column of the Markdown table: a header and which summary it shows with how many digits."""

    header: str
    key: str
    digits: int = 3
    count_negative: bool = False


def markdown_table(summary: Mapping[str, Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table, one row per mode, the steps-to-reach column after the final metric."""
    headers = [
        "mode",
        *(c.header for c in columns[:1]),
        "steps to reach `none`'s final",
        *(c.header for c in columns[1:]),
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for mode in [m for m in MODES if m in summary] + [m for m in summary if m not in MODES]:
        row = summary[mode]
        cells = [
            f"`{mode}`",
            format_mean_std(row[columns[0].key], columns[0].digits),
            format_steps(row["steps_to_reach"]),
        ]
        cells += [
            format_mean_std(row[c.key], c.digits, c.count_negative) if c.key in row else "n/a" for c in columns[1:]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the two tasks ------------------------------------------------------------------------------------------------
@dataclass
class TaskSpec:
    """How to run one example script small, and which eval metric to compare."""

    name: str
    title: str
    script: str
    metric: str
    higher_is_better: bool
    metric_label: str
    train_samples: int
    eval_samples: int
    batch_size: int
    epochs: int
    eval_every: int
    diagnostic_batch_size: int
    flags: list[str] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_samples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def task_specs(quick: bool) -> dict[str, TaskSpec]:
    """The sizes of the comparison: the scripts' default models (the GPT-2 narrower and with a smaller vocabulary, so
    that 9 runs fit the time budget), trained from scratch for 4 epochs.

    Decay: the scripts' 0.99 in full mode, an averaging horizon of 1 / (1 - m) = 100 optimizer steps, about one to
    one and a half epochs here (the paper's horizons are 1-8 epochs); 0.95 in the much shorter quick mode.
    """
    decay = ["--decay", "0.95" if quick else "0.99"]
    vit = TaskSpec(
        name="vit",
        title="ViT on MNIST (accuracy)",
        script="run_image_classification",
        metric="eval_accuracy",
        higher_is_better=True,
        metric_label="eval accuracy",
        train_samples=1024 if quick else 6144,
        eval_samples=256 if quick else 1000,
        batch_size=64,
        epochs=2 if quick else 4,
        eval_every=4 if quick else 24,
        diagnostic_batch_size=64,
        flags=decay,
    )
    clm = TaskSpec(
        name="clm",
        title="GPT-2 on Shakespeare (eval loss)",
        script="run_clm",
        metric="eval_loss",
        higher_is_better=False,
        metric_label="eval loss",
        train_samples=512 if quick else 2048,
        eval_samples=64 if quick else 256,
        batch_size=32,
        epochs=2 if quick else 4,
        eval_every=4 if quick else 16,
        diagnostic_batch_size=16,
        flags=[
            *decay,
            "--config_overrides",
            "n_embd=64,n_layer=2,n_head=2,n_positions=128",
            "--embedded_vocab_size",
            "2000",
            "--block_size",
            "64",
        ],
    )
    return {"vit": vit, "clm": clm}


def run_flags(spec: TaskSpec, mode: str, seed: int, output_dir: str, save_last: bool) -> list[str]:
    """The command line of one run: same everything for the three modes of a seed, except ``--sema_mode``."""
    flags = [
        "--sema_mode", mode,
        "--seed", str(seed),
        "--output_dir", output_dir,
        "--max_train_samples", str(spec.train_samples),
        "--max_eval_samples", str(spec.eval_samples),
        "--per_device_train_batch_size", str(spec.batch_size),
        "--per_device_eval_batch_size", "128",
        "--num_train_epochs", str(spec.epochs),
        "--eval_strategy", "steps",
        "--eval_steps", str(spec.eval_every),
        "--logging_steps", str(spec.eval_every),
        "--warmup_steps", str(min(20, spec.steps_per_epoch // 2)),  # learning-rate warmup
        "--disable_tqdm", "true",
        "--log_level", "warning",
        "--report_to", "none",
        "--switch_policy", "always",  # the paper's rule, which these runs compare (the examples default to if_better)
        *spec.flags,
    ]  # fmt: skip
    if save_last:
        # one checkpoint at the last step: it holds the raw weights from before the final epoch-end switch
        flags += ["--save_strategy", "steps", "--save_steps", str(spec.total_steps), "--save_only_model", "true"]
    else:
        flags += ["--save_strategy", "no"]
    return flags


# ---- running ------------------------------------------------------------------------------------------------------
EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))


def load_script(name: str):
    """Import an example script as a module (they import their helpers as top-level ``example_utils``)."""
    import importlib

    if EXAMPLES_DIR not in sys.path:
        sys.path.insert(0, EXAMPLES_DIR)
    return importlib.import_module(name)


def read_history(output_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)["log_history"]


def eval_curve(history: Sequence[Mapping[str, Any]], metric: str, final: float, final_step: int) -> Curve:
    """The metric at each evaluation during training, ending with the final evaluation of the saved model."""
    points = {int(h["step"]): float(h[metric]) for h in history if metric in h}
    points[final_step] = float(final)
    steps = sorted(points)
    return Curve(steps, [points[s] for s in steps])


def train_losses(history: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h]


def run_one(spec: TaskSpec, mode: str, seed: int, work_dir: str, save_last: bool) -> dict[str, Any]:
    import shutil

    output_dir = os.path.join(work_dir, spec.name, f"{mode}-seed{seed}")
    shutil.rmtree(output_dir, ignore_errors=True)  # the scripts resume from a checkpoint found in output_dir
    start = time.perf_counter()
    metrics = load_script(spec.script).main(run_flags(spec, mode, seed, output_dir, save_last))
    seconds = time.perf_counter() - start
    history = read_history(output_dir)
    curve = eval_curve(history, spec.metric, metrics[spec.metric], spec.total_steps)
    return {
        "output_dir": output_dir,
        "seconds": seconds,
        "curve": asdict(curve),
        "train_losses": train_losses(history),
        "final_metrics": {k: v for k, v in metrics.items() if k.startswith("eval_") or k == "perplexity"},
    }


# ---- diagnostics on the trained models ----------------------------------------------------------------------------
def diagnostic_batches(spec: TaskSpec, output_dir: str, num_batches: int, batch_size: int) -> list[dict[str, Any]]:
    """The first ``num_batches * batch_size`` eval examples, prepared by the script's own data code."""
    import torch

    module = load_script(spec.script)
    count = num_batches * batch_size
    if spec.name == "vit":
        data_args = module.DataTrainingArguments()
        raw = module.load_mnist(1, count)["validation"]
        model, processor = module.load_model_and_processor(module.ModelArguments(), [str(d) for d in range(10)])
        examples = raw.with_transform(module.image_transform(processor, model, data_args))
        rows = [examples[i] for i in range(count)]
        return [module.collate(rows[i : i + batch_size]) for i in range(0, count, batch_size)]
    from transformers import AutoTokenizer, TrainingArguments

    block_size = int(spec.flags[spec.flags.index("--block_size") + 1])
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    data_args = module.DataTrainingArguments(block_size=block_size)
    raw = module.load_raw_datasets(data_args, module.ModelArguments())
    model = load_trained(spec, output_dir)
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[])
    blocks = module.tokenize_and_group(raw, tokenizer, model, data_args, args)["validation"]
    ids = torch.tensor(blocks[:count]["input_ids"])
    return [
        {"input_ids": ids[i : i + batch_size], "labels": ids[i : i + batch_size]} for i in range(0, count, batch_size)
    ]


def load_trained(spec: TaskSpec, folder: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    cls = AutoModelForImageClassification if spec.name == "vit" else AutoModelForCausalLM
    return cls.from_pretrained(folder).float().eval()


def sharpness_and_flatness(model, batches, iterations: int, radius: float, samples: int) -> dict[str, float]:
    """Sharpness: the Hessian eigenvalue of largest magnitude (`top_hessian_eigenvalue`; lambda_max near a
    minimum, negative where negative curvature dominates); flatness: mean loss increase at relative radius."""
    from sema_hf import flatness, top_hessian_eigenvalue

    return {
        "sharpness": float(top_hessian_eigenvalue(model, batches, max_iterations=iterations, tol=1e-3, seed=0)),
        "flatness": flatness(model, batches, radius=radius, num_samples=samples, seed=0).mean,
    }


def raw_to_ema_profile(spec: TaskSpec, output_dir: str, batches):
    """`loss_profile` from the raw weights of the last checkpoint to the saved (EMA) model."""
    from sema_hf import loss_profile

    checkpoint = os.path.join(output_dir, f"checkpoint-{spec.total_steps}")
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"{checkpoint} is missing: the raw weights of the last step are needed")
    raw = load_trained(spec, checkpoint)
    ema = {name: p.detach() for name, p in load_trained(spec, output_dir).named_parameters()}
    return loss_profile(raw, batches, ema, alphas=(-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0))


# ---- plots --------------------------------------------------------------------------------------------------------
STYLES = {"none": ("tab:gray", "-", "o"), "ema": ("tab:blue", "--", "s"), "sema": ("tab:red", "-", "^")}


def plot_curves(spec: TaskSpec, curves: Mapping[str, Mapping[int, Curve]], path: str) -> None:
    """Eval metric against optimizer steps: per mode the mean across seeds and a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for mode in MODES:
            runs = list(curves[mode].values())
            steps, mean, std = curve_band(runs)
            color, line, marker = STYLES[mode]
            ax.plot(
                steps, mean, color=color, linestyle=line, marker=marker, markersize=3, label=f"{mode} (n={len(runs)})"
            )
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
        for epoch in range(1, spec.epochs):
            ax.axvline(epoch * spec.steps_per_epoch, color="black", linestyle=":", linewidth=0.8)
        if spec.higher_is_better:
            ax.set_ylim(top=min(1.0, ax.get_ylim()[1]))
        ax.set_xlabel("optimizer steps (dotted: epoch ends = SEMA switches)")
        ax.set_ylabel(spec.metric_label)
        ax.set_title(f"{spec.title}\nmean ± 1 std across seeds", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_curves_zoomed(spec: TaskSpec, curves: Mapping[str, Mapping[int, Curve]], path: str) -> None:
    """The same curves from the second epoch on, where the modes differ by less than the first epoch's range."""
    later = {
        mode: {s: Curve(*_after(c, spec.steps_per_epoch)) for s, c in runs.items()} for mode, runs in curves.items()
    }
    zoomed = TaskSpec(**{**asdict(spec), "title": f"{spec.title}, from epoch 2"})
    plot_curves(zoomed, later, path)


def _after(curve: Curve, step: int) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in zip(curve.steps, curve.values, strict=True) if s >= step]
    return [s for s, _ in kept], [v for _, v in kept]


# ---- main ---------------------------------------------------------------------------------------------------------
def table_columns(spec: TaskSpec) -> list[Column]:
    first = Column(f"final {spec.metric_label}", "final", 4 if spec.higher_is_better else 3)
    extra = [Column("perplexity", "perplexity", 1)] if spec.name == "clm" else []
    return [
        first,
        *extra,
        Column("sharpness (top Hessian eigenvalue)", "sharpness", 2, count_negative=True),
        Column("flatness (Δloss @ r=0.05)", "flatness", 4),
    ]


def write_results(results: dict[str, Any], specs: Mapping[str, TaskSpec], output_dir: str) -> None:
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    lines = ["# none vs EMA vs Switch EMA", ""]
    lines.append(
        f"{len(results['seeds'])} seeds per mode (seeds {results['seeds']}); mean ± sample std across seeds. "
        f"Generated by `python examples/compare_sema.py{' --quick' if results['quick'] else ''}` "
        f"in {results['wall_seconds'] / 60:.1f} min on {results['machine']}."
    )
    for name, task in results["tasks"].items():
        spec = specs[name]
        lines += ["", f"## {spec.title}", ""]
        lines.append(
            f"{spec.train_samples} training examples, {spec.epochs} epochs of {spec.steps_per_epoch} steps "
            f"(batch {spec.batch_size}), eval on {spec.eval_samples} examples every {spec.eval_every} steps; "
            f"extra flags: `{' '.join(spec.flags)}`."
        )
        lines += ["", markdown_table(task["summary"], table_columns(spec)), ""]
        lines.append(
            "Steps to reach: the first eval step at which a run is at least as good as the final "
            f"{spec.metric_label} of the `none` run with the same seed (mean ± std over the seeds that got there; "
            "how many did). Sharpness and flatness: the final evaluated model (the EMA for `ema`/`sema`) on "
            f"{results['diagnostics']['batches']} eval batches."
        )
        lines.append(
            f"`ema` training identical to `none` (same data order): {task['ema_training_identical_to_none']}."
        )
        lines += ["", f"![eval curves](eval_curves_{name}.png) ![from epoch 2](eval_curves_{name}_zoom.png)"]
        if task.get("loss_profile"):
            lines.append(f"![loss profile](loss_profile_{name}.png)")
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, smaller runs: a few minutes")
    parser.add_argument("--output_dir", default="docs/comparison", help="where results and plots are written")
    parser.add_argument("--work_dir", default="runs/compare_sema", help="where the runs' own folders go")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    parser.add_argument("--tasks", nargs="+", default=["vit", "clm"], choices=["vit", "clm"])
    parser.add_argument("--sharpness_iterations", type=int, default=20)
    parser.add_argument("--diagnostic_batches", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 suits these tiny models, and is several times faster than 2 on a busy 2-core box",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(name, value)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    import torch

    torch.set_num_threads(args.threads)
    specs = {k: v for k, v in task_specs(args.quick).items() if k in args.tasks}
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "quick": args.quick,
        "seeds": seeds,
        "machine": f"{os.cpu_count()} CPU cores, {args.threads} torch thread(s)",
        "diagnostics": {"batches": args.diagnostic_batches, "sharpness_iterations": args.sharpness_iterations,
                        "flatness_radius": 0.05, "flatness_samples": 4},
        "tasks": {},
    }  # fmt: skip

    from sema_hf import plot_loss_profile

    for name, spec in specs.items():
        runs: dict[str, dict[int, dict[str, Any]]] = {mode: {} for mode in MODES}
        batches = None
        for seed in seeds:
            for mode in MODES:
                save_last = seed == seeds[0] and mode != "none"
                run = run_one(spec, mode, seed, args.work_dir, save_last)
                if batches is None:
                    batches = diagnostic_batches(
                        spec, run["output_dir"], args.diagnostic_batches, spec.diagnostic_batch_size
                    )
                model = load_trained(spec, run["output_dir"])
                run["diagnostics"] = sharpness_and_flatness(model, batches, args.sharpness_iterations, 0.05, 4)
                if save_last:
                    profile = raw_to_ema_profile(spec, run["output_dir"], batches)
                    run["loss_profile"] = {"alphas": list(profile.alphas), "losses": list(profile.losses)}
                runs[mode][seed] = run
                print(
                    f"[compare] {name} {mode} seed {seed}: {spec.metric} {run['curve']['values'][-1]:.4f} "
                    f"in {run['seconds']:.0f} s, {run['diagnostics']}",
                    flush=True,
                )
        curves = {mode: {s: Curve(**r["curve"]) for s, r in by_seed.items()} for mode, by_seed in runs.items()}
        extras = {
            mode: {s: {**r["diagnostics"], **_perplexity(r)} for s, r in by_seed.items()}
            for mode, by_seed in runs.items()
        }
        identical = all(runs["ema"][s]["train_losses"] == runs["none"][s]["train_losses"] for s in seeds)
        task = {
            "metric": spec.metric,
            "higher_is_better": spec.higher_is_better,
            "spec": asdict(spec),
            "summary": summarize_task(curves, spec.higher_is_better, extras),
            "ema_training_identical_to_none": identical,
            "runs": {mode: {str(s): r for s, r in by_seed.items()} for mode, by_seed in runs.items()},
        }
        plot_curves(spec, curves, os.path.join(args.output_dir, f"eval_curves_{name}.png"))
        plot_curves_zoomed(spec, curves, os.path.join(args.output_dir, f"eval_curves_{name}_zoom.png"))
        profiles = {mode: runs[mode][seeds[0]]["loss_profile"] for mode in ("ema", "sema")}
        task["loss_profile"] = profiles
        from sema_hf import LossProfile

        plot_loss_profile(
            {
                f"{mode} (seed {seeds[0]})": LossProfile(tuple(p["alphas"]), tuple(p["losses"]))
                for mode, p in profiles.items()
            },
            os.path.join(args.output_dir, f"loss_profile_{name}.png"),
            title=f"{spec.title.split(' (')[0]}: raw -> EMA, end of training",
        )
        results["tasks"][name] = task
    results["wall_seconds"] = time.perf_counter() - start
    write_results(results, specs, args.output_dir)
    print((open(os.path.join(args.output_dir, "results.md"), encoding="utf-8").read()), flush=True)
    return results


def _perplexity(run: Mapping[str, Any]) -> dict[str, float]:
    loss = run["final_metrics"].get("eval_loss")
    if "perplexity" not in run["final_metrics"] or loss is None:
        return {}
    return {"perplexity": math.exp(loss)}


if __name__ == "__main__":
    main()
