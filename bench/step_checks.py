"""What `SEMA.step` spends on checking that the model was not moved or cast after SEMA was made
(`sema_hf.engines.local.moved_tensors`: one dict lookup and one ``data_ptr()`` per averaged tensor, no kernel, no
host sync), against the EMA update itself (`sema_hf.store.EMAStore.update`), for models of many small tensors
(the worst case for a per-tensor Python check) and of a few large ones.

Run: ``python bench/step_checks.py [--repeat 200] [--json out.json]`` (seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sema_hf.engines.local import LocalAdapter  # noqa: E402
from sema_hf.store import EMAStore  # noqa: E402

SHAPES = {  # name: (tensors, elements each)
    "3000 tensors of 64 elements": (3000, 64),
    "3000 tensors of 16K elements": (3000, 16384),
    "300 tensors of 1M elements": (300, 1 << 20),
}


def timed(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| model | check per step | EMA update per step | check / update |\n|---|---|---|---|")
    for label, (count, numel) in SHAPES.items():
        model = nn.ParameterList([nn.Parameter(torch.randn(numel)) for _ in range(count)])
        adapter = LocalAdapter(model)
        store = EMAStore(adapter.slots())
        check = timed(adapter.moved_tensors, opts.repeat)
        update = timed(lambda store=store: store.update(0.999), max(3, opts.repeat // 20))
        rows.append({"model": label, "check_s": check, "update_s": update})
        print(f"| {label} | {check * 1e3:.3f} ms | {update * 1e3:.2f} ms | {check / update:.1%} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
