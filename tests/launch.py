"""Test helpers: run a Python script on 2 gloo ranks on CPU with torchrun (as one node, or as 2 one-process
nodes), on a fresh port, with a timeout."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

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


def run_torchrun(
    script: str, *args: str, nproc: int = 2, timeout: float = 240, retries: int = 1, fresh: str | None = None
) -> str:
    """Launch ``script`` on ``nproc`` ranks; return its combined output, or fail with it.

    A rare exit-time abort of gloo launches is retried once (seen about 1 in 60 launches on these machines).
    ``fresh``: the launch's output folder, emptied before a retry, for scripts that refuse to write over what an
    earlier run left (post-hoc snapshots of another series).
    """
    env = {**os.environ, **OFFLINE_ENV}
    script = script if os.path.isabs(script) else os.path.join(REPO_ROOT, script)  # relative to the repo root
    earlier = ""  # what the failed attempts printed last, shown if the retry fails too
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
            raise AssertionError(f"torchrun {script} failed with code {proc.returncode}:\n{output[-6000:]}{earlier}")
        earlier += f"\n--- attempt {attempt + 1} had failed with code {proc.returncode}:\n{output[-3000:]}"
        if fresh is not None and os.path.isdir(fresh):
            shutil.rmtree(fresh)
            os.makedirs(fresh)
    raise AssertionError("unreachable")


#: What gloo prints when a process aborts at exit after its work is done (about 1 in 60 launches here).
EXIT_ABORT = "terminate called without an active exception"


def run_nodes(script: str, *args: str, nnodes: int = 2, timeout: float = 240, retries: int = 1) -> list[str]:
    """Launch ``script`` as ``nnodes`` one-process "nodes": one torchrun per node (``--nnodes``/``--node_rank``),
    all started at once on this machine and meeting on a fresh port; ``NODE_RANK`` tells each worker its node.
    Return each node's output, or fail with all of them (a node still running at ``timeout`` is killed).

    A launch that failed only by gloo's exit-time abort (`EXIT_ABORT` in a failed node's output, no timeout) is run
    again, ``retries`` times, after emptying every argument that is a folder (the test's own output folders), so the
    run starts as the first did.
    """
    for attempt in range(retries + 1):
        try:
            return _run_nodes_once(script, *args, nnodes=nnodes, timeout=timeout)
        except AssertionError as err:
            if attempt == retries or EXIT_ABORT not in str(err) or "still running" in str(err):
                raise
            for folder in (a for a in args if os.path.isdir(a)):
                shutil.rmtree(folder)
                os.makedirs(folder)
    raise AssertionError("unreachable")


def _run_nodes_once(script: str, *args: str, nnodes: int, timeout: float) -> list[str]:
    env = {**os.environ, **OFFLINE_ENV}
    script = script if os.path.isabs(script) else os.path.join(REPO_ROOT, script)
    port = free_port()
    procs = []
    for node in range(nnodes):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node}",
            "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", script, *args,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                env={**env, "NODE_RANK": str(node)},
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    outputs, failed = [], []
    deadline = time.monotonic() + timeout
    for node, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:  # each launcher leads its own process group: end it with its worker
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            failed.append(f"node {node} still running after {timeout:.0f} s")
        outputs.append(out)
        if proc.returncode != 0 and not failed:
            failed.append(f"node {node} exited with code {proc.returncode}")
    if failed:
        report = "\n".join(f"--- node {n} ---\n{out[-4000:]}" for n, out in enumerate(outputs))
        raise AssertionError(f"{script} on {nnodes} nodes: {'; '.join(failed)}\n{report}")
    return outputs
