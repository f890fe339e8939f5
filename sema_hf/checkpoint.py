"""EMA state on disk: one safetensors file per distinct shard plus a small JSON, written atomically.

Inside a Trainer checkpoint folder ``checkpoint-N/``::

    sema_state.json                          counters, config, engine, world size, layout fingerprint (rank 0)
    sema_ema-00001-of-00001.safetensors      one process / DDP: the full average (rank 0 writes it)
    sema_ema-00001-of-00002.safetensors      sharded engines: one file per rank, holding only that rank's shard
    sema_ema-00002-of-00002.safetensors

Every file is written to a temporary name, flushed to disk and renamed into place, and the JSON is written last,
after all ranks finished their shard: a crash mid-save never leaves a half-written file under a final name, and
a folder without ``sema_state.json`` holds no EMA state. No pickle: tensors in safetensors, the rest in JSON.

Each file's safetensors header holds its rank's `Layout`, including (sharded engines) which range of each
flattened parameter each tensor is. That makes the files re-shardable: a run with another world size or another
engine (ZeRO-3 to FSDP2, 2 ranks to 1...) assembles its own pieces from the ranges the saved files hold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .engines.base import Layout
from .engines.shards import cover_problems

STATE_NAME = "sema_state.json"
FORMAT = "sema-hf/1"


def shard_file_name(shard: int, num_shards: int) -> str:
    """File holding shard ``shard`` (0-based) of ``num_shards``; numbered from 1 like sharded HF weights."""
    return f"sema_ema-{shard + 1:05d}-of-{num_shards:05d}.safetensors"


def layout_fingerprint(layout: Layout) -> str:
    """SHA-256 over what must match for the averages to be loaded as saved: engine kind, the model tensors
    covered (names and shapes) and, for sharded engines, the world size."""
    return _fingerprint(layout.sharded, layout.world_size, layout.params)


def _fingerprint(sharded: bool, world_size: int, params: list) -> str:
    key = {"sharded": sharded, "world_size": world_size if sharded else 1, "params": [list(p) for p in params]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)``, flush it to disk, then rename onto ``path`` (atomic on POSIX)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_ema_checkpoint(
    directory: str,
    averages: Mapping[str, torch.Tensor],
    layout: Layout,
    meta: Mapping[str, Any],
    writer: bool | None = None,
) -> None:
    """Write this rank's averages; every rank calls this.

    ``writer``: whether this process writes the files every node needs once (the JSON, and the full average of an
    unsharded engine); default rank 0. With ``save_on_each_node`` (no shared storage) it is each node's first
    process, so that every node's copy of the checkpoint is complete.

    Every rank waits for the shards before the JSON is written, and for the JSON before returning: each wait is
    `raise_if_any_rank_failed` (one all-reduce of one integer), so a write that fails on one rank (a full disk, a
    folder it cannot create) raises on every rank, naming that rank and its reason. No rank is left waiting for
    the failed one, and none returns as if the checkpoint were saved; the folder then has no ``sema_state.json``
    and counts as holding no EMA state.
    """
    writer = layout.rank == 0 if writer is None else writer
    num_shards = layout.world_size if layout.sharded else 1
    error: BaseException | None = None
    try:
        os.makedirs(directory, exist_ok=True)
        if layout.sharded or writer:
            shard = layout.rank if layout.sharded else 0
            # safetensors refuses tensors sharing storage (ours are views of one buffer): write contiguous copies.
            tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in averages.items()}
            header = {
                "format": FORMAT,
                "layout": json.dumps(asdict(layout)),
                "fingerprint": layout_fingerprint(layout),
            }
            atomic_write(
                os.path.join(directory, shard_file_name(shard, num_shards)),
                lambda tmp: save_file(tensors, tmp, metadata=header),
            )
    except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
        error = err
    raise_if_any_rank_failed(error, f"write its EMA shard into {directory!r}")
    if writer:
        state = {
            "format": FORMAT,
            **meta,
            "engine": layout.engine,
            "sharded": layout.sharded,
            "world_size": layout.world_size,
            "num_shards": num_shards,
            "fingerprint": layout_fingerprint(layout),
            "params": layout.params,
        }

        def write_json(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)

        try:
            atomic_write(os.path.join(directory, STATE_NAME), write_json)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = err
    raise_if_any_rank_failed(error, f"write {STATE_NAME} into {directory!r}")


def has_ema_checkpoint(directory: str) -> bool:
    """True when ``directory`` holds a complete EMA state (its JSON is written last)."""
    return os.path.isfile(os.path.join(directory, STATE_NAME))


def read_ema_state(directory: str) -> dict[str, Any]:
    """The JSON of an EMA checkpoint; a clear error when there is none."""
    path = os.path.join(directory, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No SEMA EMA state in {directory!r} (expected {STATE_NAME} and sema_ema-*.safetensors, written by "
            "SEMACallback.on_save). Resuming would silently restart the average: resume from a checkpoint written "
            "with SEMACallback, or pass SEMACallback(allow_fresh_ema_on_resume=True) to start a fresh average."
        )
    with open(path) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown EMA state format {state.get('format')!r}; this sema_hf reads {FORMAT!r}")
    return state


def load_ema_checkpoint(directory: str, layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's averages and the saved JSON, after checking that they fit the current ``layout``.

    When the averages were saved with the same placement (same engine pieces on the same world size), this rank
    reads its own file. Otherwise (another world size, another sharded engine, sharded to one process or back) the
    averages are re-sharded: every layout records which range of each flattened parameter each file holds, and
    this rank copies the ranges it now owns out of the files that hold them, one saved tensor at a time.
    """
    state = read_ema_state(directory)
    if _param_map(state["params"]) != _param_map(layout.params):
        raise ValueError(_describe_param_mismatch(directory, state["params"], layout.params))
    if _fingerprint(state["sharded"], state["world_size"], state["params"]) != state.get("fingerprint"):
        raise ValueError(
            f"{os.path.join(directory, STATE_NAME)}: its fingerprint does not match the layout it records (engine "
            "kind, world size, tensors): the file was edited or damaged. Resume from another checkpoint."
        )
    num_shards = state["num_shards"]
    if not layout.sharded and not state["sharded"]:
        return _load_shard(directory, 0, num_shards, state), state
    if layout.sharded and state["sharded"] and state["world_size"] == layout.world_size:
        saved = _shard_layout(directory, layout.rank, num_shards, state)
        if "pieces" not in saved.get("extra", {}) or layout_pieces(saved) == layout_pieces(asdict(layout)):
            return _load_shard(directory, layout.rank, num_shards, state), state
    return _reshard(directory, num_shards, layout, state), state


def _param_map(params: list) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in params}


def _load_shard(directory: str, shard: int, num_shards: int, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, shard_file_name(shard, num_shards))
    _shard_layout(directory, shard, num_shards, state)  # its fingerprint is the JSON's
    tensors = load_file(path, device="cpu")
    for name, t in tensors.items():
        _require_fp32(t, name, path)
    return tensors


def _shard_layout(directory: str, shard: int, num_shards: int, state: Mapping[str, Any]) -> dict[str, Any]:
    """The `Layout` (as a dict) stored in a shard file's safetensors header (`_shard_header` checks the file)."""
    return json.loads(_shard_header(directory, shard, num_shards, state)["layout"])


def _shard_header(directory: str, shard: int, num_shards: int, state: Mapping[str, Any]) -> dict[str, str]:
    """A shard file's safetensors header, after checking that the file belongs to the save whose JSON is
    ``state`` (the same fingerprint)."""
    path = os.path.join(directory, shard_file_name(shard, num_shards))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EMA shard file {path!r} is missing (its JSON names {num_shards} shard files)")
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    if header.get("fingerprint") != state.get("fingerprint"):
        raise ValueError(
            f"EMA shard file {path!r}: its fingerprint {str(header.get('fingerprint'))[:12]}... differs from that of "
            f"{STATE_NAME} ({str(state.get('fingerprint'))[:12]}...): the folder mixes files of two saves. Resume "
            "from another checkpoint."
        )
    return header


def _require_fp32(tensor: torch.Tensor, name: str, path: str) -> None:
    """SEMA writes fp32 averages only: another dtype is a file SEMA did not write, never silently cast."""
    if tensor.dtype != torch.float32:
        raise ValueError(
            f"EMA shard file {path!r}: {name} is {tensor.dtype}, but SEMA's averages are torch.float32; the file was "
            "not written by SEMA (or was converted). Resume from a checkpoint whose EMA files SEMA wrote."
        )


def layout_pieces(layout: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """``(name, start, stop)``: which range of which flattened tensor each saved/averaged tensor holds. Sharded
    adapters record it in ``extra["pieces"]``; an unsharded layout holds every tensor whole."""
    if "pieces" in layout.get("extra", {}):
        return [(str(n), int(a), int(b)) for n, a, b in layout["extra"]["pieces"]]
    if layout["sharded"]:
        raise ValueError("a sharded EMA layout without piece ranges cannot be re-sharded")
    return [(str(n), 0, math.prod(shape)) for n, shape in layout["slots"]]


def _reshard(directory: str, num_shards: int, layout: Layout, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Assemble this rank's averages (per ``layout``) from the ranges held by all saved shard files."""
    headers = [_shard_header(directory, k, num_shards, state) for k in range(num_shards)]
    try:
        wanted = layout_pieces(asdict(layout))
        saved_layouts = [json.loads(h["layout"]) for h in headers]
        saved_pieces = [layout_pieces(saved) for saved in saved_layouts]
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"EMA state in {directory!r} was saved by {state['engine']!r} over {state['world_size']} ranks and this "
            f"run ({layout.engine!r}, {layout.world_size} ranks) places the averages differently, but the saved "
            f"files do not record where their ranges lie ({err}). Resume with world size {state['world_size']} "
            f"and the same engine."
        ) from None
    shapes = dict(layout.slots)
    targets: dict[str, list[tuple[int, int]]] = {}
    for name, start, stop in wanted:
        targets.setdefault(name, []).append((start, stop))
    # Check by intervals before reading anything: the saved ranges must tile each wanted range exactly once.
    saved_ranges: dict[str, list[tuple[int, int]]] = {}
    for pieces in saved_pieces:
        for name, a, b in pieces:
            saved_ranges.setdefault(name, []).append((a, b))
    problems = [
        f"{name} {problem}"
        for name, start, stop in wanted
        for problem in cover_problems(start, stop, saved_ranges.get(name, []))
    ]
    if problems:
        raise ValueError(
            f"EMA state in {directory!r} does not cover this rank's averages exactly once after re-sharding: "
            f"{'; '.join(problems[:10])} (overlapping or missing ranges in the saved files)"
        )
    out = {name: torch.empty(shapes[name], dtype=torch.float32) for name, _, _ in wanted}
    for k, pieces in enumerate(saved_pieces):
        overlapping = [(n, a, b) for n, a, b in pieces if any(s < b and a < e for s, e in targets.get(n, []))]
        if not overlapping:
            continue
        path = os.path.join(directory, shard_file_name(k, num_shards))
        with safe_open(path, framework="pt") as f:
            for name, a, b in overlapping:
                saved = f.get_tensor(name)
                _require_fp32(saved, name, path)
                saved = saved.reshape(-1)
                for start, stop in targets[name]:
                    lo, hi = max(a, start), min(b, stop)
                    if lo < hi:
                        out[name].view(-1)[lo - start : hi - start].copy_(saved[lo - a : hi - a])
    return out


def _describe_param_mismatch(directory: str, saved: list, current: list) -> str:
    saved_map = {name: list(shape) for name, shape in saved}
    current_map = {name: list(shape) for name, shape in current}
    missing = [n for n in current_map if n not in saved_map]
    unexpected = [n for n in saved_map if n not in current_map]
    reshaped = [
        f"{n}: saved {saved_map[n]} vs model {shape}"
        for n, shape in current_map.items()
        if n in saved_map and saved_map[n] != shape
    ]
    return (
        f"EMA state in {directory!r} does not match this model's averaged tensors: "
        f"not in checkpoint {missing[:10]}, not in model {unexpected[:10]}, shape mismatches {reshaped[:10]}"
        + ("" if missing or unexpected or reshaped else " (same tensors in a different order)")
    )


def raise_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """Every rank calls this after a step that may fail on some ranks only (reading its EMA shard): if any rank
    failed, every rank raises one error quoting each failing rank's reason, instead of the ranks that succeeded
    walking on into the next collective and waiting there forever. One all-reduce of one integer; when some rank
    failed, one all-gather of the messages. Without a process group, ``error`` is re-raised as is."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    reasons = " ".join(f"Rank {rank}: {message}" for rank, message in failed)
    raise RuntimeError(
        f"SEMA could not {what} on {len(failed)} of {len(messages)} ranks, so no rank continues (the others would "
        f"otherwise wait in the next collective forever). {reasons}"
    ) from error
