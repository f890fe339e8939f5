"""How often a run killed with SIGKILL resumes with ``resume_from_checkpoint=True``: plain Trainer vs SEMACallback vs
SEMATrainer (docs/checkpoints.md's "resumed N of N vs M of N without SEMA").

Runs the fault-injection harness of the tests (``tests/preemption_harness.py``: the tiny regressor, a checkpoint
every step, ``save_total_limit=3``) with more trials than the test: every kill point ``--rounds`` times at random
steps, plus ``--random`` kills at random moments. A trial counts as resumed when the resumed run finishes, started
from the newest checkpoint whose save had finished (or a newer complete one), and ends bit-identical (weights and,
with SEMA, the EMA) to an uninterrupted run. Prints one table row per mode and outcome, then the rows of one kill
point alone: ``rotated-1``, with ``save_total_limit=1``, right after transformers' rotation deleted the older
checkpoint and before any callback's ``on_save`` (the only checkpoint left is the newest: it must hold the EMA).

Run: ``python bench/preemption.py [--rounds 3] [--random 10] [--seed 0] [--points rotated-1] [--json out.json]``
(about 5 minutes on 2 CPU cores with the defaults).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"trainer": "plain Trainer, no SEMA", "callback": "Trainer + SEMACallback", "sema_trainer": "SEMATrainer"}


def _crash(trial: dict) -> str:
    """``crashed (<kill point>): <error>``, paths shortened to their last component."""
    error = re.sub(r"/\S*/([^/\s']+)", r"\1", trial["error"])
    error = re.sub(r": (line \d+ column|Expecting).*", ": cut short", error)  # where a torn JSON file ends
    return f"crashed ({trial['point']}): {error[:90]}"


def _table(trials: list[dict], chosen) -> None:
    """One row per mode: the killed trials that ``chosen`` keeps, how many resumed, what else happened."""
    print("| setup | killed | resumed (bit-exact) | other outcomes |\n|---|---|---|---|")
    for mode, label in LABELS.items():
        mine = [t for t in trials if t["mode"] == mode and t["killed"] and chosen(t)]
        outcomes = collections.Counter(t["outcome"] if t["outcome"] != "crashed" else _crash(t) for t in mine)
        resumed = outcomes.pop("resumed", 0)
        other = "; ".join(f"{n} {what}" for what, n in outcomes.most_common()) or "-"
        print(f"| {label} | {len(mine)} | {resumed} of {len(mine)} | {other} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--random", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", help="only these comma-separated kill points (e.g. rotated-1)")
    parser.add_argument("--json", help="write every trial's record here")
    opts = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, os.path.join(REPO_ROOT, "tests", "preemption_harness.py"), out,
            "--rounds", str(opts.rounds), "--random", str(opts.random), "--seed", str(opts.seed),
        ]  # fmt: skip
        cmd += ["--points", opts.points] if opts.points else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"harness failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    trials = [
        json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{") and '"summary"' not in line
    ]
    _table(trials, lambda t: True)
    print("\nKilled right after rotation with save_total_limit=1, before on_save (kill point rotated-1):\n")
    _table(trials, lambda t: t["point"] == "rotated-1")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(trials, f, indent=1)


if __name__ == "__main__":
    main()
