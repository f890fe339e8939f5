"""Checkpoints a killed run left half-written: recognised from the files written last, set aside, never resumed.

transformers picks the checkpoint to resume by name alone (``get_last_checkpoint``: the ``checkpoint-N`` folder
with the largest N) and never checks that it is whole. A process killed while saving (spot preemption, the OOM
killer, a lost node) leaves a newest folder that the Trainer cannot load, or loads into a silent restart from step
0, or that holds the Trainer's state but not the EMA. This module decides from what is on disk whether a folder is
complete, and sets the incomplete ones aside so that ``resume_from_checkpoint=True`` finds the newest complete one.

What is written last (transformers 5.24, ``Trainer._save_checkpoint``; the ordering this module relies on):

1. ``save_model`` (weights, config), then, unless ``save_only_model``, the optimizer and scheduler (DeepSpeed and
   FSDP: every rank's shards, ending in a collective: DeepSpeed's ``save_checkpoint`` ends with a barrier), the
   scaler and the RNG state (``rng_state.pth``, or ``rng_state_<rank>.pth`` written by each rank, with no barrier);
2. ``trainer_state.json``, by the process that saves (``args.should_save``: rank 0, or each node's first process
   with ``save_on_each_node``), after its own files of step 1. It is not written atomically: a kill can cut it short;
3. then Hub upload and rotation (``save_total_limit``), which only delete older folders.

SEMA's files (`sema_hf.checkpoint`): every rank's ``sema_ema-*.safetensors`` shard (atomic), a barrier, then
``sema_state.json`` (atomic), so that JSON is SEMA's last file. They are written before the Trainer's own files:
by `sema_hf.SEMATrainer` in ``_save_checkpoint``, by the plain `SEMACallback` at the end of its ``on_step_end`` /
``on_epoch_end`` when ``control.should_save`` is set, or in ``on_evaluate`` on a new best metric under
``save_strategy="best"``. So rotation (step 3, before any ``on_save``) never deletes the older checkpoint while the
newest lacks its EMA: with ``save_total_limit=1`` a kill right after rotation leaves a complete newest checkpoint,
as without SEMA. Only a save that a callback after SEMA's requests gets its EMA in ``on_save``, after all of the
above.

So a folder ``checkpoint-N`` is complete, as seen by one process, when:

* ``trainer_state.json`` parses and records ``global_step`` N (the saving process finished its Trainer files);
* if that state records a SEMA run (``stateful_callbacks["SEMACallback"]`` carries a checkpoint identity, which
  the Trainer writes only while `SEMACallback` trains), ``sema_state.json`` exists for step N (every rank
  finished its EMA shard). For an EMA written in ``on_save`` this also means every rank finished the Trainer's save;
* in a SEMA run resumed on the world size it was saved with, and unless the folder holds no RNG file at all
  (``save_only_model``), this process's own ``rng_state_<rank>.pth`` exists (with `SEMATrainer` rank 0 may finish
  ``trainer_state.json`` before another rank wrote its RNG file).

With ``SEMACallback(allow_fresh_ema_on_resume=True)`` a checkpoint whose only missing part is the EMA counts as
complete: the user accepts a fresh average, and an explicit ``resume_from_checkpoint=PATH`` to it must stay possible.

Every process judges its own view (with ``save_on_each_node`` and no shared storage each node has its own copy) and
the processes agree on the newest step complete in every view. Without ``save_on_each_node`` only global rank 0
writes ``trainer_state.json``; a process that sees none at all (another node without shared storage) abstains, so
that its empty view does not make every checkpoint look incomplete. One process per filesystem (the one that saves,
``args.should_save``) renames each ``checkpoint-M`` with M above that step to ``_incomplete-checkpoint-M`` and warns;
the others wait at a barrier; so every rank resumes the same step. The prefix keeps the folder out of
``get_last_checkpoint``, out of rotation (which globs ``checkpoint-*`` and would delete ``checkpoint-M.incomplete``,
counting it against ``save_total_limit``) and out of Hub uploads (which skip ``_*``). Nothing is deleted.
Older incomplete folders (a rotation killed while deleting) are left alone: resuming never picks them, and the
next rotation finishes deleting them.

Where it runs: `SEMACallback.on_init_end` (inside ``Trainer.__init__``, before ``train()`` resolves
``resume_from_checkpoint=True``), and ``SEMATrainer.train()``, which also refuses an explicit
``resume_from_checkpoint=PATH`` to an incomplete folder with an error naming the newest complete one. A callback
added with ``trainer.add_callback`` after the Trainer was made gets no ``on_init_end``: use `SEMATrainer`, or call
`set_aside_incomplete_checkpoints` (``trainer.args``) before ``train()``. Scripts that pick the folder themselves
before making the Trainer (the transformers examples) can use `last_complete_checkpoint` instead of
``get_last_checkpoint``.

The guarantee is against killed processes, whose writes the operating system completes; transformers does not
``fsync`` its files, so a machine that loses power may lose more than the last checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .checkpoint import STATE_NAME
from .resume import expected_checkpoint_id

logger = logging.get_logger(__name__)

SET_ASIDE_PREFIX = "_incomplete-"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_RNG_FILE = re.compile(r"^rng_state(_\d+)?\.pth$")


def checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``output_dir``, oldest first (what
    ``get_last_checkpoint`` chooses from)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match is not None and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def incomplete_reason(
    folder: str, process_index: int = 0, world_size: int = 1, require_ema: bool = True
) -> str | None:
    """Why ``folder`` is not a complete checkpoint as this process sees it; None when it is complete.

    ``require_ema=False`` accepts a SEMA checkpoint without its EMA files (a resume that starts a fresh average).
    """
    if not os.path.isdir(folder):
        return "it does not exist"
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(folder)))
    step = int(match.group(1)) if match is not None else None
    state = _read_json(os.path.join(folder, TRAINER_STATE_NAME))
    if state is None:
        return f"no {TRAINER_STATE_NAME} (the Trainer writes it after its other files)"
    if state is _TORN:
        return f"{TRAINER_STATE_NAME} is cut short (the process was killed while writing it)"
    if step is None:
        step = state.get("global_step")
    elif state.get("global_step") != step:
        return f"{TRAINER_STATE_NAME} records step {state.get('global_step')}, not {step}"
    sema = _read_json(os.path.join(folder, STATE_NAME))
    if expected_checkpoint_id(state.get("stateful_callbacks")) is not None and require_ema:
        if sema is None or sema is _TORN:
            return f"no {STATE_NAME}: SEMA ran, and its EMA files are missing or unfinished (it writes that file last)"
        if sema.get("global_step") != step:
            return f"{STATE_NAME} records step {sema.get('global_step')}, not {step}"
    if isinstance(sema, dict) and sema.get("world_size") == world_size > 1:
        own = f"rng_state_{process_index}.pth"
        names = os.listdir(folder)
        if any(_RNG_FILE.match(n) for n in names) and own not in names:
            return f"no {own} (rank {process_index} did not finish its part of the Trainer's save)"
    return None


def last_complete_checkpoint(
    output_dir: str, process_index: int = 0, world_size: int = 1, require_ema: bool = True
) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` as this process sees it (None: none): a drop-in for
    transformers' ``get_last_checkpoint`` that skips half-written folders. Renames nothing, talks to no other rank."""
    for _, folder in reversed(checkpoint_folders(output_dir)):
        if incomplete_reason(folder, process_index, world_size, require_ema) is None:
            return folder
    return None


def set_aside_incomplete_checkpoints(args: TrainingArguments, require_ema: bool = True) -> list[str]:
    """Rename every ``checkpoint-N`` of ``args.output_dir`` newer than the newest checkpoint complete on every rank
    to ``_incomplete-checkpoint-N`` (``.2``, ``.3``... when that name is taken), with a warning naming each.

    ``require_ema=False`` (``allow_fresh_ema_on_resume``) keeps a checkpoint whose only missing part is the EMA.
    Every rank must call it (one all-gather, one barrier). The process that saves (``args.should_save``) renames;
    with ``save_on_each_node`` that is one per node, each renaming its node's copy. Returns the new names of the
    folders this process renamed.
    """
    folders = checkpoint_folders(args.output_dir)
    reasons = {step: incomplete_reason(f, args.process_index, args.world_size, require_ema) for step, f in folders}
    # Without save_on_each_node only global rank 0 writes trainer_state.json: a rank on another node without shared
    # storage sees none (at most its own RNG files), which says nothing about whether the checkpoints are complete.
    # Such a view abstains; else it would empty the common set and rank 0 would set every checkpoint aside.
    abstains = not args.save_on_each_node and not any(
        os.path.isfile(os.path.join(f, TRAINER_STATE_NAME)) for _, f in folders
    )
    gathered = _all_gather((abstains, {step for step, reason in reasons.items() if reason is None}), args)
    views = [view for abstained, view in gathered if not abstained] or [view for _, view in gathered]
    common = set.intersection(*views)
    newest = max(common) if common else None
    renamed: list[str] = []
    if args.should_save:
        for step, folder in folders:
            if newest is not None and step <= newest:
                continue
            target = _free_name(os.path.join(args.output_dir, f"{SET_ASIDE_PREFIX}{os.path.basename(folder)}"))
            try:
                os.rename(folder, target)
            except FileNotFoundError:
                continue  # another process sharing this filesystem set it aside first
            reason = reasons[step] or "it is incomplete on another node (every rank must resume the same step)"
            message = (
                f"SEMA: checkpoint {folder!r} is incomplete ({reason}); set aside as {target!r} so that resuming "
                f"starts from {_describe(newest, args.output_dir)}. Nothing was deleted."
            )
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)
            renamed.append(target)
    _barrier(args)
    return renamed


def check_resume_folder(folder: str, args: TrainingArguments, require_ema: bool = True) -> None:
    """Raise ``ValueError`` on every rank when ``folder`` (an explicit ``resume_from_checkpoint``) is incomplete on
    any rank, naming the newest complete checkpoint beside it. Every rank must call it (one all-gather)."""
    reason = incomplete_reason(folder, args.process_index, args.world_size, require_ema)
    reasons = [r for r in _all_gather(reason, args) if r is not None]
    if not reasons:
        return
    parent = os.path.dirname(os.path.normpath(folder))
    set_aside = [n for n in _listdir(parent) if n.startswith(f"{SET_ASIDE_PREFIX}{os.path.basename(folder)}")]
    if set_aside and not os.path.isdir(folder):
        reasons = [f"it was set aside as incomplete ({', '.join(sorted(set_aside))})"]
    newest = last_complete_checkpoint(parent, args.process_index, args.world_size, require_ema)
    instead = (
        f"the newest complete checkpoint there is {newest!r}" if newest else f"{parent!r} holds no complete checkpoint"
    )
    raise ValueError(
        f"resume_from_checkpoint={folder!r} is not a complete checkpoint: {'; '.join(sorted(set(reasons)))}. "
        f"Resume from another one ({instead}), or pass resume_from_checkpoint=True to take the newest complete."
    )


def prepare_resume(args: TrainingArguments, resume_from_checkpoint: str | bool | None, require_ema: bool) -> None:
    """What ``train(resume_from_checkpoint=...)`` needs before the Trainer reads it: ``True``, set incomplete
    checkpoints aside; a folder, refuse it when incomplete. Every rank must call it."""
    if resume_from_checkpoint is True:
        set_aside_incomplete_checkpoints(args, require_ema)
    elif isinstance(resume_from_checkpoint, str):
        check_resume_folder(resume_from_checkpoint, args, require_ema)


# ---- internals ----------------------------------------------------------------------------------------------------
_TORN = object()


def _read_json(path: str) -> Any:
    """The parsed file, None when absent, ``_TORN`` when it does not parse (cut short by a kill)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return _TORN


def _free_name(path: str) -> str:
    candidate, k = path, 1
    while os.path.exists(candidate):
        k += 1
        candidate = f"{path}.{k}"
    return candidate


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def _describe(step: int | None, output_dir: str) -> str:
    if step is None:
        return "scratch (no checkpoint is complete on every rank)"
    return repr(os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"))


def _distributed(args: TrainingArguments) -> bool:
    """Whether the Trainer's processes must agree (a process group that is not the Trainer's is left alone)."""
    return args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather(value: Any, args: TrainingArguments) -> list[Any]:
    if not _distributed(args):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _barrier(args: TrainingArguments) -> None:
    if _distributed(args):
        torch.distributed.barrier()
