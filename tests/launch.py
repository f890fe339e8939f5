"""Test helper: run a Python script on 2 gloo ranks on CPU with torchrun, on a fresh port, with a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240, retries: int = 1) -> str:
    """Launch ``script`` on ``nproc`` ranks; return its combined output, or fail with it.

    A rare exit-time abort of gloo launches is retried once (seen about 1 in 60 launches on these machines).
    """
    env = {**os.environ, **OFFLINE_ENV}
    script = script if os.path.isabs(script) else os.path.join(REPO_ROOT, script)  # relative to the repo root
    for attempt in range(retries + 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0:
            return output
        if attempt == retries:
            raise AssertionError(f"torchrun {script} failed with code {proc.returncode}:\n{output[-6000:]}")
    raise AssertionError("unreachable")
